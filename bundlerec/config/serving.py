"""Serving and online-experiment sections: the Ray Serve deployment, the experiment and its promotion rule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from bundlerec.config.base import _check


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
    token_file: Optional[str] = None
    """Secret file with the accepted tokens, one per line (several = rotation); None = runs/<name>/api_token."""
    admin_token_file: str = ""
    """Secret file with the tokens of the explore routes (``/v1/explore/*``: any shopper's history);
    "" = the API tokens open those too (one local user). Set it wherever the endpoint has clients."""
    user_key_file: Optional[str] = None
    """Secret key that pseudonymizes user ids in exports (HMAC-SHA256; created 0600 on the first
    export); Serve replicas and the pyfunc ($BUNDLEREC_USER_KEY_FILE) read it to find histories;
    None = runs/<name>/user_key."""
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
    event_log_dir: Optional[str] = None
    """Where replicas write impressions and shopper feedback as Parquet (a local dir or s3://...;
    "" = not logged; None = runs/<name>/online). Each event is first appended to a local write-ahead file under
    ``<event_log_dir>/_wal`` (``~/.cache/bundlerec/wal`` for object stores) before the answer goes out."""
    event_flush_s: float = 5.0
    """Seconds between write-ahead -> Parquet flushes (also on shutdown and at 2,000 rows)."""
    event_log_retention_days: float = 0.0
    """Event-log Parquet files older than this many days are deleted by the replicas (checked at
    start and hourly; local dirs and object stores alike); 0 = kept forever."""
    rate_limit_rps: float = 0.0
    """Requests per second one API token may make to one replica on average (a token bucket, checked
    right after the token, before any body is read; over it: 429 + Retry-After); 0 = no limit. With
    R replicas a token gets up to R x this."""
    rate_limit_burst: int = 20
    """Requests a token may make at once before ``rate_limit_rps`` applies."""

    def __post_init__(self) -> None:
        _check(self.poll_s >= 0 and self.torch_threads >= 1, "serve.poll_s >= 0, serve.torch_threads >= 1")
        _check(self.max_body_bytes >= 1024, "serve.max_body_bytes must be >= 1024")
        _check(self.max_concurrent_bundles >= 1, "serve.max_concurrent_bundles must be >= 1")
        _check(self.ann_min_items >= 0 and self.ann_nprobe >= 1, "serve.ann_min_items >= 0, serve.ann_nprobe >= 1")
        _check(self.event_flush_s > 0, "serve.event_flush_s must be > 0")
        _check(self.event_log_retention_days >= 0, "serve.event_log_retention_days must be >= 0 (0 = keep)")
        _check(self.rate_limit_rps >= 0 and self.rate_limit_burst >= 1,
               "serve.rate_limit_rps >= 0 (0 = no limit), serve.rate_limit_burst >= 1")

    def app_args(self) -> dict:
        """The Serve application's args (serve/config.yaml mirrors these defaults)."""
        return {"poll_s": self.poll_s, "torch_threads": self.torch_threads, "auth": self.auth,
                "max_body_bytes": self.max_body_bytes, "ann_min_items": self.ann_min_items,
                "ann_nprobe": self.ann_nprobe, "model_cache_dir": self.model_cache_dir,
                "max_concurrent_bundles": self.max_concurrent_bundles, "event_log_dir": self.event_log_dir,
                "event_flush_s": self.event_flush_s, "event_log_retention_days": self.event_log_retention_days,
                "rate_limit_rps": self.rate_limit_rps, "rate_limit_burst": self.rate_limit_burst}


ONLINE_METRICS = ("ctr", "add_to_cart_rate", "conversion", "revenue_per_impression", "revenue_per_impression_capped",
                  "bundle_take_rate", "realized_discount")
"""Per-arm metrics of an online experiment (bundlerec.experiments.analysis)."""


PRICE_POLICY_KEYS = ("max_discount", "min_margin", "price_ending", "explore", "shift")


def check_price_policy(policy: object, where: str = "pricing policy") -> dict:
    """A pricing policy (an experiment arm's, or the one promoted onto the champion): limits that
    tighten every bundle request's (``max_discount`` at most, ``min_margin`` at least, a
    ``price_ending``), ``explore``, the width (share of the list price) of safe price exploration
    around the optimum (bundlerec.pricing.demand.PriceLimits.explore), or ``shift``, a move of every
    price by that share of the list price (PriceLimits.shift). Returns it with float values;
    ValueError names what is wrong."""
    if not isinstance(policy, dict):
        raise ValueError(f"{where}: an object of {PRICE_POLICY_KEYS}, not {type(policy).__name__}")
    unknown = set(policy) - set(PRICE_POLICY_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; known: {PRICE_POLICY_KEYS}")
    out = {}
    for k, v in policy.items():
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise ValueError(f"{where}: {k} must be a number")
        out[k] = float(v)
    if not 0 <= out.get("max_discount", 0) <= 1 or not 0 <= out.get("min_margin", 0) <= 10 \
            or not 0 <= out.get("price_ending", 0) < 1 or not 0 <= out.get("explore", 0) <= 0.5 \
            or not -0.5 <= out.get("shift", 0) <= 0.5:
        raise ValueError(f"{where}: max_discount in [0, 1], min_margin in [0, 10], price_ending in [0, 1), "
                         "explore in [0, 0.5], shift in [-0.5, 0.5]")
    if out.get("explore") and out.get("shift"):
        raise ValueError(f"{where}: explore and shift are two policies; set one")
    return out


@dataclass
class PromotionRule:
    """When an online experiment moves ``champion`` (bundlerec.experiments.lifecycle.decide)."""

    metric: str = "revenue_per_impression_capped"
    """The primary metric the challenger must improve (default: revenue with each user's revenue capped
    at ``revenue_cap_quantile`` of the buyers', robust to a few very large baskets)."""
    confidence: float = 0.95
    """Confidence that the challenger is better: the lower bound of the difference (challenger -
    control) at this level must be > 0. An A/A test promotes with probability <= 1 - confidence, at
    one look (``sequential: false``) or at any number of looks (``sequential: true``)."""
    sequential: bool = True
    """Read the always-valid (mSPRT) interval, so that running the report after every batch of users
    and promoting at the first look that qualifies keeps the false-positive rate at 1 - confidence;
    false: the one-sided bootstrap quantiles, valid for one look at a horizon fixed in advance."""
    horizon_units: int = 500
    """Users per arm at which the always-valid interval is narrowest (its mixing scale): about where
    the experiment is expected to end. Any value keeps the guarantee; the interval is wider far from it."""
    cuped: bool = True
    """Reduce variance with each user's pre-period sums (``experiment.cuped_days`` before the first
    impression) in the always-valid test."""
    revenue_cap_quantile: float = 0.99
    """``revenue_per_impression_capped`` caps a user's revenue at this quantile of the buyers' revenue."""
    guardrails: list = field(default_factory=lambda: ["ctr", "conversion"])
    """Metrics that must not be worse: the challenger is refused when the upper bound (the same kind
    of bound, at ``confidence``) of a guardrail's difference is < 0."""
    min_units: int = 50
    """Users (assignment units) per arm before any decision (the always-valid test's normal
    approximation needs some)."""
    srm_p: float = 0.001
    """Sample-ratio mismatch: a chi-square p-value below this stops the decision (assignment is broken)."""

    def __post_init__(self) -> None:
        _check(self.metric in ONLINE_METRICS, f"experiment.promotion.metric must be one of {ONLINE_METRICS}")
        _check(not set(self.guardrails) - set(ONLINE_METRICS), f"experiment.promotion.guardrails: one of {ONLINE_METRICS}")
        _check(0.5 < self.confidence < 1, "experiment.promotion.confidence must lie in (0.5, 1)")
        _check(self.min_units >= 1 and 0 < self.srm_p < 1, "experiment.promotion: min_units >= 1, 0 < srm_p < 1")
        _check(self.horizon_units >= 1 and 0.5 <= self.revenue_cap_quantile <= 1,
               "experiment.promotion: horizon_units >= 1, revenue_cap_quantile in [0.5, 1]")


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
    cuped_days: float = 28.0
    """The pre-period CUPED reads: the users' logged impressions and feedback in these days before the
    experiment's first impression (0: none)."""
    ray_data_min_mb: float = 256.0
    """The report reads event logs this large or larger with Ray Data (parallel read tasks), smaller
    ones in its own process with Arrow (a Ray Data read's task start-up costs seconds)."""
    pricing: dict = field(default_factory=dict)
    """Arm name -> pricing policy (``max_discount``, ``min_margin``, ``price_ending``: limits that tighten
    each bundle request's; ``explore``: safe price exploration around the optimum, its propensity
    logged), so that two price policies on one model version can be compared; the
    promoted arm's policy then prices every bundle of the champion (registry tag ``bundlerec.pricing``)."""
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
        _check(float(self.ray_data_min_mb) >= 0, "experiment.ray_data_min_mb must be >= 0")
        _check(isinstance(self.pricing, dict) and set(self.pricing) <= set(self.arms),
               "experiment.pricing: arm name -> pricing policy, for arms of experiment.arms")
        for a, pol in self.pricing.items():
            try:
                self.pricing[a] = check_price_policy(pol, f"experiment.pricing.{a}")
            except ValueError as e:
                _check(False, str(e))
