"""Generate the synthetic clickstream (1k .. 10M events) as sharded Parquet files."""

from __future__ import annotations

import json
from typing import Annotated

from bundlerec.cli import Overrides, path_option, run


def command(out: Annotated[str, path_option("--out", help="output directory (events/, catalog.parquet, bundles.parquet)",
                                            output=True, show_default=False)],
            overrides: Overrides = None) -> dict:
    """Synthetic clickstream logs with planted bundles, as sharded Parquet files; the overrides are
    synthetic.<key>=value (bundlerec.config.SyntheticConfig).

    \b
    Examples (`python -m jobs.generate` takes the same arguments):
      bundlerec generate --out data/synth synthetic.n_events=1000000 synthetic.n_users=100000
    """
    from bundlerec.cli import usage_error
    from bundlerec.config import ConfigError, SyntheticConfig, apply_overrides, from_dict
    from bundlerec.data.synthetic import generate
    from bundlerec.runtime import setup_env

    setup_env()
    try:
        conf = from_dict(SyntheticConfig, apply_overrides({}, list(overrides or [])).get("synthetic", {}), "synthetic.")
    except ConfigError as e:  # one line, exit status 2, nothing written
        raise usage_error(str(e)) from None
    summary = generate(conf, out)
    print(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> dict:
    return run(command, argv)


if __name__ == "__main__":
    main()
