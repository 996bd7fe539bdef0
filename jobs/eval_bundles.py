"""Bundle evaluation on the bundlerec_intent format: train on one directory (Ray Train + DeepSpeed,
bundle-completion objective), choose every parameter on validation users carved from it, and score
the served engine on another directory, per domain, against popular, itemknn, lexical and zeroshot.

    python -m jobs.eval_bundles --train-dir datasets/bundlerec_intent --eval-dir /path/to/heldout \
        --out runs/eval_bundles/results.json
    # dev folds: split --src by user (jobs.split_intent's rule) for each fold, evaluate each, mean +- SD
    python -m jobs.eval_bundles --src datasets/bundlerec_intent --folds 1 2 3 4 --out runs/eval_bundles/folds.json
"""

from __future__ import annotations

import argparse
import json
import os

from bundlerec.eval.bundle_report import headline_metrics, markdown, print_table, summarize_folds
from bundlerec.eval.bundles import evaluate_bundles
from bundlerec.bundles.intent import split_by_user
from bundlerec.config import load_config
from bundlerec.runtime import check_versions, init_ray, setup_env

CONFIG = "jobs/configs/bundlerec_intent.yaml"  # the pipeline's bundle source: the same defaults, one file


def main(argv: list[str] | None = None) -> dict:
    setup_env()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-dir", help="training directory (bundlerec_intent format)")
    p.add_argument("--eval-dir", help="evaluation directory (same format; never used for any choice)")
    p.add_argument("--src", help="with --folds: the directory to split by user into train/eval per fold")
    p.add_argument("--folds", type=int, nargs="*", help="dev folds (users with sha1 %% 5 == fold are eval)")
    p.add_argument("--out", required=True)
    p.add_argument("--work-dir", default="runs/eval_bundles")
    p.add_argument("--config", default=None, help=f"pipeline config (default: {CONFIG}, beside this package)")
    p.add_argument("--export", default=None, help="evaluate this export (from an earlier run on the same "
                   "--train-dir) instead of training")
    p.add_argument("--reuse-exports", action="store_true", help="with --folds: evaluate each fold's existing "
                   "export (work-dir/foldK/export) instead of training it again")
    p.add_argument("--no-mlflow", action="store_true", help="do not record the evaluation as an MLflow run "
                   "(by default it is one, at mlflow.tracking_uri, experiment mlflow.experiment)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides (train.epochs=3 ...)")
    args = p.parse_args(argv)
    if bool(args.folds) == bool(args.train_dir and args.eval_dir) or (args.folds and not args.src):
        p.error("give either --train-dir and --eval-dir, or --src and --folds")
    work = os.path.abspath(args.work_dir)
    config = args.config or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), CONFIG)
    base = load_config(config, list(args.overrides))
    if not args.no_mlflow:
        from bundlerec.tracking import check_server

        check_server(base.mlflow.tracking_uri)  # before any compute: the figures go to this server
    check_versions()
    init_ray()

    def run(train_dir: str, eval_dir: str, wd: str) -> dict:
        cfg = load_config(config, [f"train.storage_path={wd}/ray_results", *args.overrides])
        export = args.export
        if args.reuse_exports and os.path.exists(os.path.join(wd, "export", "bundlerec.json")):
            export = os.path.join(wd, "export")
        return evaluate_bundles(cfg, train_dir, eval_dir, wd, export_dir=export, cache_dir=os.path.join(work, "cache"))

    if args.folds:
        folds = {}
        for k in args.folds:
            wd = os.path.join(work, f"fold{k}")
            split_by_user(args.src, os.path.join(wd, "data"), k)
            folds[k] = run(os.path.join(wd, "data", "train"), os.path.join(wd, "data", "eval"), wd)
            with open(os.path.join(wd, "results.json"), "w") as f:  # each fold as soon as it is done
                json.dump(folds[k], f, indent=2)
            print(f"--- fold {k}")
            print_table(folds[k])
        res = {"folds": folds, "summary": summarize_folds(folds)}
    else:
        res = run(args.train_dir, args.eval_dir, work)
        print_table(res)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(markdown(res))
    if not args.no_mlflow:
        from bundlerec.tracking import log_evaluation

        res["mlflow_run_id"] = log_evaluation(
            base.mlflow.tracking_uri, base.mlflow.experiment, "eval-bundles",
            {"train_dir": args.train_dir, "eval_dir": args.eval_dir, "src": args.src, "folds": args.folds,
             "overrides": " ".join(args.overrides)}, headline_metrics(res),
            [args.out, os.path.splitext(args.out)[0] + ".md"])
        print(f"MLflow run {res['mlflow_run_id']} ({base.mlflow.tracking_uri}, experiment {base.mlflow.experiment})")
    return res


if __name__ == "__main__":
    main()
