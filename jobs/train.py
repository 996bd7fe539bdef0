"""Train: fine-tune the two-tower model with Ray Train + DeepSpeed ZeRO on prepared data, export it,
evaluate it and the baselines on the test split, log everything to MLflow, write results.json.

Needs the output of jobs.prep (data.output_dir) and a tracking server (mlflow.tracking_uri).
    python -m jobs.train --config jobs/configs/demo.yaml train.zero_stage=3
    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml -- \
        python -m jobs.train --config jobs/configs/demo.yaml train.num_workers=8 train.use_gpu=true
"""

from __future__ import annotations

from bundlerec.cli import config_job
from bundlerec.pipeline import run_train_stage


def main(argv: list[str] | None = None) -> dict:
    cfg = config_job(argv, __doc__)
    return run_train_stage(cfg)


if __name__ == "__main__":
    main()
