"""What the served bundle engine earns on a set of queries: completion recall (with the leak
gate: seen-item share and recall on seen and unseen targets), intent queries, personalized
generation, detection F1 and naming, with their intervals."""

from __future__ import annotations
import logging
import numpy as np
import torch
from bundlerec.bundles.engine import (
    BundleEngine,
    top_k,
)
from bundlerec.bundles.generate import BundleConstraints
from bundlerec.config import EvalConfig
from bundlerec.bundles.matching import match, prf
from bundlerec.bundles.naming import IntentNamer, rouge1_f1
from bundlerec.metrics import batch_metrics, pad_targets

log = logging.getLogger(__name__)

KS = EvalConfig().ks  # the cut-offs of every bundle metric: eval.ks's default

BOOTSTRAP = 1000

LEAK_GATE_POINTS = 0.05  # a method whose top-10 holds this much less of the seen items than zero-shot's fails the gate

CONTROL_PENALTY = 1e3  # the control row's penalty on seen items: below every unseen item's score


def channel_cache(engine: BundleEngine, carts: list[list[int]], channels, batch: int = 256) -> dict:
    return {ch: np.concatenate([engine.channel_scores(ch, carts[i:i + batch]) for i in range(0, len(carts), batch)])
            for ch in channels}


def completion_values(engine: BundleEngine, queries: list, cache: dict | None = None, batch: int = 256,
                      seen: set | None = None) -> dict:
    """Per-query recall@K / ndcg@K of the engine's completion (numpy arrays); with ``seen`` also
    ``seen_share@10``, the share of each query's top 10 seen in training bundles (the leak gate's)."""
    vals: dict[str, list] = {}
    seen_idx = np.fromiter(seen, dtype=np.int64) if seen else np.zeros(0, dtype=np.int64)
    for i in range(0, len(queries), batch):
        chunk = queries[i:i + batch]
        part = {ch: v[i:i + batch] for ch, v in cache.items()} if cache else None
        top = torch.as_tensor(top_k(engine.complete_scores([q[0] for q in chunk], channels=part), max(KS)))
        for name, v in batch_metrics(top, pad_targets([q[1] for q in chunk]), KS).items():
            vals.setdefault(name, []).append(v.numpy())
        if seen is not None:
            vals.setdefault("seen_share@10", []).append(np.isin(top[:, :10].numpy(), seen_idx).mean(axis=1))
    return {k: np.concatenate(v) for k, v in vals.items() if k.split("@")[0] in ("recall", "ndcg", "seen_share")}


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

PERSONAL_N, PERSONAL_MAX_SIZE = BundleConstraints.n, BundleConstraints.max_size  # the request defaults of /v1/bundles


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


def f1_ci(tr: np.ndarray, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    f = [f1_of(tr[rng.integers(0, len(tr), len(tr))]) for _ in range(BOOTSTRAP)]
    return [float(np.percentile(f, 2.5)), float(np.percentile(f, 97.5))]


def mean_recall(engine: BundleEngine, queries: dict, caches: dict) -> float:
    return float(np.mean([completion_values(engine, q, caches[d])["recall@10"].mean() for d, q in queries.items() if q]))


def recall_and_shares(engine: BundleEngine, queries: dict, caches: dict, seen: set) -> tuple[float, dict]:
    """Mean Recall@10 over the domains (as :func:`mean_recall`) and each domain's top-10 share of
    items seen in training bundles: what the selection's leak gate compares."""
    per = {d: completion_values(engine, q, caches[d], seen=seen) for d, q in queries.items() if q}
    return (float(np.mean([v["recall@10"].mean() for v in per.values()])),
            {d: float(v["seen_share@10"].mean()) for d, v in per.items()})


def gated_best(recall: dict, shares: dict, reference: dict, max_drop: float = LEAK_GATE_POINTS) -> tuple[str, dict]:
    """The leak gate in selection: the key of the best ``recall`` among the candidates whose top-10
    share of seen items stays within ``max_drop`` of ``reference`` (zero-shot's) in every domain,
    whatever their recall; a falling share is what a drift into "not seen in training" looks like.
    Returns (key, {key: the domains where it fails}); raises where every candidate fails."""
    failed = {k: sorted(d for d, s in shares[k].items() if s < reference[d] - max_drop) for k in recall}
    passing = [k for k in recall if not failed[k]]
    if not passing:
        raise ValueError(f"leak gate: every candidate's top-10 seen share is over {max_drop:.2f} below zero-shot's")
    return max(passing, key=recall.get), {k: v for k, v in failed.items() if v}


def naming_values(engine: BundleEngine, namer: IntentNamer, bundles: list, weights: dict, channels: dict | None = None) -> np.ndarray:
    """Per-bundle ROUGE-1 F1 of the name given to its items against its annotated intent."""
    names = namer.names(engine, [b for b, _ in bundles], weights, channels)
    return np.array([rouge1_f1(n, t) for n, (_, t) in zip(names, bundles)])


def named(pairs: list) -> list:
    return [(b, str(t)) for b, t in pairs if isinstance(t, str) and t.strip() and b]
