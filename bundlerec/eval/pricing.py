"""Cross-validated pricing: out-of-fold discounts of the fitted model against the median and
median-by-size baselines, with robustness checks (fold seeds, overlap-grouped folds, no context)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd

from bundlerec.pricing.demand import PricingModel
from bundlerec.pricing.features import FEATURES, design, overlap_components
from bundlerec.pricing.steam import load_steam

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


def evaluate_pricing(data_dir: str, folds: int = 5, seed: int = 0, s: float = PricingModel.s, robustness: bool = True,
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
