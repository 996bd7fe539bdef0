"""jobs.bench_train: the training loop of jobs.train, measured on synthetic data (a real Ray cluster,
Ray Train + DeepSpeed, gathered negatives on; the record's figures checked against each other and against the model)."""

import json
import os
import subprocess
import sys

import pytest

from tests.support import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_bench_train_records_throughput_mfu_memory_and_the_step_breakdown(ray_cluster, tmp_path):
    """A random-init decoder shape (tiny Qwen2), ZeRO-3 and LoRA on 2 CPU workers, its batches streamed
    (collated in Ray Data's prefetch threads by iter_torch_batches): the JSON record has
    every field the GPU matrix needs, and its figures agree: MFU = model FLOP/s over the measured
    matmul rate of all workers; model FLOPs per token = 6 x the transformer blocks' weights (every
    block trains through its adapters, the adapters' own weights left out)."""
    import ray
    from transformers import AutoConfig, AutoModel

    from bundlerec.model.two_tower import transformer_blocks

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    out = tmp_path / "record.json"
    r = subprocess.run([sys.executable, "-m", "jobs.bench_train", "--config", "jobs/configs/tiny.yaml", "--shape",
                        "tiny-qwen2", "--steps", "3", "--out", str(out), "--workdir", str(tmp_path / "work"),
                        "model.freeze_layers=0", "model.pooling=last", "model.lora_rank=4", "train.zero_stage=3",
                        "train.materialize_train=false",  # streamed: Ray Data's iter_torch_batches collates
                        "model.gather_negatives=true"],  # both workers' candidates in each softmax (an all-gather per step)
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=550)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    rec = json.loads(out.read_text())
    assert {"device", "model", "zero_stage", "micro_batch", "tokens_per_s", "samples_per_s", "mfu", "data_wait_frac",
            "peak_mem_gb", "versions", "date", "forward_frac", "backward_frac", "optimizer_frac"} <= rec.keys()
    assert rec["model"] == "tiny-qwen2" and rec["random_init"] and rec["zero_stage"] == 3 and rec["lora_rank"] == 4
    assert rec["versions"]["deepspeed"] and rec["versions"]["ray"] and "CPU" in rec["device"]
    assert rec["samples_per_s"] > 0 and rec["tokens_per_s"] > rec["samples_per_s"]  # many tokens per example
    assert rec["model_tflops_per_s"] == pytest.approx(rec["train_flops_per_token"] * rec["tokens_per_s"] / 1e12)
    assert rec["mfu"] == pytest.approx(rec["model_tflops_per_s"] / (rec["matmul_tflops_per_worker"] * rec["num_workers"]))
    assert 0 < rec["mfu"] < 1 and rec["matmul_tflops_per_worker"] > 0
    fracs = [rec[k] for k in ("data_wait_frac", "forward_frac", "backward_frac", "optimizer_frac")]
    assert all(f >= 0 for f in fracs) and sum(fracs) <= 1.0 + 1e-6
    assert rec["peak_mem_gb"] > 0.1  # a worker holding torch, transformers and DeepSpeed
    conf = AutoConfig.from_pretrained(tmp_path / "work" / "models" / "tiny-qwen2")
    blocks = transformer_blocks(AutoModel.from_config(conf))
    assert rec["train_flops_per_token"] == 6 * sum(p.numel() for p in blocks.parameters())


def test_bench_prep_records_the_cost_of_a_size_and_states_growth_from_the_times(ray_cluster, tmp_path):
    """jobs.bench_prep on one small size on the suite's cluster: every generated event is read, the
    hashing time is part of the stage's time, memory and disk are measured; growth() states the
    time exponent between two sizes (1 = linear)."""
    from bundlerec.data.bench import growth
    from jobs.bench_prep import main

    out = tmp_path / "prep_cost.json"
    res = main(["--config", str(ROOT / "jobs/configs/tiny.yaml"), "--sizes", "3000", "--workdir", str(tmp_path / "work"),
                "--out", str(out)])
    assert json.loads(out.read_text())["sizes"] == res["sizes"] and res["growth"] == []
    (r,) = res["sizes"]
    generated = json.loads((tmp_path / "work" / "raw-3000" / "synthetic.json").read_text())
    assert r["events"] == generated["events"] > 0  # prep read every generated event
    assert 0 < r["hash_s"] < r["prep_s"] and r["events_per_s_without_hashing"] > r["events_per_s"] > 0
    assert r["raw_disk_mib"] > 0 and r["snapshot_disk_mib"] > 0 and r["peak_mem_above_idle_gib"] >= 0
    g = growth([{"events": 1000, "prep_s": 2.0}, {"events": 4000, "prep_s": 8.0}, {"events": 16000, "prep_s": 64.0}])
    assert [(x["time_exponent"], x["kind"]) for x in g] == [(1.0, "linear"), (1.5, "worse than linear")]


def test_bench_catalog_resizes_an_export_and_measures_encoding_and_serving_at_each_size(tiny_trained, ray_cluster,
                                                                                          tmp_path):
    """jobs.bench_catalog on the tiny export: a resized export is sealed and has exactly the asked
    items (its first ones when fewer, the originals unchanged when more); the driver and Ray Data
    encode the same vectors; each serving size reports memory, exact and ANN latency and a recall."""
    import numpy as np
    import pandas as pd

    from bundlerec.inference.bench import resize_export
    from bundlerec.inference.recommender import Recommender
    from bundlerec.integrity import verify
    from jobs.bench_catalog import main

    _, out, _ = tiny_trained
    src = out["export_dir"]
    n0 = len(pd.read_parquet(f"{src}/items.parquet"))
    big = resize_export(src, str(tmp_path / "big"), 3 * n0 + 7)
    assert verify(big) == (True, "ok")
    rec = Recommender.from_export(big)
    assert len(rec.item_ids) == len(set(rec.item_ids)) == 3 * n0 + 7
    assert np.shares_memory(rec.bundle_engine.index, rec.model._index.numpy())  # one copy of the index per replica
    grown = np.load(f"{big}/item_index.npy")
    np.testing.assert_array_equal(grown[:n0], np.load(f"{src}/item_index.npy"))
    np.testing.assert_allclose(np.linalg.norm(grown[n0:], axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="histories reach"):
        resize_export(src, str(tmp_path / "none"), 1)

    res = main(["--export", src, "--sizes", str(n0), str(4 * n0), "--encode-sizes", "64", "--requests", "20",
                "--actors", "1", "--nprobe", "4", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "c.json")])
    (enc,) = res["encoding"]
    assert enc["items"] == 64 and enc["driver_items_per_s"] > 0 and enc["ray_data_items_per_s"] > 0
    assert enc["max_abs_diff"] < 1e-4  # the two paths compute the same index
    small, large = res["serving"]
    assert (small["items"], large["items"]) == (n0, 4 * n0)
    for r in (small, large):
        assert r["replica_rss_mib_exact"] > r["rss_mib_before_load"] > 0
        assert 0 < r["exact"]["p50_ms"] <= r["exact"]["p99_ms"] and 0 < r["ann"]["p50_ms"]
        assert 0 <= r["ann"]["recall_at_10_vs_exact"] <= 1 and r["ann"]["nprobe"] <= r["ann"]["nlist"]
    assert len(res["serving_growth"]["exact_p50"]) == 1 and json.loads((tmp_path / "c.json").read_text())["serving"]
