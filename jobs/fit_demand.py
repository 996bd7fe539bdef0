"""Fit demand: the bundle demand model refitted on the shop's own offers and feedback, registered."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from bundlerec.cli import Config, Overrides, load, run


def command(config: Config = None, overrides: Overrides = None,
            source: Annotated[str, typer.Option(help="the alias or version whose export gets the refitted "
                                                "demand model")] = "champion") -> dict:
    """Fit the purchase-probability model (price sensitivity included) on every priced bundle the
    endpoint offered (serve.event_log_dir, read by Ray Data) and the shoppers' bundle_accept feedback,
    into a copy of SOURCE's export, and register it as a new version of serve.model_name (it becomes
    challenger: compare it online with an experiment). Explore prices first (an experiment arm's
    pricing policy with explore > 0) so that the prices shown vary for reasons shoppers do not.

    \b
    Examples (`python -m jobs.fit_demand` takes the same arguments):
      bundlerec fit-demand --config jobs/configs/demo.yaml
      bundlerec fit-demand --config jobs/configs/demo.yaml --source 3
    """
    from bundlerec.experiments.demand import refit_demand
    from bundlerec.runtime import init_ray, setup_env

    setup_env()
    cfg = load(config, overrides)
    init_ray()  # the logs are read with Ray Data
    out = refit_demand(cfg, source)
    print(json.dumps(out, indent=2, default=str))
    return out


def main(argv: list[str] | None = None) -> dict:
    return run(command, argv)


if __name__ == "__main__":
    main()
