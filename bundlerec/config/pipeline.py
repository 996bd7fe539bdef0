"""The whole run: every section, the stages, and the one place that rebases relative paths on ``output_root``."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Optional

from bundlerec.config.base import _check
from bundlerec.config.data import DataConfig
from bundlerec.config.evaluation import EvalConfig, MlflowConfig, PricingConfig
from bundlerec.config.serving import ExperimentConfig, ServeConfig
from bundlerec.config.training import ModelConfig, TrainConfig, TuneConfig

OUTPUTS = {"results_path": "results.json", "data.output_dir": "prep", "train.storage_path": "ray_results",
           "tune.storage_path": "tune", "serve.token_file": "api_token", "serve.user_key_file": "user_key",
           "serve.event_log_dir": "online"}
"""Every output of a run, as it is derived when the config leaves it unset: ``runs/<name>/<leaf>``
(relative paths are then rebased on ``output_root``). The one place these paths are written."""
INPUTS = ("data.events", "data.eval_dir", "data.catalog", "pricing.data_dir", "serve.admin_token_file")
"""Input paths given relative to the project: rebased on ``output_root`` too."""


@dataclass
class PipelineConfig:
    """Everything one pipeline run needs."""

    name: str = "demo"
    """Run name; every output path left unset is runs/<name>/<leaf> (``OUTPUTS``)."""
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
    """Pipeline stages in order: prep, then train or tune, then optionally price, register and deploy.
    train and tune fit the pricing model as their own step unless price is listed; price alone fits it
    again into the export of ``results_path`` (new pricing data without retraining; register after)."""
    results_path: Optional[str] = None
    """The stage hand-off file (run id, model path, metrics); None = runs/<name>/results.json."""
    output_root: Optional[str] = None
    """Base directory for the relative paths (outputs, and the inputs data.events, data.catalog,
    pricing.data_dir): a `ray job submit` job runs in a copy of the working dir, so the Makefile
    points this at the project; None = current directory."""

    def __post_init__(self) -> None:
        unknown = set(self.stages) - {"prep", "train", "tune", "price", "register", "deploy"}
        _check(not unknown, f"stages: unknown {sorted(unknown)}")
        _check(not {"train", "tune"} <= set(self.stages), "stages: choose train or tune, not both")
        if self.data.source == "bundlerec_intent":
            _check("tune" not in self.stages, "stages: data.source=bundlerec_intent trains (train), it has no sweep yet")
            _check(self.mlflow.primary_metric == "completion_recall@10",
                   "data.source=bundlerec_intent: set mlflow.primary_metric=completion_recall@10 (a bundle metric)")
        else:
            _check(self.mlflow.primary_metric != "completion_recall@10",
                   "mlflow.primary_metric=completion_recall@10 is for bundle data (data.source=bundlerec_intent)")
        _check(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name)),
               f"name: {self.name!r} names the run's folder runs/<name>/: letters, digits, '.', '_', '-'")
        for key, leaf in OUTPUTS.items():
            if self._get(key) is None:
                self._set(key, f"runs/{self.name}/{leaf}")
        if self.output_root:
            # absolute once, so applying it again (every config round-trip: Tune trials, workers) is a no-op
            root = self.output_root if "://" in self.output_root else os.path.abspath(self.output_root)
            self.output_root = root
            for key in (*OUTPUTS, *INPUTS):
                p = self._get(key)
                if p and not ("://" in p or p.startswith("/")):
                    self._set(key, f"{root.rstrip('/')}/{p}")

    def _get(self, dotted: str):
        obj = self
        for part in dotted.split("."):
            obj = getattr(obj, part)
        return obj

    def _set(self, dotted: str, value) -> None:
        *parents, leaf = dotted.split(".")
        obj = self
        for part in parents:
            obj = getattr(obj, part)
        setattr(obj, leaf, value)
