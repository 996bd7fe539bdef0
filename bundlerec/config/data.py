"""Data sections: where the events come from, how they are read, validated, sessionized and split."""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Optional

from bundlerec.config.base import ConfigError, _check


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
    output_dir: Optional[str] = None
    """Where prep writes examples, items, quarantine and manifest.json; None = runs/<name>/prep."""
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
