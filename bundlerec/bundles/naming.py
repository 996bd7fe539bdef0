"""Bundle names drawn from the intents shoppers' bundles were annotated with.

A generated bundle gets the intent of the most fitting annotated training bundle. "Fitting" is a
weighted sum of standardised channels, each a score of every (training intent, its bundle) pair:

* ``neighbour`` -- cosine between the bundle's and the training bundle's mean pretrained item embedding;
* ``zeroshot``  -- cosine between the bundle's mean item embedding and the intent text's embedding;
* ``lexical``   -- TF-IDF cosine between the bundle's summed item vectors and the intent text.

Weights are chosen on validation users (``jobs.eval_bundles``); ``zeroshot`` and ``lexical`` alone are
the baselines. Quality: ROUGE-1 F1 (word overlap) between the name and the annotated intent. Saved
as plain data beside the export: ``intent_names.json`` (texts, weights) and ``intent_vectors.npz``.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Optional, Sequence

import numpy as np

NAMES_FILE, VECTORS_FILE = "intent_names.json", "intent_vectors.npz"
CHANNELS = ("neighbour", "zeroshot", "lexical")


def rouge1_f1(a: str, b: str) -> float:
    """Word-overlap F1 of two short texts (lower-cased alphanumeric words, counts clipped)."""
    ta, tb = Counter(re.findall(r"[a-z0-9]+", str(a).lower())), Counter(re.findall(r"[a-z0-9]+", str(b).lower()))
    overlap = sum((ta & tb).values())
    if not overlap:
        return 0.0
    p, r = overlap / sum(ta.values()), overlap / sum(tb.values())
    return 2 * p * r / (p + r)


def _centroids(groups: Sequence[Sequence[int]], emb: np.ndarray) -> np.ndarray:
    c = np.stack([emb[list(g)].mean(0) for g in groups]) if len(groups) else np.zeros((0, emb.shape[1]))
    return c / (np.linalg.norm(c, axis=1, keepdims=True) + 1e-12)


def _z(s: np.ndarray) -> np.ndarray:
    return (s - s.mean(1, keepdims=True)) / (s.std(1, keepdims=True) + 1e-9)


class IntentNamer:
    def __init__(self, texts: list[str], neighbour: np.ndarray, zeroshot: np.ndarray, weights: Optional[dict] = None):
        if not (len(texts) == len(neighbour) == len(zeroshot)) or not texts:
            raise ValueError("intent names need one vector of each kind per intent text, and at least one intent")
        self.texts, self.neighbour, self.zeroshot = list(texts), neighbour, zeroshot
        self.weights = weights or {"neighbour": 1.0}
        if set(self.weights) - set(CHANNELS):
            raise ValueError(f"unknown naming channels {sorted(set(self.weights) - set(CHANNELS))}; known: {CHANNELS}")

    @classmethod
    def fit(cls, groups: Sequence[Sequence[int]], intents: Sequence[str], engine) -> "IntentNamer":
        """From annotated training bundles (item positions + intent text); ``engine`` encodes the texts."""
        keep = [(list(g), str(t).strip()) for g, t in zip(groups, intents) if len(g) and str(t).strip()]
        if not keep:
            raise ValueError("no annotated training bundle to draw names from")
        texts = [t for _, t in keep]
        z = np.concatenate([engine.encode_texts("pretrained", texts[i:i + 256]) for i in range(0, len(texts), 256)])
        z /= np.linalg.norm(z, axis=1, keepdims=True) + 1e-12
        return cls(texts, _centroids([g for g, _ in keep], engine.pretrained).astype(np.float32), z.astype(np.float32))

    def channel_scores(self, engine, bundles: Sequence[Sequence[int]]) -> dict:
        """{channel: (B, M)} scores of every training intent for each bundle."""
        c = _centroids(bundles, engine.pretrained)
        return {"neighbour": c @ self.neighbour.T, "zeroshot": c @ self.zeroshot.T, "lexical": self._lexical(engine, bundles)}

    def _lexical(self, engine, bundles) -> np.ndarray:
        from sklearn.preprocessing import normalize

        if getattr(self, "_lex_key", None) != id(engine.lexical):
            self._lex_T, self._lex_key = normalize(engine.lexical.vec.transform(self.texts)), id(engine.lexical)
        rows = [np.asarray(engine.lexical.X[list(b)].sum(0)).ravel() for b in bundles]
        q = normalize(np.stack(rows)) if rows else np.zeros((0, engine.lexical.X.shape[1]))
        return np.asarray(self._lex_T @ q.T).T

    def names(self, engine, bundles: Sequence[Sequence[int]], weights: Optional[dict] = None,
              channels: Optional[dict] = None) -> list[str]:
        w = weights or self.weights
        ch = channels or self.channel_scores(engine, bundles)
        s = sum(v * _z(ch[k]) for k, v in w.items() if v)
        return [self.texts[int(i)] for i in np.argmax(s, axis=1)]

    # ---------------------------------------------------------------- plain-data persistence
    def save(self, export_dir: str) -> None:
        with open(os.path.join(export_dir, NAMES_FILE), "w") as f:
            json.dump({"texts": self.texts, "weights": self.weights}, f)
        np.savez(os.path.join(export_dir, VECTORS_FILE), neighbour=self.neighbour, zeroshot=self.zeroshot)

    @classmethod
    def load(cls, export_dir: str) -> "IntentNamer | None":
        path = os.path.join(export_dir, NAMES_FILE)
        if not os.path.exists(path):
            return None
        meta = json.load(open(path))
        v = np.load(os.path.join(export_dir, VECTORS_FILE), allow_pickle=False)
        return cls(meta["texts"], v["neighbour"], v["zeroshot"], meta["weights"])
