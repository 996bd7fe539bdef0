"""Where a served request's CPU goes: the CPU time each process group spends per answered request
while a load level runs (``bundlerec loadtest --side-by-side``).

On a machine whose cores are all busy, latency at a concurrency C is C / throughput (Little's law),
and throughput is the cores over the CPU time one request costs, summed over every process that
handles it: the load generator, Serve's HTTP proxy, the replica, the controller, or the bare app's
uvicorn workers. These figures say which part a request's time goes to and what removing it buys.
"""

from __future__ import annotations

from typing import Callable


def serve_processes(app: str = "bundlerec") -> dict[str, list[int]]:
    """PIDs of the Ray Serve processes of ``app`` on the connected cluster, by role."""
    import ray
    from ray.util.state import list_actors

    gcs = ray.get_runtime_context().gcs_address
    groups: dict[str, list[int]] = {"http proxy": [], "replicas": [], "controller": []}
    for a in list_actors(address=gcs, filters=[("state", "=", "ALIVE")], limit=10_000):
        if a.class_name in ("ProxyActor", "HAProxyManager"):  # the Python proxy, or HAProxy's (its child process)
            groups["http proxy"].append(a.pid)
        elif a.class_name.startswith(f"ServeReplica:{app}:"):
            groups["replicas"].append(a.pid)
        elif a.class_name == "ServeController":
            groups["controller"].append(a.pid)
    return groups


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of the processes and their children, living ones only."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            procs = [psutil.Process(pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return total


def snapshot(groups: dict[str, list[int]]) -> dict:
    """CPU seconds so far of each group, and of this process alone (the load generator: not its
    children, which may be a bare app it started)."""
    import psutil

    return {**{g: _cpu_seconds(p) for g, p in groups.items()}, "load generator": sum(psutil.Process().cpu_times()[:2])}


def per_answer(before: dict, after: dict, answered: int) -> dict:
    """CPU milliseconds per answered request of each group between two snapshots, and their ``total``."""
    cpu = {g: round((after[g] - before[g]) * 1000 / max(1, answered), 3) for g in before}
    cpu["total"] = round(sum(cpu.values()), 3)
    return cpu


def per_request(groups: dict[str, list[int]], level: Callable[[], dict]) -> dict:
    """Run ``level`` (a load level returning ``requests`` and ``errors``) and add ``cpu_ms_per_request``
    (:func:`per_answer`; the load generator is its own group)."""
    before = snapshot(groups)
    out = level()
    return {**out, "cpu_ms_per_request": per_answer(before, snapshot(groups), out["requests"] - out["errors"])}
