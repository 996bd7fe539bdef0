"""The pipeline's **fit** step: choose the served bundle engine's parameters on validation baskets,
and measure personalized generation the way ``POST /v1/bundles`` answers.

Protocol (clickstream data, after prep's per-user temporal split):

* a **query** is one basket of a split: the items one user bought at one time (at least 2), with
  the history prep built for that purchase (the events before it, as the user tower reads them);
* the answer is what the served call returns for that history:
  :meth:`bundlerec.inference.recommender.Recommender.bundles_for` (retrieval of the top items by the
  user tower, greedy growth by compatibility, pricing): the same code the Serve replica and the
  pyfunc run, with the constraints :meth:`Recommender.bundle_constraints` builds from the export's
  ``bundle_engine.json``;
* the target is the purchased basket. Per query: **precision** = share of the generated bundles
  contained in the basket (AICL-style), **coverage** = share of the basket's items in some generated
  bundle, and the one-to-one best-Jaccard **precision / recall / F1** of
  :mod:`bundlerec.bundles.matching` (pooled over queries, as detection is scored);
* **leak gate**: share of generated items bought in a training basket, coverage of the target items
  seen / unseen in training.

Selection (:func:`fit_engine`) uses the ``val`` split only (each user's basket before the test one:
session-disjoint from test, never trained on); the completion fusion over the export's channels on
(first item -> rest of the basket) by Recall@10, then the compatibility weights and the relevance
weight of generation by F1. The evaluation (:func:`evaluate_generation`) runs on ``test`` with
bootstrap intervals, for bundlerec and the baselines ``default`` (the unselected EngineParams()),
``itemknn_greedy`` (co-occurrence relevance, co-purchase compatibility) and ``popular_pairs``
(popularity relevance, co-purchase compatibility).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd
import torch

from bundlerec.bundles.engine import BundleEngine, EngineParams
from bundlerec.bundles.generate import BundleConstraints
from bundlerec.metrics import bootstrap_ci
from bundlerec.eval.bundle_scoring import channel_cache, completion_values
from bundlerec.eval.bundle_select import fusion_grid
from bundlerec.metrics import paired_lift
from bundlerec.bundles.matching import jaccard, match, prf
from bundlerec.data.examples import load_split
from bundlerec.inference.recommender import History, Recommender

log = logging.getLogger(__name__)

MAX_QUERIES = 200  # baskets per split (a seeded sample above this)
MAX_VAL_EXAMPLES = 20000  # validation examples of the recommender's fusion (a seeded sample above this)
CHANNELS_FIT = ("tuned", "itemknn", "recent", "popular", "lexical", "sasrec")
COMPLETION_CHANNELS = ("tuned", "cooccurrence", "popularity")
COMPAT_GRID = ({"data": 1.0, "tuned": 1.0}, {"data": 1.0}, {"tuned": 1.0}, {"data": 1.0, "tuned": 0.5},
               {"data": 0.5, "tuned": 1.0})
RELEVANCE_GRID = (0.25, 0.5, 1.0, 2.0)
N_BUNDLES, MAX_SIZE = BundleConstraints.n, BundleConstraints.max_size  # the request defaults of /v1/bundles
BASELINES = {"itemknn_greedy": "cooccurrence", "popular_pairs": "popularity"}


@dataclass
class BasketQuery:
    user_id: str
    items: list
    types: list
    ages: list
    basket: list  # item positions bought together
    time: object = None  # when (the moment the history's ages are measured from)

    def events(self, item_ids: list) -> list[dict]:
        """The history as the events a client sends to ``/v1/bundles`` (times to the microsecond,
        ``as_of`` = :attr:`time`): what the evaluation and the endpoint both read."""
        from bundlerec.data.schema import EVENT_TYPE_ID

        names = {v: k for k, v in EVENT_TYPE_ID.items()}
        t = pd.Timestamp(self.time)
        return [{"item_id": item_ids[i], "event_type": names[ty],
                 "event_time": (t - pd.Timedelta(hours=a)).floor("us").to_pydatetime()}
                for i, ty, a in zip(self.items, self.types, self.ages)]


def basket_queries(prep_dir: str, split: str, max_queries: int = MAX_QUERIES, seed: int = 0) -> list[BasketQuery]:
    """The baskets (>= 2 distinct items) of one split with the history before each, a seeded sample
    of at most ``max_queries``, in a fixed order."""
    ex = load_split(prep_dir, split)
    out = []
    for (user, when), g in ex.groupby(["user_id", "target_time"], sort=True):
        basket = list(dict.fromkeys(int(i) for t in g["targets"] for i in t))  # val/test: one row per basket
        first = g.iloc[0]
        if len(basket) >= 2 and len(first["hist_items"]):
            out.append(BasketQuery(str(user), [int(i) for i in first["hist_items"]], [int(t) for t in first["hist_types"]],
                                   [float(a) for a in first["hist_age_hours"]], basket, when))
    if len(out) > max_queries:
        keep = np.sort(np.random.default_rng(seed).choice(len(out), max_queries, replace=False))
        out = [out[i] for i in keep]
    return out


def _histories(rec: Recommender, queries: list[BasketQuery]) -> list[History]:
    """Each query's history built as the endpoint builds it from events (the last history_len)."""
    return [rec.history_from_events(q.events(rec.item_ids), now=pd.Timestamp(q.time).to_pydatetime()) for q in queries]


def served_bundles(rec: Recommender, queries: list[BasketQuery], ranked: list | None = None,
                   priced: bool = True) -> list[list[list[int]]]:
    """What ``POST /v1/bundles`` returns for each query's history (item positions per bundle). With
    ``priced=False`` (the selection grids) the same bundles come from the engine's generation
    without the pricing and naming the answer adds to them."""
    hs = _histories(rec, queries)
    cs = [rec.bundle_constraints(h, n=N_BUNDLES, max_size=MAX_SIZE) for h in hs]
    if ranked is None:
        ranked = rec.recommend_histories(hs, max(rec.bundle_pool(c) for c in cs))
    if not priced:
        return [[b["items"] for b in rec.bundle_engine.generate(rec.bundle_scores(h, c, r[:rec.bundle_pool(c)]), c)]
                for h, c, r in zip(hs, cs, ranked)]
    pos = rec.item_pos
    return [[[pos[i["item_id"]] for i in b["items"]] for b in rec.bundles_for(h, c, r[:rec.bundle_pool(c)])]
            for h, c, r in zip(hs, cs, ranked)]


def generation_values(generated: list[list[list[int]]], queries: list[BasketQuery]) -> dict:
    """Per-query arrays: precision (bundles contained in the basket), coverage, best-Jaccard, and the
    (matched Jaccard, #generated, #targets) triplets of the pooled F1."""
    prec, cov, best, trip = [], [], [], []
    for gen, q in zip(generated, queries):
        basket = set(q.basket)
        prec.append(np.mean([set(b) <= basket for b in gen]) if gen else 0.0)
        cov.append(len(basket & {i for b in gen for i in b}) / len(basket))
        best.append(max((jaccard(b, q.basket) for b in gen), default=0.0))
        trip.append(match(gen, [q.basket]))
    return {"precision": np.asarray(prec), "coverage": np.asarray(cov), "best_jaccard": np.asarray(best),
            "triplets": np.asarray(trip, dtype=np.float64).reshape(-1, 3)}


def summarize(v: dict, seed: int = 0) -> dict:
    out = {"n": len(v["precision"]), **prf(*v["triplets"].sum(0))}
    for k in ("precision", "coverage", "best_jaccard"):
        out[f"contained_{k}" if k == "precision" else k] = float(v[k].mean())
        out[f"{'contained_' if k == 'precision' else ''}{k}_ci"] = bootstrap_ci(v[k], seed=seed)
    return out


def _with_params(rec: Recommender, params: EngineParams) -> Recommender:
    r = copy.copy(rec)
    r.bundle_engine = rec.bundle_engine.with_params(params)
    return r


def _f1(rec: Recommender, queries: list[BasketQuery], ranked: list) -> float:
    return prf(*generation_values(served_bundles(rec, queries, ranked, priced=False), queries)["triplets"].sum(0))["f1"]


def fit_recommender(export_dir: str, prep_dir: str, max_examples: int = MAX_VAL_EXAMPLES, seed: int = 0) -> dict:
    """The served recommender's channel weights (:mod:`bundlerec.inference.fusion`), chosen on the ``val``
    split by NDCG@10 over :func:`bundlerec.inference.fusion.grid`; writes the channels' data (``itemknn.npz``
    from the training split, the catalog's lexical index when the export has none) and
    ``recommend_fusion.json`` into the export (the caller re-seals it)."""
    import scipy.sparse as sp

    from bundlerec.data.statistics import ItemKNN
    from bundlerec.inference.fusion import KNN_FILE, Fusion, FusionParams, grid
    from bundlerec.metrics import MetricAccumulator
    from bundlerec.model.sasrec import SASRecConfig, fit_sasrec
    from bundlerec.model.collate import history_tensors
    from bundlerec.model.export import load_export
    from bundlerec.model.lexical import Lexical

    items = pd.read_parquet(os.path.join(export_dir, "items.parquet"))
    n = len(items)
    sp.save_npz(os.path.join(export_dir, KNN_FILE), ItemKNN.from_examples(load_split(prep_dir, "train"), n).sim)
    if Lexical.load(export_dir) is None:
        Lexical.fit(items.text.astype(str).tolist()).save(export_dir)
    model, meta = load_export(export_dir)
    H = int(meta["history_len"])
    fit_sasrec(load_split(prep_dir, "train"), load_split(prep_dir, "val"), n, H, SASRecConfig(seed=seed)).save(export_dir)
    model.set_index(torch.as_tensor(np.load(os.path.join(export_dir, "item_index.npy"))))
    fusion = Fusion.from_export(export_dir, model, n)
    val = load_split(prep_dir, "val")
    if len(val) > max_examples:
        val = val.iloc[np.sort(np.random.default_rng(seed).choice(len(val), max_examples, replace=False))]
    if not len(val):
        FusionParams(selection={"chosen_on": "no validation examples: the two-tower alone"}).save(export_dir)
        return {"chosen_on": "no validation examples", "weights": {"tuned": 1.0}}
    channels = [c for c in CHANNELS_FIT if not fusion.absent(c)]
    raw = {c: [] for c in channels}
    targets = val["targets"].tolist()
    for i in range(0, len(val), 256):
        chunk = val.iloc[i:i + 256]
        batch = history_tensors({c: chunk[c].tolist() for c in ("hist_items", "hist_types", "hist_age_hours")}, H, "cpu")
        with torch.no_grad():
            for c in channels:
                raw[c].append(fusion.channel(c, batch).float())
    scores = {}
    for w in grid(tuple(channels)):
        acc = MetricAccumulator([10], n)
        for b in range(len(raw[channels[0]])):
            acc.update(fusion.combine({c: raw[c][b] for c in w}, w), targets[b * 256:(b + 1) * 256])
        scores[json.dumps(w)] = float(acc.result()["ndcg@10"])
    best = json.loads(max(scores, key=scores.get))
    tuned = scores.get(json.dumps({"tuned": 1.0}))
    params = FusionParams(best, {"chosen_on": "the val split (each user's basket before the test one)",
                                 "val_examples": len(val), "val_ndcg@10": scores[json.dumps(best)],
                                 "val_ndcg@10_tuned_alone": tuned})
    params.save(export_dir)
    log.info("fit: recommender fusion %s (val ndcg@10 %.4f; the two-tower alone %.4f)", best,
             scores[json.dumps(best)], tuned if tuned is not None else float("nan"))
    return {"chosen_on": params.selection["chosen_on"], "val_examples": len(val), "channels": channels,
            "val_ndcg@10": scores, "weights": best}


def fit_engine(export_dir: str, prep_dir: str, seed: int = 0) -> dict:
    """The fit step: the recommender's fusion (:func:`fit_recommender`), then the bundle engine's
    completion fusion, compatibility and generation weights on the ``val`` baskets, saved in the
    export's ``bundle_engine.json`` (the caller re-seals it); returns the selection record."""
    recommender = fit_recommender(export_dir, prep_dir, seed=seed)
    return {"recommender": recommender, **_fit_bundles(export_dir, prep_dir, seed)}


def _fit_bundles(export_dir: str, prep_dir: str, seed: int) -> dict:
    rec = Recommender.from_export(export_dir, verify=False)  # inside the caller's integrity.amend
    eng: BundleEngine = rec.bundle_engine
    val = basket_queries(prep_dir, "val", seed=seed)
    if not val:
        log.warning("fit: no validation baskets of >= 2 items: the engine keeps its defaults")
        return {"chosen_on": "no validation baskets", "params": asdict(eng.params)}
    channels = [c for c in COMPLETION_CHANNELS if not eng._absent(c)]
    carts = [([q.basket[0]], q.basket[1:]) for q in val]
    cache = channel_cache(eng, [c for c, _ in carts], channels)
    completion = {json.dumps(w): float(completion_values(eng.with_params(EngineParams(completion=w)), carts, cache)
                                       ["recall@10"].mean()) for w in fusion_grid(tuple(channels))}
    best_w = json.loads(max(completion, key=completion.get))
    base = replace(eng.params, completion=best_w)  # what the export already chose (query weights, ...) stays
    hs = _histories(rec, val)
    ranked = rec.recommend_histories(hs, max(rec.bundle_pool(rec.bundle_constraints(h, n=N_BUNDLES)) for h in hs))
    grid = {}
    for compat in COMPAT_GRID:
        for rw in RELEVANCE_GRID:
            p = replace(base, compat=compat, generation={**base.generation, "relevance_weight": rw})
            grid[json.dumps({"compat": compat, "relevance_weight": rw})] = _f1(_with_params(rec, p), val, ranked)
    best = json.loads(max(grid, key=grid.get))
    params = replace(base, compat=best["compat"], generation={**base.generation, "relevance_weight": best["relevance_weight"]},
                     selection={"chosen_on": "the val split's baskets (each user's basket before the test one)",
                                "val_baskets": len(val), "completion_val_recall@10": completion[json.dumps(best_w)],
                                "generation_val_f1": grid[json.dumps(best)]})
    params.save(export_dir)  # detection's threshold is not fitted on clickstream baskets: it stays
    default = json.dumps({"compat": EngineParams().compat, "relevance_weight": EngineParams().generation["relevance_weight"]})
    log.info("fit: completion %s (val recall@10 %.4f); generation compat %s relevance %.2f (val F1 %.4f, default %.4f)",
             best_w, completion[json.dumps(best_w)], best["compat"], best["relevance_weight"], grid[json.dumps(best)],
             grid.get(default, float("nan")))
    return {"chosen_on": params.selection["chosen_on"], "val_baskets": len(val),
            "grids": {"completion_channels": channels, "compat": list(COMPAT_GRID), "relevance_weight": list(RELEVANCE_GRID)},
            "completion_val_recall@10": completion, "generation_val_f1": grid, "params": asdict(params)}


def _baseline_bundles(rec: Recommender, queries: list[BasketQuery], channel: str) -> list:
    """Greedy generation from one channel's relevance over the history's items, co-purchase
    compatibility only (the constraints and pool of the served call)."""
    eng = rec.bundle_engine.with_params(EngineParams(compat={"data": 1.0}))
    out = []
    for h in _histories(rec, queries):
        c = rec.bundle_constraints(h, n=N_BUNDLES, max_size=MAX_SIZE)
        s = eng.channel_scores(channel, [list(dict.fromkeys(h.items))])[0].astype(np.float64)
        keep = np.argsort(-s, kind="stable")[:rec.bundle_pool(c)]
        pooled = np.full_like(s, -np.inf)
        pooled[keep] = s[keep]
        out.append([[rec.item_pos[i["item_id"]] for i in b["items"]] for b in eng.personalized(pooled, c, set(h.items))])
    return out


def evaluate_generation(export_dir: str, prep_dir: str, split: str = "test", seed: int = 0) -> dict:
    """bundlerec's served generation and the baselines on ``split``'s baskets, with intervals, the
    paired lift over the best baseline and the leak gate."""
    rec = Recommender.from_export(export_dir)
    qs = basket_queries(prep_dir, split, seed=seed)
    if not qs:
        return {"n": 0}
    seen = set(np.flatnonzero(rec.bundle_engine.stats.counts > 0).tolist())
    gens = {"bundlerec": served_bundles(rec, qs), "default": served_bundles(_with_params(rec, EngineParams()), qs),
            **{m: _baseline_bundles(rec, qs, ch) for m, ch in BASELINES.items()}}
    vals = {m: generation_values(g, qs) for m, g in gens.items()}
    out: dict = {"split": split, "baskets": len(qs), "methods": {}}
    targets = [([], q.basket) for q in qs]
    for m, g in gens.items():
        items = [i for gen in g for b in gen for i in b]
        gate = {"seen_share_generated": float(np.mean([i in seen for i in items])) if items else None}
        cov = _split_coverage(g, targets, seen)
        out["methods"][m] = {**summarize(vals[m], seed), "leak_gate": {**gate, **cov}}
    best = max(BASELINES, key=lambda m: out["methods"][m]["best_jaccard"])
    out["lift"] = {"vs": best, "best_jaccard": paired_lift(vals["bundlerec"]["best_jaccard"], vals[best]["best_jaccard"], seed)}
    return out


def _split_coverage(generated: list, targets: list, seen: set) -> dict:
    """Coverage of the target items seen in training and of the unseen ones (pooled)."""
    hit = {True: [0, 0], False: [0, 0]}
    for gen, (_, t) in zip(generated, targets):
        got = {i for b in gen for i in b}
        for i in t:
            hit[i in seen][0] += i in got
            hit[i in seen][1] += 1
    return {"coverage_seen": hit[True][0] / hit[True][1] if hit[True][1] else None,
            "coverage_unseen": hit[False][0] / hit[False][1] if hit[False][1] else None,
            "targets_seen": hit[True][1], "targets_unseen": hit[False][1]}


