"""What prep costs as the event count grows (``bundlerec bench-prep``; docs/benchmarks.md).

For each size the synthetic clickstream is generated once (:func:`bundlerec.data.synthetic.generate`,
timed apart), then the prep stage runs on it as a user's logs (``data.events``/``data.catalog``) on
the current Ray cluster. Recorded per size: events/s over the whole stage and without the snapshot's
content hashing (the manifest's ``hash_seconds``, timed inside prep), the machine's peak memory in
use above what it used before the stage (``/proc/meminfo``: the driver and every Ray worker, so run
it alone), and the bytes the snapshot and the raw input take on disk.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from bundlerec.config import PipelineConfig


def _mem_used() -> int:
    """Bytes in use on this machine (MemTotal - MemAvailable)."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            info[k] = int(v.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


class PeakMemory:
    """Samples the machine's memory in use every ``every_s`` while the block runs; ``peak`` is the
    largest sample above the one taken on entry."""

    def __init__(self, every_s: float = 0.25):
        self.every_s, self.base, self.peak = every_s, 0, 0
        self._stop = threading.Event()

    def __enter__(self):
        self.base = _mem_used()
        self._th = threading.Thread(target=self._run, daemon=True)
        self._th.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, _mem_used() - self.base)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._th.join()
        self.peak = max(self.peak, _mem_used() - self.base)


def _du(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def prep_cost(cfg: PipelineConfig, sizes: list[int], workdir: str) -> dict:
    """One record per size in ``sizes`` (events), each prepped with ``cfg`` (its synthetic section
    scaled: users and items grow with the events as in the demo, 30 events per user)."""
    from bundlerec.data.prep import run_prep
    from bundlerec.data.synthetic import generate

    rows = []
    for n in sizes:
        syn = replace(cfg.data.synthetic, n_events=n, n_users=max(200, n // 30),
                      n_items=max(cfg.data.synthetic.n_items, min(n // 100, 100_000)))
        raw = os.path.join(workdir, f"raw-{n}")
        t0 = time.time()
        if not os.path.exists(os.path.join(raw, "synthetic.json")):
            generate(syn, raw)
        gen_s = time.time() - t0
        out = os.path.join(workdir, f"prep-{n}")
        run_cfg = replace(cfg, data=replace(cfg.data, events=os.path.join(raw, "events"),
                                            catalog=os.path.join(raw, "catalog.parquet"), output_dir=out, synthetic=syn))
        with PeakMemory() as mem:
            m = run_prep(run_cfg)
        n_in = m["rows"]["input"]
        rows.append({"events": n_in, "users": syn.n_users, "items": m["catalog"]["items"],
                     "generate_s": round(gen_s, 1), "prep_s": m["seconds"], "hash_s": m["hash_seconds"],
                     "events_per_s": n_in / m["seconds"],
                     "events_per_s_without_hashing": n_in / max(m["seconds"] - m["hash_seconds"], 1e-9),
                     "peak_mem_above_idle_gib": mem.peak / 2**30,
                     "raw_disk_mib": _du(raw) / 2**20, "snapshot_disk_mib": _du(out) / 2**20,
                     "examples": m["examples"]})
        print(json.dumps(rows[-1]), flush=True)
    import ray

    return {"date": datetime.now(timezone.utc).isoformat(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "ray": ray.__version__, "model": cfg.model.name_or_path, "num_shards": cfg.data.num_shards,
            "sizes": rows, "growth": growth(rows)}


def growth(rows: list[dict]) -> list[dict]:
    """Between consecutive sizes: how time grows against the events (exponent 1 = linear)."""
    import math

    out = []
    for a, b in zip(rows, rows[1:]):
        k = math.log(b["prep_s"] / a["prep_s"]) / math.log(b["events"] / a["events"])
        out.append({"from": a["events"], "to": b["events"], "time_exponent": round(k, 2),
                    "kind": "sub-linear" if k < 0.9 else "linear" if k <= 1.1 else "worse than linear"})
    return out
