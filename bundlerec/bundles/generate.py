"""Personalized bundle generation under constraints.

Seeds are the user's top-scored items; each bundle is grown greedily with the candidate maximising
relevance + compatibility with the bundle so far, under the size, budget, exclusion,
category-diversity and no-repeat constraints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from bundlerec.bundles.compat import Compatibility
from bundlerec.pricing.demand import PriceLimits


@dataclass
class BundleConstraints:
    n: int = 3
    """Bundles to return."""
    min_size: int = 2
    max_size: int = 4
    budget: Optional[float] = None
    """Maximum list price of a bundle (sum of item prices)."""
    exclude: tuple = ()
    """Item positions never to include (e.g. already bought)."""
    allow_repeats: bool = False
    """Allow an item in more than one returned bundle."""
    max_per_category: int = 1
    """Items of one category per bundle (no bundle of near-duplicates)."""
    candidates: int = 60
    """Top-scored items considered."""
    relevance_weight: float = 0.5
    """Weight of the user's score (standardised) against compatibility when growing a bundle."""
    limits: PriceLimits = field(default_factory=PriceLimits)
    """The shop's price constraints (maximum discount, minimum margin over cost, price ending)."""


def generate(scores: np.ndarray, compat: Compatibility, categories: Sequence[str], prices: Sequence[float],
             c: BundleConstraints) -> list[dict]:
    """Greedy bundle construction for one user. ``scores``: (N,) relevance of every catalog item."""
    s = np.asarray(scores, dtype=np.float64).copy()
    s[list(c.exclude)] = -np.inf
    order = [int(i) for i in np.argsort(-s, kind="stable")[: c.candidates] if np.isfinite(s[i])]  # ties: lower position first
    if not order:
        return []
    rel = (s[order] - s[order].mean()) / (s[order].std() + 1e-9)
    relpos = dict(zip(order, rel))
    C = compat.matrix(order)
    cpos = {it: k for k, it in enumerate(order)}
    price = lambda i: float(prices[i]) if prices[i] is not None and prices[i] == prices[i] and prices[i] >= 0 else 0.0  # noqa: E731
    used: set = set()
    out = []
    for seed in order:
        if len(out) >= c.n:
            break
        if seed in used and not c.allow_repeats:
            continue
        if c.budget is not None and price(seed) > c.budget:
            continue
        bundle, cost = [seed], price(seed)
        while len(bundle) < c.max_size:
            best, best_gain = None, -np.inf
            for cand in order:
                if cand in bundle or (cand in used and not c.allow_repeats):
                    continue
                if c.budget is not None and cost + price(cand) > c.budget:
                    continue
                if sum(categories[b] == categories[cand] for b in bundle) >= c.max_per_category:
                    continue
                gain = np.mean([C[cpos[b], cpos[cand]] for b in bundle]) + c.relevance_weight * relpos[cand]
                if gain > best_gain:
                    best, best_gain = cand, gain
            if best is None or (len(bundle) >= c.min_size and best_gain <= 0):
                break
            bundle.append(best)
            cost += price(best)
        if len(bundle) < c.min_size:
            continue
        pair = [C[cpos[a], cpos[b]] for k, a in enumerate(bundle) for b in bundle[k + 1:]]
        out.append({"items": bundle, "score": float(np.mean(pair) + c.relevance_weight * np.mean([relpos[i] for i in bundle])),
                    "list_price": round(sum(price(i) for i in bundle), 2)})
        used.update(bundle)
    return out


def bundle_name(categories: Sequence[str]) -> str:
    """A short name from the items' shared category (or the top-level categories joined)."""
    parts = [str(c).replace(".", " > ").split(" > ") for c in categories]
    common = []
    for level in zip(*parts):
        if len(set(level)) == 1:
            common.append(level[0])
        else:
            break
    if common:
        return f"{common[-1].title()} bundle"
    tops = list(dict.fromkeys(p[-1] for p in parts))
    return " + ".join(t.title() for t in tops[:3])
