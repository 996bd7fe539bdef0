"""Inference core shared by the MLflow pyfunc model, the Ray Serve app and the load test.

A :class:`Recommender` wraps one exported model (:mod:`bundlerec.model.export`): the two-tower model,
the precomputed item index, the item table, training popularity (cold start) and the per-user
``latest`` histories of the data snapshot the model was trained with.

    rec = Recommender.from_export("runs/demo/export")
    rec.recommend(user_id="U0000007", k=10)
    rec.recommend(events=[{"item_id": "I000001", "event_type": "view", "event_time": "2026-03-01T10:00:00Z"}])
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional

import numpy as np
import pandas as pd
import torch

from bundlerec.bundles.engine import BundleEngine
from bundlerec.bundles.generate import BundleConstraints
from bundlerec.pricing.demand import PriceLimits
from bundlerec.data.schema import EVENT_TYPE_ID
from bundlerec.inference.fusion import Fusion
from bundlerec.model.collate import pad_history
from bundlerec.privacy import PSEUDO_PREFIX, SCHEME, lookup_key

_BUNDLE = BundleConstraints()  # request defaults: one definition

@dataclass
class History:
    items: list
    types: list
    ages: list
    unknown_items: list = field(default_factory=list)
    source: str = "events"  # events | user | cold_start


class Recommender:
    def __init__(self, model, items: pd.DataFrame, index: torch.Tensor, popularity: np.ndarray,
                 latest: Optional[pd.DataFrame], meta: dict, user_key: Optional[bytes] = None):
        self.model = model.eval()
        self.model.set_index(index)
        self.items = items.reset_index(drop=True)
        self.item_pos = {k: i for i, k in enumerate(self.items.item_id)}
        self.titles = self.items.title.astype(str).tolist()
        self.prices = self.items.price.astype(float).fillna(-1.0).tolist()
        self.item_ids = self.items.item_id.astype(str).tolist()
        self.popularity = torch.as_tensor(popularity, dtype=torch.float32)
        self.meta = meta
        self.history_len = int(meta.get("history_len", 10))
        self.ann = None  # IVF index for large catalogs (configure_ann)
        self.bundle_engine: Optional[BundleEngine] = None  # set by from_export
        self.fusion: Optional[Fusion] = None  # the channels' fusion chosen by the fit step (from_export)
        # histories are keyed by pseudonym (bundlerec.privacy); the key links a request's user id to one
        self.pseudonymized = meta.get("user_ids") == SCHEME
        self.user_key = user_key
        self.latest = {}
        if latest is not None:
            for r in latest.itertuples(index=False):
                self.latest[str(r.user_id)] = (list(r.hist_items), list(r.hist_types), list(r.hist_age_hours),
                                               r.target_time)

    @classmethod
    def from_export(cls, export_dir: str, user_key: Optional[bytes] = None, verify: bool = True) -> "Recommender":
        """``user_key``: the secret that pseudonymized the export's user ids (serve.user_key_file);
        without it users are found by pseudonym (``"pseudo:<hex>"``) only.

        The export must verify against its manifest (bundlerec.integrity): a torn or altered export
        raises IntegrityError instead of serving every known user as a cold start. ``verify=False``
        only for the fit step, which reads the export it is amending (bundlerec.integrity.amend)."""
        from bundlerec.integrity import IntegrityError, require
        from bundlerec.model.export import load_export

        if verify:
            require(export_dir, "export")
        model, meta = load_export(export_dir)
        items = pd.read_parquet(os.path.join(export_dir, "items.parquet"))
        index = torch.as_tensor(np.load(os.path.join(export_dir, "item_index.npy"), allow_pickle=False))
        pop = np.load(os.path.join(export_dir, "popularity.npy"), allow_pickle=False)
        latest = pd.read_parquet(os.path.join(export_dir, "latest.parquet"))
        if not (len(items) == index.shape[0] == len(pop)):
            raise IntegrityError(f"export {export_dir}: {len(items)} items, {index.shape[0]} index rows, "
                                 f"{len(pop)} popularity counts: they must agree")
        rec = cls(model, items, index, pop, latest, meta, user_key)
        rec.fusion = Fusion.from_export(export_dir, rec.model, len(items))
        rec.bundle_engine = BundleEngine.from_export(export_dir, model=model, items=rec.items, index=index.numpy())
        return rec

    def configure_ann(self, min_items: int, nprobe: int, threads: int = 1) -> None:
        """Approximate top-k (bundlerec.inference.ann) when the catalog has at least ``min_items`` items (0 = never)."""
        from bundlerec.inference.ann import IVFIndex

        n = len(self.item_ids)
        self.ann = IVFIndex(self.model._index.numpy(), nprobe=nprobe, threads=threads) if 0 < min_items <= n else None

    # ---------------------------------------------------------------- histories
    def history_for_user(self, user_id: str) -> History:
        """The user's most recent events in the training snapshot; cold start if unknown."""
        hit = self.latest.get(lookup_key(user_id, self.user_key, self.pseudonymized))
        if not hit or not hit[0]:
            return History([], [], [], source="cold_start")
        items, types, ages, _ = hit
        return History(items, types, ages, source="user")

    def history_from_events(self, events: list[dict], now: Optional[datetime] = None) -> History:
        """Events of a live session (item_id, event_type, event_time); unknown items are ignored."""
        now = now or datetime.now(timezone.utc)
        rows, unknown = [], []
        for e in events:
            pos = self.item_pos.get(str(e["item_id"]))
            if pos is None:
                unknown.append(str(e["item_id"]))
                continue
            t = pd.Timestamp(e["event_time"])
            t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
            rows.append((t, pos, EVENT_TYPE_ID[e["event_type"]]))
        rows.sort(key=lambda r: r[0])
        rows = rows[-self.history_len:]
        ages = [max(0.0, (pd.Timestamp(now) - t).total_seconds() / 3600.0) for t, _, _ in rows]
        h = History([r[1] for r in rows], [r[2] for r in rows], ages, unknown_items=unknown)
        if not h.items:
            h.source = "cold_start"
        return h

    # ---------------------------------------------------------------- scoring
    @torch.no_grad()
    def recommend_histories(self, histories: list[History], k: int) -> list[list[tuple[int, float]]]:
        """Top-k (item position, score) per history; one batched forward for all warm histories."""
        out: list = [None] * len(histories)
        warm = [i for i, h in enumerate(histories) if h.items]
        if warm:
            items, types, age, valid = pad_history([histories[i].items for i in warm], [histories[i].types for i in warm],
                                                   [histories[i].ages for i in warm], self.history_len)
            batch = {"hist_items": torch.as_tensor(items), "hist_types": torch.as_tensor(types),
                     "hist_age": torch.as_tensor(age), "hist_valid": torch.as_tensor(valid)}
            if self.fusion is not None and not self.fusion.tuned_only:  # exact: every channel over the catalog
                scores, idx = torch.topk(self.fusion.score(batch), min(k, len(self.item_ids)), dim=1)
                for j, i in enumerate(warm):
                    out[i] = list(zip(idx[j].tolist(), scores[j].tolist()))
            elif self.ann is not None:
                ip, ids = self.ann.search(self.model.user_vectors(batch).numpy(), k)
                for j, i in enumerate(warm):
                    keep = ids[j] >= 0
                    out[i] = list(zip(ids[j][keep].tolist(), (ip[j][keep] / self.model.temperature).tolist()))
            else:
                scores, idx = self.model.topk(batch, k)
                for j, i in enumerate(warm):
                    out[i] = list(zip(idx[j].tolist(), scores[j].tolist()))
        cold = [i for i, h in enumerate(histories) if not h.items]
        if cold:
            s, idx = torch.topk(self.popularity, min(k, len(self.popularity)))
            top = list(zip(idx.tolist(), s.tolist()))
            for i in cold:
                out[i] = top
        return out

    def bundle_constraints(self, h: History, n: int = _BUNDLE.n, max_size: int = _BUNDLE.max_size,
                           budget: Optional[float] = None, allow_repeats: bool = _BUNDLE.allow_repeats,
                           exclude_purchased: bool = True, limits: PriceLimits = _BUNDLE.limits) -> BundleConstraints:
        """A bundle request's constraints for this history (what it bought is excluded); the
        generation knobs are the export's (``bundle_engine.json``, chosen on validation by the fit step)."""
        bought = tuple(dict.fromkeys(i for i, t in zip(h.items, h.types) if t == EVENT_TYPE_ID["purchase"])) \
            if exclude_purchased else ()
        return BundleConstraints(n=n, max_size=max_size, budget=budget, exclude=bought, allow_repeats=allow_repeats,
                                 limits=limits, **self.bundle_engine.params.generation)

    @staticmethod
    def bundle_pool(c: BundleConstraints) -> int:
        """How many top items a bundle request needs retrieved: generation grows bundles from the
        ``c.candidates`` best items that are not excluded."""
        return c.candidates + len(c.exclude)

    def bundle_scores(self, h: History, c: BundleConstraints, ranked: Optional[list] = None) -> np.ndarray:
        """(N,) the user's scores that bundle generation reads: the top :meth:`bundle_pool` items
        (``ranked``, as :meth:`recommend_histories` gives them: the ANN index or exact top-k,
        retrieved here when not given) and -inf elsewhere; a cold start reads popularity."""
        if not h.items:
            return self.popularity.numpy().astype(np.float64)
        if self.bundle_engine.params.history == "completion":  # the engine completes the history as a cart
            return self.bundle_engine.history_scores([h.items])[0]
        if ranked is None:
            ranked = self.recommend_histories([h], self.bundle_pool(c))[0]
        scores = np.full(len(self.item_ids), -np.inf)
        if ranked:
            pos, val = zip(*ranked)
            scores[list(pos)] = val
        return scores

    def bundles(self, h: History, n: int = _BUNDLE.n, max_size: int = _BUNDLE.max_size, budget: Optional[float] = None,
                allow_repeats: bool = _BUNDLE.allow_repeats, exclude_purchased: bool = True,
                limits: PriceLimits = _BUNDLE.limits, query: Optional[str] = None) -> list[dict]:
        """Personalized, priced bundles for one history (the bundle engine over this user's scores),
        combined with a shopper's description when ``query`` is given."""
        c = self.bundle_constraints(h, n, max_size, budget, allow_repeats, exclude_purchased, limits)
        return self.bundles_for(h, c, query=query)

    def bundles_for(self, h: History, c: BundleConstraints, ranked: Optional[list] = None,
                    query: Optional[str] = None) -> list[dict]:
        """:meth:`bundles` with the constraints built and, optionally, the retrieval done (the Serve
        replica retrieves through its request batcher, then generates off the event loop). With
        ``query`` (a shopper's description) the seeds combine it with the history
        (:meth:`BundleEngine.intent_and_history`, the whole catalog scored exactly)."""
        if query is not None:
            scores = self.bundle_engine.intent_and_history(query, self.history_scores(h) if h.items else None)
        else:
            scores = self.bundle_scores(h, c, ranked)
        return self.bundle_engine.personalized(scores, c, seen=set(h.items))

    def history_scores(self, h: History) -> np.ndarray:
        """(N,) a warm history's relevance of every item, from where the engine's ``history`` says
        (the recommender's exact scores, or the bundle engine's completion of the history)."""
        if self.bundle_engine.params.history == "completion":
            return self.bundle_engine.history_scores([h.items])[0]
        return self.catalog_scores(h)

    @torch.no_grad()
    def catalog_scores(self, h: History) -> np.ndarray:
        """(N,) the recommender's score of every catalog item for one warm history (exact)."""
        items, types, age, valid = pad_history([h.items], [h.types], [h.ages], self.history_len)
        batch = {"hist_items": torch.as_tensor(items), "hist_types": torch.as_tensor(types),
                 "hist_age": torch.as_tensor(age), "hist_valid": torch.as_tensor(valid)}
        s = self.fusion.score(batch) if self.fusion is not None else self.model.score(batch)
        return s[0].double().numpy()

    def query_bundles(self, text: str, n: int = _BUNDLE.n, max_size: int = _BUNDLE.max_size,
                      budget: Optional[float] = None, allow_repeats: bool = _BUNDLE.allow_repeats,
                      limits: PriceLimits = _BUNDLE.limits) -> list[dict]:
        """Priced bundles seeded by a free-text shopping intent (the engine's query fusion)."""
        c = BundleConstraints(n=n, max_size=max_size, budget=budget, allow_repeats=allow_repeats, limits=limits,
                              **self.bundle_engine.params.generation)
        return self.bundle_engine.from_query(text, c)

    def complete(self, item_ids: list[str], k: int = 10) -> dict:
        """The items that complete a cart (the bundle engine's completion; ``jobs.eval_bundles``
        measures this call). Unknown ids are reported and ignored."""
        cart = [self.item_pos[i] for i in dict.fromkeys(map(str, item_ids)) if i in self.item_pos]
        unknown = [i for i in map(str, item_ids) if i not in self.item_pos]
        if not cart:
            return {"items": [], "unknown_items": unknown}
        eng = self.bundle_engine
        ranked = eng.complete(cart, k)
        sims = eng.compat.matrix([p for p, _ in ranked], cart) if ranked else np.zeros((0, len(cart)))
        items = self.describe(ranked)
        for item, row in zip(items, sims):
            item["reason"] = f"goes with {self.titles[cart[int(row.argmax())]]}"
        return {"items": items, "unknown_items": unknown}

    def describe(self, ranked: list[tuple[int, float]]) -> list[dict]:
        return [{"item_id": self.item_ids[p], "score": float(s), "title": self.titles[p],
                 "price": None if self.prices[p] < 0 else self.prices[p]} for p, s in ranked]

    # ---------------------------------------------------------------- the explorer page's lookups
    def sample_users(self, n: int) -> list[str]:
        """``n`` users of the snapshot with a history (the first in key order: the same every time),
        named by pseudonym when the export has no clear ids."""
        prefix = PSEUDO_PREFIX if self.pseudonymized else ""
        return [prefix + u for u in sorted(u for u, hit in self.latest.items() if hit[0])[:n]]

    def describe_history(self, h: History) -> list[dict]:
        """The events the model reads for this history (the last ``history_len``), oldest first:
        item, event type, hours before the snapshot."""
        names = {v: k for k, v in EVENT_TYPE_ID.items()}
        n = self.history_len
        return [{"item_id": self.item_ids[p], "title": self.titles[p],
                 "price": None if self.prices[p] < 0 else self.prices[p], "event_type": names.get(int(t), str(t)),
                 "age_hours": round(float(a), 2)} for p, t, a in zip(h.items[-n:], h.types[-n:], h.ages[-n:])]

    def search_items(self, q: str, limit: int) -> list[dict]:
        """Catalog items whose id or title contains ``q`` (case-insensitive), in catalog order."""
        q = q.strip().lower()
        hits = [p for p, (i, t) in enumerate(zip(self.item_ids, self.titles)) if q in i.lower() or q in t.lower()]
        return self.describe([(p, 0.0) for p in hits[:limit]])

    def recommend(self, user_id: Optional[str] = None, events: Optional[list[dict]] = None, k: int = 10) -> dict:
        h = self.history_from_events(events) if events is not None else self.history_for_user(user_id)
        ranked = self.recommend_histories([h], k)[0]
        return {"items": self.describe(ranked), "cold_start": h.source == "cold_start",
                "unknown_items": h.unknown_items, "history_source": h.source}
