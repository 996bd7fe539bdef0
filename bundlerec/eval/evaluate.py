"""Offline evaluation: full-catalog ranking of held-out baskets for the model and the baselines.

    metrics = evaluate_run(prep_dir, export_dir, cfg)   # {"bundlerec": {...}, "popular": {...}, ...}
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import pandas as pd
import torch

from bundlerec.config import PipelineConfig
from bundlerec.data.catalog import load_items, padded_tokens
from bundlerec.data.examples import load_split
from bundlerec.data.statistics import ItemKNN, Popular, Recent
from bundlerec.inference.fusion import Fusion, FusionParams
from bundlerec.model.sasrec import SASRec, SASRecConfig, fit_sasrec
from bundlerec.metrics import MetricAccumulator, paired_lift
from bundlerec.model.collate import history_tensors
from bundlerec.model.lexical import Lexical
from bundlerec.storage import join

log = logging.getLogger(__name__)


class Scorer(Protocol):
    def score(self, batch: dict) -> torch.Tensor: ...


def evaluate_scorer(scorer: Scorer, examples: pd.DataFrame, n_items: int, ks: list[int],
                    history_len: int, batch_size: int = 256, name: str = "model", keep: dict | None = None) -> dict:
    """Metrics of one scorer on ``examples`` with 95 % bootstrap intervals; ``keep``: filled with the
    per-example values (metric -> array, in example order) for paired comparisons."""
    from bundlerec.progress import Progress

    acc = MetricAccumulator(ks, n_items)
    progress = Progress(f"eval {name}", len(examples), "baskets")
    for i in range(0, len(examples), batch_size):
        chunk = examples.iloc[i:i + batch_size]
        batch = history_tensors({c: chunk[c].tolist() for c in ("hist_items", "hist_types", "hist_age_hours")},
                                history_len, "cpu")
        acc.update(scorer.score(batch).float(), chunk["targets"].tolist())
        progress.update(len(chunk))
    progress.done()
    return acc.result(intervals=True, keep=keep)


def zeroshot_model(model_name: str, items: pd.DataFrame, temperature: float, pooling: str = "auto",
                   train=None):
    """The pretrained encoder as a scorer (the zero-shot baseline). ``train`` (a TrainConfig): a catalog
    of at least ``train.batch_inference_min_items`` items is encoded by Ray Data batch inference."""
    from bundlerec.model.batch_encode import index_catalog
    from bundlerec.hub import resolve_model_path
    from bundlerec.model.pretrained import resolve_pooling
    from bundlerec.model.two_tower import TwoTower, build_encoder

    path = resolve_model_path(model_name)
    model = TwoTower(build_encoder(path), temperature, resolve_pooling(path, pooling)).eval()
    ids, mask = padded_tokens(items)
    index_catalog(model, path, ids, mask, train, progress="encode catalog (zeroshot)")
    return model


def evaluate_run(prep_dir: str, export_dir: str | None, cfg: PipelineConfig, split: str = "test",
                 per_example: dict | None = None) -> dict:
    """Metrics of the exported model (if given) and of every configured baseline on ``split``;
    ``per_example``: filled with method -> metric -> per-example values (see :func:`lifts`)."""
    keep = (lambda m: per_example.setdefault(m, {})) if per_example is not None else (lambda m: None)  # noqa: E731
    import numpy as np

    from bundlerec.model.export import load_export

    items = load_items(prep_dir)
    n = len(items)
    train = load_split(prep_dir, "train")
    examples = load_split(prep_dir, split)
    H = cfg.data.history_len
    kw = dict(n_items=n, ks=cfg.eval.ks, history_len=H, batch_size=cfg.eval.batch_size)
    out = {}
    if export_dir:
        t = time.time()
        model, meta = load_export(export_dir)
        model.set_index(torch.as_tensor(np.load(join(export_dir, "item_index.npy"))))
        # the history length the model was trained with (a Tune trial may differ from the base config)
        own = {**kw, "history_len": int(meta["history_len"])}
        fusion = Fusion.from_export(export_dir, model, n)  # the served recommender (bundlerec.inference.fusion)
        out["bundlerec"] = evaluate_scorer(fusion, examples, **own, name="bundlerec", keep=keep("bundlerec"))
        if not fusion.tuned_only:  # the ablation: the fine-tuned two-tower alone
            out["tuned"] = evaluate_scorer(model, examples, **own, name="tuned", keep=keep("tuned"))
        log.info("eval: bundlerec %.1fs", time.time() - t)
    for name in cfg.eval.baselines:
        t = time.time()
        if name == "popular":
            scorer = Popular.from_examples(train, n)
        elif name == "itemknn":
            scorer = ItemKNN.from_examples(train, n)
        elif name == "recent":
            scorer = Recent(n)
        elif name == "lexical":
            scorer = Fusion(None, FusionParams({"lexical": 1.0}), lexical=Lexical.fit(items.text.tolist()), n_items=n)
        elif name == "sasrec":  # the export's own (trained by the fit step) when it has one
            scorer = (SASRec.load(export_dir) if export_dir else None) or \
                fit_sasrec(train, load_split(prep_dir, "val"), n, H, SASRecConfig(seed=cfg.train.seed))
            log.info("eval: sasrec trained %d epochs (val ndcg@10 %.4f)", scorer.epochs, scorer.best_val_ndcg)
        else:
            scorer = zeroshot_model(cfg.model.name_or_path, items, cfg.model.temperature, cfg.model.pooling, cfg.train)
        out[name] = evaluate_scorer(scorer, examples, **kw, name=name, keep=keep(name))
        log.info("eval: %s %.1fs", name, time.time() - t)
    return out


def lifts(per_example: dict, metrics=("ndcg@10", "recall@10"), seed: int = 0) -> dict:
    """bundlerec's relative lift over every other method, per metric, with paired-bootstrap 95 %
    intervals (the same test examples resampled for both)."""
    if "bundlerec" not in per_example:
        return {}
    ours = per_example["bundlerec"]
    return {m: {k: paired_lift(ours[k], v[k], seed) for k in metrics if k in v and k in ours}
            for m, v in per_example.items() if m != "bundlerec"}


def format_table(metrics: dict, cols=("ndcg@10", "recall@10", "mrr@10", "hitrate@10", "ndcg@20", "recall@20", "coverage@10")) -> str:
    """Plain-text table of methods x metrics."""
    lines = [f"{'method':<10}" + "".join(f"{c:>12}" for c in cols)]
    for name, m in metrics.items():
        lines.append(f"{name:<10}" + "".join(f"{m.get(c, float('nan')):>12.4f}" for c in cols))
    return "\n".join(lines)
