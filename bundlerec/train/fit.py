"""The train stage on the driver: build the TorchTrainer, fit, export the best checkpoint.

    result = fit(cfg, prep_dir, run_id)   # {"export_dir", "checkpoint", "metrics", ...}
"""

from __future__ import annotations

import json
import logging
import time

from bundlerec.config import PipelineConfig
from bundlerec import integrity
from bundlerec.storage import absolute, join, parent

log = logging.getLogger(__name__)


def fit(cfg: PipelineConfig, prep_dir: str, run_id: str | None = None, export_dir: str | None = None,
        callbacks: list | None = None, name: str | None = None, storage_path: str | None = None,
        item_groups: list[str] | None = None) -> dict:
    """Fine-tune on ``prep_dir`` with Ray Train + DeepSpeed; export the best epoch for serving.

    ``callbacks`` go to the Train RunConfig (a Tune trial passes TuneReportCallback). ``item_groups``
    (a label per catalog position, e.g. the item's domain): every epoch's metrics then count the rows
    trained per label of their target (``rows/<label>``; :func:`rows_by_group` reads them back).
    """
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from bundlerec.data.catalog import load_items
    from bundlerec.data.examples import check_prepared, load_split, read_examples
    from bundlerec.data.snapshot import verify as verify_prep
    from bundlerec.data.statistics import popularity
    from bundlerec.storage import read_text
    from bundlerec.train.loop import LoopInputs, train_loop_per_worker

    tc = cfg.train
    t0 = time.time()
    manifest = json.loads(read_text(join(prep_dir, "manifest.json")))
    from bundlerec.data.catalog import _tokenizer, tokenizer_fingerprint

    check_prepared(manifest, cfg.data.history_len, tokenizer_fingerprint(_tokenizer(cfg.model.name_or_path)))
    verify_prep(prep_dir, manifest)  # every file of the committed snapshot, size + SHA-256
    ray.data.DataContext.get_current().enable_progress_bars = False  # per process (Tune trial drivers too)
    train_ds = read_examples(prep_dir, "train", tc.deterministic)
    if tc.materialize_train:
        train_ds = train_ds.materialize()
    # val is small (one row per user) and every rank reads all of it every epoch: read it once
    val_ds = read_examples(prep_dir, "val", tc.deterministic).materialize()
    n_train = train_ds.count()
    steps = n_train // (tc.micro_batch * tc.num_workers)
    if tc.max_steps_per_epoch:
        steps = min(steps, tc.max_steps_per_epoch)
    if steps < 1:
        raise ValueError(f"{n_train} training examples are fewer than one global batch "
                         f"({tc.micro_batch} x {tc.num_workers} workers); lower train.micro_batch")
    n_items = len(load_items(prep_dir))
    run_name = name or f"{cfg.name}-{run_id[:8] if run_id else int(t0)}"
    storage = absolute(storage_path or tc.storage_path)
    # a resumed run whose Ray snapshot was torn (disk full) restarts from its newest intact checkpoint
    from bundlerec.train.checkpoints import recover_torn_snapshot

    if item_groups is not None and len(item_groups) != n_items:
        raise ValueError(f"item_groups has {len(item_groups)} labels for a catalog of {n_items} items")
    resume_from = recover_torn_snapshot(storage, run_name)
    inputs = LoopInputs(cfg=cfg, prep_dir=absolute(prep_dir), steps_per_epoch=steps, run_id=run_id,
                        popularity=popularity(load_split(prep_dir, "train"), n_items).tolist(), resume_from=resume_from,
                        item_groups=list(item_groups) if item_groups is not None else None)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"inputs": inputs},  # Ray Train wants a dict; the worker gets the typed config
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                               resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage,
            callbacks=callbacks or [],
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val_ndcg_at_10", checkpoint_score_order="max"),
        ),
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"],  # every rank sees all of val
                                            execution_options=_ingest_options(tc.deterministic)),
    )
    log.info("train: %d examples, %d steps/epoch/worker, %d workers, ZeRO-%d", n_train, steps,
             tc.num_workers, tc.zero_stage)
    result = trainer.fit()
    if result.error:
        raise result.error
    history = result.metrics.get("history", [])
    if run_id:  # every epoch's metrics in MLflow, whatever the tracking server did during the run
        from bundlerec.tracking import ensure_logged

        ensure_logged(cfg.mlflow.tracking_uri, run_id, history)
    export_dir = export_dir or export_target(cfg)
    local = integrity.workdir_for(export_dir)  # built locally, uploaded with its manifest last for s3://
    best_ckpt, best_metrics = export_best(cfg, result.best_checkpoints, prep_dir, local)
    integrity.publish(local, export_dir)
    return {"export_dir": export_dir, "local_export": local, "checkpoint": best_ckpt.path,
            "best_epoch_metrics": best_metrics,
            "last_metrics": {k: v for k, v in result.metrics.items() if k != "history"},
            "history": history, "train_seconds": time.time() - t0, "steps_per_epoch": steps,
            "n_train": n_train}


def rows_by_group(history: list[dict]) -> dict[str, list[int]]:
    """``{label: [rows trained in epoch 1, 2, ...]}`` from a run's per-epoch metrics (``rows/<label>``,
    written when :func:`fit` got ``item_groups``); empty when it did not."""
    labels = sorted({k[len("rows/"):] for h in history for k in h if k.startswith("rows/")})
    return {g: [int(h.get(f"rows/{g}", 0)) for h in history] for g in labels}


def export_target(cfg: PipelineConfig) -> str:
    """Where a training run's export goes: ``export/`` beside ``results_path`` (a local folder or an
    object-store URI)."""
    return join(parent(cfg.results_path), "export")


def _ingest_options(deterministic: bool):
    """Ray Train's default ingest options, with preserve_order when runs must be reproducible: the
    train split then deals blocks to workers in a fixed order (no locality race between workers)."""
    import ray.train

    opts = ray.train.DataConfig.default_ingest_options()
    opts.preserve_order = deterministic
    return opts


def export_best(cfg: PipelineConfig, checkpoints, prep_dir: str, export_dir: str):
    """Export the best-scoring checkpoint that passes verification; a damaged one (e.g. the one a
    crash left half-written, which Ray may still keep among the best) is skipped with a warning. A
    run resumed with another number of workers holds checkpoints of both: each verifies against the
    ranks that wrote it, and the consolidation reads any number of ZeRO shards."""
    from bundlerec.train.checkpoints import verify

    ranked = sorted(checkpoints, key=lambda cm: cm[1].get("val_ndcg_at_10", -1), reverse=True)
    for ckpt, metrics in ranked:
        with ckpt.as_directory() as d:
            ok, why = verify(d)
            if ok:
                from bundlerec.model.export import export

                export(cfg, d, prep_dir, export_dir)
                return ckpt, metrics
        log.warning("not exporting damaged checkpoint %s (%s)", ckpt.path, why)
    raise RuntimeError(f"no intact checkpoint to export among {[c.path for c, _ in ranked]}")


