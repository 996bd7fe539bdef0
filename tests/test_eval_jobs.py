"""The two evaluation commands, end to end, on small slices of the real datasets (as users run them)."""

import json
import os
import urllib.request

import pandas as pd
import pytest

from tests.support import INTENT, ROOT, STEAM, free_port, mlflow_get, tiny_encoder

FILES = ("items", "user_item", "user_session", "session_item", "session_bundle", "bundle_item", "bundle_intent",
         "user_bundle")


def _slice(dst, domain, sessions, extra_items=150, seed=0):
    """Same format, fewer sessions: their bundles, items, plus some catalog-only items."""
    src = f"{INTENT}/{domain}"
    t = {f: pd.read_csv(f"{src}/{f}.csv.gz") for f in FILES}
    sb = t["session_bundle"][t["session_bundle"].session_id.isin(sessions)]
    keep_items = set(t["session_item"][t["session_item"].session_id.isin(sessions)].item_id)
    extra = t["items"][~t["items"].item_id.isin(keep_items)].sample(extra_items, random_state=seed).item_id
    out = {
        "items": t["items"][t["items"].item_id.isin(keep_items | set(extra))],
        "session_item": t["session_item"][t["session_item"].session_id.isin(sessions)],
        "session_bundle": sb,
        "bundle_item": t["bundle_item"][t["bundle_item"].bundle_id.isin(sb.bundle_id)],
        "bundle_intent": t["bundle_intent"][t["bundle_intent"].bundle_id.isin(sb.bundle_id)],
        "user_session": t["user_session"][t["user_session"].session_id.isin(sessions)],
    }
    users = set(out["user_session"].user_id)
    out["user_bundle"] = t["user_bundle"][t["user_bundle"].user_id.isin(users)]
    out["user_item"] = t["user_item"][t["user_item"].user_id.isin(users)]
    os.makedirs(f"{dst}/{domain}", exist_ok=True)
    for f, df in out.items():
        df.to_csv(f"{dst}/{domain}/{f}.csv.gz", index=False)


@pytest.fixture(scope="module")
def bundle_slices(tmp_path_factory):
    """A directory of the bundlerec_intent format: 170 sessions of each of two domains."""
    root = tmp_path_factory.mktemp("bundles")
    for domain in ("electronic", "food"):
        s = pd.read_csv(f"{INTENT}/{domain}/session_bundle.csv.gz").session_id.drop_duplicates().sample(frac=1, random_state=0)
        _slice(root / "all", domain, set(s.iloc[:170]))
    return root


def tiny_bundles() -> list[str]:
    """The tiny random-init encoder (MiniLM's tokenizer) and a few steps: the subject here is the flow
    (fit, evaluate, register, serve what was scored), not what MiniLM's weights know."""
    return ["train.epochs=1", "train.max_steps_per_epoch=4", "train.micro_batch=8", f"model.name_or_path={tiny_encoder()}",
            "model.freeze_layers=0", "train.lr=1e-3", "data.item_max_tokens=32"]


def _post(url: str, body: dict, token: str) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def bundle_pipeline(ray_cluster, mlflow_server, bundle_slices, tmp_path_factory):
    """`bundlerec pipeline --config jobs/configs/bundlerec_intent.yaml` on the slices: prep (the users of
    eval_fold 1 held out), train (fit + evaluate), register, deploy; the summary, the results (with
    the split's train_dir and eval_dir) and the served engine's address."""
    from ray import serve

    from jobs.pipeline import main

    out = tmp_path_factory.mktemp("bundle-pipeline")
    port = free_port()
    summary = main(["--config", str(ROOT / "jobs/configs/bundlerec_intent.yaml"), f"output_root={out}",
                    f"data.events={bundle_slices / 'all'}",
                    *tiny_bundles(), f"mlflow.tracking_uri={mlflow_server}", "mlflow.experiment=bundle-pipeline",
                    "serve.model_name=bundle-pipeline", f"serve.url=http://127.0.0.1:{port}",
                    f"serve.dashboard_url={ray_cluster}", "serve.event_log_dir=", "serve.poll_s=2",
                    f"serve.model_cache_dir={out / 'models'}", f"pricing.data_dir={STEAM}"])
    try:
        yield {"summary": summary, "results": json.loads((out / "runs/bundlerec_intent/results.json").read_text()), "out": out,
               "url": f"http://127.0.0.1:{port}", "token": (out / "runs/bundlerec_intent/api_token").read_text().split()[0]}
    finally:
        serve.shutdown()  # frees the replica's CPU for the tests after this module


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_the_bundle_pipeline_serves_what_its_evaluation_scored(bundle_pipeline, bundle_slices, mlflow_server):
    """One flow on bundle data: the engine the pipeline's evaluation scored is the one registered and
    served, and the endpoint answers the evaluation's queries exactly as they were scored."""
    from dataclasses import replace

    from bundlerec.bundles.engine import top_k
    from bundlerec.eval.bundle_data import completion_queries, personal_queries
    from bundlerec.eval.bundle_scoring import personal_bundles
    from bundlerec.bundles.intent import load
    from bundlerec.inference.recommender import Recommender

    summary, results = bundle_pipeline["summary"], bundle_pipeline["results"]
    res = results["bundles_eval"]
    assert results["eval_dir"] == str(bundle_pipeline["out"] / "runs/bundlerec_intent/prep/split/eval")
    _check_bundle_evaluation(res, results["eval_dir"])
    # every epoch counts the rows it trained per domain; the rows are shuffled across domains before
    # they are written, so a step cap trains both
    from bundlerec.config import load_config

    workers = load_config(str(ROOT / "jobs/configs/bundlerec_intent.yaml")).train.num_workers
    rows = res["train"]["rows_by_domain"]
    assert set(rows) == {"electronic", "food"} and all(len(v) == 1 and v[0] > 0 for v in rows.values()), rows
    assert sum(v[0] for v in rows.values()) == res["train"]["steps_per_epoch"] * 8 * workers
    # registered on the declared bundle metric, and deployed
    assert summary["registered_alias"] == "champion" and summary["registered_version"] == "1"
    versions = mlflow_get(mlflow_server, "model-versions/search", filter="name='bundle-pipeline'")["model_versions"]
    tags = {t["key"]: t["value"] for t in versions[0]["tags"]}
    assert tags["primary_metric"] == "completion_recall@10" and 0 < float(tags["val_completion_recall_at_10"]) <= 1
    run = mlflow_get(mlflow_server, "runs/get", run_id=results["run_id"])["run"]
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics["completion/food/bundlerec/recall_at_10"] == pytest.approx(res["completion"]["food"]["bundlerec"]["recall@10"])
    assert "train_loss" in metrics  # the training logged to the same run
    arts = {f["path"] for f in mlflow_get(mlflow_server, "artifacts/list", run_id=results["run_id"], path="bundles")["files"]}
    assert {"bundles/evaluation.json", "bundles/evaluation.md", "bundles/bundles.png"} <= arts, arts
    assert summary["metrics"]["bundlerec"]["recall@10"] == pytest.approx(
        (res["completion"]["food"]["bundlerec"]["recall@10"] + res["completion"]["electronic"]["bundlerec"]["recall@10"]) / 2)
    assert summary["sample_bundle"] and summary["sample_completion"]["items"]
    assert summary["report_url"].endswith(f"/runs/{results['run_id']}/artifacts/bundles/evaluation.md")

    # the endpoint answers the evaluation's queries as they were scored: completion (first item -> the
    # rest) and personalized generation (a session's first bundle as purchases -> bundles)
    rec = Recommender.from_export(res["export_dir"])
    d = load(results["eval_dir"])["food"]
    base, token = bundle_pipeline["url"], bundle_pipeline["token"]
    for cart, _ in completion_queries(d.bundles, rec.item_pos, "first")[:6]:
        got = _post(f"{base}/v1/bundles/complete", {"items": [rec.item_ids[c] for c in cart], "k": 10}, token)
        want = top_k(rec.bundle_engine.complete_scores([cart]), 10)[0]
        assert [i["item_id"] for i in got["items"]] == [rec.item_ids[i] for i in want]
    qs = personal_queries(d, rec.item_pos)[:4]
    assert qs
    for (hist, _, _), want in zip(qs, personal_bundles(rec.bundle_engine, qs)):
        events = [{"item_id": rec.item_ids[i], "event_type": "purchase", "event_time": "2014-01-01T00:00:00Z"} for i in hist]
        # as_of: the moment of the query (the evaluation reads the history with no age)
        got = _post(f"{base}/v1/bundles", {"events": events, "as_of": "2014-01-01T00:00:00Z", "n": 3, "max_size": 4}, token)
        assert [[rec.item_pos[x["item_id"]] for x in b["items"]] for b in got["bundles"]] == want, hist

    # the serving object: every history source and a description with the history, as scored
    from datetime import datetime, timezone

    qs = [q for q in personal_queries(d, rec.item_pos) if q[1]][:5]
    assert qs
    when = datetime(2014, 1, 1, tzinfo=timezone.utc)
    qscores = rec.bundle_engine.query_scores([q[1] for q in qs])
    chosen = rec.bundle_engine.params
    for history, mode, query in (("recommender", "history", False), ("completion", "history", False),
                                 (chosen.history, "both", True)):  # both sources, whichever was chosen
        rec.bundle_engine = rec.bundle_engine.with_params(replace(chosen, history=history))
        for (hist, intent, _), want in zip(qs, personal_bundles(rec.bundle_engine, qs, mode, qscores=qscores)):
            h = rec.history_from_events([{"item_id": rec.item_ids[i], "event_type": "purchase", "event_time": when}
                                         for i in hist], now=when)
            c = rec.bundle_constraints(h, n=3, max_size=4)
            got = rec.bundles_for(h, c, query=intent if query else None)
            assert [[rec.item_pos[x["item_id"]] for x in b["items"]] for b in got] == want, (history, mode, intent)


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_eval_bundles_command(bundle_pipeline, bundle_slices, mlflow_server, tmp_path):
    """`jobs.eval_bundles --train-dir D --eval-dir E --out F` is the same selection and scoring: on the
    pipeline's trained export (--export: no second training) it gives the same figures, as its own MLflow run."""
    import shutil

    from jobs.eval_bundles import main

    export = tmp_path / "export"
    shutil.copytree(bundle_pipeline["results"]["export_dir"], export)
    out = tmp_path / "bundles.json"
    piped = bundle_pipeline["results"]
    res = main(["--train-dir", piped["train_dir"], "--eval-dir", piped["eval_dir"], "--out", str(out),
                "--work-dir", str(tmp_path / "work"), "--export", str(export), *tiny_bundles(),
                f"mlflow.tracking_uri={mlflow_server}", "mlflow.experiment=eval-test"])
    assert json.loads(out.read_text())["completion"] == res["completion"]
    assert res["engine_params"] == piped["bundles_eval"]["engine_params"]
    for task in ("generation", "personal", "intent"):
        assert res[task] == piped["bundles_eval"][task], task
    # completion: every method the same; the sentence-transformers baseline is trained again (in the
    # job's process in one, here in the other: other thread counts, other float sums) on the same pairs
    st = piped["bundles_eval"]["st_mnrl"]
    assert {k: res["st_mnrl"][k] for k in ("pairs", "steps", "batch_size")} == {k: st[k] for k in ("pairs", "steps", "batch_size")}
    for dom, methods in piped["bundles_eval"]["completion"].items():
        assert {m: v for m, v in res["completion"][dom].items() if m != "st_mnrl"} == \
            {m: v for m, v in methods.items() if m != "st_mnrl"}, dom
        assert "st_mnrl" in methods and "st_mnrl" in res["completion"][dom]
    # the evaluation is an MLflow run: its headline figures and result files
    run = mlflow_get(mlflow_server, "runs/get", run_id=res["mlflow_run_id"])["run"]
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics["completion/food/bundlerec/recall_at_10"] == pytest.approx(res["completion"]["food"]["bundlerec"]["recall@10"])
    assert metrics["personal/food/intent_plus_history/best_jaccard"] == \
        pytest.approx(res["personal"]["food"]["intent+history"]["best_jaccard"])
    assert "lift/food/recall_at_10_ci95_lo" in metrics and run["info"]["status"] == "FINISHED"
    arts = mlflow_get(mlflow_server, "artifacts/list", run_id=res["mlflow_run_id"], path="results")
    assert {"results/bundles.json", "results/bundles.md"} <= {f["path"] for f in arts["files"]}
    assert (tmp_path / "bundles.md").read_text().startswith("| completion recall@10 | electronic | food |")


def _check_bundle_evaluation(res: dict, eval_dir: str) -> None:
    """Every task, method and interval of one bundle evaluation; every choice made on validation and
    saved in the export; the serving object's completion reproduces the evaluation's figure."""
    for domain in ("electronic", "food"):
        for method in ("bundlerec", "popular", "itemknn", "lexical", "zeroshot", "tuned"):
            c = res["completion"][domain][method]
            assert 0 <= c["recall@10"] <= c["recall@20"] <= 1
            assert c["recall@10_ci"][0] <= c["recall@10"] <= c["recall@10_ci"][1]
            assert c["targets_seen"] + c["targets_unseen"] >= c["n"]
        for method in ("bundlerec", "popular", "itemknn", "lexical", "zeroshot"):
            g = res["generation"][domain][method]
            assert 0 <= g["f1"] <= 1 and g["f1_ci"][0] <= g["f1"] <= g["f1_ci"][1]
        assert res["lift"][domain]["vs"] in ("popular", "itemknn", "lexical", "zeroshot")
        # the leak gate: every method's top-10 share of items seen in training bundles, against
        # zero-shot's, and the control row (zero-shot with every seen item ranked last)
        gate = res["leak_gate"][domain]
        assert gate["zeroshot_seen_share@10"] == res["completion"][domain]["zeroshot"]["seen_share@10"]
        for method in ("bundlerec", "itemknn", "lexical", "tuned"):
            share = res["completion"][domain][method]["seen_share@10"]
            assert 0 <= share <= 1 and gate["methods"][method]["passes"] == (share >= gate["zeroshot_seen_share@10"] - 0.05)
        control = res["completion"][domain]["zeroshot_seen_penalty"]
        assert control["seen_share@10"] <= res["completion"][domain]["zeroshot"]["seen_share@10"]
        assert "zeroshot_seen_penalty" not in gate["methods"]
        lg = res["selection"]["leak_gate"]  # the gate in selection: the chosen fusion passed it on validation
        chosen = [k for k in lg["fusion_val_seen_share@10"] if json.loads(k) == res["engine_params"]["completion"]]
        assert len(chosen) == 1 and chosen[0] not in lg["fusion_rejected"]
        for k, doms in lg["fusion_rejected"].items():
            assert all(lg["fusion_val_seen_share@10"][k][d] < lg["zeroshot_val_seen_share@10"][d] - lg["max_drop"] for d in doms)
        pool = res["candidate_pool"][domain]  # what the re-ranker could reach at most, where it was chosen
        assert (pool["k"] == 0) if not res["engine_params"]["rerank"] else (0 <= pool["recall"] <= 1 and pool["k"] > 0)
        for method in ("bundlerec", "lexical", "zeroshot", "tuned"):  # intent text -> the bundle's items
            i = res["intent"][domain][method]
            assert i["n"] > 0 and i["recall@10_ci"][0] <= i["recall@10"] <= i["recall@10_ci"][1]
        assert res["intent_lift"][domain]["vs"] in ("lexical", "zeroshot")
        for method in ("bundlerec", "zeroshot", "lexical", "category"):  # names against the annotated intents
            n = res["naming"][domain][method]
            assert n["n"] > 0 and n["rouge1_f1_ci"][0] <= n["rouge1_f1"] <= n["rouge1_f1_ci"][1]
        assert 0 <= res["seen_share"][domain]["eval_targets_seen"] <= 1
        # personalized generation: history (a session's first bundle) -> its other bundles
        p = res["personal"][domain]
        for method in ("bundlerec", "itemknn_greedy", "zeroshot_greedy", "lexical_greedy", "popular_pairs",
                       "intent", "intent+history"):
            v = p[method]
            assert v["sessions"] > 0 and 0 <= v["f1"] <= 1 and v["best_jaccard_ci"][0] <= v["best_jaccard"] <= v["best_jaccard_ci"][1]
        assert res["personal_lift"][domain]["vs"] in ("itemknn_greedy", "zeroshot_greedy", "lexical_greedy", "popular_pairs")
        # the text encoder and the lexical index know what goes together: better than popularity
        for m in ("zeroshot", "lexical"):
            assert res["completion"][domain][m]["recall@20"] > res["completion"][domain]["popular"]["recall@20"]
    # every choice was made on validation users of the training directory, and saved in the export
    assert res["selection"]["validation"]["food"]["users"] > 0
    export = res["export_dir"]
    assert json.loads(open(f"{export}/bundle_engine.json").read()) == res["engine_params"]
    assert set(res["engine_params"]["query"]) <= {"tuned", "pretrained", "lexical"}
    # the re-ranker was fitted on the fit users' bundles; the export holds it exactly when it is used
    assert res["selection"]["rerank"]["positives"] > 0
    assert os.path.exists(f"{export}/rerank.skops") == res["engine_params"]["rerank"]
    assert json.load(open(f"{export}/intent_names.json"))["weights"] == res["selection"]["naming"]["chosen"]
    ps = res["selection"]["personal"]  # personalized generation's knobs, chosen on validation sessions
    assert len(ps["val_f1"]) == 12 and ps["chosen"] == json.loads(max(ps["val_f1"], key=ps["val_f1"].get))
    assert res["engine_params"]["history"] == ps["chosen"]["history"]
    assert res["engine_params"]["generation"]["relevance_weight"] == ps["chosen"]["relevance_weight"]
    ih = res["selection"]["intent_history"]
    assert res["engine_params"]["intent_history"] == json.loads(max(ih["val_f1"], key=ih["val_f1"].get))

    # evaluated as served: the serving object's completion reproduces the evaluation's figure
    from bundlerec.eval.bundle_data import completion_queries
    from bundlerec.bundles.intent import load
    from bundlerec.inference.recommender import Recommender

    rec = Recommender.from_export(export)
    d = load(eval_dir)["food"]
    queries = completion_queries(d.bundles, rec.item_pos, "first")
    hits = [len({i["item_id"] for i in rec.complete([rec.item_ids[c] for c in cart], 10)["items"]}
                & {rec.item_ids[t] for t in rest}) / len(rest) for cart, rest in queries]
    # (one query's worth of slack: the evaluation scores carts in batches, the endpoint one at a time,
    # and a batched matmul may round a near-tie the other way)
    assert abs(sum(hits) / len(hits) - res["completion"]["food"]["bundlerec"]["recall@10"]) <= 1 / len(hits) + 1e-9


def test_eval_pricing_command(tmp_path):
    from jobs.eval_pricing import main

    out = tmp_path / "pricing.json"
    res = main(["--data-dir", str(STEAM), "--out", str(out)])
    assert set(res["discount_mae"]) == {"bundlerec", "median", "median_by_size"}
    assert set(res["final_price_mape"]) == {"bundlerec", "median", "median_by_size"}
    assert json.loads(out.read_text())["discount_mae"] == res["discount_mae"]
    r = res["robustness"]
    assert set(r["mae_ratio_by_fold_seed"]) == {0, 1, 2, 3, 4} and 0 < r["grouped_by_overlap_component"]["ratio"] < 2
    assert 0 < r["no_overlap_subset"]["bundles"] < res["n_bundles"]
    # the predicted-vs-actual discount picture beside the JSON (a real PNG, one panel per method)
    png = tmp_path / "pricing_discounts.png"
    assert res["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
