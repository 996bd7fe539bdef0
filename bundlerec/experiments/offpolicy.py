"""Estimates before exposure: a challenger price policy's revenue per impression read from an
exploring policy's logs, before any shopper sees the challenger (issue 29 §4).

The logging policy (``pricing`` policy ``explore`` of width w) showed each offered bundle at one of up
to 5 prices around its optimum, uniformly (the impression log keeps the optimum and the propensity of
the price shown). A challenger ``shift`` policy (:attr:`bundlerec.pricing.demand.PriceLimits.shift`)
shows the price nearest to the optimum + shift x the list price: for a shift in {-w, -w/2, w/2, w}
(and -3w/4, -w/4 for a bundle the model sells separately) that is one of the logging policy's
candidates, shown with the logged propensity. Per offer o, with r_o its logged revenue (the price if
accepted) and m_o = 1 when the price shown is the challenger's (within w/8 of the list price):

* inverse propensity (IPS): ``m_o / propensity_o * r_o``;
* doubly robust (DR): ``rhat_o(challenger's price) + m_o / propensity_o * (r_o - rhat_o(shown price))``,
  rhat the demand model of :mod:`bundlerec.pricing.feedback` fitted on the same logs.

A shopper's other revenue (items bought from recommendations) is the logged one: a price policy
does not change it. Revenue per impression is the ratio of sums over users, with a bootstrap over
users. Assumes that an offer's acceptance depends on its own price only, and that the challenger
runs on the logging policy's model version (the same optima). ``match_rate`` beside
``expected_match_rate`` (the mean propensity) says whether the challenger's prices were among the
logged candidates: they agree where it was everywhere supported.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bundlerec.pricing import feedback


def challenger_prices(rows: pd.DataFrame, shift: float) -> np.ndarray:
    """The price a ``shift`` policy shows for each :func:`feedback.offers` row (list price: sold
    separately), from the logged optimum (the shown price where none was logged)."""
    L = rows.list_price.to_numpy(float)
    centre = rows.optimal_price.fillna(rows.price).to_numpy(float)
    separately = centre > L - 0.01 + 1e-9
    target = np.clip(centre + shift * L, 0.01, L)
    return np.where(separately & (shift >= 0), L, target)


def reward_model(fit: dict):
    """Expected revenue of each row at prices ``p`` under a :func:`feedback.fit` result."""
    from scipy.special import expit, logit

    theta, s = np.asarray(fit["theta"], float), float(fit["s"])
    a = logit(np.clip(np.asarray(fit["take_rate"], float), 1e-9, 1 - 1e-9))

    def rhat(rows: pd.DataFrame, p: np.ndarray) -> np.ndarray:
        Z = rows[["z0", "z1", "z2"]].to_numpy(float)
        pos = np.minimum(rows.position.to_numpy(int), feedback.POSITIONS - 1)
        q = expit(a[pos] + float(fit.get("take_rate_size", 0.0)) * Z[:, 2])
        ratio = np.maximum(p, 1e-9) / rows.list_price.to_numpy(float)
        return p * q * expit((Z @ theta - np.log(ratio)) / s)
    return rhat


def estimate(imp: pd.DataFrame, fb: pd.DataFrame, item_prices: dict, shifts, width: float, bootstrap: int = 2000,
             seed: int = 0) -> dict:
    """IPS and DR revenue per impression of each ``shift`` policy from the logs of one exploring
    policy (``imp``/``fb`` as :func:`bundlerec.experiments.analysis.read_logs` returns them, one arm
    or several alike), beside the logging policy's own, each with a 95 % bootstrap interval over users."""
    from bundlerec.experiments import analysis

    if not 0 < width <= 0.5:
        raise ValueError("width: the logging policy's explore width, in (0, 0.5]")
    rows = feedback.offers(imp[imp.endpoint == "bundles"], fb, item_prices)
    if rows.empty:
        raise ValueError("no priced bundle offer in these logs")
    fit = feedback.fit(rows)
    rhat = reward_model(fit)
    users, _ = analysis.per_user(imp, fb)
    users = users.groupby("user_id")[["impressions", "revenue"]].sum()
    owner = imp.set_index("impression_id").user_id
    rows["user_id"] = owner.reindex(rows.impression_id).to_numpy()
    prop = rows.propensity.fillna(1.0).to_numpy(float)
    logged = rows.price.to_numpy(float) * rows.accepted.to_numpy(float)
    base = users.revenue - pd.Series(logged).groupby(rows.user_id.to_numpy()).sum().reindex(users.index).fillna(0.0)
    tol = width / 8 * rows.list_price.to_numpy(float)
    per_user, diag = {"logging": users.revenue.to_numpy(float)}, {}
    for shift in shifts:
        p_pi = challenger_prices(rows, float(shift))
        match = (np.abs(rows.price.to_numpy(float) - p_pi) <= tol).astype(float)
        ips = match / prop * logged
        dr = rhat(rows, p_pi) + match / prop * (logged - rhat(rows, rows.price.to_numpy(float)))
        for name, v in (("ips", ips), ("dr", dr)):
            got = pd.Series(v).groupby(rows.user_id.to_numpy()).sum().reindex(users.index).fillna(0.0)
            per_user[f"{shift}:{name}"] = (base + got).to_numpy(float)
        diag[str(shift)] = {"match_rate": float(match.mean()), "expected_match_rate": float(prop.mean())}
    imps = users.impressions.to_numpy(float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(len(imps), size=(bootstrap, len(imps)))
    den = imps[idx].sum(1)

    def summary(v: np.ndarray) -> dict:
        reps = v[idx].sum(1) / den
        return {"estimate": float(v.sum() / imps.sum()), "interval": [float(x) for x in np.quantile(reps, [0.025, 0.975])]}

    out = {"logging": summary(per_user["logging"]), "users": int(len(imps)), "offers": int(len(rows)),
           "width": width, "reward_model": {k: fit[k] for k in ("s", "theta", "take_rate", "take_rate_size")}}
    for shift in shifts:
        out[str(shift)] = {"ips": summary(per_user[f"{shift}:ips"]), "dr": summary(per_user[f"{shift}:dr"]),
                           **diag[str(shift)]}
    return out
