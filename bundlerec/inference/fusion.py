"""The served recommender's fusion: several channels scored for a batch of histories, each
standardised over the catalog and summed with weights chosen on the ``val`` split.

    fusion = Fusion.from_export(export_dir, model)    # what Serve, the pyfunc and the evaluation load
    scores = fusion.score(batch)                        # (B, N), the Scorer protocol

Channels (each a (B, N) raw score of every item for a history batch):

* ``tuned``    -- the fine-tuned two-tower model;
* ``itemknn``  -- co-occurrence of training histories/baskets (:class:`bundlerec.data.statistics.ItemKNN`);
* ``recent``   -- the shopper's own recent items (:class:`bundlerec.data.statistics.Recent`);
* ``popular``  -- log(1 + training purchases), the same row for everyone;
* ``lexical``  -- TF-IDF cosine of catalog items to the history's item texts (:mod:`bundlerec.model.lexical`);
* ``sasrec``   -- the sequential transformer over item ids (:mod:`bundlerec.model.sasrec`), trained by
  the fit step on the training split (the ``sasrec`` baseline of the evaluation is this model).

The export carries the weights (``recommend_fusion.json``) and what the channels need
(``itemknn.npz``, the lexical index, ``sasrec.safetensors``); without the file the recommender is the two-tower model
alone (``{"tuned": 1.0}``), as every export before the fit step was.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import scipy.sparse as sp
import torch

from bundlerec.data.statistics import ItemKNN, Recent
from bundlerec.model.sasrec import SASRec
from bundlerec.model.lexical import Lexical

FUSION_FILE = "recommend_fusion.json"
KNN_FILE = "itemknn.npz"
CHANNELS = ("tuned", "itemknn", "recent", "popular", "lexical", "sasrec")
STEP = 0.25  # the validation grid: weights on the simplex over the channels, this step


@dataclass
class FusionParams:
    weights: dict = field(default_factory=lambda: {"tuned": 1.0})
    selection: dict = field(default_factory=dict)

    def __post_init__(self):
        bad = set(self.weights) - set(CHANNELS)
        if bad:
            raise ValueError(f"unknown recommendation channels {sorted(bad)}; known: {CHANNELS}")

    def save(self, export_dir: str) -> None:
        with open(os.path.join(export_dir, FUSION_FILE), "w") as f:
            json.dump(asdict(self), f, indent=2)

    @classmethod
    def load(cls, export_dir: str) -> "FusionParams":
        path = os.path.join(export_dir, FUSION_FILE)
        return cls(**json.load(open(path))) if os.path.exists(path) else cls()


def grid(channels=CHANNELS, step: float = STEP) -> list[dict]:
    """Every weight vector on the simplex over ``channels`` with this step (zero weights dropped)."""
    steps = int(round(1 / step))
    return [{c: x * step for c, x in zip(channels, w) if x}
            for w in itertools.product(range(steps + 1), repeat=len(channels)) if sum(w) == steps]


def _standardize(s: torch.Tensor) -> torch.Tensor:
    s = s.double()
    return (s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + 1e-9)


class Fusion:
    name = "bundlerec"

    def __init__(self, model, params: FusionParams, knn: Optional[ItemKNN] = None, popularity=None,
                 lexical=None, n_items: Optional[int] = None, sasrec=None):
        self.model, self.params, self.sasrec = model, params, sasrec
        self.knn, self.lexical = knn, lexical
        self.n_items = n_items if n_items is not None else len(popularity)
        self.popularity = None if popularity is None else torch.as_tensor(np.log1p(np.asarray(popularity, np.float64)))
        self.recent = Recent(self.n_items)
        missing = [c for c, w in params.weights.items() if w and self.absent(c)]
        if missing:
            raise ValueError(f"{FUSION_FILE} uses channels the export lacks: {missing}")

    @classmethod
    def from_export(cls, export_dir: str, model, n_items: int) -> "Fusion":
        knn = None
        if os.path.exists(os.path.join(export_dir, KNN_FILE)):
            knn = ItemKNN.__new__(ItemKNN)
            knn.sim = sp.load_npz(os.path.join(export_dir, KNN_FILE)).tocsr()
            col = np.asarray(knn.sim.sum(0)).ravel() + 1.0
            knn.pop = torch.as_tensor(col / col.sum() * 1e-6, dtype=torch.float32)
        pop = np.load(os.path.join(export_dir, "popularity.npy"), allow_pickle=False)
        return cls(model, FusionParams.load(export_dir), knn, pop, Lexical.load(export_dir), n_items,
                   SASRec.load(export_dir))

    def absent(self, channel: str) -> bool:
        return {"itemknn": self.knn is None, "lexical": self.lexical is None, "popular": self.popularity is None,
                "tuned": self.model is None, "sasrec": self.sasrec is None}.get(channel, False)

    @property
    def active(self) -> dict:
        return {c: w for c, w in self.params.weights.items() if w}

    @property
    def tuned_only(self) -> bool:
        return list(self.active) == ["tuned"]

    def channel(self, name: str, batch: dict) -> torch.Tensor:
        """(B, N) raw scores of one channel."""
        if name == "tuned":
            return self.model.score(batch)
        if name == "itemknn":
            return self.knn.score(batch)
        if name == "recent":
            return self.recent.score(batch)
        if name == "popular":
            return self.popularity.unsqueeze(0).expand(batch["hist_items"].shape[0], -1)
        if name == "sasrec":
            return self.sasrec.score(batch)
        if name == "lexical":
            items, valid = batch["hist_items"].numpy(), batch["hist_valid"].numpy()
            carts = [list(dict.fromkeys(r[v].tolist())) or [0] for r, v in zip(items, valid)]
            return torch.as_tensor(self.lexical.cart_scores(carts))
        raise ValueError(f"unknown channel {name!r}; known: {CHANNELS}")

    def combine(self, raw: dict, weights: Optional[dict] = None) -> torch.Tensor:
        """(B, N) fused scores from precomputed raw channel scores."""
        w = {c: x for c, x in (weights or self.params.weights).items() if x}
        if list(w) == ["tuned"]:
            return raw["tuned"]
        return sum(x * _standardize(raw[c]) for c, x in w.items()).float()

    def score(self, batch: dict) -> torch.Tensor:
        return self.combine({c: self.channel(c, batch) for c in self.active})
