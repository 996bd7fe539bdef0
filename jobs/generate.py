"""Generate the synthetic clickstream (1k .. 10M events) as sharded Parquet files.

    python -m jobs.generate --out data/synth synthetic.n_events=1000000 synthetic.n_users=100000
"""

from __future__ import annotations

import argparse
import json

from bundlerec.config import ConfigError, SyntheticConfig, apply_overrides, from_dict
from bundlerec.data.synthetic import generate
from bundlerec.runtime import setup_env


def main(argv: list[str] | None = None) -> dict:
    setup_env()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (events/, catalog.parquet, bundles.parquet)")
    p.add_argument("overrides", nargs="*", help="synthetic.<key>=value")
    args = p.parse_args(argv)
    try:
        conf = from_dict(SyntheticConfig, apply_overrides({}, args.overrides).get("synthetic", {}), "synthetic.")
    except ConfigError as e:  # one line, exit status 2, nothing written
        p.error(str(e))
    summary = generate(conf, args.out)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
