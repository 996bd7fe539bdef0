"""Prep cost as the work grows: events/s, peak memory and disk at several synthetic sizes, as JSON."""

from __future__ import annotations

import json
import tempfile
from typing import Annotated, Optional

from bundlerec.cli import Config, Overrides, config_job, int_list_option, path_option, run


def command(config: Config = None, overrides: Overrides = None,
            sizes: Annotated[list, int_list_option("--sizes", help="synthetic events per run, one run each")] = [1_000_000],  # noqa: B006
            workdir: Annotated[Optional[str], path_option("--workdir", help="raw logs (kept, reused) and prep outputs (default: a temp dir)",
                                                          output=True)] = None,
            out: Annotated[Optional[str], path_option("--out", help="JSON file for the record (default: print only)", output=True)] = None) -> dict:
    """Prep's cost at each of --sizes synthetic events (generated once into --workdir, then prepped as
    a user's logs on the current Ray cluster): events/s with and without the snapshot's hashing,
    peak memory above idle (the whole machine: run it alone), disk, and how time grows between sizes.

    \b
    Examples (`python -m jobs.bench_prep` takes the same arguments):
      python -m jobs.bench_prep --config jobs/configs/demo.yaml --sizes 1000000 10000000 --workdir runs/bench_prep --out docs/bench/prep_cost.json
    """
    from bundlerec.data.bench import prep_cost

    cfg = config_job(config, overrides, tracking=False)
    with tempfile.TemporaryDirectory() as tmp:
        res = prep_cost(cfg, sizes, workdir or tmp)
    print(json.dumps(res["growth"], indent=2))
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=2)
    return res


def main(argv: list[str] | None = None) -> dict:
    return run(command, argv)


if __name__ == "__main__":
    main()
