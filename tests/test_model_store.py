"""bundlerec.serving.model_store: replicas of one node share the store, and one replica's pruning
never deletes a copy another one is loading (no Ray, no MLflow: the store's files only)."""

import os
import subprocess
import sys

from bundlerec.serving.model_store import ModelStore


def _version(store: ModelStore, folder: str) -> str:
    path = store.path("bundlerec", folder)
    os.makedirs(path)
    open(os.path.join(path, "MLmodel"), "w").write("x")
    return path


def test_pruning_keeps_what_a_live_replica_is_loading(tmp_path):
    store = ModelStore(str(tmp_path), "http://registry")
    v1, v2, v3 = (_version(store, f) for f in ("1-m-aaa", "2-m-bbb", "3-m-ccc"))
    # another replica of the node (a live process) is loading v2: its lease, as fetch() takes it
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lease = os.path.join(os.path.dirname(v2), f".lease-2-m-bbb-{other.pid}-0123abcd")
        open(lease, "w").close()
        store.lease(v3)  # this replica is loading v3
        store.remember("models:/bundlerec@champion", "bundlerec", "1", v1)
        assert all(os.path.exists(os.path.join(v, "MLmodel")) for v in (v1, v2, v3))
        store.release(v3)  # loaded: this replica's lease ends, the other replica's stays
        store.remember("models:/bundlerec@champion", "bundlerec", "1", v1)
        assert os.path.exists(v2) and not os.path.exists(v3) and os.path.exists(lease)
    finally:
        other.kill()
        other.wait()
    # the other replica died holding its lease: the lease is stale, the copy is pruned with it
    store.remember("models:/bundlerec@champion", "bundlerec", "1", v1)
    assert not os.path.exists(v2) and not os.path.exists(lease) and os.path.exists(v1)
    assert store.last_good("models:/bundlerec@champion")["path"] == v1


def test_a_lease_older_than_the_limit_is_stale(tmp_path):
    import time

    from bundlerec.serving import model_store

    store = ModelStore(str(tmp_path), "http://registry")
    v1, v2 = _version(store, "1-m-aaa"), _version(store, "2-m-bbb")
    store.lease(v2)  # this very process, alive, but the lease is old
    lease = [n for n in os.listdir(os.path.dirname(v2)) if n.startswith(".lease-")][0]
    old = time.time() - model_store.LEASE_MAX_S - 10
    os.utime(os.path.join(os.path.dirname(v2), lease), (old, old))
    store.remember("models:/bundlerec@champion", "bundlerec", "1", v1)
    assert not os.path.exists(v2) and os.path.exists(v1)
