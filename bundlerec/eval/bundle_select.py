"""The served bundle engine's parameters, chosen on the validation users carved from the
training directory (never on the evaluation directory): the export with its engine assets, and
every grid of the choice (fusion weights, re-ranker, lexical setting, compatibility, detection
threshold, naming, personalized generation)."""

from __future__ import annotations
import hashlib
import itertools
import json
import logging
import os
import time
from dataclasses import replace
import numpy as np
import pandas as pd
from bundlerec.bundles.engine import (
    QUERY_CHANNELS,
    BundleEngine,
    EngineParams,
    write_engine_assets,
)
from bundlerec.bundles.intent import Domain, load
from bundlerec.model.lexical import GRID as LEXICAL_GRID
from bundlerec.model.lexical import Lexical
from bundlerec.bundles.naming import CHANNELS as NAMING_CHANNELS
from bundlerec.bundles.naming import IntentNamer
from bundlerec.bundles.rerank import RERANK_FILE, RERANK_MODEL, CategoryStats, Reranker
from bundlerec.config import PipelineConfig
from bundlerec.data.statistics import CoStats, item_counts
from bundlerec.integrity import amend
from bundlerec.eval.bundle_data import annotated, carve_validation, completion_queries, intent_queries, personal_queries, session_truth, write_training_data
from bundlerec.eval.bundle_scoring import LEAK_GATE_POINTS, gated_best, mean_recall, recall_and_shares, named, channel_cache, detection_triplets, f1_of, history_matrix, naming_values, personal_bundles, personal_values, query_values

log = logging.getLogger(__name__)

FUSION_STEP = 0.25  # completion fusion grid: weights on the simplex over these channels, this step

FUSION_CHANNELS = ("tuned", "pretrained", "lexical")

BASELINE_COMPAT = {"itemknn": {"data": 1.0}, "zeroshot": {"pretrained": 1.0}, "lexical": {"lexical": 1.0}}

COMPAT_DATA = (0.0, 0.5, 1.0)  # detection: weight of the co-purchase sPMI term

COMPAT_TEXT = ({"tuned": 1.0}, {"tuned": 1.0, "pretrained": 1.0}, {"tuned": 1.0, "lexical": 1.0},
               {"tuned": 1.0, "pretrained": 1.0, "lexical": 1.0}, {"pretrained": 1.0, "lexical": 1.0})

RERANK_FOLDS = 5  # out-of-fold category statistics for the re-ranker's training rows (by user)

RERANK_MAX_QUERIES = 12000  # training queries of the re-ranker (a random subset above this)

THRESHOLD_QUANTILES = tuple(np.round(np.linspace(0.3, 0.99, 12), 3))  # of within-session pair scores

PERSONAL_HISTORY = ("recommender", "completion")  # EngineParams.history, chosen on validation

PERSONAL_RELEVANCE = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # the generation's relevance weight, chosen on validation

INTENT_HISTORY_GRID = ({"query": 0.25, "history": 0.75}, {"query": 0.5, "history": 0.5}, {"query": 0.75, "history": 0.25},
                       {"query": 0.9, "history": 0.1}, {"query": 1.0, "history": 0.0})  # the last: the description alone


def fusion_grid(channels=FUSION_CHANNELS) -> list[dict]:
    steps = int(round(1 / FUSION_STEP))
    out = []
    for w in itertools.product(range(steps + 1), repeat=len(channels)):
        if sum(w) == steps:
            out.append({c: x * FUSION_STEP for c, x in zip(channels, w) if x})
    return out


def select_personal(engine: BundleEngine, val: dict[str, Domain], index: dict) -> tuple[dict, dict]:
    """Personalized generation's own knobs, by pooled F1 of history -> bundles on the validation
    sessions: where the relevance comes from (``EngineParams.history``) and the relevance weight
    (``PERSONAL_HISTORY`` x ``PERSONAL_RELEVANCE``); the defaults where validation has no session with
    two bundles. Returns ({history, generation}, the record)."""
    qs = [q for d in val.values() for q in personal_queries(d, index)]
    if not qs:
        return {"history": engine.params.history, "generation": engine.params.generation}, \
            {"chosen_on": "no validation session with two bundles: the defaults"}
    f1 = {}
    for hist in PERSONAL_HISTORY:
        e = engine.with_params(replace(engine.params, history=hist))
        hs = history_matrix(e, qs)
        for rw in PERSONAL_RELEVANCE:
            e = engine.with_params(replace(e.params, generation={**engine.params.generation, "relevance_weight": rw}))
            f1[json.dumps({"history": hist, "relevance_weight": rw})] = \
                f1_of(personal_values(personal_bundles(e, qs, hscores=hs), qs)["triplets"])
    best = json.loads(max(f1, key=f1.get))
    return ({"history": best["history"], "generation": {**engine.params.generation, "relevance_weight": best["relevance_weight"]}},
            {"chosen_on": "validation sessions with >= 2 bundles", "sessions": len(qs), "val_f1": f1, "chosen": best})


def select_intent_history(engine: BundleEngine, val: dict[str, Domain], index: dict) -> tuple[dict, dict]:
    """The weights of a description against a history, by pooled F1 of intent + history on the
    validation sessions with an intent; the default where there are none."""
    qs = [q for d in val.values() for q in personal_queries(d, index) if q[1]]
    if not qs:
        return EngineParams().intent_history, {"chosen_on": "no validation sessions with an intent: the default"}
    qscores = engine.query_scores([q[1] for q in qs])
    f1 = {}
    for w in INTENT_HISTORY_GRID:
        e = engine.with_params(replace(engine.params, intent_history=w))
        f1[json.dumps(w)] = f1_of(personal_values(personal_bundles(e, qs, "both", qscores=qscores), qs)["triplets"])
    best = json.loads(max(f1, key=f1.get))
    return best, {"chosen_on": "validation sessions with an intent", "sessions": len(qs), "val_f1": f1}


def select_lexical(engine: BundleEngine, items: pd.DataFrame, val_q: dict) -> tuple[Lexical, dict]:
    scores = {}
    for setting in LEXICAL_GRID:
        e = engine.with_params(EngineParams(completion={"lexical": 1.0}))
        e.lexical = Lexical.fit(items.text.tolist(), setting)
        scores[setting] = mean_recall(e, val_q, {d: None for d in val_q})
    best = max(scores, key=scores.get)
    return Lexical.fit(items.text.tolist(), best), {"grid": list(LEXICAL_GRID), "val_recall@10": scores, "chosen": best}


def fit_reranker(engine: BundleEngine, fit: dict[str, Domain], index: dict, seed: int) -> Reranker:
    """The completion re-ranker on the fit users' bundles: every item of a bundle is once the cart of
    the rest; its category statistics come from the other folds' users (out-of-fold)."""
    fold_of = lambda u: int(hashlib.sha1(f"rerank:{seed}:{u}".encode()).hexdigest(), 16) % RERANK_FOLDS  # noqa: E731
    bundles = [([index[i] for i in b], fold_of(u)) for d in fit.values()
               for b, u in zip(d.bundles["items"], d.bundles["user_id"])]
    queries = [([ids[k]], ids[:k] + ids[k + 1:], f) for ids, f in bundles for k in range(len(ids)) if len(ids) > 1]
    rng = np.random.default_rng(seed)
    if len(queries) > RERANK_MAX_QUERIES:
        queries = [queries[i] for i in sorted(rng.choice(len(queries), RERANK_MAX_QUERIES, replace=False))]
    folds = [([(c, r) for c, r, f in queries if f == k],
              CategoryStats.from_groups([ids for ids, f in bundles if f != k], engine.categories))
             for k in range(RERANK_FOLDS)]
    return Reranker.fit(engine, folds, CategoryStats.from_groups([ids for ids, _ in bundles], engine.categories))


def select_naming(engine: BundleEngine, fit: dict[str, Domain], val: dict[str, Domain], index: dict) -> tuple[IntentNamer | None, dict]:
    """The namer from the fit users' annotated bundles, its channel weights chosen on validation."""
    train = [p for ps in annotated(fit, index).values() for p in named(ps)]
    val_b = {d: named(ps) for d, ps in annotated(val, index).items()}
    if not train or not any(val_b.values()):
        return None, {"skipped": "no annotated intents"}
    namer = IntentNamer.fit([b for b, _ in train], [t for _, t in train], engine)
    caches = {d: namer.channel_scores(engine, [b for b, _ in v]) for d, v in val_b.items() if v}
    scores = {json.dumps(w): float(np.mean([naming_values(engine, namer, val_b[d], w, c).mean() for d, c in caches.items()]))
              for w in fusion_grid(NAMING_CHANNELS)}
    namer.weights = json.loads(max(scores, key=scores.get))
    return namer, {"intents": len(train), "val_rouge1_f1": scores, "chosen": namer.weights}


def select_threshold(engine: BundleEngine, compat: dict, val_s: dict) -> tuple[float, float, list]:
    """Best detection threshold for ``compat`` on the validation sessions: (threshold, val F1, grid)."""
    e = engine.with_params(EngineParams(completion=engine.params.completion, compat=compat))
    pair_scores = np.concatenate([e.compat.matrix(ids)[np.triu_indices(len(ids), 1)]
                                  for s in val_s.values() for ids, _ in s if len(ids) > 1] or [np.zeros(1)])
    grid = sorted({float(x) for x in np.quantile(pair_scores, THRESHOLD_QUANTILES)})
    f1 = {}
    for th in grid:
        e2 = e.with_params(EngineParams(completion=e.params.completion, compat=compat, threshold=th))
        f1[th] = float(np.mean([f1_of(detection_triplets(e2, s)) for s in val_s.values() if s]))
    best = max(f1, key=f1.get)
    return best, f1[best], grid


def prepare_export(cfg: PipelineConfig, train_dir: str, eval_dir: str, work_dir: str, export_dir: str | None = None,
                   cache_dir: str | None = None, run_id: str | None = None):
    """Train (or reuse ``export_dir``) on the fit part of ``train_dir``; returns the pieces the
    selection and evaluation need. ``run_id``: the MLflow run the training logs to."""
    from bundlerec.data.catalog import finalize, load_items, padded_tokens
    from bundlerec.train.fit import fit as train_fit

    train, evald = load(train_dir), load(eval_dir)
    fit, val = carve_validation(train, cfg.train.seed)
    cat = pd.concat([d.items for d in list(train.values()) + list(evald.values())]).drop_duplicates("item_id")
    prep_dir = write_training_data(fit, val, finalize(cat), os.path.join(work_dir, "prep"), cfg, seed=cfg.train.seed)
    items = load_items(prep_dir)
    index = dict(zip(items.item_id, items.item_idx))
    n = len(items)
    cfg.data.output_dir = prep_dir
    if export_dir:
        meta = json.load(open(os.path.join(export_dir, "bundlerec.json")))
        trained = {"export_dir": export_dir, "n_train": meta.get("n_train"), "steps_per_epoch": None,
                   "train_seconds": None, "last_metrics": meta.get("last_metrics")}
    else:
        domain_of = {i: d.name for d in [*evald.values(), *train.values()] for i in d.items.item_id}
        trained = train_fit(cfg, prep_dir, run_id=run_id, export_dir=os.path.join(work_dir, "export"),
                            item_groups=[domain_of.get(i, "other") for i in items.item_id])
    export = trained["export_dir"]
    with amend(export, "export"):  # verified before, re-sealed after (bundlerec.integrity)
        # the engine's statistics: fit users' bundles and sessions only (validation stays unseen)
        groups = [[index[i] for i in b] for d in fit.values() for b in d.bundles["items"]]
        groups += [[index[i] for i in s if i in index] for d in fit.values() for s in d.sessions["items"]]
        CoStats.from_groups(groups, n).save(export)
        np.save(os.path.join(export, "popularity.npy"),
                item_counts([[index[i] for i in b] for d in fit.values() for b in d.bundles["items"]], n))
        log.info("eval_bundles: encoding the catalog with the pretrained encoder (%d items)", n)
        ids, mask = padded_tokens(items)
        write_engine_assets(export, items, cfg.model.name_or_path, ids, mask, cfg.model.temperature, cache_dir)
    return train, fit, val, evald, items, index, export, trained


def select(engine: BundleEngine, items: pd.DataFrame, index: dict, fit: dict[str, Domain], val: dict[str, Domain],
           export: str, seed: int = 0) -> dict:
    """Choose every engine parameter on the validation users; saves bundlerec's in the export."""
    val_q = {d: completion_queries(v.bundles, index, "first") for d, v in val.items()}
    val_s = {d: session_truth(v, index) for d, v in val.items()}
    lexical, lex_sel = select_lexical(engine, items, val_q)
    lexical.save(export)
    engine.lexical = lexical
    log.info("eval_bundles: lexical setting %s (val recall@10 %s)", lex_sel["chosen"], lex_sel["val_recall@10"])
    caches = {d: channel_cache(engine, [c for c, _ in q], FUSION_CHANNELS) if q else None for d, q in val_q.items()}
    # the leak gate: a candidate whose top-10 holds over LEAK_GATE_POINTS less of the items seen in the
    # fit users' bundles than zero-shot's (in any domain) is rejected, whatever its recall
    seen = {index[i] for d in fit.values() for b in d.bundles["items"] for i in b}
    _, ref = recall_and_shares(engine.with_params(EngineParams(completion={"pretrained": 1.0})), val_q, caches, seen)
    fusion, shares = {}, {}
    for w in fusion_grid():
        fusion[json.dumps(w)], shares[json.dumps(w)] = recall_and_shares(engine.with_params(EngineParams(completion=w)), val_q, caches, seen)
    best, fusion_rejected = gated_best(fusion, shares, ref)
    best_w = json.loads(best)
    log.info("eval_bundles: completion fusion %s (val recall@10 %.4f; leak gate rejected %d of %d)", best_w,
             fusion[best], len(fusion_rejected), len(fusion))
    t0 = time.time()
    engine.reranker = fit_reranker(engine.with_params(EngineParams(completion=best_w)), fit, index, seed)
    rerank_val, rerank_shares = {}, {}
    for on in (False, True):
        rerank_val[str(on)], rerank_shares[str(on)] = recall_and_shares(
            engine.with_params(EngineParams(completion=best_w, rerank=on)), val_q, caches, seen)
    chosen_rerank, rerank_rejected = gated_best(rerank_val, rerank_shares, ref)
    use_rerank = chosen_rerank == "True"
    leak = {"zeroshot_val_seen_share@10": ref, "max_drop": LEAK_GATE_POINTS, "fusion_val_seen_share@10": shares,
            "fusion_rejected": fusion_rejected, "rerank_val_seen_share@10": rerank_shares,
            "rerank_rejected": rerank_rejected}
    if use_rerank:
        engine.reranker.save(export)
    else:  # an earlier selection's re-ranker (--reuse-exports) must not stay beside these parameters
        for f in (RERANK_FILE, RERANK_MODEL):
            if os.path.exists(os.path.join(export, f)):
                os.remove(os.path.join(export, f))
    log.info("eval_bundles: re-ranker fitted in %.0f s on %d rows; val recall@10 %.4f without, %.4f with -> %s",
             time.time() - t0, engine.reranker.info["rows"], rerank_val["False"], rerank_val["True"],
             "used" if use_rerank else "not used")
    val_i = {d: intent_queries(v.bundles, index) for d, v in val.items()}
    qcache = {d: {ch: engine.query_channel_scores(ch, [t for t, _ in q]) for ch in QUERY_CHANNELS} if q else None
              for d, q in val_i.items()}
    query = {json.dumps(w): float(np.mean([query_values(engine.with_params(EngineParams(query=w)), q, qcache[d])
                                           ["recall@10"].mean() for d, q in val_i.items() if q]))
             for w in fusion_grid(QUERY_CHANNELS)} if any(val_i.values()) else {json.dumps({"tuned": 1.0}): float("nan")}
    best_q = json.loads(max(query, key=lambda k: query[k] if query[k] == query[k] else -1.0))
    log.info("eval_bundles: query fusion %s (val intent recall@10 %.4f)", best_q, query[json.dumps(best_q)])
    namer, naming_sel = select_naming(engine, fit, val, index)
    if namer is not None:
        namer.save(export)
        log.info("eval_bundles: naming weights %s (val ROUGE-1 F1 %.4f)", namer.weights,
                 naming_sel["val_rouge1_f1"][json.dumps(namer.weights)])
    det = {}
    for data_w, text in itertools.product(COMPAT_DATA, COMPAT_TEXT):
        compat = {**({"data": data_w} if data_w else {}), **text}
        th, f1, grid = select_threshold(engine, compat, val_s)
        det[json.dumps(compat)] = {"threshold": th, "val_f1": f1, "grid": grid}
    best_c = max(det, key=lambda k: det[k]["val_f1"])
    log.info("eval_bundles: detection %s threshold %.4f (val F1 %.4f)", best_c, det[best_c]["threshold"], det[best_c]["val_f1"])
    baselines = {}
    for m, compat in BASELINE_COMPAT.items():
        th, f1, grid = select_threshold(engine, compat, val_s)
        baselines[m] = {"compat": compat, "threshold": th, "val_f1": f1, "grid": grid}
    selection = {"validation": {d: {"users": int(v.bundles.user_id.nunique()), "bundles": len(v.bundles),
                                    "sessions": len(val_s[d])} for d, v in val.items()},
                 "lexical": lex_sel, "completion_val_recall@10": fusion, "query_val_recall@10": query,
                 "rerank_val_recall@10": rerank_val, "leak_gate": leak, "rerank": engine.reranker.info, "naming": naming_sel,
                 "detection_val": det,
                 "baseline_detection": baselines}
    params = EngineParams(completion=best_w, query=best_q, rerank=use_rerank, compat=json.loads(best_c), threshold=det[best_c]["threshold"],
                          selection={"chosen_on": "validation users carved from the training directory",
                                     "completion_val_recall@10": rerank_val[str(use_rerank)],
                                     "detection_val_f1": det[best_c]["val_f1"]})
    chosen, selection["personal"] = select_personal(engine.with_params(params), val, index)
    params = replace(params, **chosen)
    log.info("eval_bundles: personalized generation from %s, relevance weight %s", params.history,
             params.generation["relevance_weight"])
    params.intent_history, selection["intent_history"] = select_intent_history(engine.with_params(params), val, index)
    log.info("eval_bundles: intent + history weights %s", params.intent_history)
    params.save(export)
    return selection
