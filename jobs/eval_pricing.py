"""Bundle-pricing evaluation on real Steam bundles (k-fold discount MAE, final-price MAPE)."""

from __future__ import annotations

import json
import os
from typing import Annotated, Optional

import typer

from bundlerec.cli import path_option, run
from bundlerec.config import PricingConfig


def command(data_dir: Annotated[str, path_option("--data-dir", help="folder with bundles.csv.gz and bundle_items.csv.gz",
                                                 show_default=False)],
            out: Annotated[str, path_option("--out", help="the result (JSON; the plot beside it)", output=True, show_default=False)],
            folds: Annotated[int, typer.Option(help="cross-validation folds")] = 5,
            s: Annotated[float, typer.Option("--s", help="assumed logistic scale of willingness to pay")] = PricingConfig.s,
            mlflow_uri: Annotated[Optional[str], typer.Option(help="also log the figures, the JSON and the plot to this "
                                                              "tracking server (experiment bundlerec-pricing)")] = None) -> dict:
    """Bundle-pricing evaluation on real Steam bundles: out-of-sample (k-fold) discount MAE and
    final-price MAPE of bundlerec's revenue-optimal prices against the median and median-by-size
    baselines.

    \b
    Examples (`python -m jobs.eval_pricing` takes the same arguments):
      bundlerec eval-pricing --data-dir datasets/steam_bundles --out runs/eval_pricing.json
    """
    from bundlerec.eval.pricing import evaluate_pricing

    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    plot = os.path.splitext(out)[0] + "_discounts.png"  # predicted vs actual discount, out of fold
    res = evaluate_pricing(data_dir, folds=folds, s=s, plot_path=plot)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    if mlflow_uri:
        import mlflow

        mlflow.set_tracking_uri(mlflow_uri)
        mlflow.set_experiment("bundlerec-pricing")
        with mlflow.start_run(run_name="eval-pricing"):
            mlflow.log_params({"folds": folds, "s": s, "data_dir": data_dir})
            mlflow.log_metrics({f"{m}/{k}": v for m in ("discount_mae", "final_price_mape") for k, v in res[m].items()})
            mlflow.log_artifact(out)
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


def main(argv: list[str] | None = None) -> dict:
    return run(command, argv)


if __name__ == "__main__":
    main()
