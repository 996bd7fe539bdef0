"""Completion re-ranking: a gradient-boosted classifier over content-only (cart, candidate) features.

The engine's fused channels propose the top ``k`` candidates of a cart; the re-ranker orders them by
the predicted probability that the candidate completes the cart. Features come from the item text
and from category-level statistics of the training bundles only -- no item-level interaction count
-- so nothing encodes popularity, item-id order or "seen in training":

* every text channel's score of the candidate and its rank among the candidates (pretrained
  encoders, TF-IDF), the fused score, its rank and its gap to the best candidate; the pretrained
  cosine corrected for hubness (CSLS: minus both items' mean cosine to their 10 nearest items);
* category paths: depth of the shared prefix, same leaf, both depths; same brand; same first title
  word; Jaccard of title words; both title lengths;
* category transitions learned from the training bundles: how often a bundle holding an item of
  the cart's category (at depth 2, 3 and the leaf) also holds one of the candidate's, as PMI and as
  a conditional share (:class:`CategoryStats`) -- a relation between categories, which carries over
  to items no training bundle held.

For multi-item carts every pair feature is the maximum over the cart's items. The fitted trees are
saved in skops' format (``rerank.skops``, loaded with only scikit-learn types trusted) and the
statistics and settings as JSON (``rerank.json``), beside the export.

    rr = Reranker.fit(engine, queries, stats_per_query)   # queries: (cart, rest) of training bundles
    scores = rr.rerank(engine, carts, fused, raw)         # (B, N): the top k re-ordered first
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import scipy.sparse as sp

RERANK_FILE, RERANK_MODEL = "rerank.json", "rerank.skops"
DEPTHS = (2, 3, 0)  # category-transition statistics at these path depths; 0 = the whole path (leaf)
MAX_DEPTH = 6
NEIGHBOURS = 10
FEATURE_CHANNELS = ("pretrained", "lexical")
CSLS_CHANNELS = ("pretrained",)  # lexical CSLS was tried: lower validation recall (fold 1)
# fixed in code (no search): the trees' settings
TREES = {"max_iter": 200, "learning_rate": 0.05, "max_leaf_nodes": 31, "min_samples_leaf": 100,
         "l2_regularization": 1.0, "early_stopping": False, "random_state": 0}


def _path(category: str) -> list[str]:
    c = str(category or "")
    return [] if c in ("", "nan", "None", "<NA>") else [p.strip() for p in c.split(" > ") if p.strip()]


def _prefix(path: list[str], depth: int) -> str:
    return " > ".join(path if depth == 0 else path[:depth])


@dataclass
class CategoryStats:
    """Category co-occurrence in training bundles at each depth: pair counts, per-category counts."""

    pairs: dict = field(default_factory=dict)  # depth -> {"a\tb": n}
    single: dict = field(default_factory=dict)  # depth -> {a: n}

    @classmethod
    def from_groups(cls, groups: Sequence[Sequence[int]], categories: Sequence[str]) -> "CategoryStats":
        paths = [_path(c) for c in categories]
        pairs, single = {}, {}
        for d in DEPTHS:
            pc, sc = Counter(), Counter()
            for g in groups:
                cs = [_prefix(paths[i], d) for i in g]
                sc.update(cs)
                pc.update(f"{a}\t{b}" for x, a in enumerate(cs) for y, b in enumerate(cs) if x != y)
            pairs[str(d)], single[str(d)] = dict(pc), dict(sc)
        return cls(pairs, single)


class ItemText:
    """Per-item codes the pair features compare (built from the catalog text, no interactions)."""

    def __init__(self, titles: Sequence[str], categories: Sequence[str], brands: Sequence[Optional[str]]):
        paths = [_path(c) for c in categories]
        self.n = len(paths)
        self.depth = np.array([len(p) for p in paths], dtype=np.float32)
        self.prefix = np.full((self.n, MAX_DEPTH), -1, dtype=np.int64)  # code of the prefix of each depth
        vocab: dict = {}
        for i, p in enumerate(paths):
            for d in range(min(len(p), MAX_DEPTH)):
                self.prefix[i, d] = vocab.setdefault(" > ".join(p[:d + 1]), len(vocab))
        self.cat = {d: [_prefix(p, d) for p in paths] for d in DEPTHS}
        b = [str(x).strip().lower() if x is not None and str(x).strip() not in ("", "nan", "None", "<NA>") else ""
             for x in brands]
        bv: dict = {}
        self.brand = np.array([bv.setdefault(x, len(bv)) if x else -1 for x in b], dtype=np.int64)
        words = [re.findall(r"[a-z0-9]+", str(t).lower()) for t in titles]
        fv: dict = {}
        self.first = np.array([fv.setdefault(w[0], len(fv)) if w else -1 for w in words], dtype=np.int64)
        tv: dict = {}
        rows, cols = [], []
        for i, w in enumerate(words):
            for t in set(w):
                rows.append(i)
                cols.append(tv.setdefault(t, len(tv)))
        self.tokens = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(self.n, max(1, len(tv))))
        self.n_tokens = np.asarray(self.tokens.sum(1)).ravel().astype(np.float32)


def neighbourhood(emb: np.ndarray, k: int = NEIGHBOURS, block: int = 1024) -> np.ndarray:
    """(N,) each item's mean cosine to its ``k`` nearest other items (hubness; CSLS's r term)."""
    sparse = sp.issparse(emb)
    emb = emb.tocsr() if sparse else np.asarray(emb, dtype=np.float32)
    out = np.zeros(emb.shape[0], dtype=np.float64)
    k = min(k, emb.shape[0] - 1)
    if k < 1:
        return out
    for i in range(0, emb.shape[0], block):
        s = (emb[i:i + block] @ emb.T).toarray() if sparse else emb[i:i + block] @ emb.T
        s[np.arange(len(s)), np.arange(i, i + len(s))] = -np.inf
        out[i:i + block] = np.sort(np.partition(s, -k, axis=1)[:, -k:], axis=1).mean(1)
    return out


class _Transitions:
    """CategoryStats as lookup tables over this catalog's category codes."""

    def __init__(self, stats: CategoryStats, text: ItemText, shrink: float = 5.0):
        self.tables = {}
        for d in DEPTHS:
            names = sorted(set(text.cat[d]))
            code = {c: k for k, c in enumerate(names)}
            item_code = np.array([code[c] for c in text.cat[d]], dtype=np.int64)
            single = np.array([stats.single.get(str(d), {}).get(c, 0) for c in names], dtype=np.float64)
            rows, cols, vals = [], [], []
            for key, n in stats.pairs.get(str(d), {}).items():
                a, b = key.split("\t")
                if a in code and b in code:
                    rows.append(code[a])
                    cols.append(code[b])
                    vals.append(n)
            m = sp.csr_matrix((np.asarray(vals, np.float64), (rows, cols)), shape=(len(names), len(names)))
            self.tables[d] = (item_code, single, m, max(single.sum(), 1.0))
        self.shrink = shrink

    def features(self, a: np.ndarray, j: np.ndarray) -> list[np.ndarray]:
        """a, j: (M,) item positions -> per depth [PMI, conditional share], each (M,)."""
        out = []
        for d in DEPTHS:
            code, single, m, total = self.tables[d]
            ca, cj = code[a], code[j]
            n = np.asarray(m[ca, cj]).ravel()
            sa, sj = single[ca] + self.shrink, single[cj] + self.shrink
            out += [np.log((n + 0.1) * total / (sa * sj)), n / sa]
        return out


FEATURES = ([f"{c}_{k}" for c in FEATURE_CHANNELS for k in ("score", "rank")]
            + [f"{c}_{k}" for c in CSLS_CHANNELS for k in ("csls", "cand_hood")]
            + ["fused", "fused_rank", "fused_gap", "shared_depth", "shared_frac", "same_leaf", "cart_depth",
               "cand_depth", "same_brand", "same_first_word", "title_jaccard", "cart_words", "cand_words"]
            + [f"cat{d or 'leaf'}_{k}" for d in DEPTHS for k in ("pmi", "share")])


class Reranker:
    def __init__(self, model, stats: CategoryStats, k: int = 100, info: Optional[dict] = None):
        self.model, self.stats, self.k, self.info = model, stats, k, info or {}
        self._cache: dict = {}

    def _prepared(self, engine) -> tuple[ItemText, _Transitions, np.ndarray]:
        key = id(engine.item_ids)
        if key not in self._cache:
            text = ItemText(engine.titles, engine.categories, engine.brands)
            self._cache = {key: (text, _Transitions(self.stats, text),
                                 {ch: neighbourhood(engine.pretrained) for ch in CSLS_CHANNELS})}
        return self._cache[key]

    def candidates(self, fused: np.ndarray) -> np.ndarray:
        """(B, k) best candidates of the fused scores, best first."""
        k = min(self.k, fused.shape[1])
        part = np.argpartition(-fused, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(fused, part, 1), axis=1, kind="stable")
        return np.take_along_axis(part, order, 1)

    def features(self, engine, carts: Sequence[Sequence[int]], cand: np.ndarray, fused: np.ndarray,
                 raw: dict) -> np.ndarray:
        """(B * k, len(FEATURES)) features of each cart's candidates."""
        text, trans, hood = self._prepared(engine)
        B, K = cand.shape
        cols = []
        for ch in FEATURE_CHANNELS:
            s = np.take_along_axis(raw[ch], cand, 1)
            cols += [s, np.argsort(np.argsort(-s, 1, kind="stable"), 1).astype(np.float64)]
        for ch in CSLS_CHANNELS:  # CSLS: the cosine corrected for both items' neighbourhoods
            s = np.take_along_axis(raw[ch], cand, 1)
            ra = np.array([hood[ch][list(c)].mean() for c in carts])[:, None]
            cols += [2 * s - ra - hood[ch][cand], hood[ch][cand]]
        f = np.take_along_axis(fused, cand, 1)
        cols += [f, np.broadcast_to(np.arange(K, dtype=np.float64), (B, K)), f - f[:, :1]]
        # pair features: max over the cart's items
        shared = np.zeros((B, K))
        same_leaf, cart_depth, brand, first, jac, cart_words = (np.zeros((B, K)) for _ in range(6))
        trans_cols = [np.full((B, K), -np.inf) for _ in range(2 * len(DEPTHS))]
        inter_all = [(text.tokens[list(c)] @ text.tokens.T).tocsr() for c in carts]
        for b, c in enumerate(carts):
            j = cand[b]
            for r, a in enumerate(c):
                pa, pj = text.prefix[a], text.prefix[j]
                eq = (pa[None, :] == pj) & (pa[None, :] >= 0)
                depth_shared = np.cumprod(eq, axis=1).sum(1)
                shared[b] = np.maximum(shared[b], depth_shared)
                same_leaf[b] = np.maximum(same_leaf[b], (depth_shared == text.depth[a]) & (depth_shared == text.depth[j])
                                          & (text.depth[a] > 0))
                cart_depth[b] = np.maximum(cart_depth[b], text.depth[a])
                brand[b] = np.maximum(brand[b], (text.brand[a] == text.brand[j]) & (text.brand[a] >= 0))
                first[b] = np.maximum(first[b], (text.first[a] == text.first[j]) & (text.first[a] >= 0))
                inter = inter_all[b][r].toarray().ravel()[j]
                jac[b] = np.maximum(jac[b], inter / np.maximum(text.n_tokens[a] + text.n_tokens[j] - inter, 1.0))
                cart_words[b] = np.maximum(cart_words[b], text.n_tokens[a])
                for x, v in enumerate(trans.features(np.full(K, a), j)):
                    trans_cols[x][b] = np.maximum(trans_cols[x][b], v)
        cand_depth = text.depth[cand]
        frac = shared / np.maximum(np.maximum(cart_depth, cand_depth), 1.0)
        cols += [shared, frac, same_leaf, cart_depth, cand_depth, brand, first, jac, cart_words, text.n_tokens[cand]]
        cols += trans_cols
        return np.stack([np.asarray(x, dtype=np.float32).reshape(B, K) for x in cols], axis=-1).reshape(B * K, -1)

    def rerank(self, engine, carts: Sequence[Sequence[int]], fused: np.ndarray, raw: dict) -> np.ndarray:
        """(B, N) scores: the top k by predicted probability (in [1e3, 1e3 + 1]) above the rest's fused scores."""
        cand = self.candidates(fused)
        p = self.model.predict_proba(self.features(engine, carts, cand, fused, raw))[:, 1].reshape(cand.shape)
        p = np.where(np.isfinite(np.take_along_axis(fused, cand, 1)), p + 1e3, -np.inf)
        out = fused.copy()
        np.put_along_axis(out, cand, p, 1)
        return out

    # ---------------------------------------------------------------- fit
    @classmethod
    def fit(cls, engine, folds: Sequence[tuple[list, CategoryStats]], stats: CategoryStats, k: int = 100,
            batch: int = 256) -> "Reranker":
        """``folds``: [(queries, the category statistics of the *other* folds' bundles)] -- out-of-fold,
        so a training row's transition features never count its own bundle; ``stats``: from all
        training bundles (what is saved and served). Rows: each query's top-``k`` fused candidates,
        label 1 where the candidate is in the query's rest."""
        from sklearn.ensemble import HistGradientBoostingClassifier

        X, y = [], []
        for queries, st in folds:
            rr = cls(None, st, k)
            for i in range(0, len(queries), batch):
                chunk = queries[i:i + batch]
                carts = [q[0] for q in chunk]
                fused, raw = engine.fused_scores(carts, extra=FEATURE_CHANNELS)
                cand = rr.candidates(fused)
                X.append(rr.features(engine, carts, cand, fused, raw))
                y.append(np.concatenate([np.isin(c, q[1]) for c, q in zip(cand, chunk)]))
        X, y = np.concatenate(X), np.concatenate(y).astype(np.int8)
        if y.sum() == 0 or y.sum() == len(y):
            raise ValueError("re-ranker training rows have a single class: too few training bundles")
        model = HistGradientBoostingClassifier(**TREES).fit(X, y)
        info = {"rows": int(len(y)), "positives": int(y.sum()), "queries": int(sum(len(q) for q, _ in folds)),
                "k": k, "features": FEATURES, "trees": TREES}
        return cls(model, stats, k, info)

    # ---------------------------------------------------------------- safe persistence
    def save(self, export_dir: str) -> None:
        import skops.io as sio

        sio.dump(self.model, os.path.join(export_dir, RERANK_MODEL))
        with open(os.path.join(export_dir, RERANK_FILE), "w") as f:
            json.dump({"k": self.k, "features": FEATURES, "info": self.info,
                       "stats": {"pairs": self.stats.pairs, "single": self.stats.single}}, f)

    @classmethod
    def load(cls, export_dir: str) -> "Reranker | None":
        path = os.path.join(export_dir, RERANK_FILE)
        if not os.path.exists(path):
            return None
        import skops.io as sio

        meta = json.load(open(path))
        if meta["features"] != FEATURES:
            raise ValueError(f"{path}: saved with features {meta['features']}, this code computes {FEATURES}")
        mpath = os.path.join(export_dir, RERANK_MODEL)
        untrusted = sio.get_untrusted_types(file=mpath)
        foreign = [t for t in untrusted if not t.startswith("sklearn.")]
        if foreign:
            raise ValueError(f"{mpath} holds types outside scikit-learn: {foreign}")
        model = sio.load(mpath, trusted=untrusted)
        return cls(model, CategoryStats(meta["stats"]["pairs"], meta["stats"]["single"]), int(meta["k"]), meta["info"])
