"""The demand model refitted on the shop's own offers and feedback (bundlerec.pricing.feedback):
on logs drawn from known willingness-to-pay curves (the simulator's :class:`Demand`), with shown
prices explored around a transferred model's optimum, it recovers the price sensitivity and prices
near the oracle; it saves without pickle and says where its prices come from. No services."""

import numpy as np
import pandas as pd
import pytest

from bundlerec.experiments.simulator import Demand
from bundlerec.pricing import feedback
from bundlerec.pricing.demand import PricingModel


def _logs(demand: Demand, shoppers: int, width: float, seed: int):
    """Impression and feedback rows as the endpoint logs them: 3 bundles an answer, priced at a
    transferred model's (arbitrary) optimum explored by +-``width`` x L; a shopper considers the j-th
    with probability 0.6 x relevance / (1 + j) (relevance unobserved) and buys by ``demand``."""
    rng = np.random.default_rng(seed)
    prices = {f"I{k}": float(p) for k, p in enumerate(np.exp(rng.normal(np.log(15), 0.6, 300)))}
    ids, imps, fbs = list(prices), [], []
    for i in range(shoppers):
        z = rng.normal()
        shown = {"bundle_items": [], "bundle_list_prices": [], "bundle_prices": [], "bundle_price_propensities": []}
        for j in range(3):
            n = int(rng.integers(2, 5))
            items = [str(x) for x in rng.choice(ids, n, replace=False)]
            L = sum(prices[x] for x in items)
            price = round(float(np.clip(rng.uniform(0.6, 0.9) + rng.choice(np.linspace(-width, width, 5)), 0.4, 1)) * L, 2)
            for k, v in zip(shown, (items, L, price, 0.2)):
                shown[k].append(v)
            relevance = rng.choice([0.03, 0.3, 1.0], p=[0.3, 0.4, 0.3])
            if rng.random() < min(1, 0.6 * relevance / (1 + j)) * demand.buys(price / L, n, z):
                fbs.append({"impression_id": f"m{i}", "feedback_type": "bundle_accept", "bundle_index": j})
        imps.append({"impression_id": f"m{i}", **shown})
    return pd.DataFrame(imps), pd.DataFrame(fbs), prices


def _revenue_ratio(demand: Demand, fit: dict, n: int = 2) -> float:
    """Population revenue at the fitted model's optimal price / at the oracle's (bundles of ``n``)."""
    r = np.linspace(0.4, 1.0, 601)
    truth = r * demand.population(r, n)
    z = feedback.demand_features([25.0] * n)
    fitted = r / (1 + np.exp(-(float(np.dot(fit["theta"], z)) - np.log(r)) / fit["s"]))
    return float(truth[np.argmax(fitted)] / truth.max())


@pytest.mark.parametrize("spread", [0.0, 0.2], ids=["homogeneous", "heterogeneous"])
def test_the_refit_recovers_the_planted_demand_and_prices_near_the_oracle(spread):
    demand = Demand(spread=spread)
    imp, fb, prices = _logs(demand, 3000, 0.2, seed=0)
    rows = feedback.offers(imp, fb, prices)
    assert len(rows) == 9000 and rows.accepted.sum() == len(fb)
    fit = feedback.fit(rows)
    assert fit["converged"] and fit["n_offers"] == 9000 and fit["explored_share"] == 1.0
    if spread == 0:  # one curve: its logistic scale is the price sensitivity
        assert abs(fit["s"] / demand.s - 1) <= 0.25, fit
        assert fit["theta"][2] < 0  # bigger bundles: less willingness to pay per list dollar, as planted
    for n in (2, 3, 4):
        assert _revenue_ratio(demand, fit, n) >= 0.97, (n, fit)
    # position effect: the first offer is considered most
    assert fit["take_rate"][0] > fit["take_rate"][1] > fit["take_rate"][2]


def test_too_few_offers_are_refused_with_the_counts():
    imp, fb, prices = _logs(Demand(), 10, 0.2, seed=1)
    with pytest.raises(ValueError, match="30 priced bundle offers"):
        feedback.fit(feedback.offers(imp, fb, prices))


def test_the_refitted_model_prices_within_the_limits_saves_without_pickle_and_says_feedback(tmp_path):
    from tests.support import pickled_files

    model = PricingModel(s=0.15, linear={"theta": [-0.1, 0.0, -0.1], "take_rate": [0.3, 0.2, 0.1]})
    bundle = dict(item_prices=[20.0, 12.5, 7.5], item_ids=["a", "b", "c"])
    best = model.price_many([bundle], max_discount=0.25, price_ending=0.99)[0]
    assert best["offer"] == "bundle" and best["bundle_price"] >= 40 * 0.75 and str(best["bundle_price"]).endswith(".99")
    free = model.price_many([bundle], max_discount=0.9)[0]
    assert free["discount"] == pytest.approx(1 - Demand(mu=-0.1, per_item=-0.1).optimal_ratio(3), abs=0.01)
    (tmp_path / "pricing.skops").write_text("a transferred model's file")  # replaced, not left beside it
    model.save(str(tmp_path), {"n_offers": 9000})
    assert not (tmp_path / "pricing.skops").exists() and pickled_files(tmp_path) == []
    loaded, meta = PricingModel.load(str(tmp_path))
    assert meta["source"] == "feedback" and meta["n_offers"] == 9000 and "linear" not in meta
    assert loaded.price_many([bundle], max_discount=0.25, price_ending=0.99)[0] == best
