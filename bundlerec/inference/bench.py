"""What the catalog costs as it grows (``python -m jobs.bench_catalog``; docs/benchmarks.md).

Two curves over the item count N:

* **Encoding**: items/s of the item tower over synthetic item texts, in this process (the driver
  path of :func:`bundlerec.model.batch_encode.index_catalog`) and by Ray Data batch inference
  (:func:`bundlerec.model.batch_encode.encode_catalog`, actors on the current Ray cluster).
* **Serving**: for each N, a copy of an export resized to N items (:func:`resize_export`), loaded by
  ``Recommender.from_export`` in a fresh process as a replica loads it: the process's resident memory,
  then p50/p99 of ``recommend`` with exact scoring and with the IVF index (one thread, as one replica
  with ``num_cpus: 1``), the index's build time and its recall@k against exact on the export's users.

Items past the source export's own are copies of its item vectors with Gaussian noise, re-normalised
(``noise`` = the noise vector's expected norm against unit vectors): encoding 1 M item texts on a
2-core box takes over an hour and is measured by the encoding curve instead; what serving costs
depends on N and d, and the ANN's recall on how the vectors cluster, which the copies keep.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import shutil
import time
from datetime import datetime, timezone

import numpy as np


def resize_export(src: str, dst: str, n_items: int, seed: int = 0, noise: float = 0.3) -> str:
    """A sealed copy of export ``src`` with exactly ``n_items`` items: its first ``n_items`` when
    fewer (never fewer than the items its users' histories reach), else its items followed by noisy
    copies of them (new ids ``R<k>``, zero popularity, no co-purchases)."""
    import pandas as pd
    import scipy.sparse as sp

    from bundlerec.integrity import seal

    items = pd.read_parquet(f"{src}/items.parquet")
    index = np.load(f"{src}/item_index.npy")
    pop = np.load(f"{src}/popularity.npy")
    latest = pd.read_parquet(f"{src}/latest.parquet")
    reached = 1 + max((max(h) for h in latest.hist_items if len(h)), default=-1)
    if n_items < reached:
        raise ValueError(f"{src}: its users' histories reach item {reached - 1}; keep at least {reached} items")
    shutil.copytree(src, dst, dirs_exist_ok=True)
    n0 = len(items)
    if n_items <= n0:
        items, index, pop = items.iloc[:n_items].reset_index(drop=True), index[:n_items], pop[:n_items]
    else:
        rng = np.random.default_rng(seed)
        extra = n_items - n0
        srcs = np.arange(extra) % n0
        jitter = rng.standard_normal((extra, index.shape[1])).astype(np.float32) * (noise / np.sqrt(index.shape[1]))
        grown = index[srcs] + jitter
        grown /= np.linalg.norm(grown, axis=1, keepdims=True)
        copies = items.iloc[srcs].reset_index(drop=True)
        copies["item_id"] = [f"R{i:08d}" for i in range(extra)]
        if "item_idx" in copies:
            copies["item_idx"] = np.arange(n0, n_items)
        items = pd.concat([items, copies], ignore_index=True)
        index = np.concatenate([index, grown]).astype(np.float32)
        pop = np.concatenate([pop, np.zeros(extra, dtype=pop.dtype)])
    items.to_parquet(f"{dst}/items.parquet")
    np.save(f"{dst}/item_index.npy", np.ascontiguousarray(index, dtype=np.float32))
    np.save(f"{dst}/popularity.npy", pop)
    if os.path.exists(f"{src}/copurchase.npz"):
        pairs = sp.load_npz(f"{src}/copurchase.npz").tocoo()
        keep = (pairs.row < n_items) & (pairs.col < n_items)
        sp.save_npz(f"{dst}/copurchase.npz", sp.csr_matrix((pairs.data[keep], (pairs.row[keep], pairs.col[keep])),
                                                           shape=(n_items, n_items)))
        counts = np.load(f"{src}/copurchase_items.npy")
        np.save(f"{dst}/copurchase_items.npy", np.resize(np.concatenate([counts, np.zeros(max(0, n_items - len(counts)))]),
                                                         n_items))
    for f in ("item_index_pretrained.npy", "lexical.json", "lexical_items.npz", "recommend_fusion.json", "itemknn.npz",
              "sasrec.json", "sasrec.safetensors"):  # per-item channels not resized here: the two-tower alone
        if os.path.exists(f"{dst}/{f}"):
            os.remove(f"{dst}/{f}")
    from bundlerec.bundles.engine import EngineParams

    params = EngineParams.load(dst)
    if {"pretrained", "lexical"} & {*params.completion, *params.compat}:
        EngineParams().save(dst)
    seal(dst)
    return dst


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _pcts(lat_ms: list[float]) -> dict:
    a = np.asarray(lat_ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


def serving_at_size(export_dir: str, requests: int, k: int, nprobe: int) -> dict:
    """One catalog size, measured in the calling process (run it in a fresh one: memory is the
    process's resident set)."""
    import torch

    from bundlerec.inference.recommender import Recommender

    torch.set_num_threads(1)  # one replica has num_cpus: 1
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    rec = Recommender.from_export(export_dir)
    load_s = time.perf_counter() - t0
    rss_exact = _rss_bytes()
    users = list(rec.latest)
    order = [users[(j * 7919) % len(users)] for j in range(requests)]

    def timed() -> list[float]:
        for u in order[:5]:
            rec.recommend(user_id=u, k=k)  # warm-up
        lat = []
        for u in order:
            t = time.perf_counter()
            rec.recommend(user_id=u, k=k)
            lat.append((time.perf_counter() - t) * 1000)
        return lat

    rec.ann = None
    exact = timed()
    exact_top = [[it["item_id"] for it in rec.recommend(user_id=u, k=k)["items"]] for u in users[:200]]
    rec.configure_ann(1, nprobe)
    rss_ann = _rss_bytes()
    approx = timed()
    ann_top = [[it["item_id"] for it in rec.recommend(user_id=u, k=k)["items"]] for u in users[:200]]
    recall = float(np.mean([len(set(a) & set(e)) / max(1, len(e)) for a, e in zip(ann_top, exact_top)]))
    return {"items": len(rec.item_ids), "dim": int(rec.model._index.shape[1]), "requests": requests, "k": k,
            "load_s": round(load_s, 2), "rss_mib_before_load": rss0 / 2**20,
            "replica_rss_mib_exact": rss_exact / 2**20, "replica_rss_mib_ann": rss_ann / 2**20, "exact": _pcts(exact),
            "ann": {**_pcts(approx), "nlist": rec.ann.nlist, "nprobe": rec.ann.nprobe,
                    "build_s": round(rec.ann.build_seconds, 2), f"recall_at_{k}_vs_exact": recall}}


def _child(q, *args) -> None:
    try:
        q.put(serving_at_size(*args))
    except BaseException as e:  # the parent reports it
        q.put({"error": f"{type(e).__name__}: {e}"})


def serving_curve(export: str, sizes: list[int], workdir: str, requests: int = 300, k: int = 10,
                  nprobe: int = 48) -> list[dict]:
    """:func:`serving_at_size` for each size, each in a fresh spawned process over its resized export."""
    rows = []
    ctx = mp.get_context("spawn")  # never fork a process that may hold a Ray driver
    for n in sizes:
        dst = os.path.join(workdir, f"export-{n}")
        t0 = time.time()
        resize_export(export, dst, n)
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(q, dst, requests, k, nprobe))
        p.start()
        row = q.get()
        p.join()
        if "error" in row:
            raise RuntimeError(f"serving at {n} items: {row['error']}")
        row["resize_s"] = round(time.time() - t0, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
        shutil.rmtree(dst, ignore_errors=True)
    return rows


def _texts(n: int, seed: int) -> list[str]:
    from bundlerec.config import SyntheticConfig
    from bundlerec.data.schema import item_text
    from bundlerec.data.synthetic import make_catalog

    cat = make_catalog(SyntheticConfig(n_items=max(n, 40), seed=seed), np.random.default_rng(seed)).head(n)
    return [item_text(t, c, b, p) for t, c, b, p in zip(cat.title, cat.category, cat.brand, cat.price)]


def encoding_curve(export: str, sizes: list[int], actors: int = 2, seed: int = 1) -> list[dict]:
    """Items/s of ``export``'s item tower at each size: in this process with every core's threads,
    and by Ray Data batch inference with ``actors`` one-CPU actors (the current Ray cluster; the
    actors' start-up is inside the time, as in the export stage). Both give the same vectors."""
    import torch
    from transformers import AutoTokenizer

    from bundlerec.model.batch_encode import encode_catalog
    from bundlerec.model.export import load_export

    model, meta = load_export(export)
    tok = AutoTokenizer.from_pretrained(f"{export}/encoder")
    rows = []
    for n in sizes:
        enc = tok(_texts(n, seed), truncation=True, max_length=int(meta.get("item_max_tokens", 32)),
                  padding="max_length", return_tensors="np")
        ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
        threads = torch.get_num_threads()
        torch.set_num_threads(os.cpu_count() or 1)
        try:
            t0 = time.perf_counter()
            driver = model.index_items(torch.as_tensor(ids), torch.as_tensor(mask)).numpy()
            driver_s = time.perf_counter() - t0
        finally:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        batch = encode_catalog(f"{export}/encoder", model.pooling, ids, mask, actors=actors)
        ray_s = time.perf_counter() - t0
        rows.append({"items": n, "tokens_per_item": int(mask.sum(1).mean()), "driver_s": round(driver_s, 2),
                     "driver_items_per_s": n / driver_s, "ray_data_s": round(ray_s, 2),
                     "ray_data_items_per_s": n / ray_s, "ray_data_actors": actors,
                     "max_abs_diff": float(np.abs(driver - batch).max())})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def growth(rows: list[dict], x: str, y) -> list[dict]:
    """Between consecutive rows: the exponent of ``y(row)`` against ``row[x]`` (1 = linear)."""
    import math

    out = []
    for a, b in zip(rows, rows[1:]):
        ka = math.log(max(y(b), 1e-12) / max(y(a), 1e-12)) / math.log(b[x] / a[x])
        out.append({"from": a[x], "to": b[x], "exponent": round(ka, 2),
                    "kind": "sub-linear" if ka < 0.9 else "linear" if ka <= 1.1 else "worse than linear"})
    return out


def catalog_cost(export: str, serve_sizes: list[int], encode_sizes: list[int], workdir: str, requests: int = 300,
                 k: int = 10, nprobe: int = 48, actors: int = 2) -> dict:
    """Both curves and their growth, as one JSON record."""
    import ray
    import torch

    enc = encoding_curve(export, encode_sizes, actors) if encode_sizes else []
    srv = serving_curve(export, serve_sizes, workdir, requests, k, nprobe) if serve_sizes else []
    return {"date": datetime.now(timezone.utc).isoformat(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "ray": ray.__version__, "torch": torch.__version__, "export": export,
            "encoding": enc, "encoding_growth": growth(enc, "items", lambda r: r["driver_s"]),
            "serving": srv,
            "serving_growth": {"exact_p50": growth(srv, "items", lambda r: r["exact"]["p50_ms"]),
                               "ann_p50": growth(srv, "items", lambda r: r["ann"]["p50_ms"]),
                               "rss_exact": growth(srv, "items", lambda r: r["replica_rss_mib_exact"])}}
