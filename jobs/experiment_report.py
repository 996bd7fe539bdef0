"""Experiment report: per-arm online metrics with intervals, the SRM check, and --promote."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from bundlerec.cli import Config, Overrides, load, run


def command(config: Config = None, overrides: Overrides = None,
            promote: Annotated[bool, typer.Option("--promote", help="apply experiment.promotion and move champion if it holds")] = False) -> dict:
    """Per-arm CTR, add-to-cart rate, conversion, revenue per impression, bundle take rate and
    realized discount with bootstrap intervals over users, the sample-ratio-mismatch check, and (with
    --promote) the configured promotion rule, which moves `champion` only when it holds. Ray Data
    reads the Parquet logs under serve.event_log_dir; the figures are logged to the MLflow runs of the
    model versions involved (metrics online.<experiment>.<metric>, the report and its plot as
    artifacts) and written to <event_log_dir>/reports/<experiment>.{json,png}.

    \b
    Examples (`python -m jobs.experiment_report` takes the same arguments):
      bundlerec experiment-report --config jobs/configs/demo.yaml experiment.name=exp-1
      bundlerec experiment-report --config jobs/configs/demo.yaml experiment.name=exp-1 --promote
    """
    from bundlerec.runtime import init_ray, setup_env

    setup_env()
    cfg = load(config, overrides)
    init_ray()
    from bundlerec.experiments.lifecycle import run_report

    out = run_report(cfg, promote_now=promote)
    print(json.dumps({k: out[k] for k in ("summary", "decision", "promotion", "report_path") if k in out}, indent=2))
    return out


def main(argv: list[str] | None = None) -> dict:
    return run(command, argv)


if __name__ == "__main__":
    main()
