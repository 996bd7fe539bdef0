"""The always-valid promotion rule, CUPED and capped revenue (bundlerec.experiments.sequential), on
per-user tables with a known truth: no services (the rule over real HTTP and Parquet logs is in
tests/test_experiments.py)."""

import math

import numpy as np
import pandas as pd
import pytest

from bundlerec.config import PromotionRule
from bundlerec.experiments import analysis, sequential
from bundlerec.experiments.lifecycle import decide, spec_of
from bundlerec.config import ExperimentConfig


def _shoppers(n: int, seed: int, pre_strength: float = 1.0) -> pd.DataFrame:
    """Per-user sums with zero-inflated, heavy-tailed revenue and a persistent spend level that also
    drives six pre-period visits (``pre_strength`` 0: a pre-period unrelated to the experiment's outcome)."""
    rng = np.random.default_rng(seed)
    taste = rng.lognormal(0, 1, n)

    def period(level):
        imps = rng.poisson(2, n) + 1.0
        buy = rng.random(n) < np.clip(0.1 * level, 0, 0.9)
        return imps, np.where(buy, rng.lognormal(3, 1, n) * level, 0.0)

    imps, rev = period(taste)
    visits = [period(taste if pre_strength else rng.lognormal(0, 1, n)) for _ in range(6)]  # six earlier visits
    pre_imps, pre_rev = sum(v[0] for v in visits), sum(v[1] for v in visits)
    cap = np.quantile(rev[rev > 0], 0.99)
    return pd.DataFrame({"user_id": [f"u{i}" for i in range(n)], "impressions": imps, "revenue": rev,
                         "revenue_capped": np.minimum(rev, cap), "pre_impressions": pre_imps, "pre_revenue": pre_rev,
                         "pre_revenue_capped": np.minimum(pre_rev, cap)})


def test_the_always_valid_bound_is_where_the_mixture_ratio_reaches_one_over_alpha():
    for est, var, tau, alpha in ((0.3, 0.01, 0.2, 0.05), (-2.0, 4.0, 1.0, 0.1), (0.0, 1e-4, 0.05, 0.01)):
        lo, hi = sequential.msprt(est, var, tau, alpha)["interval"]
        assert lo < est < hi and hi - est == pytest.approx(est - lo)
        # testing "difference <= lo" against a larger one rejects exactly at the bound
        assert sequential.msprt(est - lo, var, tau, alpha)["p_value"] == pytest.approx(alpha, rel=1e-6)
        assert sequential.msprt(est - lo + 1e-3 * math.sqrt(var), var, tau, alpha)["p_value"] < alpha
    # wider than the one-look one-sided bound of the same estimate, narrowest near tau^2 = r* V
    r = sequential.mixing_ratio(0.05)
    margin = {k: sequential.msprt(0.0, 1.0, math.sqrt(k * r), 0.05)["interval"][1] for k in (0.1, 1, 10)}
    assert margin[1] < min(margin[0.1], margin[10]) and margin[1] > 1.645


def test_peeking_keeps_the_always_valid_rule_at_its_level_and_breaks_the_fixed_horizon_one():
    """100 A/A replays, a look every 50 users: the fixed-horizon bound promotes far more than 5 %
    (that is what peeking does), the always-valid one does not."""
    rule = PromotionRule(min_units=25)
    r = sequential.replay(_shoppers(1000, 1), rule, runs=100, look_every=50, seed=0)
    assert r["looks"] == 20 and r["users"] == 1000
    assert r["always_valid"]["promoted"] <= 5 and r["always_valid_cuped"]["promoted"] <= 5, r
    assert r["fixed_horizon"]["promoted"] >= 10, r  # one-look 5 % bound, looked at 20 times
    assert r["fixed_horizon"]["rate_ci95"][0] > 0.05
    # and a real lift is found, sooner or more often with CUPED than without
    p = sequential.replay(_shoppers(1000, 1), rule, runs=60, look_every=50, lift=2.0, seed=1)
    assert p["always_valid_cuped"]["promoted"] >= p["always_valid"]["promoted"] > 10, p
    assert p["cuped_variance_reduction_median"] > 0.1


def test_cuped_removes_the_pre_period_variance_and_leaves_the_estimate_unbiased():
    users = _shoppers(4000, 2)
    rng = np.random.default_rng(0)
    plain, adjusted, reductions = [], [], []
    for _ in range(60):
        t = rng.permutation(len(users)) % 2 == 1
        c, a = users[~t], users[t].assign(revenue=users.revenue[t] * 1.2)  # a true 20 % lift
        plain.append(sequential.difference(c, a, "revenue", "impressions", cuped=False))
        adjusted.append(sequential.difference(c, a, "revenue", "impressions", cuped=True))
        reductions.append(adjusted[-1]["cuped_variance_reduction"])
    truth = 0.2 * users.revenue.sum() / users.impressions.sum()
    for runs in (plain, adjusted):
        est = np.array([d["estimate"] for d in runs])
        assert abs(est.mean() - truth) < 3 * est.std() / math.sqrt(len(est))  # unbiased
    assert np.median(reductions) > 0.15
    assert np.std([d["estimate"] for d in adjusted]) < np.std([d["estimate"] for d in plain])
    # a pre-period that says nothing about the outcome removes (almost) nothing; none at all: exactly nothing
    noise = _shoppers(4000, 3, pre_strength=0)
    t = np.arange(len(noise)) % 2 == 1
    assert sequential.difference(noise[~t], noise[t], "revenue", "impressions")["cuped_variance_reduction"] < 0.02
    bare = noise.drop(columns=[c for c in noise if c.startswith("pre_")])
    assert sequential.difference(bare[~t], bare[t], "revenue", "impressions")["cuped_variance_reduction"] == 0


def _imp_fb(revenue: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    imp = pd.DataFrame([{"impression_id": f"i{u}", "experiment": "e", "arm": "control" if u % 2 else "treatment",
                         "model_version": "1", "endpoint": "recommendations", "user_id": f"u{u}", "bundle_list_prices": []}
                        for u in range(400)])
    fb = pd.DataFrame([{"impression_id": f"i{u}", "event_id": "p", "item_id": "I1", "feedback_type": "purchase",
                        "revenue": r, "price": r, "quantity": 1, "bundle_index": None, "experiment": "e"}
                       for u, r in revenue.items()])
    return imp, fb


def test_one_whale_moves_revenue_but_not_capped_revenue():
    rng = np.random.default_rng(4)
    spend = {u: float(rng.lognormal(3, 0.5)) for u in range(400) if rng.random() < 0.3}
    imp, fb = _imp_fb(spend)
    whale = max(u for u in spend if u % 2 == 0)  # a treatment user buys for 1000x the usual
    spend_whale = {**spend, whale: 1000 * spend[whale]}
    spec = spec_of(ExperimentConfig(name="e", arms={"control": "1", "treatment": "2"}))
    before = analysis.report(imp, fb, spec, bootstrap=200)
    after = analysis.report(*_imp_fb(spend_whale), spec, bootstrap=200)
    raw = [r["differences"]["treatment"]["revenue_per_impression"]["estimate"] for r in (before, after)]
    capped = [r["differences"]["treatment"]["revenue_per_impression_capped"]["estimate"] for r in (before, after)]
    assert abs(raw[1] - raw[0]) > 50 * abs(capped[1] - capped[0])
    assert after["revenue_cap"] < 10 * before["revenue_cap"]


def test_the_report_reads_always_valid_bounds_with_cuped_unless_told_otherwise():
    users = _shoppers(800, 5)
    imp = pd.DataFrame({"impression_id": users.user_id, "experiment": "e", "model_version": "1",
                        "arm": np.where(np.arange(800) % 2 == 1, "treatment", "control"), "endpoint": "recommendations",
                        "user_id": users.user_id, "bundle_list_prices": [[] for _ in range(800)]})
    fb = pd.DataFrame({"impression_id": users.user_id, "event_id": "p", "item_id": "I1", "feedback_type": "purchase",
                       "revenue": users.revenue * np.where(imp.arm == "treatment", 3.0, 1.0), "price": 1.0,
                       "quantity": 1, "bundle_index": None, "experiment": "e"})[users.revenue > 0]
    pre = users.assign(arm="pre")[["arm", "user_id"]].assign(impressions=users.pre_impressions,
                                                                revenue=users.pre_revenue,
                                                                revenue_capped=users.pre_revenue_capped)
    spec = spec_of(ExperimentConfig(name="e"))
    rep = analysis.report(imp, fb, spec, bootstrap=300, pre=pre)
    d = rep["differences"]["treatment"]["revenue_per_impression_capped"]
    assert rep["bounds"] == "always-valid (mSPRT, CUPED)" and rep["pre_period_users"] == 800
    assert [d["lower"], d["upper"]] == d["always_valid"]["interval"] and d["always_valid"]["cuped_variance_reduction"] > 0
    assert d["lower"] < d["ci95"][0]  # wider than the one-look bootstrap interval ...
    assert decide(rep, PromotionRule(), "control")["promote"] == "treatment"  # ... and still finds a 3x revenue
    fixed = analysis.report(imp, fb, spec, bootstrap=300, rule=PromotionRule(sequential=False))
    f = fixed["differences"]["treatment"]["revenue_per_impression_capped"]
    assert fixed["bounds"] == "bootstrap" and f["lower"] > d["lower"] and f["lower"] != f["always_valid"]["interval"][0]
