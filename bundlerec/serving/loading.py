"""What a replica serves: a registered version (or an export dir) resolved, downloaded into the node's
model store, verified against the digest pinned at registration, then checked with a canned request.
No code of the registered model runs; when the registry cannot be reached the last good local copy
is loaded instead."""

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

from bundlerec.serving.schemas import ModelInfo

log = logging.getLogger("ray.serve")


@dataclass
class Loaded:
    rec: Any  # bundlerec.inference.recommender.Recommender
    info: ModelInfo
    source: str = "registry"  # registry | local copy (registry unreachable) | export dir
    local: Optional[str] = None  # the verified local copy it was loaded from (ModelStore)
    digest: Optional[str] = None  # the export's manifest digest pinned in the registry (checked at load)


def resolve_version(model_uri: str, tracking_uri: Optional[str]) -> tuple[str, Optional[str], Optional[str]]:
    """models:/name@alias -> (models:/name/<version>, version, alias); other URIs unchanged."""
    if not model_uri.startswith("models:/"):
        return model_uri, None, None
    import mlflow

    from bundlerec.tracking import one_try

    name, _, ref = model_uri[len("models:/"):].partition("@")
    if ref:
        with one_try(10):  # a registry that is down answers in seconds, not after minutes of retries
            mv = mlflow.MlflowClient(tracking_uri).get_model_version_by_alias(name, ref)
        return f"models:/{name}/{mv.version}", str(mv.version), ref
    name, _, version = model_uri[len("models:/"):].partition("/")
    return model_uri, version or None, None


def canned_check(rec) -> None:
    """A new model must answer before it serves: a recommendation and a bundle for a two-event
    session, with finite scores. Raises ValueError saying what failed."""
    import math
    from datetime import datetime, timedelta, timezone

    now = datetime.now(timezone.utc)
    h = rec.history_from_events([{"item_id": i, "event_type": t, "event_time": now - timedelta(minutes=m)}
                                 for i, t, m in zip(rec.item_ids[:2], ("view", "cart"), (5, 1))])
    ranked = rec.recommend_histories([h], 5)[0]
    if len(ranked) != min(5, len(rec.item_ids)) or not all(math.isfinite(float(s)) for _, s in ranked):
        raise ValueError(f"canned request: {len(ranked)} items, scores {[float(s) for _, s in ranked][:5]}")
    if rec.bundle_engine is not None:
        rec.bundles(h, n=1)


def load(model_uri: str, tracking_uri: Optional[str], ann: Optional[dict] = None,
         user_key: Optional[bytes] = None, store=None) -> Loaded:
    """Load, verify (the export's manifest) and check (a canned request) what ``model_uri`` names.
    ``store`` (bundlerec.serving.model_store.ModelStore): registry versions are downloaded into it,
    and when the registry cannot be reached the last good version kept there is loaded instead."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    from bundlerec.registry.promotion import EXPORT_DIGEST_TAG, load_verified

    source, local, pinned = "registry", None, None
    try:
        uri, version, alias = resolve_version(model_uri, tracking_uri)
    except Exception as e:
        kept = store.last_good(model_uri) if store is not None else None
        if kept is None:
            raise
        log.warning("bundlerec: registry unreachable (%s); serving the last good local copy, %s version %s",
                    e, kept["name"], kept["version"])
        uri, version, alias, local = f"models:/{kept['name']}/{kept['version']}", kept["version"], None, kept["path"]
        source, pinned = "local copy (registry unreachable)", kept.get("digest")
    if uri.startswith("runs:/"):
        raise ValueError(f"{uri}: serve a registered version (models:/<name>/<version> or @<alias>): only those "
                         "carry the pinned digest their export is checked against")
    if uri.startswith("models:/"):
        name = uri[len("models:/"):].split("/")[0]
        if source == "registry":  # from the registry, written by the training identity at registration
            from bundlerec.tracking import one_try

            with one_try(10):
                pinned = mlflow.MlflowClient(tracking_uri).get_model_version(name, version).tags.get(EXPORT_DIGEST_TAG)
        fresh = local is None
        if fresh:
            local = (store.fetch(uri, name, version) if store is not None and version
                     else mlflow.artifacts.download_artifacts(artifact_uri=uri))
        try:  # no code of the registered model runs: its export is read, after the pinned digest matches
            rec = load_verified(local, pinned, user_key)
        except Exception:
            if store is not None and source.startswith("local copy"):
                store.discard(local)  # a kept copy that no longer verifies is of no use to any replica
            # a fresh download that fails is left for ModelStore.remember's pruning: replicas on this
            # node share the store, and another one may be reading that folder right now
            raise
        finally:
            if store is not None and fresh:
                store.release(local)  # loaded (or refused): this replica's pruning lease ends
    else:
        from bundlerec.inference.recommender import Recommender

        rec, name, source = Recommender.from_export(uri, user_key), os.path.basename(os.path.normpath(uri)), "export dir"
    if rec.pseudonymized and user_key is None:
        raise RuntimeError(f"{uri}: its user ids are pseudonymized; give the Serve app the key (arg user_key_file, "
                           "serve.user_key_file) or shoppers would only be found by pseudonym")
    if ann:  # approximate top-k for large catalogs (bundlerec.inference.ann)
        rec.configure_ann(**ann)
    canned_check(rec)
    return Loaded(rec, ModelInfo(name=name, version=version, alias=alias, uri=uri), source, local, pinned)
