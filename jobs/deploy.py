"""Deploy: put serve/config.yaml on the running cluster (as `serve deploy` does) serving
models:/bundlerec@champion, wait until it answers, print its model info.

    python -m jobs.deploy --config jobs/configs/demo.yaml
    python -m jobs.deploy --config jobs/configs/demo.yaml serve.model_uri=runs/export100k   # a local export
    curl -s -X POST http://127.0.0.1:8000/v1/recommendations -H 'content-type: application/json' -d '{"user_id": "U0000007"}'
"""

from __future__ import annotations

import json
import os

from bundlerec.cli import parse
from bundlerec.runtime import setup_env
from bundlerec.serving.auth import write_token_file
from bundlerec.serving.deploy import deploy


def main(argv: list[str] | None = None) -> dict:
    setup_env()
    cfg = parse(argv, __doc__)
    if cfg.serve.auth and not os.path.exists(cfg.serve.token_file):  # keep an existing token: clients keep working
        write_token_file(cfg.serve.token_file)
        print(f"wrote a new API token to {cfg.serve.token_file} (mode 0600)")
    out = deploy(cfg)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
