"""Tune: a Ray Tune sweep whose trials are Ray Train + DeepSpeed runs, resumable."""

from __future__ import annotations

from bundlerec.cli import Config, Overrides, config_job, run


def command(config: Config = None, overrides: Overrides = None) -> dict:
    """Ray Tune sweep whose trials are Ray Train + DeepSpeed runs (ASHA on val NDCG@10, Optuna TPE):
    one MLflow parent run with a nested child run per trial; the best trial is evaluated on the test
    split with the baselines and written to results.json. The same command again resumes an
    interrupted sweep.

    \b
    Examples (`python -m jobs.tune` takes the same arguments):
      bundlerec tune --config jobs/configs/demo.yaml tune.num_samples=8 tune.space=default
      bundlerec submit tune --config jobs/configs/demo.yaml
    """
    from bundlerec.pipeline import run_tune_stage

    return run_tune_stage(config_job(config, overrides))


def main(argv: list[str] | None = None) -> dict:
    return run(command, argv)


if __name__ == "__main__":
    main()
