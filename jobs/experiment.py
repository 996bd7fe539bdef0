"""Experiment: start, show or stop an online experiment on the registered model. Replicas of the
running Serve app pick it up within ``serve.poll_s`` (no redeploy): each loads and checks every
arm's model, then splits traffic by a sticky hash of the user (or anonymous session).

    python -m jobs.experiment start --config jobs/configs/demo.yaml experiment.name=exp-1 \
        'experiment.arms={control: champion, treatment: challenger}' \
        'experiment.shares={control: 0.5, treatment: 0.5}'
    python -m jobs.experiment status --config jobs/configs/demo.yaml
    python -m jobs.experiment stop --config jobs/configs/demo.yaml

Then: shoppers' feedback goes to POST /v1/feedback; `python -m jobs.experiment_report` analyses it.
"""

from __future__ import annotations

import json


def main(argv: list[str] | None = None) -> dict:
    import mlflow

    from bundlerec.cli import parse_with
    from bundlerec.experiments import lifecycle
    from bundlerec.runtime import setup_env

    setup_env()
    cfg, args = parse_with(argv, __doc__, lambda p: p.add_argument("action", choices=["start", "status", "stop"]))
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    name = cfg.serve.model_name
    if args.action == "start":
        out = {"started": lifecycle.start(client, name, cfg.experiment)}
    elif args.action == "stop":
        out = {"stopped": lifecycle.stop(client, name)}
    else:
        out = {"running": lifecycle.read(client, name)}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
