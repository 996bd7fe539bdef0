"""The DeepSpeed engine config, derived in code from the typed training config.

Batch sizes come from ``train.micro_batch x train.grad_accum x world size`` only, so Ray's worker
count and DeepSpeed's batch size can never disagree; ``train.deepspeed`` may add engine knobs.
"""

from __future__ import annotations

from typing import Optional


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls on this CPU (AVX512-BF16 or AMX): where bf16 autocast is a speed-up and not
    an emulation."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """``train.precision`` -> fp32 | bf16 | fp16 for this device (``auto`` decided here)."""
    if precision == "auto":
        return "bf16" if use_gpu or cpu_has_bf16() else "fp32"
    if precision == "fp16" and not use_gpu:
        raise ValueError("train.precision=fp16 needs GPUs (train.use_gpu=true); on CPU use bf16 or fp32")
    return precision


def deepspeed_config(micro_batch: int, grad_accum: int, world_size: int, zero_stage: int, use_gpu: bool,
                     extra: dict | None = None, precision: str = "fp32", offload: str = "none",
                     load_universal: bool = False) -> dict:
    """DeepSpeed config derived from the training config, so batch sizes can never disagree.

    ``precision`` (resolved): on GPU bf16/fp16 are DeepSpeed's mixed precision (fp16 with dynamic loss
    scaling); on CPU the engine stays fp32 and bf16 is autocast in the loop (gloo has no bf16
    reductions worth using). ``offload``: none | optimizer | all (ZeRO-Offload to CPU memory); the
    client AdamW is accepted with offload (``zero_force_ds_cpu_optimizer: false``) so the same
    parameter groups and schedule apply. ``load_universal``: the engine restores DeepSpeed's universal
    checkpoint (a run resumed with another number of workers)."""
    zero: dict = {"stage": zero_stage, "overlap_comm": use_gpu, "contiguous_gradients": True,
                  "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7}
    if offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": use_gpu and precision == "bf16"},
        "fp16": {"enabled": use_gpu and precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_allow_untested_optimizer": True,  # our client AdamW (param groups, no JIT build on CPU)
        "zero_force_ds_cpu_optimizer": False,  # ... also with offload (DeepSpeed's CPU Adam would be faster but needs a C++ build)
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    for k, v in (extra or {}).items():  # engine knobs only; batch keys stay derived
        if k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
            raise ValueError(f"train.deepspeed may not set {k}: it is derived from train.micro_batch/grad_accum")
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def autocast_dtype(precision: str, use_gpu: bool) -> Optional[object]:
    """The dtype the loop autocasts to (CPU bf16 only; on GPU DeepSpeed casts the model itself)."""
    import torch

    return torch.bfloat16 if precision == "bf16" and not use_gpu else None
