"""The bundle data of a bundlerec_intent directory as the evaluation uses it: validation users
carved from the training directory (user- and session-disjoint), the two-tower's training rows,
and the queries (completion, intent, personalized generation, detection sessions)."""

from __future__ import annotations
import hashlib
import json
import math
import os
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from bundlerec.bundles.engine import (
    COMPLETION_EVENT,
)
from bundlerec.bundles.intent import Domain
from bundlerec.config import PipelineConfig
from bundlerec.data.schema import EVENT_TYPE_ID

VAL_MOD = 10  # one user in VAL_MOD (by salted hash) is validation


def carve_validation(train: dict[str, Domain], seed: int) -> tuple[dict[str, Domain], dict[str, Domain]]:
    """(fit, validation): users with ``sha1(seed:user) % VAL_MOD == 0`` are validation."""
    fit, val = {}, {}
    for name, d in train.items():
        users = set(d.bundles.user_id) | set(d.sessions.user_id)
        v = {u for u in users if int(hashlib.sha1(f"{seed}:{u}".encode()).hexdigest(), 16) % VAL_MOD == 0}
        fit[name], val[name] = d.subset(users - v), d.subset(v)
    return fit, val


def _example_rows(bundles: pd.DataFrame, index: dict, rng: np.random.Generator, split: str,
                  mates: bool = False) -> list[tuple]:
    """Train: every item of a bundle is once the target of a random part of the rest (with ``mates``,
    the rest of the bundle follows the target in ``targets``: positives that are never negatives,
    ``model.mask_mates``); val: the first item -> the rest."""
    rows = []
    t = pd.Timestamp("2014-01-01", tz="UTC")
    ev = EVENT_TYPE_ID[COMPLETION_EVENT]
    for items in bundles["items"]:
        ids = [index[i] for i in items]
        if split == "train":  # every item is once the target of a random part of the rest
            for k, tgt in enumerate(ids):
                rest = ids[:k] + ids[k + 1:]
                part = list(rng.permutation(rest)[: rng.integers(1, len(rest) + 1)])
                others = [i for i in rest if i not in part] if mates else []
                rows.append(("b", split, t, [tgt, *others], part, [ev] * len(part), [0.0] * len(part), len(ids), 0))
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
        train_rows = _example_rows(fit[name].bundles, index, rng, "train", mates=cfg.model.mask_mates)
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
        "source": "bundle-completion examples (bundlerec.eval.bundles)", "max_history_len": 512,
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


def session_truth(d: Domain, index: dict) -> list[tuple[list[int], list[list[int]]]]:
    truth = d.bundles.groupby("session_id")["items"].agg(list)
    return [([index[i] for i in s.items if i in index], [[index[i] for i in b] for b in truth[s.session_id]])
            for s in d.sessions.itertuples() if s.session_id in truth.index]


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


def annotated(domains: dict[str, Domain], index: dict) -> dict[str, list[tuple[list[int], str]]]:
    """(items, intent) of every bundle with an annotated intent, per domain."""
    return {d: [([index[i] for i in items], t) for items, t in zip(v.bundles["items"], v.bundles["intent"])]
            if "intent" in v.bundles else [] for d, v in domains.items()}
