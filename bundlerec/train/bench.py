"""Training throughput, measured: the loop of ``jobs.train`` (Ray Train + DeepSpeed, the same
``fit``) on synthetic data, reported as one JSON record per configuration.

The synthetic catalog's item texts are longer than ``data.item_max_tokens``, so prep cuts nearly all
of them to that length (the tiny config's: 119 of 120 items at 24 tokens, one at 23): the token
inputs keep one shape from step to step. The record holds samples/s, tokens/s
(padded tokens encoded per second, all workers), MFU (model FLOPs per second over the dense matmul
rate measured on one worker's device by :func:`bundlerec.train.flops.matmul_tflops`), the step-time
breakdown (data wait, forward, backward, optimizer) and peak memory, of the second of two epochs (the
first is warm-up: kernels chosen, and with ``train.materialize_train`` the shard read into memory).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tempfile
from dataclasses import replace
from typing import Optional

from bundlerec.config import PipelineConfig
from bundlerec.runtime import cpu_name, versions

log = logging.getLogger(__name__)


def _device(use_gpu: bool) -> str:
    import torch

    if use_gpu and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {cpu_name()} ({os.cpu_count()} logical CPUs)"


def measure_device(use_gpu: bool, cpus: float, precision: str) -> dict:
    """In a Ray task placed like one training worker: the precision ``train.precision`` resolves to
    there, the dense matmul rate in it, and the device's name."""
    import ray

    from bundlerec.train.ds_config import resolve_precision
    from bundlerec.train.flops import matmul_tflops

    @ray.remote(num_cpus=cpus, num_gpus=1 if use_gpu else 0)
    def probe():
        import torch

        torch.set_num_threads(max(1, int(cpus)))
        dtype = resolve_precision(precision, use_gpu)
        return {"precision": dtype, "matmul_tflops": matmul_tflops(use_gpu, dtype), "device": _device(use_gpu)}

    return ray.get(probe.remote())


def bench_config(cfg: PipelineConfig, workdir: str, steps: int) -> PipelineConfig:
    """``cfg`` pointed at synthetic data and scratch storage in ``workdir``: 2 epochs of ``steps``
    steps, no early stop."""
    data = replace(cfg.data, events=None, catalog=None, output_dir=os.path.join(workdir, "prep"))
    train = replace(cfg.train, epochs=2, max_steps_per_epoch=steps, early_stop_patience=10**6, resume=False,
                    storage_path=os.path.join(workdir, "ray"))
    return replace(cfg, data=data, train=train, results_path=os.path.join(workdir, "results.json"))


def run_bench(cfg: PipelineConfig, steps: int, out_path: Optional[str] = None,
              workdir: Optional[str] = None, shape: Optional[str] = None) -> dict:
    """Prepare synthetic data, measure the device, train 2 x ``steps`` steps; the record (also written
    to ``out_path`` as JSON when given). ``shape``: the :data:`SHAPES` name the model was built from."""
    from bundlerec.data.prep import run_prep
    from bundlerec.train.fit import fit

    workdir = workdir or tempfile.mkdtemp(prefix="bundlerec-bench-")
    bcfg = bench_config(cfg, workdir, steps)
    tc = bcfg.train
    print(f"[bundlerec] bench: preparing synthetic data in {workdir}", flush=True)
    run_prep(bcfg)
    dev = measure_device(tc.use_gpu, tc.cpus_per_worker, tc.precision)
    print(f"[bundlerec] bench: {dev['device']}: {dev['matmul_tflops']:.2f} TFLOP/s ({dev['precision']} matmul); training "
          f"2 x {steps} steps", flush=True)
    out = fit(bcfg, bcfg.data.output_dir)
    m = out["last_metrics"]
    peak = dev["matmul_tflops"] * tc.num_workers
    record = {
        "device": dev["device"], "model": shape or cfg.model.name_or_path, "random_init": cfg.model.random_init,
        "zero_stage": tc.zero_stage,
        "num_workers": tc.num_workers, "micro_batch": tc.micro_batch, "grad_accum": tc.grad_accum,
        "precision": dev["precision"], "offload": tc.offload, "lora_rank": cfg.model.lora_rank,
        "freeze_layers": cfg.model.freeze_layers, "cache_frozen": tc.cache_frozen,
        "gradient_checkpointing": tc.gradient_checkpointing,
        "attention": tc.attention if tc.attention != "auto" else ("sdpa" if tc.use_gpu else "eager"),
        "item_max_tokens": cfg.data.item_max_tokens, "steps": steps,
        "samples_per_s": m["samples_per_s"], "samples_per_s_per_worker": m["samples_per_s_per_worker"],
        "tokens_per_s": m["tokens_per_s"], "model_tflops_per_s": m["model_tflops_per_s"],
        "train_flops_per_token": m["train_flops_per_token"],
        "matmul_tflops_per_worker": dev["matmul_tflops"], "matmul_dtype": dev["precision"],
        "mfu": m["model_tflops_per_s"] / peak if peak > 0 else None,
        "data_wait_frac": m["data_wait_frac"], "forward_frac": m["forward_frac"],
        "backward_frac": m["backward_frac"], "optimizer_frac": m["optimizer_frac"],
        "peak_mem_gb": m["peak_mem_gb"], "epoch_seconds": m["epoch_seconds"],
        "versions": versions(), "date": dt.date.today().isoformat(),
    }
    if out_path:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(record, f, indent=2)
    return record


# Random-init shapes for the benchmark matrix: configs only, no weights travel (a GPU node without a
# hub has none). Every shape reads MiniLM's BERT vocabulary (30,522 tokens), so decoder shapes have a
# smaller embedding table than their namesakes; their transformer blocks are the real size.
SHAPES = {
    "minilm-l6": dict(model_type="bert", hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                      intermediate_size=1536),
    "bert-large": dict(model_type="bert", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                       intermediate_size=4096),
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, intermediate_size=4864),
    "qwen2-1.5b": dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, intermediate_size=8960),
    "tiny-bert": dict(model_type="bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=128),
    "tiny-qwen2": dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, intermediate_size=128),
}


def shape_dir(shape: str, root: str, tokenizer: str = "all-MiniLM-L6-v2") -> str:
    """A model folder (config + ``tokenizer``'s files, no weights) of one of :data:`SHAPES`, for
    ``model.random_init=true``."""
    from transformers import AutoConfig

    from bundlerec.hub import load_tokenizer, resolve_model_path

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; one of {sorted(SHAPES)}")
    out = os.path.join(root, shape)
    kw = dict(SHAPES[shape])
    conf = AutoConfig.for_model(kw.pop("model_type"), vocab_size=1, **kw)
    conf.save_pretrained(out)
    load_tokenizer(resolve_model_path(tokenizer)).save_pretrained(out)
    # the architecture's tokenizer class reads that vocabulary (a decoder's may add its end-of-text
    # token): the embedding table is sized to the tokenizer as this folder loads it
    conf.vocab_size = len(load_tokenizer(out))
    conf.save_pretrained(out)
    return out
