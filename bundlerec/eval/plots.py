"""Pictures of a run (matplotlib, written to files; no display needed): training curves, the
comparison with every baseline with intervals, predicted vs actual bundle discounts."""

from __future__ import annotations

from typing import Optional

import numpy as np

MAIN = ("ndcg@10", "recall@10")


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on workers, CI or clusters
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict], steps: Optional[list[tuple[int, float]]], path: str) -> Optional[str]:
    """Loss (per step when logged, per epoch always) and validation metrics per epoch."""
    if not history:
        return None
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    spe = max(1, int(history[0].get("step", 1)))  # global steps per epoch
    if steps:
        a.plot([s for s, _ in steps], [v for _, v in steps], lw=1, alpha=.6, label="train loss (logged steps)")
    a.plot([h["epoch"] * spe for h in history], [h["train_loss"] for h in history], "o-", label="train loss (epoch)")
    a.set_xlabel("global step")
    a.set_title("training loss")
    a.legend(fontsize=8)
    ep = [h["epoch"] for h in history]
    for key, label in (("val_ndcg_at_10", "val NDCG@10"), ("val_recall_at_10", "val Recall@10")):
        if key in history[0]:
            b.plot(ep, [h[key] for h in history], "o-", label=label)
    b.set_xlabel("epoch")
    b.set_title("validation (users carved from training data)")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_comparison(metrics: dict, path: str) -> str:
    """Grouped bars: every method on NDCG@10 and Recall@10, with 95 % bootstrap intervals."""
    plt = _plt()
    methods = list(metrics)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(methods), 3.6))
    width = 0.38
    for j, key in enumerate(MAIN):
        vals = [metrics[m].get(key, np.nan) for m in methods]
        ci = [metrics[m].get("ci95", {}).get(key, [v, v]) for m, v in zip(methods, vals)]
        err = np.array([[v - lo for v, (lo, _) in zip(vals, ci)], [hi - v for v, (_, hi) in zip(vals, ci)]])
        x = np.arange(len(methods)) + (j - 0.5) * width
        ax.bar(x, vals, width, yerr=err, capsize=3, label=key)
    ax.set_xticks(np.arange(len(methods)), methods)
    ax.set_title(f"test split ({metrics[methods[0]].get('n_examples', '?')} baskets), 95 % bootstrap intervals")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_bundle_tasks(res: dict, path: str) -> str:
    """One panel per bundle task of a bundle evaluation (completion Recall@10, personalized
    generation best Jaccard): every method per evaluation domain, with 95 % bootstrap intervals."""
    plt = _plt()
    panels = [(t, k, title) for t, k, title in (("completion", "recall@10", "completion Recall@10 (first item -> rest)"),
                                                 ("personal", "best_jaccard", "personalized generation: best Jaccard"))
              if res.get(t)]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 3.8), squeeze=False)
    for ax, (task, key, title) in zip(axes[0], panels):
        doms = list(res[task])
        methods = [m for m in res[task][doms[0]] if all(m in res[task][d] for d in doms)]
        width = 0.8 / len(methods)
        for j, m in enumerate(methods):
            vals = [res[task][d][m][key] for d in doms]
            ci = [res[task][d][m].get(f"{key}_ci", [v, v]) for d, v in zip(doms, vals)]
            err = np.array([[v - lo for v, (lo, _) in zip(vals, ci)], [hi - v for v, (_, hi) in zip(vals, ci)]])
            ax.bar(np.arange(len(doms)) + (j - (len(methods) - 1) / 2) * width, vals, width, yerr=err, capsize=2, label=m)
        ax.set_xticks(np.arange(len(doms)), doms)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_pricing(actual: np.ndarray, predicted: dict, path: str) -> str:
    """Out-of-fold predicted vs actual bundle discount, bundlerec and the median baseline."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(predicted), figsize=(4 * len(predicted), 3.8), sharey=True)
    for ax, (name, p) in zip(np.atleast_1d(axes), predicted.items()):
        ax.scatter(actual, p, s=4, alpha=.35)
        ax.plot([0, 1], [0, 1], "k--", lw=.8)
        ax.set_title(f"{name}: MAE {np.mean(np.abs(p - actual)):.3f}")
        ax.set_xlabel("actual discount")
    np.atleast_1d(axes)[0].set_ylabel("predicted discount (out of fold)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
