"""Bundle-pricing evaluation on real Steam bundles: out-of-sample (k-fold) discount MAE and final-price
MAPE of bundlerec's revenue-optimal prices against the median and median-by-size baselines.

    python -m jobs.eval_pricing --data-dir datasets/steam_bundles --out runs/eval_pricing.json
"""

from __future__ import annotations

import argparse
import json
import os

from bundlerec.eval.pricing import evaluate_pricing


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="folder with bundles.csv.gz and bundle_items.csv.gz")
    p.add_argument("--out", required=True)
    p.add_argument("--folds", type=int, default=5)
    from bundlerec.config import PricingConfig

    p.add_argument("--s", type=float, default=PricingConfig.s, help="assumed logistic scale of willingness to pay")
    p.add_argument("--mlflow-uri", default=None, help="also log the figures, the JSON and the plot to this tracking "
                   "server (experiment bundlerec-pricing)")
    args = p.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    plot = os.path.splitext(args.out)[0] + "_discounts.png"  # predicted vs actual discount, out of fold
    res = evaluate_pricing(args.data_dir, folds=args.folds, s=args.s, plot_path=plot)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    if args.mlflow_uri:
        import mlflow

        mlflow.set_tracking_uri(args.mlflow_uri)
        mlflow.set_experiment("bundlerec-pricing")
        with mlflow.start_run(run_name="eval-pricing"):
            mlflow.log_params({"folds": args.folds, "s": args.s, "data_dir": args.data_dir})
            mlflow.log_metrics({f"{m}/{k}": v for m in ("discount_mae", "final_price_mape") for k, v in res[m].items()})
            mlflow.log_artifact(args.out)
            mlflow.log_artifact(plot)
    print(f"plot: {plot}")
    for metric in ("discount_mae", "final_price_mape"):
        print(metric, "  ".join(f"{k} {v:.4f}" for k, v in res[metric].items()))
    r = res["robustness"]
    print(f"discount MAE / median: {res['mae_ratio_to_median']:.3f} (mean over 5 fold seeds "
          f"{r['mae_ratio_mean_over_seeds']:.3f}; folds of whole overlap components "
          f"{r['grouped_by_overlap_component']['ratio']:.3f}; without the context features "
          f"{r['without_context_features']['ratio']:.3f})")
    return res


if __name__ == "__main__":
    main()
