"""How a Ray Train worker reads its dataset shards: whole (validation, a materialized train split) as
numpy columns, or streamed through Ray Data's ``iter_torch_batches`` with bundlerec's collation."""

from __future__ import annotations

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn


def read_all(shard) -> dict:
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


class RayCollate(NumpyBatchCollateFn):
    """A collate function as Ray Data's iter_torch_batches takes one (numpy batches in, tensors out)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, batch: dict) -> dict:
        return self.fn(batch)
