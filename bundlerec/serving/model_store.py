"""Each replica's verified local copies of registry versions, and the last one it served well.

    <model_cache_dir>/<registry>/<name>/<version>-<model id>/   a registry version, downloaded whole (staged + renamed)
    <model_cache_dir>/<registry>/last_good/<key>.json  per model URI (e.g. models:/bundlerec@champion): the
                                                       version that last loaded and answered the canned request

(<registry>: a hash of the tracking URI: version numbers are only unique within one registry.)

A replica that restarts while MLflow is unreachable loads the last good version from here (its
export still verifies against its manifest, bundlerec.integrity) instead of failing to start; a
refused or replaced version's copy is deleted, so polling never piles up downloads.

Replicas on one node share the store. A replica holds a **lease** on a folder from the moment it
fetches it until it has loaded it (``<name>/.lease-<folder>-<pid>-<nonce>``); pruning skips a folder
with a lease of a live process (one of a dead process, or older than :data:`LEASE_MAX_S`, is
removed), so one replica's :meth:`ModelStore.remember` never deletes a copy another is loading.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from typing import Optional

log = logging.getLogger("ray.serve")

LEASE_MAX_S = 3600.0  # a lease older than this is stale whatever its process (a load takes minutes at most)


class ModelStore:
    def __init__(self, root: str, tracking_uri: Optional[str] = None):
        registry = hashlib.sha256(str(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")).encode()).hexdigest()[:12]
        self.root = os.path.join(os.path.abspath(os.path.expanduser(root)), registry)
        os.makedirs(os.path.join(self.root, "last_good"), exist_ok=True)

    def path(self, name: str, folder: str) -> str:
        return os.path.join(self.root, name, str(folder))

    def fetch(self, uri: str, name: str, version: str) -> str:
        """Local directory of registry version ``uri`` (models:/name/version), downloaded once. The
        folder is named by version *and* the registered model's id: a version number alone may name
        another model in a registry recreated at the same address."""
        import mlflow

        source = mlflow.MlflowClient().get_model_version(name, version).source or ""
        dst = self.path(name, f"{version}-{source.rstrip('/').rsplit('/', 1)[-1] or 'model'}")
        self.lease(dst)  # held until the caller has loaded it (release)
        if os.path.exists(os.path.join(dst, "MLmodel")):
            return dst
        staging = os.path.join(self.root, name, f".{version}.staging-{uuid.uuid4().hex[:8]}")
        os.makedirs(staging)
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=staging)
            try:
                os.rename(staging, dst)  # whole or not at all; another replica may have won the race
            except OSError:
                if not os.path.exists(os.path.join(dst, "MLmodel")):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return dst

    def discard(self, path: str) -> None:
        if os.path.abspath(path).startswith(self.root + os.sep):
            self.release(path)
            shutil.rmtree(path, ignore_errors=True)

    def lease(self, path: str) -> None:
        """This process is using ``path`` (a version folder): pruning leaves it alone until :meth:`release`."""
        d, folder = os.path.split(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f".lease-{folder}-{os.getpid()}-{uuid.uuid4().hex[:8]}"), "w"):
            pass

    def release(self, path: str) -> None:
        """Drop this process's leases on ``path``."""
        d, folder = os.path.split(os.path.abspath(path))
        for n in os.listdir(d) if os.path.isdir(d) else []:
            if n.startswith(f".lease-{folder}-{os.getpid()}-"):
                try:
                    os.remove(os.path.join(d, n))
                except FileNotFoundError:
                    pass

    def _leased(self, d: str) -> set:
        """Folders of ``d`` with a live lease; stale leases (dead process, too old) are removed."""
        import time

        out = set()
        for n in os.listdir(d):
            if not n.startswith(".lease-"):
                continue
            folder, pid = n[len(".lease-"):].rsplit("-", 2)[:2]
            p = os.path.join(d, n)
            try:
                fresh = time.time() - os.path.getmtime(p) < LEASE_MAX_S
            except FileNotFoundError:
                continue
            if fresh and _alive(int(pid)):
                out.add(folder)
            else:
                try:
                    os.remove(p)
                except FileNotFoundError:
                    pass
        return out

    def _pointer(self, model_uri: str) -> str:
        return os.path.join(self.root, "last_good", hashlib.sha256(model_uri.encode()).hexdigest()[:16] + ".json")

    def remember(self, model_uri: str, name: str, version: str, path: str, digest: Optional[str] = None) -> None:
        """``path`` (version ``version``, its export's pinned manifest ``digest``) loaded and answered:
        the one to fall back to, checked against that digest again; other copies of the model are removed."""
        tmp = self._pointer(model_uri) + f".{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "w") as f:
            json.dump({"model_uri": model_uri, "name": name, "version": str(version),
                       "folder": os.path.basename(path), "digest": digest}, f)
        os.replace(tmp, self._pointer(model_uri))
        keep = {os.path.basename(path)} | {p.get("folder") for p in self._pointers() if p["name"] == name}
        d = os.path.join(self.root, name)
        if not os.path.isdir(d):
            return
        keep |= self._leased(d)  # being loaded by a replica of this node (this one included)
        for v in os.listdir(d):
            if not v.startswith(".") and v not in keep:
                shutil.rmtree(os.path.join(d, v), ignore_errors=True)

    def last_good(self, model_uri: str) -> Optional[dict]:
        """{name, version, path} of the last good version for ``model_uri`` that is still on disk."""
        try:
            with open(self._pointer(model_uri)) as f:
                p = json.load(f)
        except (OSError, ValueError):
            return None
        path = self.path(p["name"], p.get("folder", p["version"]))
        return {**p, "path": path} if os.path.exists(os.path.join(path, "MLmodel")) else None

    def _pointers(self) -> list[dict]:
        out = []
        d = os.path.join(self.root, "last_good")
        for n in os.listdir(d):
            if n.endswith(".json"):
                try:
                    with open(os.path.join(d, n)) as f:
                        out.append(json.load(f))
                except (OSError, ValueError):
                    continue
        return out


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists here (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
