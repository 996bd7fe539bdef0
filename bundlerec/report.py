"""One evaluation report per run, logged to MLflow under ``report/``: pictures where people would
rather look than read.

* ``curves.png``      -- training loss (per logged step and per epoch) and validation NDCG/Recall@10;
* ``comparison.png``  -- the model against every baseline on the test split, 95 % bootstrap intervals;
* ``examples.html``   -- a few test users: their history, the recommended items and the priced bundles,
  computed by :class:`bundlerec.inference.recommender.Recommender` (the code the endpoint runs);
* ``report.html``     -- all of it in one self-contained page (images inlined), what to open first.

User ids never appear in clear (short digests, as in the logs).
"""

from __future__ import annotations

import base64
import html
import os
from typing import Optional

from bundlerec.eval.plots import plot_comparison, plot_curves
from bundlerec.privacy import hash_id


def example_users(export_dir: str, user_ids: list[str], user_key: Optional[bytes], n_bundles: int = 2,
                  k: int = 5) -> list[dict]:
    """History -> recommendations -> bundles for each user, from the export as the endpoint serves it."""
    from bundlerec.inference.recommender import Recommender

    rec = Recommender.from_export(export_dir, user_key)
    out = []
    for u in user_ids:
        h = rec.history_for_user(u)
        out.append({"user": f"user {hash_id(u)}", "history": rec.describe_history(h),
                    "recommended": rec.recommend(user_id=u, k=k)["items"],
                    "bundles": rec.bundles(h, n=n_bundles, max_size=3) if rec.bundle_engine else []})
    return out


def _money(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def examples_html(examples: list[dict]) -> str:
    e = html.escape
    parts = []
    for ex in examples:
        hist = "".join(f"<li>{e(h['event_type'])}: {e(h['title'])}</li>" for h in ex["history"]) or "<li>(none)</li>"
        recs = "".join(f"<li>{e(r['title'])} <span class=m>{_money(r['price'])}</span></li>" for r in ex["recommended"])
        bundles = []
        for b in ex["bundles"]:
            items = "".join(f"<li>{e(i['title'])} <span class=m>{_money(i['price'])} · {e(i['reason'])}</span></li>"
                            for i in b["items"])
            price = ("not priced" if b.get("bundle_price") is None else
                     f"{_money(b['bundle_price'])} (list {_money(b.get('list_price'))}, "
                     f"−{round(100 * (b.get('discount') or 0))} %)")
            bundles.append(f"<div class=bundle><b>{e(b['name'])}</b> — {e(price)} <span class=m>{e(b['price_source'])}"
                           f"</span><ul>{items}</ul></div>")
        parts.append(f"<section class=example><h3>{e(ex['user'])}</h3><div class=cols><div><h4>history</h4><ol>{hist}"
                     f"</ol></div><div><h4>recommended</h4><ol>{recs}</ol></div><div><h4>bundles</h4>"
                     f"{''.join(bundles) or '<p class=m>none</p>'}</div></div></section>")
    return "".join(parts)


STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:20px;color:#1d2330;max-width:1200px}
table{border-collapse:collapse}td,th{border:1px solid #d5dae4;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}.m{color:#6b7486;font-size:12px}.cols{display:flex;gap:24px}
.cols>div{flex:1}.bundle{border:1px solid #dde1ea;border-radius:6px;padding:6px 8px;margin:6px 0}
img{max-width:100%;border:1px solid #eee}"""


def _img(path: Optional[str], alt: str) -> str:
    if not path:
        return "<p class=m>no training history (evaluation of an existing export)</p>"
    data = base64.b64encode(open(path, "rb").read()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def metrics_table(metrics: dict) -> str:
    cols = ["ndcg@10", "recall@10", "mrr@10", "ndcg@20", "recall@20", "coverage@10"]
    head = "".join(f"<th>{c}</th>" for c in cols)
    rows = []
    for m, v in metrics.items():
        cells = []
        for c in cols:
            ci = v.get("ci95", {}).get(c)
            cells.append(f"<td>{v.get(c, float('nan')):.4f}" + (f"<br><span class=m>[{ci[0]:.4f}, {ci[1]:.4f}]</span>"
                                                                 if ci else "") + "</td>")
        rows.append(f"<tr><td>{html.escape(m)}</td>{''.join(cells)}</tr>")
    return f"<table><tr><th>method</th>{head}</tr>{''.join(rows)}</table>"


def write_report(out_dir: str, *, title: str, metrics: dict, history: list[dict],
                 steps: Optional[list[tuple[int, float]]], examples: list[dict], facts: dict) -> dict:
    """Write the pictures, examples.html and report.html into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    curves = plot_curves(history, steps, os.path.join(out_dir, "curves.png"))
    comparison = plot_comparison(metrics, os.path.join(out_dir, "comparison.png"))
    ex = examples_html(examples)
    with open(os.path.join(out_dir, "examples.html"), "w") as f:
        f.write(f"<!doctype html><meta charset=utf-8><title>example bundles</title><style>{STYLE}</style>"
                f"<h1>Example bundles</h1>{ex}")
    fact_rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    page = (f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>{STYLE}</style>"
            f"<h1>{html.escape(title)}</h1><table>{fact_rows}</table>"
            f"<h2>Test split: the model and every baseline</h2>{metrics_table(metrics)}"
            f"<p class=m>Baselines: popular = most purchased in training; itemknn = item co-occurrence in training "
            f"histories; zeroshot = the pretrained encoder before fine-tuning. Intervals: 95 % bootstrap over test "
            f"baskets (1000 resamples). The checkpoint was chosen on validation, never on test.</p>"
            f"<div id=comparison>{_img(comparison, 'comparison with baselines')}</div>"
            f"<h2>Training</h2><div id=curves>{_img(curves, 'training curves')}</div>"
            f"<h2>Example bundles</h2><p class=m>computed by the serving code on the registered export</p>{ex}")
    path = os.path.join(out_dir, "report.html")
    with open(path, "w") as f:
        f.write(page)
    return {"report": path, "curves": curves, "comparison": comparison,
            "examples": os.path.join(out_dir, "examples.html")}
