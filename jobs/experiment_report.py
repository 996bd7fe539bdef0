"""Experiment report: per-arm online metrics with intervals, the SRM check, and --promote."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from bundlerec.cli import Config, Overrides, load, path_option, run


def command(config: Config = None, overrides: Overrides = None,
            promote: Annotated[bool, typer.Option("--promote", help="apply experiment.promotion and move champion if it holds")] = False,
            replay: Annotated[int, typer.Option(help="re-randomized experiments over these users: the rule's "
                                                "false-positive rate (lift 0) and power under repeated looks")] = 0,
            look_every: Annotated[int, typer.Option(help="with --replay: users between looks")] = 50,
            lift: Annotated[Optional[list[float]], typer.Option(help="with --replay: a relative revenue lift planted "
                                                                "on the treatment (repeatable; 0 = A/A)")] = None,
            out: Annotated[Optional[str], path_option("--out", help="write the result as JSON here", output=True)] = None) -> dict:
    """Per-arm CTR, add-to-cart rate, conversion, revenue per impression (raw and capped), bundle take
    rate and realized discount with bootstrap intervals over users, the always-valid (mSPRT, CUPED)
    differences to control, the sample-ratio-mismatch check, and (with --promote) the configured
    promotion rule, which moves `champion` only when it holds. Ray Data
    reads the Parquet logs under serve.event_log_dir; the figures are logged to the MLflow runs of the
    model versions involved (metrics online.<experiment>.<metric>, the report and its plot as
    artifacts) and written to <event_log_dir>/reports/<experiment>.{json,png}.

    \b
    Examples (`python -m jobs.experiment_report` takes the same arguments):
      bundlerec experiment-report --config jobs/configs/demo.yaml experiment.name=exp-1
      bundlerec experiment-report --config jobs/configs/demo.yaml experiment.name=exp-1 --promote
      bundlerec experiment-report --config jobs/configs/demo.yaml experiment.name=aa-1 --replay 200 --lift 0 --lift 0.3
    """
    from bundlerec.runtime import init_ray, setup_env

    setup_env()
    cfg = load(config, overrides)
    init_ray()
    from bundlerec.experiments.lifecycle import run_report

    res = run_report(cfg, promote_now=promote,
                     replay={"runs": replay, "look_every": look_every, "lifts": lift or [0.0]} if replay else None)
    keep = {k: res[k] for k in ("summary", "decision", "promotion", "report_path", "replay") if k in res}
    print(json.dumps(keep, indent=2, default=float))
    if out:
        with open(out, "w") as f:
            json.dump({**keep, "report": res["report"]}, f, indent=2, default=float)
    return res


def main(argv: list[str] | None = None) -> dict:
    return run(command, argv)


if __name__ == "__main__":
    main()
