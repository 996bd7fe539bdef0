"""Bundles and pricing: constraints, the pricing optimiser against a hand-solved case, the matching
metric, and a behaviour check on synthetic data with planted bundles."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bundlerec.bundles.compat import Compatibility
from bundlerec.bundles.detect import partition
from bundlerec.bundles.generate import BundleConstraints, bundle_name, generate
from bundlerec.bundles.matching import match, prf
from bundlerec.eval.pricing import evaluate_pricing
from bundlerec.pricing.demand import NoFeasiblePrice, PricingModel
from bundlerec.pricing.features import BUNDLE_FEATURES, CONTEXT_FEATURES, FEATURES, PricingContext, bundle_features
from bundlerec.data.statistics import cooccurrence_counts, item_counts

from tests.support import STEAM

STEAM = str(STEAM)


def _compat(n=12, seed=0, groups=None):
    rng = np.random.default_rng(seed)
    E = rng.normal(size=(n, 8))
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    groups = groups or [[0, 1, 2], [3, 4], [5, 6, 7]]
    return Compatibility(cooccurrence_counts(groups, n), item_counts(groups, n), len(groups), E)


@pytest.mark.parametrize("budget,max_size", [(None, 4), (50.0, 3), (20.0, 2)])
def test_generate_respects_constraints(budget, max_size):
    n = 12
    rng = np.random.default_rng(1)
    prices = rng.uniform(5, 30, n).round(2).tolist()
    cats = [f"c{i % 4}" for i in range(n)]
    c = BundleConstraints(n=4, min_size=2, max_size=max_size, budget=budget, exclude=(0, 5), max_per_category=1)
    out = generate(rng.normal(size=n), _compat(n), cats, prices, c)
    assert out, "no bundle generated"
    seen = []
    for b in out:
        assert 2 <= len(b["items"]) <= max_size
        assert len(set(b["items"])) == len(b["items"])                       # no duplicates inside
        assert not {0, 5} & set(b["items"])                                   # excluded items never appear
        assert len({cats[i] for i in b["items"]}) == len(b["items"])          # category diversity
        if budget is not None:
            assert sum(prices[i] for i in b["items"]) <= budget + 1e-9        # budget never exceeded
        assert b["list_price"] == pytest.approx(sum(prices[i] for i in b["items"]), abs=0.01)
        seen += b["items"]
    assert len(seen) == len(set(seen))                                        # no item repeated across bundles


def test_pricing_optimum_matches_hand_solved_case():
    # s = 0.5 makes the offset s*logit(1-s) zero; an unfitted model assumes the optimal discount 0.2,
    # so mu = log(0.8): revenue p * sigmoid((log 0.8 - log(p/L)) / 0.5) peaks at p = 0.8 L with P(buy) = 0.5.
    m = PricingModel(s=0.5, default_discount=0.2)
    r = m.price([30.0, 20.0, 50.0], max_discount=0.6, grid=4001)
    assert r["list_price"] == 100.0
    assert r["bundle_price"] == pytest.approx(80.0, abs=0.05) and r["discount"] == pytest.approx(0.2, abs=5e-4)
    assert r["purchase_probability"] == pytest.approx(0.5, abs=1e-3)
    assert r["expected_revenue"] == pytest.approx(40.0, abs=0.05)
    # brute force of the same objective, independently
    ps = np.linspace(40, 100, 60001)
    rev = ps / (1 + np.exp(-(math.log(0.8) - np.log(ps / 100)) / 0.5))
    assert r["bundle_price"] == pytest.approx(ps[rev.argmax()], abs=0.05)


def test_pricing_constraints_bind():
    m = PricingModel(s=0.5, default_discount=0.2)
    assert m.price([60.0, 40.0], max_discount=0.1)["bundle_price"] == pytest.approx(90.0)   # max discount
    margin = m.price([60.0, 40.0], costs=[50.0, 35.0], min_margin=0.1)
    assert margin["bundle_price"] >= 85.0 * 1.1 - 1e-9                                       # minimum margin
    ending = m.price([60.0, 40.0], price_ending=0.99)
    assert round(ending["bundle_price"] % 1, 2) == 0.99 and ending["bundle_price"] <= 100
    with pytest.raises(NoFeasiblePrice, match="no price in whole cents"):
        m.price([10.0], costs=[20.0], min_margin=0.0)


@settings(max_examples=300, deadline=None)
@given(prices=st.lists(st.floats(0.01, 500.0).map(lambda x: round(x, 2)), min_size=1, max_size=6),
       cost_share=st.floats(0.0, 1.2), max_discount=st.floats(0.0, 1.0), min_margin=st.floats(0.0, 1.0),
       ending=st.one_of(st.none(), st.integers(0, 99).map(lambda c: c / 100)), fitted_default=st.floats(0.0, 0.9))
def test_price_limits_are_met_exactly_or_refused(prices, cost_share, max_discount, min_margin, ending, fitted_default):
    """Every returned price is whole cents, within [list x (1 - max_discount), list], at least the cost
    x (1 + min_margin), with the asked ending; NoFeasiblePrice only when no such price exists."""
    m = PricingModel(default_discount=fitted_default)
    costs = [p * cost_share for p in prices]
    L = sum(prices)
    lo = max(L * (1 - max_discount), sum(costs) * (1 + min_margin))
    feasible = [c for c in range(math.ceil(lo * 100 - 1e-6), math.floor(L * 100 + 1e-6) + 1)
                if ending is None or c % 100 == round(ending * 100)] if lo <= L + 1e-9 else []
    try:
        r = m.price(prices, costs=costs, max_discount=max_discount, min_margin=min_margin, price_ending=ending)
    except NoFeasiblePrice:
        assert not feasible
        return
    if r["offer"] == "separately":  # no discount pays: the items at their own prices, both figures given
        assert r["bundle_price"] is None and r["discount"] == 0.0 and feasible
        assert "no discount" in r["offer_reason"] and r["expected_revenue"] == r["expected_revenue_separately"]
        return
    p = r["bundle_price"]
    assert feasible and round(p * 100) in feasible                      # whole cents, ending, inside [lo, L]
    assert abs(p * 100 - round(p * 100)) < 1e-6
    assert p <= L + 1e-9 and r["discount"] <= max_discount + 1e-12
    assert p >= sum(costs) * (1 + min_margin) - 1e-9
    if ending is not None:
        assert round(p * 100) % 100 == round(ending * 100)


@settings(max_examples=150, deadline=None)
@given(prices=st.lists(st.floats(0.5, 500.0).map(lambda x: round(x, 2)), min_size=1, max_size=5),
       max_discount=st.floats(0.0, 1.0), ending=st.one_of(st.none(), st.just(0.99)), width=st.floats(0.01, 0.5),
       seed=st.integers(0, 2**31))
def test_explored_prices_stay_inside_the_limits_and_say_how_they_were_drawn(prices, max_discount, ending, width, seed):
    """pricing policy ``explore``: the shown price is one of at most 5 feasible prices within width x
    list of the optimum (of the list price, selling separately among them, where the model would
    sell separately), drawn with the propensity the answer gives; the limits hold exactly."""
    from bundlerec.pricing.demand import EXPLORE_POINTS

    m, L = PricingModel(), sum(prices)
    try:
        best = m.price(prices, max_discount=max_discount, price_ending=ending)
    except NoFeasiblePrice:
        return
    rng = np.random.default_rng(seed)
    drawn = [m.price_many([dict(item_prices=prices)], max_discount=max_discount, price_ending=ending, explore=width,
                          rng=rng)[0] for _ in range(40)]
    separately = best["offer"] != "bundle"
    if separately:  # explored below the list price, selling separately one of the choices
        assert all(d["optimal_price"] == round(L, 2) for d in drawn)
        assert all(d["offer"] == "separately" and d["discount"] == 0.0 for d in drawn if d["bundle_price"] is None)
        assert all(d["offer"] == "bundle" and d["offer_reason"].startswith("explored") for d in drawn
                   if d["bundle_price"] is not None)
    else:
        assert all(d["optimal_price"] == best["bundle_price"] for d in drawn)
    shown = {d["bundle_price"] for d in drawn}
    centre = L if separately else best["bundle_price"]
    assert len(shown) <= EXPLORE_POINTS and all(p is None or abs(p - centre) <= width * L + 0.01 for p in shown)
    for d in drawn:
        p = d["bundle_price"]
        if p is None:
            assert 1 / EXPLORE_POINTS <= d["price_propensity"] <= 1
            continue
        assert L * (1 - max_discount) - 1e-9 <= p <= L + 1e-9 and abs(p * 100 - round(p * 100)) < 1e-6
        assert ending is None or round(p * 100) % 100 == 99
        assert 1 / EXPLORE_POINTS <= d["price_propensity"] <= 1 and d["discount"] == pytest.approx(1 - p / L)
        assert d["expected_revenue"] == pytest.approx(p * m.purchase_probability(np.array([p]), L, mu=m.mu(
            m.features(prices)[None])[0])[0])
    # the propensities are the draw's: uniform over the candidate prices
    k = round(1 / drawn[0]["price_propensity"])
    many = [m.price_many([dict(item_prices=prices)], max_discount=max_discount, price_ending=ending, explore=width,
                         rng=rng)[0]["bundle_price"] for _ in range(60 * k)] if k > 1 else []
    if many:
        counts = np.unique([-1.0 if p is None else p for p in many], return_counts=True)[1]
        assert len(counts) == k and counts.min() > 60 * 0.4


def test_best_jaccard_matching():
    total, g, t = match([[1, 2, 3], [4, 5]], [[1, 2], [4, 5], [6, 7]])
    assert (g, t) == (2, 3) and total == pytest.approx(2 / 3 + 1.0)
    p = prf(total, g, t)
    assert p["precision"] == pytest.approx((5 / 3) / 2) and p["recall"] == pytest.approx((5 / 3) / 3)
    assert prf(*match([], [[1, 2]]))["f1"] == 0.0


def test_partition_recovers_planted_groups_better_than_one_big_bundle():
    # synthetic: items in planted bundles co-occur in training groups; a session mixes two bundles
    rng = np.random.default_rng(0)
    n, planted = 60, [list(range(i, i + 3)) for i in range(0, 60, 3)]
    train_groups = [list(rng.permutation(b)[: rng.integers(2, 4)]) for b in planted for _ in range(5)]
    compat = Compatibility(cooccurrence_counts(train_groups, n), item_counts(train_groups, n),
                              len(train_groups), None, w_text=0.0)
    ours, naive = [0.0, 0, 0], [0.0, 0, 0]
    for k in range(0, 20, 2):
        session = planted[k] + planted[k + 1]
        for acc, gen in ((ours, partition(session, compat, threshold=0.5)), (naive, [session])):
            j, g, t = match(gen, [planted[k], planted[k + 1]])
            acc[0] += j
            acc[1] += g
            acc[2] += t
    assert prf(*ours)["f1"] > 0.9 and prf(*ours)["f1"] > 2 * prf(*naive)["f1"]


def test_features_and_names():
    x = bundle_features([9.99, 2.99], ["Game", "Game - Soundtrack"], ["Action, Indie", "Action"], "Game Complete")
    assert x.shape == (len(BUNDLE_FEATURES),)
    assert PricingModel().features([9.99, 2.99]).shape == (len(FEATURES),)
    assert bundle_name(["photography.cameras", "photography.tripods"]) == "Photography bundle"


def test_pricing_context_overlap_and_sellers_leave_one_out():
    sellers = {"a": {"publisher": "P", "developer": "D"}, "b": {"publisher": "P", "developer": "D"},
               "c": {"publisher": "Q", "developer": "E"}}
    ctx = PricingContext([["a", "b"], ["b", "c"], ["x", "y"]], [0.5, 0.1, 0.3], sellers)
    f = dict(zip(CONTEXT_FEATURES, ctx.features(["a", "b"])))
    assert f["overlap_max_jaccard"] == 1.0 and f["overlap_nearest_discount"] == 0.5 and f["has_overlap"] == 1.0
    assert f["publisher_share"] == 1.0 and f["publisher_mean_discount"] == 0.5 and f["publisher_bundles"] == 1
    loo = dict(zip(CONTEXT_FEATURES, ctx.features(["a", "b"], exclude=0)))  # its own discount is not seen
    assert loo["overlap_max_jaccard"] == pytest.approx(1 / 3) and loo["overlap_nearest_discount"] == 0.1
    assert loo["publisher_bundles"] == 0 and loo["publisher_mean_discount"] == pytest.approx(0.2)  # median of the rest
    none = dict(zip(CONTEXT_FEATURES, ctx.features(["zzz"])))
    assert none["has_overlap"] == 0 and none["overlap_nearest_discount"] == pytest.approx(0.3)


def test_pricing_beats_the_median_on_real_steam_bundles():
    r = evaluate_pricing(STEAM, folds=5, robustness=False)
    assert r["n_bundles"] == 615 and r["sellers_known"] > 2000
    assert r["discount_mae"]["bundlerec"] < r["discount_mae"]["median"]
    assert r["discount_mae"]["bundlerec"] < r["discount_mae"]["median_by_size"]


def test_fitted_pricing_round_trips_without_pickle(tmp_path):
    """The export carries the fitted model as JSON + skops (no pickle), with its fit metadata; the
    loaded model prices exactly as the fitted one, and prices depend on what is in the bundle."""
    from bundlerec.config import PipelineConfig, PricingConfig
    from bundlerec.price import attach_pricing
    from bundlerec.integrity import seal, verify

    seal(str(tmp_path))  # an (empty) committed export: attaching verifies it first, then re-seals
    info = attach_pricing(PipelineConfig(pricing=PricingConfig(data_dir=STEAM)), str(tmp_path))
    assert verify(str(tmp_path)) == (True, "ok")
    assert info["source"] == "transferred" and info["n_bundles"] > 500
    assert not list(tmp_path.glob("*.pkl")) and (tmp_path / "pricing.skops").exists()
    model, meta = PricingModel.load(str(tmp_path))
    assert meta["source"] == "transferred" and meta["cv_discount_mae"] == info["cv_discount_mae"]
    games = model.price([19.99, 9.99, 4.99], ["Space Shooter", "Puzzle Quest", "Space Shooter Soundtrack"],
                        compare_separately=False)
    addons = model.price([19.99, 1.99, 1.99, 1.99], ["Racer", "Racer DLC pack", "Racer skin", "Racer OST"],
                         compare_separately=False)
    assert games["discount"] != addons["discount"]
    # the offer: a discount only where the model expects it to beat selling the items separately
    for raw, args in ((games, ([19.99, 9.99, 4.99], ["Space Shooter", "Puzzle Quest", "Space Shooter Soundtrack"])),
                      (addons, ([19.99, 1.99, 1.99, 1.99], ["Racer", "Racer DLC pack", "Racer skin", "Racer OST"]))):
        offer = model.price(*args)
        pays = raw["expected_revenue"] > raw["expected_revenue_separately"]
        assert offer["offer"] == ("bundle" if pays else "separately"), (raw, offer)
        assert offer == {**raw, "offer": "bundle"} if pays else (offer["bundle_price"] is None and offer["discount"] == 0.0
                                                                 and f"{raw['bundle_price']:.2f}" in offer["offer_reason"])
    # the context (earlier bundles' item sets, discounts, sellers) travels as JSON; a bundle that
    # repeats an earlier Steam bundle's items is priced from that bundle's discount
    assert (tmp_path / "pricing_context.json").exists() and len(model.context.discounts) == info["n_bundles"]
    ids, d = model.context.item_sets[0], model.context.discounts[0]
    x = dict(zip(FEATURES, model.features([9.99] * len(ids), item_ids=ids)))
    assert x["overlap_max_jaccard"] == 1.0 and x["overlap_nearest_discount"] == d
    default, dmeta = PricingModel.load(str(tmp_path / "none"))
    assert dmeta["source"] == "default" and default.regressor is None


def test_pricing_file_with_foreign_types_is_refused(tmp_path):
    """A pricing file holding anything but scikit-learn types is not loaded (skops would have to
    construct foreign objects)."""
    import collections
    import json

    import skops.io as sio

    sio.dump(collections.Counter({"a": 1}), tmp_path / "pricing.skops")
    (tmp_path / "pricing.json").write_text(json.dumps({"s": 0.3, "features": list(FEATURES)}))
    with pytest.raises(ValueError, match="not scikit-learn"):
        PricingModel.load(str(tmp_path))


def _context_features_by_full_scan(ctx: PricingContext, item_ids, exclude=None) -> np.ndarray:
    """CONTEXT_FEATURES as their definition reads: every earlier bundle compared, one by one."""
    s_ = set(map(str, item_ids))
    keep = [k for k in range(len(ctx.item_sets)) if k != exclude]
    sets, d = [set(map(str, ctx.item_sets[k])) for k in keep], np.array([ctx.discounts[k] for k in keep], dtype=float)
    med = float(np.median(d)) if len(d) else 0.2
    jac = np.array([len(s_ & t) / len(s_ | t) if s_ else 0.0 for t in sets])
    f = [0.0, med, med, 0.0]
    if len(jac) and jac.max() > 0:
        w = jac[jac > 0]
        f = [float(jac.max()), float(d[int(jac.argmax())]), float((w * d[jac > 0]).sum() / w.sum()), 1.0]
    for key in ("publisher", "developer"):
        seller, share = ctx.dominant(s_, key)
        same = [di for di, t in zip(d, sets) if seller is not None and ctx.dominant(t, key)[0] == seller]
        f += [share, float(np.mean(same)) if same else med, float(len(same))]
    return np.asarray(f)


def test_pricing_context_indexes_agree_with_a_full_scan():
    """The overlap and seller features come from inverted indexes (a served bundle is compared only
    with the earlier bundles it shares an item or a seller with); they equal, bit for bit, the
    definition's scan over every earlier bundle, also leave-one-out."""
    rng = np.random.default_rng(0)
    items = [f"i{k}" for k in range(60)]
    sellers = {i: {"publisher": f"p{rng.integers(4)}", "developer": f"d{rng.integers(6)}"} for i in items[:45]}
    sets = [list(rng.choice(items, rng.integers(1, 6), replace=False)) for _ in range(80)]
    ctx = PricingContext(sets, rng.uniform(0, 0.9, len(sets)).round(3).tolist(), sellers)
    for n in range(300):
        ids = list(sets[n % len(sets)]) if n % 3 == 0 else list(rng.choice(items, rng.integers(0, 6), replace=False))
        exclude = None if n % 2 else int(rng.integers(len(sets)))
        np.testing.assert_array_equal(ctx.features(ids, exclude=exclude), _context_features_by_full_scan(ctx, ids, exclude))


def test_grid_pricing_in_one_model_call_equals_pricing_point_by_point():
    """The price grid is evaluated with one pricing-model call for all bundles of an answer (the
    location mu does not depend on the price asked); the chosen price is the argmax of the
    objective computed point by point with the scalar model, and price_many equals price."""
    from bundlerec.pricing.features import PricingContext
    from bundlerec.pricing.steam import fit_steam

    model, _ = fit_steam(STEAM)
    rng = np.random.default_rng(1)
    specs = [dict(item_prices=rng.uniform(0.5, 40, rng.integers(1, 6)).round(2).tolist()) for _ in range(12)]
    specs[0]["costs"] = [p * 0.5 for p in specs[0]["item_prices"]]
    batch = model.price_many(specs, max_discount=0.5, compare_separately=False)  # the bundle's best price, always
    assert isinstance(model.context, PricingContext)
    for spec, got in zip(specs, batch):
        one = model.price(**spec, max_discount=0.5, compare_separately=False)
        assert got == one
        L, cost = sum(spec["item_prices"]), sum(spec.get("costs") or [0.0])
        x = model.features(spec["item_prices"])
        cents = np.unique(np.linspace(math.ceil(round(L * 50, 6)), math.floor(round(L * 100, 6)), 400).round())
        objective = [(c / 100 - cost) * model.purchase_probability(c / 100, L, x) for c in cents]
        assert one["bundle_price"] == cents[int(np.argmax(objective))] / 100
        alone = sum(p * model.purchase_probability(p, p, model.features([p])) for p in spec["item_prices"])
        assert one["expected_revenue_separately"] == pytest.approx(alone, rel=1e-12)
    refused = model.price_many([dict(item_prices=[10.0], costs=[20.0])] + specs[:1], min_margin=0.0, compare_separately=False)
    assert isinstance(refused[0], NoFeasiblePrice) and refused[1]["bundle_price"] > 0


def test_the_price_stage_fits_pricing_into_the_trained_export_and_reseals_it(tmp_path):
    """stages=[price] (jobs.price): the pricing model fitted on the Steam data goes into the export
    results.json names, the export verifies afterwards, results.json says what was fitted; a train
    stage in the same pipeline leaves pricing to it (fitted once); no results is a clear error."""
    import json

    from bundlerec import integrity
    from bundlerec.price import pricing_step, run_price_stage
    from tests.support import tiny_config

    export = tmp_path / "export"
    export.mkdir()
    (export / "bundlerec.json").write_text("{}")
    integrity.seal(str(export))
    cfg = tiny_config(f"results_path={tmp_path}/results.json", "stages=[price]")
    with pytest.raises(FileNotFoundError, match="no results of a train or tune run"):
        run_price_stage(cfg)
    (tmp_path / "results.json").write_text(json.dumps({"export_dir": str(export), "metrics": {}}))
    out = run_price_stage(cfg)
    assert out["pricing"]["source"] == "transferred" and out["pricing"]["cv_discount_mae"] > 0
    assert json.loads((tmp_path / "results.json").read_text())["pricing"] == out["pricing"]
    assert integrity.verify(str(export)) == (True, "ok")
    model, meta = PricingModel.load(str(export))
    assert meta["n_bundles"] == out["pricing"]["n_bundles"]
    assert pricing_step(tiny_config("stages=[prep, train, price]"), str(export)) == {"source": "the price stage"}


def test_a_pricing_folder_without_steam_bundles_fails_before_any_compute(tmp_path):
    """The pipeline checks pricing.data_dir before prep and training (it used to fail in the pricing
    step, after the training it had just paid for); stages that fit no pricing do not need it."""
    from bundlerec.config import PipelineConfig, PricingConfig
    from bundlerec.price import require_pricing_data

    cfg = PipelineConfig(pricing=PricingConfig(data_dir=str(tmp_path)), stages=["prep", "train", "register"])
    with pytest.raises(FileNotFoundError, match="no bundles.csv.gz"):
        require_pricing_data(cfg)
    require_pricing_data(PipelineConfig(pricing=PricingConfig(data_dir=str(tmp_path)), stages=["prep", "deploy"]))
    require_pricing_data(PipelineConfig(pricing=PricingConfig(data_dir=None), stages=["train"]))
    (tmp_path / "bundles.csv.gz").write_bytes(b"")
    require_pricing_data(cfg)
