"""Catalog cost as the catalog grows: encoding items/s (driver vs Ray Data) and serving latency and
memory (exact vs ANN, with the ANN's recall), as JSON."""

from __future__ import annotations

import json
import tempfile
from typing import Annotated, Optional

import typer

from bundlerec.cli import int_list_option, path_option, run


def command(export: Annotated[str, path_option("--export", help="an export dir (its model, items and users)")],
            sizes: Annotated[list, int_list_option("--sizes", help="catalog sizes for the serving curve")] = [10_000, 100_000],  # noqa: B006
            encode_sizes: Annotated[list, int_list_option("--encode-sizes", help="catalog sizes for the encoding curve (none: skip)")] = [],  # noqa: B006
            requests: Annotated[int, typer.Option(help="recommend calls per size and mode")] = 300,
            nprobe: Annotated[int, typer.Option(help="IVF cells searched per query (serve.ann_nprobe)")] = 48,
            actors: Annotated[int, typer.Option(help="Ray Data encoder actors (one CPU each)")] = 2,
            workdir: Annotated[Optional[str], path_option("--workdir", help="resized exports, one at a time (default: a temp dir)",
                                                          output=True)] = None,
            out: Annotated[Optional[str], path_option("--out", help="JSON file for the record (default: print only)", output=True)] = None) -> dict:
    """The catalog's cost at each size: the item tower's items/s in this process and by Ray Data
    batch inference (--encode-sizes; needs a Ray cluster), and for --sizes a copy of --export resized
    to that many items served in a fresh process: its memory, p50/p99 of a recommendation with exact
    scoring and with the IVF index, and the index's recall against exact. Run it alone on the machine.

    \b
    Examples (`python -m jobs.bench_catalog` takes the same arguments):
      python -m jobs.bench_catalog --export runs/export100k --sizes 10000 100000 1000000 --encode-sizes 2000 10000 --out docs/bench/catalog_cost.json
    """
    from bundlerec.inference.bench import catalog_cost
    from bundlerec.runtime import setup_env

    setup_env()
    if encode_sizes:
        import ray

        ray.init(address="auto", ignore_reinit_error=True, logging_level="ERROR")
    with tempfile.TemporaryDirectory() as tmp:
        res = catalog_cost(export, sizes, encode_sizes, workdir or tmp, requests=requests, nprobe=nprobe, actors=actors)
    print(json.dumps({"encoding_growth": res["encoding_growth"], "serving_growth": res["serving_growth"]}, indent=2))
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=2)
    return res


def main(argv: list[str] | None = None) -> dict:
    return run(command, argv)


if __name__ == "__main__":
    main()
