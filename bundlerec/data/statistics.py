"""Counting statistics of the training data: item popularity and co-occurrence in groups, and the
count-based scorers built on them.

Shared by the baselines (eval), the served cold-start list and bundle compatibility (bundles): one
implementation each. Groups are baskets, bundles or sessions: lists of item positions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch


def popularity(train: pd.DataFrame, n_items: int) -> np.ndarray:
    """Purchase counts per item in the training targets. Shape (N,)."""
    t = np.concatenate([np.asarray(x, dtype=np.int64) for x in train["targets"]]) if len(train) else np.zeros(0, np.int64)
    return np.bincount(t, minlength=n_items).astype(np.float64)


def cooccurrence_counts(groups: Sequence[Sequence[int]], n_items: int) -> sp.csr_matrix:
    """Symmetric item x item counts of appearing in the same group (basket, bundle, session)."""
    rows, cols = [], []
    for g in groups:
        g = np.unique(np.asarray(g, dtype=np.int64))
        if len(g) > 1:
            a, b = np.meshgrid(g, g)
            off = a != b
            rows.append(a[off])
            cols.append(b[off])
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    m = sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(n_items, n_items))
    m.sum_duplicates()
    return m


def item_counts(groups: Sequence[Sequence[int]], n_items: int) -> np.ndarray:
    flat = np.concatenate([np.unique(np.asarray(g, dtype=np.int64)) for g in groups]) if len(groups) else np.zeros(0, np.int64)
    return np.bincount(flat, minlength=n_items).astype(np.float64)


def basket_groups(examples: pd.DataFrame) -> list[list[int]]:
    """The items bought together: one group per (user, target basket) of the training examples."""
    if not len(examples):
        return []
    first = examples.assign(t0=examples["targets"].map(lambda x: int(x[0])))
    return [g for g in first.groupby(["user_id", "target_time"])["t0"].agg(list).tolist() if g]


@dataclass
class CoStats:
    """Co-occurrence statistics of training groups (baskets, bundles, sessions)."""

    pairs: sp.csr_matrix
    counts: np.ndarray
    groups: int

    @classmethod
    def from_groups(cls, groups: list[list[int]], n: int) -> "CoStats":
        return cls(cooccurrence_counts(groups, n), item_counts(groups, n), len(groups))

    def save(self, export_dir: str) -> None:
        sp.save_npz(os.path.join(export_dir, "copurchase.npz"), self.pairs)
        np.save(os.path.join(export_dir, "copurchase_items.npy"), self.counts)
        with open(os.path.join(export_dir, "copurchase_groups.txt"), "w") as f:
            f.write(str(self.groups))

    @classmethod
    def load(cls, export_dir: str, n: int) -> "CoStats":
        path = os.path.join(export_dir, "copurchase.npz")
        if not os.path.exists(path):
            return cls(sp.csr_matrix((n, n), dtype=np.float32), np.zeros(n), 1)
        return cls(sp.load_npz(path).tocsr(), np.load(os.path.join(export_dir, "copurchase_items.npy")),
                   int(open(os.path.join(export_dir, "copurchase_groups.txt")).read()))


# ---- count-based scorers, scored by the same evaluation code as the model (same split, same metrics)
# One implementation each, used by the clickstream evaluation (:mod:`bundlerec.eval.evaluate`) and
# the bundle evaluation (:mod:`bundlerec.eval.bundles`):
#
# * ``popular``  -- the most frequent items of the training data, the same list for everyone;
# * ``itemknn``  -- item-to-item co-occurrence, cosine-normalised, summed over the user's history
#   (clickstream: history item -> purchased item and items bought in the same basket; bundles:
#   items of the same training bundle or session);
# * ``zeroshot`` -- the pretrained encoder without fine-tuning (see bundlerec.model.two_tower: the
#   untrained user tower is the mean of the history item embeddings);
# * ``recent``   -- the shopper's own history again: carted items first, then purchased, clicked and
#   viewed, the more recent the higher (no training data at all: what "repeat the last carts" earns).


class Popular:
    name = "popular"

    def __init__(self, counts: np.ndarray):
        self.scores = torch.as_tensor(np.asarray(counts, dtype=np.float64), dtype=torch.float32)

    @classmethod
    def from_examples(cls, train: pd.DataFrame, n_items: int) -> "Popular":
        return cls(popularity(train, n_items))

    def score(self, batch: dict) -> torch.Tensor:
        return self.scores.unsqueeze(0).expand(batch["hist_items"].shape[0], -1)


def cooccurrence(train: pd.DataFrame, n_items: int) -> sp.csr_matrix:
    """C[a, b]: how often b was bought after a was in the history, or in the same basket as a."""
    rows, cols = [], []
    for hist, tg in zip(train["hist_items"], train["targets"]):
        h = np.unique(np.asarray(hist, dtype=np.int64))
        for t in tg:
            rows.append(h)
            cols.append(np.full(len(h), t, dtype=np.int64))
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    after = sp.csr_matrix((np.ones(len(r), dtype=np.float32), (r, c)), shape=(n_items, n_items))
    return after + cooccurrence_counts(basket_groups(train), n_items)


def history_rows(items: np.ndarray, valid: np.ndarray, n_items: int) -> sp.csr_matrix:
    """(B, H) history ids + validity -> (B, N) 0/1 rows (a repeated history item counts once)."""
    B = items.shape[0]
    rows = np.repeat(np.arange(B), items.shape[1])[valid.ravel()]
    q = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, items.ravel()[valid.ravel()])), shape=(B, n_items))
    q.data[:] = 1.0
    return q


class ItemKNN:
    name = "itemknn"

    def __init__(self, cooc: sp.spmatrix):
        C = sp.csr_matrix(cooc, dtype=np.float32)
        row = np.asarray(C.sum(1)).ravel() + 1.0
        col = np.asarray(C.sum(0)).ravel() + 1.0
        # cosine-style normalisation: frequent items do not dominate every neighbourhood
        self.sim = (sp.diags(1.0 / np.sqrt(row)) @ C @ sp.diags(1.0 / np.sqrt(col))).tocsr().astype(np.float32)
        self.pop = torch.as_tensor(col / col.sum() * 1e-6, dtype=torch.float32)  # tie-break by frequency

    @classmethod
    def from_examples(cls, train: pd.DataFrame, n_items: int) -> "ItemKNN":
        return cls(cooccurrence(train, n_items))

    def score(self, batch: dict) -> torch.Tensor:
        q = history_rows(batch["hist_items"].cpu().numpy(), batch["hist_valid"].cpu().numpy(), self.sim.shape[0])
        return torch.as_tensor((q @ self.sim).toarray()) + self.pop.unsqueeze(0)


class Recent:
    """Scores the items of the user's own history: event-type weight (cart > purchase > click > view)
    plus a small bonus for recency; every other item scores 0."""

    name = "recent"
    WEIGHTS = {"view": 1.0, "click": 2.0, "cart": 4.0, "purchase": 3.0}

    def __init__(self, n_items: int):
        from bundlerec.data.schema import EVENT_TYPES

        self.n_items = n_items
        self.type_weight = torch.tensor([self.WEIGHTS[t] for t in EVENT_TYPES])

    def score(self, batch: dict) -> torch.Tensor:
        items, valid = batch["hist_items"], batch["hist_valid"]
        B, H = items.shape
        w = self.type_weight[batch["hist_types"].clamp(0, len(self.type_weight) - 1)]
        w = (w + torch.arange(H, dtype=torch.float32) / (10.0 * H)) * valid  # later positions: more recent
        out = torch.zeros(B, self.n_items)
        return out.scatter_add_(1, items.clamp(min=0), w.float())
