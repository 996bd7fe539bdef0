"""Prep: raw clickstream -> validated, sessionized, split, tokenized Parquet shards + manifest.

Laptop / CI (local Ray started on the fly):
    python -m jobs.prep --config jobs/configs/demo.yaml
Cluster:
    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml -- \
        python -m jobs.prep --config jobs/configs/demo.yaml data.events=s3://bucket/events/ data.output_dir=s3://bucket/prep
"""

from __future__ import annotations

import json

from bundlerec.cli import config_job
from bundlerec.data.prep import run_prep


def main(argv: list[str] | None = None) -> dict:
    cfg = config_job(argv, __doc__, tracking=False)
    manifest = run_prep(cfg)
    print(json.dumps({k: manifest[k] for k in ("rows", "quarantine", "examples", "schema_hash")}, indent=2))
    return manifest


if __name__ == "__main__":
    main()
