"""Load test of the recommendation endpoint on loopback, and of the same model called in-process, so
the Serve overhead is visible. Bounded: a fixed number of requests per concurrency level.
The command is ``jobs/loadtest.py``:

    python -m jobs.loadtest --url http://127.0.0.1:8000 --export runs/demo/export \
        --concurrency 1 8 32 --requests 400 --out docs/bench/loadtest.json
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import signal
import threading
import time
from datetime import datetime, timezone
from urllib.parse import urlparse

import numpy as np

from bundlerec.config import ServeConfig
from bundlerec.privacy import PSEUDO_PREFIX, SCHEME


def _pcts(lat_ms: list[float]) -> dict:
    a = np.asarray(lat_ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "max_ms": float(a.max())}


ROUTES = {  # what each measured route is sent: (path, body for user u)
    "recommendations": ("/v1/recommendations", lambda u, k: {"user_id": u, "k": k}),
    "bundles": ("/v1/bundles", lambda u, k: {"user_id": u, "n": 3, "max_size": 4}),
    # the pyfunc under `mlflow models serve` (bundlerec.serving.mlflow_serve): one user's row (the
    # signature makes every column required: null events = the user's stored history)
    "invocations": ("/invocations", lambda u, k: {"dataframe_records": [
        {"user_id": u, "item_id": None, "event_type": None, "event_time": None}], "params": {"k": k}}),
}


def http_level(url: str, users: list[str], concurrency: int, n_requests: int, k: int,
               token: str | None = None, progress: list | None = None, route: str = "recommendations") -> dict:
    """n_requests POSTs split over `concurrency` keep-alive connections (``progress`` gets one entry
    per finished request, for a fault injector watching from another thread); ``route``: a key of
    :data:`ROUTES`."""
    u = urlparse(url)
    path, make_body = ROUTES[route]
    lat: list[float] = []
    errors: list = []
    lock = threading.Lock()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    per = [n_requests // concurrency + (1 if i < n_requests % concurrency else 0) for i in range(concurrency)]

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        mine = []
        for j in range(per[i]):
            body = json.dumps(make_body(users[(i * 7919 + j) % len(users)], k))
            t = time.perf_counter()
            try:
                conn.request("POST", path, body, headers)
                r = conn.getresponse()
                r.read()
                if r.status != 200:
                    with lock:
                        errors.append(r.status)
                    if progress is not None:
                        progress.append(0)
                    continue
            except Exception as e:
                with lock:
                    errors.append(repr(e))
                if progress is not None:
                    progress.append(0)
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
                continue
            mine.append((time.perf_counter() - t) * 1000)
            if progress is not None:
                progress.append(1)
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"route": route, "concurrency": concurrency, "requests": n_requests, "errors": len(errors),
            "error_kinds": sorted({str(e)[:80] for e in errors}),
            "throughput_rps": len(lat) / wall, **_pcts(lat)}


def _join_ray() -> None:
    """Connect to the running cluster (its address from RAY_ADDRESS or this machine's)."""
    import ray

    from bundlerec.runtime import setup_env

    setup_env()  # too late if Ray is already imported: the commands set it first (jobs/loadtest.py)
    ray.init(address="auto", ignore_reinit_error=True, logging_level="ERROR")


def kill_replica_level(url: str, users: list[str], concurrency: int, n_requests: int, k: int,
                       token: str | None, at: float, app: str = "bundlerec") -> dict:
    """Bounded load; after ``at`` of the requests, SIGKILL one Serve replica of ``app`` (found through
    the Ray state API) and measure failed requests and the time until Serve has replaced it."""
    import ray
    from ray.util.state import list_actors

    _join_ray()
    gcs = ray.get_runtime_context().gcs_address  # the cluster joined above, not the newest on this machine

    def replicas():
        return [a for a in list_actors(address=gcs, filters=[("state", "=", "ALIVE")], limit=10_000)
                if a.class_name.startswith(f"ServeReplica:{app}:")]

    before = replicas()
    if not before:
        raise RuntimeError(f"no live replica of Serve app {app!r}")
    progress: list = []
    box: dict = {}
    th = threading.Thread(target=lambda: box.update(http_level(url, users, concurrency, n_requests, k, token, progress)))
    th.start()
    while len(progress) < at * n_requests and th.is_alive():
        time.sleep(0.005)
    victim = before[0]
    t_kill = time.time()
    os.kill(victim.pid, signal.SIGKILL)
    recovered_s = None
    while time.time() - t_kill < 120:
        alive = [a for a in replicas() if a.actor_id != victim.actor_id]
        if len(alive) >= len(before):
            recovered_s = time.time() - t_kill
            break
        time.sleep(0.2)
    th.join()
    return {**box, "replicas": len(before), "killed_after_requests": int(at * n_requests),
            "failed_fraction": box["errors"] / n_requests, "replica_replaced_s": recovered_s}


def in_process(export_dir: str, users: list[str], n_requests: int, k: int, serve: ServeConfig | None = None) -> dict:
    """The same model called in one thread, configured as a Serve replica is (``serve`` args)."""
    import torch

    from bundlerec.inference.recommender import Recommender

    serve = serve or ServeConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like one Serve replica (num_cpus: 1)
    try:
        rec = Recommender.from_export(export_dir)
        rec.configure_ann(serve.ann_min_items, serve.ann_nprobe)  # as the Serve replica does
        for u in users[:5]:
            rec.recommend(user_id=u, k=k)  # warm-up
        lat = []
        for j in range(n_requests):
            t = time.perf_counter()
            rec.recommend(user_id=users[j % len(users)], k=k)
            lat.append((time.perf_counter() - t) * 1000)
    finally:
        torch.set_num_threads(threads)
    return {"requests": n_requests, "n_items": len(rec.item_ids), "ann": rec.ann is not None,
            "ann_nprobe": rec.ann.nprobe if rec.ann else None, **_pcts(lat)}


def build_large_catalog(src_export: str, dst_export: str, n_items: int, seed: int = 1) -> str:
    """Copy ``src_export`` and grow its catalog to ``n_items`` synthetic items, encoded by its own model.

    The original items keep their positions, so the users' histories stay valid; the extra items are
    generated by bundlerec.data.synthetic and indexed with the exported encoder (honest embeddings, slow
    on CPU: ~10 min for 100k items on 2 cores).
    """
    import shutil

    import pandas as pd
    import torch

    from bundlerec.config import SyntheticConfig
    from bundlerec.data.schema import item_text
    from bundlerec.data.synthetic import make_catalog
    from bundlerec.model.export import load_export

    shutil.copytree(src_export, dst_export, dirs_exist_ok=True)
    items = pd.read_parquet(f"{src_export}/items.parquet")
    extra_n = n_items - len(items)
    extra = make_catalog(SyntheticConfig(n_items=max(extra_n, 40), seed=seed), np.random.default_rng(seed)).head(extra_n)
    extra["item_id"] = [f"X{i:07d}" for i in range(extra_n)]
    extra["text"] = [item_text(t, c, b, p) for t, c, b, p in zip(extra.title, extra.category, extra.brand, extra.price)]
    extra["item_idx"] = np.arange(len(items), len(items) + extra_n)
    model, meta = load_export(src_export)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(f"{src_export}/encoder")
    torch.set_num_threads(2)
    chunks, t0 = [], time.time()
    texts = extra.text.tolist()
    for i in range(0, len(texts), 512):
        enc = tok(texts[i:i + 512], truncation=True, max_length=int(meta.get("item_max_tokens", 32)),
                  padding=True, return_tensors="pt")
        chunks.append(model.index_items(enc["input_ids"], enc["attention_mask"]).numpy())
        if (i // 512) % 20 == 0:
            done = i + len(texts[i:i + 512])
            print(f"encoded {done}/{extra_n} items ({done / (time.time() - t0):.0f} items/s)", flush=True)
    index = np.concatenate([np.load(f"{src_export}/item_index.npy")] + chunks).astype(np.float32)
    np.save(f"{dst_export}/item_index.npy", index)
    cols = list(items.columns)
    pd.concat([items, extra.reindex(columns=cols)], ignore_index=True).to_parquet(f"{dst_export}/items.parquet")
    pop = np.load(f"{src_export}/popularity.npy")
    np.save(f"{dst_export}/popularity.npy", np.concatenate([pop, np.zeros(extra_n)]))
    import scipy.sparse as sp

    if os.path.exists(f"{src_export}/copurchase.npz"):  # new items have no co-purchases yet
        pairs = sp.load_npz(f"{src_export}/copurchase.npz").tocoo()
        sp.save_npz(f"{dst_export}/copurchase.npz", sp.csr_matrix((pairs.data, (pairs.row, pairs.col)), shape=(n_items, n_items)))
        counts = np.load(f"{src_export}/copurchase_items.npy")
        np.save(f"{dst_export}/copurchase_items.npy", np.concatenate([counts, np.zeros(extra_n)]))
    # the engine's extra text channels and the recommender's fusion (bundlerec.inference.fusion) are not
    # grown here: drop them (the grown export recommends with the two-tower alone), and parameters that use them
    from bundlerec.bundles.engine import EngineParams

    for f in ("item_index_pretrained.npy", "lexical.json", "lexical_items.npz", "recommend_fusion.json", "itemknn.npz",
              "sasrec.json", "sasrec.safetensors"):
        if os.path.exists(f"{dst_export}/{f}"):
            os.remove(f"{dst_export}/{f}")
    params = EngineParams.load(dst_export)
    if {"pretrained", "lexical"} & {*params.completion, *params.compat}:
        EngineParams().save(dst_export)
    from bundlerec.integrity import seal

    seal(dst_export)  # a new, complete export: its own manifest
    return dst_export


def bundle_pressure_level(url: str, users: list[str], concurrency: int, n_requests: int, k: int,
                          token: str | None, pressure: int, honor_retry_after: bool = False) -> dict:
    """Recommendations (as :func:`http_level`) while ``pressure`` clients send maximal bundle requests
    (n=10, max_size=8, one after the other, for as long as the level runs); what each bundle request
    got (200, or 503 when the replica sheds bundle work) is counted. With ``honor_retry_after`` a
    client answered 503 waits the ``Retry-After`` seconds before its next request (as well-behaved
    clients do); without, it retries at once (a hostile client)."""
    u = urlparse(url)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    stop, codes, lock = threading.Event(), {}, threading.Lock()

    def bundler(i: int) -> None:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
        j = 0
        while not stop.is_set():
            body = json.dumps({"user_id": users[(i * 104729 + j) % len(users)], "n": 10, "max_size": 8})
            j += 1
            try:
                conn.request("POST", "/v1/bundles", body, headers)
                r = conn.getresponse()
                r.read()
                code = r.status
                if honor_retry_after and code == 503 and r.getheader("Retry-After"):
                    stop.wait(float(r.getheader("Retry-After")))
            except Exception as e:
                code = type(e).__name__
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
            with lock:
                codes[str(code)] = codes.get(str(code), 0) + 1

    threads = [threading.Thread(target=bundler, args=(i,)) for i in range(pressure)]
    for t in threads:
        t.start()
    time.sleep(2.0)  # the bundle load is running before the measured recommendations start
    try:
        level = http_level(url, users, concurrency, n_requests, k, token)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return {**level, "bundle_clients": pressure, "bundle_answers": codes, "honor_retry_after": honor_retry_after}


def run_loadtest(url: str, export: str, concurrency: list[int], requests: int, k: int = 10,
                 token: str | None = None, kill_replica_at: float | None = None, bundle_pressure: int = 0,
                 honor_retry_after: bool = False) -> dict:
    """Warm up, then one level per concurrency (or one level with a replica killed part-way), plus
    the same model in-process; returns the figures (``serve_overhead_p50_ms`` = HTTP p50 at the first
    level minus in-process p50)."""
    users = users_of(export)
    for _ in range(20):  # warm the replica and the proxy
        http_level(url, users, 1, 1, k, token)
    if kill_replica_at is not None:
        res = kill_replica_level(url, users, concurrency[0], requests, k, token, kill_replica_at)
        res["date"] = datetime.now(timezone.utc).isoformat()
        return res
    if bundle_pressure:  # recommendations alone, then beside `bundle_pressure` maximal bundle clients
        solo = http_level(url, users, concurrency[0], requests, k, token)
        loaded = bundle_pressure_level(url, users, concurrency[0], requests, k, token, bundle_pressure,
                                       honor_retry_after)
        return {"date": datetime.now(timezone.utc).isoformat(), "url": url, "solo": solo, "with_bundles": loaded,
                "p99_ratio": loaded["p99_ms"] / solo["p99_ms"],
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip()}
    levels = [http_level(url, users, c, requests, k, token) for c in concurrency]
    local = in_process(export, users, requests, k)
    return {"date": datetime.now(timezone.utc).isoformat(), "url": url, "k": k, "levels": levels,
            "in_process": local, "serve_overhead_p50_ms": levels[0]["p50_ms"] - local["p50_ms"],
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip()}


def users_of(export: str) -> list[str]:
    import pandas as pd

    # pseudonymized exports (bundlerec.privacy): name each user by pseudonym so the endpoint finds them
    prefix = PSEUDO_PREFIX if json.load(open(f"{export}/bundlerec.json")).get("user_ids") == SCHEME else ""
    return [prefix + u for u in pd.read_parquet(f"{export}/latest.parquet").user_id.astype(str)]


def route_levels(url: str, users: list[str], routes: list[str], concurrency: list[int], requests: int, k: int,
                  token: str | None, groups: dict) -> dict:
    """Each route at each concurrency, with the CPU each of ``groups`` (role -> PIDs) spent per request."""
    from bundlerec.serving.cpu_account import per_request

    out = {}
    for r in routes:
        for _ in range(20):  # warm-up
            http_level(url, users, 1, 1, k, token, route=r)
        out[r] = []
        for c in concurrency:
            out[r].append(per_request(groups, lambda: http_level(url, users, c, requests, k, token, route=r)))
            _say(url, r, out[r][-1])
    return out


def _say(where: str, route: str, lv: dict) -> None:
    """One progress line per measured level."""
    print(f"{where} {route} x{lv['concurrency']}: p50 {lv['p50_ms']:.1f} ms, p99 {lv['p99_ms']:.1f} ms, "
          f"{lv['throughput_rps']:.0f} req/s, {lv['errors']} errors, CPU ms/request {lv.get('cpu_ms_per_request')}",
          flush=True)


def handle_levels(app: str, users: list[str], concurrency: list[int], n_requests: int, k: int,
                  groups: dict) -> list[dict]:
    """The in-cluster path, one level per concurrency: a Ray driver calls the replica through a Serve
    deployment handle (router to replica, no HTTP proxy, no FastAPI request parsing, no auth: callers
    inside the cluster). The clients are asyncio tasks on one loop (under RAY_SERVE_THROUGHPUT_OPTIMIZED
    a handle needs a running loop and stays bound to it); ``groups`` as :func:`route_levels`."""
    import asyncio

    from ray import serve

    from bundlerec.serving.cpu_account import per_answer, snapshot
    from bundlerec.serving.schemas import RecommendationRequest

    _join_ray()

    async def level(h, c: int) -> dict:
        per = [n_requests // c + (1 if i < n_requests % c else 0) for i in range(c)]
        lat: list[float] = []
        errors: list = []

        async def worker(i: int) -> None:
            for j in range(per[i]):
                req = RecommendationRequest(user_id=users[(i * 7919 + j) % len(users)], k=k)
                t = time.perf_counter()
                try:
                    await asyncio.wait_for(h.recommend.remote(req), 60)
                except Exception as e:
                    errors.append(repr(e))
                    continue
                lat.append((time.perf_counter() - t) * 1000)

        before, t0 = snapshot(groups), time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(c)))
        wall = time.perf_counter() - t0
        return {"route": "recommendations", "path": "deployment handle", "concurrency": c, "requests": n_requests,
                "errors": len(errors), "error_kinds": sorted({e[:80] for e in errors}), "throughput_rps": len(lat) / wall,
                **_pcts(lat), "cpu_ms_per_request": per_answer(before, snapshot(groups), len(lat))}

    async def measure() -> list[dict]:
        h = serve.get_app_handle(app)
        for j in range(20):  # warm-up
            await h.recommend.remote(RecommendationRequest(user_id=users[j % len(users)], k=k))
        out = []
        for c in concurrency:
            out.append(await level(h, c))
            _say("handle", "recommendations", out[-1])
        return out

    return asyncio.run(measure())


def side_by_side(url: str, export: str, concurrency: list[int], requests: int, k: int, token_file: str | None,
                 bare_workers: int, routes: list[str], handle_app: str | None = "bundlerec",
                 user_key_file: str | None = None) -> dict:
    """Ray Serve at ``url`` and the same export behind the bare FastAPI app (``bare_workers`` uvicorn
    processes, one torch thread each, as a replica has), one after the other on the same cores, the
    same requests; plus the deployment-handle path and the model in-process. ``serve_overhead_ratio``:
    Serve's p50 over the bare app's at the first concurrency, for recommendations."""
    from bundlerec.serving.deploy import read_token

    token = read_token(token_file)
    users = users_of(export)
    res: dict = {"date": datetime.now(timezone.utc).isoformat(), "url": url, "export": export, "k": k,
                 "bare_workers": bare_workers, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                 "cpus": os.cpu_count()}
    from bundlerec.serving.cpu_account import serve_processes

    groups = {}
    if handle_app:
        _join_ray()
        groups = serve_processes(handle_app)
    res["serve"] = route_levels(url, users, routes, concurrency, requests, k, token, groups)
    if handle_app:
        res["handle"] = handle_levels(handle_app, users, concurrency, requests, k, groups)
    from bundlerec.serving.bare import start_bare, stop_bare

    proc, bare_url = start_bare(export, bare_workers, token_file, user_key_file)
    try:
        res["bare"] = route_levels(bare_url, users, routes, concurrency, requests, k, token, {"uvicorn workers": [proc.pid]})
    finally:
        stop_bare(proc)
    res["in_process"] = in_process(export, users, requests, k)
    res["ratios"] = {r: [{"concurrency": s["concurrency"], "p50": s["p50_ms"] / b["p50_ms"], "p99": s["p99_ms"] / b["p99_ms"],
                          "rps": s["throughput_rps"] / b["throughput_rps"]}
                         for s, b in zip(res["serve"][r], res["bare"][r])] for r in routes}
    first = routes.index("recommendations") if "recommendations" in routes else 0
    res["serve_overhead_ratio"] = res["ratios"][routes[first]][0]["p50"]
    return res


def format_side_by_side(res: dict) -> str:
    lines = ["| path | route | clients | p50 ms | p99 ms | req/s | errors |", "|---|---|---|---|---|---|---|"]
    for path in ("serve", "bare"):
        for r, levels in res[path].items():
            lines += [f"| {path} | {r} | {lv['concurrency']} | {lv['p50_ms']:.1f} | {lv['p99_ms']:.1f} | "
                      f"{lv['throughput_rps']:.0f} | {lv['errors']} |" for lv in levels]
    for lv in res.get("handle") or []:
        lines.append(f"| handle | recommendations | {lv['concurrency']} | {lv['p50_ms']:.1f} | {lv['p99_ms']:.1f} | "
                     f"{lv['throughput_rps']:.0f} | {lv['errors']} |")
    loc = res["in_process"]
    lines.append(f"in-process p50 {loc['p50_ms']:.2f} ms, p99 {loc['p99_ms']:.2f} ms ({loc['n_items']} items); "
                 f"serve_overhead_ratio (p50, Serve / bare, first level) {res['serve_overhead_ratio']:.2f}")
    return "\n".join(lines)


def format_report(out: dict) -> str:
    lines = [f"c={lv['concurrency']:>3}  p50 {lv['p50_ms']:7.2f} ms  p95 {lv['p95_ms']:7.2f}  p99 {lv['p99_ms']:7.2f}  "
             f"{lv['throughput_rps']:7.1f} req/s  errors {lv['errors']}" for lv in out["levels"]]
    local = out["in_process"]
    lines.append(f"in-process  p50 {local['p50_ms']:.2f} ms  p99 {local['p99_ms']:.2f} ms ({local['n_items']} items); "
                 f"Serve overhead at p50: {out['serve_overhead_p50_ms']:.2f} ms")
    return "\n".join(lines)
