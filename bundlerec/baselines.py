"""Baselines scored by the same evaluation code as the model (same split, same metrics).

* ``popular``  -- most purchased items in the training split, the same list for everyone;
* ``itemknn``  -- item-to-item co-occurrence (history item -> purchased item, and items bought
  in the same basket) from the training split, cosine-normalised, summed over the user's history;
* ``zeroshot`` -- the pretrained encoder without fine-tuning (see bundlerec.model: the untrained
  user tower is the mean of the history item embeddings).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from bundlerec.bundles import cooccurrence_counts


def popularity(train: pd.DataFrame, n_items: int) -> np.ndarray:
    """Purchase counts per item in the training targets. Shape (N,)."""
    t = np.concatenate([np.asarray(x, dtype=np.int64) for x in train["targets"]]) if len(train) else np.zeros(0, np.int64)
    return np.bincount(t, minlength=n_items).astype(np.float64)


class Popular:
    name = "popular"

    def __init__(self, train: pd.DataFrame, n_items: int):
        self.scores = torch.as_tensor(popularity(train, n_items), dtype=torch.float32)

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
    baskets = train.assign(t0=train["targets"].map(lambda x: int(x[0]))).groupby(["user_id", "target_time"])["t0"].agg(list)
    return after + cooccurrence_counts(baskets.tolist(), n_items)


class ItemKNN:
    name = "itemknn"

    def __init__(self, train: pd.DataFrame, n_items: int):
        C = cooccurrence(train, n_items)
        row = np.asarray(C.sum(1)).ravel() + 1.0
        col = np.asarray(C.sum(0)).ravel() + 1.0
        # cosine-style normalisation: frequent items do not dominate every neighbourhood
        self.sim = (sp.diags(1.0 / np.sqrt(row)) @ C @ sp.diags(1.0 / np.sqrt(col))).tocsr().astype(np.float32)
        self.pop = torch.as_tensor(col / col.sum() * 1e-6, dtype=torch.float32)  # tie-break by popularity

    def score(self, batch: dict) -> torch.Tensor:
        items = batch["hist_items"].cpu().numpy()
        valid = batch["hist_valid"].cpu().numpy()
        B = items.shape[0]
        rows = np.repeat(np.arange(B), items.shape[1])[valid.ravel()]
        q = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, items.ravel()[valid.ravel()])),
                          shape=(B, self.sim.shape[0]))
        q.data[:] = 1.0  # repeated history items count once
        s = torch.as_tensor((q @ self.sim).toarray())
        return s + self.pop.unsqueeze(0)
