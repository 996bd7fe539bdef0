"""Pool dev folds 1-3 (docs/bench/eval_bundles_folds123_defaults.json) with fold 4
(docs/bench/eval_bundles_fold4_defaults.json): the four-fold summary and its Markdown table.

    .venv/bin/python docs/bench/pool_folds.py   # writes docs/bench/eval_bundles_folds1234_defaults.{json,md}
"""
import json
import sys

sys.path.insert(0, ".")
from bundlerec.eval.bundle_report import markdown, summarize_folds  # noqa: E402

folds = {int(k): v for k, v in json.load(open("docs/bench/eval_bundles_folds123_defaults.json"))["folds"].items()}
folds[4] = json.load(open("docs/bench/eval_bundles_fold4_defaults.json"))["folds"]["4"]
res = {"folds": folds, "summary": summarize_folds(folds)}
open("docs/bench/eval_bundles_folds1234_defaults.md", "w").write(markdown(res))
json.dump({"folds": sorted(folds), "summary": res["summary"]}, open("docs/bench/eval_bundles_folds1234_defaults.json", "w"),
          indent=1)
