"""Bundles: item compatibility, bundle generation under constraints, and best-Jaccard matching.

Compatibility of two items combines what the data shows with what the encoder knows:

    compat(a, b) = w_data * sPMI(a, b) + w_text * cos(e_a, e_b)

* ``sPMI`` -- positive pointwise mutual information of co-occurrence in training baskets/bundles,
  shrunk towards 0 for rare pairs: ``n_ab / (n_ab + shrink) * max(0, log(n_ab * N / (n_a * n_b)))``;
* ``cos`` -- cosine of the (fine-tuned) item-tower embeddings, so new items with no history still
  bundle by their text.

Personalized bundles (:func:`generate`): seeds are the user's top-scored items; each bundle is grown
greedily with the candidate maximising relevance + compatibility with the bundle so far, under the
size, budget, exclusion, category-diversity and no-repeat constraints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment


# -------------------------------------------------------------------- compatibility

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


class Compatibility:
    def __init__(self, pair_counts: sp.csr_matrix, counts: np.ndarray, n_groups: int,
                 embeddings: Optional[np.ndarray] = None, w_data: float = 1.0, w_text: float = 1.0,
                 shrink: float = 2.0):
        self.C = pair_counts.tocsr()
        self.n = counts
        self.N = max(n_groups, 1)
        self.E = embeddings
        self.w_data, self.w_text, self.shrink = w_data, w_text, shrink

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
        return out


# -------------------------------------------------------------------- bundle detection in a session

def partition(items: Sequence[int], compat: Compatibility, threshold: float, max_size: int = 8) -> list[list[int]]:
    """Average-linkage agglomerative grouping of a session's items; groups of >= 2 items are bundles."""
    clusters = [[int(i)] for i in dict.fromkeys(items)]
    if len(clusters) < 2:
        return []
    S = compat.matrix([c[0] for c in clusters])
    pos = {c[0]: k for k, c in enumerate(clusters)}
    while len(clusters) > 1:
        best, pair = -np.inf, None
        for x in range(len(clusters)):
            for y in range(x + 1, len(clusters)):
                if len(clusters[x]) + len(clusters[y]) > max_size:
                    continue
                s = np.mean([S[pos[i], pos[j]] for i in clusters[x] for j in clusters[y]])
                if s > best:
                    best, pair = s, (x, y)
        if pair is None or best < threshold:
            break
        x, y = pair
        clusters[x] = clusters[x] + clusters[y]
        del clusters[y]
    return [c for c in clusters if len(c) >= 2]


def jaccard(a: Sequence, b: Sequence) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 0.0


def match(generated: list[list], truth: list[list]) -> tuple[float, int, int]:
    """One-to-one best-Jaccard matching (Hungarian). Returns (sum of matched Jaccard, #gen, #truth)."""
    if not generated or not truth:
        return 0.0, len(generated), len(truth)
    J = np.array([[jaccard(g, t) for t in truth] for g in generated])
    r, c = linear_sum_assignment(-J)
    return float(J[r, c].sum()), len(generated), len(truth)


def prf(total_jaccard: float, n_gen: int, n_truth: int) -> dict:
    p = total_jaccard / n_gen if n_gen else 0.0
    r = total_jaccard / n_truth if n_truth else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


# -------------------------------------------------------------------- personalized bundles

@dataclass
class BundleConstraints:
    n: int = 3
    """Bundles to return."""
    min_size: int = 2
    max_size: int = 4
    budget: Optional[float] = None
    """Maximum list price of a bundle (sum of item prices)."""
    exclude: tuple = ()
    """Item positions never to include (e.g. already bought)."""
    allow_repeats: bool = False
    """Allow an item in more than one returned bundle."""
    max_per_category: int = 1
    """Items of one category per bundle (no bundle of near-duplicates)."""
    candidates: int = 60
    """Top-scored items considered."""
    relevance_weight: float = 0.5
    """Weight of the user's score (standardised) against compatibility when growing a bundle."""


def generate(scores: np.ndarray, compat: Compatibility, categories: Sequence[str], prices: Sequence[float],
             c: BundleConstraints) -> list[dict]:
    """Greedy bundle construction for one user. ``scores``: (N,) relevance of every catalog item."""
    s = np.asarray(scores, dtype=np.float64).copy()
    s[list(c.exclude)] = -np.inf
    order = [int(i) for i in np.argsort(-s)[: c.candidates] if np.isfinite(s[i])]
    if not order:
        return []
    rel = (s[order] - s[order].mean()) / (s[order].std() + 1e-9)
    relpos = dict(zip(order, rel))
    C = compat.matrix(order)
    cpos = {it: k for k, it in enumerate(order)}
    price = lambda i: float(prices[i]) if prices[i] is not None and prices[i] == prices[i] and prices[i] >= 0 else 0.0  # noqa: E731
    used: set = set()
    out = []
    for seed in order:
        if len(out) >= c.n:
            break
        if seed in used and not c.allow_repeats:
            continue
        if c.budget is not None and price(seed) > c.budget:
            continue
        bundle, cost = [seed], price(seed)
        while len(bundle) < c.max_size:
            best, best_gain = None, -np.inf
            for cand in order:
                if cand in bundle or (cand in used and not c.allow_repeats):
                    continue
                if c.budget is not None and cost + price(cand) > c.budget:
                    continue
                if sum(categories[b] == categories[cand] for b in bundle) >= c.max_per_category:
                    continue
                gain = np.mean([C[cpos[b], cpos[cand]] for b in bundle]) + c.relevance_weight * relpos[cand]
                if gain > best_gain:
                    best, best_gain = cand, gain
            if best is None or (len(bundle) >= c.min_size and best_gain <= 0):
                break
            bundle.append(best)
            cost += price(best)
        if len(bundle) < c.min_size:
            continue
        pair = [C[cpos[a], cpos[b]] for k, a in enumerate(bundle) for b in bundle[k + 1:]]
        out.append({"items": bundle, "score": float(np.mean(pair) + c.relevance_weight * np.mean([relpos[i] for i in bundle])),
                    "list_price": round(sum(price(i) for i in bundle), 2)})
        used.update(bundle)
    return out


def bundle_name(categories: Sequence[str]) -> str:
    """A short name from the items' shared category (or the top-level categories joined)."""
    parts = [str(c).replace(".", " > ").split(" > ") for c in categories]
    common = []
    for level in zip(*parts):
        if len(set(level)) == 1:
            common.append(level[0])
        else:
            break
    if common:
        return f"{common[-1].title()} bundle"
    tops = list(dict.fromkeys(p[-1] for p in parts))
    return " + ".join(t.title() for t in tops[:3])
