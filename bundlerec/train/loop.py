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
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

from bundlerec.config import PipelineConfig
from bundlerec.train.shards import RayCollate, read_all

SYSTEM_METRICS_S = 5.0  # each training node's system metrics: one sample this often (MLflow system/train-node<k>/*)


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


@dataclass
class TrainState:
    """What a checkpoint carries besides the weights (DeepSpeed's ``client_state``): where training
    stands, its early-stopping record and every epoch's metrics."""

    epoch: int = -1
    """The last finished epoch (0-based; -1 before the first)."""
    best: float = -1.0
    """Best validation NDCG@10 so far."""
    bad_epochs: int = 0
    """Epochs since ``best`` last improved (early stopping)."""
    global_step: int = 0
    resumes: int = 0
    history: list = field(default_factory=list)
    """Every epoch's metrics: the driver checks MLflow holds all of them after the run."""

    @classmethod
    def restored(cls, saved: Optional[dict]) -> "TrainState":
        if saved is None:
            return cls()
        return cls(saved["epoch"], saved["best"], saved["bad_epochs"], saved["global_step"],
                   saved.get("resumes", 0) + 1, saved.get("history", []))

    def after_validation(self, val_ndcg: float, patience: int) -> bool:
        """Record an epoch's validation score; True when training should stop."""
        self.best, self.bad_epochs = (val_ndcg, 0) if val_ndcg > self.best else (self.best, self.bad_epochs + 1)
        return self.bad_epochs >= patience


@dataclass
class Worker:
    """One rank's fixed parts, built once: the DeepSpeed engine, the catalog's tokens on the device, the
    collator and the data shards."""

    inp: LoopInputs
    rank: int
    world: int
    device: Any
    engine: Any
    scheduler: Any
    autocast: Any
    ids: Any
    mask: Any
    collate: Any
    n_items: int
    labels: list
    group_of: Optional[np.ndarray]
    logger: Any = None
    flops_per_token: float = 0.0
    train_rows: Optional[dict] = None
    """train.materialize_train: this rank's shard in memory after the first epoch."""

    @property
    def rank0(self) -> bool:
        return self.rank == 0

    def say(self, msg: str) -> None:
        if self.rank0:
            print(f"[bundlerec] {msg}", flush=True)


@dataclass
class EpochStats:
    """What one pass over the training shard measured on this rank (times in seconds)."""

    losses: list = field(default_factory=list)
    seen: int = 0
    tokens: int = 0
    rows: Optional[np.ndarray] = None
    data: float = 0.0
    forward: float = 0.0
    backward: float = 0.0
    optimizer: float = 0.0
    seconds: float = 0.0


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point: build the engine (restoring the newest intact checkpoint), then per
    epoch train, validate with ``cfg.eval``, decide on early stopping and save."""
    import ray.train

    from bundlerec.tracking import load_credentials, system_metrics

    inp: LoopInputs = config["inputs"]
    tc = inp.cfg.train
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if tc.use_gpu else "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "0" if os.environ.get("BUNDLEREC_ALLOW_DOWNLOAD") == "1" else "1")
    load_credentials()  # the job's MLflow identity, when it came as a file (bundlerec submit)
    w, state = _build(inp)
    train_shard = ray.train.get_dataset_shard("train")
    val_rows = read_all(ray.train.get_dataset_shard("val"))  # every rank holds all of val (small)
    ctx = ray.train.get_context()  # each training node's own use (GPU included) beside the driver's node
    monitor = (system_metrics(inp.cfg.mlflow.tracking_uri, inp.run_id, SYSTEM_METRICS_S, f"train-node{ctx.get_node_rank()}")
               if inp.run_id and ctx.get_local_rank() == 0 else nullcontext())
    with monitor:
        for epoch in range(state.epoch + 1, tc.epochs):
            stats = _train_epoch(w, state, epoch, train_shard)
            val = _validate(w, val_rows)
            stop = state.after_validation(_agreed(w, val.get("ndcg@10", 0.0)), tc.early_stop_patience)
            metrics = _epoch_metrics(w, state, epoch, stats, val, stop)
            state.epoch = epoch
            state.history.append(dict(metrics))
            _save(w, state, metrics)
            if stop:
                break
    if w.logger:
        w.logger.flush()  # best effort here; fit() on the driver makes sure MLflow ends up with every epoch


def _build(inp: LoopInputs) -> tuple[Worker, TrainState]:
    """The model, optimizer and DeepSpeed engine with the newest intact checkpoint restored (one written
    by another number of workers is loaded as DeepSpeed's universal checkpoint, which the engine must be
    configured for before it is built), then the catalog tokens and the collator."""
    import deepspeed
    import ray.train
    import torch

    from bundlerec.data.catalog import load_items, padded_tokens
    from bundlerec.hub import resolve_model_path
    from bundlerec.model.collate import Collator
    from bundlerec.model.pretrained import resolve_pooling
    from bundlerec.model.two_tower import TwoTower, build_encoder
    from bundlerec.tracking import RunLogger
    from bundlerec.train.checkpoints import newest_valid, saved_world_size, universal
    from bundlerec.train.ds_config import autocast_dtype, deepspeed_config, resolve_precision
    from bundlerec.train.optim import cosine_schedule, param_groups

    tc, mc, dc = inp.cfg.train, inp.cfg.model, inp.cfg.data
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(tc.seed)
    device = torch.device(f"cuda:{ctx.get_local_rank()}") if tc.use_gpu else torch.device("cpu")
    precision = resolve_precision(tc.precision, tc.use_gpu)
    amp = autocast_dtype(precision, tc.use_gpu)
    attention = tc.attention if tc.attention != "auto" else ("sdpa" if tc.use_gpu else "eager")
    model_path = resolve_model_path(mc.name_or_path)
    encoder = build_encoder(model_path, mc.random_init, mc.freeze_layers, mc.lora_rank, mc.lora_targets, attention,
                            tc.gradient_checkpointing)
    model = TwoTower(encoder, mc.temperature, resolve_pooling(model_path, mc.pooling))
    model.gather_negatives = mc.gather_negatives
    total_opt_steps = max(1, inp.steps_per_epoch * tc.epochs // tc.grad_accum)
    fused = tc.use_gpu and tc.offload == "none"  # one kernel per parameter group on the GPU
    optimizer = torch.optim.AdamW(param_groups(model, tc.lr, tc.head_lr, tc.weight_decay), fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(total_opt_steps, tc.warmup_frac))
    ckpt = ray.train.get_checkpoint() or inp.resume_from
    with ExitStack() as restore:
        restore_dir = restore.enter_context(newest_valid(ckpt)) if ckpt else None
        if ckpt and restore_dir is None and rank == 0:
            print(f"[bundlerec] no intact checkpoint beside {ckpt.path}; starting over", flush=True)
        saved_world = saved_world_size(restore_dir) if restore_dir else world
        if saved_world != world:
            restore_dir = restore.enter_context(universal(restore_dir))
        ds_cfg = deepspeed_config(tc.micro_batch, tc.grad_accum, world, tc.zero_stage, tc.use_gpu, tc.deepspeed,
                                  precision, tc.offload, load_universal=saved_world != world)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
        state = TrainState.restored(engine.load_checkpoint(restore_dir)[1] if restore_dir else None)
    items = load_items(inp.prep_dir)  # pre-tokenized in prep
    ids, mask = padded_tokens(items)
    labels = sorted(set(inp.item_groups)) if inp.item_groups else []
    w = Worker(inp, rank, world, device, engine, scheduler,
               (lambda: torch.autocast("cpu", dtype=amp)) if amp else nullcontext,
               torch.as_tensor(ids, device=device), torch.as_tensor(mask, device=device),
               Collator(ids, mask, np.asarray(inp.popularity), dc.history_len, mc.sampled_negatives,
                        mc.logq_correction, seed=tc.seed + rank,  # streamed: CPU tensors Ray Data moves (pinned)
                        device=device if tc.materialize_train else torch.device("cpu"),
                        negatives=mc.negatives, mask_mates=mc.mask_mates),
               len(items), labels,
               np.array([labels.index(g) for g in inp.item_groups]) if labels else None,  # few labels
               RunLogger(inp.cfg.mlflow.tracking_uri, inp.run_id) if rank == 0 and inp.run_id else None)
    w.say(f"{torch.get_num_threads()} threads, precision {precision}{' (autocast)' if amp else ''}, "
          f"attention {attention}, ZeRO-{tc.zero_stage}, offload {tc.offload}, gradient checkpointing "
          f"{'on' if tc.gradient_checkpointing else 'off'}")
    if state.resumes:
        w.say(f"resumed from epoch {state.epoch} (step {state.global_step})"
              + (f", written by {saved_world} workers, now {world} (universal checkpoint)" if saved_world != world else ""))
    _prepare_encoder(w)
    return w, state


def _prepare_encoder(w: Worker) -> None:
    """After the restore (the frozen-prefix cache is computed from the weights training continues with):
    cache the frozen prefix, count the FLOPs per token (skipped blocks cost 0), compile the blocks."""
    from bundlerec.model.two_tower import transformer_blocks
    from bundlerec.train.flops import train_flops_per_token

    tc, module = w.inp.cfg.train, w.engine.module
    if tc.cache_frozen:
        with w.autocast():
            skipped = module.cache_frozen_prefix(w.ids, w.mask)
        if skipped:
            w.say(f"frozen prefix cached: embeddings + {skipped} blocks computed once for {w.n_items} items, "
                  "skipped at every step")
    w.flops_per_token = train_flops_per_token(module.encoder)
    if tc.compile:
        for block in transformer_blocks(module.encoder):
            if "forward" not in block.__dict__:  # not a skipped frozen block
                block.compile(dynamic=True)


def _batches(w: Worker, epoch: int, train_shard):
    """This epoch's micro-batches: from memory with a seeded full shuffle (train.materialize_train: no Ray
    Data work per step), or streamed, Ray Data collating in its prefetch threads and moving to the device."""
    tc, mb = w.inp.cfg.train, w.inp.cfg.train.micro_batch
    if tc.materialize_train:
        if w.train_rows is None:
            w.train_rows = read_all(train_shard)
        order = np.random.default_rng([tc.seed, w.rank, epoch, 1]).permutation(len(w.train_rows["targets"]))
        return ({c: a[order[i:i + mb]] for c, a in w.train_rows.items()} for i in range(0, len(order) - mb + 1, mb))
    return train_shard.iter_torch_batches(
        batch_size=mb, collate_fn=RayCollate(w.collate.in_threads(tc.seed, w.rank, epoch)), device=w.device,
        pin_memory=tc.use_gpu, prefetch_batches=tc.prefetch_batches, drop_last=True,
        local_shuffle_buffer_size=max(4 * mb, 1024), local_shuffle_seed=tc.seed + epoch)


def _train_epoch(w: Worker, state: TrainState, epoch: int, train_shard) -> EpochStats:
    """One pass of ``steps_per_epoch`` micro-steps (identical on every rank: ZeRO collectives need it),
    timing each phase, logging every ``log_every_steps``; token and row counts summed over the ranks."""
    import torch

    tc, engine, steps = w.inp.cfg.train, w.engine, w.inp.steps_per_epoch
    engine.train()
    if tc.deterministic:  # negatives and dropout depend on (seed, rank, epoch) only, so a resume redoes them
        w.collate.rng = np.random.default_rng([tc.seed, w.rank, epoch])
        torch.manual_seed(int(np.random.SeedSequence([tc.seed, w.rank, epoch]).generate_state(1)[0]))
    st = EpochStats(rows=np.zeros(len(w.labels)))
    sync = torch.cuda.synchronize if tc.use_gpu else (lambda: None)  # phase times need the device idle
    t0 = tw = time.time()
    for step, raw in enumerate(_batches(w, epoch, train_shard)):
        if step >= steps:
            break
        batch = w.collate(raw) if tc.materialize_train else raw
        t1 = time.time()  # data wait: the in-memory path collates here, the streamed one only waits
        with w.autocast():
            loss = engine(batch)
        sync()
        t2 = time.time()
        engine.backward(loss)
        sync()
        t3 = time.time()
        engine.step()
        sync()
        t4 = time.time()
        st.data, st.forward, st.backward, st.optimizer = (st.data + t1 - tw, st.forward + t2 - t1,
                                                          st.backward + t3 - t2, st.optimizer + t4 - t3)
        st.losses.append(float(loss.detach()))
        st.seen += tc.micro_batch
        st.tokens += batch["tokens"].numel()  # padded tokens encoded (each distinct item once)
        if w.group_of is not None:
            st.rows += np.bincount(w.group_of[batch["target_item"].cpu().numpy()], minlength=len(w.labels))
        state.global_step += 1
        if w.rank0 and (step + 1) % tc.log_every_steps == 0:
            _log_step(w, state, epoch, step, st, time.time() - t0)
        tw = time.time()
    st.seconds = time.time() - t0
    st.tokens = int(_all_reduce(w, [float(st.tokens)])[0])  # all workers' tokens
    if w.labels:
        st.rows = _all_reduce(w, st.rows)  # every rank's rows per label
    return st


def _log_step(w: Worker, state: TrainState, epoch: int, step: int, st: EpochStats, elapsed: float) -> None:
    tc, steps = w.inp.cfg.train, w.inp.steps_per_epoch
    sps = st.seen * w.world / elapsed
    eta = (steps - step - 1) * elapsed / (step + 1)
    recent = float(np.mean(st.losses[-tc.log_every_steps:]))
    w.say(f"epoch {epoch + 1}/{tc.epochs} step {step + 1}/{steps} loss {recent:.4f} {sps:.1f} samples/s "
          f"eta(epoch) {eta:.0f}s")
    if w.logger:  # curves with a point every log_every_steps (x = global step), not only per epoch
        w.logger.log({"step/train_loss": recent, "step/samples_per_s": sps, "step/eta_epoch_s": eta,
                      "step/data_wait_frac": st.data / max(elapsed, 1e-9)}, step=state.global_step)


def _validate(w: Worker, val_rows: dict) -> dict:
    """Recommendation metrics at ``cfg.eval.ks`` on the validation users, split across the ranks: each
    encodes 1/world of the catalog (the same number of forwards on every rank: ZeRO-3 gathers need all
    ranks) and scores 1/world of the users."""
    import torch

    from bundlerec.metrics import MetricAccumulator
    from bundlerec.model.collate import history_tensors

    module, world = w.engine.module, w.world
    w.engine.eval()
    with torch.no_grad(), w.autocast():
        module.set_index(_distributed_index(module, w.ids, w.mask, w.rank, world,
                                            "validation: encode catalog" if w.rank0 else None))
        acc = MetricAccumulator(sorted({10, *w.inp.cfg.eval.ks}), w.n_items)  # 10: early stopping's ndcg@10
        split = len(val_rows["targets"]) >= world  # else every rank scores all (no rank without rows)
        mine = {c: a[w.rank::world] for c, a in val_rows.items()} if split else val_rows
        for i in range(0, len(mine["targets"]), 256):
            vb = {c: a[i:i + 256] for c, a in mine.items()}
            acc.update(module.score(history_tensors(vb, w.inp.cfg.data.history_len, w.device)).float(),
                       list(vb["targets"]))
    if split:
        acc.all_reduce(w.device)
    return acc.result()


def _agreed(w: Worker, value: float) -> float:
    """Rank 0's value on every rank: identical early-stopping decisions."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], device=w.device)
    dist.broadcast(t, src=0)
    return float(t)


def _all_reduce(w: Worker, values, op=None) -> np.ndarray:
    import torch
    import torch.distributed as dist

    t = torch.tensor(np.asarray(values, dtype=np.float64), dtype=torch.float64, device=w.device)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.cpu().numpy()


def _epoch_metrics(w: Worker, state: TrainState, epoch: int, st: EpochStats, val: dict, stop: bool) -> dict:
    """The epoch's row of metrics (MLflow, ``ray.train.report``, the checkpoint's history); rank 0 prints
    its summary and logs it."""
    import torch.distributed as dist

    from bundlerec.tracking import mlflow_name

    secs = max(st.seconds, 1e-9)
    peak = float(_all_reduce(w, [_peak_mem_gb(w.inp.cfg.train.use_gpu, w.device)], dist.ReduceOp.MAX)[0])
    metrics = {
        "epoch": epoch + 1, "step": state.global_step,
        "train_loss": float(np.mean(st.losses)) if st.losses else float("nan"),
        "samples_per_s": st.seen * w.world / secs, "samples_per_s_per_worker": st.seen / secs,
        "epoch_seconds": st.seconds, "data_wait_frac": st.data / secs,
        "forward_frac": st.forward / secs, "backward_frac": st.backward / secs, "optimizer_frac": st.optimizer / secs,
        "tokens_per_s": st.tokens / secs, "train_flops_per_token": w.flops_per_token,
        "model_tflops_per_s": w.flops_per_token * st.tokens / secs / 1e12,
        "peak_mem_gb": peak,  # the most any worker held
        "lr": float(w.scheduler.get_last_lr()[0]),
        **{f"val_{mlflow_name(k)}": v for k, v in val.items() if k != "n_examples"},
        "best_val_ndcg_at_10": state.best, "early_stop": int(stop), "resumes": state.resumes,
        **{f"rows/{mlflow_name(g)}": float(n) for g, n in zip(w.labels, st.rows)},
    }
    w.say(f"epoch {epoch + 1} done: loss {metrics['train_loss']:.4f} val ndcg@10 {val.get('ndcg@10', 0):.4f} "
          f"recall@10 {val.get('recall@10', 0):.4f} {metrics['samples_per_s']:.1f} samples/s ({st.seconds:.0f}s: "
          f"forward {st.forward:.0f}s, backward {st.backward:.0f}s, optimizer {st.optimizer:.0f}s, "
          f"data {st.data:.0f}s)")
    if w.logger:
        w.logger.log(metrics, step=epoch + 1)
    return metrics


def _save(w: Worker, state: TrainState, metrics: dict) -> None:
    """Every rank saves its DeepSpeed shard with the training state (the epoch's history travels with it:
    a lost MLflow buffer is re-sent from here) and reports it; the manifest is written last, so a
    half-written checkpoint has none."""
    import ray.train

    from bundlerec.train.checkpoints import write_manifest

    with tempfile.TemporaryDirectory() as tmp:
        w.engine.save_checkpoint(tmp, tag=f"epoch{state.epoch + 1}", client_state=asdict(state))
        write_manifest(tmp, w.rank, w.world)
        ray.train.report({**metrics, "history": list(state.history)}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


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
