"""Stage functions the jobs call (and the tests call the same ones).

* :func:`run_train_stage` -- MLflow run, Ray Train fit, export, pricing, the engine fitted on
  validation baskets (:func:`fit_engine_stage`), test evaluation with baselines;
* :func:`run_pipeline`    -- the configured stages; writes ``results.json`` and ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np

from bundlerec.config import PipelineConfig, config_hash, flatten, to_dict
from bundlerec import integrity
from bundlerec.price import pricing_step, require_pricing_data
from bundlerec.runtime import versions
from bundlerec.storage import absolute, exists, is_uri, join, parent, read_text, write_text

log = logging.getLogger(__name__)

SUMMARY_METRICS = ("ndcg@10", "recall@10", "mrr@10", "hitrate@10", "ndcg@20", "recall@20", "coverage@10")


def require_prep(cfg: PipelineConfig) -> dict:
    """The prep manifest, or a clear error saying how to produce it; checked against the config."""
    from bundlerec.data.examples import check_prepared

    path = join(cfg.data.output_dir, "manifest.json")
    try:
        manifest = json.loads(read_text(path))
    except (FileNotFoundError, OSError):
        raise FileNotFoundError(f"no prepared data at {cfg.data.output_dir} ({path} missing): run "
                                f"`python -m jobs.prep` with the same config first, or jobs.pipeline") from None
    from bundlerec.data.catalog import _tokenizer, tokenizer_fingerprint

    check_prepared(manifest, cfg.data.history_len, tokenizer_fingerprint(_tokenizer(cfg.model.name_or_path)))
    return manifest


def fit_engine_stage(cfg: PipelineConfig, export_dir: str, run_id: str) -> dict:
    """The fit step: the served engine's parameters chosen on the prep's validation baskets
    (:mod:`bundlerec.eval.engine_fit`), written into the local export ``export_dir`` (re-sealed), the
    selection record logged to the MLflow run (``fit/selection.json``, metrics ``fit/*``)."""
    import mlflow

    from bundlerec.eval.engine_fit import fit_engine

    t = time.time()
    with integrity.amend(export_dir, "export"):
        selection = fit_engine(export_dir, cfg.data.output_dir, cfg.train.seed)
    selection["seconds"] = round(time.time() - t, 1)
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    client.log_dict(run_id, selection, "fit/selection.json")
    sel = selection["params"]["selection"]
    for k in ("completion_val_recall@10", "generation_val_f1"):
        if k in sel:
            client.log_metric(run_id, f"fit/{k.replace('@', '_at_')}", sel[k])
    print(f"fit: engine chosen on {selection.get('val_baskets', 0)} validation baskets "
          f"(completion {selection['params']['completion']}, compat {selection['params']['compat']}, "
          f"generation {selection['params']['generation']})", flush=True)
    return selection


def evaluate_and_log(cfg: PipelineConfig, export_dir: str, run_id: str, extra: dict | None = None,
                     local: str | None = None) -> dict:
    """Test metrics of the export and of every baseline -> results.json + the MLflow run.
    ``export_dir`` is where the export is kept (recorded in results.json; may be an object-store
    URI), ``local`` a verified local copy of it (checked out when not given)."""
    from bundlerec.eval.evaluate import evaluate_run, format_table, lifts
    from bundlerec.tracking import log_results

    local = local or integrity.checkout(export_dir, "export")
    prep_dir = cfg.data.output_dir
    manifest = json.loads(read_text(join(prep_dir, "manifest.json")))
    t = time.time()
    per_example: dict = {}
    metrics = evaluate_run(prep_dir, local, cfg, split="test", per_example=per_example)
    print("\n" + format_table(metrics, SUMMARY_METRICS) + "\n", flush=True)
    lift = lifts(per_example, seed=cfg.train.seed)
    for m, v in lift.items():
        print(f"bundlerec vs {m:<9} " + "  ".join(f"{k} {x['lift']:+.1%} [{x['ci'][0]:+.1%}, {x['ci'][1]:+.1%}]"
                                                for k, x in v.items()), flush=True)
    bundles = log_generation(cfg, local, run_id)
    results = {"run_id": run_id, "experiment": cfg.mlflow.experiment, "mlflow_url": cfg.mlflow.tracking_uri,
               "export_dir": export_dir, "metrics": metrics, "lift": lift, "bundles": bundles,
               "eval_seconds": time.time() - t,
               "manifest": {k: manifest[k] for k in ("rows", "examples", "schema_hash")}, **(extra or {})}
    write_text(cfg.results_path, json.dumps(results, indent=2, default=str))  # atomic: the next stage reads it
    log_results(cfg.mlflow.tracking_uri, run_id, metrics, local,
                files={"results": cfg.results_path, "prep": join(prep_dir, "manifest.json")})
    import mlflow

    from bundlerec.tracking import mlflow_name

    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    for m, v in lift.items():  # test/lift/<method>/<metric>[_ci95_lo|hi]: bundlerec's paired lift over it
        for k, x in v.items():
            for suffix, val in (("", x["lift"]), ("_ci95_lo", x["ci"][0]), ("_ci95_hi", x["ci"][1])):
                client.log_metric(run_id, f"test/lift/{m}/{mlflow_name(k)}{suffix}", val)
    results["report"] = log_report(cfg, run_id, local, metrics)
    return results


def log_generation(cfg: PipelineConfig, export_dir: str, run_id: str) -> dict:
    """Personalized generation on the test baskets as ``/v1/bundles`` serves it, against the
    baselines (:func:`bundlerec.eval.engine_fit.evaluate_generation`): printed, in the MLflow run
    (``bundles/generation.json``, metrics ``test_bundles/<method>/<metric>``)."""
    import mlflow

    from bundlerec.eval.engine_fit import evaluate_generation

    res = evaluate_generation(export_dir, cfg.data.output_dir, "test", cfg.train.seed)
    if not res.get("baskets"):
        return res
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    client.log_dict(run_id, res, "bundles/generation.json")
    print(f"personalized bundles on {res['baskets']} test baskets (history -> purchased basket, 95 % bootstrap):")
    for m, v in res["methods"].items():
        for k in ("f1", "best_jaccard", "contained_precision", "coverage"):
            if k in v:
                client.log_metric(run_id, f"test_bundles/{m}/{k}", v[k])
        ci = v["best_jaccard_ci"]
        print(f"  {m:<15} F1 {v['f1']:.4f}  best Jaccard {v['best_jaccard']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]  "
              f"contained {v['contained_precision']:.3f}  coverage {v['coverage']:.3f}  "
              f"seen share {v['leak_gate']['seen_share_generated']}", flush=True)
    lift = res["lift"]["best_jaccard"]
    print(f"  lift over {res['lift']['vs']}: {lift['lift']:+.1%} [{lift['ci'][0]:+.1%}, {lift['ci'][1]:+.1%}]\n", flush=True)
    return res


def log_report(cfg: PipelineConfig, run_id: str, export_dir: str, metrics: dict) -> str:
    """The run's evaluation report (bundlerec.report) -> MLflow artifacts ``report/``; returns
    the local report.html path (beside results.json). The curves come from the run's own metrics in
    MLflow (a train run, or the best trial's child run of a sweep)."""
    import mlflow

    from bundlerec.data.examples import load_split
    from bundlerec.privacy import read_user_key
    from bundlerec.report import example_users, write_report

    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    steps = [(m.step, m.value) for m in client.get_metric_history(run_id, "step/train_loss")]
    per_epoch: dict[int, dict] = {}
    for key in ("train_loss", "val_ndcg_at_10", "val_recall_at_10", "step"):
        for m in client.get_metric_history(run_id, key):  # the redone epoch of a resumed run: the last value
            per_epoch.setdefault(m.step, {"epoch": m.step})[key] = m.value
    history = [per_epoch[e] for e in sorted(per_epoch) if "train_loss" in per_epoch[e]]
    users = load_split(cfg.data.output_dir, "test").user_id.astype(str).drop_duplicates().head(3).tolist()
    out = _local_beside(cfg.results_path, "report")
    run = client.get_run(run_id)
    facts = {"MLflow run": run_id, "experiment": cfg.mlflow.experiment, "model": cfg.model.name_or_path,
             "DeepSpeed ZeRO stage": cfg.train.zero_stage, "workers": cfg.train.num_workers,
             "epochs run": len(history), "git commit": run.data.tags.get("mlflow.source.git.commit", "unknown"),
             "prep schema": run.data.tags.get("bundlerec.schema_hash", "")}
    paths = write_report(out, title=f"bundlerec evaluation report: {cfg.name}", metrics=metrics, history=history,
                         steps=steps, examples=example_users(export_dir, users, read_user_key(cfg.serve.user_key_file)),
                         facts=facts)
    client.log_artifacts(run_id, out, artifact_path="report")
    log.info("report: %s (MLflow run %s, artifacts report/report.html)", paths["report"], run_id)
    return paths["report"]


def _local_beside(path: str, name: str) -> str:
    """A local folder ``name`` beside ``path``, or a fresh local one when ``path`` is an object-store
    URI (what is written there goes to MLflow too)."""
    if is_uri(path):
        import tempfile

        return os.path.join(tempfile.mkdtemp(prefix="bundlerec-"), name)
    return os.path.join(parent(path), name)


def _resume_hash(cfg: PipelineConfig) -> str:
    """The hash of what a resumed run must share with the interrupted one: the whole config but the
    resume switch and where it runs (train.num_workers, train.cpus_per_worker: a checkpoint written by
    another number of workers is restored as DeepSpeed's universal checkpoint)."""
    d = to_dict(cfg)
    for k in ("resume", "num_workers", "cpus_per_worker"):
        d["train"].pop(k)
    return config_hash(d)


def run_train_stage(cfg: PipelineConfig) -> dict:
    """Train on the prepared data in ``cfg.data.output_dir``; returns (and writes) results.json."""
    from bundlerec.tracking import check_server, log_prep_dataset, start_run, system_metrics
    from bundlerec.train.fit import fit

    prep_dir = cfg.data.output_dir
    manifest = require_prep(cfg)
    check_server(cfg.mlflow.tracking_uri)  # fail before any compute is spent
    chash = _resume_hash(cfg)
    state_path = join(absolute(cfg.train.storage_path), f"{cfg.name}-train-state.json")
    state = json.loads(read_text(state_path)) if cfg.train.resume and exists(state_path) else None
    if state and not state.get("finished"):  # the last run's driver died: continue that run
        if state["config_hash"] != chash:
            raise ValueError(f"train.resume: the interrupted run {state['run_id']} of '{cfg.name}' was started with "
                             f"another config (hash {state['config_hash']}, now {chash}); rerun with "
                             f"train.resume=false to start over, or with that run's config")
        run_id = state["run_id"]
        log.info("train: resuming MLflow run %s (Ray Train run %s restores its latest checkpoint)", run_id,
                 state["name"])
        print(f"[bundlerec] train: resuming the interrupted run {run_id}", flush=True)
    else:
        tags = {"bundlerec.config_hash": chash, "bundlerec.schema_hash": manifest["schema_hash"],
                "bundlerec.stage": "train", **{f"version.{k}": v for k, v in versions().items() if v}}
        run_id = start_run(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.mlflow.run_name,
                           flatten(to_dict(cfg)), tags)
        state = {"run_id": run_id, "name": f"{cfg.name}-{run_id[:8]}", "config_hash": chash, "finished": False}
        write_text(state_path, json.dumps(state))  # before any compute: a killed driver leaves it behind
        log_prep_dataset(cfg.mlflow.tracking_uri, run_id, prep_dir, manifest)
    log.info("train: MLflow run %s (experiment %s at %s)", run_id, cfg.mlflow.experiment, cfg.mlflow.tracking_uri)
    with system_metrics(cfg.mlflow.tracking_uri, run_id):
        trained = fit(cfg, prep_dir, run_id, name=state["name"])
    write_text(state_path, json.dumps({**state, "finished": True}))
    local = trained["local_export"]
    pricing = pricing_step(cfg, local)
    engine = fit_engine_stage(cfg, local, run_id)
    integrity.publish(local, trained["export_dir"])  # object store: the amended export, manifest last
    return evaluate_and_log(cfg, trained["export_dir"], run_id, {"pricing": pricing, "engine_fit": engine,
        "checkpoint": trained["checkpoint"],
        "train": {k: v for k, v in trained.items() if k not in ("export_dir", "local_export", "checkpoint")}},
        local=local)


def run_tune_stage(cfg: PipelineConfig) -> dict:
    """Sweep, then evaluate the best trial's export on the test split (logged to its child run)."""
    import mlflow

    from bundlerec.tune import run_sweep, trial_summary

    require_prep(cfg)
    sweep = run_sweep(cfg)
    print("\n" + trial_summary(sweep) + "\n", flush=True)
    best = sweep["best"]
    local = integrity.checkout(best["export_dir"], "the best trial's export")
    pricing = pricing_step(cfg, local)
    engine = fit_engine_stage(cfg, local, best["run_id"])
    integrity.publish(local, best["export_dir"])
    results = evaluate_and_log(cfg, best["export_dir"], best["run_id"], {"pricing": pricing, "engine_fit": engine,
        "sweep_run_id": sweep["parent_run_id"], "best_trial": best, "sweep_seconds": sweep["seconds"]},
        local=local)
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    client.log_metric(sweep["parent_run_id"], "best_test_ndcg_at_10", results["metrics"]["bundlerec"]["ndcg@10"])
    client.set_terminated(sweep["parent_run_id"], "FINISHED")
    return results


def bundle_dirs(cfg: PipelineConfig) -> tuple[str, str]:
    """(training, evaluation) directories of a bundlerec_intent source: ``data.events`` and
    ``data.eval_dir``, or the split of ``data.events`` by user (``data.eval_fold``) that the prep stage
    writes under ``data.output_dir/split``."""
    if cfg.data.eval_dir:
        return cfg.data.events, cfg.data.eval_dir
    split = join(cfg.data.output_dir, "split")
    return join(split, "train"), join(split, "eval")


def run_bundle_prep(cfg: PipelineConfig) -> dict:
    """The prep of a bundlerec_intent source: both directories read and checked (the format's
    tables, every bundle's items in the catalog), the evaluation users split off when no
    ``data.eval_dir`` is given. The bundle-completion examples are written by the train stage, from
    the fit users only (:func:`bundlerec.eval.bundles.prepare_export`)."""
    from bundlerec.bundles.intent import load, split_by_user

    if not os.path.isdir(cfg.data.events):
        raise FileNotFoundError(f"data.events={cfg.data.events}: no such directory (data.source=bundlerec_intent "
                                f"reads a directory of that format, one folder per domain)")
    if not cfg.data.eval_dir:
        counts = split_by_user(cfg.data.events, join(cfg.data.output_dir, "split"), cfg.data.eval_fold)
        print(f"prep: evaluation users (fold {cfg.data.eval_fold}) split off {cfg.data.events}: {counts}", flush=True)
    out = {}
    for side, d in zip(("train", "eval"), bundle_dirs(cfg)):
        domains = load(d)
        out[side] = {n: {"bundles": len(x.bundles), "sessions": len(x.sessions), "items": len(x.items)}
                     for n, x in domains.items()}
        print(f"prep: {side} {d}: " + ", ".join(f"{n} {v['bundles']} bundles / {v['sessions']} sessions"
                                                for n, v in out[side].items()), flush=True)
    return out


def run_bundle_train_stage(cfg: PipelineConfig) -> dict:
    """Train, fit and evaluate on a bundlerec_intent source as one MLflow run: the two-tower trains on
    the fit users' bundles, every engine parameter is chosen on validation users carved from the
    training directory, the export's engine is scored on the evaluation directory against every
    baseline (:func:`bundlerec.eval.bundles.evaluate_bundles`, what ``jobs.eval_bundles`` runs),
    the pricing model attached; returns (and writes) results.json."""
    from bundlerec.eval.bundle_report import headline_metrics, markdown, print_table
    from bundlerec.eval.bundles import evaluate_bundles
    from bundlerec.tracking import RunLogger, TrackingError, check_server, start_run

    train_dir, eval_dir = bundle_dirs(cfg)
    for d in (train_dir, eval_dir):
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{d}: no such directory; run the prep stage first (stages: [prep, train, ...])")
    check_server(cfg.mlflow.tracking_uri)
    tags = {"bundlerec.stage": "train", "bundlerec.source": "bundlerec_intent", "bundlerec.config_hash": _resume_hash(cfg),
            **{f"version.{k}": v for k, v in versions().items() if v}}
    run_id = start_run(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.mlflow.run_name, flatten(to_dict(cfg)), tags)
    work = join(cfg.data.output_dir, "work")
    res = evaluate_bundles(cfg, train_dir, eval_dir, work, run_id=run_id)
    export = res["export_dir"]
    pricing = pricing_step(cfg, export)  # re-seals the export
    import mlflow

    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    rl = RunLogger(cfg.mlflow.tracking_uri, run_id)
    if not (rl.log(headline_metrics(res), step=0) or rl.flush()):
        raise TrackingError(f"the evaluation metrics of run {run_id} could not be written to {cfg.mlflow.tracking_uri}")
    client.log_dict(run_id, res["selection"], "fit/selection.json")
    client.log_dict(run_id, res, "bundles/evaluation.json")
    client.log_text(run_id, markdown(res), "bundles/evaluation.md")
    from bundlerec.eval.plots import plot_bundle_tasks

    out = _local_beside(cfg.results_path, "report")
    os.makedirs(out, exist_ok=True)
    client.log_artifact(run_id, plot_bundle_tasks(res, os.path.join(out, "bundles.png")), artifact_path="bundles")
    # the summary's table: each method's completion figures, the mean over the evaluation domains
    methods = {m for dom in res["completion"].values() for m in dom}
    metrics = {m: {k: float(np.mean([dom[m][k] for dom in res["completion"].values() if m in dom]))
                   for k in ("recall@10", "ndcg@10", "recall@20", "ndcg@20")} for m in sorted(methods)}
    results = {"run_id": run_id, "experiment": cfg.mlflow.experiment, "mlflow_url": cfg.mlflow.tracking_uri,
               "export_dir": export, "prep_dir": res["prep_dir"], "train_dir": train_dir, "eval_dir": eval_dir,
               "metrics": metrics, "bundles_eval": res,
               "pricing": pricing, "eval_seconds": res["seconds"]}
    write_text(cfg.results_path, json.dumps(results, indent=2, default=str))
    client.log_artifact(run_id, cfg.results_path, artifact_path="results")
    client.set_terminated(run_id, "FINISHED")
    print_table(res)
    return results


def run_pipeline(cfg: PipelineConfig) -> dict:
    """The configured stages (prep -> train|tune -> register -> deploy); writes summary.json."""
    from bundlerec.data.prep import run_prep
    from bundlerec.tracking import check_server

    t0 = time.time()
    check_server(cfg.mlflow.tracking_uri)
    require_pricing_data(cfg)
    summary: dict = {"mlflow_url": cfg.mlflow.tracking_uri, "experiment": cfg.mlflow.experiment,
                     "prep_dir": cfg.data.output_dir, "stages": list(cfg.stages)}
    bundle_source = cfg.data.source == "bundlerec_intent"
    if "prep" in cfg.stages:
        run_bundle_prep(cfg) if bundle_source else run_prep(cfg)
    results = None
    if "train" in cfg.stages:
        results = run_bundle_train_stage(cfg) if bundle_source else run_train_stage(cfg)
    elif "tune" in cfg.stages:
        results = run_tune_stage(cfg)
        summary["sweep_run_id"] = results["sweep_run_id"]
    if "price" in cfg.stages:
        from bundlerec.price import run_price_stage

        results = run_price_stage(cfg, results)
    if results is None:
        results = json.loads(read_text(cfg.results_path))
    summary.update({
        "run_id": results["run_id"], "export_dir": results["export_dir"],
        "metrics": {m: {k: v[k] for k in SUMMARY_METRICS if k in v} for m, v in results["metrics"].items()},
    })
    if results.get("bundles", {}).get("methods"):  # personalized generation on the test baskets
        summary["bundles"] = {m: {k: v[k] for k in ("f1", "best_jaccard", "best_jaccard_ci", "coverage")}
                              for m, v in results["bundles"]["methods"].items()}
    last = results.get("train", {}).get("last_metrics") or results.get("best_trial") or {}
    if last.get("samples_per_s_per_worker"):
        summary["train_samples_per_s_per_worker"] = last["samples_per_s_per_worker"]
    if "register" in cfg.stages:
        from bundlerec.registry.promotion import register

        reg = register(results["export_dir"], results.get("prep_dir", cfg.data.output_dir), cfg.mlflow.tracking_uri,
                       cfg.mlflow.experiment,
                       run_id=results["run_id"], model_name=cfg.serve.model_name,
                       primary_metric=cfg.mlflow.primary_metric)
        print(f"registry: {reg['model_name']} v{reg['version']} -> {reg['alias']} ({reg['reason']})", flush=True)
        summary.update({"registered_version": reg["version"], "registered_alias": reg["alias"],
                        "champion_version": reg["champion_version"]})
    if "deploy" in cfg.stages:
        from bundlerec.demo import try_endpoint
        from bundlerec.serving.deploy import deploy

        token = None
        if cfg.serve.auth:  # a fresh token per deploy, readable by its owner only
            from bundlerec.serving.auth import write_token_file

            token = write_token_file(cfg.serve.token_file)
            summary["api_token_file"] = os.path.abspath(cfg.serve.token_file)
        dep = deploy(cfg, version=summary.get("champion_version"))
        if bundle_source:
            from bundlerec.demo import try_bundle_endpoint

            summary.update(try_bundle_endpoint(results.get("eval_dir") or bundle_dirs(cfg)[1], dep["serve_url"], token))
        else:
            summary.update(try_endpoint(cfg, dep["serve_url"], token))
    summary["report_url"] = report_url(cfg.mlflow.tracking_uri, results["run_id"],
                                       "bundles/evaluation.md" if bundle_source else "report/report.html")
    if "deploy" in cfg.stages:
        summary["explorer_url"] = f"{cfg.serve.url.rstrip('/')}/"
    summary["pipeline_seconds"] = round(time.time() - t0, 1)
    path = join(parent(cfg.results_path), "summary.json")
    write_text(path, json.dumps(summary, indent=2, default=str))
    log.info("pipeline: done in %.0fs; summary at %s", summary["pipeline_seconds"], path)
    print(f"\nevaluation report (MLflow): {summary['report_url']}", flush=True)
    if "explorer_url" in summary:
        print(f"bundle explorer:            {summary['explorer_url']}  (API token: {summary.get('api_token_file', 'none')})",
              flush=True)
    return summary


def report_url(tracking_uri: str, run_id: str, artifact: str = "report/report.html") -> str:
    """Where the MLflow UI shows one of a run's artifacts (its report/report.html by default)."""
    import mlflow

    run = mlflow.MlflowClient(tracking_uri).get_run(run_id)
    return (f"{tracking_uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
            f"/artifacts/{artifact}")


