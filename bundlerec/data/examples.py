"""Examples: the unit prep writes and every later stage reads (training, evaluation, export).

One row per (user, target basket): ``targets`` (item positions), the most recent ``hist_*`` events
before it, and the split it belongs to (train | val | test | latest). Read them as pandas
(:func:`load_split`, small splits, evaluation) or as a Ray Dataset (:func:`read_examples`, training).
"""

from __future__ import annotations

from typing import Optional

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bundlerec.storage import join

EXAMPLE_ARROW = pa.schema([
    ("user_id", pa.string()), ("split", pa.string()), ("target_time", pa.timestamp("us", tz="UTC")),
    ("targets", pa.list_(pa.int64())), ("hist_items", pa.list_(pa.int64())),
    ("hist_types", pa.list_(pa.int64())), ("hist_age_hours", pa.list_(pa.float64())),
    ("n_events", pa.int64()), ("n_sessions", pa.int64()),
])


def load_split(prep_dir: str, split: str) -> pd.DataFrame:
    from bundlerec.data.snapshot import data_root

    return pq.read_table(join(data_root(prep_dir), "examples", split)).to_pandas()


def read_examples(prep_dir: str, split: str, deterministic: bool):
    """One split of prep's examples as a Ray Dataset. Deterministic: one read task per file, so the
    blocks (and with them each worker's shard) do not depend on how many CPUs happened to be free
    when the read was planned (Ray sizes reads by the CPUs it sees), and keep the files' order even
    when materialized (else the read that finishes first comes first, and which rank trains on which
    block changes from run to run: the two outcomes training used to end on)."""
    import pyarrow.parquet as pq
    import ray.data

    from bundlerec.data.snapshot import data_root

    path = join(data_root(prep_dir), "examples", split)
    n_files = len(pq.ParquetDataset(path).files) if deterministic else None
    ds = ray.data.read_parquet(path, override_num_blocks=n_files or None)
    if deterministic:  # blocks in file order, also through materialize(); without it a materialized
        ds.context.execution_options.preserve_order = True  # split lists blocks as reads finish
    return ds


class PrepMismatch(ValueError):
    """The prepared data cannot serve this config (fix the config or re-run prep)."""


def check_prepared(manifest: dict, history_len: int, tokenizer: Optional[dict] = None) -> None:
    """Fail before any compute when prep's output cannot give what training/evaluation will read:
    an empty validation split (model selection would fall back on test), histories shorter than
    ``history_len`` (the knob would silently do nothing), or items tokenized by another tokenizer
    than the model's (``tokenizer``: its :func:`bundlerec.data.catalog.tokenizer_fingerprint`)."""
    had = manifest.get("tokenizer_fingerprint")
    if tokenizer is not None and had is not None and had["sha256"] != tokenizer["sha256"]:
        raise PrepMismatch(f"prep tokenized the catalog with {manifest.get('tokenizer')} ({had['class']}, "
                           f"{had['vocab_size']} tokens, fingerprint {had['sha256']}) but the model's tokenizer "
                           f"is {tokenizer['class']} ({tokenizer['vocab_size']} tokens, fingerprint "
                           f"{tokenizer['sha256']}): its token ids would index other embeddings. Re-run prep "
                           f"with this model.name_or_path")
    n_val = int(manifest.get("examples", {}).get("val", 0))
    if n_val == 0:
        raise PrepMismatch("the prepared data has no validation examples: checkpoints, early stopping and the "
                           "champion are chosen on validation, never on test. Re-run prep with data.val_baskets >= 1 "
                           "on data where users have enough baskets.")
    stored = manifest.get("max_history_len", manifest.get("config", {}).get("history_len"))
    if stored is not None and history_len > int(stored):
        raise PrepMismatch(f"data.history_len={history_len} but prep kept only {stored} events per example: "
                           f"re-run prep with data.max_history_len >= {history_len}")
