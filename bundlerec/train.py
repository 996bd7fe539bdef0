"""The train stage on the driver: build the TorchTrainer, fit, export the best checkpoint.

    result = fit(cfg, prep_dir, run_id)   # {"export_dir", "checkpoint", "metrics", ...}
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch

from bundlerec.config import PipelineConfig, to_dict
from bundlerec.storage import absolute, join

log = logging.getLogger(__name__)


def fit(cfg: PipelineConfig, prep_dir: str, run_id: str | None = None, export_dir: str | None = None,
        callbacks: list | None = None, name: str | None = None, storage_path: str | None = None) -> dict:
    """Fine-tune on ``prep_dir`` with Ray Train + DeepSpeed; export the best epoch for serving.

    ``callbacks`` go to the Train RunConfig (a Tune trial passes TuneReportCallback).
    """
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from bundlerec.baselines import popularity
    from bundlerec.evaluate import load_split
    from bundlerec.train_loop import train_loop_per_worker

    tc = cfg.train
    t0 = time.time()
    ray.data.DataContext.get_current().enable_progress_bars = False  # per process (Tune trial drivers too)
    train_ds = read_examples(prep_dir, "train", tc.deterministic)
    val_ds = read_examples(prep_dir, "val", tc.deterministic)
    if val_ds.count() == 0:  # tiny data: fall back to test for model selection, say so
        log.warning("train: empty val split; using the test split for early stopping")
        val_ds = read_examples(prep_dir, "test", tc.deterministic)
    n_train = train_ds.count()
    steps = n_train // (tc.micro_batch * tc.num_workers)
    if tc.max_steps_per_epoch:
        steps = min(steps, tc.max_steps_per_epoch)
    if steps < 1:
        raise ValueError(f"{n_train} training examples are fewer than one global batch "
                         f"({tc.micro_batch} x {tc.num_workers} workers); lower train.micro_batch")
    from bundlerec.catalog import load_items

    n_items = len(load_items(prep_dir))
    loop_config = {
        **to_dict(cfg), "prep_dir": absolute(prep_dir), "steps_per_epoch": steps,
        "popularity": popularity(load_split(prep_dir, "train"), n_items).tolist(),
        "run_id": run_id, "mlflow_uri": cfg.mlflow.tracking_uri,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                               resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name or f"{cfg.name}-{run_id[:8] if run_id else int(t0)}",
            storage_path=absolute(storage_path or tc.storage_path),
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
    export_dir = export_dir or os.path.join(os.path.dirname(os.path.abspath(cfg.results_path)), "export")
    best_ckpt, best_metrics = export_best(cfg, result.best_checkpoints, tc.num_workers, prep_dir, export_dir)
    return {"export_dir": export_dir, "checkpoint": best_ckpt.path, "best_epoch_metrics": best_metrics,
            "last_metrics": {k: v for k, v in result.metrics.items() if k != "history"},
            "history": result.metrics.get("history", []), "train_seconds": time.time() - t0, "steps_per_epoch": steps,
            "n_train": n_train}


def read_examples(prep_dir: str, split: str, deterministic: bool):
    """One split of prep's examples as a Ray Dataset. Deterministic: one read task per file, so the
    blocks (and with them each worker's shard) do not depend on how many CPUs happened to be free
    when the read was planned (Ray sizes reads by the CPUs it sees)."""
    import pyarrow.parquet as pq
    import ray.data

    path = join(prep_dir, "examples", split)
    n_files = len(pq.ParquetDataset(path).files) if deterministic else None
    return ray.data.read_parquet(path, override_num_blocks=n_files or None)


def _ingest_options(deterministic: bool):
    """Ray Train's default ingest options, with preserve_order when runs must be reproducible: the
    train split then deals blocks to workers in a fixed order (no locality race between workers)."""
    import ray.train

    opts = ray.train.DataConfig.default_ingest_options()
    opts.preserve_order = deterministic
    return opts


def export_best(cfg: PipelineConfig, checkpoints, world_size: int, prep_dir: str, export_dir: str):
    """Export the best-scoring checkpoint that passes verification; a damaged one (e.g. the one a
    crash left half-written, which Ray may still keep among the best) is skipped with a warning."""
    from bundlerec.checkpoints import verify

    ranked = sorted(checkpoints, key=lambda cm: cm[1].get("val_ndcg_at_10", -1), reverse=True)
    for ckpt, metrics in ranked:
        with ckpt.as_directory() as d:
            ok, why = verify(d, world_size)
            if ok:
                export(cfg, d, prep_dir, export_dir)
                return ckpt, metrics
        log.warning("not exporting damaged checkpoint %s (%s)", ckpt.path, why)
    raise RuntimeError(f"no intact checkpoint to export among {[c.path for c, _ in ranked]}")


def consolidated_state_dict(ckpt_dir: str) -> dict:
    """fp32 weights from a DeepSpeed checkpoint of any ZeRO stage."""
    tag = open(os.path.join(ckpt_dir, "latest")).read().strip()
    files = os.listdir(os.path.join(ckpt_dir, tag))
    if any("optim_states" in f and "zero" in f for f in files):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    state = torch.load(os.path.join(ckpt_dir, tag, "mp_rank_00_model_states.pt"), map_location="cpu",
                       weights_only=False)
    return {k: v.float() for k, v in state["module"].items()}


def export(cfg: PipelineConfig, ckpt_dir: str, prep_dir: str, export_dir: str) -> str:
    """DeepSpeed checkpoint -> consolidated model -> serving export (see :func:`write_export`)."""
    from bundlerec.model import TwoTower, build_encoder
    from bundlerec.pretrained import resolve_model_path

    mc = cfg.model
    model = TwoTower(build_encoder(resolve_model_path(mc.name_or_path), mc.random_init, 0, mc.lora_rank),
                     mc.temperature)
    missing, unexpected = model.load_state_dict(consolidated_state_dict(ckpt_dir), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing={missing[:5]} unexpected={unexpected[:5]}")
    return write_export(model, cfg, prep_dir, export_dir)


def write_export(model, cfg: PipelineConfig, prep_dir: str, export_dir: str) -> str:
    """Everything serving needs, in one directory: HF encoder + tokenizer, user tower, metadata,
    item index (N, d), items table, training popularity (cold start), users' latest histories."""
    from bundlerec.baselines import popularity
    from bundlerec.catalog import load_items, padded_tokens
    from bundlerec.evaluate import load_split
    from bundlerec.model import save_export
    from bundlerec.pretrained import load_tokenizer

    model.eval()
    save_export(model, load_tokenizer(cfg.model.name_or_path), export_dir,
                {"base_model": cfg.model.name_or_path, "history_len": cfg.data.history_len,
                 "item_max_tokens": cfg.data.item_max_tokens})
    items = load_items(prep_dir)
    ids, mask = padded_tokens(items)
    index = model.index_items(torch.as_tensor(ids), torch.as_tensor(mask)).numpy()
    np.save(os.path.join(export_dir, "item_index.npy"), index.astype(np.float32))
    items.drop(columns=["input_ids", "attention_mask"]).to_parquet(os.path.join(export_dir, "items.parquet"))
    np.save(os.path.join(export_dir, "popularity.npy"), popularity(load_split(prep_dir, "train"), len(items)))
    latest = load_split(prep_dir, "latest")[["user_id", "hist_items", "hist_types", "hist_age_hours", "target_time"]]
    latest.to_parquet(os.path.join(export_dir, "latest.parquet"))
    # co-purchase statistics for bundle compatibility: items bought in the same training basket
    import scipy.sparse as sp

    from bundlerec.bundles import cooccurrence_counts, item_counts

    train = load_split(prep_dir, "train")
    baskets = train.assign(t0=train["targets"].map(lambda x: int(x[0]))).groupby(["user_id", "target_time"])["t0"].agg(list)
    groups = [g for g in baskets.tolist() if g]
    sp.save_npz(os.path.join(export_dir, "copurchase.npz"), cooccurrence_counts(groups, len(items)))
    np.save(os.path.join(export_dir, "copurchase_items.npy"), item_counts(groups, len(items)))
    with open(os.path.join(export_dir, "copurchase_groups.txt"), "w") as f:
        f.write(str(len(groups)))
    log.info("train: exported %s (%d items indexed)", export_dir, len(items))
    return export_dir
