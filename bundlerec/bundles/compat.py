"""Item compatibility: how well two items go together in a bundle.

Compatibility of two items combines what the data shows with what the encoder knows:

    compat(a, b) = w_data * sPMI(a, b) + w_text * cos(e_a, e_b) + sum_k w_k * cos_k(a, b)

* ``sPMI`` -- positive pointwise mutual information of co-occurrence in training baskets/bundles,
  shrunk towards 0 for rare pairs: ``n_ab / (n_ab + shrink) * max(0, log(n_ab * N / (n_a * n_b)))``;
* ``cos`` -- cosine of the (fine-tuned) item-tower embeddings, so new items with no history still
  bundle by their text;
* ``cos_k`` -- further text channels (``extra``): the pretrained encoder's embeddings, the
  lexical TF-IDF rows (:mod:`bundlerec.model.lexical`); dense or sparse, rows L2-normalised.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import scipy.sparse as sp


class Compatibility:
    def __init__(self, pair_counts: sp.csr_matrix, counts: np.ndarray, n_groups: int,
                 embeddings: Optional[np.ndarray] = None, w_data: float = 1.0, w_text: float = 1.0,
                 shrink: float = 2.0, extra: Sequence[tuple] = ()):
        self.C = pair_counts.tocsr()
        self.n = counts
        self.N = max(n_groups, 1)
        self.E = embeddings
        self.w_data, self.w_text, self.shrink = w_data, w_text, shrink
        self.extra = [(M, float(w)) for M, w in extra if w]

    def spmi(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(len(a), len(b)) shrunk positive PMI."""
        nab = self.C[a][:, b].toarray().astype(np.float64)
        denom = np.outer(self.n[a], self.n[b]).clip(min=1.0)
        pmi = np.log(np.where(nab > 0, nab * self.N / denom, 1.0)).clip(min=0.0)
        return nab / (nab + self.shrink) * pmi

    def matrix(self, a: Sequence[int], b: Optional[Sequence[int]] = None) -> np.ndarray:
        a = np.asarray(a, dtype=np.int64)
        b = a if b is None else np.asarray(b, dtype=np.int64)
        out = np.zeros((len(a), len(b)))
        if self.w_data:
            out += self.w_data * self.spmi(a, b)
        if self.w_text and self.E is not None:
            out += self.w_text * (self.E[a] @ self.E[b].T)
        for M, w in self.extra:
            prod = M[a] @ M[b].T
            out += w * (prod.toarray() if sp.issparse(prod) else prod)
        return out
