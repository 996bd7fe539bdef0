"""The sentence-transformers fine-tuning baseline of the bundle evaluation (bundlerec.eval.st_baseline):
its training pairs come from training bundles only, it trains with ST's own trainer for the budget it
is given, and its index is the catalog in item order, normalised, cached per inputs."""

import numpy as np
import pandas as pd
import pytest

from bundlerec.bundles.intent import Domain
from bundlerec.eval.st_baseline import bundle_pairs, fit_index
from tests.support import tiny_encoder

ITEMS = pd.DataFrame({"item_id": [f"x{i}" for i in range(8)],
                      "text": [f"item {i} | category: {'tents' if i < 4 else 'stoves'}" for i in range(8)]})


def _fit():
    b = pd.DataFrame({"bundle_id": ["b0", "b1", "b2"], "session_id": ["s0", "s1", "s2"], "user_id": ["u0", "u1", "u2"],
                      "items": [["x0", "x1", "x2"], ["x4", "x5"], ["x6"]], "intent": ["camp", "cook", "one"]})
    return {"d": Domain("d", ITEMS, b, pd.DataFrame({"session_id": [], "user_id": [], "items": []}))}


def test_pairs_are_distinct_items_of_one_training_bundle():
    text = dict(zip(ITEMS.item_id, ITEMS.text))
    allowed = {(text[a], text[b]) for bundle in (["x0", "x1", "x2"], ["x4", "x5"]) for a in bundle for b in bundle if a != b}
    pairs = bundle_pairs(_fit(), ITEMS, 20, seed=0)
    assert len(pairs) == 20 and set(pairs) <= allowed and set(pairs) == allowed  # 8 ordered pairs, all used
    assert bundle_pairs(_fit(), ITEMS, 20, seed=0) == pairs and bundle_pairs(_fit(), ITEMS, 20, seed=1) != pairs
    lonely = {"d": Domain("d", ITEMS, _fit()["d"].bundles.iloc[2:], _fit()["d"].sessions)}
    with pytest.raises(ValueError, match="two items"):
        bundle_pairs(lonely, ITEMS, 5, seed=0)


def test_fit_index_trains_with_the_budget_and_caches(tmp_path):
    index, info = fit_index(tiny_encoder(), _fit(), ITEMS, examples=16, batch_size=4, max_tokens=16, seed=0,
                            cache_dir=str(tmp_path))
    assert index.shape == (8, 64) and np.allclose(np.linalg.norm(index, axis=1), 1, atol=1e-4)
    assert info.pairs == 16 and info.steps == 4 and info.batch_size == 4 and info.samples_per_s > 0
    again, info2 = fit_index(tiny_encoder(), _fit(), ITEMS, examples=16, batch_size=4, max_tokens=16, seed=0,
                             cache_dir=str(tmp_path))
    assert np.array_equal(again, index) and info2 == info  # from the cache: same inputs, same answer
    other, _ = fit_index(tiny_encoder(), _fit(), ITEMS, examples=32, batch_size=4, max_tokens=16, seed=0,
                         cache_dir=str(tmp_path))
    assert not np.allclose(other, index)  # another budget trains another model
