"""The pricing loop in the simulator: explore, refit the demand model, compare with the oracle."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from bundlerec.cli import Config, Overrides, load, path_option, run


def command(config: Config = None, overrides: Overrides = None,
            explore_users: Annotated[int, typer.Option(help="shoppers served by the exploring champion")] = 2000,
            ab_users: Annotated[int, typer.Option(help="shoppers of the three-arm experiment")] = 3000,
            explore: Annotated[float, typer.Option(help="exploration width (share of the list price)")] = 0.15,
            mu: Annotated[float, typer.Option(help="the shoppers' true log WTP / list price (median)")] = 0.15,
            s: Annotated[float, typer.Option(help="the true logistic scale of WTP (price sensitivity)")] = 0.15,
            per_item: Annotated[float, typer.Option(help="true change of mu per log(items / 2)")] = 0.0,
            spread: Annotated[float, typer.Option(help="sd of the shoppers' own mu (0: homogeneous)")] = 0.0,
            seed: Annotated[int, typer.Option(help="the shoppers' seed")] = 0,
            rounds: Annotated[int, typer.Option(help="explore-and-refit rounds (each explores around the last refit)")] = 1,
            challenger: Annotated[Optional[list[float]], typer.Option(
                help="a shift price policy to estimate off-policy from round 1's logs, then measure online (repeatable)")] = None,
            challenger_users: Annotated[int, typer.Option(help="shoppers of the challengers' online experiment")] = 4000,
            out: Annotated[Optional[str], path_option("--out", help="write the record as JSON here", output=True)] = None) -> dict:
    """On a deployed endpoint of a synthetic prep (auth on, an event log): the champion explores
    prices for --explore-users simulated shoppers whose willingness to pay is known (--mu, --s,
    --per-item, --spread); fit-demand refits the demand model on the logs (--rounds times: the refit
    explores for as many shoppers again and is refitted on every round's offers); a three-arm experiment
    (transferred = the champion, feedback = the refit, oracle = the true curves) serves --ab-users
    more. The record: the fit against the truth (elasticity at the oracle price), revenue per
    impression per arm with 95 % bootstrap intervals, each arm's ratio to the oracle. It registers
    --rounds + 1 versions (each refit, the oracle) and leaves the champion where it was.

    \b
    Examples (`python -m jobs.bench_demand` takes the same arguments):
      bundlerec bench-demand --config jobs/configs/tiny.yaml output_root=/tmp/dm serve.auth=true --out demand.json
      bundlerec bench-demand --config jobs/configs/tiny.yaml output_root=/tmp/dm serve.auth=true --spread 0.2
      bundlerec bench-demand --config jobs/configs/tiny.yaml output_root=/tmp/dm serve.auth=true --rounds 4
      bundlerec bench-demand --config jobs/configs/tiny.yaml output_root=/tmp/dm serve.auth=true --challenger -0.075
    """
    from bundlerec.experiments.demand import measure
    from bundlerec.experiments.simulator import Demand
    from bundlerec.runtime import init_ray, setup_env
    from bundlerec.serving.deploy import read_token

    setup_env()
    cfg = load(config, overrides)
    init_ray()  # fit-demand reads the logs with Ray Data
    token = read_token(cfg.serve.token_file) if cfg.serve.auth else None
    res = measure(cfg, token, Demand(mu=mu, s=s, per_item=per_item, spread=spread), explore_users, ab_users, explore,
                  seed, rounds=rounds, challengers=tuple(challenger or ()), challenger_users=challenger_users,
                  progress=lambda done, total, sec: print(f"[bench-demand] {done}/{total} shoppers, {sec:.0f}s", flush=True))
    print(json.dumps(res, indent=2, default=float))
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=2, default=float)
    return res


def main(argv: list[str] | None = None) -> dict:
    return run(command, argv)


if __name__ == "__main__":
    main()
