"""Stage functions the jobs call (and the tests call the same ones).

* :func:`run_train_stage` -- MLflow run, Ray Train fit, export, test evaluation with baselines;
* :func:`run_pipeline`    -- prep, then train; writes ``results.json`` and ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import os
import time

from bundlerec.config import PipelineConfig, config_hash, flatten, to_dict
from bundlerec.storage import join, read_text

log = logging.getLogger(__name__)

SUMMARY_METRICS = ("ndcg@10", "recall@10", "mrr@10", "hitrate@10", "ndcg@20", "recall@20", "coverage@10")


def _versions() -> dict:
    import deepspeed
    import mlflow
    import ray
    import torch
    import transformers

    return {"ray": ray.__version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "mlflow": mlflow.__version__}


def run_train_stage(cfg: PipelineConfig, manifest: dict | None = None) -> dict:
    """Train on the prepared data in ``cfg.data.output_dir``; returns (and writes) results.json."""
    from bundlerec.evaluate import evaluate_run, format_table
    from bundlerec.tracking import check_server, log_results, start_run
    from bundlerec.train import fit

    prep_dir = cfg.data.output_dir
    manifest = manifest or json.loads(read_text(join(prep_dir, "manifest.json")))
    check_server(cfg.mlflow.tracking_uri)  # fail before any compute is spent
    params = {k: v for k, v in flatten(to_dict(cfg)).items()}
    tags = {"bundlerec.config_hash": config_hash(cfg), "bundlerec.schema_hash": manifest["schema_hash"],
            "bundlerec.stage": "train", **{f"version.{k}": v for k, v in _versions().items()}}
    run_id = start_run(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.mlflow.run_name, params, tags)
    log.info("train: MLflow run %s (experiment %s at %s)", run_id, cfg.mlflow.experiment, cfg.mlflow.tracking_uri)

    trained = fit(cfg, prep_dir, run_id)
    t = time.time()
    metrics = evaluate_run(prep_dir, trained["export_dir"], cfg, split="test")
    eval_s = time.time() - t
    print("\n" + format_table(metrics, SUMMARY_METRICS) + "\n", flush=True)
    results = {
        "run_id": run_id, "experiment": cfg.mlflow.experiment, "mlflow_url": cfg.mlflow.tracking_uri,
        "export_dir": trained["export_dir"], "checkpoint": trained["checkpoint"],
        "metrics": metrics, "train": {k: v for k, v in trained.items() if k not in ("export_dir", "checkpoint")},
        "eval_seconds": eval_s, "manifest": {k: manifest[k] for k in ("rows", "examples", "schema_hash")},
    }
    os.makedirs(os.path.dirname(os.path.abspath(cfg.results_path)), exist_ok=True)
    with open(cfg.results_path, "w") as f:
        json.dump(results, f, indent=2, default=str)
    log_results(cfg.mlflow.tracking_uri, run_id, metrics, trained["export_dir"],
                files={"results": cfg.results_path, "prep": join(prep_dir, "manifest.json")})
    return results


def run_pipeline(cfg: PipelineConfig) -> dict:
    """prep -> train -> evaluate -> MLflow; writes summary.json next to results.json."""
    from bundlerec.prep import run_prep
    from bundlerec.tracking import check_server

    t0 = time.time()
    check_server(cfg.mlflow.tracking_uri)
    manifest = run_prep(cfg)
    results = run_train_stage(cfg, manifest)
    summary = {
        "mlflow_url": cfg.mlflow.tracking_uri, "experiment": cfg.mlflow.experiment, "run_id": results["run_id"],
        "metrics": {m: {k: v[k] for k in SUMMARY_METRICS if k in v} for m, v in results["metrics"].items()},
        "export_dir": results["export_dir"], "prep_dir": cfg.data.output_dir,
        "pipeline_seconds": round(time.time() - t0, 1),
        "train_samples_per_s_per_worker": results["train"]["last_metrics"].get("samples_per_s_per_worker"),
    }
    path = os.path.join(os.path.dirname(os.path.abspath(cfg.results_path)), "summary.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=2, default=str)
    log.info("pipeline: done in %.0fs; summary at %s", summary["pipeline_seconds"], path)
    return summary
