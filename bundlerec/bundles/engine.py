"""The bundle engine: one code path for completion, detection and personalized generation, with
pricing and reasons, over one exported catalog and the parameters the export carries.

    engine = BundleEngine.from_export("runs/demo/export")
    engine.complete([cart item positions], k=10)   # the items that complete a cart
    engine.detect([session item positions])         # partition a session into bundles
    engine.personalized(user_scores, constraints)   # priced bundles for one user

The Serve app, the MLflow pyfunc (through :class:`bundlerec.inference.recommender.Recommender`) and
``jobs.eval_bundles`` all call these methods on an engine built by :meth:`BundleEngine.from_export`;
every choice (fusion weights, compatibility weights, merge threshold) is read from the export's
``bundle_engine.json`` (:class:`EngineParams`), so what is served is what was evaluated.

Scoring channels (each an (B, N) score of every catalog item for a batch of carts):

* ``tuned``       -- the fine-tuned two-tower model: the user tower over the cart's items;
* ``pretrained``  -- the pretrained encoder (zero-shot): mean cart embedding . item embedding;
* ``lexical``     -- TF-IDF cosine (:mod:`bundlerec.model.lexical`);
* ``cooccurrence`` -- item-to-item co-occurrence in training groups (the itemknn baseline);
* ``popularity``  -- training counts (the popular baseline).

Completion fuses the channels with weights: each channel's row is standardised (z-score over the
catalog) and the weighted sum ranks the items; cart items are never returned.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from bundlerec.bundles.compat import Compatibility
from bundlerec.bundles.detect import partition
from bundlerec.bundles.generate import BundleConstraints, bundle_name, generate
from bundlerec.model.lexical import Lexical
from bundlerec.bundles.naming import IntentNamer
from bundlerec.pricing.demand import NoFeasiblePrice, PriceLimits, PricingModel
from bundlerec.bundles.rerank import FEATURE_CHANNELS as RERANK_CHANNELS
from bundlerec.bundles.rerank import Reranker
from bundlerec.data.schema import EVENT_TYPE_ID
from bundlerec.data.statistics import CoStats

log = logging.getLogger(__name__)

CHANNELS = ("tuned", "pretrained", "lexical", "cooccurrence", "popularity")
COMPAT_TERMS = ("data", "tuned", "pretrained", "lexical")
QUERY_CHANNELS = ("tuned", "pretrained", "lexical")
# The event type a cart's items carry for the user tower: the bundle-completion training examples
# use the same (bundlerec.eval.bundles.write_training_data).
COMPLETION_EVENT = "purchase"
PARAMS_FILE = "bundle_engine.json"
HISTORY_SOURCES = ("recommender", "completion")
GENERATION_KNOBS = {"relevance_weight", "candidates", "max_per_category"}


@dataclass
class EngineParams:
    """Every choice the engine makes, saved with the export (``bundle_engine.json``)."""

    completion: dict = field(default_factory=lambda: {"tuned": 1.0})
    """Channel -> weight of its standardised scores (see the module doc)."""
    query: dict = field(default_factory=lambda: {"tuned": 1.0})
    """Free-text queries ("a camping starter kit"): channel -> weight (``tuned``/``pretrained``: the
    query encoded by that encoder; ``lexical``: TF-IDF)."""
    compat: dict = field(default_factory=lambda: {"data": 1.0, "tuned": 1.0})
    """Compatibility terms -> weight: ``data`` (co-purchase sPMI), ``tuned``/``pretrained`` (encoder
    cosines), ``lexical`` (TF-IDF cosine). Used by detection and personalized generation."""
    threshold: float = 0.5
    """Detection: clusters merge while their average compatibility is at least this."""
    max_size: int = 8
    """Detection: largest bundle."""
    generation: dict = field(default_factory=lambda: {"relevance_weight": 0.5, "candidates": 60, "max_per_category": 1})
    """Personalized generation (:class:`bundlerec.bundles.generate.BundleConstraints` fields): the
    weight of the user's relevance against compatibility, the candidate pool, items per category."""
    history: str = "recommender"
    """Personalized generation: where a shopper's relevance comes from. ``recommender``: the served
    recommender's scores of the history (the fitted fusion of a clickstream export, else the two-tower);
    ``completion``: the engine's completion of the history as a cart (:meth:`BundleEngine.history_scores`:
    the completion fusion, then the re-ranker where it is used)."""
    intent_history: dict = field(default_factory=lambda: {"query": 0.5, "history": 0.5})
    """A shopper's description together with their history: weights of the standardised query scores
    and history scores whose sum seeds personalized generation (:meth:`BundleEngine.intent_and_history`)."""
    rerank: bool = False
    """Completion: re-order the fused top candidates with the export's re-ranker
    (:mod:`bundlerec.bundles.rerank`, ``rerank.json`` + ``rerank.skops``)."""
    selection: dict = field(default_factory=dict)
    """How the values were chosen (validation data and figures), for the record."""

    def __post_init__(self):
        bad = (set(self.completion) - set(CHANNELS) | set(self.compat) - set(COMPAT_TERMS)
               | set(self.query) - set(QUERY_CHANNELS))
        if bad:
            raise ValueError(f"unknown engine channels {sorted(bad)}; known: {CHANNELS} / {COMPAT_TERMS}")
        if set(self.intent_history) - {"query", "history"}:
            raise ValueError(f"intent_history takes the weights query and history, not {sorted(self.intent_history)}")
        if self.history not in HISTORY_SOURCES:
            raise ValueError(f"history={self.history!r}; known: {HISTORY_SOURCES}")
        bad = set(self.generation) - GENERATION_KNOBS
        if bad:
            raise ValueError(f"unknown generation parameters {sorted(bad)}; known: {sorted(GENERATION_KNOBS)}")

    def save(self, export_dir: str) -> None:
        with open(os.path.join(export_dir, PARAMS_FILE), "w") as f:
            json.dump(asdict(self), f, indent=2)

    @classmethod
    def load(cls, export_dir: str) -> "EngineParams":
        path = os.path.join(export_dir, PARAMS_FILE)
        return cls(**json.load(open(path))) if os.path.exists(path) else cls()


def write_engine_assets(export_dir: str, items: pd.DataFrame, pretrained_name: str, ids: np.ndarray,
                        mask: np.ndarray, temperature: float, cache_dir: Optional[str] = None) -> None:
    """The engine's text channels beside an export: the pretrained encoder's item index
    (``item_index_pretrained.npy``) and the lexical index; default parameters if none are saved.
    ``cache_dir``: reuse a pretrained index computed for the same model and tokens (dev folds)."""
    import hashlib

    from bundlerec.hub import resolve_model_path
    from bundlerec.model.pretrained import resolve_pooling
    from bundlerec.model.two_tower import TwoTower, build_encoder

    key = hashlib.sha1(pretrained_name.encode() + np.ascontiguousarray(ids).tobytes() +
                       np.ascontiguousarray(mask).tobytes()).hexdigest()[:16]
    cached = os.path.join(cache_dir, f"pretrained-{key}.npy") if cache_dir else None
    if cached and os.path.exists(cached):
        index = np.load(cached)
    else:
        path = resolve_model_path(pretrained_name)
        zs = TwoTower(build_encoder(path), temperature, resolve_pooling(path)).eval()
        index = zs.index_items(torch.as_tensor(ids), torch.as_tensor(mask), progress="bundle engine: encode catalog (pretrained)").numpy()
        if cached:
            os.makedirs(cache_dir, exist_ok=True)
            np.save(cached + ".tmp.npy", index)
            os.replace(cached + ".tmp.npy", cached)
    np.save(os.path.join(export_dir, "item_index_pretrained.npy"), index.astype(np.float32))
    Lexical.fit(items.text.tolist()).save(export_dir)
    if not os.path.exists(os.path.join(export_dir, PARAMS_FILE)):
        EngineParams().save(export_dir)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """(B, N) scores -> (B, k) positions, best first; ties go to the lower position (one ranking
    rule for serving and evaluation)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def _standardize(s: np.ndarray) -> np.ndarray:
    s = np.asarray(s, dtype=np.float64)
    return (s - s.mean(1, keepdims=True)) / (s.std(1, keepdims=True) + 1e-9)


class BundleEngine:
    def __init__(self, items: pd.DataFrame, model, index: np.ndarray, stats: CoStats, pricing: PricingModel,
                 pricing_info: Optional[dict] = None, params: Optional[EngineParams] = None,
                 pretrained: Optional[np.ndarray] = None, lexical: Optional[Lexical] = None,
                 popularity: Optional[np.ndarray] = None, history_len: int = 64,
                 reranker: Optional[Reranker] = None, namer: Optional[IntentNamer] = None):
        n = len(items)
        for name, arr in (("item index", index), ("pretrained index", pretrained), ("lexical index", lexical),
                          ("popularity", popularity)):
            if arr is not None and len(arr) != n:
                raise ValueError(f"export is inconsistent: {name} has {len(arr)} rows for {n} catalog items")
        self.item_ids = items.item_id.astype(str).tolist()
        self.titles = items.title.astype(str).tolist()
        self.prices = items.price.astype(float).fillna(-1.0).tolist()
        self.categories = items.category.astype(str).tolist()
        self.brands = items.brand.tolist() if "brand" in items else [None] * n
        self.costs = (pd.to_numeric(items.cost, errors="coerce").astype(float).tolist() if "cost" in items
                      else [float("nan")] * n)
        self.reranker = reranker
        self.namer = namer
        self.model, self.index, self.stats = model, np.asarray(index, dtype=np.float32), stats
        self.pretrained, self.lexical = pretrained, lexical
        self.popularity = np.zeros(n) if popularity is None else np.asarray(popularity, dtype=np.float64)
        self.history_len = history_len
        self.export_dir: Optional[str] = None  # tokenizer of the tuned encoder (queries)
        self.pretrained_name: Optional[str] = None  # the pretrained encoder (queries), loaded on first use
        self._text: dict = {}
        self.pricing = pricing
        self.pricing_info = pricing_info or {"source": "default"}
        self.params = params or EngineParams()
        self._knn = None
        self.compat = self._compat()

    @classmethod
    def from_export(cls, export_dir: str, model=None, items: Optional[pd.DataFrame] = None,
                    index: Optional[np.ndarray] = None) -> "BundleEngine":
        """The engine of an export; ``model``/``items``/``index`` (the item index) when the caller has
        loaded them already (a replica then holds one copy of the index: 1.5 GB at 1 M items)."""
        from bundlerec.model.export import load_export

        meta = json.load(open(os.path.join(export_dir, "bundlerec.json")))
        if model is None:
            model, meta = load_export(export_dir)
        if items is None:
            items = pd.read_parquet(os.path.join(export_dir, "items.parquet"))
        n = len(items)
        opt = lambda f: np.load(os.path.join(export_dir, f)) if os.path.exists(os.path.join(export_dir, f)) else None  # noqa: E731
        pricing, info = PricingModel.load(export_dir)
        params = EngineParams.load(export_dir)
        index = np.load(os.path.join(export_dir, "item_index.npy")) if index is None else index
        eng = cls(items, model, index, CoStats.load(export_dir, n),
                  pricing, info, params, pretrained=opt("item_index_pretrained.npy"),
                  lexical=Lexical.load(export_dir), popularity=opt("popularity.npy"),
                  history_len=int(meta.get("history_len", 64)), reranker=Reranker.load(export_dir),
                  namer=IntentNamer.load(export_dir))
        if params.rerank and eng.reranker is None:
            raise ValueError(f"{export_dir}: {PARAMS_FILE} asks for re-ranking but the export has no re-ranker")
        eng.export_dir, eng.pretrained_name = export_dir, meta.get("base_model")
        missing = [c for c in {*params.completion, *params.compat, *params.query} if eng._absent(c)]
        if missing:
            raise ValueError(f"{export_dir}: {PARAMS_FILE} uses channels the export lacks: {missing}")
        return eng

    def _absent(self, channel: str) -> bool:
        return ((channel == "pretrained" and self.pretrained is None) or (channel == "lexical" and self.lexical is None)
                or (channel == "tuned" and self.model is None))

    def with_params(self, params: EngineParams) -> "BundleEngine":
        """The same engine with other parameters (validation grids, baselines)."""
        eng = copy.copy(self)
        eng.params = params
        eng.compat = eng._compat()
        return eng

    # ---------------------------------------------------------------- completion
    def channel_scores(self, channel: str, carts: Sequence[Sequence[int]]) -> np.ndarray:
        """(B, N) raw scores of one channel for a batch of carts (item positions)."""
        if channel == "tuned":
            from bundlerec.model.collate import history_tensors

            ev = EVENT_TYPE_ID[COMPLETION_EVENT]
            batch = history_tensors({"hist_items": [list(c) for c in carts], "hist_types": [[ev] * len(c) for c in carts],
                                     "hist_age_hours": [[0.0] * len(c) for c in carts]}, self.history_len, "cpu")
            if self.model._index is None:
                self.model.set_index(torch.as_tensor(self.index))
            return self.model.score(batch).numpy().astype(np.float64)
        if channel == "pretrained":
            q = np.stack([self.pretrained[list(c)].mean(0) for c in carts])
            q /= np.linalg.norm(q, axis=1, keepdims=True) + 1e-12
            return q @ self.pretrained.T
        if channel == "lexical":
            return self.lexical.cart_scores(carts)
        if channel == "cooccurrence":
            if self._knn is None:
                from bundlerec.data.statistics import ItemKNN

                self._knn = ItemKNN(self.stats.pairs)
            rows = sp.csr_matrix((np.ones(sum(len(c) for c in carts), np.float32),
                                  (np.repeat(np.arange(len(carts)), [len(c) for c in carts]),
                                   np.concatenate([np.asarray(c, np.int64) for c in carts]))),
                                 shape=(len(carts), len(self.item_ids)))
            rows.data[:] = 1.0
            return (rows @ self._knn.sim).toarray() + self._knn.pop.numpy()[None, :]
        if channel == "popularity":
            return np.repeat(self.popularity[None, :], len(carts), axis=0)
        raise ValueError(f"unknown channel {channel!r}; known: {CHANNELS}")

    def fused_scores(self, carts: Sequence[Sequence[int]], channels: Optional[dict] = None,
                     extra: Sequence[str] = ()) -> tuple[np.ndarray, dict]:
        """((B, N) fused scores with cart items at -inf, {channel: raw (B, N)}) for the fusion's
        channels and ``extra`` ones. ``channels``: precomputed raw scores (validation grids reuse them)."""
        carts = [list(dict.fromkeys(int(i) for i in c)) for c in carts]
        if any(not c for c in carts):
            raise ValueError("every cart needs at least one item")
        raw = {}
        for ch in dict.fromkeys([*(c for c, w in self.params.completion.items() if w), *extra]):
            raw[ch] = channels[ch] if channels is not None and ch in channels else self.channel_scores(ch, carts)
        out = np.zeros((len(carts), len(self.item_ids)))
        for ch, w in self.params.completion.items():
            if w:
                out += w * _standardize(raw[ch])
        for b, c in enumerate(carts):
            out[b, c] = -np.inf
        return out, raw

    def complete_scores(self, carts: Sequence[Sequence[int]], channels: Optional[dict] = None) -> np.ndarray:
        """(B, N) completion scores; cart items are -inf. The fused channels, then (``params.rerank``)
        the re-ranker's order of the fused top candidates."""
        if not self.params.rerank:
            return self.fused_scores(carts, channels)[0]
        carts = [list(dict.fromkeys(int(i) for i in c)) for c in carts]
        fused, raw = self.fused_scores(carts, channels, extra=RERANK_CHANNELS)
        return self.reranker.rerank(self, carts, fused, raw)

    def complete(self, cart: Sequence[int], k: int = 10, exclude: Sequence[int] = ()) -> list[tuple[int, float]]:
        """The ``k`` items that best complete ``cart``, as (position, score)."""
        s = self.complete_scores([cart])
        s[0, list(exclude)] = -np.inf
        top, s = top_k(s, k)[0], s[0]
        return [(int(i), float(s[i])) for i in top if np.isfinite(s[i])]

    def history_scores(self, carts: Sequence[Sequence[int]]) -> np.ndarray:
        """(B, N) relevance of every item for histories read as carts (``params.history`` completion):
        :meth:`complete_scores`, each cart's own items given its lowest finite score (they are
        excluded from what is generated, and the scores stay finite for :meth:`combine_intent_history`)."""
        s = self.complete_scores(carts)
        fin = np.isfinite(s)
        low = np.where(fin, s, np.inf).min(1, keepdims=True)
        return np.where(fin, s, np.where(np.isfinite(low), low, 0.0))

    # ---------------------------------------------------------------- free-text queries
    def _encoder(self, channel: str):
        """(tokenizer, model with encode_items) of the tuned or pretrained encoder, loaded once."""
        if channel not in self._text:
            from bundlerec.hub import load_tokenizer, resolve_model_path
            from bundlerec.model.pretrained import resolve_pooling

            if channel == "tuned":
                tok, model = load_tokenizer(os.path.join(self.export_dir, "encoder")), self.model
            else:
                from bundlerec.model.two_tower import TwoTower, build_encoder

                path = resolve_model_path(self.pretrained_name)
                tok, model = load_tokenizer(path), TwoTower(build_encoder(path), pooling=resolve_pooling(path)).eval()
            self._text[channel] = (tok, model)
        return self._text[channel]

    def query_channel_scores(self, channel: str, texts: Sequence[str]) -> np.ndarray:
        """(B, N) raw scores of every item for free-text queries."""
        if channel == "lexical":
            return self.lexical.query_scores(texts)
        return self.encode_texts(channel, texts) @ (self.index if channel == "tuned" else self.pretrained).T

    def encode_texts(self, channel: str, texts: Sequence[str]) -> np.ndarray:
        """(B, d) normalised embeddings of free texts by the ``tuned`` or ``pretrained`` item encoder."""
        tok, model = self._encoder(channel)
        enc = tok([str(t) for t in texts], truncation=True, max_length=64, padding=True, return_tensors="pt")
        with torch.no_grad():
            return model.encode_items(enc["input_ids"], enc["attention_mask"]).float().numpy()

    def query_scores(self, texts: Sequence[str], channels: Optional[dict] = None) -> np.ndarray:
        """(B, N) fused scores of every item for free-text queries (``params.query`` weights)."""
        if any(not str(t).strip() for t in texts):
            raise ValueError("a query needs some text")
        out = np.zeros((len(texts), len(self.item_ids)))
        for ch, w in self.params.query.items():
            if w:
                raw = channels[ch] if channels is not None and ch in channels else self.query_channel_scores(ch, texts)
                out += w * _standardize(raw)
        return out

    def intent_and_history(self, text: str, history_scores: Optional[np.ndarray]) -> np.ndarray:
        """(N,) relevance of every item for a description plus a history: the ``intent_history``
        weighted sum of the standardised query fusion and the standardised history scores (the
        query alone for a shopper with no history)."""
        return self.combine_intent_history(self.query_scores([text])[0], history_scores)

    def combine_intent_history(self, query_scores: np.ndarray, history_scores: Optional[np.ndarray]) -> np.ndarray:
        """:meth:`intent_and_history` from precomputed (N,) query and history scores."""
        q = _standardize(np.asarray(query_scores, dtype=np.float64)[None, :])[0]
        if history_scores is None:
            return q
        w = self.params.intent_history
        return w.get("query", 0.5) * q + w.get("history", 0.5) * _standardize(np.asarray(history_scores, dtype=np.float64)[None, :])[0]

    def from_query(self, text: str, c: BundleConstraints) -> list[dict]:
        """Priced bundles seeded by a free-text query (the query's best items, grown by compatibility)."""
        return self.personalized(self.query_scores([text])[0], c)

    # ---------------------------------------------------------------- detection / generation
    def _compat(self) -> Compatibility:
        w = self.params.compat
        extra = []
        if w.get("pretrained") and self.pretrained is not None:
            extra.append((self.pretrained, w["pretrained"]))
        if w.get("lexical") and self.lexical is not None:
            extra.append((self.lexical.X, w["lexical"]))
        return Compatibility(self.stats.pairs, self.stats.counts, self.stats.groups, self.index,
                             w_data=float(w.get("data", 0.0)), w_text=float(w.get("tuned", 0.0)), extra=extra)

    def detect(self, items: Sequence[int]) -> list[list[int]]:
        """Partition a session's items into bundles (groups of >= 2; the rest stay single)."""
        return partition(items, self.compat, self.params.threshold, self.params.max_size)

    def personalized(self, scores: np.ndarray, c: BundleConstraints, seen: Optional[set] = None) -> list[dict]:
        """Priced bundles for one user; ``scores`` (N,) is the user's relevance of every item."""
        found = self.generate(scores, c)
        priced = self.price_bundles([b["items"] for b in found], c.limits)
        return [self.describe_bundle(b["items"], b["score"], seen or set(), p) for b, p in zip(found, priced)]

    def generate(self, scores: np.ndarray, c: BundleConstraints) -> list[dict]:
        """The bundles :meth:`personalized` prices and names: ``{"items": positions, "score"}`` each
        (what a selection grid scores: the answer's item sets without its pricing and naming)."""
        return generate(scores, self.compat, self.categories, self.prices, c)

    def price_bundles(self, bundles: list[list[int]], limits: PriceLimits = PriceLimits()) -> list[tuple[dict, str]]:
        """(price dict, why not) of each bundle: all of them priced with one pricing-model call; an
        empty dict and the reason where a bundle gets no price."""
        out: list = [({}, "none (no item prices)")] * len(bundles)
        todo = []
        for k, items in enumerate(bundles):
            costs = [self.costs[i] for i in items]
            if limits.min_margin > 0 and not all(np.isfinite(costs)):
                out[k] = ({}, "none (min_margin needs every item's catalog cost)")
            elif sum(max(self.prices[i], 0.0) for i in items) > 0:
                todo.append(k)
        specs = []
        for k in todo:
            items, costs = bundles[k], [self.costs[i] for i in bundles[k]]
            specs.append(dict(item_prices=[max(self.prices[i], 0.0) for i in items], item_names=[self.titles[i] for i in items],
                              item_ids=[self.item_ids[i] for i in items], costs=costs if all(np.isfinite(costs)) else None))
        for k, res in zip(todo, self.pricing.price_many(specs, max_discount=limits.max_discount, min_margin=limits.min_margin,
                                                         price_ending=limits.price_ending, explore=limits.explore,
                                                         rng=np.random.default_rng() if limits.explore else None,
                                                         shift=limits.shift)):
            out[k] = ({}, f"none ({res})") if isinstance(res, NoFeasiblePrice) else (res, "")
        return out

    def describe_bundle(self, items: list[int], score: float, seen: set, priced: tuple[dict, str]) -> dict:
        """The answer's form of one bundle: name, items with their reason, price (``priced``: an
        entry of :meth:`price_bundles`)."""
        priced, why = priced
        return {"name": self.name(items), "score": score,
                "items": [{"item_id": self.item_ids[i], "title": self.titles[i],
                           "price": None if self.prices[i] < 0 else self.prices[i],
                           "reason": self.reason(i, items, seen)} for i in items],
                **{k: priced.get(k) for k in ("list_price", "bundle_price", "discount", "expected_revenue",
                                               "expected_revenue_separately", "offer", "offer_reason", "optimal_price",
                                               "price_propensity")},
                "price_source": self.pricing_info["source"] if priced else why}

    def name(self, items: list[int]) -> str:
        """The bundle's name: the best-fitting annotated intent of the training bundles where the
        export has them (:mod:`bundlerec.bundles.naming`), else from the items' shared category."""
        if self.namer is not None and self.pretrained is not None and self.lexical is not None:
            return self.namer.names(self, [items])[0]
        return bundle_name([self.categories[i] for i in items])

    def reason(self, item: int, bundle: list, seen: set) -> str:
        if item in seen:
            return "you looked at it recently"
        others = [j for j in bundle if j != item]
        if others:
            pmi = self.compat.spmi(np.array([item]), np.array(others))[0]
            if pmi.max() > 0:
                return f"often bought with {self.titles[others[int(pmi.argmax())]]}"
        cat = self.categories[item].replace(".", " > ").split(" > ")[-1]
        return f"matches your interest in {cat}"
