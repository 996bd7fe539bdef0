"""Pipeline: prep -> train -> evaluate -> MLflow, in one job. What `make demo` submits.

    python -m jobs.pipeline --config jobs/configs/demo.yaml
    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml -- \
        python -m jobs.pipeline --config jobs/configs/demo.yaml output_root=$PWD
"""

from __future__ import annotations

import json

from bundlerec.cli import parse
from bundlerec.pipeline import run_pipeline
from bundlerec.runtime import check_versions, init_ray, setup_env
from bundlerec.tracking import check_server


def main(argv: list[str] | None = None) -> dict:
    setup_env()
    cfg = parse(argv, "bundlerec pipeline: prep + train + evaluate")
    check_versions()
    check_server(cfg.mlflow.tracking_uri)  # a down tracking server fails here, before Ray or compute
    init_ray()
    summary = run_pipeline(cfg)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
