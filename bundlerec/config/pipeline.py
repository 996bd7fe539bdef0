"""The whole run: every section, the stages, and the one place that rebases relative paths on ``output_root``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from bundlerec.config.base import _check
from bundlerec.config.data import DataConfig
from bundlerec.config.evaluation import EvalConfig, MlflowConfig, PricingConfig
from bundlerec.config.serving import ExperimentConfig, ServeConfig
from bundlerec.config.training import ModelConfig, TrainConfig, TuneConfig


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
