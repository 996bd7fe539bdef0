"""Register: a new MLflow registry version of the trained export; champion only if it wins on validation."""

from __future__ import annotations

import json

from bundlerec.cli import Config, Overrides, load, run


def command(config: Config = None, overrides: Overrides = None) -> dict:
    """Log the model in results.json (from train or tune) as an MLflow pyfunc and register a new
    version of `bundlerec`; the alias `champion` moves only if it beats the current champion on the
    same validation data, otherwise the version becomes `challenger` (the reason is on the version).

    \b
    Examples (`python -m jobs.register` takes the same arguments):
      bundlerec register --config jobs/configs/demo.yaml
      bundlerec submit register --config jobs/configs/demo.yaml
    """
    from bundlerec.registry.promotion import register
    from bundlerec.runtime import setup_env
    from bundlerec.storage import read_text

    setup_env()
    cfg = load(config, overrides)
    results = json.loads(read_text(cfg.results_path))  # a local file or an object-store URI
    out = register(results["export_dir"], cfg.data.output_dir, cfg.mlflow.tracking_uri, cfg.mlflow.experiment,
                   run_id=results["run_id"], model_name=cfg.serve.model_name, history_len=cfg.data.history_len,
                   primary_metric=cfg.mlflow.primary_metric)
    print(json.dumps(out, indent=2))
    return out


def main(argv: list[str] | None = None) -> dict:
    return run(command, argv)


if __name__ == "__main__":
    main()
