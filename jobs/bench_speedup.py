"""Training speed before/after, side by side in one run (fp32/SDPA/no caching vs the config's own)."""

from __future__ import annotations

import json
import platform
import time
from typing import Annotated, Optional

import typer

from bundlerec.cli import Overrides, config_job, path_option, run

BEFORE = {"precision": "fp32", "attention": "sdpa", "cache_frozen": False, "materialize_train": False}


def command(config: Annotated[str, typer.Option(help="YAML config", metavar="FILE")] = "jobs/configs/demo.yaml",
            out: Annotated[Optional[str], path_option("--out", help="JSON file to write (default: print only)", output=True)] = None,
            overrides: Overrides = None) -> dict:
    """Training speed before/after, side by side in one run: the train stage (Ray Train + DeepSpeed,
    the config's workers, its prep output) once with the old settings (fp32, SDPA attention, frozen
    layers recomputed every step, Ray Data batches every step) and once with the config's own, then
    the samples/s per worker of every epoch and the validation/test metrics of both, as JSON.

    \b
    Examples (`python -m jobs.bench_speedup` takes the same arguments):
      python -m jobs.bench_speedup --config jobs/configs/demo.yaml --out docs/bench/cpu_speedup.json
    """
    import dataclasses

    from bundlerec.pipeline import run_train_stage
    from bundlerec.runtime import cpu_name, versions
    from bundlerec.storage import join, parent

    overrides = list(overrides or [])
    base = config_job(config, overrides)
    runs = {}
    for label, train in (("before", BEFORE), ("after", {})):
        cfg = dataclasses.replace(
            base, name=f"{base.name}-speed-{label}", results_path=join(parent(base.results_path), f"speed-{label}", "results.json"),
            train=dataclasses.replace(base.train, storage_path=f"{base.train.storage_path}-speed-{label}", **train))
        t0 = time.time()
        res = run_train_stage(cfg)
        history = res["train"]["history"]
        runs[label] = {
            "settings": {k: getattr(cfg.train, k) for k in ("precision", "attention", "cache_frozen",
                                                            "materialize_train", "zero_stage", "num_workers",
                                                            "micro_batch")},
            "samples_per_s_per_worker_by_epoch": [h["samples_per_s_per_worker"] for h in history],
            "step_time_fractions_last_epoch": {k: history[-1].get(k) for k in
                                              ("forward_frac", "backward_frac", "optimizer_frac", "data_wait_frac")},
            "val_ndcg_at_10_by_epoch": [h["val_ndcg_at_10"] for h in history],
            "test": {k: v for k, v in res["metrics"]["bundlerec"].items() if k in ("ndcg@10", "recall@10", "ci95")},
            "mlflow_run_id": res["run_id"], "stage_seconds": round(time.time() - t0, 1),
        }
    b, a = (max(runs[k]["samples_per_s_per_worker_by_epoch"]) for k in ("before", "after"))
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {cpu_name()}",
              "config": config, "overrides": overrides, "versions": versions(),
              "speedup_best_epoch": round(a / b, 2), **runs}
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return result


def main(argv: list[str] | None = None) -> dict:
    return run(command, argv)


if __name__ == "__main__":
    main()
