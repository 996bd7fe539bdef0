"""MLflow Model Registry: log an export as a pyfunc model, register it, move aliases on merit.

The alias ``champion`` moves to a new version only if it beats the current champion on the same
validation data (NDCG@10, both re-scored on this prep snapshot's val split); otherwise the new
version becomes ``challenger`` and the reason is recorded on the version. Aliases, not stages.

    mlflow.pyfunc.load_model("models:/bundlerec@champion").predict(events_df, params={"k": 10})
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

import mlflow
import numpy as np
import pandas as pd
import torch

log = logging.getLogger(__name__)

MODEL_NAME = "bundlerec"
PREDICT_COLUMNS = ["user_id", "rank", "item_id", "score", "title", "price", "cold_start"]
BUNDLE_COLUMNS = ["user_id", "bundle_rank", "name", "item_ids", "list_price", "bundle_price", "discount", "cold_start"]
PARAMS = {"k": 10, "output": "items", "n": 3, "max_size": 4, "budget": 0.0}


class BundlerecPyfunc(mlflow.pyfunc.PythonModel):
    """``predict`` takes a DataFrame of events and returns top-k recommendations per user.

    Input columns: ``user_id`` and optionally ``item_id, event_type, event_time``. Rows of a user
    with events are that user's live session; a user with only a ``user_id`` row (item_id null) is
    looked up in the training snapshot. Output: one row per (user, rank); with
    ``params={"output": "bundles", "n": 3, "max_size": 4, "budget": 0}`` one row per priced bundle.
    """

    def load_context(self, context) -> None:
        from bundlerec.recommend import Recommender

        self.rec = Recommender.from_export(context.artifacts["export"])

    def predict(self, context, model_input: pd.DataFrame, params: Optional[dict] = None) -> pd.DataFrame:
        k = int((params or {}).get("k", 10))
        df = model_input.copy()
        if "user_id" not in df:
            raise ValueError("model input needs a user_id column")
        users, histories = [], []
        for uid, g in df.groupby("user_id", sort=False):
            ev = g.dropna(subset=["item_id"]) if "item_id" in g else g.iloc[0:0]
            if len(ev):
                histories.append(self.rec.history_from_events(ev[["item_id", "event_type", "event_time"]].to_dict("records")))
            else:
                histories.append(self.rec.history_for_user(str(uid)))
            users.append(uid)
        p = {**PARAMS, **(params or {})}
        if p["output"] == "bundles":
            rows = []
            for uid, h in zip(users, histories):
                for r, b in enumerate(self.rec.bundles(h, n=int(p["n"]), max_size=int(p["max_size"]),
                                                       budget=float(p["budget"]) or None), 1):
                    rows.append((uid, r, b["name"], json.dumps([i["item_id"] for i in b["items"]]), b["list_price"],
                                 b["bundle_price"], b["discount"], not h.items))
            return pd.DataFrame(rows, columns=BUNDLE_COLUMNS)
        rows = []
        for uid, h, ranked in zip(users, histories, self.rec.recommend_histories(histories, k)):
            for r, item in enumerate(self.rec.describe(ranked), 1):
                rows.append((uid, r, item["item_id"], item["score"], item["title"], item["price"], not h.items))
        return pd.DataFrame(rows, columns=PREDICT_COLUMNS)


def validation_ndcg(rec, prep_dir: str, history_len: int) -> float:
    """NDCG@10 of a Recommender on this prep snapshot's val split (test if val is empty)."""
    from bundlerec.catalog import load_items, padded_tokens
    from bundlerec.evaluate import evaluate_scorer, load_split

    items = load_items(prep_dir)
    val = load_split(prep_dir, "val")
    if len(val) == 0:
        val = load_split(prep_dir, "test")
    if list(items.item_id.astype(str)) != rec.item_ids:  # other catalog: re-index it with this model
        ids, mask = padded_tokens(items)
        rec.model.index_items(torch.as_tensor(ids), torch.as_tensor(mask))
    m = evaluate_scorer(rec.model, val, n_items=len(items), ks=[10], history_len=history_len)
    return float(m["ndcg@10"])


def _requirements() -> list[str]:
    import pyarrow
    import transformers

    return [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
            f"mlflow=={mlflow.__version__}", f"pyarrow=={pyarrow.__version__}", f"pandas=={pd.__version__}",
            f"numpy=={np.__version__}"]


def register(export_dir: str, prep_dir: str, tracking_uri: str, experiment: str, run_id: Optional[str] = None,
             model_name: str = MODEL_NAME, history_len: int = 10) -> dict:
    """Log ``export_dir`` as a pyfunc, register a new version, set champion/challenger. Returns a summary."""
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature

    import bundlerec
    from bundlerec.recommend import Recommender
    from bundlerec.tracking import check_server

    check_server(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    cand = Recommender.from_export(export_dir)
    cand_score = validation_ndcg(cand, prep_dir, history_len)

    champion, champ_score = None, None
    try:
        champion = client.get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        pass
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
