"""The bundle evaluation's results read by people: the printed table, the summary over folds, the
headline metrics logged to MLflow and the Markdown report."""

from __future__ import annotations
import numpy as np
from bundlerec.eval.bundle_scoring import LEAK_GATE_POINTS

def print_table(res: dict) -> None:
    """One evaluation's figures, a line per task, domain and method (intervals in brackets)."""
    for task, keys in (("completion", ("recall@10", "ndcg@10")), ("generation", ("f1",)), ("personal", ("f1", "best_jaccard"))):
        for dom, methods in res.get(task, {}).items():
            for m, v in methods.items():
                cells = []
                for k in keys:
                    ci = v.get(f"{k}_ci") or v.get("f1_ci" if k == "f1" else "")
                    cells.append(f"{k} {v[k]:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""))
                print(f"{task:<11}{dom:<11}{m:<16}" + "  ".join(cells))
    for dom, methods in res.get("intent", {}).items():
        for m, v in methods.items():
            ci = v["recall@10_ci"]
            print(f"{'intent':<11}{dom:<11}{m:<10}recall@10 {v['recall@10']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]")
    for dom, pool in res.get("candidate_pool", {}).items():
        if pool["k"]:
            print(f"{'rerank pool':<11}{dom:<11}top {pool['k']} fused candidates hold {pool['recall']:.3f} of the targets")
    for dom, gate in res.get("leak_gate", {}).items():
        failing = [m for m, g in gate["methods"].items() if not g["passes"]]
        ctrl = res["completion"][dom].get("zeroshot_seen_penalty", {})
        print(f"{'leak gate':<11}{dom:<11}zeroshot top-10 seen share {gate['zeroshot_seen_share@10']:.3f}; "
              f"bundlerec {gate['methods']['bundlerec']['seen_share@10']:.3f}; control (seen items last) recall@10 "
              f"{ctrl.get('recall@10', float('nan')):.4f}; failing: {', '.join(failing) or 'none'}")
    for dom, per_epoch in res.get("train", {}).get("rows_by_domain", {}).items():
        print(f"{'trained':<11}{dom:<11}rows per epoch {per_epoch}")
    st = res.get("st_mnrl")
    if st:  # the sentence-transformers baseline's run beside bundlerec's loop (same model, batch, cores)
        print(f"{'st_mnrl':<11}{'':<11}{st['pairs']} pairs, {st['steps']} steps of {st['batch_size']}, "
              f"{st['train_seconds']:.0f}s, {st['samples_per_s']:.1f} samples/s (bundlerec's loop: "
              f"{st['bundlerec_samples_per_s'] or float('nan'):.1f} samples/s)")
    for key in ("lift", "intent_lift"):
        for dom, lift in res.get(key, {}).items():
            r = lift["recall@10"]
            print(f"{key:<11}{dom:<11}bundlerec vs {lift['vs']}: recall@10 {r['lift']:+.1%} [{r['ci'][0]:+.1%}, {r['ci'][1]:+.1%}]")


def summarize_folds(results: dict[int, dict]) -> dict:
    """Mean and SD over folds of every method's completion and intent recall@10 / ndcg@10, detection
    F1, and bundlerec's lifts over the best baseline."""
    out: dict = {"folds": sorted(results)}
    first = next(iter(results.values()))
    for task, metrics in (("completion", ("recall@10", "ndcg@10")), ("generation", ("f1",)),
                          ("intent", ("recall@10", "ndcg@10")), ("naming", ("rouge1_f1",)),
                          ("personal", ("f1", "best_jaccard"))):
        if task not in first:
            continue
        out[task] = {}
        for dom, methods in first[task].items():
            out[task][dom] = {}
            for m in methods:
                if not all(m in r[task].get(dom, {}) for r in results.values()):
                    continue
                out[task][dom][m] = {k: {"mean": float(np.mean(v := [r[task][dom][m][k] for r in results.values()])),
                                         "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0} for k in metrics}
    for key, metric in (("lift", "recall@10"), ("intent_lift", "recall@10"), ("naming_lift", "rouge1_f1"),
                        ("personal_lift", "best_jaccard")):
        if key in first:
            out[key] = {dom: {"mean": float(np.mean([r[key][dom][metric]["lift"] for r in results.values()])),
                              "per_fold": {f: {"vs": r[key][dom]["vs"], **r[key][dom][metric]}
                                           for f, r in results.items()}} for dom in first[key]}
    if all("per_query" in r for r in results.values()):
        out["pooled"] = pooled_lifts(results)
    return out


def pooled_lifts(results: dict[int, dict], seed: int = 0) -> dict:
    """Per domain, completion Recall@10 lifts with a paired bootstrap over every fold's queries
    pooled: the fine-tuned channel over its zero-shot, bundlerec over the best baseline (by pooled
    mean, the sentence-transformers fine-tune included) and over the sentence-transformers fine-tune."""
    from bundlerec.metrics import paired_lift

    first = next(iter(results.values()))
    out = {}
    for dom in first["per_query"]:
        pooled = {m: np.concatenate([r["per_query"][dom][m] for r in results.values()])
                  for m in first["per_query"][dom] if all(m in r["per_query"][dom] for r in results.values())}
        base = [m for m in first.get("baselines", []) if m in pooled]
        best = max(base, key=lambda m: pooled[m].mean()) if base else None
        pairs = {"tuned_vs_zeroshot": ("tuned", "zeroshot"), "bundlerec_vs_best": ("bundlerec", best),
                 "bundlerec_vs_st_mnrl": ("bundlerec", "st_mnrl"), "tuned_vs_st_mnrl": ("tuned", "st_mnrl")}
        out[dom] = {"queries": len(pooled["bundlerec"]), "best_baseline": best,
                    "recall@10": {m: float(v.mean()) for m, v in pooled.items()},
                    **{k: {"vs": b, **paired_lift(pooled[a], pooled[b], seed)} for k, (a, b) in pairs.items()
                       if a in pooled and b in pooled}}
    return out


def headline_metrics(res: dict) -> dict:
    """The figures of one evaluation (or the fold means of ``--folds``) as flat MLflow metric names:
    ``<task>/<domain>/<method>/<metric>`` and ``<lift>/<domain>/<metric>`` (``@`` spelled ``_at_``)."""
    name = lambda *p: "/".join(str(x).replace("@", "_at_").replace("+", "_plus_") for x in p)  # noqa: E731
    out = {}
    src = res.get("summary", res)
    for task, metrics in (("completion", ("recall@10", "ndcg@10")), ("generation", ("f1",)), ("intent", ("recall@10",)),
                          ("naming", ("rouge1_f1",)), ("personal", ("f1", "best_jaccard"))):
        for dom, methods in src.get(task, {}).items():
            for m, v in methods.items():
                for k in metrics:
                    if k in v:
                        out[name(task, dom, m, k)] = float(v[k]["mean"] if isinstance(v[k], dict) else v[k])
    if "summary" not in res:
        for key in ("lift", "intent_lift", "naming_lift", "personal_lift"):
            for dom, lift in res.get(key, {}).items():
                for k, x in lift.items():
                    if isinstance(x, dict) and "lift" in x:
                        out[name(key, dom, k)] = float(x["lift"])
                        out[name(key, dom, k) + "_ci95_lo"], out[name(key, dom, k) + "_ci95_hi"] = map(float, x["ci"])
    return out


def markdown(res: dict) -> str:
    """Markdown tables of one evaluation, or of dev folds (mean ± SD, per-fold lifts)."""
    lines = []
    if "summary" in res:
        sm = res["summary"]
        for task, metric, title in (("completion", "recall@10", "Completion Recall@10"), ("completion", "ndcg@10", "Completion NDCG@10"),
                                    ("intent", "recall@10", "Intent -> bundle Recall@10"), ("generation", "f1", "Detection F1"),
                                    ("naming", "rouge1_f1", "Bundle names: ROUGE-1 F1 against the annotated intent"),
                                    ("personal", "best_jaccard", "Personalized generation (history -> the session's other bundles): best Jaccard"),
                                    ("personal", "f1", "Personalized generation: one-to-one F1")):
            if task not in sm:
                continue
            doms = list(sm[task])
            methods = list(sm[task][doms[0]])
            lines += [f"**{title}** (mean ± SD over folds {', '.join(map(str, sm['folds']))})", "",
                      "| method | " + " | ".join(doms) + " |", "|---|" + "---|" * len(doms)]
            for m in methods:
                lines.append(f"| {m} | " + " | ".join(f"{sm[task][d][m][metric]['mean']:.4f} ± {sm[task][d][m][metric]['sd']:.4f}"
                                                     if m in sm[task][d] else "–" for d in doms) + " |")
            lines.append("")
        for key, title in (("lift", "bundlerec's completion Recall@10 lift over the best baseline"),
                           ("intent_lift", "bundlerec's intent Recall@10 lift over the best of lexical/zeroshot"),
                           ("naming_lift", "bundlerec's naming ROUGE-1 F1 lift over the best of zeroshot/lexical/category"),
                           ("personal_lift", "bundlerec's personalized-generation best-Jaccard lift over the best greedy baseline")):
            if key not in sm:
                continue
            lines += [f"**{title}** (paired bootstrap 95 % interval per fold)", "", "| domain | mean | per fold |", "|---|---|---|"]
            for d, v in sm[key].items():
                per = "; ".join(f"{f}: {x['lift']:+.1%} [{x['ci'][0]:+.1%}, {x['ci'][1]:+.1%}] vs {x['vs']}"
                                for f, x in v["per_fold"].items())
                lines.append(f"| {d} | {v['mean']:+.1%} | {per} |")
            lines.append("")
        if "pooled" in sm:
            keys = ("tuned_vs_zeroshot", "tuned_vs_st_mnrl", "bundlerec_vs_best", "bundlerec_vs_st_mnrl")
            lines += ["**Completion Recall@10 lifts, paired bootstrap 95 % over the folds' pooled queries**", "",
                      "| domain | queries | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
            for d, v in sm["pooled"].items():
                cells = [f"{v[k]['lift']:+.1%} [{v[k]['ci'][0]:+.1%}, {v[k]['ci'][1]:+.1%}]"
                         + (f" vs {v[k]['vs']}" if k == "bundlerec_vs_best" else "") if k in v else "–" for k in keys]
                lines.append(f"| {d} | {v['queries']} | " + " | ".join(cells) + " |")
            lines.append("")
        return "\n".join(lines)
    for task, metric in (("completion", "recall@10"), ("intent", "recall@10"), ("generation", "f1"), ("naming", "rouge1_f1"),
                         ("personal", "best_jaccard")):
        if task not in res:
            continue
        doms = list(res[task])
        methods = list(res[task][doms[0]])
        lines += [f"| {task} {metric} | " + " | ".join(doms) + " |", "|---|" + "---|" * len(doms)]
        for m in methods:
            cells = []
            for d in doms:
                v = res[task][d].get(m)
                ci = v.get(f"{metric}_ci") if v else None
                cells.append("–" if v is None else f"{v[metric]:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    if "leak_gate" in res and "completion" in res:
        doms = list(res["leak_gate"])
        lines += ["**Leak gate** (completion; share of the top 10 seen in training bundles / Recall@10 on seen "
                  "and unseen targets; fails: top-10 seen share more than "
                  f"{LEAK_GATE_POINTS:.0%} below zero-shot's)", "",
                  "| method | " + " | ".join(doms) + " |", "|---|" + "---|" * len(doms)]
        for m in res["completion"][doms[0]]:
            cells = []
            for d in doms:
                v, g = res["completion"][d].get(m, {}), res["leak_gate"][d]["methods"].get(m)
                cells.append("–" if "seen_share@10" not in v else
                             f"{v['seen_share@10']:.3f} / {v['recall@10_seen']:.3f} / {v['recall@10_unseen']:.3f}"
                             + ("" if g is None or g["passes"] else " **fails**"))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
