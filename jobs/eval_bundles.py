"""Bundle evaluation on the bundlerec_intent format: train on one directory (Ray Train + DeepSpeed,
bundle-completion objective), evaluate completion and generation on another, per domain, for
bundlerec and the baselines popular, itemknn and zeroshot.

    python -m jobs.eval_bundles --train-dir ../shared/data/bundlerec_intent --eval-dir /path/to/heldout \
        --out runs/eval_bundles/results.json
"""

from __future__ import annotations

import argparse
import json
import os

from bundlerec.bundles.evaluate import evaluate_bundles
from bundlerec.config import load_config
from bundlerec.runtime import check_versions, init_ray, setup_env

DEFAULTS = ["train.epochs=2", "train.max_steps_per_epoch=150", "train.micro_batch=32", "data.history_len=8",
            "model.freeze_layers=2", "model.sampled_negatives=32", "train.early_stop_patience=5",
            "data.item_max_tokens=48", "train.log_every_steps=25"]


def main(argv: list[str] | None = None) -> dict:
    setup_env()
    p = argparse.ArgumentParser(description="bundlerec bundle completion/generation evaluation")
    p.add_argument("--train-dir", required=True)
    p.add_argument("--eval-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--work-dir", default="runs/eval_bundles")
    p.add_argument("--config", default=None)
    p.add_argument("--export", default=None, help="evaluate this export (from an earlier run on the same "
                   "--train-dir) instead of training")
    p.add_argument("overrides", nargs="*", help="dotted config overrides (train.epochs=3 ...)")
    args = p.parse_args(argv)
    work = os.path.abspath(args.work_dir)
    cfg = load_config(args.config, DEFAULTS + [f"train.storage_path={work}/ray_results", *args.overrides])
    check_versions()
    init_ray()
    res = evaluate_bundles(cfg, args.train_dir, args.eval_dir, work, export_dir=args.export)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    for task in ("completion", "generation"):
        for dom, methods in res[task].items():
            for m, v in methods.items():
                print(f"{task:<11}{dom:<11}{m:<10}" + "  ".join(f"{k} {x:.4f}" for k, x in v.items()))
    return res


if __name__ == "__main__":
    main()
