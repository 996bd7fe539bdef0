"""Typed configuration: the single source of truth for every stage.

YAML files under ``jobs/configs/`` mirror these dataclasses key for key; dotted overrides on the
command line (``train.lr=3e-5``) are applied on top. Every dataclass validates itself in
``__post_init__`` so a bad value fails before any compute is spent.

Example::

    cfg = load_config("jobs/configs/demo.yaml", ["train.lr=3e-5", "train.num_workers=4"])

One module per concern: ``base`` (the error), ``data``, ``training`` (model, train, tune),
``evaluation`` (eval, mlflow, pricing), ``serving`` (serve, experiment), ``pipeline`` (the whole run and
its paths), ``loader`` (YAML + overrides). Import from here: ``from bundlerec.config import load_config``.
"""

from bundlerec.config.base import ConfigError
from bundlerec.config.data import DataConfig, SyntheticConfig
from bundlerec.config.training import ModelConfig, TrainConfig, TuneConfig
from bundlerec.config.evaluation import EvalConfig, MlflowConfig, PricingConfig
from bundlerec.config.serving import ONLINE_METRICS, ExperimentConfig, PromotionRule, ServeConfig, check_price_policy
from bundlerec.config.pipeline import PipelineConfig
from bundlerec.config.loader import apply_overrides, config_hash, flatten, from_dict, load_config, to_dict

__all__ = ["ConfigError", "DataConfig", "EvalConfig", "ExperimentConfig", "MlflowConfig", "ModelConfig", "ONLINE_METRICS", "PipelineConfig", "PricingConfig", "PromotionRule", "ServeConfig", "SyntheticConfig", "TrainConfig", "TuneConfig", "apply_overrides", "check_price_policy", "config_hash", "flatten", "from_dict", "load_config", "to_dict"]
