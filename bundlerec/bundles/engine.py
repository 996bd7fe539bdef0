"""The bundle engine: compatibility + generation + pricing + reasons over one exported catalog.

The Serve app, the MLflow pyfunc and the demo all call :meth:`BundleEngine.personalized`; it reads
its statistics from the serving export (:mod:`bundlerec.model.export`), so what is served is what
the export holds.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import pandas as pd
import scipy.sparse as sp

from bundlerec.bundles.compat import Compatibility
from bundlerec.bundles.generate import BundleConstraints, bundle_name, generate
from bundlerec.bundles.pricing import PricingModel


class BundleEngine:
    def __init__(self, items: pd.DataFrame, compat: Compatibility, pricing: PricingModel,
                 pricing_info: Optional[dict] = None):
        self.item_ids = items.item_id.astype(str).tolist()
        self.titles = items.title.astype(str).tolist()
        self.prices = items.price.astype(float).fillna(-1.0).tolist()
        self.categories = items.category.astype(str).tolist()
        self.compat = compat
        self.pricing = pricing
        self.pricing_info = pricing_info or {"source": "default"}

    @classmethod
    def from_export(cls, export_dir: str, items: pd.DataFrame, embeddings: np.ndarray) -> "BundleEngine":
        """Co-purchase statistics and the fitted pricing model of an export (text-only compatibility
        when the export has no co-purchase counts; price_source "default" without a fitted model)."""
        n = len(items)
        path = os.path.join(export_dir, "copurchase.npz")
        if os.path.exists(path):
            pairs = sp.load_npz(path)
            counts = np.load(os.path.join(export_dir, "copurchase_items.npy"))
            groups = int(open(os.path.join(export_dir, "copurchase_groups.txt")).read())
        else:
            pairs, counts, groups = sp.csr_matrix((n, n), dtype=np.float32), np.zeros(n), 1
        pricing, info = PricingModel.load(export_dir)
        return cls(items, Compatibility(pairs, counts, groups, embeddings), pricing, info)

    def personalized(self, scores: np.ndarray, c: BundleConstraints, seen: Optional[set] = None) -> list[dict]:
        """Priced bundles for one user; ``scores`` (N,) is the user's relevance of every item."""
        seen = seen or set()
        out = []
        for b in generate(scores, self.compat, self.categories, self.prices, c):
            items = b["items"]
            prices = [max(self.prices[i], 0.0) for i in items]
            priced = self.pricing.price(prices, [self.titles[i] for i in items]) if sum(prices) > 0 else {}
            out.append({"name": bundle_name([self.categories[i] for i in items]), "score": b["score"],
                        "items": [{"item_id": self.item_ids[i], "title": self.titles[i],
                                   "price": None if self.prices[i] < 0 else self.prices[i],
                                   "reason": self.reason(i, items, seen)} for i in items],
                        **{k: priced.get(k) for k in ("list_price", "bundle_price", "discount", "expected_revenue",
                                                       "expected_revenue_separately")},
                        "price_source": self.pricing_info["source"] if priced else "none (no item prices)"})
        return out

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
