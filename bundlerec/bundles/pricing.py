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
FEATURES = ("log_n", "log_list", "max_share", "log_mean_price", "cheap_share", "n_genres", "price_spread",
            "min_max_ratio", *(f"name_{w}" for w in NAME_WORDS), "soundtrack_share", "addon_share",
            "expansion_share", *(f"genre_{g}" for g in GENRES))


def bundle_features(item_prices: Sequence[float], item_names: Optional[Sequence[str]] = None,
                    item_genres: Optional[Sequence[str]] = None, bundle_name: str = "") -> np.ndarray:
    """Feature vector of one bundle (see FEATURES): size, prices, name words, add-on share, genres."""
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
class PricingModel:
    s: float = 0.3
    """Logistic scale of willingness to pay (an assumption; see module docstring)."""
    seed: int = 0
    regressor: object = None
    """mu(x) learner: gradient-boosted trees with absolute-error loss (the metric we report)."""
    default_discount: float = 0.2
    """Revenue-optimal discount assumed before fitting (the median Steam bundle discount)."""

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
        return model, {"source": "fitted", **{k: v for k, v in meta.items() if k != "features"}}

    def offset(self) -> float:
        """s * logit(1 - s): how far below mean WTP the revenue-optimal price sits."""
        return self.s * math.log((1 - self.s) / self.s)

    # ---------------------------------------------------------------- demand and prices
    def mu(self, x: np.ndarray) -> float:
        """Location of log(WTP / list price) implied by the fitted optimal discount."""
        d = float(self.predict_discount(x[None, :])[0])
        return math.log(max(1.0 - d, 1e-6)) + self.offset()

    def purchase_probability(self, price: float, list_price: float, x: np.ndarray) -> float:
        z = (self.mu(x) - math.log(max(price, 1e-9) / list_price)) / self.s
        return 1.0 / (1.0 + math.exp(-z))

    def predict_discount(self, X: np.ndarray) -> np.ndarray:
        """Unconstrained revenue-optimal discount for each row of X."""
        if self.regressor is None:
            return np.full(len(X), self.default_discount)
        return np.clip(self.regressor.predict(X), 0.0, 0.95)

    def price(self, item_prices: Sequence[float], item_names: Optional[Sequence[str]] = None,
              item_genres: Optional[Sequence[str]] = None, bundle_name: str = "", costs: Optional[Sequence[float]] = None, max_discount: float = 0.6, min_margin: float = 0.0,
              price_ending: Optional[float] = None, grid: int = 400) -> dict:
        """Revenue- (or margin-, when costs are given) maximizing bundle price under constraints."""
        prices = np.asarray(item_prices, dtype=float)
        L = float(prices.sum())
        if L <= 0:
            raise ValueError("bundle list price must be positive")
        x = bundle_features(prices, item_names, item_genres, bundle_name)
        cost = float(np.sum(costs)) if costs is not None else 0.0
        lo = max(L * (1 - max_discount), cost * (1 + min_margin))
        if lo > L:
            raise ValueError(f"no feasible price: minimum margin needs {lo:.2f} > list price {L:.2f}")
        cand = np.linspace(lo, L, grid)
        if price_ending is not None:  # e.g. 0.99 -> x.99 prices inside [lo, L]
            cand = np.unique(np.floor(cand - price_ending) + price_ending)
            cand = cand[(cand >= lo - 1e-9) & (cand <= L + 1e-9)]
            if len(cand) == 0:
                raise ValueError(f"no price ending in {price_ending} within [{lo:.2f}, {L:.2f}]")
        prob = np.array([self.purchase_probability(p, L, x) for p in cand])
        objective = (cand - cost) * prob
        best = int(np.argmax(objective))
        p_star = float(cand[best])
        # selling separately: each item alone (n = 1 features) at its own list price
        # selling separately: each item alone at its own list price, under the same model (n = 1)
        names = list(item_names or [""] * len(prices))
        sep = sum(float(pi) * self.purchase_probability(float(pi), float(pi), bundle_features([pi], [nm]))
                  for pi, nm in zip(prices, names) if pi > 0)
        return {"list_price": round(L, 2), "bundle_price": round(p_star, 2), "discount": round(1 - p_star / L, 4),
                "purchase_probability": float(prob[best]), "expected_revenue": float(p_star * prob[best]),
                "expected_margin": float(objective[best]) if costs is not None else None,
                "expected_revenue_separately": float(sep),
                "revenue_lift_vs_separate": float(p_star * prob[best] / sep - 1) if sep > 0 else None}


# -------------------------------------------------------------------- Steam bundles

def load_steam(data_dir: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Bundles with features from ``bundles.csv.gz`` + ``bundle_items.csv.gz``; returns (bundles, X)."""
    b = pd.read_csv(f"{data_dir}/bundles.csv.gz")
    it = pd.read_csv(f"{data_dir}/bundle_items.csv.gz")
    groups = {k: g for k, g in it.groupby("bundle_id")}
    b = b[b.bundle_id.isin(groups) & (b.bundle_price_usd > 0)].reset_index(drop=True)
    X = np.stack([bundle_features(groups[i].item_price_usd.fillna(0).to_numpy(), groups[i].item_name.astype(str).tolist(),
                                  groups[i].genre.fillna("").astype(str).tolist(), name)
                  for i, name in zip(b.bundle_id, b.bundle_name)])
    return b, X


def fit_steam(data_dir: str, s: float = 0.3, seed: int = 0, folds: int = 5) -> tuple[PricingModel, dict]:
    """The pricing model fitted on every Steam bundle of ``data_dir``, with its fit metadata
    (data, date, bundles, cross-validated discount MAE against the median baseline)."""
    import datetime

    if not os.path.exists(os.path.join(data_dir, "bundles.csv.gz")):
        raise FileNotFoundError(f"pricing.data_dir={data_dir!r} has no bundles.csv.gz (the steam_bundles format); "
                                f"point it at ../shared/data/steam_bundles or set pricing.data_dir=null")
    cv = evaluate_pricing(data_dir, folds=folds, seed=seed, s=s)
    b, X = load_steam(data_dir)
    model = PricingModel(s=s, seed=seed).fit(X, b.bundle_discount.to_numpy(dtype=float))
    meta = {"data_dir": os.path.abspath(data_dir), "fitted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "n_bundles": int(len(b)), "cv_folds": folds, "cv_discount_mae": cv["discount_mae"]["bundlerec"],
            "cv_discount_mae_median_baseline": cv["discount_mae"]["median"]}
    return model, meta


def attach_to_export(export_dir: str, data_dir: Optional[str], s: float = 0.3) -> dict:
    """Fit on ``data_dir`` and save into the serving export (what every served price then comes
    from); with no ``data_dir`` the export keeps no model and serving says price_source "default"."""
    if not data_dir:
        return {"source": "default"}
    model, meta = fit_steam(data_dir, s=s)
    model.save(export_dir, meta)
    return {"source": "fitted", **meta}


def evaluate_pricing(data_dir: str, folds: int = 5, seed: int = 0, s: float = 0.3) -> dict:
    """K-fold out-of-sample discount MAE and final-price MAPE: bundlerec vs median and median-by-size."""
    b, X = load_steam(data_dir)
    d = b.bundle_discount.to_numpy(dtype=float)
    L = b.bundle_price_usd.to_numpy(dtype=float)
    final = b.bundle_final_price_usd.to_numpy(dtype=float)
    size = np.minimum(b.n_items.to_numpy(), 7)  # sizes >= 7 share one bucket
    rng = np.random.default_rng(seed)
    fold = rng.permutation(len(b)) % folds
    pred = {"bundlerec": np.zeros(len(b)), "median": np.zeros(len(b)), "median_by_size": np.zeros(len(b))}
    for f in range(folds):
        tr, te = fold != f, fold == f
        pred["bundlerec"][te] = PricingModel(s=s).fit(X[tr], d[tr]).predict_discount(X[te])
        med = float(np.median(d[tr]))
        pred["median"][te] = med
        by = pd.Series(d[tr]).groupby(size[tr]).median()
        pred["median_by_size"][te] = [by.get(k, med) for k in size[te]]
    out = {"discount_mae": {}, "final_price_mape": {}, "n_bundles": int(len(b)), "folds": folds, "s": s}
    for name, p in pred.items():
        out["discount_mae"][name] = float(np.mean(np.abs(p - d)))
        out["final_price_mape"][name] = float(np.mean(np.abs(L * (1 - p) - final) / final))
    full = PricingModel(s=s).fit(X, d)
    out["feature_importance"] = dict(sorted(zip(FEATURES, map(float, full.regressor.feature_importances_)),
                                            key=lambda kv: -kv[1])[:8])
    return out
