"""Train: fine-tune the two-tower model with Ray Train + DeepSpeed ZeRO, export, evaluate, log to MLflow."""

from __future__ import annotations

from bundlerec.cli import Config, Overrides, config_job, run


def command(config: Config = None, overrides: Overrides = None) -> dict:
    """Ray Train + DeepSpeed ZeRO fine-tuning of the two-tower model on prepared data; exports it,
    evaluates it and the baselines on the test split, logs everything to MLflow and writes
    results.json. Needs the output of prep (data.output_dir) and a tracking server
    (mlflow.tracking_uri).

    \b
    Examples (`python -m jobs.train` takes the same arguments):
      bundlerec train --config jobs/configs/demo.yaml train.zero_stage=3
      bundlerec submit train --config jobs/configs/demo.yaml train.num_workers=8 train.use_gpu=true
    """
    from bundlerec.pipeline import run_train_stage

    return run_train_stage(config_job(config, overrides))


def main(argv: list[str] | None = None) -> dict:
    return run(command, argv)


if __name__ == "__main__":
    main()
