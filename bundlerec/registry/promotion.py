"""Promotion in the MLflow Model Registry: register an export as a pyfunc, move aliases on merit.

The alias ``champion`` moves to a new version only if it beats the current champion on the same
validation data (the declared primary metric, ``mlflow.primary_metric``: NDCG@10 of the served
recommendations or the best-Jaccard F1 of personalized bundles, both re-scored on this prep
snapshot's val split); otherwise the new
version becomes ``challenger`` and the reason is recorded on the version. Aliases, not stages.

    mlflow.pyfunc.load_model("models:/bundlerec@champion").predict(events_df, params={"k": 10})
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import mlflow
import torch

from bundlerec.registry.pyfunc import model_kwargs

log = logging.getLogger(__name__)

MODEL_NAME = "bundlerec"


class NoValidationData(ValueError):
    """Promotion needs a validation split; the test split is never used to choose a model."""


def validation_ndcg(rec, prep_dir: str, history_len: Optional[int] = None) -> float:
    """NDCG@10 of a Recommender on this prep snapshot's val split, with the model's own history
    length (the one it was trained and evaluated with) unless ``history_len`` says otherwise."""
    from bundlerec.data.catalog import load_items, padded_tokens
    from bundlerec.data.examples import load_split
    from bundlerec.eval.evaluate import evaluate_scorer

    items = load_items(prep_dir)
    val = load_split(prep_dir, "val")
    if len(val) == 0:
        raise NoValidationData(f"{prep_dir} has an empty val split: champion promotion compares models on "
                               f"validation data only (set data.val_baskets >= 1 and re-run prep)")
    scorer = rec.fusion if rec.fusion is not None else rec.model  # what the recommender serves
    if list(items.item_id.astype(str)) != rec.item_ids:  # other catalog: re-index it with this model (alone)
        ids, mask = padded_tokens(items)
        rec.model.index_items(torch.as_tensor(ids), torch.as_tensor(mask))
        scorer = rec.model
    m = evaluate_scorer(scorer, val, n_items=len(items), ks=[10], history_len=history_len or rec.history_len)
    return float(m["ndcg@10"])


def validation_bundle_f1(rec, prep_dir: str, history_len: Optional[int] = None) -> float:
    """Best-Jaccard F1 of the bundles a Recommender serves for the val baskets' histories
    (bundlerec.eval.engine_fit's protocol)."""
    from bundlerec.eval.engine_fit import basket_queries, generation_values, served_bundles
    from bundlerec.bundles.matching import prf

    queries = basket_queries(prep_dir, "val")
    if not queries:
        raise NoValidationData(f"{prep_dir} has no validation baskets of >= 2 items: the bundle_f1 gate needs them")
    return float(prf(*generation_values(served_bundles(rec, queries), queries)["triplets"].sum(0))["f1"])


def validation_completion_recall(rec, prep_dir: str, history_len: Optional[int] = None) -> float:
    """Recall@10 of the bundle engine's completion (what ``/v1/bundles/complete`` answers) on a bundle
    export's val split: each validation bundle's first item -> the rest (bundlerec.eval.bundles)."""
    from bundlerec.eval.bundle_scoring import completion_values
    from bundlerec.data.catalog import load_items
    from bundlerec.data.examples import load_split

    val = load_split(prep_dir, "val")
    if len(val) == 0:
        raise NoValidationData(f"{prep_dir} has an empty val split: the completion_recall@10 gate needs validation bundles")
    ids = load_items(prep_dir).set_index("item_idx").item_id.astype(str)  # by id: a champion's catalog may differ
    pos = lambda xs: [rec.item_pos[ids[int(i)]] for i in xs if ids[int(i)] in rec.item_pos]  # noqa: E731
    queries = [(c, t) for c, t in ((pos(h), pos(t)) for h, t in zip(val.hist_items, val.targets)) if c and t]
    return float(completion_values(rec.bundle_engine, queries)["recall@10"].mean()) if queries else 0.0


SCORERS = {"ndcg@10": validation_ndcg, "bundle_f1": validation_bundle_f1,
           "completion_recall@10": validation_completion_recall}


def score_tag(metric: str) -> str:
    """The model-version tag that holds a version's score on ``metric`` (``val_ndcg_at_10``, ``val_bundle_f1``)."""
    return "val_" + metric.replace("@", "_at_")


def current_champion(client, model_name: str):
    """The champion's model version, or None when there is none yet (no such model, or no alias).
    Any other registry error (server fault, permissions, ...) is raised: promoting without the
    comparison would let a worse model through."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, "champion")
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or (
                e.error_code == "INVALID_PARAMETER_VALUE" and "alias" in str(e).lower() and "not found" in str(e).lower()):
            return None
        raise


def validation_data_id(prep_dir: str, history_len: Optional[int], metric: str = "ndcg@10") -> str:
    """Which validation data (and metric) a score was computed on: scores tagged with the same id compare."""
    import hashlib

    from bundlerec.storage import join, read_text

    text = read_text(join(prep_dir, "manifest.json")) + f"|history_len={history_len}" + \
        ("" if metric == "ndcg@10" else f"|metric={metric}")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


EXPORT_DIGEST_TAG = "bundlerec.export_digest"
"""Model-version tag: :func:`bundlerec.integrity.manifest_digest` of the registered export, written by
:func:`register` (the training identity, the only one that may write the model's tags)."""


def export_dir_of(model_dir: str) -> str:
    """Where a downloaded registered model keeps the export: the path of the pyfunc's ``export``
    artifact in its MLmodel file (read as data), which must lie inside ``model_dir``."""
    import yaml

    try:
        with open(os.path.join(model_dir, "MLmodel")) as f:
            rel = yaml.safe_load(f)["flavors"]["python_function"]["artifacts"]["export"]["path"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        raise ValueError(f"{model_dir}: not a bundlerec model (its MLmodel names no export artifact: {e})") from None
    root = os.path.realpath(model_dir)
    path = os.path.realpath(os.path.join(root, str(rel)))
    if not path.startswith(root + os.sep):
        raise ValueError(f"{model_dir}: its MLmodel points the export outside the model ({rel})")
    return path


def load_verified(model_dir: str, pinned: Optional[str], user_key: Optional[bytes] = None):
    """The :class:`~bundlerec.inference.recommender.Recommender` of a downloaded registered model, with
    no code of the model run: only its export is read, and only after its manifest's digest equals
    ``pinned`` (the version's :data:`EXPORT_DIGEST_TAG`), then every file against the manifest.
    Raises ValueError for a version without a pinned digest or with another export than the one
    registered (files changed and the manifest recomputed, or the manifest replaced)."""
    from bundlerec.integrity import manifest_digest
    from bundlerec.inference.recommender import Recommender

    export = export_dir_of(model_dir)
    if not pinned:
        raise ValueError(f"{model_dir}: the version has no {EXPORT_DIGEST_TAG} tag (not registered by bundlerec's "
                         "register, or before digests were pinned): re-register it")
    try:
        got = manifest_digest(export)
    except OSError as e:
        raise ValueError(f"{export}: no export manifest ({e})") from None
    if got != pinned:
        raise ValueError(f"{export}: the export is not the one registered (manifest digest {got[:12]}, "
                         f"pinned {pinned[:12]})")
    return Recommender.from_export(export, user_key)  # every file against the manifest


def _score_on(client, model_name: str, mv, data_id: str, prep_dir: str, history_len: Optional[int],
              cache: dict, metric: str = "ndcg@10") -> float:
    """A version's val ``metric`` on ``data_id``: its tag when it was scored on that data, else re-scored
    (its export loaded by :func:`load_verified`: no code from the registry runs here)."""
    if mv.tags.get("val_data") == data_id and score_tag(metric) in mv.tags:
        return float(mv.tags[score_tag(metric)])
    if mv.version not in cache:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}/{mv.version}")
        rec = load_verified(local, mv.tags.get(EXPORT_DIGEST_TAG))
        cache[mv.version] = SCORERS[metric](rec, prep_dir, history_len)
    return cache[mv.version]


def set_alias(client, model_name: str, alias: str, version: str, tries: int = 5) -> None:
    """Set an alias; a write that collides with a concurrent one (MLflow's server inserts the alias
    row, so two writers at once can get a unique-constraint error) is retried after a short pause."""
    import time

    from mlflow.exceptions import MlflowException

    for attempt in range(tries):
        try:
            client.set_registered_model_alias(model_name, alias, version)
            return
        except MlflowException as e:
            if attempt == tries - 1 or not any(w in str(e) for w in ("UNIQUE", "IntegrityError", "unique", "duplicate")):
                raise
            log.warning("registry: %s@%s write collided with a concurrent one; retrying", model_name, alias)
            time.sleep(0.2 * (attempt + 1))


def settle_champion(client, model_name: str, data_id: str, prep_dir: str, history_len: Optional[int],
                    rounds: int = 10, metric: str = "ndcg@10") -> tuple[object, float, Optional[object]]:
    """Move ``champion`` to the best version scored on ``data_id`` (or keep the current champion when
    none beats it), then read it back; repeat until what was read is what the evidence says.

    MLflow has no compare-and-set on aliases, so two registrations racing could each read the old
    champion and the slower one overwrite the better model. Every registrant tags its version with
    its score *before* it calls this, and every write here is followed by a read of all scored
    versions: whichever registrant writes last reads every version tagged before that read, so the
    race ends with the best model as champion whatever the interleaving (tests/test_registry_serve.py).
    Returns (champion version, its score, the champion before the first move or None)."""
    cache: dict = {}
    first = ()
    for _ in range(rounds):
        champ = current_champion(client, model_name)
        first = (champ,) if first == () else first
        scored = [mv for mv in client.search_model_versions(f"name='{model_name}'")
                  if mv.tags.get("val_data") == data_id and score_tag(metric) in mv.tags]
        pool = {mv.version: mv for mv in scored}
        if champ is not None:
            pool[champ.version] = champ
        score = {v: _score_on(client, model_name, mv, data_id, prep_dir, history_len, cache, metric)
                 for v, mv in pool.items()}
        held = champ.version if champ is not None else None
        # strictly better moves it; on a tie the current champion stays, then the older version wins
        best = max(pool, key=lambda v: (score[v], v == held, -int(v)))
        if best == held:
            return champ, score[best], first[0]
        set_alias(client, model_name, "champion", best)
    raise RuntimeError(f"{model_name}: champion alias still moving after {rounds} rounds (concurrent registrations?)")


def register(export_dir: str, prep_dir: str, tracking_uri: str, experiment: str, run_id: Optional[str] = None,
             model_name: str = MODEL_NAME, history_len: Optional[int] = None, primary_metric: str = "ndcg@10",
             ranks_as=None) -> dict:
    """Log ``export_dir`` as a pyfunc, register a new version, then settle champion/challenger on
    validation merit in ``primary_metric`` (:data:`SCORERS`, :func:`settle_champion`). Returns a
    summary. A torn or altered export is refused before anything is registered (bundlerec.integrity).
    ``ranks_as``: a registered version whose ranking the export shares (a repricing): its validation
    evidence is taken, not recomputed, so the tie keeps the incumbent."""
    from bundlerec.tracking import check_server
    from bundlerec.inference.recommender import Recommender

    from bundlerec.integrity import checkout

    check_server(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    export_dir = checkout(export_dir, "export")  # an object-store export: a verified local copy
    cand = Recommender.from_export(export_dir)  # verifies the export's manifest
    if primary_metric not in SCORERS:
        raise ValueError(f"primary_metric must be one of {sorted(SCORERS)}, not {primary_metric!r}")
    if ranks_as is not None and ranks_as.tags.get("val_data") and score_tag(primary_metric) in ranks_as.tags:
        data_id, cand_score = ranks_as.tags["val_data"], float(ranks_as.tags[score_tag(primary_metric)])
    else:
        cand_score = SCORERS[primary_metric](cand, prep_dir, history_len)
        data_id = validation_data_id(prep_dir, history_len, primary_metric)
    label = f"val {primary_metric}"

    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else "register"):
        info = mlflow.pyfunc.log_model(name="pyfunc", registered_model_name=model_name, **model_kwargs(cand, export_dir))
        source_run = mlflow.active_run().info.run_id
    version = str(info.registered_model_version)
    from bundlerec.integrity import manifest_digest

    # the export's digest pinned first: replicas load nothing else under this version
    client.set_model_version_tag(model_name, version, EXPORT_DIGEST_TAG, manifest_digest(export_dir))
    # the evidence first (tags), then the alias: a racing registrant reads this score
    client.set_model_version_tag(model_name, version, "val_data", data_id)
    client.set_model_version_tag(model_name, version, score_tag(primary_metric), f"{cand_score:.6f}")
    client.set_model_version_tag(model_name, version, "primary_metric", primary_metric)
    champion, champ_score, before = settle_champion(client, model_name, data_id, prep_dir, history_len,
                                                    metric=primary_metric)
    if champion.version == version:
        alias = "champion"
        reason = ("first registered version" if before is None or before.version == version else
                  f"{label} {cand_score:.4f} beats champion v{before.version}")
    else:
        alias = "challenger"
        reason = (f"{label} {cand_score:.4f} does not beat champion v{champion.version} "
                  f"({champ_score:.4f}) on the same validation data")
        set_alias(client, model_name, alias, version)
    client.set_model_version_tag(model_name, version, "alias_reason", reason)
    client.update_model_version(model_name, version, description=reason)
    log.info("registry: %s v%s -> %s (%s)", model_name, version, alias, reason)
    return {"model_name": model_name, "version": version, "alias": alias, "reason": reason,
            "primary_metric": primary_metric, score_tag(primary_metric): cand_score,
            f"champion_{score_tag(primary_metric)}": champ_score,
            "champion_version": str(champion.version),
            "model_uri": f"models:/{model_name}/{version}", "run_id": source_run}
