"""Experiment report: per-arm CTR, add-to-cart rate, conversion, revenue per impression, bundle take
rate and realized discount with bootstrap intervals over users, the sample-ratio-mismatch check,
and (``--promote``) the configured promotion rule, which moves ``champion`` only when it holds.

    python -m jobs.experiment_report --config jobs/configs/demo.yaml experiment.name=exp-1
    python -m jobs.experiment_report --config jobs/configs/demo.yaml experiment.name=exp-1 --promote

Ray Data reads the Parquet logs under ``serve.event_log_dir``; the figures are logged to the MLflow
runs of the model versions involved (metrics ``online.<experiment>.<metric>``, the report and its
plot as artifacts) and written to ``<event_log_dir>/reports/<experiment>.{json,png}``.
"""

from __future__ import annotations

import json


def main(argv: list[str] | None = None) -> dict:
    from bundlerec.cli import parse_with
    from bundlerec.runtime import init_ray, setup_env

    setup_env()
    cfg, args = parse_with(argv, __doc__, lambda p: p.add_argument(
        "--promote", action="store_true", help="apply experiment.promotion and move champion if it holds"))
    init_ray()
    from bundlerec.experiments.lifecycle import run_report

    out = run_report(cfg, promote_now=args.promote)
    print(json.dumps({k: out[k] for k in ("summary", "decision", "promotion", "report_path") if k in out}, indent=2))
    return out


if __name__ == "__main__":
    main()
