"""A demand model fitted on the shop's own traffic: every bundle an answer offered at a price
(the impression log: list price, the price shown, its position, and under an exploring policy the
propensity of that price) and whether the shopper accepted it (``bundle_accept`` feedback).

Model (docs/pricing.md, "Refitted from the shop's feedback"). A shopper who considers the bundle
at position j (probability ``q``, the take rate a perfect price would get: ``logit q = a_j + b x
log(items / 2)``, a position effect and a size effect, because shoppers want bundles of some sizes
more than others whatever their price) buys it at price p when their willingness to pay ``L * exp(theta . z + eps)``, ``eps ~ Logistic(0, s)``,
is above p, with z = (1, log list price - log 50, log items - log 2):

    P(accept | p, j, n) = q(j, n) * sigmoid((theta . z - log(p / L)) / s)

``theta``, ``s``, ``a`` and ``b`` are fitted by maximum likelihood (scipy's L-BFGS-B from a few starting
scales, its likelihood having more than one optimum; a small ridge on theta). The revenue-optimal
price depends on theta and s only (``q`` scales revenue at every price alike), so serving prices
with :class:`bundlerec.pricing.demand.PricingModel` in its ``linear`` form. ``s`` is identified by price variation that is not chosen from what the shopper
would accept: exploration (``pricing`` policy ``explore``) provides it; without it the fit
says how little the prices varied.

Where acceptances are rare (prices far above the knee of the curve), ``q`` and ``theta`` are nearly
interchangeable (without the size effect in ``q``, interest that differs by size is read as
willingness to pay, and more data makes that worse) and the fitted optimum can lie far outside the prices that were tried. So the fit
also sets a trust region: its prices go at most :data:`TRUST` x the list price below the lowest
price ratio it was fitted on (``min_ratio``). Exploring again around the refit's prices and refitting
moves that floor down step by step, each step on evidence (docs/pricing.md; ``bench-demand --rounds``).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

FEEDBACK_FEATURES = ("const", "log_list_over_50", "log_items_over_2")
POSITIONS = 3
"""Take rates fitted per position: 1st, 2nd, 3rd and later offers."""
TRUST = 0.15
"""The refit prices at most this share of the list price below the lowest price it has seen."""
START_SCALES = (0.05, 0.2, 0.8)
"""Starting values of s for the fit (its likelihood has more than one optimum)."""
"""The refit prices at most this share of the list price below the lowest price it has seen."""


def demand_features(item_prices) -> np.ndarray:
    """z of one bundle (or one item alone) from its items' list prices (FEEDBACK_FEATURES)."""
    p = np.asarray(item_prices, dtype=float)
    return np.array([1.0, math.log(max(float(p.sum()), 1e-6) / 50.0), math.log(max(len(p), 1) / 2.0)])


OFFER_COLUMNS = ["impression_id", "position", "z0", "z1", "z2", "log_ratio", "propensity", "accepted", "list_price",
                 "price", "optimal_price"]


def offers(imp: pd.DataFrame, fb: pd.DataFrame, item_prices: dict) -> pd.DataFrame:
    """One row per bundle an answer showed with a list price (at its bundle price, or at the list
    price where it was offered separately): its features, log price ratio, position, propensity and
    whether it was accepted (a ``bundle_accept`` of that impression and index, counted once), the list
    and shown prices and the policy's optimum where it was logged. ``item_prices``: item id -> list price."""
    acc = fb[fb.feedback_type == "bundle_accept"][["impression_id", "bundle_index"]].dropna().drop_duplicates()
    taken = set(zip(acc.impression_id, acc.bundle_index.astype(int)))
    rows = []
    for r in imp.itertuples(index=False):
        items, lists, prices = r.bundle_items, r.bundle_list_prices, r.bundle_prices
        if items is None or prices is None:
            continue
        props = r.bundle_price_propensities if r.bundle_price_propensities is not None else [None] * len(prices)
        for j, (its, L, p) in enumerate(zip(items, lists, prices)):
            known = [item_prices.get(str(x)) for x in its]
            if L is None or not L > 0 or any(v is None for v in known):
                continue  # not priced, or an item the catalog no longer prices
            p = L if p is None or p != p else p  # separately (null; NaN once Arrow made it numpy): at list price
            if not p > 0:
                continue
            z = demand_features(known)
            opt = getattr(r, "bundle_optimal_prices", None)
            rows.append({"impression_id": r.impression_id, "position": j, "z0": z[0], "z1": z[1], "z2": z[2],
                         "log_ratio": math.log(p / L), "propensity": props[j] if j < len(props) else None,
                         "accepted": float((r.impression_id, j) in taken), "list_price": float(L), "price": float(p),
                         "optimal_price": opt[j] if opt is not None and j < len(opt) else None})
    return pd.DataFrame(rows, columns=OFFER_COLUMNS)


def fit(rows: pd.DataFrame, ridge: float = 1e-3, trust: float = TRUST, size_term: bool = True) -> dict:
    """Maximum-likelihood theta, s and take rates of :data:`__doc__`'s model on :func:`offers` rows,
    the trust region's ``min_ratio``; with the data's accounting (offers, acceptances, the spread of
    the log price ratio that identifies s). ``size_term=False``: the take rate by position only (the
    ablation of docs/pricing.md)."""
    from scipy.optimize import minimize
    from scipy.special import expit, log_expit

    if len(rows) < 50 or rows.accepted.sum() < 10:
        raise ValueError(f"{len(rows)} priced bundle offers with {int(rows.accepted.sum())} acceptances: too few to fit "
                         "a demand model (at least 50 offers and 10 acceptances)")
    Z = rows[["z0", "z1", "z2"]].to_numpy(float)
    lr, y = rows.log_ratio.to_numpy(float), rows.accepted.to_numpy(float)
    pos = np.minimum(rows.position.to_numpy(int), POSITIONS - 1)
    k = Z.shape[1]

    size = Z[:, 2]

    def nll(w):
        theta, s, a, b = w[:k], math.exp(w[k]), w[k + 1:k + 1 + POSITIONS], w[-1]
        lp = log_expit(a[pos] + b * size) + log_expit((Z @ theta - lr) / s)
        return (-(y * lp + (1 - y) * np.log1p(-np.minimum(np.exp(lp), 1 - 1e-12))).sum()
                + ridge * float(theta @ theta + b * b))

    bounds = [(-5, 5)] * k + [(math.log(0.01), math.log(5.0))] + [(-8, 8)] * POSITIONS + [(-5, 5) if size_term else (0, 0)]
    res = min((minimize(nll, np.r_[np.zeros(k), math.log(s0), np.full(POSITIONS, -1.0), 0.0], method="L-BFGS-B",
                        bounds=bounds) for s0 in START_SCALES), key=lambda r: r.fun)
    theta, s = res.x[:k], float(math.exp(res.x[k]))
    return {"theta": [float(t) for t in theta], "s": s,
            "take_rate": [float(q) for q in expit(res.x[k + 1:k + 1 + POSITIONS])], "take_rate_size": float(res.x[-1]),
            "min_ratio": float(max(0.05, math.exp(float(lr.min())) - trust)),
            "features": list(FEEDBACK_FEATURES), "n_offers": int(len(rows)), "n_accepted": int(y.sum()),
            "log_price_ratio_sd": float(np.std(lr)), "explored_share": float((rows.propensity.fillna(1.0) < 1).mean()),
            "converged": bool(res.success), "neg_log_likelihood": float(res.fun)}


def elasticity(theta, s: float, z: np.ndarray, log_ratio: float) -> float:
    """d log P(accept) / d log p of the model at one price: the price sensitivity a fit is judged by."""
    sig = 1.0 / (1.0 + math.exp(-(float(np.dot(theta, z)) - log_ratio) / s))
    return -(1.0 - sig) / s
