"""Config: every shipped YAML loads, every key is commented, overrides and validation work."""

import re
from pathlib import Path

import pytest
import yaml

from bundlerec.config import ConfigError, PipelineConfig, TrainConfig, from_dict, load_config, to_dict
from bundlerec.train.ds_config import deepspeed_config, resolve_precision

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
    ds = deepspeed_config(micro_batch=16, grad_accum=4, world_size=8, zero_stage=3, use_gpu=True,
                          precision="bf16", offload="all")
    assert ds["train_batch_size"] == 16 * 4 * 8
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    fp16 = deepspeed_config(16, 1, 8, 2, True, precision="fp16", offload="optimizer")
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0  # 0 = dynamic loss scaling
    assert "offload_param" not in fp16["zero_optimization"] and not fp16["bf16"]["enabled"]
    cpu = deepspeed_config(8, 1, 2, 2, False, {"zero_optimization": {"reduce_bucket_size": 1e6}})
    assert cpu["bf16"]["enabled"] is False and cpu["zero_optimization"]["stage"] == 2
    assert cpu["zero_optimization"]["reduce_bucket_size"] == 1e6
    with pytest.raises(ValueError, match="derived"):
        deepspeed_config(8, 1, 2, 2, False, {"train_batch_size": 64})
    # CPU: bf16 is autocast in the loop, the engine stays fp32; fp16 is refused with the fix
    assert resolve_precision("bf16", False) == "bf16" and resolve_precision("auto", True) == "bf16"
    assert resolve_precision("auto", False) in ("bf16", "fp32")
    assert not deepspeed_config(8, 1, 2, 2, False, precision="bf16")["bf16"]["enabled"]
    with pytest.raises(ValueError, match="needs GPUs"):
        resolve_precision("fp16", False)
    with pytest.raises(ValueError, match="fp16 needs GPUs"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="offload=all"):
        TrainConfig(offload="all", zero_stage=2)


def test_relative_output_root_round_trips_unchanged(tmp_path, monkeypatch):
    """A Tune trial and every worker rebuild the config from its dict: paths must not grow."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["output_root=rel"])
    again = from_dict(PipelineConfig, to_dict(cfg))
    assert again.data.output_dir == cfg.data.output_dir == str(tmp_path / "rel/runs/demo/prep")
    assert again.results_path == cfg.results_path and "rel/rel" not in again.train.storage_path


def test_every_output_path_derives_from_the_run_name_in_one_place(tmp_path):
    """Outputs left unset go to runs/<name>/ (config.pipeline.OUTPUTS), whichever config names the run:
    a dataset config no longer writes its checkpoints or token into runs/demo/."""
    from operator import attrgetter

    from bundlerec.config.pipeline import OUTPUTS

    cfg = load_config(str(ROOT / "jobs/configs/amazon2018.yaml"), [f"output_root={tmp_path}"])
    assert {k: attrgetter(k)(cfg) for k in OUTPUTS} == {k: f"{tmp_path}/runs/amazon2018/{leaf}" for k, leaf in OUTPUTS.items()}
    given = load_config(None, ["name=shop", "train.storage_path=s3://bucket/ck", "serve.event_log_dir="])
    assert given.train.storage_path == "s3://bucket/ck" and given.serve.event_log_dir == ""  # "" = off, kept
    assert given.tune.storage_path == "runs/shop/tune"
    for path in CONFIGS:  # no shipped YAML restates a derived path
        name = yaml.safe_load(path.read_text()).get("name", "demo")
        assert f"runs/{name}/" not in path.read_text(), path.name
    with pytest.raises(ConfigError, match="names the run's folder"):
        load_config(None, ["name=../elsewhere"])


@pytest.mark.parametrize("bad", ["data.test_baskets=0", "data.history_len=32 data.max_history_len=16"])
def test_selection_and_history_guards(bad):
    with pytest.raises(ConfigError):
        load_config(None, bad.split())


def test_one_definition_of_serve_defaults():
    """serve/config.yaml states ServeConfig's defaults; the KubeRay RayService may choose production
    values but only for args the app knows; the Serve app builder refuses args it does not know."""
    from bundlerec.config import ServeConfig
    from bundlerec.serving.app import build_app

    from bundlerec.config.pipeline import OUTPUTS

    defaults = ServeConfig().app_args()
    local = yaml.safe_load((ROOT / "serve/config.yaml").read_text())["applications"][0]["args"]
    derived = {k.split(".", 1)[1] for k in OUTPUTS if k.startswith("serve.")}  # runs/<name>/... in a pipeline
    assert {k: local[k] for k in defaults if k not in derived} == {k: v for k, v in defaults.items() if k not in derived}
    assert all(defaults[k] is None and isinstance(local[k], str) for k in derived & set(defaults))  # stated there
    kuberay = yaml.safe_load(yaml.safe_load((ROOT / "cluster/kuberay/rayservice.yaml").read_text())["spec"]["serveConfigV2"])
    assert set(kuberay["applications"][0]["args"]) <= {"model_uri", "tracking_uri", "auth_token_file", "admin_token_file",
                                                     "tracking_credentials_file", "user_key_file", *defaults}
    with pytest.raises(ValueError, match="unknown Serve app args"):
        build_app({"model_uri": "x", "ann_min_item": 5})


def test_one_definition_of_environment_defaults():
    """runtime.ENV_DEFAULTS is the source; Makefile, cluster/local.sh and jobs/runtime_env.yaml agree."""
    import re

    from bundlerec.runtime import ENV_DEFAULTS, LOCAL_NUM_CPUS

    make = dict(re.findall(r"^export (\w+) :?= (\S+)", (ROOT / "Makefile").read_text(), re.M))
    local = (ROOT / "cluster/local.sh").read_text()
    runtime_env = yaml.safe_load((ROOT / "jobs/runtime_env.yaml").read_text())["env_vars"]
    for k, v in ENV_DEFAULTS.items():
        if k in make:
            assert make[k] == v, (k, make[k], v)
        if k in runtime_env:
            assert runtime_env[k] == v, k
        found = re.search(rf"\b{k}=(?:\"\$\{{{k}:-)?([\w.:]+)", local)
        if found:
            assert found.group(1) == v, (k, found.group(1))
    assert {"RAY_AUTH_MODE", "HF_HUB_OFFLINE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"} <= set(make)
    assert f'NUM_CPUS="${{NUM_CPUS:-{LOCAL_NUM_CPUS}}}"' in local


def test_one_definition_of_bundle_defaults():
    from bundlerec.bundles.generate import BundleConstraints
    from bundlerec.registry.pyfunc import PARAMS
    from bundlerec.serving.schemas import BundleRequest

    c, req = BundleConstraints(), BundleRequest(user_id="u")
    assert (req.n, req.max_size, req.allow_repeats) == (c.n, c.max_size, c.allow_repeats)
    assert (PARAMS["n"], PARAMS["max_size"]) == (c.n, c.max_size)


def test_a_resumed_run_may_change_where_it_runs_but_nothing_else():
    """train.resume compares config hashes: the worker count and CPUs per worker may change (the
    checkpoint is restored as DeepSpeed's universal checkpoint), the resume switch too; the rest may not."""
    from bundlerec.pipeline import _resume_hash

    base = load_config(str(ROOT / "jobs/configs/demo.yaml"), [])
    same = load_config(str(ROOT / "jobs/configs/demo.yaml"),
                       ["train.num_workers=1", "train.cpus_per_worker=2", "train.resume=true"])
    assert _resume_hash(base) == _resume_hash(same)
    for other in ("train.lr=1e-3", "train.zero_stage=3", "model.lora_rank=8"):
        assert _resume_hash(load_config(str(ROOT / "jobs/configs/demo.yaml"), [other])) != _resume_hash(base), other


@pytest.mark.parametrize("overrides, message", [
    (["data.source=bundlerec_intent", "data.events=null"], "needs data.events"),
    (["data.source=bundlerec_intent", "data.events=/d"], "completion_recall@10"),  # ndcg@10 is not a bundle metric
    (["data.source=bundlerec_intent", "data.events=/d", "mlflow.primary_metric=completion_recall@10",
      "stages=[prep,tune]"], "no sweep"),
    (["mlflow.primary_metric=completion_recall@10"], "is for bundle data"),
    (["data.source=parquet"], "clickstream or bundlerec_intent"),
])
def test_a_bundle_source_is_checked_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(str(ROOT / "jobs/configs/demo.yaml"), overrides)
    cfg = load_config(str(ROOT / "jobs/configs/bundlerec_intent.yaml"), ["output_root=/r", "data.eval_dir=held"])
    assert cfg.data.source == "bundlerec_intent" and cfg.data.eval_dir == "/r/held"
