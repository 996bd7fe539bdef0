"""The pipeline's fit step (bundlerec.eval.engine_fit): the served engine's parameters chosen on
validation baskets, and personalized generation measured as /v1/bundles answers."""

import json
import shutil

import numpy as np
import pytest

from bundlerec.eval.engine_fit import BasketQuery, generation_values, summarize


def _q(basket):
    return BasketQuery("u", [0], [0], [1.0], basket)


def test_generation_metrics_count_containment_coverage_and_best_jaccard():
    queries = [_q([1, 2, 3]), _q([4, 5])]
    generated = [[[1, 2], [1, 9]], []]  # query 1: one bundle inside the basket, one not; query 2: nothing
    v = generation_values(generated, queries)
    assert v["precision"].tolist() == [0.5, 0.0]
    assert v["coverage"].tolist() == [pytest.approx(2 / 3), 0.0]
    assert v["best_jaccard"].tolist() == [pytest.approx(2 / 3), 0.0]  # {1,2} vs {1,2,3}
    # one-to-one matching: the best bundle matched to the one basket; 2 generated + 0 generated, 2 baskets
    assert v["triplets"].tolist() == [[pytest.approx(2 / 3), 2, 1], [0.0, 0, 1]]
    s = summarize(v)
    assert s["n"] == 2 and s["precision"] == pytest.approx((2 / 3) / 2) and s["recall"] == pytest.approx((2 / 3) / 2)
    lo, hi = s["best_jaccard_ci"]
    assert lo <= s["best_jaccard"] <= hi


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_fit_chooses_the_engine_on_validation_baskets_and_the_export_serves_it(tiny_trained, tmp_path):
    from bundlerec.bundles.engine import EngineParams
    from bundlerec.eval.engine_fit import basket_queries, evaluate_generation, fit_engine, served_bundles
    from bundlerec.integrity import amend
    from bundlerec.inference.recommender import Recommender

    cfg, trained, _ = tiny_trained
    export = str(tmp_path / "export")
    shutil.copytree(trained["export_dir"], export)
    prep = cfg.data.output_dir
    val, test = basket_queries(prep, "val"), basket_queries(prep, "test")
    assert val and test
    last_val = {}
    for q in val:
        last_val[q.user_id] = max(q.time, last_val.get(q.user_id, q.time))
    assert all(q.time > last_val[q.user_id] for q in test if q.user_id in last_val)  # validation comes before test
    with amend(export, "export"):
        sel = fit_engine(export, prep)
    saved = json.loads((tmp_path / "export/bundle_engine.json").read_text())
    assert saved == sel["params"]  # the record and what the export carries are one
    assert sel["val_baskets"] == len(val) and len(sel["generation_val_f1"]) == 20
    best = max(sel["generation_val_f1"], key=sel["generation_val_f1"].get)
    assert {"compat": saved["compat"], "relevance_weight": saved["generation"]["relevance_weight"]} == json.loads(best)
    assert saved["selection"]["generation_val_f1"] == max(sel["generation_val_f1"].values())
    # the default engine is one point of the grid: what the fit chose is at least as good on validation
    default = json.dumps({"compat": EngineParams().compat, "relevance_weight": EngineParams().generation["relevance_weight"]})
    assert sel["generation_val_f1"][default] <= saved["selection"]["generation_val_f1"]
    # the export loads with those parameters (what Serve and the pyfunc load), and its answers are the scored ones
    rec = Recommender.from_export(export)
    assert rec.bundle_engine.params.compat == saved["compat"]
    c = rec.bundle_constraints(rec.history_for_user("nobody"))
    assert c.relevance_weight == saved["generation"]["relevance_weight"]
    res = evaluate_generation(export, prep)
    assert set(res["methods"]) == {"bundlerec", "default", "itemknn_greedy", "popular_pairs"}
    for m in res["methods"].values():
        assert 0 <= m["f1"] <= 1 and m["best_jaccard_ci"][0] <= m["best_jaccard"] <= m["best_jaccard_ci"][1]
        gate = m["leak_gate"]
        assert gate["targets_seen"] + gate["targets_unseen"] == sum(len(q.basket) for q in test)
    again = served_bundles(rec, test[:5])
    assert again == served_bundles(Recommender.from_export(export), test[:5])  # deterministic
    # the selection grids score the same bundles without pricing and naming them
    assert served_bundles(rec, test, priced=False) == served_bundles(rec, test)
    assert res["lift"]["vs"] in ("itemknn_greedy", "popular_pairs") and np.isfinite(res["lift"]["best_jaccard"]["lift"])
