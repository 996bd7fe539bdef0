"""Load test of the recommendation endpoint on loopback, and of the same model called in-process, so
the Serve overhead is visible. Bounded: a fixed number of requests per concurrency level.

    python -m jobs.loadtest --url http://127.0.0.1:8000 --export runs/demo/export \
        --concurrency 1 8 32 --requests 400 --out docs/bench/loadtest.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import statistics
import threading
import time
from datetime import datetime, timezone
from urllib.parse import urlparse

import numpy as np


def _pcts(lat_ms: list[float]) -> dict:
    a = np.asarray(lat_ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "max_ms": float(a.max())}


def http_level(url: str, users: list[str], concurrency: int, n_requests: int, k: int) -> dict:
    """n_requests POSTs split over `concurrency` keep-alive connections."""
    u = urlparse(url)
    lat: list[float] = []
    errors: list = []
    lock = threading.Lock()
    per = [n_requests // concurrency + (1 if i < n_requests % concurrency else 0) for i in range(concurrency)]

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        mine = []
        for j in range(per[i]):
            body = json.dumps({"user_id": users[(i * 7919 + j) % len(users)], "k": k})
            t = time.perf_counter()
            try:
                conn.request("POST", "/v1/recommendations", body, {"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                if r.status != 200:
                    with lock:
                        errors.append(r.status)
                    continue
            except Exception as e:
                with lock:
                    errors.append(repr(e))
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
                continue
            mine.append((time.perf_counter() - t) * 1000)
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": n_requests, "errors": len(errors),
            "throughput_rps": len(lat) / wall, **_pcts(lat)}


def in_process(export_dir: str, users: list[str], n_requests: int, k: int) -> dict:
    import torch

    from bundlerec.recommend import Recommender

    torch.set_num_threads(1)  # like one Serve replica (num_cpus: 1)
    rec = Recommender.from_export(export_dir)
    for u in users[:5]:
        rec.recommend(user_id=u, k=k)  # warm-up
    lat = []
    for j in range(n_requests):
        t = time.perf_counter()
        rec.recommend(user_id=users[j % len(users)], k=k)
        lat.append((time.perf_counter() - t) * 1000)
    return {"requests": n_requests, "n_items": len(rec.item_ids), **_pcts(lat)}


def main(argv: list[str] | None = None) -> dict:
    import pandas as pd

    p = argparse.ArgumentParser(description="bundlerec endpoint load test")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--export", required=True, help="export dir of the deployed model (users + in-process baseline)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    users = pd.read_parquet(f"{args.export}/latest.parquet").user_id.astype(str).tolist()
    for _ in range(20):  # warm the replica and the proxy
        http_level(args.url, users, 1, 1, args.k)
    levels = [http_level(args.url, users, c, args.requests, args.k) for c in args.concurrency]
    local = in_process(args.export, users, args.requests, args.k)
    out = {"date": datetime.now(timezone.utc).isoformat(), "url": args.url, "k": args.k, "levels": levels,
           "in_process": local, "serve_overhead_p50_ms": levels[0]["p50_ms"] - local["p50_ms"],
           "machine": f"{platform.machine()} {platform.processor() or ''}".strip()}
    for lv in levels:
        print(f"c={lv['concurrency']:>3}  p50 {lv['p50_ms']:7.2f} ms  p95 {lv['p95_ms']:7.2f}  p99 {lv['p99_ms']:7.2f}  "
              f"{lv['throughput_rps']:7.1f} req/s  errors {lv['errors']}")
    print(f"in-process  p50 {local['p50_ms']:.2f} ms  p99 {local['p99_ms']:.2f} ms ({local['n_items']} items); "
          f"Serve overhead at p50: {out['serve_overhead_p50_ms']:.2f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
