"""Experiment: start, show or stop an online experiment on the registered model."""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated

import typer

from bundlerec.cli import Config, Overrides, load, run


class Action(str, Enum):
    start = "start"
    status = "status"
    stop = "stop"


def command(action: Annotated[Action, typer.Argument(help="start, status or stop", show_default=False)],
            config: Config = None, overrides: Overrides = None) -> dict:
    """Start, show or stop an online experiment on the registered model. Replicas of the running Serve
    app pick it up within serve.poll_s (no redeploy): each loads and checks every arm's model, then
    splits traffic by a sticky hash of the user (or anonymous session). Shoppers' feedback goes to
    POST /v1/feedback; `bundlerec experiment-report` analyses it.

    \b
    Examples (`python -m jobs.experiment` takes the same arguments):
      bundlerec experiment start --config jobs/configs/demo.yaml experiment.name=exp-1 \\
          'experiment.arms={control: champion, treatment: challenger}' \\
          'experiment.shares={control: 0.5, treatment: 0.5}'
      bundlerec experiment status --config jobs/configs/demo.yaml
      bundlerec experiment stop --config jobs/configs/demo.yaml
    """
    import mlflow

    from bundlerec.experiments import lifecycle
    from bundlerec.runtime import setup_env

    setup_env()
    cfg = load(config, overrides)
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    name = cfg.serve.model_name
    if action == Action.start:
        out = {"started": lifecycle.start(client, name, cfg.experiment)}
    elif action == Action.stop:
        out = {"stopped": lifecycle.stop(client, name)}
    else:
        out = {"running": lifecycle.read(client, name)}
    print(json.dumps(out, indent=2))
    return out


def main(argv: list[str] | None = None) -> dict:
    return run(command, argv)


if __name__ == "__main__":
    main()
