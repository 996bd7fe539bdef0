"""The generation metric: generated bundles matched one-to-one to annotated ones by Jaccard.

Precision = matched Jaccard / generated bundles, recall = matched Jaccard / annotated bundles.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment


def jaccard(a: Sequence, b: Sequence) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 0.0


def match(generated: list[list], truth: list[list]) -> tuple[float, int, int]:
    """One-to-one best-Jaccard matching (Hungarian). Returns (sum of matched Jaccard, #gen, #truth)."""
    if not generated or not truth:
        return 0.0, len(generated), len(truth)
    J = np.array([[jaccard(g, t) for t in truth] for g in generated])
    r, c = linear_sum_assignment(-J)
    return float(J[r, c].sum()), len(generated), len(truth)


def prf(total_jaccard: float, n_gen: int, n_truth: int) -> dict:
    p = total_jaccard / n_gen if n_gen else 0.0
    r = total_jaccard / n_truth if n_truth else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}
