"""Bundle features for the pricing model: what the bundle holds (size, list price, price
concentration, add-on share, name words, genres) and its context among earlier bundles (item
overlap, the seller's bundles)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

ADDON = re.compile(r"soundtrack|\bost\b|\bdlc\b|season pass|expansion|\bpack\b|costume|skin|artbook|upgrade", re.I)

NAME_WORDS = ("complete", "collection", "franchise", "pack", "deluxe", "soundtrack", "dlc", "season", "anthology",
              "trilogy", "edition", "bundle", "indie", "gold")

GENRES = ("Indie", "Action", "Adventure", "Casual", "Strategy", "RPG", "Simulation", "Free to Play", "Early Access")

BUNDLE_FEATURES = ("log_n", "log_list", "max_share", "log_mean_price", "cheap_share", "n_genres", "price_spread",
                   "min_max_ratio", *(f"name_{w}" for w in NAME_WORDS), "soundtrack_share", "addon_share",
                   "expansion_share", *(f"genre_{g}" for g in GENRES))

# from earlier bundles (PricingContext): item overlap and the seller (publisher / developer)
CONTEXT_FEATURES = ("overlap_max_jaccard", "overlap_nearest_discount", "overlap_weighted_discount", "has_overlap",
                    "publisher_share", "publisher_mean_discount", "publisher_bundles",
                    "developer_share", "developer_mean_discount", "developer_bundles")

FEATURES = (*BUNDLE_FEATURES, *CONTEXT_FEATURES)

SELLER_KEYS = ("publisher", "developer")


def bundle_features(item_prices: Sequence[float], item_names: Optional[Sequence[str]] = None,
                    item_genres: Optional[Sequence[str]] = None, bundle_name: str = "") -> np.ndarray:
    """Feature vector of one bundle's own contents (BUNDLE_FEATURES): size, prices, name words,
    add-on share, genres."""
    p = np.asarray(item_prices, dtype=float)
    p = p[np.isfinite(p) & (p >= 0)]
    n = max(len(p), 1)
    L = float(p.sum()) if len(p) else 0.0
    names = [str(x).lower() for x in (item_names or [])]
    share = lambda pat: sum(bool(re.search(pat, x)) for x in names) / max(len(names), 1)  # noqa: E731
    genres = {g.strip() for s in (item_genres or []) for g in str(s).split(",") if g.strip() and s == s}
    bn = str(bundle_name or "").lower()
    f = [math.log(n), math.log1p(L), (p.max() / L) if L > 0 else 1.0, math.log1p(p.mean()) if len(p) else 0.0,
         float((p < 1).mean()) if len(p) else 0.0, float(len(genres)), float(np.std(np.log1p(p))) if len(p) else 0.0,
         float(p.min() / max(p.max(), 1e-9)) if len(p) else 1.0]
    f += [float(w in bn) for w in NAME_WORDS]
    f += [share("soundtrack"), share(r"dlc|pack|costume|skin"), share("season pass|expansion")]
    f += [float(g in genres) for g in GENRES]
    return np.asarray(f, dtype=float)


@dataclass
class PricingContext:
    """Earlier bundles a new one is compared with: their item sets, discounts and sellers.

    ``features(item_ids)`` (CONTEXT_FEATURES): the largest Jaccard overlap with an earlier bundle, that
    bundle's discount, the Jaccard-weighted mean discount of all overlapping ones, whether any
    overlaps; for the dominant publisher and developer of the items (``sellers``: item id ->
    {"publisher", "developer"}): their share of the items, the mean discount of earlier bundles
    dominated by the same seller and how many there are. Without overlap or seller the fallbacks are
    the median earlier discount and zeros. ``exclude`` leaves one earlier bundle out (a training row's
    own features are computed leave-one-out)."""

    item_sets: list
    discounts: list
    sellers: dict

    def __post_init__(self):
        self._sets = [set(map(str, x)) for x in self.item_sets]
        self._d = np.asarray(self.discounts, dtype=float)
        self._dom = [{k: self.dominant(s_, k) for k in SELLER_KEYS} for s_ in self._sets]
        # inverted indexes: a bundle is compared only with the earlier ones it shares an item or a
        # seller with (the others add nothing), in index order, so the sums are the full scan's
        self._sizes = np.array([len(t) for t in self._sets], dtype=np.int64)
        self._by_item: dict = {}
        for k, t in enumerate(self._sets):
            for i in t:
                self._by_item.setdefault(i, []).append(k)
        self._by_seller = {key: {} for key in SELLER_KEYS}
        for k, o in enumerate(self._dom):
            for key in SELLER_KEYS:
                if o[key][0] is not None:
                    self._by_seller[key].setdefault(o[key][0], []).append(k)
        self._median = float(np.median(self._d)) if len(self._d) else 0.2

    def dominant(self, items, key: str) -> tuple[Optional[str], float]:
        vals = [self.sellers[i][key] for i in items if self.sellers.get(i, {}).get(key)]
        if not vals:
            return None, 0.0
        top = max(set(vals), key=lambda v: (vals.count(v), v))
        return top, vals.count(top) / max(len(items), 1)

    def features(self, item_ids: Optional[Sequence] = None, exclude: Optional[int] = None) -> np.ndarray:
        s_ = set(map(str, item_ids or []))
        if exclude is None:
            med = self._median
        else:
            rest = np.delete(self._d, exclude)
            med = float(np.median(rest)) if len(rest) else 0.2
        shared: dict = {}
        for i in s_:
            for k in self._by_item.get(i, ()):
                if k != exclude:
                    shared[k] = shared.get(k, 0) + 1
        f = [0.0, med, med, 0.0]
        if shared:
            idx = np.array(sorted(shared), dtype=np.int64)
            common = np.array([shared[k] for k in idx], dtype=np.int64)
            jac = common / (len(s_) + self._sizes[idx] - common)  # |s & t| / |s | t|
            d = self._d[idx]
            f = [float(jac.max()), float(d[int(jac.argmax())]), float((jac * d).sum() / jac.sum()), 1.0]
        for key in SELLER_KEYS:
            seller, share = self.dominant(s_, key)
            same = [self._d[k] for k in self._by_seller[key].get(seller, ()) if k != exclude] if seller is not None else []
            f += [share, float(np.mean(same)) if same else med, float(len(same))]
        return np.asarray(f, dtype=float)

    def to_json(self) -> dict:
        used = {i for x in self._sets for i in x}
        return {"item_sets": [sorted(x) for x in self._sets], "discounts": self._d.tolist(),
                "sellers": {i: v for i, v in self.sellers.items() if i in used}}


def design(X: np.ndarray, sets: list, discounts: np.ndarray, sellers: dict, train: np.ndarray,
           rows: np.ndarray) -> tuple[PricingContext, np.ndarray]:
    """The context of the ``train`` bundles and the full feature matrix of ``rows`` (a row that is
    itself a training bundle sees the others only: leave-one-out)."""
    ctx = PricingContext([sets[i] for i in train], discounts[train].tolist(), sellers)
    pos = {int(i): k for k, i in enumerate(train)}
    C = np.stack([ctx.features(sets[i], exclude=pos.get(int(i))) for i in rows])
    return ctx, np.hstack([X[rows], C])


def overlap_components(sets: list) -> np.ndarray:
    """Connected components of bundles linked by a shared item (for the grouped cross-validation)."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    idx = {x: k for k, x in enumerate({x for s_ in sets for x in s_})}
    rows = np.repeat(np.arange(len(sets)), [len(s_) for s_ in sets])
    cols = np.array([idx[x] for s_ in sets for x in s_])
    inc = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(sets), len(idx)))
    return connected_components(inc @ inc.T, directed=False)[1]
