"""The registered model format: an MLflow pyfunc over one serving export.

    mlflow.pyfunc.load_model("models:/bundlerec@champion").predict(events_df, params={"k": 10})

It wraps the same inference core as the Serve app (:class:`bundlerec.inference.recommender.Recommender`),
so what the registry holds, the endpoint serves.
"""

from __future__ import annotations

import json
from typing import Optional

import mlflow
import numpy as np
import pandas as pd
import torch

from bundlerec.bundles.generate import BundleConstraints
from bundlerec.pricing.demand import PriceLimits

_DEFAULT_BUNDLE = BundleConstraints()

PREDICT_COLUMNS = ["user_id", "rank", "item_id", "score", "title", "price", "cold_start"]
BUNDLE_COLUMNS = ["user_id", "bundle_rank", "name", "item_ids", "list_price", "bundle_price", "discount", "price_source", "cold_start"]
COMPLETE_COLUMNS = ["user_id", "rank", "item_id", "score", "title", "price", "reason"]
PARAMS = {"k": 10, "output": "items", "n": _DEFAULT_BUNDLE.n, "max_size": _DEFAULT_BUNDLE.max_size, "budget": 0.0,
          "max_discount": _DEFAULT_BUNDLE.limits.max_discount, "min_margin": _DEFAULT_BUNDLE.limits.min_margin,
          "price_ending": -1.0, "query": ""}  # price_ending < 0: none; query "": bundles from the history alone


class BundlerecPyfunc(mlflow.pyfunc.PythonModel):
    """``predict`` takes a DataFrame of events and returns top-k recommendations per user.

    Input columns: ``user_id`` and optionally ``item_id, event_type, event_time``. Rows of a user
    with events are that user's live session; a user with only a ``user_id`` row (item_id null) is
    looked up in the training snapshot. Output: one row per (user, rank); with
    ``params={"output": "bundles", "n": 3, "max_size": 4, "budget": 0}`` one row per priced bundle
    (price limits: ``max_discount``, ``min_margin``, ``price_ending``, as in ``POST /v1/bundles``; a
    ``query`` param combines a shopper's description with each user's history, as the endpoint does);
    with ``params={"output": "complete"}`` each user's ``item_id`` rows are a cart and the rows are the
    k items that complete it (the bundle engine's completion, as ``jobs.eval_bundles`` measures it).
    """

    def load_context(self, context) -> None:
        """User ids are pseudonymized in the export: with $BUNDLEREC_USER_KEY_FILE (the key file,
        serve.user_key_file) a ``user_id`` finds its history; without it only ``"pseudo:<hex>"`` ids
        and rows with events do."""
        import logging
        import os

        from bundlerec.privacy import read_user_key
        from bundlerec.inference.recommender import Recommender

        key_file = os.environ.get("BUNDLEREC_USER_KEY_FILE")
        self.rec = Recommender.from_export(context.artifacts["export"], read_user_key(key_file) if key_file else None)
        if self.rec.pseudonymized and not key_file:
            logging.getLogger(__name__).warning(
                "bundlerec pyfunc: user ids are pseudonymized and $BUNDLEREC_USER_KEY_FILE is not set: "
                "users are found by pseudonym (pseudo:<hex>) only; send events for the others")

    def predict(self, context, model_input: pd.DataFrame, params: Optional[dict] = None) -> pd.DataFrame:
        k = int((params or {}).get("k", 10))
        df = model_input.copy()
        if "user_id" not in df:
            raise ValueError("model input needs a user_id column")
        p = {**PARAMS, **(params or {})}
        if p["output"] == "complete":
            if "item_id" not in df:
                raise ValueError('output "complete" needs an item_id column (the cart)')
            rows = []
            for uid, g in df.dropna(subset=["item_id"]).groupby("user_id", sort=False):
                for r, item in enumerate(self.rec.complete(g["item_id"].astype(str).tolist(), k)["items"], 1):
                    rows.append((uid, r, item["item_id"], item["score"], item["title"], item["price"], item["reason"]))
            return pd.DataFrame(rows, columns=COMPLETE_COLUMNS)
        users, histories = [], []
        for uid, g in df.groupby("user_id", sort=False):
            ev = g.dropna(subset=["item_id"]) if "item_id" in g else g.iloc[0:0]
            if len(ev):
                histories.append(self.rec.history_from_events(ev[["item_id", "event_type", "event_time"]].to_dict("records")))
            else:
                histories.append(self.rec.history_for_user(str(uid)))
            users.append(uid)
        if p["output"] == "bundles":
            rows = []
            for uid, h in zip(users, histories):
                limits = PriceLimits(float(p["max_discount"]), float(p["min_margin"]),
                                     float(p["price_ending"]) if float(p["price_ending"]) >= 0 else None)
                for r, b in enumerate(self.rec.bundles(h, n=int(p["n"]), max_size=int(p["max_size"]),
                                                       budget=float(p["budget"]) or None, limits=limits,
                                                       query=str(p["query"]).strip() or None), 1):
                    rows.append((uid, r, b["name"], json.dumps([i["item_id"] for i in b["items"]]), b["list_price"],
                                 b["bundle_price"], b["discount"], b["price_source"], not h.items))
            return pd.DataFrame(rows, columns=BUNDLE_COLUMNS)
        rows = []
        for uid, h, ranked in zip(users, histories, self.rec.recommend_histories(histories, k)):
            for r, item in enumerate(self.rec.describe(ranked), 1):
                rows.append((uid, r, item["item_id"], item["score"], item["title"], item["price"], not h.items))
        return pd.DataFrame(rows, columns=PREDICT_COLUMNS)


def model_kwargs(rec, export_dir: str) -> dict:
    """The arguments of ``mlflow.pyfunc.log_model`` / ``save_model`` for the export ``rec`` was
    loaded from: models from code (this package's ``pyfunc_model.py`` + bundlerec's code + the export,
    never a pickle), the signature inferred on an example of two events."""
    import os

    from mlflow.models import infer_signature

    import bundlerec

    example = pd.DataFrame({"user_id": ["u1", "u1"], "item_id": [rec.item_ids[0], rec.item_ids[1]],
                            "event_type": ["view", "cart"],
                            "event_time": ["2026-01-01T10:00:00Z", "2026-01-01T10:05:00Z"]})
    pyfunc = BundlerecPyfunc()
    pyfunc.rec = rec
    signature = infer_signature(example, pyfunc.predict(None, example, {"k": 10}), params=PARAMS)
    return {"python_model": os.path.join(os.path.dirname(__file__), "pyfunc_model.py"), "artifacts": {"export": export_dir},
            "code_paths": [os.path.dirname(bundlerec.__file__)], "signature": signature,
            "input_example": (example, {"k": 10}),  # shown in the UI; `mlflow models serve` docs
            "pip_requirements": _requirements()}


def _requirements() -> list[str]:
    import pyarrow
    import transformers

    return [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
            f"mlflow=={mlflow.__version__}", f"pyarrow=={pyarrow.__version__}", f"pandas=={pd.__version__}",
            f"numpy=={np.__version__}"]
