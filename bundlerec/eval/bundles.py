"""Train on one bundlerec_intent directory, evaluate the *served* bundle engine on another.

Protocol (every choice on data carved from the training directory, never on the evaluation one):

1. The training directory's users are split: about 10 % (``VAL_MOD``; by a salted hash of the user
   id, so user- and session-disjoint) become **validation**, the rest **fit** data.
2. The two-tower model trains with the normal Ray Train + DeepSpeed loop on a bundle-completion
   objective built from the fit bundles (checkpoint/early stopping on the validation users).
3. The export gets the engine's assets: co-occurrence counts and popularity of the fit groups, the
   pretrained encoder's item index, the lexical index (setting chosen on validation).
4. On the validation users: the completion fusion weights (tuned / pretrained / lexical), whether
   the completion re-ranker (:mod:`bundlerec.bundles.rerank`, fitted on the fit users' bundles with
   out-of-fold category statistics) is used, the compatibility weights and the detection threshold
   of bundlerec, and the threshold of every baseline, from grids fixed in this module (all written
   into the results).
5. The chosen parameters are saved in the export (``bundle_engine.json``), the engine is loaded
   back with :meth:`BundleEngine.from_export` -- what the Serve app and the pyfunc load -- and the
   evaluation directory is scored through its ``complete_scores`` / ``detect`` methods. Baselines
   are the same engine with other parameters (``with_params``).

Completion: given an evaluation bundle's first item (and, separately, its first half), rank the
whole catalog for the rest. Detection ("generation F1"): partition each evaluation session's items
into bundles, matched one-to-one to the annotated ones by Jaccard. Personalized generation
(``personal``): each session with >= 2 bundles gives its first bundle as the shopper's history
(purchase events) and its other bundles as the targets; what ``POST /v1/bundles`` generates for that
history (history alone, the annotated intent of the first target alone, or both: the
``intent_history`` weights chosen on validation sessions) is matched one-to-one to the targets (F1)
and scored by its best Jaccard, against itemknn / zeroshot / lexical greedy growth and popular pairs.
Intervals: percentile bootstrap over queries (sessions for F1); bundlerec's lift over the best
baseline by paired bootstrap.
"""

from __future__ import annotations
import json
import logging
import os
import time
from dataclasses import asdict, replace
import numpy as np
from bundlerec.bundles.engine import (
    BundleEngine,
    EngineParams,
)
from bundlerec.bundles.generate import bundle_name
from bundlerec.bundles.intent import Domain
from bundlerec.model.lexical import GRID as LEXICAL_GRID
from bundlerec.bundles.matching import prf
from bundlerec.bundles.naming import rouge1_f1
from bundlerec.bundles.rerank import FEATURES as RERANK_FEATURES
from bundlerec.bundles.rerank import TREES as RERANK_TREES
from bundlerec.config import PipelineConfig
from bundlerec.metrics import paired_lift
from bundlerec.integrity import amend
from bundlerec.metrics import bootstrap_ci
from bundlerec.eval.bundle_data import VAL_MOD, annotated, completion_queries, intent_queries, personal_queries, session_truth
from bundlerec.eval.bundle_scoring import BOOTSTRAP, SeenPenalty, named, completion_values, detection_triplets, f1_ci, history_channel, leak_gate, naming_values, personal_bundles, personal_values, pool_recall, query_values, split_recall
from bundlerec.eval.bundle_select import COMPAT_DATA, COMPAT_TEXT, FUSION_CHANNELS, FUSION_STEP, RERANK_FOLDS, RERANK_MAX_QUERIES, THRESHOLD_QUANTILES, prepare_export, select

log = logging.getLogger(__name__)

# baselines = the engine with one channel; bundlerec = the fusion chosen on validation
BASELINES = {"popular": {"popularity": 1.0}, "itemknn": {"cooccurrence": 1.0}, "lexical": {"lexical": 1.0},
             "zeroshot": {"pretrained": 1.0}}

ABLATIONS = {"tuned": {"tuned": 1.0}}  # the fine-tuned model alone (reported, not a baseline)

# intent -> bundle: the query encoded by one channel (lexical and zeroshot are the baselines)
QUERY_METHODS = {"lexical": {"lexical": 1.0}, "zeroshot": {"pretrained": 1.0}, "tuned": {"tuned": 1.0}}

# history -> bundles baselines: greedy growth from one channel's relevance, the baseline's compatibility
PERSONAL_BASELINES = {"itemknn_greedy": ("cooccurrence", {"data": 1.0}), "zeroshot_greedy": ("pretrained", {"pretrained": 1.0}),
                      "lexical_greedy": ("lexical", {"lexical": 1.0}), "popular_pairs": ("popularity", {"data": 1.0})}


ST_BASELINE = "st_mnrl"  # sentence-transformers' own fine-tune (bundlerec.eval.st_baseline), a completion baseline


TRAINING_FILE = "training.json"  # in the export: what its training ran (the baseline's budget for a reused export)


def training_record(cfg: PipelineConfig, trained: dict, export: str) -> dict:
    """What bundlerec's loop trained: rows (its optimizer steps x the global batch), per-domain rows
    and its last samples/s. Written into the export after a training (inside the caller's
    ``amend``), read back when an export is evaluated again (``--export``), so a baseline given the
    same budget gets the same budget both times."""
    path = os.path.join(export, TRAINING_FILE)
    if trained.get("history") is None:  # a reused export
        if os.path.exists(path):
            return json.load(open(path))
        log.warning("eval_bundles: %s has no %s: the baselines' training budget is unknown", export, TRAINING_FILE)
        return {"rows": 0, "rows_by_domain": {}, "samples_per_s": None}
    from bundlerec.train.fit import rows_by_group

    last, tc = trained.get("last_metrics") or {}, cfg.train
    rec = {"rows": int(last.get("step") or 0) * tc.micro_batch * tc.grad_accum * tc.num_workers,
           "rows_by_domain": rows_by_group(trained["history"]), "samples_per_s": last.get("samples_per_s")}
    with open(path, "w") as f:
        json.dump(rec, f, indent=2)
    return rec


def st_baseline_engine(cfg: PipelineConfig, engine: BundleEngine, fit: dict[str, Domain], items, record: dict,
                       cache_dir: str | None) -> tuple[BundleEngine, dict]:
    """The engine's zero-shot completion over the item index of the sentence-transformers fine-tune,
    trained on as many bundle pairs as bundlerec's loop trained rows (:func:`training_record`), in
    batches of bundlerec's per-worker size."""
    import copy

    from bundlerec.eval.st_baseline import fit_index

    tc = cfg.train
    index, info = fit_index(cfg.model.name_or_path, fit, items, max(record["rows"], tc.micro_batch),
                            tc.micro_batch, cfg.data.item_max_tokens, tc.seed, cache_dir)
    st = copy.copy(engine)
    st.pretrained = index
    return st.with_params(EngineParams(completion={"pretrained": 1.0})), {
        **asdict(info), "bundlerec_samples_per_s": record["samples_per_s"]}


def score_personal(engine: BundleEngine, d: Domain, index: dict, seed: int) -> tuple[dict, dict]:
    """Personalized generation on one evaluation domain: bundlerec (history), the greedy baselines,
    and, on the sessions with an intent, intent alone and intent + history; with intervals."""
    qs = personal_queries(d, index)
    out, per = {}, {}
    if not qs:
        return out, {}
    methods = {"bundlerec": (engine, history_channel(engine)), "tuned_greedy": (engine, "tuned")}
    for m, (ch, compat) in PERSONAL_BASELINES.items():
        if not engine._absent(ch):
            methods[m] = (engine.with_params(replace(engine.params, compat=compat)), ch)
    for m, (e, ch) in methods.items():
        per[m] = personal_values(personal_bundles(e, qs, "history", ch), qs)
    iq = [q for q in qs if q[1]]
    if iq:
        qscores = engine.query_scores([q[1] for q in iq])
        for m, mode in (("intent", "intent"), ("intent+history", "both")):
            per[m] = personal_values(personal_bundles(engine, iq, mode, qscores=qscores), iq)
        per["history_on_intent_sessions"] = personal_values(personal_bundles(engine, iq, "history"), iq)
    for m, v in per.items():
        out[m] = {"sessions": len(v["best_jaccard"]), **prf(*v["triplets"].sum(0)), "f1_ci": f1_ci(v["triplets"], seed),
                  "best_jaccard": float(v["best_jaccard"].mean()), "best_jaccard_ci": bootstrap_ci(v["best_jaccard"], seed=seed)}
    base = [m for m in PERSONAL_BASELINES if m in out]
    best = max(base, key=lambda m: out[m]["best_jaccard"]) if base else None
    lift = {"vs": best, "best_jaccard": paired_lift(per["bundlerec"]["best_jaccard"], per[best]["best_jaccard"], seed)} if best else {}
    if iq:
        lift["intent+history_vs_intent"] = paired_lift(per["intent+history"]["best_jaccard"], per["intent"]["best_jaccard"], seed)
        lift["intent+history_vs_history"] = paired_lift(per["intent+history"]["best_jaccard"],
                                                        per["history_on_intent_sessions"]["best_jaccard"], seed)
    return out, lift


def score_domain(engine: BundleEngine, baselines: dict, d: Domain, index: dict, seen: set, seed: int,
                 extra: dict | None = None) -> dict:
    """Every method on one evaluation domain, with intervals. ``extra``: more completion baselines
    (name -> engine), such as the sentence-transformers fine-tune."""
    extra = extra or {}
    methods = {"bundlerec": engine, **{m: engine.with_params(EngineParams(completion=w)) for m, w in
                                       {**BASELINES, **ABLATIONS}.items()}, **extra}
    # ablation: bundlerec's fusion without the re-ranker (= bundlerec where validation did not choose it)
    methods["fusion_only"] = engine.with_params(EngineParams(completion=engine.params.completion))
    methods["zeroshot_seen_penalty"] = SeenPenalty(methods["zeroshot"], seen)  # the leak control row
    out: dict = {"completion": {}, "completion_half": {}, "generation": {}}
    per_query = {}
    for mode, key in (("first", "completion"), ("half", "completion_half")):
        q = completion_queries(d.bundles, index, mode)
        for m, e in methods.items():
            v = completion_values(e, q)
            res = {"n": len(q)}
            for name, arr in sorted(v.items()):
                res[name] = float(arr.mean())
                if name.endswith("@10"):
                    res[f"{name}_ci"] = bootstrap_ci(arr, seed=seed)
            if mode == "first":
                res.update(split_recall(e, q, seen))
                per_query[m] = v
            out[key][m] = res
    out["leak_gate"] = leak_gate(out["completion"])
    out["candidate_pool"] = pool_recall(engine, completion_queries(d.bundles, index, "first"))
    best = max([*BASELINES, *extra], key=lambda m: out["completion"][m]["recall@10"])
    out["lift"] = {"vs": best, **{name: paired_lift(per_query["bundlerec"][name], per_query[best][name], seed)
                                  for name in ("recall@10", "ndcg@10")}}
    # per-query Recall@10 (same query order for every method): the folds' pooled paired intervals
    out["per_query"] = {m: np.round(v["recall@10"], 6).tolist() for m, v in per_query.items()}
    iq = intent_queries(d.bundles, index)
    out["intent"] = {}
    if iq:
        per_i = {}
        for m, w in (("bundlerec", None), *QUERY_METHODS.items()):
            e = engine if w is None else engine.with_params(EngineParams(query=w))
            per_i[m] = query_values(e, iq)
            out["intent"][m] = {"n": len(iq), **{k: float(v.mean()) for k, v in sorted(per_i[m].items())},
                                **{f"{k}_ci": bootstrap_ci(v, seed=seed) for k, v in per_i[m].items() if k.endswith("@10")}}
        best_i = max(("lexical", "zeroshot"), key=lambda m: out["intent"][m]["recall@10"])
        out["intent_lift"] = {"vs": best_i, "recall@10": paired_lift(per_i["bundlerec"]["recall@10"], per_i[best_i]["recall@10"], seed)}
    named_b = named(annotated({d.name: d}, index)[d.name])
    if engine.namer is not None and named_b:
        per_n = {m: naming_values(engine, engine.namer, named_b, w) for m, w in
                 (("bundlerec", engine.namer.weights), ("zeroshot", {"zeroshot": 1.0}), ("lexical", {"lexical": 1.0}))}
        per_n["category"] = np.array([rouge1_f1(bundle_name([engine.categories[i] for i in b]), t) for b, t in named_b])
        out["naming"] = {m: {"n": len(named_b), "rouge1_f1": float(v.mean()), "rouge1_f1_ci": bootstrap_ci(v, seed=seed)}
                         for m, v in per_n.items()}
        best_n = max(("zeroshot", "lexical", "category"), key=lambda m: out["naming"][m]["rouge1_f1"])
        out["naming_lift"] = {"vs": best_n, "rouge1_f1": paired_lift(per_n["bundlerec"], per_n[best_n], seed)}
    sessions = session_truth(d, index)
    for m in ("bundlerec", *BASELINES):
        if m == "popular":
            tr = detection_triplets(None, sessions, engine.popularity)
        elif m == "bundlerec":
            tr = detection_triplets(engine, sessions)
        else:
            tr = detection_triplets(baselines[m], sessions)
        out["generation"][m] = {**prf(*tr.sum(0)), "f1_ci": f1_ci(tr, seed), "sessions": len(tr)}
    return out


def evaluate_bundles(cfg: PipelineConfig, train_dir: str, eval_dir: str, work_dir: str,
                     export_dir: str | None = None, cache_dir: str | None = None, run_id: str | None = None) -> dict:
    """``export_dir``: evaluate that already-trained export (trained on ``train_dir`` by an earlier
    run of this function with the same seed, so its item order and validation users match).
    ``cache_dir``: where the pretrained encoder's catalog index is kept between runs (dev folds).
    ``run_id``: the MLflow run the training logs to (the pipeline's). ``cfg`` is not changed (a copy
    points at the bundle-completion examples)."""
    import copy

    cfg = copy.deepcopy(cfg)
    t0 = time.time()
    train, fit, val, evald, items, index, export, trained = prepare_export(cfg, train_dir, eval_dir, work_dir,
                                                                           export_dir, cache_dir, run_id)
    with amend(export, "export"):  # the engine's files join the trained export; re-sealed when all are written
        selection = select(BundleEngine.from_export(export), items, index, fit, val, export, cfg.train.seed)
        record = training_record(cfg, trained, export)
    engine = BundleEngine.from_export(export)  # exactly what Serve and the pyfunc load
    baseline_engines = {m: engine.with_params(EngineParams(completion=engine.params.completion, compat=s["compat"],
                                                           threshold=s["threshold"]))
                        for m, s in selection["baseline_detection"].items()}
    seen = {index[i] for d in fit.values() for b in d.bundles["items"] for i in b}
    st_engine, st_info = st_baseline_engine(cfg, engine, fit, items, record, cache_dir)
    out: dict = {"protocol": {"train_dir": train_dir, "eval_dir": eval_dir, "val_mod": VAL_MOD, "seed": cfg.train.seed,
                              "bootstrap": BOOTSTRAP, "catalog_items": len(items),
                              "grids": {"fusion_step": FUSION_STEP, "fusion_channels": FUSION_CHANNELS,
                                        "compat_data": COMPAT_DATA, "compat_text": COMPAT_TEXT,
                                        "threshold_quantiles": THRESHOLD_QUANTILES, "lexical": list(LEXICAL_GRID),
                                        "rerank": {"folds": RERANK_FOLDS, "max_queries": RERANK_MAX_QUERIES,
                                                   "trees": RERANK_TREES, "features": list(RERANK_FEATURES)}}},
                 "engine_params": asdict(engine.params), "selection": selection, "export_dir": export,
                 "seen_share": {}, "completion": {}, "completion_half": {}, "generation": {}, "lift": {},
                 "baselines": [*BASELINES, ST_BASELINE]}
    from bundlerec.progress import Progress

    progress = Progress("eval bundles", sum(len(d.bundles) for d in evald.values()), "bundles", every_s=0)
    for name, d in evald.items():
        log.info("eval_bundles: scoring %s (%d bundles)", name, len(d.bundles))
        r = score_domain(engine, baseline_engines, d, index, seen, cfg.train.seed, {ST_BASELINE: st_engine})
        progress.update(len(d.bundles))  # one line per domain scored, with the ETA of the rest
        for key in ("completion", "completion_half", "generation", "lift", "intent", "intent_lift", "naming", "naming_lift",
                    "leak_gate", "candidate_pool", "per_query"):
            if key in r:
                out.setdefault(key, {})[name] = r[key]
        personal, personal_lift = score_personal(engine, d, index, cfg.train.seed)
        if personal:
            out.setdefault("personal", {})[name] = personal
            out.setdefault("personal_lift", {})[name] = personal_lift
        share = lambda bs: float(np.mean([index[i] in seen for b in bs["items"] for i in b[1:]])) if len(bs) else float("nan")  # noqa: E731
        out["seen_share"][name] = {"val_targets_seen": share(val[name].bundles) if name in val else None,
                                   "eval_targets_seen": share(d.bundles)}
    progress.done()
    out["seconds"] = round(time.time() - t0, 1)
    out["train"] = {k: trained[k] for k in ("n_train", "steps_per_epoch", "train_seconds", "last_metrics")}
    out["train"]["rows_by_domain"] = record["rows_by_domain"]
    out[ST_BASELINE] = st_info
    out["prep_dir"] = cfg.data.output_dir  # the bundle-completion examples (their val split: the registry gate)
    return out
