"""Train on one bundlerec_intent directory, evaluate bundle completion and generation on another.

Training is the normal Ray Train + DeepSpeed loop with a *bundle-completion* objective: each
training bundle becomes examples whose "history" is part of the bundle and whose target is one of
the remaining items (so in-batch softmax learns "what completes this bundle"). Nothing from the
evaluation directory is used for training or for choosing thresholds.

Completion: for each evaluation bundle, given its first item (and, separately, half of its items),
rank the domain's catalog (inputs excluded) for the rest. Generation: given a session's items,
partition them into bundles and match them one-to-one to the annotated bundles by Jaccard.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bundlerec.bundles.compat import Compatibility
from bundlerec.bundles.detect import partition
from bundlerec.bundles.intent import Domain, load
from bundlerec.bundles.matching import match, prf
from bundlerec.config import PipelineConfig
from bundlerec.data.statistics import cooccurrence_counts, item_counts
from bundlerec.eval.baselines import ItemKNN, Popular
from bundlerec.eval.metrics import MetricAccumulator

log = logging.getLogger(__name__)
METHODS = ("bundlerec", "popular", "itemknn", "zeroshot")
COMPLETION_METRICS = ("recall@10", "ndcg@10", "recall@20")
BLEND_ALPHAS = (0.0, 0.25, 0.5, 0.75)


def _example_rows(bundles: pd.DataFrame, index: dict, rng: np.random.Generator, split: str) -> list[tuple]:
    rows = []
    t = pd.Timestamp("2014-01-01", tz="UTC")
    for items in bundles["items"]:
        ids = [index[i] for i in items]
        if split == "train":  # every item is once the target of a random part of the rest
            for k, tgt in enumerate(ids):
                rest = ids[:k] + ids[k + 1:]
                part = list(rng.permutation(rest)[: rng.integers(1, len(rest) + 1)])
                rows.append(("b", split, t, [tgt], part, [3] * len(part), [0.0] * len(part), len(ids), 0))
        else:
            rows.append(("b", split, t, ids[1:], ids[:1], [3], [0.0], len(ids), 0))
    return rows


def write_training_data(train: dict[str, Domain], items: pd.DataFrame, out: str, cfg: PipelineConfig,
                        val_frac: float = 0.1, seed: int = 0) -> str:
    """A prep-format directory (items + examples) for the bundle-completion objective."""
    import ray.data

    from bundlerec.data import catalog as catalog_lib
    from bundlerec.data.examples import EXAMPLE_ARROW
    from bundlerec.storage import reset_dir

    rng = np.random.default_rng(seed)
    index = dict(zip(items.item_id, items.item_idx))
    rows = {"train": [], "val": [], "test": [], "latest": []}
    for d in train.values():
        b = d.bundles.sample(frac=1.0, random_state=seed)
        n_val = int(len(b) * val_frac)
        rows["train"] += _example_rows(b.iloc[n_val:], index, rng, "train")
        rows["val"] += _example_rows(b.iloc[:n_val], index, rng, "val")
    rows["test"] = rows["val"]
    cols = [f.name for f in EXAMPLE_ARROW]
    for split, r in rows.items():
        reset_dir(os.path.join(out, "examples", split))
        df = pd.DataFrame(r, columns=cols)
        pq.write_table(pa.Table.from_pandas(df, schema=EXAMPLE_ARROW, preserve_index=False),
                       os.path.join(out, "examples", split, "part-0.parquet"))
    from bundlerec.storage import write_text

    write_text(os.path.join(out, "manifest.json"), json.dumps({  # histories are parts of bundles: never truncated
        "source": "bundle-completion examples (bundlerec.bundles.evaluate)", "max_history_len": 512,
        "examples": {k: len(v) for k, v in rows.items()}, "items": len(items)}, indent=2))
    reset_dir(os.path.join(out, "items"))
    ray.data.from_pandas(items).map_batches(
        catalog_lib.tokenize_batch, batch_format="pandas", batch_size=4096,
        fn_kwargs={"model_name": cfg.model.name_or_path, "max_tokens": cfg.data.item_max_tokens},
    ).repartition(1).write_parquet(os.path.join(out, "items"))
    return out


class _Masked:
    """Scores restricted to one domain's items, inputs excluded."""

    def __init__(self, scorer, allowed: np.ndarray):
        self.scorer, self.allowed = scorer, allowed

    def score(self, batch):
        s = self.scorer.score(batch).float().clone()
        s[:, ~torch.as_tensor(self.allowed)] = -1e9
        hist = batch["hist_items"].clamp(min=0)
        s.scatter_(1, hist, torch.full(hist.shape, -1e9))
        return s


class _Blend:
    """bundlerec's completion scorer: the fine-tuned model's scores, optionally blended with the
    pretrained encoder's (``(1 - alpha) * fine-tuned + alpha * pretrained``, an output-space version
    of WiSE-FT's robust fine-tuning); ``alpha`` is chosen on the *training* directory's held-out bundles."""

    def __init__(self, tuned, pretrained, alpha: float):
        self.tuned, self.pretrained, self.alpha = tuned, pretrained, alpha

    def score(self, batch):
        s = self.tuned.score(batch).float()
        return s if self.alpha == 0 else (1 - self.alpha) * s + self.alpha * self.pretrained.score(batch).float()


def _val_bundles(train: dict[str, Domain], seed: int, val_frac: float = 0.1) -> dict[str, pd.DataFrame]:
    """The training directory's held-out bundles (the same ones write_training_data keeps out)."""
    out = {}
    for name, d in train.items():
        b = d.bundles.sample(frac=1.0, random_state=seed)
        out[name] = b.iloc[:int(len(b) * val_frac)]
    return out


def _completion(scorer, bundles: pd.DataFrame, index: dict, allowed: np.ndarray, mode: str, n_items: int) -> dict:
    from bundlerec.model.collate import history_tensors

    acc = MetricAccumulator([10, 20], n_items)
    masked = _Masked(scorer, allowed)
    rows = []
    for items in bundles["items"]:
        ids = [index[i] for i in items]
        k = 1 if mode == "first" else math.ceil(len(ids) / 2)
        if len(ids) - k >= 1:
            rows.append((ids[:k], ids[k:]))
    for i in range(0, len(rows), 256):
        chunk = rows[i:i + 256]
        hist = [r[0] for r in chunk]
        batch = history_tensors({"hist_items": hist, "hist_types": [[3] * len(h) for h in hist],
                                 "hist_age_hours": [[0.0] * len(h) for h in hist]}, 64, "cpu")
        acc.update(masked.score(batch), [r[1] for r in chunk])
    res = acc.result()
    return {m: res[m] for m in COMPLETION_METRICS}


def _generation(domain: Domain, index: dict, method: str, compat, pop: np.ndarray, threshold: float,
                max_size: int) -> dict:
    truth = domain.bundles.groupby("session_id")["items"].agg(list)
    tot = [0.0, 0, 0]
    for sess in domain.sessions.itertuples():
        if sess.session_id not in truth.index:
            continue
        ids = [index[i] for i in sess.items if i in index]
        if method == "popular":  # the session's most popular items as one bundle
            top = sorted(ids, key=lambda i: -pop[i])[:max_size]
            gen = [top] if len(top) >= 2 else []
        else:
            gen = partition(ids, compat, threshold, max_size)
        j, g, t = match(gen, [[index[i] for i in b] for b in truth[sess.session_id]])
        tot[0] += j
        tot[1] += g
        tot[2] += t
    return prf(*tot)


def _val_recall(scorer, val: dict[str, pd.DataFrame], index: dict, allowed_of: dict, n: int) -> float:
    """Mean over domains of first-item completion Recall@10 on the training directory's held-out bundles."""
    return float(np.mean([_completion(scorer, b, index, allowed_of[dn], "first", n)["recall@10"]
                          for dn, b in val.items() if len(b)]))


def _fit_threshold(train_domain: Domain | None, index: dict, method: str, compat, pop: np.ndarray,
                   n: int) -> tuple[float, float]:
    """Best partition threshold on the *training* sessions of a domain: (threshold, train F1)."""
    if method == "popular" or train_domain is None:
        return 0.0, float("nan")
    grid = np.quantile(compat.matrix(np.arange(0, n, max(1, n // 300))).ravel(), np.linspace(0.5, 0.995, 10))
    f1 = {float(th): _generation(train_domain, index, method, compat, pop, th, 8)["f1"] for th in grid}
    best = max(f1, key=f1.get)
    return best, f1[best]


def evaluate_bundles(cfg: PipelineConfig, train_dir: str, eval_dir: str, work_dir: str,
                     export_dir: str | None = None) -> dict:
    """``export_dir``: evaluate that already-trained export (trained on ``train_dir`` by an earlier
    run of this function, so its item order matches) instead of training a new one."""
    from bundlerec.data.catalog import finalize, load_items, padded_tokens
    from bundlerec.eval.evaluate import zeroshot_model
    from bundlerec.model.export import load_export
    from bundlerec.train.fit import fit

    t0 = time.time()
    train, evald = load(train_dir), load(eval_dir)
    cat = pd.concat([d.items for d in list(train.values()) + list(evald.values())]).drop_duplicates("item_id")
    items = finalize(cat)
    prep_dir = write_training_data(train, items, os.path.join(work_dir, "prep"), cfg, seed=cfg.train.seed)
    items = load_items(prep_dir)
    index = dict(zip(items.item_id, items.item_idx))
    n = len(items)
    cfg.data.output_dir = prep_dir
    if export_dir:
        meta = json.load(open(os.path.join(export_dir, "bundlerec.json")))
        trained = {"export_dir": export_dir, "n_train": meta.get("n_train"), "steps_per_epoch": None,
                   "train_seconds": None, "last_metrics": meta.get("last_metrics")}
    else:
        trained = fit(cfg, prep_dir, export_dir=os.path.join(work_dir, "export"))
    ids, mask = padded_tokens(items)
    model, _ = load_export(trained["export_dir"])
    emb_ft = model.index_items(torch.as_tensor(ids), torch.as_tensor(mask))
    zs = zeroshot_model(cfg.model.name_or_path, items, cfg.model.temperature)
    emb_zs = zs._index

    groups = [[index[i] for i in b] for d in train.values() for b in d.bundles["items"]]
    groups += [[index[i] for i in s if i in index] for d in train.values() for s in d.sessions["items"]]
    pairs, counts = cooccurrence_counts(groups, n), item_counts(groups, n)
    pop = item_counts([[index[i] for i in b] for d in train.values() for b in d.bundles["items"]], n)

    # --- bundlerec's blend weight, chosen on the training directory's held-out bundles (never on eval)
    val = _val_bundles(train, cfg.train.seed)
    allowed_of = {dn: items.item_id.str.startswith(dn + ":").to_numpy() for dn in set(train) | set(evald)}

    alphas = {a: _val_recall(_Blend(model, zs, a), val, index, allowed_of, n) for a in BLEND_ALPHAS}
    alpha = max(alphas, key=alphas.get)
    log.info("bundle_eval: completion blend alpha %.2f (val recall@10 by alpha: %s)", alpha, alphas)

    scorers = {"bundlerec": _Blend(model, zs, alpha), "popular": Popular(pop), "itemknn": ItemKNN(pairs), "zeroshot": zs}
    ft, both = emb_ft.numpy(), np.hstack([emb_ft.numpy(), emb_zs.numpy()]) / np.sqrt(2.0)
    # bundlerec's compatibility: co-purchase sPMI + encoder cosine; the weight of the data term and
    # whether the pretrained encoder's cosine joins the fine-tuned one are chosen on training sessions
    candidates = {f"w_data={w},text={t}": Compatibility(pairs, counts, len(groups), E, w_data=w)
                  for w in (0.0, 0.25, 1.0) for t, E in (("tuned", ft), ("tuned+pretrained", both))}
    fixed = {"itemknn": Compatibility(pairs, counts, len(groups), None, w_text=0.0),
             "zeroshot": Compatibility(pairs, counts, len(groups), emb_zs.numpy(), w_data=0.0), "popular": None}

    def fit_threshold(dname: str, m: str, compat) -> tuple[float, float]:
        return _fit_threshold(train.get(dname), index, m, compat, pop, n)

    out: dict = {"completion": {}, "completion_half": {}, "generation": {}, "thresholds": {},
                 "selection": {"completion_alpha": alpha, "val_recall_at_10_by_alpha": alphas, "compatibility": {}}}
    for dname, d in evald.items():
        allowed = allowed_of[dname]
        out["completion"][dname] = {m: _completion(scorers[m], d.bundles, index, allowed, "first", n) for m in METHODS}
        out["completion_half"][dname] = {m: _completion(scorers[m], d.bundles, index, allowed, "half", n) for m in METHODS}
        out["generation"][dname], out["thresholds"][dname] = {}, {}
        fits = {k: fit_threshold(dname, "bundlerec", c) for k, c in candidates.items()}
        choice = max(fits, key=lambda k: fits[k][1] if fits[k][1] == fits[k][1] else -1.0)
        out["selection"]["compatibility"][dname] = {"chosen": choice, "train_f1": {k: v[1] for k, v in fits.items()}}
        compats = {**fixed, "bundlerec": candidates[choice]}
        for m in METHODS:
            thr = fits[choice][0] if m == "bundlerec" else fit_threshold(dname, m, compats[m])[0]
            out["thresholds"][dname][m] = float(thr)
            out["generation"][dname][m] = _generation(d, index, m, compats[m], pop, thr, 8)
    out["seconds"] = round(time.time() - t0, 1)
    out["train"] = {k: trained[k] for k in ("n_train", "steps_per_epoch", "train_seconds")}
    out["train"]["last_metrics"] = trained["last_metrics"]
    return out
