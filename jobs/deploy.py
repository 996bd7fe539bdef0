"""Deploy: serve models:/bundlerec@champion on the running cluster and wait until it answers."""

from __future__ import annotations

import json
import os

from bundlerec.cli import Config, Overrides, load, run


def command(config: Config = None, overrides: Overrides = None) -> dict:
    """Put serve/config.yaml on the running cluster (as `serve deploy` does) serving
    models:/bundlerec@champion, wait until it answers, print its model info.

    \b
    Examples (`python -m jobs.deploy` takes the same arguments):
      bundlerec deploy --config jobs/configs/demo.yaml
      bundlerec deploy --config jobs/configs/demo.yaml serve.model_uri=runs/export100k   # a local export
      curl -s -X POST http://127.0.0.1:8000/v1/recommendations -H 'content-type: application/json' -d '{"user_id": "U0000007"}'
    """
    from bundlerec.runtime import setup_env
    from bundlerec.serving.auth import write_token_file
    from bundlerec.serving.deploy import deploy

    setup_env()
    cfg = load(config, overrides)
    if cfg.serve.auth and not os.path.exists(cfg.serve.token_file):  # keep an existing token: clients keep working
        write_token_file(cfg.serve.token_file)
        print(f"wrote a new API token to {cfg.serve.token_file} (mode 0600)")
    out = deploy(cfg)
    print(json.dumps(out, indent=2))
    return out


def main(argv: list[str] | None = None) -> dict:
    return run(command, argv)


if __name__ == "__main__":
    main()
