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

import hashlib
import itertools
import json
import logging
import math
import os
import time
from dataclasses import asdict, replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bundlerec.bundles.engine import (
    COMPLETION_EVENT,
    QUERY_CHANNELS,
    BundleEngine,
    EngineParams,
    top_k,
    write_engine_assets,
)
from bundlerec.bundles.generate import BundleConstraints, bundle_name
from bundlerec.bundles.intent import Domain, load
from bundlerec.model.lexical import GRID as LEXICAL_GRID
from bundlerec.model.lexical import Lexical
from bundlerec.bundles.matching import match, prf
from bundlerec.bundles.naming import CHANNELS as NAMING_CHANNELS
from bundlerec.bundles.naming import IntentNamer, rouge1_f1
from bundlerec.bundles.rerank import FEATURES as RERANK_FEATURES
from bundlerec.bundles.rerank import TREES as RERANK_TREES
from bundlerec.bundles.rerank import RERANK_FILE, RERANK_MODEL, CategoryStats, Reranker
from bundlerec.config import PipelineConfig
from bundlerec.data.schema import EVENT_TYPE_ID
from bundlerec.data.statistics import CoStats, item_counts
from bundlerec.eval.metrics import batch_metrics, pad_targets, paired_lift
from bundlerec.integrity import amend

log = logging.getLogger(__name__)

VAL_MOD = 10  # one user in VAL_MOD (by salted hash) is validation
KS = [10, 20]
BOOTSTRAP = 1000
# baselines = the engine with one channel; bundlerec = the fusion chosen on validation
BASELINES = {"popular": {"popularity": 1.0}, "itemknn": {"cooccurrence": 1.0}, "lexical": {"lexical": 1.0},
             "zeroshot": {"pretrained": 1.0}}
ABLATIONS = {"tuned": {"tuned": 1.0}}  # the fine-tuned model alone (reported, not a baseline)
# intent -> bundle: the query encoded by one channel (lexical and zeroshot are the baselines)
QUERY_METHODS = {"lexical": {"lexical": 1.0}, "zeroshot": {"pretrained": 1.0}, "tuned": {"tuned": 1.0}}
FUSION_STEP = 0.25  # completion fusion grid: weights on the simplex over these channels, this step
FUSION_CHANNELS = ("tuned", "pretrained", "lexical")
COMPAT_DATA = (0.0, 0.5, 1.0)  # detection: weight of the co-purchase sPMI term
COMPAT_TEXT = ({"tuned": 1.0}, {"tuned": 1.0, "pretrained": 1.0}, {"tuned": 1.0, "lexical": 1.0},
               {"tuned": 1.0, "pretrained": 1.0, "lexical": 1.0}, {"pretrained": 1.0, "lexical": 1.0})
BASELINE_COMPAT = {"itemknn": {"data": 1.0}, "zeroshot": {"pretrained": 1.0}, "lexical": {"lexical": 1.0}}
RERANK_FOLDS = 5  # out-of-fold category statistics for the re-ranker's training rows (by user)
RERANK_MAX_QUERIES = 12000  # training queries of the re-ranker (a random subset above this)
THRESHOLD_QUANTILES = tuple(np.round(np.linspace(0.3, 0.99, 12), 3))  # of within-session pair scores


# ------------------------------------------------------------------------------ data
def carve_validation(train: dict[str, Domain], seed: int) -> tuple[dict[str, Domain], dict[str, Domain]]:
    """(fit, validation): users with ``sha1(seed:user) % VAL_MOD == 0`` are validation."""
    fit, val = {}, {}
    for name, d in train.items():
        users = set(d.bundles.user_id) | set(d.sessions.user_id)
        v = {u for u in users if int(hashlib.sha1(f"{seed}:{u}".encode()).hexdigest(), 16) % VAL_MOD == 0}
        fit[name], val[name] = d.subset(users - v), d.subset(v)
    return fit, val


def _example_rows(bundles: pd.DataFrame, index: dict, rng: np.random.Generator, split: str) -> list[tuple]:
    rows = []
    t = pd.Timestamp("2014-01-01", tz="UTC")
    ev = EVENT_TYPE_ID[COMPLETION_EVENT]
    for items in bundles["items"]:
        ids = [index[i] for i in items]
        if split == "train":  # every item is once the target of a random part of the rest
            for k, tgt in enumerate(ids):
                rest = ids[:k] + ids[k + 1:]
                part = list(rng.permutation(rest)[: rng.integers(1, len(rest) + 1)])
                rows.append(("b", split, t, [tgt], part, [ev] * len(part), [0.0] * len(part), len(ids), 0))
        else:
            rows.append(("b", split, t, ids[1:], ids[:1], [ev], [0.0], len(ids), 0))
    return rows


def write_training_data(fit: dict[str, Domain], val: dict[str, Domain], items: pd.DataFrame, out: str,
                        cfg: PipelineConfig, seed: int = 0) -> str:
    """A prep-format directory (items + examples) for the bundle-completion objective: train rows from
    the fit users' bundles, val rows (first item -> rest) from the validation users'."""
    import ray.data

    from bundlerec.data import catalog as catalog_lib
    from bundlerec.data.examples import EXAMPLE_ARROW
    from bundlerec.storage import reset_dir, write_text

    rng = np.random.default_rng(seed)
    index = dict(zip(items.item_id, items.item_idx))
    rows = {"train": [], "val": [], "test": [], "latest": []}
    per_domain = {}
    for name in fit:
        train_rows = _example_rows(fit[name].bundles, index, rng, "train")
        rows["train"] += train_rows
        rows["val"] += _example_rows(val[name].bundles, index, rng, "val")
        per_domain[name] = len(train_rows)
    # shuffled across domains: a file (and each worker's contiguous shard of it) mixes every domain, so
    # a step cap or a streamed epoch does not train one domain more than another
    rows["train"] = [rows["train"][i] for i in rng.permutation(len(rows["train"]))]
    rows["test"] = rows["val"]
    cols = [f.name for f in EXAMPLE_ARROW]
    for split, r in rows.items():
        reset_dir(os.path.join(out, "examples", split))
        pq.write_table(pa.Table.from_pandas(pd.DataFrame(r, columns=cols), schema=EXAMPLE_ARROW, preserve_index=False),
                       os.path.join(out, "examples", split, "part-0.parquet"))
    write_text(os.path.join(out, "manifest.json"), json.dumps({  # histories are parts of bundles: never truncated
        "source": "bundle-completion examples (bundlerec.bundles.evaluate)", "max_history_len": 512,
        "examples": {k: len(v) for k, v in rows.items()}, "train_rows_by_domain": per_domain, "items": len(items)},
        indent=2))
    reset_dir(os.path.join(out, "items"))
    ray.data.from_pandas(items).map_batches(
        catalog_lib.tokenize_batch, batch_format="pandas", batch_size=4096,
        fn_kwargs={"model_name": cfg.model.name_or_path, "max_tokens": cfg.data.item_max_tokens},
    ).repartition(1).write_parquet(os.path.join(out, "items"))
    return out


def completion_queries(bundles: pd.DataFrame, index: dict, mode: str) -> list[tuple[list[int], list[int]]]:
    """(cart, rest) per bundle: the first item (``first``) or the first half (``half``) is the cart."""
    out = []
    for items in bundles["items"]:
        ids = [index[i] for i in items]
        k = 1 if mode == "first" else math.ceil(len(ids) / 2)
        if len(ids) - k >= 1:
            out.append((ids[:k], ids[k:]))
    return out


def intent_queries(bundles: pd.DataFrame, index: dict) -> list[tuple[str, list[int]]]:
    """(intent text, the bundle's items) for every bundle with an annotated intent."""
    if "intent" not in bundles:
        return []
    return [(str(t), [index[i] for i in items]) for t, items in zip(bundles["intent"], bundles["items"])
            if isinstance(t, str) and t.strip()]


# ------------------------------------------------------------------------------ scoring
def channel_cache(engine: BundleEngine, carts: list[list[int]], channels, batch: int = 256) -> dict:
    return {ch: np.concatenate([engine.channel_scores(ch, carts[i:i + batch]) for i in range(0, len(carts), batch)])
            for ch in channels}


def completion_values(engine: BundleEngine, queries: list, cache: dict | None = None, batch: int = 256) -> dict:
    """Per-query recall@K / ndcg@K of the engine's completion (numpy arrays)."""
    vals: dict[str, list] = {}
    for i in range(0, len(queries), batch):
        chunk = queries[i:i + batch]
        part = {ch: v[i:i + batch] for ch, v in cache.items()} if cache else None
        top = torch.as_tensor(top_k(engine.complete_scores([q[0] for q in chunk], channels=part), max(KS)))
        for name, v in batch_metrics(top, pad_targets([q[1] for q in chunk]), KS).items():
            vals.setdefault(name, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in vals.items() if k.split("@")[0] in ("recall", "ndcg")}


def query_values(engine: BundleEngine, queries: list, cache: dict | None = None, batch: int = 256) -> dict:
    """Per-query recall@K / ndcg@K of the engine's free-text query ranking (intent -> bundle items)."""
    vals: dict[str, list] = {}
    for i in range(0, len(queries), batch):
        chunk = queries[i:i + batch]
        part = {ch: v[i:i + batch] for ch, v in cache.items()} if cache else None
        top = torch.as_tensor(top_k(engine.query_scores([q[0] for q in chunk], channels=part), max(KS)))
        for name, v in batch_metrics(top, pad_targets([q[1] for q in chunk]), KS).items():
            vals.setdefault(name, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in vals.items() if k.split("@")[0] in ("recall", "ndcg")}


def split_recall(engine: BundleEngine, queries: list, seen: set, k: int = 10) -> dict:
    """The leak gate's figures of one method: Recall@k over the targets seen in training bundles and
    over the unseen ones (pooled over queries), and the share of the top-k items that were seen in
    training (``seen_share@k``)."""
    hit = {"seen": [0, 0], "unseen": [0, 0]}
    shown = shown_seen = 0
    for i in range(0, len(queries), 256):
        chunk = queries[i:i + 256]
        top = top_k(engine.complete_scores([q[0] for q in chunk]), k)
        for (_, rest), t in zip(chunk, top):
            ts = set(t.tolist())
            shown += len(ts)
            shown_seen += len(ts & seen)
            for it in rest:
                h = hit["seen" if it in seen else "unseen"]
                h[0] += it in ts
                h[1] += 1
    return {f"recall@{k}_{s}": (h[0] / h[1] if h[1] else float("nan")) for s, h in hit.items()} | \
           {f"targets_{s}": h[1] for s, h in hit.items()} | {f"seen_share@{k}": shown_seen / shown if shown else float("nan")}


def pool_recall(engine: BundleEngine, queries: list, batch: int = 256) -> dict:
    """The share of completion targets inside the candidate pool the re-ranker orders (the fused
    top ``k``): what the re-ranker could reach at most. ``k`` 0 where the engine has no re-ranker."""
    if not (engine.params.rerank and engine.reranker is not None):
        return {"k": 0, "recall": None}
    k, hit, n = engine.reranker.k, 0, 0
    for i in range(0, len(queries), batch):
        chunk = queries[i:i + batch]
        cand = engine.reranker.candidates(engine.fused_scores([q[0] for q in chunk])[0])
        for c, (_, rest) in zip(cand, chunk):
            hit += int(np.isin(rest, c).sum())
            n += len(rest)
    return {"k": k, "recall": hit / n if n else float("nan"), "targets": n}


LEAK_GATE_POINTS = 0.05  # a method whose top-10 holds this much less of the seen items than zero-shot's fails the gate
CONTROL_PENALTY = 1e3  # the control row's penalty on seen items: below every unseen item's score


class SeenPenalty:
    """The leak control: an engine's completion with every item seen in training bundles lowered by
    ``penalty`` (below every unseen item). Its recall against the engine's shows how much a method
    could gain from "not seen in training" alone, a signal the catalog's construction leaks."""

    def __init__(self, engine: BundleEngine, seen: set, penalty: float = CONTROL_PENALTY):
        self.engine, self.penalty = engine, penalty
        self.seen_idx = np.fromiter(seen, dtype=np.int64) if seen else np.zeros(0, dtype=np.int64)

    def complete_scores(self, carts, channels=None) -> np.ndarray:
        scores = np.array(self.engine.complete_scores(carts, channels), dtype=np.float64)
        scores[:, self.seen_idx] -= self.penalty
        return scores


def leak_gate(completion: dict) -> dict:
    """Per method of one domain's completion results: its share of seen items in the top 10 against
    zero-shot's, and whether it passes (no more than :data:`LEAK_GATE_POINTS` below zero-shot's)."""
    ref = completion["zeroshot"]["seen_share@10"]
    return {"zeroshot_seen_share@10": ref, "max_drop": LEAK_GATE_POINTS,
            "methods": {m: {"seen_share@10": v["seen_share@10"], "passes": bool(v["seen_share@10"] >= ref - LEAK_GATE_POINTS)}
                        for m, v in completion.items() if "seen_share@10" in v and m != "zeroshot_seen_penalty"}}


def session_truth(d: Domain, index: dict) -> list[tuple[list[int], list[list[int]]]]:
    truth = d.bundles.groupby("session_id")["items"].agg(list)
    return [([index[i] for i in s.items if i in index], [[index[i] for i in b] for b in truth[s.session_id]])
            for s in d.sessions.itertuples() if s.session_id in truth.index]


# ------------------------------------------------------------------------------ personalized generation
PERSONAL_N, PERSONAL_MAX_SIZE = 3, 4  # the request defaults of /v1/bundles
PERSONAL_HISTORY = ("recommender", "completion")  # EngineParams.history, chosen on validation
PERSONAL_RELEVANCE = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # the generation's relevance weight, chosen on validation
INTENT_HISTORY_GRID = ({"query": 0.25, "history": 0.75}, {"query": 0.5, "history": 0.5}, {"query": 0.75, "history": 0.25},
                       {"query": 0.9, "history": 0.1}, {"query": 1.0, "history": 0.0})  # the last: the description alone
# history -> bundles baselines: greedy growth from one channel's relevance, the baseline's compatibility
PERSONAL_BASELINES = {"itemknn_greedy": ("cooccurrence", {"data": 1.0}), "zeroshot_greedy": ("pretrained", {"pretrained": 1.0}),
                      "lexical_greedy": ("lexical", {"lexical": 1.0}), "popular_pairs": ("popularity", {"data": 1.0})}


def personal_queries(d: Domain, index: dict) -> list[tuple[list[int], str | None, list[list[int]]]]:
    """(history, intent, targets) per session with >= 2 annotated bundles: the history is the
    session's first bundle (as purchases), the targets its other bundles, the intent the annotated
    intent of the first target (None where it has none)."""
    out = []
    for _, g in d.bundles.sort_values("bundle_id").groupby("session_id", sort=True):
        if len(g) < 2:
            continue
        bundles = [[index[i] for i in b] for b in g["items"]]
        intent = g["intent"].iloc[1] if "intent" in g else None
        out.append((bundles[0], intent if isinstance(intent, str) and intent.strip() else None, bundles[1:]))
    return out


def history_channel(engine: BundleEngine) -> str:
    """The channel of a bundle export's served history scores (``EngineParams.history``): the
    engine's completion, or the recommender, which for a bundle export is the two-tower (``tuned``)."""
    return "completion" if engine.params.history == "completion" else "tuned"


def history_matrix(engine: BundleEngine, queries: list, channel: str | None = None, batch: int = 1) -> np.ndarray:
    """(Q, N) each query's history scores by ``channel`` (default: the export's own), one history at a
    time as the endpoint scores it (a batched, padded forward pass may round a near-tie the other way,
    and generation then grows another bundle)."""
    channel = channel or history_channel(engine)
    carts = [q[0] for q in queries]
    score = engine.history_scores if channel == "completion" else lambda c: engine.channel_scores(channel, c)
    return np.concatenate([score(carts[i:i + batch]) for i in range(0, len(carts), batch)]) if carts \
        else np.zeros((0, len(engine.item_ids)))


def personal_bundles(engine: BundleEngine, queries: list, mode: str = "history", channel: str | None = None,
                     qscores: np.ndarray | None = None, hscores: np.ndarray | None = None) -> list[list[list[int]]]:
    """What ``POST /v1/bundles`` generates for each query's history given as purchase events (the
    history's items excluded, the export's generation knobs): ``mode`` history (the history's scores
    by ``channel``, by default the export's own: :func:`history_channel`; ``completion`` is
    :meth:`BundleEngine.history_scores`), intent (the description alone) or both
    (``BundleEngine.combine_intent_history``). ``hscores``: :func:`history_matrix` precomputed."""
    out, pos = [], {i: k for k, i in enumerate(engine.item_ids)}
    if mode != "intent" and hscores is None:
        hscores = history_matrix(engine, queries, channel)
    for k, (hist, _, _) in enumerate(queries):
        c = BundleConstraints(n=PERSONAL_N, max_size=PERSONAL_MAX_SIZE, exclude=tuple(dict.fromkeys(hist)),
                              **engine.params.generation)
        h = hscores[k] if mode != "intent" else None
        s = h if mode == "history" else engine.combine_intent_history(qscores[k], h)
        out.append([[pos[i["item_id"]] for i in b["items"]] for b in engine.personalized(s, c, set(hist))])
    return out


def personal_values(generated: list, queries: list) -> dict:
    """Per query: (matched Jaccard, #generated, #targets) of the one-to-one matching, and the best
    Jaccard of any generated bundle with any target."""
    from bundlerec.bundles.matching import jaccard

    trip = np.asarray([match(g, t) for g, (_, _, t) in zip(generated, queries)], dtype=np.float64).reshape(-1, 3)
    best = np.asarray([max((jaccard(b, x) for b in g for x in t), default=0.0) for g, (_, _, t) in zip(generated, queries)])
    return {"triplets": trip, "best_jaccard": best}


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
                  "best_jaccard": float(v["best_jaccard"].mean()), "best_jaccard_ci": bootstrap_mean_ci(v["best_jaccard"], seed)}
    base = [m for m in PERSONAL_BASELINES if m in out]
    best = max(base, key=lambda m: out[m]["best_jaccard"]) if base else None
    lift = {"vs": best, "best_jaccard": paired_lift(per["bundlerec"]["best_jaccard"], per[best]["best_jaccard"], seed)} if best else {}
    if iq:
        lift["intent+history_vs_intent"] = paired_lift(per["intent+history"]["best_jaccard"], per["intent"]["best_jaccard"], seed)
        lift["intent+history_vs_history"] = paired_lift(per["intent+history"]["best_jaccard"],
                                                        per["history_on_intent_sessions"]["best_jaccard"], seed)
    return out, lift


def detection_triplets(engine: BundleEngine | None, sessions: list, popularity: np.ndarray | None = None) -> np.ndarray:
    """(S, 3): matched Jaccard, #generated, #annotated per session. ``engine=None``: the popular
    baseline (the session's most popular items, up to the engine's max size, as one bundle)."""
    out = []
    for ids, truth in sessions:
        if engine is None:
            top = sorted(dict.fromkeys(ids), key=lambda i: -popularity[i])[:8]
            gen = [top] if len(top) >= 2 else []
        else:
            gen = engine.detect(ids)
        out.append(match(gen, truth))
    return np.asarray(out, dtype=np.float64).reshape(-1, 3)


def f1_of(tr: np.ndarray) -> float:
    return prf(*tr.sum(0))["f1"]


# ------------------------------------------------------------------------------ intervals
def bootstrap_mean_ci(v: np.ndarray, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(BOOTSTRAP, len(v)))
    m = v[idx].mean(1)
    return [float(np.percentile(m, 2.5)), float(np.percentile(m, 97.5))]


def f1_ci(tr: np.ndarray, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    f = [f1_of(tr[rng.integers(0, len(tr), len(tr))]) for _ in range(BOOTSTRAP)]
    return [float(np.percentile(f, 2.5)), float(np.percentile(f, 97.5))]


# ------------------------------------------------------------------------------ selection
def fusion_grid(channels=FUSION_CHANNELS) -> list[dict]:
    steps = int(round(1 / FUSION_STEP))
    out = []
    for w in itertools.product(range(steps + 1), repeat=len(channels)):
        if sum(w) == steps:
            out.append({c: x * FUSION_STEP for c, x in zip(channels, w) if x})
    return out


def _mean_recall(engine: BundleEngine, queries: dict, caches: dict) -> float:
    return float(np.mean([completion_values(engine, q, caches[d])["recall@10"].mean() for d, q in queries.items() if q]))


def select_lexical(engine: BundleEngine, items: pd.DataFrame, val_q: dict) -> tuple[Lexical, dict]:
    scores = {}
    for setting in LEXICAL_GRID:
        e = engine.with_params(EngineParams(completion={"lexical": 1.0}))
        e.lexical = Lexical.fit(items.text.tolist(), setting)
        scores[setting] = _mean_recall(e, val_q, {d: None for d in val_q})
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


def annotated(domains: dict[str, Domain], index: dict) -> dict[str, list[tuple[list[int], str]]]:
    """(items, intent) of every bundle with an annotated intent, per domain."""
    return {d: [([index[i] for i in items], t) for items, t in zip(v.bundles["items"], v.bundles["intent"])]
            if "intent" in v.bundles else [] for d, v in domains.items()}


def naming_values(engine: BundleEngine, namer: IntentNamer, bundles: list, weights: dict, channels: dict | None = None) -> np.ndarray:
    """Per-bundle ROUGE-1 F1 of the name given to its items against its annotated intent."""
    names = namer.names(engine, [b for b, _ in bundles], weights, channels)
    return np.array([rouge1_f1(n, t) for n, (_, t) in zip(names, bundles)])


def _named(pairs: list) -> list:
    return [(b, str(t)) for b, t in pairs if isinstance(t, str) and t.strip() and b]


def select_naming(engine: BundleEngine, fit: dict[str, Domain], val: dict[str, Domain], index: dict) -> tuple[IntentNamer | None, dict]:
    """The namer from the fit users' annotated bundles, its channel weights chosen on validation."""
    train = [p for ps in annotated(fit, index).values() for p in _named(ps)]
    val_b = {d: _named(ps) for d, ps in annotated(val, index).items()}
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


# ------------------------------------------------------------------------------ the evaluation
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
    fusion = {json.dumps(w): _mean_recall(engine.with_params(EngineParams(completion=w)), val_q, caches)
              for w in fusion_grid()}
    best_w = json.loads(max(fusion, key=fusion.get))
    log.info("eval_bundles: completion fusion %s (val recall@10 %.4f)", best_w, fusion[json.dumps(best_w)])
    t0 = time.time()
    engine.reranker = fit_reranker(engine.with_params(EngineParams(completion=best_w)), fit, index, seed)
    rerank_val = {str(on): _mean_recall(engine.with_params(EngineParams(completion=best_w, rerank=on)), val_q, caches)
                  for on in (False, True)}
    use_rerank = rerank_val["True"] > rerank_val["False"]
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
                 "rerank_val_recall@10": rerank_val, "rerank": engine.reranker.info, "naming": naming_sel,
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


def score_domain(engine: BundleEngine, baselines: dict, d: Domain, index: dict, seen: set, seed: int) -> dict:
    """Every method on one evaluation domain, with intervals."""
    methods = {"bundlerec": engine, **{m: engine.with_params(EngineParams(completion=w)) for m, w in
                                       {**BASELINES, **ABLATIONS}.items()}}
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
                    res[f"{name}_ci"] = bootstrap_mean_ci(arr, seed)
            if mode == "first":
                res.update(split_recall(e, q, seen))
                per_query[m] = v
            out[key][m] = res
    out["leak_gate"] = leak_gate(out["completion"])
    out["candidate_pool"] = pool_recall(engine, completion_queries(d.bundles, index, "first"))
    best = max(BASELINES, key=lambda m: out["completion"][m]["recall@10"])
    out["lift"] = {"vs": best, **{name: paired_lift(per_query["bundlerec"][name], per_query[best][name], seed)
                                  for name in ("recall@10", "ndcg@10")}}
    iq = intent_queries(d.bundles, index)
    out["intent"] = {}
    if iq:
        per_i = {}
        for m, w in (("bundlerec", None), *QUERY_METHODS.items()):
            e = engine if w is None else engine.with_params(EngineParams(query=w))
            per_i[m] = query_values(e, iq)
            out["intent"][m] = {"n": len(iq), **{k: float(v.mean()) for k, v in sorted(per_i[m].items())},
                                **{f"{k}_ci": bootstrap_mean_ci(v, seed) for k, v in per_i[m].items() if k.endswith("@10")}}
        best_i = max(("lexical", "zeroshot"), key=lambda m: out["intent"][m]["recall@10"])
        out["intent_lift"] = {"vs": best_i, "recall@10": paired_lift(per_i["bundlerec"]["recall@10"], per_i[best_i]["recall@10"], seed)}
    named = _named(annotated({d.name: d}, index)[d.name])
    if engine.namer is not None and named:
        per_n = {m: naming_values(engine, engine.namer, named, w) for m, w in
                 (("bundlerec", engine.namer.weights), ("zeroshot", {"zeroshot": 1.0}), ("lexical", {"lexical": 1.0}))}
        per_n["category"] = np.array([rouge1_f1(bundle_name([engine.categories[i] for i in b]), t) for b, t in named])
        out["naming"] = {m: {"n": len(named), "rouge1_f1": float(v.mean()), "rouge1_f1_ci": bootstrap_mean_ci(v, seed)}
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
    engine = BundleEngine.from_export(export)  # exactly what Serve and the pyfunc load
    baseline_engines = {m: engine.with_params(EngineParams(completion=engine.params.completion, compat=s["compat"],
                                                           threshold=s["threshold"]))
                        for m, s in selection["baseline_detection"].items()}
    seen = {index[i] for d in fit.values() for b in d.bundles["items"] for i in b}
    out: dict = {"protocol": {"train_dir": train_dir, "eval_dir": eval_dir, "val_mod": VAL_MOD, "seed": cfg.train.seed,
                              "bootstrap": BOOTSTRAP, "catalog_items": len(items),
                              "grids": {"fusion_step": FUSION_STEP, "fusion_channels": FUSION_CHANNELS,
                                        "compat_data": COMPAT_DATA, "compat_text": COMPAT_TEXT,
                                        "threshold_quantiles": THRESHOLD_QUANTILES, "lexical": list(LEXICAL_GRID),
                                        "rerank": {"folds": RERANK_FOLDS, "max_queries": RERANK_MAX_QUERIES,
                                                   "trees": RERANK_TREES, "features": list(RERANK_FEATURES)}}},
                 "engine_params": asdict(engine.params), "selection": selection, "export_dir": export,
                 "seen_share": {}, "completion": {}, "completion_half": {}, "generation": {}, "lift": {}}
    from bundlerec.progress import Progress

    progress = Progress("eval bundles", sum(len(d.bundles) for d in evald.values()), "bundles", every_s=0)
    for name, d in evald.items():
        log.info("eval_bundles: scoring %s (%d bundles)", name, len(d.bundles))
        r = score_domain(engine, baseline_engines, d, index, seen, cfg.train.seed)
        progress.update(len(d.bundles))  # one line per domain scored, with the ETA of the rest
        for key in ("completion", "completion_half", "generation", "lift", "intent", "intent_lift", "naming", "naming_lift",
                    "leak_gate", "candidate_pool"):
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
    from bundlerec.train.fit import rows_by_group

    out["train"]["rows_by_domain"] = rows_by_group(trained.get("history") or [])
    out["prep_dir"] = cfg.data.output_dir  # the bundle-completion examples (their val split: the registry gate)
    return out


def print_table(res: dict) -> None:
    """One evaluation's figures, a line per task, domain and method (intervals in brackets)."""
    for task, keys in (("completion", ("recall@10", "ndcg@10")), ("generation", ("f1",)), ("personal", ("f1", "best_jaccard"))):
        for dom, methods in res.get(task, {}).items():
            for m, v in methods.items():
                cells = []
                for k in keys:
                    ci = v.get(f"{k}_ci") or v.get("f1_ci" if k == "f1" else "")
                    cells.append(f"{k} {v[k]:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""))
                print(f"{task:<11}{dom:<11}{m:<16}" + "  ".join(cells))
    for dom, methods in res.get("intent", {}).items():
        for m, v in methods.items():
            ci = v["recall@10_ci"]
            print(f"{'intent':<11}{dom:<11}{m:<10}recall@10 {v['recall@10']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]")
    for dom, pool in res.get("candidate_pool", {}).items():
        if pool["k"]:
            print(f"{'rerank pool':<11}{dom:<11}top {pool['k']} fused candidates hold {pool['recall']:.3f} of the targets")
    for dom, gate in res.get("leak_gate", {}).items():
        failing = [m for m, g in gate["methods"].items() if not g["passes"]]
        ctrl = res["completion"][dom].get("zeroshot_seen_penalty", {})
        print(f"{'leak gate':<11}{dom:<11}zeroshot top-10 seen share {gate['zeroshot_seen_share@10']:.3f}; "
              f"bundlerec {gate['methods']['bundlerec']['seen_share@10']:.3f}; control (seen items last) recall@10 "
              f"{ctrl.get('recall@10', float('nan')):.4f}; failing: {', '.join(failing) or 'none'}")
    for dom, per_epoch in res.get("train", {}).get("rows_by_domain", {}).items():
        print(f"{'trained':<11}{dom:<11}rows per epoch {per_epoch}")
    for key in ("lift", "intent_lift"):
        for dom, lift in res.get(key, {}).items():
            r = lift["recall@10"]
            print(f"{key:<11}{dom:<11}bundlerec vs {lift['vs']}: recall@10 {r['lift']:+.1%} [{r['ci'][0]:+.1%}, {r['ci'][1]:+.1%}]")


def summarize_folds(results: dict[int, dict]) -> dict:
    """Mean and SD over folds of every method's completion and intent recall@10 / ndcg@10, detection
    F1, and bundlerec's lifts over the best baseline."""
    out: dict = {"folds": sorted(results)}
    first = next(iter(results.values()))
    for task, metrics in (("completion", ("recall@10", "ndcg@10")), ("generation", ("f1",)),
                          ("intent", ("recall@10", "ndcg@10")), ("naming", ("rouge1_f1",)),
                          ("personal", ("f1", "best_jaccard"))):
        if task not in first:
            continue
        out[task] = {}
        for dom, methods in first[task].items():
            out[task][dom] = {}
            for m in methods:
                if not all(m in r[task].get(dom, {}) for r in results.values()):
                    continue
                out[task][dom][m] = {k: {"mean": float(np.mean(v := [r[task][dom][m][k] for r in results.values()])),
                                         "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0} for k in metrics}
    for key, metric in (("lift", "recall@10"), ("intent_lift", "recall@10"), ("naming_lift", "rouge1_f1"),
                        ("personal_lift", "best_jaccard")):
        if key in first:
            out[key] = {dom: {"mean": float(np.mean([r[key][dom][metric]["lift"] for r in results.values()])),
                              "per_fold": {f: {"vs": r[key][dom]["vs"], **r[key][dom][metric]}
                                           for f, r in results.items()}} for dom in first[key]}
    return out


def headline_metrics(res: dict) -> dict:
    """The figures of one evaluation (or the fold means of ``--folds``) as flat MLflow metric names:
    ``<task>/<domain>/<method>/<metric>`` and ``<lift>/<domain>/<metric>`` (``@`` spelled ``_at_``)."""
    name = lambda *p: "/".join(str(x).replace("@", "_at_").replace("+", "_plus_") for x in p)  # noqa: E731
    out = {}
    src = res.get("summary", res)
    for task, metrics in (("completion", ("recall@10", "ndcg@10")), ("generation", ("f1",)), ("intent", ("recall@10",)),
                          ("naming", ("rouge1_f1",)), ("personal", ("f1", "best_jaccard"))):
        for dom, methods in src.get(task, {}).items():
            for m, v in methods.items():
                for k in metrics:
                    if k in v:
                        out[name(task, dom, m, k)] = float(v[k]["mean"] if isinstance(v[k], dict) else v[k])
    if "summary" not in res:
        for key in ("lift", "intent_lift", "naming_lift", "personal_lift"):
            for dom, lift in res.get(key, {}).items():
                for k, x in lift.items():
                    if isinstance(x, dict) and "lift" in x:
                        out[name(key, dom, k)] = float(x["lift"])
                        out[name(key, dom, k) + "_ci95_lo"], out[name(key, dom, k) + "_ci95_hi"] = map(float, x["ci"])
    return out


def markdown(res: dict) -> str:
    """Markdown tables of one evaluation, or of dev folds (mean ± SD, per-fold lifts)."""
    lines = []
    if "summary" in res:
        sm = res["summary"]
        for task, metric, title in (("completion", "recall@10", "Completion Recall@10"), ("completion", "ndcg@10", "Completion NDCG@10"),
                                    ("intent", "recall@10", "Intent -> bundle Recall@10"), ("generation", "f1", "Detection F1"),
                                    ("naming", "rouge1_f1", "Bundle names: ROUGE-1 F1 against the annotated intent"),
                                    ("personal", "best_jaccard", "Personalized generation (history -> the session's other bundles): best Jaccard"),
                                    ("personal", "f1", "Personalized generation: one-to-one F1")):
            if task not in sm:
                continue
            doms = list(sm[task])
            methods = list(sm[task][doms[0]])
            lines += [f"**{title}** (mean ± SD over folds {', '.join(map(str, sm['folds']))})", "",
                      "| method | " + " | ".join(doms) + " |", "|---|" + "---|" * len(doms)]
            for m in methods:
                lines.append(f"| {m} | " + " | ".join(f"{sm[task][d][m][metric]['mean']:.4f} ± {sm[task][d][m][metric]['sd']:.4f}"
                                                     if m in sm[task][d] else "–" for d in doms) + " |")
            lines.append("")
        for key, title in (("lift", "bundlerec's completion Recall@10 lift over the best baseline"),
                           ("intent_lift", "bundlerec's intent Recall@10 lift over the best of lexical/zeroshot"),
                           ("naming_lift", "bundlerec's naming ROUGE-1 F1 lift over the best of zeroshot/lexical/category"),
                           ("personal_lift", "bundlerec's personalized-generation best-Jaccard lift over the best greedy baseline")):
            if key not in sm:
                continue
            lines += [f"**{title}** (paired bootstrap 95 % interval per fold)", "", "| domain | mean | per fold |", "|---|---|---|"]
            for d, v in sm[key].items():
                per = "; ".join(f"{f}: {x['lift']:+.1%} [{x['ci'][0]:+.1%}, {x['ci'][1]:+.1%}] vs {x['vs']}"
                                for f, x in v["per_fold"].items())
                lines.append(f"| {d} | {v['mean']:+.1%} | {per} |")
            lines.append("")
        return "\n".join(lines)
    for task, metric in (("completion", "recall@10"), ("intent", "recall@10"), ("generation", "f1"), ("naming", "rouge1_f1"),
                         ("personal", "best_jaccard")):
        if task not in res:
            continue
        doms = list(res[task])
        methods = list(res[task][doms[0]])
        lines += [f"| {task} {metric} | " + " | ".join(doms) + " |", "|---|" + "---|" * len(doms)]
        for m in methods:
            cells = []
            for d in doms:
                v = res[task][d].get(m)
                ci = v.get(f"{metric}_ci") if v else None
                cells.append("–" if v is None else f"{v[metric]:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    if "leak_gate" in res and "completion" in res:
        doms = list(res["leak_gate"])
        lines += ["**Leak gate** (completion; share of the top 10 seen in training bundles / Recall@10 on seen "
                  "and unseen targets; fails: top-10 seen share more than "
                  f"{LEAK_GATE_POINTS:.0%} below zero-shot's)", "",
                  "| method | " + " | ".join(doms) + " |", "|---|" + "---|" * len(doms)]
        for m in res["completion"][doms[0]]:
            cells = []
            for d in doms:
                v, g = res["completion"][d].get(m, {}), res["leak_gate"][d]["methods"].get(m)
                cells.append("–" if "seen_share@10" not in v else
                             f"{v['seen_share@10']:.3f} / {v['recall@10_seen']:.3f} / {v['recall@10_unseen']:.3f}"
                             + ("" if g is None or g["passes"] else " **fails**"))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
