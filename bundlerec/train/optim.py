"""Optimizer parameter groups and the learning-rate schedule of the fine-tuning loop."""

from __future__ import annotations

import math

from bundlerec.model.two_tower import TwoTower


def param_groups(model: TwoTower, lr: float, head_lr: float, weight_decay: float) -> list[dict]:
    """Encoder at `lr`, user tower at `head_lr`; no decay on biases/LayerNorm/embeddings."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = name.startswith("user_tower.")
        no_decay = p.ndim < 2 or "LayerNorm" in name or "emb" in name.split(".")[-2:][0]
        key = (head, no_decay)
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "lr": head_lr if head else lr, "weight_decay": 0.0 if nd else weight_decay}
            for (head, nd), ps in groups.items()]


def cosine_schedule(total_steps: int, warmup_frac: float):
    warm = max(1, int(total_steps * warmup_frac))

    def fn(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        prog = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.5 * (1 + math.cos(math.pi * prog))

    return fn
