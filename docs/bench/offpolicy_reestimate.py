"""Recompute a bench-demand record's off-policy estimates from the same exploration logs with the
current code (session 25: the first run's estimates dropped the offers shown at list price, a bug
fixed after it ran; the online figures are the record's own).

    .venv/bin/python docs/bench/offpolicy_reestimate.py docs/bench/demand_refit_rounds_homogeneous.json \
        /tmp/dm/online-homogeneous /tmp/dm/runs/tiny/prep > docs/bench/offpolicy_reestimated.json
"""
import json
import sys

sys.path.insert(0, ".")
from bundlerec.experiments import analysis, offpolicy  # noqa: E402
from bundlerec.experiments.simulator import World  # noqa: E402

record, logs, prep = sys.argv[1:4]
r = json.load(open(record))["before_exposure"]
exp = r["estimated_from"]
cols = ["impression_id", "arm", "user_id", "endpoint", "bundle_items", "bundle_list_prices", "bundle_prices",
        "bundle_optimal_prices", "bundle_price_propensities"]
imp = analysis.scan(logs, "impressions", cols, lambda f, _: f("experiment") == exp, 1e9)
fb = analysis.scan(logs, "feedback", analysis.FEEDBACK_COLUMNS, lambda f, _: f("experiment") == exp, 1e9)
shifts = [float(x) for x in r["policies"]]
est = offpolicy.estimate(imp, fb, World(prep).price, shifts, r["width"], 2000, 2)
out = {"estimated_from": exp, "logging": est["logging"], "offers": est["offers"], "policies": {}}
for x in r["policies"]:
    on = r["policies"][x]["online"]
    e = est[str(float(x))]
    out["policies"][x] = {**e, "online": on, **{f"{k}_inside_online_interval": bool(on["interval"][0] <= e[k]["estimate"]
                                                                                      <= on["interval"][1]) for k in ("ips", "dr")}}
print(json.dumps(out, indent=1))
