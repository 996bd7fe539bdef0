"""Decisions that stay valid when people look: the always-valid test behind the promotion rule,
CUPED from the shoppers' pre-period, and replays that measure the rule on a shop's own logs.

* **Always valid.** Every metric is a ratio of per-user sums (``analysis.RATIOS``); its difference
  between two arms is estimated with the delta method on per-user linearized values, and tested with
  the mixture sequential probability ratio test (mSPRT; Robbins 1970, Johari et al. 2017, "Peeking at
  A/B tests"), one-sided each way: a half-normal mixing distribution over positive effects of scale
  ``tau`` gives a likelihood ratio (:func:`_log_ratio`) that is a martingale under "no difference",
  so by Ville's inequality it ever reaches 1 / alpha with probability <= alpha. The lower bound
  {estimate - m} (m: where the ratio reaches 1 / alpha) is therefore valid at *every* look at once:
  checking the report after each batch of users and promoting the first time the lower bound is
  above 0 promotes an A/A arm with probability <= alpha = 1 - the rule's confidence; the same margin
  above the estimate is the guardrails' upper bound. ``tau`` is chosen so that the bound is tightest
  when each arm has the rule's ``horizon_units`` users (from the per-user variance, a nuisance
  parameter estimated from the data). The guarantee rests on the normal approximation of the
  delta-method estimate and that variance estimate; :func:`replay` measures what it gives on logs.
* **CUPED** (Deng et al. 2013). A shopper's sums of the same metric's parts before the experiment
  started (and whether there were any) are regressed out of the linearized values, with one pooled
  within-arm slope: unbiased under randomization, never a larger variance than without.
* **Robust revenue.** ``revenue_per_impression_capped`` caps each user's revenue at a quantile of the
  buyers' revenue over both arms (``analysis.per_user``), so one whale cannot decide an experiment.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np
import pandas as pd

PRE_PREFIX = "pre_"


def linearized(users: pd.DataFrame, num: str, den: str) -> tuple[float, np.ndarray]:
    """A ratio of sums and its per-user linearization: ``(num_i - R den_i) / mean(den)``, whose mean
    is 0 and whose variance over ``n`` is the delta-method variance of ``R``."""
    a, b = users[num].to_numpy(float), users[den].to_numpy(float)
    if not len(a) or b.sum() <= 0:
        return float("nan"), np.zeros(len(a))
    r = a.sum() / b.sum()
    return float(r), (a - r * b) / b.mean()


def covariates(users: pd.DataFrame, num: str, den: str) -> Optional[np.ndarray]:
    """The CUPED covariates of a metric: the user's pre-period sums of its numerator and denominator,
    and whether the user has a pre-period; None without pre-period columns."""
    cols = [f"{PRE_PREFIX}{num}", f"{PRE_PREFIX}{den}"]
    if not set(cols) <= set(users.columns):
        return None
    x = users[cols].to_numpy(float)
    return np.column_stack([x, (x[:, 1] > 0).astype(float)])


def difference(control: pd.DataFrame, arm: pd.DataFrame, num: str, den: str, cuped: bool = True) -> dict:
    """``arm`` minus ``control`` of the ratio metric num/den: the estimate, its variance, and with
    ``cuped`` (and pre-period columns) the variance-reduced estimate and the share of variance removed."""
    rc, lc = linearized(control, num, den)
    ra, la = linearized(arm, num, den)
    out = {"estimate": ra - rc, "variance": _var(la) + _var(lc), "cuped_variance_reduction": 0.0}
    xc, xa = (covariates(control, num, den), covariates(arm, num, den)) if cuped else (None, None)
    if xc is None or xa is None or not np.isfinite(out["estimate"]):
        return out
    x = np.vstack([xc - xc.mean(0), xa - xa.mean(0)])  # within-arm centred: one pooled slope
    keep = x.std(0) > 0
    if not keep.any() or len(x) < 10:
        return out
    beta, *_ = np.linalg.lstsq(x[:, keep], np.concatenate([lc, la]), rcond=None)
    pooled = np.vstack([xc, xa])[:, keep].mean(0)
    adj_c, adj_a = lc - (xc[:, keep] - pooled) @ beta, la - (xa[:, keep] - pooled) @ beta
    est = (ra - (xa[:, keep].mean(0) - pooled) @ beta) - (rc - (xc[:, keep].mean(0) - pooled) @ beta)
    var = _var(adj_a - adj_a.mean()) + _var(adj_c - adj_c.mean())
    if var < out["variance"]:  # (in-sample slopes can only lower it; guard against degenerate fits)
        out.update(estimate=float(est), cuped_variance_reduction=float(1 - var / out["variance"]), variance=float(var))
    return out


def _var(x: np.ndarray) -> float:
    return float(x.var(ddof=1) / len(x)) if len(x) > 1 else float("inf")


def _log_ratio(m: float, variance: float, t2: float) -> float:
    """log of the one-sided mixture likelihood ratio of an estimate ``m`` above the null (half-normal
    mixing N(0, t2) over positive effects): ``log 2 + 1/2 log(V/(V+t2)) + t2 m^2 / (2V(V+t2)) +
    log Phi(m sqrt(t2) / sqrt(V(V+t2)))``."""
    from scipy.special import log_ndtr

    s = variance + t2
    return (math.log(2) + 0.5 * math.log(variance / s) + t2 * m * m / (2 * variance * s)
            + float(log_ndtr(m * math.sqrt(t2) / math.sqrt(variance * s))))


def _margin(variance: float, t2: float, alpha: float) -> float:
    """The distance ``m`` above a null value at which the one-sided mixture ratio reaches 1 / alpha."""
    from scipy.optimize import brentq

    target, hi = math.log(1 / alpha), math.sqrt(variance)
    while _log_ratio(hi, variance, t2) < target:
        hi *= 2
    return float(brentq(lambda m: _log_ratio(m, variance, t2) - target, 0.0, hi, xtol=1e-12 * hi))


def msprt(estimate: float, variance: float, tau: float, alpha: float) -> dict:
    """The one-sided mixture SPRT at one look, each way: the always-valid p-value of "the difference
    is > 0" (``min(1, 1 / ratio)``) and the interval ``estimate -/+ m`` whose lower end is an
    always-valid (1 - alpha) lower bound and whose upper end an always-valid (1 - alpha) upper bound
    (Ville's inequality on each one-sided mixture martingale)."""
    if not (np.isfinite(estimate) and np.isfinite(variance) and variance > 0 and tau > 0):
        return {"p_value": float("nan"), "interval": [float("nan"), float("nan")]}
    t2 = tau * tau
    m = _margin(variance, t2, alpha)
    return {"p_value": float(min(1.0, math.exp(-min(_log_ratio(estimate, variance, t2), 700.0)))),
            "interval": [float(estimate - m), float(estimate + m)]}


@functools.lru_cache(maxsize=64)
def mixing_ratio(alpha: float) -> float:
    """The tau^2 / V that makes the always-valid margin smallest at one variance ``V``."""
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda lr: _margin(1.0, math.exp(lr), alpha), bounds=(-5, 8), method="bounded")
    return float(math.exp(res.x))


def always_valid(control: pd.DataFrame, arm: pd.DataFrame, num: str, den: str, *, confidence: float,
                 horizon_units: int, cuped: bool) -> dict:
    """The difference of one metric with its always-valid interval at level ``confidence`` (what the
    promotion rule reads as ``lower``/``upper`` when ``sequential``). The mixing scale is set so that
    the interval is narrowest when each arm has ``horizon_units`` users: ``tau^2 = r* V n / horizon``
    with ``n`` the mean users per arm now (:func:`mixing_ratio`)."""
    d = difference(control, arm, num, den, cuped)
    n = (len(control) + len(arm)) / 2
    alpha = 1 - confidence
    tau = math.sqrt(mixing_ratio(alpha) * d["variance"] * n / horizon_units) if np.isfinite(d["variance"]) else 0.0
    t = msprt(d["estimate"], d["variance"], tau, alpha)
    return {"estimate": d["estimate"], "interval": t["interval"], "p_value": t["p_value"],
            "cuped_variance_reduction": d["cuped_variance_reduction"], "tau": tau}


def with_pre_period(users: pd.DataFrame, pre: Optional[pd.DataFrame]) -> pd.DataFrame:
    """``users`` (per (arm, user) sums) joined with each user's pre-period sums as ``pre_*`` columns
    (zeros for a user with none)."""
    if pre is None:
        return users
    cols = [c for c in pre.columns if c not in ("arm", "user_id")]
    p = pre.groupby("user_id")[cols].sum().add_prefix(PRE_PREFIX)
    return users.join(p, on="user_id").fillna({c: 0.0 for c in p.columns})


# ---------------------------------------------------------------- measuring the rule on real logs
def replay(users: pd.DataFrame, rule, runs: int = 200, look_every: int = 50, lift: float = 0.0, seed: int = 0) -> dict:
    """``runs`` re-randomized experiments over one experiment's logged users (pooled, arms ignored):
    each run shuffles the arrival order, splits users 50/50 at random, optionally plants a relative
    ``lift`` on the treatment users' revenue, and reads the rule's primary metric after every
    ``look_every`` users (once both arms have ``min_units``), stopping at the first promotion. Three
    bounds side by side under the same looks: always-valid without and with CUPED (``pre_*``
    columns, :func:`with_pre_period`), and the fixed-horizon one-sided normal bound of the same
    delta-method estimate (what the bootstrap quantiles of ``sequential: false`` approximate, valid at
    one look). With ``lift`` 0 (an A/A) the promotion rate is the false-positive rate, else the power.
    Guardrails and the SRM check only ever refuse, so leaving them out can only raise the rate."""
    from scipy.stats import norm

    from bundlerec.experiments.analysis import RATIOS
    from bundlerec.experiments.lifecycle import wilson

    num, den = RATIOS[rule.metric]
    z, rng = float(norm.ppf(rule.confidence)), np.random.default_rng(seed)
    pool = users.reset_index(drop=True)
    n = len(pool) - len(pool) % 2
    looks = [m for m in range(look_every, n + 1, look_every) if m // 2 >= rule.min_units] or [n]
    names = ("always_valid", "always_valid_cuped", "fixed_horizon")
    hits: dict = {k: [] for k in names}
    reductions = []
    for _ in range(runs):
        treat = rng.permutation(np.arange(n) % 2 == 1)
        run = pool.iloc[rng.permutation(len(pool))[:n]].reset_index(drop=True)
        if lift:
            for c in (c for c in run.columns if c.startswith("revenue")):
                run.loc[treat, c] *= 1 + lift
        first = dict.fromkeys(names)
        for m in looks:
            c, b = run.iloc[:m][~treat[:m]], run.iloc[:m][treat[:m]]
            for k, cuped in (("always_valid", False), ("always_valid_cuped", True)):
                r = always_valid(c, b, num, den, confidence=rule.confidence, horizon_units=rule.horizon_units,
                                 cuped=cuped) if first[k] is None or (cuped and m == looks[-1]) else None
                if r and first[k] is None and r["interval"][0] > 0:
                    first[k] = m
                if r and cuped and m == looks[-1]:
                    reductions.append(r["cuped_variance_reduction"])
            if first["fixed_horizon"] is None:
                d = difference(c, b, num, den, cuped=False)
                if d["estimate"] - z * math.sqrt(d["variance"]) > 0:
                    first["fixed_horizon"] = m
        for k in names:
            hits[k].append(first[k])
    out = {"runs": runs, "users": n, "look_every": look_every, "looks": len(looks), "lift": lift, "metric": rule.metric,
           "confidence": rule.confidence, "min_units": rule.min_units, "horizon_units": rule.horizon_units,
           "cuped_variance_reduction_median": float(np.median(reductions)) if reductions else None}
    for k in names:
        stopped = [m for m in hits[k] if m is not None]
        out[k] = {"promoted": len(stopped), "rate": len(stopped) / runs, "rate_ci95": wilson(len(stopped), runs),
                  "median_users_at_promotion": float(np.median(stopped)) if stopped else None}
    return out
