"""Pipeline: prep -> train -> evaluate -> MLflow, in one job. What `make demo` submits.

    python -m jobs.pipeline --config jobs/configs/demo.yaml
    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml -- \
        python -m jobs.pipeline --config jobs/configs/demo.yaml output_root=$PWD
"""

from __future__ import annotations

import json

from bundlerec.cli import config_job
from bundlerec.pipeline import run_pipeline
from bundlerec.privacy import redact


def main(argv: list[str] | None = None) -> dict:
    cfg = config_job(argv, __doc__)
    summary = run_pipeline(cfg)
    print(json.dumps(redact(summary), indent=2))  # summary.json keeps the ids; logs do not
    return summary


if __name__ == "__main__":
    main()
