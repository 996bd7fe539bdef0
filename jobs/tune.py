"""Tune: a Ray Tune sweep whose trials are Ray Train + DeepSpeed runs (ASHA on val NDCG@10, Optuna TPE),
one MLflow parent run with a nested child run per trial; the best trial is evaluated on the test split
with the baselines and written to results.json. Re-running the same command resumes an interrupted sweep.

    python -m jobs.tune --config jobs/configs/demo.yaml tune.num_samples=8 tune.space=default
    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml -- \
        python -m jobs.tune --config jobs/configs/demo.yaml output_root=$PWD
"""

from __future__ import annotations

from bundlerec.cli import config_job
from bundlerec.pipeline import run_tune_stage


def main(argv: list[str] | None = None) -> dict:
    cfg = config_job(argv, __doc__)
    return run_tune_stage(cfg)


if __name__ == "__main__":
    main()
