"""Promotion in the MLflow Model Registry: register an export as a pyfunc, move aliases on merit.

The alias ``champion`` moves to a new version only if it beats the current champion on the same
validation data (NDCG@10, both re-scored on this prep snapshot's val split); otherwise the new
version becomes ``challenger`` and the reason is recorded on the version. Aliases, not stages.

    mlflow.pyfunc.load_model("models:/bundlerec@champion").predict(events_df, params={"k": 10})
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import mlflow
import pandas as pd
import torch

from bundlerec.registry.pyfunc import PARAMS, BundlerecPyfunc, _requirements

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
    if list(items.item_id.astype(str)) != rec.item_ids:  # other catalog: re-index it with this model
        ids, mask = padded_tokens(items)
        rec.model.index_items(torch.as_tensor(ids), torch.as_tensor(mask))
    m = evaluate_scorer(rec.model, val, n_items=len(items), ks=[10], history_len=history_len or rec.history_len)
    return float(m["ndcg@10"])


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


def register(export_dir: str, prep_dir: str, tracking_uri: str, experiment: str, run_id: Optional[str] = None,
             model_name: str = MODEL_NAME, history_len: Optional[int] = None) -> dict:
    """Log ``export_dir`` as a pyfunc, register a new version, set champion/challenger. Returns a summary."""
    from mlflow.models import infer_signature

    import bundlerec
    from bundlerec.tracking import check_server
    from bundlerec.serving.recommender import Recommender

    check_server(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    cand = Recommender.from_export(export_dir)
    cand_score = validation_ndcg(cand, prep_dir, history_len)

    champ_score = None
    champion = current_champion(client, model_name)
    if champion is not None:
        champ = mlflow.pyfunc.load_model(f"models:/{model_name}@champion").unwrap_python_model().rec
        champ_score = validation_ndcg(champ, prep_dir, history_len)

    example = pd.DataFrame({"user_id": ["u1", "u1"], "item_id": [cand.item_ids[0], cand.item_ids[1]],
                            "event_type": ["view", "cart"],
                            "event_time": ["2026-01-01T10:00:00Z", "2026-01-01T10:05:00Z"]})
    pyfunc = BundlerecPyfunc()
    pyfunc.rec = cand
    signature = infer_signature(example, pyfunc.predict(None, example, {"k": 10}), params=PARAMS)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else "register"):
        info = mlflow.pyfunc.log_model(
            name="pyfunc", python_model=BundlerecPyfunc(), artifacts={"export": export_dir},
            code_paths=[os.path.dirname(bundlerec.__file__)], signature=signature,
            input_example=(example, {"k": 10}),  # shown in the UI; `mlflow models serve` docs
            registered_model_name=model_name, pip_requirements=_requirements())
        source_run = mlflow.active_run().info.run_id
    version = str(info.registered_model_version)
    if champ_score is None or cand_score > champ_score:
        alias = "champion"
        reason = ("first registered version" if champ_score is None else
                  f"val ndcg@10 {cand_score:.4f} beats champion v{champion.version} ({champ_score:.4f})")
    else:
        alias = "challenger"
        reason = (f"val ndcg@10 {cand_score:.4f} does not beat champion v{champion.version} "
                  f"({champ_score:.4f}) on the same validation data")
    client.set_registered_model_alias(model_name, alias, version)
    client.set_model_version_tag(model_name, version, "val_ndcg_at_10", f"{cand_score:.6f}")
    client.set_model_version_tag(model_name, version, "alias_reason", reason)
    client.update_model_version(model_name, version, description=reason)
    log.info("registry: %s v%s -> %s (%s)", model_name, version, alias, reason)
    return {"model_name": model_name, "version": version, "alias": alias, "reason": reason,
            "val_ndcg_at_10": cand_score, "champion_val_ndcg_at_10": champ_score,
            "champion_version": version if alias == "champion" else champion.version,
            "model_uri": f"models:/{model_name}/{version}", "run_id": source_run}
