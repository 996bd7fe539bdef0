"""The price stage: the bundle-pricing model fitted on ``cfg.pricing.data_dir`` into a trained export
(:func:`attach_pricing`); train and tune call it as their own step (:func:`pricing_step`), or the
pipeline's ``price`` stage does (:func:`run_price_stage`, also ``jobs.price``)."""

from __future__ import annotations

import json
import logging
import time

from bundlerec import integrity
from bundlerec.config import PipelineConfig
from bundlerec.storage import exists, read_text, write_text

log = logging.getLogger(__name__)


def require_pricing_data(cfg: PipelineConfig) -> None:
    """Before any compute is spent: a set ``pricing.data_dir`` that a stage will fit on holds the Steam
    bundles format (otherwise the error would come after training, from the pricing step)."""
    from bundlerec.storage import join

    if cfg.pricing.data_dir and {"train", "tune", "price"} & set(cfg.stages) \
            and not exists(join(cfg.pricing.data_dir, "bundles.csv.gz")):
        raise FileNotFoundError(f"pricing.data_dir={cfg.pricing.data_dir!r} has no bundles.csv.gz (the steam_bundles "
                                "format); point it at a steam_bundles folder (an absolute path, or one relative to "
                                "output_root) or set pricing.data_dir=null")


def attach_pricing(cfg: PipelineConfig, export_dir: str) -> dict:
    """The price stage: the bundle-pricing model fitted on ``cfg.pricing.data_dir`` (Steam bundles
    format), cross-validated there (:func:`bundlerec.eval.pricing.evaluate_pricing`), and saved into
    the export that will be registered and served (verified before, re-sealed after). With no data
    the export keeps no model and serving says price_source "default"."""
    if not cfg.pricing.data_dir:
        return {"source": "default"}
    from bundlerec.eval.pricing import evaluate_pricing
    from bundlerec.integrity import amend
    from bundlerec.pricing.steam import fit_steam

    data_dir, s = cfg.pricing.data_dir, cfg.pricing.s
    cv = evaluate_pricing(data_dir, s=s, robustness=False)
    model, meta = fit_steam(data_dir, s=s)
    meta.update({"cv_folds": cv["folds"], "cv_discount_mae": cv["discount_mae"]["bundlerec"],
                 "cv_discount_mae_median_baseline": cv["discount_mae"]["median"]})
    with amend(export_dir, "export"):
        model.save(export_dir, meta)
    info = {"source": "transferred", **meta}
    log.info("pricing: fitted on %d Steam bundles, cv discount MAE %.4f (median baseline %.4f)",
             info["n_bundles"], info["cv_discount_mae"], info["cv_discount_mae_median_baseline"])
    return info


def pricing_step(cfg: PipelineConfig, export_dir: str) -> dict:
    """train's and tune's pricing: :func:`attach_pricing` here, unless the pipeline lists the price
    stage, which then fits it (once per pipeline)."""
    return {"source": "the price stage"} if "price" in cfg.stages else attach_pricing(cfg, export_dir)


def run_price_stage(cfg: PipelineConfig, results: dict | None = None) -> dict:
    """The price stage: the pricing model fitted into the export of ``results`` (default: the
    ``results_path`` of the last train or tune run), re-sealed and, for an object-store export,
    published again; results.json and the run's MLflow metrics (``pricing/*``) say what was fitted."""
    import mlflow
    from mlflow.entities import Metric

    if results is None:
        if not exists(cfg.results_path):
            raise FileNotFoundError(f"{cfg.results_path}: no results of a train or tune run to price; run one first "
                                    f"(stages: [prep, train, price, ...])")
        results = json.loads(read_text(cfg.results_path))
    target = results["export_dir"]
    local = integrity.checkout(target, "the export to price")
    results["pricing"] = attach_pricing(cfg, local)
    integrity.publish(local, target)
    write_text(cfg.results_path, json.dumps(results, indent=2, default=str))
    pricing = results["pricing"]
    if results.get("run_id") and pricing.get("source") == "transferred":
        mlflow.MlflowClient(cfg.mlflow.tracking_uri).log_batch(results["run_id"], metrics=[
            Metric(f"pricing/{k}", float(pricing[k]), int(time.time() * 1000), 0)
            for k in ("cv_discount_mae", "cv_discount_mae_median_baseline", "n_bundles") if k in pricing])
    print(f"[bundlerec] price: {pricing.get('source')} pricing in {target}", flush=True)
    return results

