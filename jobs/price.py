"""Price: fit the bundle-pricing model (cfg.pricing.data_dir, Steam bundles format; cross-validated
there) into the export of results.json (from jobs.train or jobs.tune), re-sealed; results.json and
the run's MLflow metrics (pricing/*) say what was fitted. New pricing data without retraining; then
register the export again.

    python -m jobs.price --config jobs/configs/demo.yaml output_root=$PWD
"""

from __future__ import annotations

import json

from bundlerec.cli import parse
from bundlerec.price import run_price_stage
from bundlerec.runtime import setup_env


def main(argv: list[str] | None = None) -> dict:
    setup_env()
    out = run_price_stage(parse(argv, __doc__))["pricing"]
    print(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
