"""The DeepSpeed engine config, derived in code from the typed training config.

Batch sizes come from ``train.micro_batch x train.grad_accum x world size`` only, so Ray's worker
count and DeepSpeed's batch size can never disagree; ``train.deepspeed`` may add engine knobs.
"""

from __future__ import annotations


def deepspeed_config(micro_batch: int, grad_accum: int, world_size: int, zero_stage: int, use_gpu: bool,
                     extra: dict | None = None) -> dict:
    """DeepSpeed config derived from the training config, so batch sizes can never disagree."""
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": zero_stage, "overlap_comm": use_gpu, "contiguous_gradients": True,
                              "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7},
        "bf16": {"enabled": use_gpu},  # fp32 on CPU: gloo has no bf16 reductions worth using
        "zero_allow_untested_optimizer": True,  # our client AdamW (param groups, no JIT build on CPU)
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
