"""Bundle evaluation on the bundlerec_intent format: completion, detection, intents, naming, per domain."""

from __future__ import annotations

import json
import os
from typing import Annotated, Optional

import typer

from bundlerec.cli import Overrides, int_list_option, path_option, run, usage_error

CONFIG = "jobs/configs/bundlerec_intent.yaml"  # the pipeline's bundle source: the same defaults, one file


def command(out: Annotated[str, path_option("--out", help="the results (JSON; a Markdown table beside it)", output=True,
                                            show_default=False)],
            train_dir: Annotated[Optional[str], path_option("--train-dir", help="training directory (bundlerec_intent format)")] = None,
            eval_dir: Annotated[Optional[str], path_option(
                "--eval-dir", help="evaluation directory (same format; never used for any choice)")] = None,
            src: Annotated[Optional[str], path_option(
                "--src", help="with --folds: the directory to split by user into train/eval per fold")] = None,
            folds: Annotated[Optional[list], int_list_option("--folds", help="dev folds (users with sha1 % 5 == fold are eval)")] = None,
            work_dir: Annotated[str, path_option("--work-dir", help="training, exports and caches", output=True)] = "runs/eval_bundles",
            config: Annotated[Optional[str], path_option("--config", help=f"pipeline config (default: {CONFIG}, beside this package)",
                                                         metavar="FILE")] = None,
            export: Annotated[Optional[str], path_option(
                "--export", help="evaluate this export (from an earlier run on the same --train-dir) instead of training")] = None,
            reuse_exports: Annotated[bool, typer.Option("--reuse-exports", help="with --folds: evaluate each fold's existing export "
                                                        "(work-dir/foldK/export) instead of training it again")] = False,
            no_mlflow: Annotated[bool, typer.Option("--no-mlflow", help="do not record the evaluation as an MLflow run (by default "
                                                    "it is one, at mlflow.tracking_uri, experiment mlflow.experiment)")] = False,
            overrides: Overrides = None) -> dict:
    """Train on one directory (Ray Train + DeepSpeed, bundle-completion objective), choose every
    parameter on validation users carved from it, and score the served engine on another directory,
    per domain, against popular, itemknn, lexical, zero-shot and the sentence-transformers fine-tune.

    \b
    Examples (`python -m jobs.eval_bundles` takes the same arguments):
      bundlerec eval-bundles --train-dir datasets/bundlerec_intent --eval-dir /path/to/heldout --out runs/eval_bundles/results.json
      # dev folds: split --src by user (split-intent's rule) for each fold, evaluate each, mean +- SD
      bundlerec eval-bundles --src datasets/bundlerec_intent --folds 1 2 3 4 --out runs/eval_bundles/folds.json
    """
    from bundlerec.bundles.intent import split_by_user
    from bundlerec.config import load_config
    from bundlerec.eval.bundle_report import headline_metrics, markdown, print_table, summarize_folds
    from bundlerec.eval.bundles import evaluate_bundles
    from bundlerec.runtime import check_versions, init_ray, setup_env

    setup_env()
    overrides = list(overrides or [])
    if bool(folds) == bool(train_dir and eval_dir) or (folds and not src):
        raise usage_error("give either --train-dir and --eval-dir, or --src and --folds")
    work = os.path.abspath(work_dir)
    config = config or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), CONFIG)
    base = load_config(config, list(overrides))
    if not no_mlflow:
        from bundlerec.tracking import check_server

        check_server(base.mlflow.tracking_uri)  # before any compute: the figures go to this server
    check_versions()
    init_ray()

    def evaluate(train_dir: str, eval_dir: str, wd: str) -> dict:
        cfg = load_config(config, [f"train.storage_path={wd}/ray_results", *overrides])
        reused = export
        if reuse_exports and os.path.exists(os.path.join(wd, "export", "bundlerec.json")):
            reused = os.path.join(wd, "export")
        return evaluate_bundles(cfg, train_dir, eval_dir, wd, export_dir=reused, cache_dir=os.path.join(work, "cache"))

    if folds:
        results = {}
        for k in folds:
            wd = os.path.join(work, f"fold{k}")
            split_by_user(src, os.path.join(wd, "data"), k)
            results[k] = evaluate(os.path.join(wd, "data", "train"), os.path.join(wd, "data", "eval"), wd)
            with open(os.path.join(wd, "results.json"), "w") as f:  # each fold as soon as it is done
                json.dump(results[k], f, indent=2)
            print(f"--- fold {k}")
            print_table(results[k])
        res = {"folds": results, "summary": summarize_folds(results)}
    else:
        res = evaluate(train_dir, eval_dir, work)
        print_table(res)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(markdown(res))
    if not no_mlflow:
        from bundlerec.tracking import log_evaluation

        res["mlflow_run_id"] = log_evaluation(
            base.mlflow.tracking_uri, base.mlflow.experiment, "eval-bundles",
            {"train_dir": train_dir, "eval_dir": eval_dir, "src": src, "folds": folds,
             "overrides": " ".join(overrides)}, headline_metrics(res),
            [out, os.path.splitext(out)[0] + ".md"])
        print(f"MLflow run {res['mlflow_run_id']} ({base.mlflow.tracking_uri}, experiment {base.mlflow.experiment})")
    return res


def main(argv: list[str] | None = None) -> dict:
    return run(command, argv)


if __name__ == "__main__":
    main()
