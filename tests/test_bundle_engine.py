"""The bundle engine's pieces and the evaluation protocol's rules, without Ray: item text from
Amazon category paths, the lexical index and its safe round trip, channel fusion, the exported
parameters, the user-disjoint validation carve, and the intervals."""

import os

import numpy as np
import pandas as pd
import pytest

from bundlerec.bundles.engine import BundleEngine, EngineParams
from bundlerec.bundles.intent import Domain, category_and_brand
from bundlerec.model.lexical import Lexical
from bundlerec.pricing.demand import PricingModel
from bundlerec.data.schema import item_text
from bundlerec.data.statistics import CoStats
from bundlerec.eval.bundle_data import carve_validation
from bundlerec.eval.bundle_report import markdown, summarize_folds
from bundlerec.eval.bundle_scoring import f1_ci, f1_of
from bundlerec.eval.bundle_select import FUSION_CHANNELS, fusion_grid
from bundlerec.metrics import bootstrap_ci, paired_lift

from tests.support import INTENT

TEXTS = ["red running shoes | category: Women > Shoes > Running", "blue running socks | category: Women > Socks",
         "espresso coffee beans | category: Beverages > Coffee", "coffee grinder burr | category: Kitchen > Coffee",
         "hdmi cable 2m | category: Cables > HDMI", "usb-c cable | category: Cables > USB", "tea kettle steel",
         "green tea leaves | category: Beverages > Tea"]


def _items(texts=TEXTS):
    n = len(texts)
    return pd.DataFrame({"item_id": [f"i{k}" for k in range(n)], "title": texts, "category": ["c"] * n,
                         "price": [10.0] * n, "text": texts})


def _engine(params=None, seed=0):
    items = _items()
    n = len(items)
    rng = np.random.default_rng(seed)
    E_ = rng.normal(size=(n, 6))
    E_ /= np.linalg.norm(E_, axis=1, keepdims=True)
    stats = CoStats.from_groups([[0, 1], [2, 3], [4, 5]], n)
    return BundleEngine(items, None, E_, stats, PricingModel(), params=params or EngineParams(completion={"pretrained": 1.0}),
                        pretrained=E_, lexical=Lexical.fit(items.text), popularity=np.arange(n, dtype=float))


@pytest.mark.parametrize("raw,expected", [
    ("[[Clothing, Shoes & Jewelry,Shoes & Accessories: International Shipping Available],[Clothing, Shoes & Jewelry,S,"
     "SoftWalk],[Clothing, Shoes & Jewelry,Women,Shoes,Flats]]", ("Women > Shoes > Flats", "SoftWalk")),
    ("[[Grocery & Gourmet Food,Snack Foods,Rice Cakes, Chips & Crackers,Cakes]]",
     ("Snack Foods > Rice Cakes, Chips & Crackers > Cakes", None)),
    ("[[Clothing, Shoes & Jewelry,New Arrivals],[Clothing, Shoes & Jewelry,Men,Watches,Wrist Watches]]",
     ("Men > Watches > Wrist Watches", None)),
    ("[[Electronics]]", ("Electronics", None)),
])
def test_category_path_keeps_the_leaf_and_skips_noise_paths(raw, expected):
    assert category_and_brand(raw) == expected


def test_item_text_unescapes_and_keeps_the_description():
    t = item_text("Salt &amp; Pepper", "Pantry > Spices", "Acme", 3.5, "fine   sea salt\nfrom &quot;Brittany&quot;")
    assert t == 'Salt & Pepper | category: Pantry > Spices | brand: Acme | price: 3.50 | fine sea salt from "Brittany"'
    assert item_text("x", None, None, None, None) == "x"


def test_lexical_round_trip_is_plain_data_and_scores_alike(tmp_path):
    for setting in ("word-1-2", "char-3-5"):
        lex = Lexical.fit(TEXTS, setting)
        lex.save(str(tmp_path))
        back = Lexical.load(str(tmp_path))
        assert back.setting == setting
        np.testing.assert_allclose(back.cart_scores([[0], [2, 3]]), lex.cart_scores([[0], [2, 3]]), rtol=1e-6)
        np.testing.assert_allclose(back.query_scores(["coffee"]), lex.query_scores(["coffee"]), rtol=1e-6)
    assert sorted(os.listdir(tmp_path)) == ["lexical.json", "lexical_items.npz"]
    s = Lexical.fit(TEXTS).cart_scores([[2]])[0]  # the coffee beans' nearest other item shares "coffee"
    s[2] = -1
    assert int(s.argmax()) == 3


def test_completion_fusion_excludes_the_cart_and_a_single_channel_ranks_as_itself():
    eng = _engine()
    for ch in ("pretrained", "lexical", "popularity", "cooccurrence"):
        e = eng.with_params(EngineParams(completion={ch: 1.0}))
        raw = e.channel_scores(ch, [[2]])[0]
        fused = e.complete_scores([[2]])[0]
        assert fused[2] == -np.inf
        keep = np.arange(len(raw)) != 2
        assert list(np.argsort(-fused[keep], kind="stable")) == list(np.argsort(-raw[keep], kind="stable")), ch
    both = eng.with_params(EngineParams(completion={"pretrained": 0.5, "lexical": 0.5}))
    top = [i for i, _ in both.complete([2, 3], k=3)]
    assert len(top) == 3 and not {2, 3} & set(top)
    with pytest.raises(ValueError, match="at least one item"):
        eng.complete_scores([[]])


def test_free_text_queries_rank_by_the_chosen_channels():
    eng = _engine(EngineParams(query={"lexical": 1.0}))
    s = eng.query_scores(["coffee"])[0]
    assert set(np.argsort(-s)[:2]) == {2, 3}  # the two coffee items
    with pytest.raises(ValueError, match="some text"):
        eng.query_scores(["  "])
    with pytest.raises(ValueError, match="unknown engine channels"):
        EngineParams(query={"cooccurrence": 1.0})
    bundles = eng.with_params(EngineParams(query={"lexical": 1.0}, compat={"lexical": 1.0})).from_query(
        "coffee", __import__("bundlerec.bundles.generate", fromlist=["x"]).BundleConstraints(n=1, max_size=2, max_per_category=2))
    assert len(bundles) == 1 and {i["item_id"] for i in bundles[0]["items"]} == {"i2", "i3"}


def test_engine_params_are_checked_and_saved_with_the_export(tmp_path):
    with pytest.raises(ValueError, match="unknown engine channels"):
        EngineParams(completion={"magic": 1.0})
    p = EngineParams(completion={"tuned": 0.5, "lexical": 0.5}, compat={"pretrained": 1.0}, threshold=0.3)
    p.save(str(tmp_path))
    assert EngineParams.load(str(tmp_path)) == p
    assert EngineParams.load(str(tmp_path / "nothing")) == EngineParams()


def test_inconsistent_export_is_refused():
    items = _items()
    with pytest.raises(ValueError, match="pretrained index has 3 rows for 8 catalog items"):
        BundleEngine(items, None, np.zeros((8, 4)), CoStats.from_groups([], 8), PricingModel(), pretrained=np.zeros((3, 4)))


def test_detection_uses_the_saved_compatibility_and_threshold():
    eng = _engine(EngineParams(completion={"lexical": 1.0}, compat={"data": 1.0}, threshold=0.01))
    groups = eng.detect([0, 1, 2, 3, 6])
    assert sorted(map(sorted, groups)) == [[0, 1], [2, 3]]  # the co-purchase pairs, 6 alone
    never = eng.with_params(EngineParams(compat={"data": 1.0}, threshold=1e9))
    assert never.detect([0, 1, 2, 3]) == []


def _domain(n_users=200, seed=0):
    rng = np.random.default_rng(seed)
    rows = [{"bundle_id": f"b{u}-{k}", "session_id": f"s{u}", "user_id": f"u{u}", "items": [f"x{rng.integers(50)}", "x1"],
             "intent": "t"} for u in range(n_users) for k in range(2)]
    b = pd.DataFrame(rows)
    s = pd.DataFrame({"session_id": [f"s{u}" for u in range(n_users)], "user_id": [f"u{u}" for u in range(n_users)],
                      "items": [["x1", "x2"]] * n_users})
    return Domain("d", pd.DataFrame({"item_id": []}), b, s)


def test_validation_is_carved_by_user_and_deterministic():
    fit, val = carve_validation({"d": _domain()}, seed=0)
    fu, vu = set(fit["d"].bundles.user_id), set(val["d"].bundles.user_id)
    assert not fu & vu and len(fu | vu) == 200 and 8 <= len(vu) <= 40
    assert not set(fit["d"].sessions.session_id) & set(val["d"].sessions.session_id)
    assert set(carve_validation({"d": _domain()}, seed=0)[1]["d"].bundles.user_id) == vu
    assert set(carve_validation({"d": _domain()}, seed=1)[1]["d"].bundles.user_id) != vu


def test_intervals_cover_the_truth_and_a_paired_lift_of_equal_methods_is_zero():
    rng = np.random.default_rng(0)
    v = rng.binomial(1, 0.3, size=400).astype(float)
    lo, hi = bootstrap_ci(v)
    assert lo < v.mean() < hi and hi - lo < 0.12
    assert bootstrap_ci(v, seed=3) != bootstrap_ci(v, seed=4)  # the seed draws the resamples
    with pytest.raises(TypeError):  # a seed by position once became the number of resamples
        bootstrap_ci(v, 3)
    with pytest.raises(ValueError, match="at least one resample"):
        bootstrap_ci(v, resamples=0)
    same = paired_lift(v, v)
    assert same["lift"] == 0 and same["ci"] == [0.0, 0.0]
    better = paired_lift(np.clip(v + rng.binomial(1, 0.2, 400), 0, 1), v)
    assert better["ci"][0] > 0
    tr = np.array([[1.0, 1, 1]] * 50 + [[0.0, 1, 1]] * 50)
    f1 = f1_of(tr)
    lo, hi = f1_ci(tr)
    assert f1 == 0.5 and lo < 0.5 < hi


def test_fusion_grid_is_the_simplex_and_includes_every_pure_channel():
    grid = fusion_grid()
    assert all(abs(sum(w.values()) - 1) < 1e-9 for w in grid) and len(grid) == 15
    for ch in FUSION_CHANNELS:
        assert {ch: 1.0} in grid


def test_real_sessions_load_with_their_users():
    from bundlerec.bundles.intent import load_domain

    d = load_domain("food", f"{INTENT}/food")
    assert d.bundles.user_id.str.startswith("food:u").all()
    # every bundle's session belongs to the same user as the bundle
    owner = d.sessions.set_index("session_id").user_id
    assert (d.bundles.session_id.map(owner) == d.bundles.user_id).all()


def test_fold_summary_means_and_sds_and_markdown():
    def fold(r, lift):
        return {"completion": {"food": {"bundlerec": {"recall@10": r, "ndcg@10": r / 2}, "lexical": {"recall@10": 0.2, "ndcg@10": 0.1}}},
                "generation": {"food": {"bundlerec": {"f1": 0.6}}},
                "lift": {"food": {"vs": "lexical", "recall@10": {"lift": lift, "ci": [lift - 0.1, lift + 0.1]}}}}

    sm = summarize_folds({1: fold(0.3, 0.5), 2: fold(0.5, 1.5)})
    assert sm["completion"]["food"]["bundlerec"]["recall@10"] == {"mean": 0.4, "sd": pytest.approx(0.1414, abs=1e-4)}
    assert sm["lift"]["food"]["mean"] == 1.0 and sm["folds"] == [1, 2]
    md = markdown({"summary": sm})
    assert "| bundlerec | 0.4000 ± 0.1414 |" in md and "+150.0% [+140.0%, +160.0%] vs lexical" in md


def _transition_engine(seed=0):
    """A catalog where bundles pair category ``k a`` with ``k b`` and the text channels know nothing:
    random embeddings, titles without shared words across the pair."""
    rng = np.random.default_rng(seed)
    cats = [f"Dept{k} > {s}" for k in range(3) for s in ("Left", "Right")]
    rows = [(f"c{c}-{j}", f"w{c}x{j} v{rng.integers(1000)}", cat) for c, cat in enumerate(cats) for j in range(40)]
    items = pd.DataFrame(rows, columns=["item_id", "title", "category"]).assign(price=5.0, brand=None)
    items["text"] = items.title
    n = len(items)
    E_ = rng.normal(size=(n, 8))
    E_ /= np.linalg.norm(E_, axis=1, keepdims=True)
    eng = BundleEngine(items, None, E_, CoStats.from_groups([], n), PricingModel(), pretrained=E_,
                       lexical=Lexical.fit(items.text), params=EngineParams(completion={"pretrained": 1.0}))
    pos = lambda c, j: c * 40 + j  # noqa: E731
    return eng, pos, rng


def test_reranker_learns_category_transitions_that_carry_over_to_unseen_items(tmp_path):
    from bundlerec.bundles.rerank import CategoryStats, Reranker

    eng, pos, rng = _transition_engine()
    # training bundles use items 0-29 of each category; the test carts and answers are items 30-39
    bundles = [[pos(2 * k, int(rng.integers(30))), pos(2 * k + 1, int(rng.integers(30)))]
               for k in range(3) for _ in range(60)]
    queries = [([b[0]], [b[1]]) for b in bundles] + [([b[1]], [b[0]]) for b in bundles]
    half = [bundles[::2], bundles[1::2]]
    folds = [(queries[f::2], CategoryStats.from_groups(half[1 - f], eng.categories)) for f in range(2)]
    rr = Reranker.fit(eng, folds, CategoryStats.from_groups(bundles, eng.categories), k=100)
    eng.reranker = rr
    carts = [[pos(2 * k, j)] for k in range(3) for j in range(30, 40)]
    partner = [2 * k + 1 for k in range(3) for _ in range(10)]
    fused = eng.complete_scores(carts)
    reranked = eng.with_params(EngineParams(completion={"pretrained": 1.0}, rerank=True)).complete_scores(carts)
    share = lambda s: np.mean([np.mean(np.argsort(-r)[:10] // 40 == p) for r, p in zip(s, partner)])  # noqa: E731
    assert share(reranked) > 0.8 > 0.3 > share(fused)
    assert all(reranked[b, c[0]] == -np.inf for b, c in enumerate(carts))  # the cart is never proposed
    # safe round trip: same scores after load; foreign pickled types and a changed feature list are refused
    rr.save(str(tmp_path))
    back = Reranker.load(str(tmp_path))
    eng.reranker = back
    np.testing.assert_allclose(eng.with_params(EngineParams(completion={"pretrained": 1.0}, rerank=True))
                               .complete_scores(carts), reranked)
    meta = __import__("json").load(open(tmp_path / "rerank.json"))
    meta["features"] = meta["features"][:-1]
    __import__("json").dump(meta, open(tmp_path / "rerank.json", "w"))
    with pytest.raises(ValueError, match="saved with features"):
        Reranker.load(str(tmp_path))


def test_rerank_without_a_reranker_in_the_export_is_refused(tmp_path):
    EngineParams(completion={"pretrained": 1.0}, rerank=True).save(str(tmp_path))
    (tmp_path / "bundlerec.json").write_text("{}")
    np.save(tmp_path / "item_index.npy", np.zeros((len(_items()), 4), np.float32))
    CoStats.from_groups([], len(_items())).save(str(tmp_path))
    with pytest.raises(ValueError, match="no re-ranker"):
        BundleEngine.from_export(str(tmp_path), model=object(), items=_items())


def test_served_prices_respect_the_shops_limits_with_catalog_costs():
    from bundlerec.bundles.generate import BundleConstraints
    from bundlerec.pricing.demand import PriceLimits

    items = _items().assign(price=[10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0])
    items["cost"] = items.price * 0.5
    items.loc[7, "cost"] = np.nan  # one item without a cost
    n = len(items)
    E_ = np.eye(n)
    # a model whose optimal discount is large (0.6): discounted bundles pay for some carts (both offers occur)
    eng = BundleEngine(items, None, E_, CoStats.from_groups([[0, 1], [2, 3], [4, 5]], n), PricingModel(default_discount=0.6),
                       params=EngineParams(compat={"data": 1.0}), pretrained=E_)
    limits = PriceLimits(max_discount=0.3, min_margin=0.5, price_ending=0.95)
    out = eng.personalized(np.arange(n, dtype=float)[::-1].copy(), BundleConstraints(n=3, max_size=2, max_per_category=2, limits=limits))
    assert any(b["bundle_price"] is not None for b in out)
    for b in out:
        pos = [eng.item_ids.index(i["item_id"]) for i in b["items"]]
        if 7 in pos:  # min_margin cannot be checked without the cost: not priced, and the response says why
            assert b["bundle_price"] is None and "cost" in b["price_source"] and b["offer"] is None
            continue
        if b["offer"] == "separately":  # no discount earns more than the items at their own prices
            assert b["bundle_price"] is None and b["discount"] == 0.0 and "margin" in b["offer_reason"]
            continue
        assert b["offer"] == "bundle" and "margin" in b["offer_reason"]  # costs given: the margin is compared
        cost = float(items.cost[pos].sum())
        assert b["bundle_price"] >= cost * 1.5 - 1e-9 and b["discount"] <= 0.3 + 1e-12
        assert round(b["bundle_price"] * 100) % 100 == 95
    impossible = eng.personalized(np.arange(n, dtype=float)[::-1].copy(),
                                  BundleConstraints(n=1, max_size=2, max_per_category=2,
                                                                  limits=PriceLimits(min_margin=5.0)))
    assert impossible[0]["bundle_price"] is None and impossible[0]["price_source"].startswith("none (no price")


def test_rouge1_and_intent_names_from_the_nearest_annotated_bundle(tmp_path):
    from bundlerec.bundles.naming import IntentNamer, rouge1_f1

    assert rouge1_f1("Coffee beans", "coffee") == pytest.approx(2 / 3)
    assert rouge1_f1("tea", "coffee") == 0.0 and rouge1_f1("", "x") == 0.0
    eng = _engine()
    texts = ["morning coffee", "cable kit", "running gear"]
    groups = [[2, 3], [4, 5], [0, 1]]
    c = np.stack([eng.pretrained[g].mean(0) for g in groups])
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    namer = IntentNamer(texts, c, np.zeros_like(c), {"neighbour": 1.0})
    assert namer.names(eng, [[2, 3], [5, 4], [0]]) == ["morning coffee", "cable kit", "running gear"]
    lexical = namer.names(eng, [[2], [4]], {"lexical": 1.0})  # TF-IDF of the items against the intent texts
    assert lexical[0] == "morning coffee" and lexical[1] == "cable kit"
    namer.save(str(tmp_path))
    back = IntentNamer.load(str(tmp_path))
    assert back.texts == texts and back.weights == {"neighbour": 1.0}
    eng.namer = back
    assert eng.name([2, 3]) == "morning coffee"  # served bundles carry the drawn name
    with pytest.raises(ValueError, match="unknown naming channels"):
        IntentNamer(texts, c, c, {"magic": 1.0})


def test_the_leak_gate_its_control_row_and_the_rerankers_pool():
    """The leak gate's figures of a method (top-10 share of items seen in training, recall on seen and
    unseen targets), the control row that ranks every seen item last, and the re-ranker's pool recall
    (all targets inside a pool as large as the catalog)."""
    from bundlerec.eval.bundle_scoring import SeenPenalty, leak_gate, pool_recall, split_recall
    from bundlerec.bundles.rerank import CategoryStats, Reranker

    eng, pos, rng = _transition_engine()
    seen = {pos(c, j) for c in range(6) for j in range(30)}  # items 0-29 of each category were trained on
    queries = [([pos(2 * k, j)], [pos(2 * k + 1, j), pos(2 * k + 1, j - 30)]) for k in range(3) for j in range(30, 40)]
    zs = split_recall(eng, queries, seen)
    top = np.argsort(-eng.complete_scores([q[0] for q in queries]), axis=1, kind="stable")[:, :10]
    assert zs["seen_share@10"] == pytest.approx(np.isin(top, list(seen)).mean())
    assert zs["targets_seen"] == zs["targets_unseen"] == len(queries)
    ctrl = split_recall(SeenPenalty(eng, seen), queries, seen)
    assert ctrl["seen_share@10"] == 0 and ctrl["recall@10_seen"] == 0  # 59 unseen items rank above every seen one
    completion = {"zeroshot": zs, "bundlerec": ctrl, "zeroshot_seen_penalty": ctrl, "same": zs}
    gate = leak_gate(completion)
    assert gate["zeroshot_seen_share@10"] == zs["seen_share@10"] and "zeroshot_seen_penalty" not in gate["methods"]
    assert gate["methods"]["same"]["passes"] and gate["methods"]["bundlerec"]["passes"] == (zs["seen_share@10"] <= 0.05)
    # the re-ranker's pool: none without one; every target inside a pool of the whole catalog
    assert pool_recall(eng, queries) == {"k": 0, "recall": None}
    bundles = [[pos(2 * k, int(rng.integers(30))), pos(2 * k + 1, int(rng.integers(30)))] for k in range(3) for _ in range(20)]
    qs = [([b[0]], [b[1]]) for b in bundles]
    eng.reranker = Reranker.fit(eng, [(qs, CategoryStats.from_groups(bundles, eng.categories))],
                                CategoryStats.from_groups(bundles, eng.categories), k=len(eng.item_ids))
    ranked = eng.with_params(EngineParams(completion={"pretrained": 1.0}, rerank=True))
    assert pool_recall(ranked, queries) == {"k": len(eng.item_ids), "recall": 1.0, "targets": 2 * len(queries)}


def test_the_selection_leak_gate_rejects_a_falling_seen_share_whatever_its_recall():
    """gated_best: the best recall among candidates whose top-10 seen share stays within 5 points of
    zero-shot's in every domain; recall_and_shares measures the shares the gate compares."""
    from bundlerec.eval.bundle_scoring import SeenPenalty, gated_best, recall_and_shares, split_recall

    ref = {"a": 0.6, "b": 0.5}
    recall = {"zs": 0.20, "leaky": 0.40, "ok": 0.25, "edge": 0.22}
    shares = {"zs": ref, "leaky": {"a": 0.61, "b": 0.40}, "ok": {"a": 0.58, "b": 0.46}, "edge": {"a": 0.55, "b": 0.5}}
    best, rejected = gated_best(recall, shares, ref)
    assert best == "ok" and rejected == {"leaky": ["b"]}  # the highest recall fails in one domain: out
    with pytest.raises(ValueError, match="every candidate"):
        gated_best({"leaky": 0.4}, {"leaky": shares["leaky"]}, ref)
    eng, pos, _ = _transition_engine()
    seen = {pos(c, j) for c in range(6) for j in range(30)}
    queries = {"d": [([pos(2 * k, j)], [pos(2 * k + 1, j)]) for k in range(3) for j in range(30, 40)]}
    r, sh = recall_and_shares(eng, queries, {"d": None}, seen)
    assert sh["d"] == pytest.approx(split_recall(eng, queries["d"], seen)["seen_share@10"])
    _, sh_ctrl = recall_and_shares(SeenPenalty(eng, seen), queries, {"d": None}, seen)
    assert sh_ctrl["d"] == 0.0 and sh["d"] > 0.05  # the control shows no seen item: rejected beside zero-shot
    assert gated_best({"zs": r, "ctrl": r + 1}, {"zs": sh, "ctrl": sh_ctrl}, sh) == ("zs", {"ctrl": ["d"]})


def test_pooled_lifts_pair_the_same_queries_over_every_fold():
    """summarize_folds pools each fold's per-query Recall@10 and bootstraps the pairs: the lift is the
    ratio of the pooled means, the best baseline is chosen by pooled mean, the interval excludes 0
    for a clear gain and holds 0 for none."""
    rng = np.random.default_rng(0)

    def fold(n):
        z = (rng.random(n) < 0.3).astype(float)
        return {"baselines": ["lexical", "zeroshot", "st_mnrl"],
                "per_query": {"food": {"bundlerec": np.maximum(z, rng.random(n) < 0.2).tolist(), "tuned": z.tolist(),
                                       "zeroshot": z.tolist(), "lexical": (rng.random(n) < 0.1).astype(float).tolist(),
                                       "st_mnrl": z.tolist()}}}

    folds = {1: fold(400), 2: fold(600)}
    p = summarize_folds(folds)["pooled"]["food"]
    bund = np.concatenate([f["per_query"]["food"]["bundlerec"] for f in folds.values()])
    zs = np.concatenate([f["per_query"]["food"]["zeroshot"] for f in folds.values()])
    assert p["queries"] == 1000 and p["best_baseline"] in ("zeroshot", "st_mnrl")
    assert p["bundlerec_vs_best"]["lift"] == pytest.approx(bund.mean() / zs.mean() - 1)
    assert p["bundlerec_vs_best"]["ci"][0] > 0  # a gain on every fold's queries
    lo, hi = p["tuned_vs_zeroshot"]["ci"]
    assert p["tuned_vs_zeroshot"]["lift"] == 0 and lo == hi == 0  # identical per query: no lift, no spread
    md = markdown({"summary": summarize_folds(folds)})
    assert "pooled queries" in md and "| food | 1000 | +0.0% [+0.0%, +0.0%]" in md
