"""A replica follows the registry: the alias (a moved champion is loaded and checked beside the old one,
then swapped in) and the experiment tag (every arm's version loaded before traffic is split). A
version or experiment that fails is refused once, and what served keeps serving."""

import logging
from typing import Optional

from bundlerec.serving.loading import Loaded, load, resolve_version

log = logging.getLogger("ray.serve")


class RegistryFollower:
    """Mixin of the deployment (:class:`bundlerec.serving.app.BundlerecService`), which sets the
    attributes used here in its constructor: ``model_uri``, ``tracking_uri``, ``model_name``, ``ann``,
    ``user_key``, ``store``, ``current``, ``refused``, ``reloads``, ``experiment``,
    ``experiment_refused``, ``_experiment_key``, ``_stop``, ``watch_error``."""

    def _remember(self, m: Loaded) -> None:
        if self.store is not None and m.info.version and m.local and m.info.uri.startswith("models:/"):
            self.store.remember(self.model_uri, m.info.name, m.info.version, m.local, m.digest)

    def _refuse(self, version: Optional[str], e: Exception) -> None:
        from datetime import datetime, timezone

        self.refused = {"version": version, "error": f"{type(e).__name__}: {e}"[:500],
                        "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        log.error("bundlerec: refused %s version %s, still serving version %s: %s", self.model_uri, version,
                  getattr(getattr(self, "current", None), "info", None) and self.current.info.version, e)

    def _watch(self, poll_s: float) -> None:
        """Follow the alias and the experiment tag every ``poll_s``; an unexpected error is logged and
        the next round runs (the thread never ends before the replica does; /readyz says if it did)."""
        while not self._stop.wait(poll_s):
            try:
                if "@" in self.model_uri:
                    self._follow_alias()
                self._sync_experiment()
                self.watch_error = None
            except Exception as e:
                self.watch_error = f"{type(e).__name__}: {e}"[:500]
                log.exception("bundlerec: registry watch round failed (next round in %.0fs)", poll_s)

    def _follow_alias(self) -> None:
        """Follow the alias: load and check a moved champion beside the old one, then swap the
        reference. A version that fails (manifest, load, canned request) is refused once and the
        old one keeps serving; it is retried only when the alias moves again."""
        try:
            _, version, _ = resolve_version(self.model_uri, self.tracking_uri)
        except Exception as e:  # registry hiccup: keep serving the loaded model
            log.warning("bundlerec: alias check failed: %s", e)
            return
        if not version or version == self.current.info.version or (self.refused or {}).get("version") == version:
            return
        arms = {m.info.version: m for m in self.experiment.arms.values()} if self.experiment is not None else {}
        if version in arms:  # promoted from an experiment: that arm's model is loaded and checked already
            a = arms[version]
            new = Loaded(a.rec, a.info.model_copy(update={"alias": self.model_uri.rsplit("@", 1)[-1],
                                                            "uri": f"models:/{self.model_name}/{version}"}),
                         a.source, a.local, a.digest)
        else:
            try:
                new = load(self.model_uri, self.tracking_uri, self.ann, self.user_key, self.store)
            except Exception as e:
                self._refuse(version, e)
                return
        self.current = new  # atomic: requests in flight keep the object they hold
        self.refused = None
        self.reloads += 1
        self._remember(new)
        log.info("bundlerec: reloaded %s -> version %s", self.model_uri, new.info.version)

    def _sync_pricing(self, client) -> None:
        """Follow the pricing policy promoted onto the champion (registry tag ``bundlerec.pricing``); a
        malformed one is logged and the policy served stays as it was."""
        from bundlerec.experiments import lifecycle

        try:
            policy = lifecycle.read_pricing(client, self.model_name)
        except lifecycle.ExperimentSpecError as e:
            log.error("bundlerec: pricing policy refused, keeping %s: %s", self.pricing_policy, e)
            return
        if policy != self.pricing_policy:
            log.info("bundlerec: pricing policy %s -> %s", self.pricing_policy, policy)
            self.pricing_policy = policy

    def _sync_experiment(self) -> None:
        """Follow the registry's experiment tag: load and check every arm's version (reusing loaded
        ones) beside what serves, then swap the experiment in one assignment. An experiment whose
        arms fail to load is refused (``GET /v1/experiment`` says why) and traffic stays as it was."""
        import json

        import mlflow

        from bundlerec.experiments import lifecycle
        from bundlerec.experiments.assignment import Experiment
        from bundlerec.tracking import one_try

        try:
            client = mlflow.MlflowClient(self.tracking_uri)
            with one_try(10):
                self._sync_pricing(client)
                spec = lifecycle.read(client, self.model_name)
                versions = {a: lifecycle.resolve(client, self.model_name, arm["model"])
                            for a, arm in (spec or {}).get("arms", {}).items()}
        except lifecycle.ExperimentSpecError as e:  # a malformed tag: refused, traffic as it was
            if (self.experiment_refused or {}).get("error") != str(e):
                log.error("bundlerec: experiment tag refused: %s", e)
            self.experiment_refused = {"name": None, "key": None, "error": str(e)[:500]}
            return
        except Exception as e:  # registry hiccup: keep the traffic split as it is
            log.warning("bundlerec: experiment check failed: %s", e)
            return
        malformed_before = self.experiment_refused is not None and self.experiment_refused["key"] is None
        if malformed_before:  # the malformed tag was put right (or removed)
            self.experiment_refused = None
        if spec is None:
            if self.experiment is not None:
                log.info("bundlerec: experiment %s ended; all traffic to %s", self.experiment.name, self.model_uri)
            self.experiment, self._experiment_key = None, None
            return
        key = json.dumps([spec, versions], sort_keys=True)
        if key in (self._experiment_key, (self.experiment_refused or {}).get("key")):
            return
        pool = {self.current.info.version: self.current}
        if self.experiment is not None:
            pool.update({m.info.version: m for m in self.experiment.arms.values()})
        arms = {}
        try:
            for arm, version in sorted(versions.items()):
                if version not in pool:
                    pool[version] = load(f"models:/{self.model_name}/{version}", self.tracking_uri, self.ann,
                                         self.user_key, self.store)
                arms[arm] = pool[version]
        except Exception as e:
            self.experiment_refused = {"name": spec.get("name"), "key": key, "error": f"{type(e).__name__}: {e}"[:500]}
            log.error("bundlerec: experiment %s refused (arm %s, version %s): %s", spec.get("name"), arm, version, e)
            return
        spec = {**spec, "arms": {a: {**spec["arms"][a], "version": versions[a]} for a in spec["arms"]}}
        self.experiment = Experiment(spec, arms)  # atomic: a request routes on the object it read
        self._experiment_key, self.experiment_refused = key, None
        log.info("bundlerec: experiment %s running: %s", spec["name"], {a: versions[a] for a in sorted(arms)})
