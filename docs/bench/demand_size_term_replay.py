"""The size term of the refit's take rate, ablated (docs/pricing.md, "Why the size term"): four
explore-and-refit rounds on tests/test_demand.py's generator with interest falling with bundle size
(3,000 shoppers a round, 3 seeds), with and without the size term. No services.

    .venv/bin/python docs/bench/demand_size_term_replay.py > docs/bench/demand_size_term_replay.json
"""
import json
import sys

import numpy as np
import pandas as pd

sys.path.insert(0, ".")
from bundlerec.experiments.simulator import Demand  # noqa: E402
from bundlerec.pricing import feedback  # noqa: E402
from bundlerec.pricing.demand import PricingModel  # noqa: E402
from tests.test_demand import _logs, _model, _served_by  # noqa: E402

demand, r = Demand(mu=-0.3, s=0.15, per_item=0.0), np.linspace(0.05, 1.0, 1901)


def revenue_ratio(model: PricingModel, n: int) -> float:
    b = model.price_many([dict(item_prices=[25.0] * n)], max_discount=0.95)[0]
    truth = r * demand.population(r, n)
    return float(np.interp((b["bundle_price"] or 25.0 * n) / (25.0 * n), r, truth) / truth.max())


out = []
for size_term in (False, True):
    for seed in range(3):
        model, rows = PricingModel(s=0.15, linear={"theta": [1.0, 0.0, 0.0], "take_rate": [1.0] * 3}), []
        for k in range(4):
            imp, fb, prices = _logs(demand, 3000, _served_by(model), seed=100 * seed + k, interest_by_size=True)
            rows.append(feedback.offers(imp, fb, prices))
            fit = feedback.fit(pd.concat(rows, ignore_index=True), size_term=size_term)
            model = _model(fit)
            out.append({"size_term": size_term, "seed": seed, "round": k + 1, "s": round(fit["s"], 4),
                        "theta": [round(t, 3) for t in fit["theta"]], "take_rate_size": round(fit["take_rate_size"], 3),
                        "min_ratio": round(fit["min_ratio"], 3), "n_accepted": fit["n_accepted"],
                        "revenue_ratio_to_oracle": {n: round(revenue_ratio(model, n), 3) for n in (2, 3, 4)}})
            print(json.dumps(out[-1]), file=sys.stderr, flush=True)
print(json.dumps({"demand": {"mu": -0.3, "s": 0.15}, "shoppers_per_round": 3000, "runs": out}, indent=1))
