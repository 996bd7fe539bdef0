"""Bundle detection: partition one session's items into the bundles it holds (generation F1)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from bundlerec.bundles.compat import Compatibility


def partition(items: Sequence[int], compat: Compatibility, threshold: float, max_size: int = 8) -> list[list[int]]:
    """Average-linkage agglomerative grouping of a session's items; groups of >= 2 items are bundles."""
    clusters = [[int(i)] for i in dict.fromkeys(items)]
    if len(clusters) < 2:
        return []
    S = compat.matrix([c[0] for c in clusters])
    pos = {c[0]: k for k, c in enumerate(clusters)}
    while len(clusters) > 1:
        best, pair = -np.inf, None
        for x in range(len(clusters)):
            for y in range(x + 1, len(clusters)):
                if len(clusters[x]) + len(clusters[y]) > max_size:
                    continue
                s = np.mean([S[pos[i], pos[j]] for i in clusters[x] for j in clusters[y]])
                if s > best:
                    best, pair = s, (x, y)
        if pair is None or best < threshold:
            break
        x, y = pair
        clusters[x] = clusters[x] + clusters[y]
        del clusters[y]
    return [c for c in clusters if len(c) >= 2]
