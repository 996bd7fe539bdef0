"""Simulate traffic: synthetic shoppers against the live endpoint over HTTP (A/B, A/A)."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from bundlerec.cli import Config, Overrides, load, path_option, run


def command(config: Config = None, overrides: Overrides = None,
            users: Annotated[int, typer.Option(help="simulated shoppers (two answers each)")] = 1000,
            seed: Annotated[int, typer.Option(help="the shoppers' random seed")] = 0,
            concurrency: Annotated[int, typer.Option(help="shoppers in flight at once")] = 4,
            visit: Annotated[int, typer.Option(help="the same shoppers' visit number (0: first; run 0 before an "
                                               "experiment and 1 during it for a CUPED pre-period)")] = 0,
            aa_runs: Annotated[int, typer.Option(help="repeated A/A experiments: the false-positive rate")] = 0,
            out: Annotated[Optional[str], path_option("--out", help="write the result as JSON here", output=True)] = None) -> dict:
    """Synthetic shoppers (the generator's planted preferences, a known response model with price
    sensitivity) browse, click, buy and accept bundles against the live endpoint over HTTP. With
    --aa-runs N: N A/A experiments in a row (both arms = the champion, a new salt each), each
    simulated, reported and judged by the promotion rule (never applied): the false-positive rate.

    \b
    Examples (`python -m jobs.simulate_traffic` takes the same arguments):
      bundlerec simulate-traffic --config jobs/configs/demo.yaml --users 2000
      bundlerec simulate-traffic --config jobs/configs/demo.yaml --users 2000 --visit 1   # the same shoppers again
      bundlerec simulate-traffic --config jobs/configs/demo.yaml --aa-runs 20 --users 400   # A/A false positives
    """
    from bundlerec.experiments.simulator import simulate
    from bundlerec.runtime import setup_env
    from bundlerec.serving.deploy import read_token

    setup_env()
    cfg = load(config, overrides)
    token = read_token(cfg.serve.token_file) if cfg.serve.auth else None

    def progress(done, total, s):
        what = "A/A runs" if aa_runs else "shoppers"
        print(f"[simulate] {done}/{total} {what}" + (f", {s:.0f}s" if s else ""), flush=True)

    if aa_runs:
        from bundlerec.experiments.lifecycle import aa_false_positives
        from bundlerec.runtime import init_ray

        init_ray()  # the reports read the logs with Ray Data
        res = aa_false_positives(cfg, aa_runs, users, token, seed, concurrency, progress)
    else:
        res = simulate(cfg.serve.url, cfg.data.output_dir, users, token, seed, concurrency, progress=progress,
                       visit=visit)
    print(json.dumps(res, indent=2))
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=2)
    return res


def main(argv: list[str] | None = None) -> dict:
    return run(command, argv)


if __name__ == "__main__":
    main()
