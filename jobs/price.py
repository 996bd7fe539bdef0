"""Price: fit the bundle-pricing model into the trained export (new pricing data, no retraining)."""

from __future__ import annotations

import json

from bundlerec.cli import Config, Overrides, load, run


def command(config: Config = None, overrides: Overrides = None) -> dict:
    """Fit the bundle-pricing model (pricing.data_dir, the Steam bundles format; cross-validated
    there) into the export of results.json (from train or tune), re-sealed; results.json and the
    run's MLflow metrics (pricing/*) say what was fitted. Then register the export again.

    \b
    Examples (`python -m jobs.price` takes the same arguments):
      bundlerec price --config jobs/configs/demo.yaml
      bundlerec price --config jobs/configs/demo.yaml pricing.data_dir=/data/my_bundles
    """
    from bundlerec.price import run_price_stage
    from bundlerec.runtime import setup_env

    setup_env()
    out = run_price_stage(load(config, overrides))["pricing"]
    print(json.dumps(out, indent=2, default=str))
    return out


def main(argv: list[str] | None = None) -> dict:
    return run(command, argv)


if __name__ == "__main__":
    main()
