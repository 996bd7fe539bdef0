"""Hyperparameter search with Ray Tune; every trial is a full Ray Train + DeepSpeed run.

Ray Train V2 pattern: a Tune trial runs a small *driver* function that builds its own
``TorchTrainer`` and forwards each report to Tune with ``TuneReportCallback``. ASHA stops weak
trials on validation NDCG@10; Optuna's TPE proposes the next configurations.

MLflow: one parent run per sweep and one nested child run per trial (tag ``mlflow.parentRunId``),
created by the trial itself and found again by its trial id when a sweep resumes, so no two trials
share a run and a restored trial keeps its run.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable

from bundlerec.config import (
    PipelineConfig,
    apply_overrides,
    flatten,
    from_dict,
    to_dict,
)
from bundlerec import integrity
from bundlerec.storage import absolute, exists, join, makedirs, read_text, reset_dir, write_text

log = logging.getLogger(__name__)

METRIC, MODE = "val_ndcg_at_10", "max"


def _spaces() -> dict[str, Callable[[], dict]]:
    from ray import tune

    return {
        # the full space from the issue: optimisation, model and systems knobs
        "default": lambda: {
            "train.lr": tune.loguniform(1e-5, 2e-4),
            "train.head_lr": tune.loguniform(3e-4, 5e-3),
            "model.temperature": tune.uniform(0.03, 0.1),
            "train.weight_decay": tune.loguniform(1e-4, 1e-1),
            "train.warmup_frac": tune.uniform(0.0, 0.2),
            "train.micro_batch": tune.choice([8, 16, 32]),
            "data.history_len": tune.choice([4, 8, 16]),
            "train.zero_stage": tune.choice([2, 3]),
            "model.freeze_layers": tune.choice([0, 2, 4]),
            "model.lora_rank": tune.choice([0, 8]),
        },
        # what fits a 2-core demo: the knobs that matter most at a few dozen steps
        "demo": lambda: {
            "train.lr": tune.loguniform(2e-5, 2e-4),
            "train.head_lr": tune.loguniform(5e-4, 5e-3),
            "model.temperature": tune.uniform(0.03, 0.1),
            "model.freeze_layers": tune.choice([2, 4]),
            "data.history_len": tune.choice([4, 8]),
        },
    }


def search_space(name: str) -> dict:
    spaces = _spaces()
    if name not in spaces:
        raise ValueError(f"tune.space={name!r}: known spaces are {sorted(spaces)}")
    return spaces[name]()


def _child_run(client, experiment_id: str, parent: str, trial_id: str, params: dict) -> str:
    """The trial's MLflow run: found by trial id on resume, else created under the parent."""
    found = client.search_runs([experiment_id], filter_string=f"tags.`bundlerec.trial_id` = '{trial_id}' "
                                                              f"and tags.`mlflow.parentRunId` = '{parent}'")
    if found:
        return found[0].info.run_id
    from mlflow.entities import Param

    run = client.create_run(experiment_id, run_name=f"trial-{trial_id}",
                            tags={"mlflow.parentRunId": parent, "bundlerec.trial_id": trial_id})
    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def trial_driver(trial_config: dict, base: dict, parent_run_id: str, experiment_id: str, sweep_dir: str) -> None:
    """One Tune trial: resolve its config, open its child run, run the TorchTrainer, export."""
    import mlflow
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from bundlerec.tracking import load_credentials
    from bundlerec.train.fit import fit

    load_credentials()  # the job's MLflow identity, when it came as a file (bundlerec submit)
    trial_id = ray.tune.get_context().get_trial_id()
    raw = apply_overrides(json.loads(json.dumps(base)), [f"{k}={json.dumps(v)}" for k, v in trial_config.items()])
    cfg = from_dict(PipelineConfig, raw)
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    run_id = _child_run(client, experiment_id, parent_run_id, trial_id, flatten(to_dict(cfg)))
    export_dir = join(sweep_dir, "exports", trial_id)
    if integrity.verify(export_dir, hashes=False)[0]:
        # finished before: the sweep driver was killed after this trial's export was committed but
        # before Tune recorded the trial as done, so the resumed sweep runs it again. Its Train run is
        # complete (training again would restore it and report nothing): report its final metrics.
        final = {"epoch": cfg.train.epochs, **client.get_run(run_id).data.metrics}
        log.info("tune: trial %s had finished (export %s); reporting its final metrics again", trial_id, export_dir)
        ray.tune.report({k: v for k, v in final.items() if not k.startswith(("step/", "system/"))})
        return
    client.set_tag(run_id, "bundlerec.export_dir", export_dir)
    fit(cfg, cfg.data.output_dir, run_id=run_id, export_dir=export_dir,
        callbacks=[TuneReportCallback()], name=f"trial-{trial_id}", storage_path=join(sweep_dir, "trials"))
    client.set_terminated(run_id, "FINISHED")


def run_sweep(cfg: PipelineConfig) -> dict:
    """Run (or resume) the sweep; returns and writes ``sweep.json`` (best trial first)."""
    import mlflow
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    from bundlerec.progress import sweep_progress_callback
    from bundlerec.tracking import check_server, start_run

    tc = cfg.tune
    check_server(cfg.mlflow.tracking_uri)
    sweep_name = f"{cfg.name}-sweep"
    sweep_dir = join(absolute(tc.storage_path), sweep_name)  # a local folder or an object-store URI
    if tc.resume:
        makedirs(sweep_dir)
    else:
        reset_dir(sweep_dir)  # a fresh sweep never mixes with an old one
    state_path = join(sweep_dir, "bundlerec_sweep_state.json")
    restoring = tc.resume and tune.Tuner.can_restore(join(sweep_dir, "tuner")) and exists(state_path)
    if restoring:
        state = json.loads(read_text(state_path))
        log.info("tune: resuming sweep %s (parent run %s)", sweep_name, state["parent_run_id"])
    else:
        parent = start_run(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, sweep_name,
                           {f"tune.{k}": v for k, v in to_dict(tc).items()}, {"bundlerec.stage": "tune"})
        mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
        state = {"parent_run_id": parent,
                 "experiment_id": mlflow.get_experiment_by_name(cfg.mlflow.experiment).experiment_id}
        write_text(state_path, json.dumps(state))

    space = search_space(tc.space)
    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, base=to_dict(cfg), parent_run_id=state["parent_run_id"],
                             experiment_id=state["experiment_id"], sweep_dir=sweep_dir),
        {"cpu": tc.trial_cpus})
    if restoring:
        tuner = tune.Tuner.restore(join(sweep_dir, "tuner"), trainable=trainable, resume_errored=False,
                                   param_space=space)
    else:
        search = None
        if tc.search_alg == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search = ConcurrencyLimiter(OptunaSearch(seed=tc.seed), max_concurrent=tc.max_concurrent_trials)
        # max_t one past the last epoch: at max_t ASHA would stop the trial at its final report, before
        # the trial function exports its model
        scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs + 1, grace_period=tc.grace_period,
                                  reduction_factor=tc.reduction_factor)
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, num_samples=tc.num_samples, scheduler=scheduler,
                                        search_alg=search, max_concurrent_trials=tc.max_concurrent_trials),
            run_config=tune.RunConfig(name="tuner", storage_path=sweep_dir, verbose=1,
                                      callbacks=[sweep_progress_callback(tc.num_samples, cfg.train.epochs)]))
    t0 = time.time()
    grid = tuner.fit()
    trials = []
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    for r in grid:
        if r.metrics is None:
            continue
        tid = r.metrics.get("trial_id")
        export_dir = join(sweep_dir, "exports", tid) if tid else None
        hist = r.metrics_dataframe
        best_val = float(hist[METRIC].max()) if hist is not None and METRIC in hist else r.metrics.get(METRIC)
        runs = client.search_runs([state["experiment_id"]], filter_string=f"tags.`bundlerec.trial_id` = '{tid}'")
        run_id = runs[0].info.run_id if runs else None
        done = export_dir and integrity.verify(export_dir, hashes=False)[0]  # a complete, committed export
        if run_id and not done:
            client.set_terminated(run_id, "KILLED")  # stopped early by ASHA
        trials.append({"trial_id": tid, "config": r.config, METRIC: best_val, "epochs": r.metrics.get("epoch"),
                       "samples_per_s_per_worker": r.metrics.get("samples_per_s_per_worker"),
                       "trial_seconds": r.metrics.get("time_total_s"),
                       "run_id": run_id, "export_dir": export_dir if done else None,
                       "stopped_early": not done, "error": str(r.error) if r.error else None})
    trials.sort(key=lambda t: -(t[METRIC] or -1))
    finished = [t for t in trials if t["export_dir"]]
    if not finished:
        raise RuntimeError(f"no trial of sweep {sweep_name} finished: {[t['error'] for t in trials]}")
    sweep = {"sweep_name": sweep_name, "parent_run_id": state["parent_run_id"], "experiment_id": state["experiment_id"],
             "best": finished[0], "trials": trials, "seconds": round(time.time() - t0, 1), "resumed": restoring,
             "sweep_dir": sweep_dir}
    client.log_metric(state["parent_run_id"], f"best_{METRIC}", finished[0][METRIC])
    client.set_tag(state["parent_run_id"], "bundlerec.best_trial", finished[0]["trial_id"])
    write_text(join(sweep_dir, "sweep.json"), json.dumps(sweep, indent=2, default=str))
    return sweep


def trial_summary(sweep: dict) -> str:
    lines = [f"{'trial':<12}{METRIC:>16}{'epochs':>8}  status   config"]
    for t in sweep["trials"]:
        status = "stopped" if t["stopped_early"] else "done"
        cfg = " ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                       for k, v in t["config"].items())
        lines.append(f"{t['trial_id']:<12}{(t[METRIC] or 0):>16.4f}{t['epochs'] or 0:>8}  {status:<8} {cfg}")
    return "\n".join(lines)

