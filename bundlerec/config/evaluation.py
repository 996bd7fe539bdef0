"""Evaluation, tracking and pricing sections: offline metrics and baselines, the MLflow run, the pricing fit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from bundlerec.config.base import _check


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
class PricingConfig:
    """The bundle-pricing model the export carries (see docs/pricing.md)."""

    data_dir: Optional[str] = None
    """Steam-bundles directory (bundles.csv.gz + bundle_items.csv.gz) to fit on at export time;
    None: no fitted model, and served bundles say price_source "default" (with one, "transferred")."""
    s: float = 0.3
    """Logistic scale of willingness to pay (an assumption: it sets purchase probabilities)."""

    def __post_init__(self) -> None:
        _check(0.0 < self.s < 1.0, "pricing.s must be in (0, 1)")
