"""Full-catalog ranking metrics, registered under their common names (``ndcg@10``).

For one example with target set T and ranked list r (no sampled negatives; every catalog item is
ranked):

* ``recall@K``  = |T ∩ r[:K]| / |T|
* ``hitrate@K`` = 1 if T ∩ r[:K] ≠ ∅
* ``ndcg@K``    = Σ_{i<K, r_i∈T} 1/log2(i+2)  /  Σ_{i<min(|T|,K)} 1/log2(i+2)
* ``mrr@K``     = 1/(rank of the first hit) if it is within K, else 0
* ``coverage@K`` (per run) = distinct items in all top-K lists / catalog size
"""

from __future__ import annotations

import numpy as np
import torch

PER_EXAMPLE = ("recall", "ndcg", "mrr", "hitrate")


def pad_targets(targets: list, device=None) -> torch.Tensor:
    T = max(1, max(len(t) for t in targets))
    out = torch.full((len(targets), T), -1, dtype=torch.long, device=device)
    for i, t in enumerate(targets):
        out[i, :len(t)] = torch.as_tensor(list(t), dtype=torch.long)
    return out


def hits_at(topk_idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, K) ranked ids vs (B, T) targets (-1 padded) -> (B, K) bool."""
    return (topk_idx.unsqueeze(-1) == targets.unsqueeze(1)).any(-1)


def batch_metrics(topk_idx: torch.Tensor, targets: torch.Tensor, ks: list[int]) -> dict[str, torch.Tensor]:
    """Per-example metric values, {'ndcg@10': (B,), ...}."""
    hits = hits_at(topk_idx, targets).float()  # (B, Kmax)
    n_t = (targets >= 0).sum(1).clamp(min=1).float()  # (B,)
    disc = 1.0 / torch.log2(torch.arange(hits.shape[1], device=hits.device, dtype=torch.float) + 2.0)
    first = torch.where(hits.any(1), hits.argmax(1).float() + 1.0, torch.full_like(n_t, float("inf")))
    out = {}
    for k in ks:
        h = hits[:, :k]
        out[f"recall@{k}"] = h.sum(1) / n_t
        out[f"hitrate@{k}"] = (h.sum(1) > 0).float()
        ideal = torch.stack([disc[:int(min(n, k))].sum() for n in n_t.tolist()])
        out[f"ndcg@{k}"] = (h * disc[:k]).sum(1) / ideal
        out[f"mrr@{k}"] = torch.where(first <= k, 1.0 / first, torch.zeros_like(first))
    return out


class MetricAccumulator:
    """Streams batches of rankings; ``result()`` gives means plus catalog coverage, and with
    ``intervals=True`` a 95 % bootstrap interval of every mean (over examples, seeded)."""

    def __init__(self, ks: list[int], n_items: int):
        self.ks = sorted(int(k) for k in ks)
        self.n_items = n_items
        self.sums: dict[str, float] = {}
        self.values: dict[str, list] = {}
        self.n = 0
        self.seen = {k: torch.zeros(n_items, dtype=torch.bool) for k in self.ks}

    def update(self, scores: torch.Tensor, targets: list) -> None:
        kmax = min(max(self.ks), scores.shape[1])
        top = torch.topk(scores, kmax, dim=1).indices.cpu()
        tg = pad_targets(targets)
        for name, v in batch_metrics(top, tg, self.ks).items():
            self.sums[name] = self.sums.get(name, 0.0) + float(v.sum())
            self.values.setdefault(name, []).append(v.cpu().numpy())
        for k in self.ks:
            self.seen[k][top[:, :k].reshape(-1)] = True
        self.n += len(targets)

    def all_reduce(self, device=None) -> "MetricAccumulator":
        """Sum the counts, metric sums and coverage of every rank of the default process group into
        this accumulator (each rank scored a disjoint part of the examples; every rank must have
        scored at least one). No-op without one. ``device``: where the collective's tensors live
        (a CUDA device with NCCL)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        names = sorted(self.sums)
        totals = torch.tensor([self.n] + [self.sums[n] for n in names], dtype=torch.float64, device=device)
        seen = torch.stack([self.seen[k] for k in self.ks]).to(device=device, dtype=torch.int32)
        dist.all_reduce(totals)
        dist.all_reduce(seen)  # MAX is not on every backend for every dtype: a count > 0 is seen
        totals, seen = totals.cpu(), seen.cpu()
        self.n = int(totals[0])
        self.sums = {n: float(v) for n, v in zip(names, totals[1:])}
        self.seen = {k: seen[i] > 0 for i, k in enumerate(self.ks)}
        return self

    def result(self, intervals: bool = False, keep: dict | None = None) -> dict:
        out = {name: s / max(1, self.n) for name, s in sorted(self.sums.items())}
        for k in self.ks:
            out[f"coverage@{k}"] = float(self.seen[k].float().mean())
        out["n_examples"] = self.n
        if keep is not None:
            keep.update({name: np.concatenate(v) for name, v in self.values.items()})
        if intervals and self.n:
            out["ci95"] = {name: bootstrap_ci(np.concatenate(v)) for name, v in sorted(self.values.items())}
        return out


def paired_lift(a: np.ndarray, b: np.ndarray, seed: int = 0, resamples: int = 1000) -> dict:
    """Relative lift mean(a)/mean(b) - 1 with a paired-bootstrap 95 % interval (the same queries
    resampled for both methods)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    r = a[idx].mean(1) / np.maximum(b[idx].mean(1), 1e-12) - 1
    return {"lift": float(a.mean() / max(b.mean(), 1e-12) - 1),
            "ci": [float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))]}


def bootstrap_ci(values: np.ndarray, *, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> list[float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling examples, in chunks so
    memory stays at 50 x len(values)). Keyword-only options: a seed passed by position once became
    the number of resamples."""
    if resamples < 1:
        raise ValueError(f"bootstrap_ci needs at least one resample, got {resamples}")
    rng = np.random.default_rng(seed)
    values = np.asarray(values, dtype=np.float64)
    means = []
    for start in range(0, resamples, 50):
        idx = rng.integers(0, len(values), size=(min(50, resamples - start), len(values)))
        means.append(values[idx].mean(axis=1))
    lo, hi = np.quantile(np.concatenate(means), [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


