"""Catalog encoding as Ray Data batch inference: the pre-tokenized catalog in blocks, encoder actors
(one GPU each where there are GPUs) embedding them, the embeddings gathered back in catalog order.

Used where the catalog is large (``train.batch_inference_min_items``): the export's item index and
the offline evaluation's zero-shot baseline. The actors load the encoder from a model folder (the
export's ``encoder/``: the merged weights serving loads), so the index is what serving would compute.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


class _ItemEncoder:
    """One actor: the item tower of ``model_dir`` (pooled, L2-normalised embeddings)."""

    def __init__(self, model_dir: str, pooling: str, use_gpu: bool, threads: int):
        import torch

        from bundlerec.model.two_tower import TwoTower, load_backbone

        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda") if use_gpu else torch.device("cpu")
        self.model = TwoTower(load_backbone(model_dir), pooling=pooling).to(self.device).eval()
        self.dtype = torch.bfloat16 if use_gpu else None

    def __call__(self, batch: dict) -> dict:
        import torch

        ids = torch.as_tensor(np.stack(batch["input_ids"]), device=self.device)
        mask = torch.as_tensor(np.stack(batch["attention_mask"]), device=self.device)
        length = int(mask.sum(1).max())  # as TwoTower.index_items: padding beyond the longest row dropped
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            emb = self.model.encode_items(ids[:, :length], mask[:, :length])
        return {"row": batch["row"], "embedding": emb.float().cpu().numpy()}


def encode_catalog(model_dir: str, pooling: str, ids: np.ndarray, mask: np.ndarray, *, use_gpu: bool = False,
                   actors: int = 2, cpus_per_actor: float = 1.0, batch_size: int = 256) -> np.ndarray:
    """(N, L) token ids and mask -> (N, d) float32 item embeddings, encoded by ``actors`` Ray Data actors
    (a GPU each when ``use_gpu``) running the item tower of ``model_dir``; rows come back in order."""
    import pyarrow as pa
    import ray

    n, length = ids.shape
    table = pa.table({
        "row": np.arange(n, dtype=np.int64),
        "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1).astype(np.int64)), length),
        "attention_mask": pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1).astype(np.int64)), length),
    })
    blocks = max(actors * 4, -(-n // batch_size))  # enough blocks for every actor to have work
    ds = ray.data.from_arrow(table).repartition(min(blocks, max(1, n // 16)))
    out = ds.map_batches(_ItemEncoder, fn_constructor_args=(model_dir, pooling, use_gpu, int(cpus_per_actor)),
                         batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                         num_gpus=1 if use_gpu else 0, num_cpus=cpus_per_actor)
    rows, embs = [], []
    for b in out.iter_batches(batch_size=None, batch_format="numpy"):
        rows.append(b["row"])
        embs.append(np.stack(b["embedding"]))
    row = np.concatenate(rows)
    emb = np.concatenate(embs).astype(np.float32)
    if len(row) != n or not np.array_equal(np.sort(row), np.arange(n)):
        raise RuntimeError(f"batch inference returned {len(row)} rows for a catalog of {n}")
    index = np.empty_like(emb)
    index[row] = emb
    log.info("encoded %d items with %d Ray Data actor(s)%s", n, actors, " on GPUs" if use_gpu else "")
    return index


def index_catalog(model, model_dir: str, ids: np.ndarray, mask: np.ndarray, train=None,
                  progress: str = "encode catalog") -> np.ndarray:
    """``model``'s (N, d) item index, set on it and returned: by Ray Data batch inference (actors
    running the item tower of ``model_dir``) when the catalog has at least
    ``train.batch_inference_min_items`` items (``train``: a TrainConfig), else in this process."""
    import torch

    if train is not None and len(ids) >= train.batch_inference_min_items:
        index = encode_catalog(model_dir, model.pooling, ids, mask, use_gpu=train.use_gpu,
                               actors=train.batch_inference_actors, cpus_per_actor=train.cpus_per_worker)
        model.set_index(torch.as_tensor(index))
        return index
    return model.index_items(torch.as_tensor(ids), torch.as_tensor(mask), progress=progress).numpy()
