"""Load test: p50/p95/p99 of POST /v1/recommendations at several concurrencies, and in-process."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from bundlerec.cli import int_list_option, path_option, run


def command(export: Annotated[str, path_option("--export", help="export dir of the deployed model (users + in-process baseline)",
                                               show_default=False)],
            url: Annotated[str, typer.Option(help="the endpoint")] = "http://127.0.0.1:8000",
            concurrency: Annotated[list, int_list_option("--concurrency", help="clients in flight, one level each")] = [1, 8, 32],  # noqa: B006
            requests: Annotated[int, typer.Option(help="requests per concurrency level")] = 400,
            k: Annotated[int, typer.Option("--k", help="items per answer")] = 10,
            out: Annotated[Optional[str], path_option("--out", help="write the result as JSON here", output=True)] = None,
            token_file: Annotated[Optional[str], path_option("--token-file", help="bearer token file when the endpoint requires auth")] = None,
            kill_replica_at: Annotated[Optional[float], typer.Option(
                metavar="FRACTION", help="fault injection: SIGKILL one replica after this fraction of the requests (one level)")] = None,
            bundle_pressure: Annotated[int, typer.Option(
                metavar="N", help="recommendations alone, then beside N clients sending maximal /v1/bundles requests")] = 0,
            honor_retry_after: Annotated[bool, typer.Option(
                "--honor-retry-after", help="with --bundle-pressure: a bundle client answered 503 waits Retry-After before retrying")] = False,
            build_catalog: Annotated[int, typer.Option(metavar="N", help="only build a copy of --export grown to N items into --to, then exit")] = 0,
            to: Annotated[Optional[str], path_option("--to", help="destination export dir for --build-catalog", output=True)] = None) -> dict:
    """Latency percentiles (p50/p95/p99) of POST /v1/recommendations at several concurrencies, and
    the same model in-process.

    \b
    Examples (`python -m jobs.loadtest` takes the same arguments):
      bundlerec loadtest --export runs/demo/export --token-file runs/demo/api_token --concurrency 1 8 32 --requests 400 --out docs/bench/loadtest.json
      bundlerec loadtest --export runs/demo/export --build-catalog 100000 --to runs/export100k
      bundlerec loadtest --export runs/demo/export --token-file runs/demo/api_token --concurrency 4 --requests 600 --bundle-pressure 32
    """
    from bundlerec.serving.deploy import read_token
    from bundlerec.serving.loadtest import build_large_catalog, format_report, run_loadtest

    if build_catalog:
        print(build_large_catalog(export, to, build_catalog))
        return {}
    res = run_loadtest(url, export, concurrency, requests, k, read_token(token_file), kill_replica_at, bundle_pressure,
                       honor_retry_after)
    plain = kill_replica_at is None and not bundle_pressure
    print(format_report(res) if plain else json.dumps(res, indent=2))
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=2)
    return res


def main(argv: list[str] | None = None) -> dict:
    return run(command, argv)


if __name__ == "__main__":
    main()
