"""Example batches -> model tensors. No tokenization here: items were tokenized once in prep.

``Collator`` holds the tokenized catalog (N, L) of one worker; for a training batch it collects
the distinct items (history + targets + sampled negatives), so each item is encoded once per step.
"""

from __future__ import annotations

import zlib
from typing import Callable, Optional

import numpy as np
import torch


def pad_history(hist_items, hist_types, hist_age, history_len: int):
    """Ragged lists -> left-aligned (B, H) arrays plus a validity mask (most recent last)."""
    B = len(hist_items)
    H = max(1, min(history_len, max((len(h) for h in hist_items), default=1)))
    items = np.full((B, H), -1, dtype=np.int64)
    types = np.zeros((B, H), dtype=np.int64)
    age = np.zeros((B, H), dtype=np.float32)
    for i, (hi, ht, ha) in enumerate(zip(hist_items, hist_types, hist_age)):
        hi, ht, ha = list(hi)[-H:], list(ht)[-H:], list(ha)[-H:]
        n = len(hi)
        items[i, :n], types[i, :n], age[i, :n] = hi, ht, ha
    return items, types, age, items >= 0


def history_tensors(batch: dict, history_len: int, device) -> dict:
    items, types, age, valid = pad_history(batch["hist_items"], batch["hist_types"], batch["hist_age_hours"], history_len)
    return {"hist_items": torch.as_tensor(items, device=device), "hist_types": torch.as_tensor(types, device=device),
            "hist_age": torch.as_tensor(age, device=device), "hist_valid": torch.as_tensor(valid, device=device)}


class Collator:
    def __init__(self, input_ids: np.ndarray, attention_mask: np.ndarray, popularity: np.ndarray,
                 history_len: int, sampled_negatives: int = 0, logq: bool = True, seed: int = 0,
                 device: Optional[torch.device] = None, negatives: str = "popularity", mask_mates: bool = False):
        self.ids = torch.as_tensor(input_ids)
        self.mask = torch.as_tensor(attention_mask)
        p = popularity.astype(np.float64) + 1.0  # add-one: every item can be sampled
        self.q = p / p.sum()  # sampling distribution of in-batch targets ~ popularity
        self.log_q = np.log(self.q).astype(np.float32)
        if negatives not in ("popularity", "uniform"):
            raise ValueError(f"negatives must be popularity or uniform, not {negatives!r}")
        self.uniform = negatives == "uniform"  # sampled negatives drawn label-free, every item alike
        self.history_len = history_len
        self.n_sampled = sampled_negatives
        self.logq = logq
        self.mask_mates = mask_mates
        self.rng = np.random.default_rng(seed)
        self.device = device or torch.device("cpu")

    def in_threads(self, *seed: int) -> Callable[[dict], dict]:
        """This collation as a function Ray Data's prefetch threads may call (``iter_torch_batches``):
        each batch draws its sampled negatives from a generator seeded by ``seed`` and the batch's own
        targets, so the draws do not depend on which thread collates which batch (a deterministic data
        order then gives deterministic batches)."""
        def collate(batch: dict) -> dict:
            targets = np.array([t[0] for t in batch["targets"]], dtype=np.int64)
            return self(batch, np.random.default_rng([*seed, zlib.crc32(targets.tobytes())]))
        return collate

    def __call__(self, batch: dict, rng: Optional[np.random.Generator] = None) -> dict:
        """``batch``: numpy columns of train examples (one target each); ``rng``: the generator of the
        sampled negatives (default: this collator's own, drawn in call order)."""
        dev, rng = self.device, rng or self.rng
        items, types, age, valid = pad_history(batch["hist_items"], batch["hist_types"],
                                               batch["hist_age_hours"], self.history_len)
        target = np.array([t[0] for t in batch["targets"]], dtype=np.int64)  # (B,)
        n = len(self.q)
        if not self.n_sampled:
            sampled = np.zeros(0, dtype=np.int64)
        elif self.uniform:
            sampled = rng.integers(0, n, size=self.n_sampled).astype(np.int64)
        else:
            sampled = rng.choice(n, size=self.n_sampled, p=self.q).astype(np.int64)
        cand = np.concatenate([target, sampled])  # (C,)
        uniq, inv = np.unique(np.concatenate([items[valid], cand]), return_inverse=True)
        n_hist = int(valid.sum())
        hist_pos = np.zeros_like(items)
        hist_pos[valid] = inv[:n_hist]
        cand_pos = inv[n_hist:]
        mask = self.mask[uniq]
        L = int(mask.sum(1).max())
        if not self.logq:
            log_q = np.zeros(len(cand), dtype=np.float32)
        elif self.uniform and self.n_sampled:  # each column's expected count: B in-batch draws + S uniform ones
            log_q = np.log(len(target) * self.q[cand] + self.n_sampled / n).astype(np.float32)
        else:  # both draws follow q: log q up to a constant
            log_q = self.log_q[cand]
        t = lambda a: torch.as_tensor(a, device=dev)  # noqa: E731
        out = {"tokens": t(self.ids[uniq][:, :L]), "token_mask": t(mask[:, :L]), "items": t(uniq),
               "hist_pos": t(hist_pos), "hist_types": t(types), "hist_age": t(age), "hist_valid": t(valid),
               "cand_pos": t(cand_pos), "cand_log_q": t(log_q), "cand_item": t(cand), "target_item": t(target)}
        if self.mask_mates:
            out["group_items"] = t(group_items(batch["targets"], items))
        return out


def group_items(targets, hist_items: np.ndarray) -> np.ndarray:
    """(B, M) item ids that are never row b's negatives: its other positives (``targets[1:]``) and its
    history (``hist_items``, -1 padded), -1 padded."""
    groups = [np.concatenate([np.asarray(t[1:], dtype=np.int64), h[h >= 0]]) for t, h in zip(targets, hist_items)]
    out = np.full((len(groups), max(1, max(len(g) for g in groups))), -1, dtype=np.int64)
    for i, g in enumerate(groups):
        out[i, :len(g)] = g
    return out
