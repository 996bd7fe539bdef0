"""Re-judge the 40 logged A/A experiments of docs/bench/aa_false_positives.json with the promotion
rule at min_units=50 (the logs are unchanged; only the rule's sample-size floor differs)."""
import json, sys
import pandas as pd
from bundlerec.config import PromotionRule
from bundlerec.experiments import analysis
from bundlerec.experiments.lifecycle import decide
from bundlerec.experiments.lifecycle import wilson

root = sys.argv[1]  # the A/A logs: <serve.event_log_dir> of the run (python docs/bench/aa_rejudge.py DIR)
imp_all = pd.read_parquet(f"{root}/impressions", columns=analysis.IMPRESSION_COLUMNS)
fb_all = pd.read_parquet(f"{root}/feedback", columns=analysis.FEEDBACK_COLUMNS)
d = json.load(open("docs/bench/aa_false_positives.json"))
out = []
for i, r in enumerate(d["results"]):
    name = r["experiment"]
    spec = {"name": name, "salt": name, "control": "a", "arms": {"a": {"share": 0.5}, "b": {"share": 0.5}}}
    rep = analysis.report(imp_all[imp_all.experiment == name], fb_all[fb_all.experiment == name], spec, 2000, i, 0.95)
    for mu in (50, 100):
        dec = decide(rep, PromotionRule(min_units=mu), "a")
        out.append((mu, dec["promote"] is not None))
    assert abs(rep["differences"]["b"]["revenue_per_impression"]["estimate"] - r["revenue_per_impression"]["estimate"]) < 1e-9
for mu in (50, 100):
    k = sum(p for m, p in out if m == mu)
    print(f"min_units={mu}: {k}/40 promoted, rate {k/40:.3f}, wilson95 {wilson(k, 40)}")
