"""``train_loop_per_worker``: the code every Ray Train worker runs (DeepSpeed ZeRO, CPU or GPU).

Contract (Ray Train V2): data only from ``ray.train.get_dataset_shard``, results only through
``ray.train.report``. Every rank saves its DeepSpeed shard into a local directory and reports it
(Ray merges the ranks' files into one checkpoint); on restart ``ray.train.get_checkpoint()`` gives
the last one back and training continues with the next epoch. Side effects (printing, MLflow) are
rank 0 only.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn

from bundlerec.config import PipelineConfig


@dataclass
class LoopInputs:
    """What the driver hands every worker (inside Ray Train's ``train_loop_config`` dict)."""

    cfg: PipelineConfig
    """The typed pipeline config: the same object the driver validated."""
    prep_dir: str
    """Absolute path/URI of prep's output (items are read from it; examples come via dataset shards)."""
    steps_per_epoch: int
    """Micro-steps per worker per epoch (identical on all ranks: ZeRO collectives need it)."""
    popularity: list
    """Training purchase counts per item: the sampling distribution of negatives and the logQ term."""
    run_id: Optional[str] = None
    """MLflow run that rank 0 logs per-epoch metrics to."""
    resume_from: Any = None
    """A ``ray.train.Checkpoint`` to start from when Ray Train has none for the run (its own record of
    the run was torn: :func:`bundlerec.train.checkpoints.recover_torn_snapshot`)."""
    item_groups: Optional[list] = None
    """A label per catalog position (e.g. the item's domain): each epoch then counts the rows trained
    per label of their target, over all ranks (metrics ``rows/<label>``)."""


def train_loop_per_worker(config: dict) -> None:
    import torch

    inp: LoopInputs = config["inputs"]
    tc, mc, dc = inp.cfg.train, inp.cfg.model, inp.cfg.data
    use_gpu = tc.use_gpu
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "0" if os.environ.get("BUNDLEREC_ALLOW_DOWNLOAD") == "1" else "1")
    import deepspeed
    import ray.train
    import torch.distributed as dist

    from bundlerec.data.catalog import load_items, padded_tokens
    from bundlerec.metrics import MetricAccumulator
    from bundlerec.model.collate import Collator, history_tensors
    from bundlerec.hub import resolve_model_path
    from bundlerec.model.pretrained import resolve_pooling
    from bundlerec.model.two_tower import TwoTower, build_encoder
    from bundlerec.runtime import is_rank_zero
    from bundlerec.tracking import RunLogger, load_credentials, mlflow_name
    from bundlerec.train.checkpoints import newest_valid, saved_world_size, universal, write_manifest
    from bundlerec.train.ds_config import autocast_dtype, deepspeed_config, resolve_precision
    from bundlerec.train.flops import train_flops_per_token
    from bundlerec.train.optim import cosine_schedule, param_groups

    load_credentials()  # the job's MLflow identity, when it came as a file (bundlerec submit)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    rank0 = is_rank_zero()
    torch.manual_seed(tc.seed)
    device = torch.device(f"cuda:{ctx.get_local_rank()}") if use_gpu else torch.device("cpu")

    # ---- model + engine
    precision = resolve_precision(tc.precision, use_gpu)
    amp = autocast_dtype(precision, use_gpu)
    autocast = (lambda: torch.autocast("cpu", dtype=amp)) if amp else nullcontext
    attention = tc.attention if tc.attention != "auto" else ("sdpa" if use_gpu else "eager")
    model_path = resolve_model_path(mc.name_or_path)
    encoder = build_encoder(model_path, mc.random_init, mc.freeze_layers, mc.lora_rank, mc.lora_targets, attention,
                            tc.gradient_checkpointing)
    model = TwoTower(encoder, mc.temperature, resolve_pooling(model_path, mc.pooling))
    steps_per_epoch = inp.steps_per_epoch
    total_opt_steps = max(1, steps_per_epoch * tc.epochs // tc.grad_accum)
    fused = use_gpu and tc.offload == "none"  # one kernel per parameter group on the GPU
    optimizer = torch.optim.AdamW(param_groups(model, tc.lr, tc.head_lr, tc.weight_decay), fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(total_opt_steps, tc.warmup_frac))
    # the newest intact checkpoint, found before the engine is built: one written by another number of
    # workers is loaded as DeepSpeed's universal checkpoint, which the engine must be configured for
    ckpt = ray.train.get_checkpoint() or inp.resume_from
    restore = ExitStack()
    restore_dir = restore.enter_context(newest_valid(ckpt)) if ckpt else None
    if ckpt and restore_dir is None and rank0:
        print(f"[bundlerec] no intact checkpoint beside {ckpt.path}; starting over", flush=True)
    saved_world = saved_world_size(restore_dir) if restore_dir else world
    if saved_world != world:
        restore_dir = restore.enter_context(universal(restore_dir))
    ds_cfg = deepspeed_config(tc.micro_batch, tc.grad_accum, world, tc.zero_stage, use_gpu, tc.deepspeed,
                              precision, tc.offload, load_universal=saved_world != world)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    if rank0:
        print(f"[bundlerec] {torch.get_num_threads()} threads, precision {precision}{' (autocast)' if amp else ''}, "
              f"attention {attention}, ZeRO-{tc.zero_stage}, offload {tc.offload}, gradient checkpointing "
              f"{'on' if tc.gradient_checkpointing else 'off'}", flush=True)

    # ---- catalog tokens (pre-tokenized in prep) and popularity for logQ / sampled negatives
    items = load_items(inp.prep_dir)
    ids, mask = padded_tokens(items)
    ids_t, mask_t = torch.as_tensor(ids, device=device), torch.as_tensor(mask, device=device)
    collate = Collator(ids, mask, np.asarray(inp.popularity), dc.history_len, mc.sampled_negatives,
                       mc.logq_correction, seed=tc.seed + rank,  # streamed: CPU tensors Ray Data moves (pinned)
                       device=device if tc.materialize_train else torch.device("cpu"))

    # ---- resume
    start_epoch, best, bad_epochs, global_step, resumes, history = 0, -1.0, 0, 0, 0, []
    with restore:
        state = engine.load_checkpoint(restore_dir)[1] if restore_dir else None
    if state is not None:
        start_epoch, best, bad_epochs = state["epoch"] + 1, state["best"], state["bad_epochs"]
        global_step, resumes = state["global_step"], state.get("resumes", 0) + 1
        history = state.get("history", [])
        if rank0:
            print(f"[bundlerec] resumed from epoch {state['epoch']} (step {global_step})"
                  + (f", written by {saved_world} workers, now {world} (universal checkpoint)"
                     if saved_world != world else ""), flush=True)
    if tc.cache_frozen:  # after the restore: the cache is computed from the weights training continues with
        with autocast():
            skipped = engine.module.cache_frozen_prefix(ids_t, mask_t)
        if rank0 and skipped:
            print(f"[bundlerec] frozen prefix cached: embeddings + {skipped} blocks computed once for "
                  f"{len(items)} items, skipped at every step", flush=True)
    flops_per_token = train_flops_per_token(engine.module.encoder)  # after the cache: skipped blocks cost 0
    if tc.compile:
        from bundlerec.model.two_tower import transformer_blocks

        for block in transformer_blocks(engine.module.encoder):
            if "forward" not in block.__dict__:  # not a skipped frozen block
                block.compile(dynamic=True)

    logger = RunLogger(inp.cfg.mlflow.tracking_uri, inp.run_id) if rank0 and inp.run_id else None
    train_shard = ray.train.get_dataset_shard("train")
    val_rows = _read_all(ray.train.get_dataset_shard("val"))  # every rank holds all of val (small)
    train_rows = None  # train.materialize_train: this rank's shard in memory after the first epoch
    mb = tc.micro_batch
    stop = False
    labels = sorted(set(inp.item_groups)) if inp.item_groups else []
    group_of = np.array([labels.index(g) for g in inp.item_groups]) if labels else None  # few labels
    for epoch in range(start_epoch, tc.epochs):
        if stop:
            break
        engine.train()
        if tc.deterministic:  # negatives and dropout depend on (seed, rank, epoch) only,
            collate.rng = np.random.default_rng([tc.seed, rank, epoch])  # so a resume redoes them
            torch.manual_seed(int(np.random.SeedSequence([tc.seed, rank, epoch]).generate_state(1)[0]))
        t0, losses, n_seen, n_tokens = time.time(), [], 0, 0
        rows = np.zeros(len(labels))
        if tc.materialize_train:  # read once, then a seeded full shuffle per epoch: no Ray Data work per step
            if train_rows is None:
                train_rows = _read_all(train_shard)
            order = np.random.default_rng([tc.seed, rank, epoch, 1]).permutation(len(train_rows["targets"]))
            batches = ({c: a[order[i:i + mb]] for c, a in train_rows.items()}
                       for i in range(0, len(order) - mb + 1, mb))
        else:  # streamed: Ray Data collates in its prefetch threads, pins and moves batches to the device
            batches = train_shard.iter_torch_batches(
                batch_size=mb, collate_fn=_RayCollate(collate.in_threads(tc.seed, rank, epoch)), device=device,
                pin_memory=use_gpu, prefetch_batches=tc.prefetch_batches, drop_last=True,
                local_shuffle_buffer_size=max(4 * mb, 1024), local_shuffle_seed=tc.seed + epoch)
        data_wait = t_fwd = t_bwd = t_opt = 0.0
        sync = torch.cuda.synchronize if use_gpu else (lambda: None)  # phase times need the device idle
        tw = time.time()
        for step, raw in enumerate(batches):
            if step >= steps_per_epoch:  # identical step count on every rank (ZeRO collectives)
                break
            batch = collate(raw) if tc.materialize_train else raw
            t1 = time.time()  # data wait: the in-memory path collates here, the streamed one only waits
            data_wait += t1 - tw
            with autocast():
                loss = engine(batch)
            sync()
            t2 = time.time()
            engine.backward(loss)
            sync()
            t3 = time.time()
            engine.step()
            sync()
            t4 = time.time()
            t_fwd, t_bwd, t_opt = t_fwd + t2 - t1, t_bwd + t3 - t2, t_opt + t4 - t3
            losses.append(float(loss.detach()))
            n_seen += mb
            n_tokens += batch["tokens"].numel()  # padded tokens encoded (each distinct item once)
            if group_of is not None:
                rows += np.bincount(group_of[batch["target_item"].cpu().numpy()], minlength=len(labels))
            global_step += 1
            if rank0 and (step + 1) % tc.log_every_steps == 0:
                el = time.time() - t0
                sps = n_seen * world / el
                eta = (steps_per_epoch - step - 1) * el / (step + 1)
                recent = float(np.mean(losses[-tc.log_every_steps:]))
                print(f"[bundlerec] epoch {epoch + 1}/{tc.epochs} step {step + 1}/{steps_per_epoch} "
                      f"loss {recent:.4f} {sps:.1f} samples/s eta(epoch) {eta:.0f}s", flush=True)
                if logger:  # curves with a point every log_every_steps (x = global step), not only per epoch
                    logger.log({"step/train_loss": recent, "step/samples_per_s": sps, "step/eta_epoch_s": eta,
                                "step/data_wait_frac": data_wait / max(el, 1e-9)}, step=global_step)
            tw = time.time()
        epoch_s = time.time() - t0
        tokens = torch.tensor([float(n_tokens)], dtype=torch.float64, device=device)
        dist.all_reduce(tokens)  # all workers' tokens
        peak = torch.tensor([_peak_mem_gb(use_gpu, device)], dtype=torch.float64, device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # the most any worker held
        if labels:
            rows_t = torch.tensor(rows, dtype=torch.float64, device=device)
            dist.all_reduce(rows_t)  # every rank's rows per label
            rows = rows_t.cpu().numpy()

        # ---- validation, split across the ranks: each encodes 1/world of the catalog (the same number of
        # forwards on every rank: ZeRO-3 gathers need all ranks) and scores 1/world of the users
        engine.eval()
        with torch.no_grad(), autocast():
            index = _distributed_index(engine.module, ids_t, mask_t, rank, world,
                                       "validation: encode catalog" if rank0 else None)
            engine.module.set_index(index)
            acc = MetricAccumulator([10, 20], len(items))
            split = len(val_rows["targets"]) >= world  # else every rank scores all (no rank without rows)
            mine = {c: a[rank::world] for c, a in val_rows.items()} if split else val_rows
            for i in range(0, len(mine["targets"]), 256):
                vb = {c: a[i:i + 256] for c, a in mine.items()}
                acc.update(engine.module.score(history_tensors(vb, dc.history_len, device)).float(), list(vb["targets"]))
        if split:
            acc.all_reduce(device)
        val = acc.result()
        score = torch.tensor([val.get("ndcg@10", 0.0)], device=device)
        dist.broadcast(score, src=0)  # rank 0 decides: identical early-stopping on all ranks
        val_ndcg = float(score)
        improved = val_ndcg > best
        best, bad_epochs = (val_ndcg, 0) if improved else (best, bad_epochs + 1)
        stop = bad_epochs >= tc.early_stop_patience
        metrics = {
            "epoch": epoch + 1, "step": global_step,
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "samples_per_s": n_seen * world / max(epoch_s, 1e-9),
            "samples_per_s_per_worker": n_seen / max(epoch_s, 1e-9),
            "epoch_seconds": epoch_s, "data_wait_frac": data_wait / max(epoch_s, 1e-9),
            "forward_frac": t_fwd / max(epoch_s, 1e-9), "backward_frac": t_bwd / max(epoch_s, 1e-9),
            "optimizer_frac": t_opt / max(epoch_s, 1e-9),
            "tokens_per_s": float(tokens) / max(epoch_s, 1e-9), "train_flops_per_token": flops_per_token,
            "model_tflops_per_s": flops_per_token * float(tokens) / max(epoch_s, 1e-9) / 1e12,
            "peak_mem_gb": float(peak),
            "lr": float(scheduler.get_last_lr()[0]),
            **{f"val_{mlflow_name(k)}": v for k, v in val.items() if k != "n_examples"},
            "best_val_ndcg_at_10": best, "early_stop": int(stop), "resumes": resumes,
            **{f"rows/{mlflow_name(g)}": float(n) for g, n in zip(labels, rows)},
        }
        if rank0:
            print(f"[bundlerec] epoch {epoch + 1} done: loss {metrics['train_loss']:.4f} "
                  f"val ndcg@10 {val.get('ndcg@10', 0):.4f} recall@10 {val.get('recall@10', 0):.4f} "
                  f"{metrics['samples_per_s']:.1f} samples/s ({epoch_s:.0f}s: forward {t_fwd:.0f}s, backward "
                  f"{t_bwd:.0f}s, optimizer {t_opt:.0f}s, data {data_wait:.0f}s)", flush=True)
            if logger:
                logger.log(metrics, step=epoch + 1)
        history.append(dict(metrics))  # every epoch's metrics travel with the checkpoint: the driver
        # checks MLflow holds all of them after the run (a lost buffer is re-sent from here)
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=f"epoch{epoch + 1}",
                                   client_state={"epoch": epoch, "best": best, "bad_epochs": bad_epochs,
                                                 "global_step": global_step, "resumes": resumes,
                                                 "history": history})
            write_manifest(tmp, rank, world)  # written last: a half-written checkpoint has none
            ray.train.report({**metrics, "history": list(history)}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    if logger:
        logger.flush()  # best effort here; fit() on the driver makes sure MLflow ends up with every epoch


def _read_all(shard) -> dict:
    """A dataset shard as numpy columns in memory (ragged list columns as object arrays)."""
    parts = list(shard.iter_batches(batch_size=4096, batch_format="numpy"))
    if not parts:
        raise ValueError("an empty dataset shard: fewer examples than workers")
    return {c: np.concatenate([_rows(p[c]) for p in parts]) for c in parts[0]}


def _rows(a: np.ndarray) -> np.ndarray:
    """One row per example: a list column Ray returned as a 2-D array (all lists of one length in that
    batch) becomes an object array like the ragged ones, so batches concatenate."""
    if a.ndim == 1:
        return a
    out = np.empty(len(a), dtype=object)
    out[:] = list(a)
    return out


def _distributed_index(module, ids, mask, rank: int, world: int, progress=None):
    """The catalog's item index, each rank encoding an equal slice (wrapping around the end, so every
    rank runs the same number of forwards) and all-gathering the others'."""
    import torch
    import torch.distributed as dist

    n = ids.shape[0]
    if world == 1:
        return module.index_items(ids, mask, progress=progress)
    per = -(-n // world)
    rows = torch.arange(rank * per, (rank + 1) * per, device=ids.device) % n
    mine = module.index_items(ids[rows], mask[rows], progress=progress, items=rows)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine.contiguous())
    return torch.cat(parts)[:n]


def _peak_mem_gb(use_gpu: bool, device) -> float:
    """Peak memory of this worker: allocated on its GPU, else its process's resident set (CPU)."""
    import torch

    if use_gpu:
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


class _RayCollate(NumpyBatchCollateFn):
    """A collate function as Ray Data's iter_torch_batches takes one (numpy batches in, tensors out)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, batch: dict) -> dict:
        return self.fn(batch)
