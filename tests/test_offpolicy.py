"""Estimates before exposure (bundlerec.experiments.offpolicy): from an exploring policy's logs, the
revenue per impression of challenger price policies (``shift``) that no shopper has seen, against
their true value on the same shoppers. Logs as the endpoint writes them (a bundle accept as one
row per item with its share of the price); no services."""

import numpy as np
import pandas as pd
import pytest

from bundlerec.experiments import offpolicy
from bundlerec.experiments.simulator import Demand
from bundlerec.pricing.demand import PricingModel

DEMAND = Demand(mu=-0.3, s=0.15, per_item=0.0)
CHAMPION = PricingModel(s=0.15, linear={"theta": [-0.1, 0.3, 0.0], "take_rate": [1.0] * 3})  # some sold at list
WIDTH = 0.15


def _shoppers(n: int, seed: int):
    """Each shopper: 3 offered bundles (items, list prices, interest) and an item bought from a
    recommendation with probability 0.3 (revenue no price policy changes)."""
    rng = np.random.default_rng(seed)
    prices = {f"I{k}": float(p) for k, p in enumerate(np.exp(rng.normal(np.log(20), 0.6, 300)))}
    ids = list(prices)
    out = []
    for i in range(n):
        bundles = [[str(x) for x in rng.choice(ids, int(rng.integers(2, 5)), replace=False)] for _ in range(3)]
        interest = [min(1.0, 0.6 * rng.choice([0.03, 0.3, 1.0], p=[0.3, 0.4, 0.3]) / (1 + j)) for j in range(3)]
        out.append((bundles, interest, rng.random(3), rng.random() < 0.3))
    return out, prices


def _served(shoppers, prices, limits: dict, seed: int):
    """The impression and feedback logs of ``shoppers`` under the champion's model with a pricing
    policy (``explore`` or ``shift``), and the expected bundle revenue of each offer at its price."""
    rng = np.random.default_rng(seed)
    imp, fb, expected = [], [], 0.0
    for i, (bundles, interest, u, bought) in enumerate(shoppers):
        specs = [dict(item_prices=[prices[x] for x in b]) for b in bundles]
        offers = CHAMPION.price_many(specs, rng=rng, **limits)
        iid = f"b{i}"
        imp.append({"impression_id": iid, "arm": "a", "user_id": f"u{i}", "endpoint": "bundles", "bundle_items": bundles,
                    "bundle_list_prices": [o["list_price"] for o in offers],
                    "bundle_prices": [o["bundle_price"] for o in offers],
                    "bundle_optimal_prices": [o.get("optimal_price") for o in offers],
                    "bundle_price_propensities": [o.get("price_propensity") for o in offers]})
        imp.append({"impression_id": f"r{i}", "arm": "a", "user_id": f"u{i}", "endpoint": "recommendations",
                    **{k: [] for k in ("bundle_items", "bundle_list_prices", "bundle_prices", "bundle_optimal_prices",
                                       "bundle_price_propensities")}})
        if bought:
            fb.append({"impression_id": f"r{i}", "event_id": "p", "item_id": "I0", "feedback_type": "purchase",
                       "revenue": 20.0, "price": 20.0, "bundle_index": None})
        for j, (b, o) in enumerate(zip(bundles, offers)):
            L, p = sum(prices[x] for x in b), o["bundle_price"] or o["list_price"]
            chance = interest[j] * DEMAND.buys(p / L, len(b), 0.0)
            expected += p * chance
            if u[j] < chance:
                fb += [{"impression_id": iid, "event_id": f"a{j}", "item_id": x, "feedback_type": "bundle_accept",
                        "revenue": p * prices[x] / L, "price": p * prices[x] / L, "bundle_index": j} for x in b]
    return pd.DataFrame(imp), pd.DataFrame(fb), expected


def test_off_policy_estimates_cover_the_true_revenue_of_challengers_nobody_saw():
    shoppers, prices = _shoppers(4000, seed=0)
    imp, fb, _ = _served(shoppers, prices, {"explore": WIDTH}, seed=1)
    shifts = (-0.15, -0.075, 0.075, -0.3)
    est = offpolicy.estimate(imp, fb, prices, shifts, WIDTH, bootstrap=500)
    items = 20.0 * sum(s[3] for s in shoppers)
    for shift in shifts[:3]:  # candidates of the logging policy: supported
        _, _, bundles = _served(shoppers, prices, {"shift": shift}, seed=2)  # the challenger's expected revenue
        truth = (items + bundles) / (2 * len(shoppers))
        e = est[str(shift)]
        assert e["ips"]["interval"][0] <= truth <= e["ips"]["interval"][1], (shift, truth, e)
        assert e["dr"]["interval"][0] <= truth <= e["dr"]["interval"][1], (shift, truth, e)
        assert e["match_rate"] == pytest.approx(e["expected_match_rate"], rel=0.15)
    # a challenger beyond the explored prices: no logged price is its own, which the rates show; IPS
    # then counts none of its bundle revenue, DR has the demand model's
    far = est["-0.3"]
    assert far["match_rate"] < 0.1 * far["expected_match_rate"]
    _, _, bundles = _served(shoppers, prices, {"shift": -0.3}, seed=2)
    truth = (items + bundles) / (2 * len(shoppers))
    assert abs(far["dr"]["estimate"] - truth) < abs(far["ips"]["estimate"] - truth)
    assert est["logging"]["interval"][0] < est["logging"]["estimate"] < est["logging"]["interval"][1]


def test_a_shift_policy_moves_the_price_by_its_share_of_the_list_price_within_the_limits():
    shoppers, prices = _shoppers(50, seed=3)
    for bundles, *_ in shoppers:
        specs = [dict(item_prices=[prices[x] for x in b]) for b in bundles]
        for best, moved in zip(CHAMPION.price_many(specs, max_discount=0.3),
                               CHAMPION.price_many(specs, max_discount=0.3, shift=-0.1)):
            L = best["list_price"]
            centre = best["bundle_price"] or L
            assert moved["bundle_price"] == pytest.approx(max(centre - 0.1 * L, L * 0.7), abs=0.01 + L / 400)
            assert moved["optimal_price"] == pytest.approx(centre, abs=0.01) and moved["price_propensity"] == 1.0
        for best, up in zip(CHAMPION.price_many(specs), CHAMPION.price_many(specs, shift=0.05)):
            if best["offer"] == "separately" or best["bundle_price"] >= best["list_price"] - 0.005:
                assert up["bundle_price"] in (None, best["bundle_price"])  # nothing above the list price
            else:
                assert up["bundle_price"] <= best["list_price"] and up["bundle_price"] > best["bundle_price"]


def test_explore_and_shift_together_are_refused():
    from bundlerec.config import check_price_policy

    with pytest.raises(ValueError, match="explore and shift"):
        check_price_policy({"explore": 0.1, "shift": -0.1})
    with pytest.raises(ValueError, match="shift in"):
        check_price_policy({"shift": -0.8})
    assert check_price_policy({"shift": -0.1}) == {"shift": -0.1}
