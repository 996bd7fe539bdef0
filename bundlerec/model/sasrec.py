"""SASRec, the sequential transformer baseline (Kang & McAuley, *Self-Attentive Sequential
Recommendation*, ICDM 2018), written here in PyTorch: no recommender library is in this stack.

What it is: item-id embeddings plus learned positions, ``blocks`` causal self-attention blocks
(pre-norm, as the reference implementation), the last valid position's output scored against the
(shared) item embeddings. Trained on the same training examples as every other method (history ->
next basket item) with the full-catalog cross-entropy of SASRec-CE (Klenitskiy & Vasilev, *Turning
Dross Into Gold Loss: is BERT4Rec really better than SASRec?*, RecSys 2023), which outperforms the
original sampled binary loss. Item ids only: SASRec reads no text and no event types. The epoch is
chosen on the ``val`` split by NDCG@10 (early stopping), never on the test split.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from bundlerec.metrics import MetricAccumulator
from bundlerec.model.collate import history_tensors

log = logging.getLogger(__name__)
CONFIG, WEIGHTS = "sasrec.json", "sasrec.safetensors"


@dataclass
class SASRecConfig:
    dim: int = 64
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.2
    lr: float = 1e-3
    batch: int = 256
    max_epochs: int = 40
    patience: int = 4
    seed: int = 0


class SASRec(nn.Module):
    name = "sasrec"

    def __init__(self, n_items: int, history_len: int, c: SASRecConfig = SASRecConfig()):
        super().__init__()
        self.n_items, self.history_len, self.config = n_items, history_len, c
        self.items = nn.Embedding(n_items + 1, c.dim, padding_idx=n_items)  # the last row pads
        self.pos = nn.Embedding(history_len, c.dim)
        layer = nn.TransformerEncoderLayer(c.dim, c.heads, 4 * c.dim if c.dim < 256 else c.dim, c.dropout,
                                           batch_first=True, norm_first=True, activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, c.blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.dim)
        self.drop = nn.Dropout(c.dropout)
        nn.init.normal_(self.items.weight, std=0.02)

    def user(self, batch: dict) -> torch.Tensor:
        items, valid = batch["hist_items"][:, -self.history_len:], batch["hist_valid"][:, -self.history_len:]
        B, H = items.shape
        x = self.items(torch.where(valid, items, torch.full_like(items, self.n_items)))
        x = self.drop(x * self.items.embedding_dim ** 0.5 + self.pos(torch.arange(H, device=x.device))[None])
        causal = torch.triu(torch.ones(H, H, dtype=torch.bool, device=x.device), 1)
        h = self.norm(self.blocks(x, mask=causal, src_key_padding_mask=~valid))
        last = (valid.sum(1) - 1).clamp(min=0)
        return h[torch.arange(B), last]

    def save(self, export_dir: str) -> None:
        """``sasrec.json`` (config, catalog size, history length, how it was chosen) and
        ``sasrec.safetensors`` (weights): plain data, nothing pickled."""
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, os.path.join(export_dir, WEIGHTS))
        with open(os.path.join(export_dir, CONFIG), "w") as f:
            json.dump({"config": asdict(self.config), "n_items": self.n_items, "history_len": self.history_len,
                       "epochs": getattr(self, "epochs", None), "best_val_ndcg@10": getattr(self, "best_val_ndcg", None)}, f)

    @classmethod
    def load(cls, export_dir: str) -> "SASRec | None":
        from safetensors.torch import load_file

        path = os.path.join(export_dir, CONFIG)
        if not os.path.exists(path):
            return None
        meta = json.load(open(path))
        model = cls(meta["n_items"], meta["history_len"], SASRecConfig(**meta["config"]))
        model.load_state_dict(load_file(os.path.join(export_dir, WEIGHTS)))
        model.epochs, model.best_val_ndcg = meta["epochs"], meta["best_val_ndcg@10"]
        return model.eval()

    def score(self, batch: dict) -> torch.Tensor:
        """(B, N) scores of every catalog item (the Scorer protocol of bundlerec.eval.evaluate)."""
        with torch.no_grad():
            was = self.training
            self.eval()
            out = self.user(batch) @ self.items.weight[:-1].T
            self.train(was)
        return out


def _batches(df: pd.DataFrame, history_len: int, size: int, rng: np.random.Generator | None = None):
    order = rng.permutation(len(df)) if rng is not None else np.arange(len(df))
    for i in range(0, len(df), size):
        chunk = df.iloc[order[i:i + size]]
        batch = history_tensors({c: chunk[c].tolist() for c in ("hist_items", "hist_types", "hist_age_hours")},
                                history_len, "cpu")
        yield batch, chunk["targets"].tolist()


def _val_ndcg(model: SASRec, val: pd.DataFrame, history_len: int) -> float:
    acc = MetricAccumulator([10], model.n_items)
    for batch, targets in _batches(val, history_len, 512):
        acc.update(model.score(batch), targets)
    return float(acc.result()["ndcg@10"])


def fit_sasrec(train: pd.DataFrame, val: pd.DataFrame, n_items: int, history_len: int,
               c: SASRecConfig = SASRecConfig()) -> SASRec:
    """Train on ``train`` (one example per target item), keep the epoch with the best val NDCG@10."""
    torch.manual_seed(c.seed)
    rng = np.random.default_rng(c.seed)
    model = SASRec(n_items, history_len, c)
    opt = torch.optim.Adam(model.parameters(), lr=c.lr)
    train = train[train["hist_items"].map(len) > 0]
    val = val[val["hist_items"].map(len) > 0]
    best, best_state, bad = -1.0, None, 0
    for epoch in range(1, c.max_epochs + 1):
        model.train()
        for batch, tg in _batches(train, history_len, c.batch, rng):
            logits = model.user(batch) @ model.items.weight[:-1].T
            loss = nn.functional.cross_entropy(logits, torch.as_tensor([int(t[0]) for t in tg]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        score = _val_ndcg(model, val, history_len) if len(val) else -float(epoch)
        if score > best:
            best, best_state, bad = score, {k: v.clone() for k, v in model.state_dict().items()}, 0
        else:
            bad += 1
            if bad >= c.patience:
                break
        log.info("sasrec: epoch %d val ndcg@10 %.4f (best %.4f)", epoch, score, best)
    model.load_state_dict(best_state)
    model.best_val_ndcg, model.epochs = best, epoch
    return model.eval()
