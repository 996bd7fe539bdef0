"""The fine-tuning baseline a user would otherwise pick: the same pretrained encoder fine-tuned by
sentence-transformers' own trainer with ``MultipleNegativesRankingLoss`` (its documented recipe:
(anchor, positive) pairs, in-batch negatives, a no-duplicates batch sampler, 10 % warm-up), on pairs
of items of the same training bundle, with bundlerec's training budget (as many examples as bundlerec's
loop trained, in batches of its per-worker size). Scored as zero-shot is: the mean cart embedding .
item embedding (the engine's ``pretrained`` channel with this model's item index)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from bundlerec.bundles.intent import Domain

log = logging.getLogger(__name__)


@dataclass
class STBaseline:
    """What the baseline was trained on and how fast (``samples_per_s``: the trainer's own figure)."""

    pairs: int
    steps: int
    batch_size: int
    learning_rate: float
    train_seconds: float
    samples_per_s: float
    loss: float


def bundle_pairs(fit: dict[str, Domain], items: pd.DataFrame, n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (anchor, positive) text pairs: ordered pairs of distinct items of one training bundle,
    every domain's bundles together, shuffled (repeated in a new order when ``n`` exceeds them)."""
    text = dict(zip(items.item_id, items.text))
    pool = [(text[a], text[b]) for d in fit.values() for bundle in d.bundles["items"]
            for a in bundle for b in bundle if a != b and a in text and b in text]
    if not pool:
        raise ValueError("no training bundle has two items with text: nothing to fine-tune on")
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(pool)) for _ in range(-(-n // len(pool)))])[:n]
    return [pool[i] for i in order]


def fit_index(model_name: str, fit: dict[str, Domain], items: pd.DataFrame, examples: int, batch_size: int,
              max_tokens: int, seed: int, cache_dir: str | None = None) -> tuple[np.ndarray, STBaseline]:
    """Fine-tune ``model_name`` on ``examples`` bundle pairs and encode the catalog (``items`` in
    item_idx order) with it: the (N, d) L2-normalised item index and the run's record. ``cache_dir``:
    keep both for the same inputs (the dev folds rerun the same baseline)."""
    from bundlerec.hub import resolve_model_path

    path = resolve_model_path(model_name)
    pairs = bundle_pairs(fit, items, examples, seed)
    texts = items.text.tolist()
    key = hashlib.sha1(json.dumps([model_name, pairs, texts, batch_size, max_tokens, seed]).encode()).hexdigest()[:16]
    cached = os.path.join(cache_dir, f"st-mnrl-{key}") if cache_dir else None
    if cached and os.path.exists(cached + ".json"):
        return np.load(cached + ".npy"), STBaseline(**json.load(open(cached + ".json")))
    index, info = _train_and_encode(path, pairs, texts, batch_size, max_tokens, seed)
    if cached:
        os.makedirs(cache_dir, exist_ok=True)
        np.save(cached + ".npy", index)
        with open(cached + ".json", "w") as f:
            json.dump(asdict(info), f)
    return index, info


def _train_and_encode(path: str, pairs: list, texts: list, batch_size: int, max_tokens: int,
                      seed: int) -> tuple[np.ndarray, STBaseline]:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    model = SentenceTransformer(path, device="cpu")
    model.max_seq_length = max_tokens  # the item text bundlerec's encoders read
    steps = max(1, len(pairs) // batch_size)
    log.info("eval_bundles: sentence-transformers baseline: %d pairs, %d steps of %d", len(pairs), steps, batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        args = SentenceTransformerTrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch_size, warmup_ratio=0.1,
            batch_sampler=BatchSamplers.NO_DUPLICATES, seed=seed, save_strategy="no", report_to="none",
            logging_steps=max(1, steps // 10), use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
        ds = Dataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]})
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds,
                                             loss=losses.MultipleNegativesRankingLoss(model))
        t0 = time.time()
        out = trainer.train()
        seconds = time.time() - t0
    index = model.encode(texts, batch_size=256, normalize_embeddings=True, convert_to_numpy=True)
    return index.astype(np.float32), STBaseline(
        pairs=len(pairs), steps=steps, batch_size=batch_size, learning_rate=float(args.learning_rate),
        train_seconds=round(seconds, 1), samples_per_s=float(out.metrics.get("train_samples_per_second", 0.0)),
        loss=float(out.training_loss))
