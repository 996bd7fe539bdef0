"""Counting statistics of the training data: item popularity and co-occurrence in groups.

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
