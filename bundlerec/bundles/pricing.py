"""Bundle pricing: a purchase-probability model fitted from data, and a revenue-maximizing price.

Model (documented with its assumptions in docs/pricing.md). A shopper's willingness to pay for a
bundle with list price L (sum of item prices) is ``W = L * exp(mu + eps)``, ``eps ~ Logistic(0, s)``,
with ``mu = theta . x`` linear in bundle features x (size, list price, price concentration, add-on
share such as soundtracks/DLC). The purchase probability at price p is therefore

    P(buy | p) = sigmoid((mu - log(p / L)) / s)

and expected revenue ``p * P(buy | p)`` is maximised at ``log(p*/L) = mu - s * logit(1 - s)``
(s < 1), where P(buy) = 1 - s. Without purchase logs, theta is fitted by *inverse optimisation*:
assuming the observed (seller-chosen) bundle prices are revenue-optimal, the observed log price
ratio is regressed on x (ridge). ``s`` is not identifiable from prices alone; it is an assumption
(default 0.3) that sets the purchase probabilities and revenue figures, not the fitted prices.

Prices are chosen on a grid under constraints (maximum discount, minimum margin over cost,
optional price endings such as .99), so constraints hold exactly.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd

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


@dataclass(frozen=True)
class PriceLimits:
    """A shop's constraints on a bundle price (request knobs; one definition of their defaults)."""

    max_discount: float = 0.6
    """At most this share off the list price."""
    min_margin: float = 0.0
    """The price is at least the items' summed catalog ``cost`` times (1 + min_margin)."""
    price_ending: Optional[float] = None
    """Cents every price ends in, e.g. 0.99."""


class NoFeasiblePrice(ValueError):
    """No price in whole cents meets the limits (e.g. the minimum margin is above the list price)."""


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


@dataclass
class PricingModel:
    s: float = 0.3
    """Logistic scale of willingness to pay (an assumption; see module docstring)."""
    seed: int = 0
    regressor: object = None
    """mu(x) learner: gradient-boosted trees with absolute-error loss (the metric we report)."""
    default_discount: float = 0.2
    """Revenue-optimal discount assumed before fitting (the median Steam bundle discount)."""
    context: Optional[PricingContext] = None
    """Earlier bundles for the overlap/seller features (empty context: their fallbacks)."""

    def features(self, item_prices, item_names=None, item_genres=None, bundle_name: str = "",
                 item_ids: Optional[Sequence] = None) -> np.ndarray:
        ctx = self.context or PricingContext([], [], {})
        return np.concatenate([bundle_features(item_prices, item_names, item_genres, bundle_name), ctx.features(item_ids)])

    # ---------------------------------------------------------------- fitting
    def fit(self, X: np.ndarray, discount: np.ndarray) -> "PricingModel":
        """Inverse optimisation: learn the revenue-optimal discount (hence mu) from observed prices."""
        from sklearn.ensemble import GradientBoostingRegressor

        self.regressor = GradientBoostingRegressor(loss="absolute_error", n_estimators=200, max_depth=3,
                                                   learning_rate=0.05, subsample=0.8, random_state=self.seed)
        self.regressor.fit(X, np.clip(np.asarray(discount, dtype=float), 0.0, 0.95))
        return self

    # ---------------------------------------------------------------- persistence (no pickle)
    def save(self, out_dir: str, meta: dict) -> None:
        """``pricing.json`` (parameters + fit metadata) and ``pricing.skops`` (the fitted trees in
        skops' format, which loads without executing code)."""
        import json
        import os

        import skops.io as sio

        if self.regressor is None:
            raise ValueError("only a fitted pricing model is saved (the unfitted default needs no file)")
        os.makedirs(out_dir, exist_ok=True)
        sio.dump(self.regressor, os.path.join(out_dir, "pricing.skops"))
        with open(os.path.join(out_dir, "pricing.json"), "w") as f:
            json.dump({"s": self.s, "seed": self.seed, "features": list(FEATURES), **meta}, f, indent=2)
        with open(os.path.join(out_dir, "pricing_context.json"), "w") as f:
            json.dump((self.context or PricingContext([], [], {})).to_json(), f)

    @classmethod
    def load(cls, export_dir: str) -> tuple["PricingModel", dict]:
        """The fitted model of an export and its metadata; ``(PricingModel(), {"source": "default"})``
        when the export has none. Only scikit-learn types are accepted from the file."""
        import json
        import os

        import skops.io as sio

        meta_path = os.path.join(export_dir, "pricing.json")
        if not os.path.exists(meta_path):
            return cls(), {"source": "default", "note": f"no fitted pricing model: a fixed {cls.default_discount:.0%} "
                                                        f"optimal discount is assumed (set pricing.data_dir)"}
        meta = json.load(open(meta_path))
        if list(meta.get("features", [])) != list(FEATURES):
            raise ValueError(f"{meta_path}: fitted on other features than this code computes; refit the pricing model")
        path = os.path.join(export_dir, "pricing.skops")
        untrusted = sio.get_untrusted_types(file=path)
        foreign = [t for t in untrusted if not t.startswith("sklearn.")]
        if foreign:
            raise ValueError(f"{path} holds types that are not scikit-learn's: {foreign}; refusing to load it")
        model = cls(s=float(meta["s"]), seed=int(meta.get("seed", 0)))
        model.regressor = sio.load(path, trusted=untrusted)
        ctx_path = os.path.join(export_dir, "pricing_context.json")
        if os.path.exists(ctx_path):
            model.context = PricingContext(**json.load(open(ctx_path)))
        return model, {"source": "fitted", **{k: v for k, v in meta.items() if k != "features"}}

    def offset(self) -> float:
        """s * logit(1 - s): how far below mean WTP the revenue-optimal price sits."""
        return self.s * math.log((1 - self.s) / self.s)

    # ---------------------------------------------------------------- demand and prices
    def mu(self, X: np.ndarray) -> np.ndarray:
        """Location of log(WTP / list price) implied by the fitted optimal discount, for each row of
        ``X`` (one model call for all rows: it does not depend on the price asked)."""
        d = self.predict_discount(np.atleast_2d(X))
        return np.log(np.maximum(1.0 - d, 1e-6)) + self.offset()

    def purchase_probability(self, price, list_price, x: Optional[np.ndarray] = None, mu=None):
        """P(buy) at ``price`` (scalar or array, against ``list_price``) for a bundle with features
        ``x``, or with its location ``mu`` already computed (:meth:`mu`)."""
        m = self.mu(x)[0] if mu is None else mu
        z = (m - np.log(np.maximum(np.asarray(price, dtype=float), 1e-9) / np.asarray(list_price, dtype=float))) / self.s
        p = 1.0 / (1.0 + np.exp(-z))
        return float(p) if np.ndim(p) == 0 else p

    def predict_discount(self, X: np.ndarray) -> np.ndarray:
        """Unconstrained revenue-optimal discount for each row of X."""
        if self.regressor is None:
            return np.full(len(X), self.default_discount)
        return np.clip(self.regressor.predict(X), 0.0, 0.95)

    def price(self, item_prices: Sequence[float], item_names: Optional[Sequence[str]] = None,
              item_genres: Optional[Sequence[str]] = None, bundle_name: str = "", costs: Optional[Sequence[float]] = None,
              max_discount: float = PriceLimits.max_discount, min_margin: float = PriceLimits.min_margin,
              price_ending: Optional[float] = PriceLimits.price_ending, grid: int = 400,
              item_ids: Optional[Sequence] = None) -> dict:
        """Revenue- (or margin-, when costs are given) maximizing bundle price under constraints, in
        whole cents, each constraint met exactly: ``bundle_price >= list * (1 - max_discount)``,
        ``bundle_price >= sum(costs) * (1 + min_margin)``, ``bundle_price <= list``, and with
        ``price_ending`` (e.g. 0.99) the cents are that ending. Raises :class:`NoFeasiblePrice` when
        no price meets them."""
        out = self.price_many([dict(item_prices=item_prices, item_names=item_names, item_genres=item_genres,
                                    bundle_name=bundle_name, costs=costs, item_ids=item_ids)],
                              max_discount=max_discount, min_margin=min_margin, price_ending=price_ending, grid=grid)[0]
        if isinstance(out, NoFeasiblePrice):
            raise out
        return out

    def price_many(self, bundles: Sequence[dict], max_discount: float = PriceLimits.max_discount,
                   min_margin: float = PriceLimits.min_margin, price_ending: Optional[float] = PriceLimits.price_ending,
                   grid: int = 400) -> list:
        """:meth:`price` for several bundles (dicts of its per-bundle arguments: ``item_prices`` and
        optionally ``item_names``, ``item_genres``, ``bundle_name``, ``costs``, ``item_ids``) with one
        model call for all of them and their items sold alone; each entry is the price dict, or the
        :class:`NoFeasiblePrice` of that bundle."""
        if not 0 <= max_discount <= 1 or min_margin < 0:
            raise ValueError("max_discount must be in [0, 1] and min_margin >= 0")
        end = None if price_ending is None else int(round(price_ending * 100))
        if end is not None and not 0 <= end < 100:
            raise ValueError("price_ending must be in [0, 1)")
        rows, plans = [], []
        for b in bundles:
            prices = np.asarray(b["item_prices"], dtype=float)
            L = float(prices.sum())
            if not np.isfinite(L) or L <= 0:
                raise ValueError("bundle list price must be positive")
            names, ids = b.get("item_names"), b.get("item_ids")
            rows.append(self.features(prices, names, b.get("item_genres"), b.get("bundle_name", ""), ids))
            # selling separately: each item alone at its own list price, under the same model (n = 1)
            alone = [(float(pi), nm, i) for pi, nm, i in zip(prices, list(names or [""] * len(prices)),
                                                              list(ids or [None] * len(prices))) if pi > 0]
            rows += [self.features([pi], [nm], item_ids=[i] if i else None) for pi, nm, i in alone]
            plans.append((L, b.get("costs"), np.array([pi for pi, _, _ in alone])))
        mus = self.mu(np.stack(rows)) if rows else np.zeros(0)
        out, r = [], 0
        for L, costs, alone in plans:
            try:
                out.append(self._best_price(L, costs, mus[r], alone, mus[r + 1:r + 1 + len(alone)], max_discount,
                                            min_margin, end, grid))
            except NoFeasiblePrice as e:
                out.append(e)
            r += 1 + len(alone)
        return out

    def _best_price(self, L: float, costs, mu: float, alone: np.ndarray, mu_alone: np.ndarray, max_discount: float,
                    min_margin: float, end: Optional[int], grid: int) -> dict:
        """The best whole-cent price of one bundle (list price ``L``, location ``mu``) on the grid."""
        cost = float(np.sum(costs)) if costs is not None else 0.0
        lo = max(L * (1 - max_discount), cost * (1 + min_margin))
        cents_lo, cents_hi = math.ceil(round(lo * 100, 6)), math.floor(round(L * 100, 6))  # whole cents inside [lo, L]
        if cents_lo > cents_hi:
            raise NoFeasiblePrice(f"no price in whole cents within [{lo:.4f}, {L:.2f}] (minimum margin or maximum discount)")
        cents = np.unique(np.linspace(cents_lo, cents_hi, grid).round().astype(np.int64))
        if end is not None:  # e.g. 0.99 -> x.99 prices inside [lo, L]
            cents = np.unique((cents - end) // 100 * 100 + end)
            cents = cents[(cents >= cents_lo) & (cents <= cents_hi)]
            if len(cents) == 0:
                raise NoFeasiblePrice(f"no price ending in .{end:02d} within [{lo:.2f}, {L:.2f}]")
        cand = cents / 100.0
        prob = self.purchase_probability(cand, L, mu=mu)  # the whole grid at once: mu does not depend on the price
        objective = (cand - cost) * prob
        best = int(np.argmax(objective))
        p_star = float(cand[best])
        sep = float(np.sum(alone * self.purchase_probability(alone, alone, mu=mu_alone))) if len(alone) else 0.0
        return {"list_price": round(L, 2), "bundle_price": p_star, "discount": 1 - p_star / L,
                "purchase_probability": float(prob[best]), "expected_revenue": float(p_star * prob[best]),
                "expected_margin": float(objective[best]) if costs is not None else None,
                "expected_revenue_separately": float(sep),
                "revenue_lift_vs_separate": float(p_star * prob[best] / sep - 1) if sep > 0 else None}


# -------------------------------------------------------------------- Steam bundles

def load_steam(data_dir: str) -> tuple[pd.DataFrame, np.ndarray, list, dict]:
    """Steam bundles of ``data_dir``: (bundles, their BUNDLE_FEATURES, item-id lists, sellers of
    the items from ``games.jsonl.gz`` when present: item id -> {"publisher", "developer"})."""
    import gzip
    import json

    b = pd.read_csv(f"{data_dir}/bundles.csv.gz")
    it = pd.read_csv(f"{data_dir}/bundle_items.csv.gz")
    groups = {k: g for k, g in it.groupby("bundle_id")}
    b = b[b.bundle_id.isin(groups) & (b.bundle_price_usd > 0)].reset_index(drop=True)
    X = np.stack([bundle_features(groups[i].item_price_usd.fillna(0).to_numpy(), groups[i].item_name.astype(str).tolist(),
                                  groups[i].genre.fillna("").astype(str).tolist(), name)
                  for i, name in zip(b.bundle_id, b.bundle_name)])
    sets = [groups[i].item_id.astype(str).tolist() for i in b.bundle_id]
    used, sellers = {x for s_ in sets for x in s_}, {}
    games = f"{data_dir}/games.jsonl.gz"
    if os.path.exists(games):
        with gzip.open(games, "rt") as f:
            for line in f:
                g = json.loads(line)
                if str(g.get("id")) in used:
                    sellers[str(g["id"])] = {k: g.get(k) for k in SELLER_KEYS}
    return b, X, sets, sellers


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


def fit_steam(data_dir: str, s: float = 0.3, seed: int = 0, folds: int = 5) -> tuple[PricingModel, dict]:
    """The pricing model fitted on every Steam bundle of ``data_dir``, with its fit metadata
    (data, date, bundles, cross-validated discount MAE against the median baseline)."""
    import datetime

    if not os.path.exists(os.path.join(data_dir, "bundles.csv.gz")):
        raise FileNotFoundError(f"pricing.data_dir={data_dir!r} has no bundles.csv.gz (the steam_bundles format); "
                                f"point it at ../shared/data/steam_bundles or set pricing.data_dir=null")
    cv = evaluate_pricing(data_dir, folds=folds, seed=seed, s=s, robustness=False)
    b, X, sets, sellers = load_steam(data_dir)
    d = b.bundle_discount.to_numpy(dtype=float)
    every = np.arange(len(b))
    ctx, F = design(X, sets, d, sellers, every, every)
    model = PricingModel(s=s, seed=seed, context=ctx).fit(F, d)
    meta = {"data_dir": os.path.abspath(data_dir), "fitted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "n_bundles": int(len(b)), "cv_folds": folds, "cv_discount_mae": cv["discount_mae"]["bundlerec"],
            "cv_discount_mae_median_baseline": cv["discount_mae"]["median"]}
    return model, meta


def attach_to_export(export_dir: str, data_dir: Optional[str], s: float = 0.3) -> dict:
    """Fit on ``data_dir`` and save into the serving export (what every served price then comes
    from); with no ``data_dir`` the export keeps no model and serving says price_source "default"."""
    if not data_dir:
        return {"source": "default"}
    from bundlerec.integrity import amend

    model, meta = fit_steam(data_dir, s=s)
    with amend(export_dir, "export"):  # verified before, re-sealed after (bundlerec.integrity)
        model.save(export_dir, meta)
    return {"source": "fitted", **meta}


def _cv(X, sets, sellers, d, size, fold: np.ndarray, s: float, context: bool = True) -> dict:
    """Out-of-fold discount predictions of bundlerec (with or without the context features) and the
    median and median-by-size baselines (computed on the training folds)."""
    n = len(d)
    pred = {"bundlerec": np.zeros(n), "median": np.zeros(n), "median_by_size": np.zeros(n)}
    for f in np.unique(fold):
        tr, te = np.where(fold != f)[0], np.where(fold == f)[0]
        if context:
            _, Ftr = design(X, sets, d, sellers, tr, tr)
            _, Fte = design(X, sets, d, sellers, tr, te)
        else:
            Ftr, Fte = X[tr], X[te]
        pred["bundlerec"][te] = PricingModel(s=s).fit(Ftr, d[tr]).predict_discount(Fte)
        med = float(np.median(d[tr]))
        pred["median"][te] = med
        by = pd.Series(d[tr]).groupby(size[tr]).median()
        pred["median_by_size"][te] = [by.get(k, med) for k in size[te]]
    return pred


def evaluate_pricing(data_dir: str, folds: int = 5, seed: int = 0, s: float = 0.3, robustness: bool = True,
                     plot_path: Optional[str] = None) -> dict:
    """K-fold out-of-sample discount MAE and final-price MAPE: bundlerec vs median and median-by-size.

    ``robustness``: also the MAE ratio to the median for 5 fold seeds, a cross-validation whose folds
    are whole overlap components (no test bundle shares an item with a training bundle), the subset
    of bundles that share no item with any other, and the model without the context features."""
    b, X, sets, sellers = load_steam(data_dir)
    d = b.bundle_discount.to_numpy(dtype=float)
    L = b.bundle_price_usd.to_numpy(dtype=float)
    final = b.bundle_final_price_usd.to_numpy(dtype=float)
    size = np.minimum(b.n_items.to_numpy(), 7)  # sizes >= 7 share one bucket
    random_folds = lambda sd: np.random.default_rng(sd).permutation(len(b)) % folds  # noqa: E731
    pred = _cv(X, sets, sellers, d, size, random_folds(seed), s)
    out = {"discount_mae": {}, "final_price_mape": {}, "n_bundles": int(len(b)), "folds": folds, "s": s, "seed": seed,
           "sellers_known": int(len(sellers))}
    for name, p in pred.items():
        out["discount_mae"][name] = float(np.mean(np.abs(p - d)))
        out["final_price_mape"][name] = float(np.mean(np.abs(L * (1 - p) - final) / final))
    out["mae_ratio_to_median"] = out["discount_mae"]["bundlerec"] / out["discount_mae"]["median"]
    if plot_path:
        from bundlerec.eval.plots import plot_pricing

        out["plot"] = plot_pricing(d, pred, plot_path)
    every = np.arange(len(b))
    ctx, F = design(X, sets, d, sellers, every, every)
    full = PricingModel(s=s).fit(F, d)
    out["feature_importance"] = dict(sorted(zip(FEATURES, map(float, full.regressor.feature_importances_)),
                                            key=lambda kv: -kv[1])[:8])
    if not robustness:
        return out
    mae = lambda p: float(np.mean(np.abs(p - d)))  # noqa: E731
    ratios = {}
    for sd in range(5):
        pr = pred if sd == seed else _cv(X, sets, sellers, d, size, random_folds(sd), s)
        ratios[sd] = mae(pr["bundlerec"]) / mae(pr["median"])
    comp = overlap_components(sets)
    grouped = _cv(X, sets, sellers, d, size, np.random.default_rng(seed).permutation(comp.max() + 1)[comp] % folds, s)
    no_ctx = _cv(X, sets, sellers, d, size, random_folds(seed), s, context=False)
    alone = np.bincount(comp)[comp] == 1
    out["robustness"] = {
        "mae_ratio_by_fold_seed": ratios, "mae_ratio_mean_over_seeds": float(np.mean(list(ratios.values()))),
        "grouped_by_overlap_component": {"bundlerec": mae(grouped["bundlerec"]), "median": mae(grouped["median"]),
                                         "ratio": mae(grouped["bundlerec"]) / mae(grouped["median"]),
                                         "components": int(comp.max() + 1)},
        "no_overlap_subset": {"bundles": int(alone.sum()), "bundlerec": float(np.mean(np.abs(pred["bundlerec"] - d)[alone])),
                              "median": float(np.mean(np.abs(pred["median"] - d)[alone]))},
        "without_context_features": {"bundlerec": mae(no_ctx["bundlerec"]), "ratio": mae(no_ctx["bundlerec"]) / mae(no_ctx["median"])},
    }
    return out
