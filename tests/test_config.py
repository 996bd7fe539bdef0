"""Config: every shipped YAML loads, every key is commented, overrides and validation work."""

import re
from pathlib import Path

import pytest
import yaml

from bundlerec.config import ConfigError, PipelineConfig, load_config, to_dict
from bundlerec.train.ds_config import deepspeed_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "jobs/configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(str(path))
    assert isinstance(cfg, PipelineConfig)


@pytest.mark.parametrize("path", CONFIGS + [ROOT / "jobs/runtime_env.yaml"], ids=lambda p: p.name)
def test_every_yaml_key_has_a_comment(path):
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if re.match(r"^\s*[A-Za-z_][\w]*:", line):
            assert "#" in line, f"{path.name}:{i} key without a comment: {line.strip()}"


def test_yaml_keys_mirror_the_dataclasses():
    # a key that the dataclasses do not know fails loudly
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(None, ["train.learning_rate=1e-3"])


def test_dotted_overrides_and_types():
    cfg = load_config(str(ROOT / "jobs/configs/demo.yaml"), ["train.lr=3e-5", "train.zero_stage=3", "model.name_or_path=/m"])
    assert cfg.train.lr == 3e-5 and cfg.train.zero_stage == 3 and cfg.model.name_or_path == "/m"
    assert cfg.train.micro_batch == yaml.safe_load((ROOT / "jobs/configs/demo.yaml").read_text())["train"]["micro_batch"]


@pytest.mark.parametrize("bad", ["train.zero_stage=4", "train.micro_batch=1", "data.format=xml",
                                 "train.lr=abc", "data.event_type_map={foo: bar}", "eval.baselines=[nope]"])
def test_validation_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        load_config(None, [bad])


def test_output_root_makes_paths_absolute(tmp_path):
    cfg = load_config(None, [f"output_root={tmp_path}"])
    assert cfg.data.output_dir.startswith(str(tmp_path)) and cfg.results_path.startswith(str(tmp_path))
    assert to_dict(cfg)["train"]["storage_path"].startswith(str(tmp_path))


def test_deepspeed_config_is_derived_from_train_config():
    ds = deepspeed_config(micro_batch=16, grad_accum=4, world_size=8, zero_stage=3, use_gpu=True)
    assert ds["train_batch_size"] == 16 * 4 * 8
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    cpu = deepspeed_config(8, 1, 2, 2, False, {"zero_optimization": {"reduce_bucket_size": 1e6}})
    assert cpu["bf16"]["enabled"] is False and cpu["zero_optimization"]["stage"] == 2
    assert cpu["zero_optimization"]["reduce_bucket_size"] == 1e6
    with pytest.raises(ValueError, match="derived"):
        deepspeed_config(8, 1, 2, 2, False, {"train_batch_size": 64})
