"""Lexical item similarity: TF-IDF over the item text the item tower reads.

The lexical baseline of the bundle evaluation and one channel of the bundle engine (hybrid
dense + lexical scoring). Fitted on the catalog's text only (no interactions, no labels), saved in
the export as plain data (``lexical.json``: vocabulary, idf, settings; ``lexical_items.npz``: the
L2-normalised (N, V) item matrix), so loading runs no pickled code.

    lex = Lexical.fit(items.text)
    lex.cart_scores([[3, 7]])          # (1, N) cosine of every item with the cart's summed vectors
    lex.query_scores(["camping kit"])  # (1, N) cosine with free text
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.preprocessing import normalize

# The lexical baseline's grid, fixed in code (chosen on validation, written into the results).
GRID: dict[str, dict] = {
    "word-1-2": {"analyzer": "word", "ngram_range": (1, 2), "sublinear_tf": True, "min_df": 1},
    "char-3-5": {"analyzer": "char_wb", "ngram_range": (3, 5), "sublinear_tf": True, "min_df": 2},
}
DEFAULT = "word-1-2"


class Lexical:
    def __init__(self, vectorizer: TfidfVectorizer, X: sp.csr_matrix, setting: str):
        self.vec, self.X, self.setting = vectorizer, X.tocsr().astype(np.float32), setting

    @classmethod
    def fit(cls, texts: Sequence[str], setting: str = DEFAULT) -> "Lexical":
        if setting not in GRID:
            raise ValueError(f"unknown lexical setting {setting!r}; known: {sorted(GRID)}")
        vec = TfidfVectorizer(lowercase=True, dtype=np.float32, **GRID[setting])
        X = vec.fit_transform([str(t) for t in texts])
        return cls(vec, normalize(X), setting)

    def __len__(self) -> int:
        return self.X.shape[0]

    def cart_scores(self, carts: Sequence[Sequence[int]]) -> np.ndarray:
        """(B, N) cosine between each cart's summed item vectors and every item."""
        rows = np.repeat(np.arange(len(carts)), [len(c) for c in carts])
        cols = np.concatenate([np.asarray(c, dtype=np.int64) for c in carts]) if len(rows) else np.zeros(0, np.int64)
        sel = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(carts), self.X.shape[0]))
        q = normalize(sel @ self.X)
        return (q @ self.X.T).toarray()

    def query_scores(self, texts: Sequence[str]) -> np.ndarray:
        return (normalize(self.vec.transform([str(t) for t in texts])) @ self.X.T).toarray()

    # ---------------------------------------------------------------- safe persistence
    def save(self, out_dir: str) -> None:
        vocab = {t: int(i) for t, i in self.vec.vocabulary_.items()}
        meta = {"setting": self.setting, "params": {k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in GRID[self.setting].items()},
                "vocabulary": vocab, "idf": self.vec.idf_.astype(float).tolist()}
        with open(os.path.join(out_dir, "lexical.json"), "w") as f:
            json.dump(meta, f)
        sp.save_npz(os.path.join(out_dir, "lexical_items.npz"), self.X)

    @classmethod
    def load(cls, export_dir: str) -> "Lexical | None":
        path = os.path.join(export_dir, "lexical.json")
        if not os.path.exists(path):
            return None
        meta = json.load(open(path))
        params = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["params"].items()}
        vec = TfidfVectorizer(lowercase=True, dtype=np.float32, vocabulary=meta["vocabulary"], **params)
        vec.idf_ = np.asarray(meta["idf"], dtype=np.float64)
        return cls(vec, sp.load_npz(os.path.join(export_dir, "lexical_items.npz")), meta["setting"])
