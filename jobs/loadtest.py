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
            side_by_side: Annotated[bool, typer.Option(
                "--side-by-side", help="the same export behind a bare FastAPI/uvicorn app too, then a deployment handle, one after the other")] = False,
            bare_workers: Annotated[int, typer.Option(metavar="N", help="with --side-by-side: uvicorn worker processes (as many as Serve replicas)")] = 2,
            with_bundles: Annotated[bool, typer.Option("--with-bundles", help="with --side-by-side: POST /v1/bundles measured too")] = False,
            with_mlflow: Annotated[bool, typer.Option(
                "--with-mlflow", help="with --side-by-side: the export as a pyfunc under `mlflow models serve` too (recommendations)")] = False,
            user_key_file: Annotated[Optional[str], path_option(
                "--user-key-file", help="with --side-by-side: the key of a pseudonymized export, for the bare app")] = None,
            slow_bodies: Annotated[int, typer.Option(
                metavar="N", help="recommendations alone, then beside N unauthenticated connections trickling request bodies")] = 0,
            slow_kind: Annotated[str, typer.Option(help="with --slow-bodies: 'trickle' (a byte at a time) or 'chunked' (a chunked body that never ends)")] = "trickle",
            build_catalog: Annotated[int, typer.Option(metavar="N", help="only build a copy of --export grown to N items into --to, then exit")] = 0,
            to: Annotated[Optional[str], path_option("--to", help="destination export dir for --build-catalog", output=True)] = None) -> dict:
    """Latency percentiles (p50/p95/p99) of POST /v1/recommendations at several concurrencies, and
    the same model in-process.

    \b
    Examples (`python -m jobs.loadtest` takes the same arguments):
      bundlerec loadtest --export runs/demo/export --token-file runs/demo/api_token --concurrency 1 8 32 --requests 400 --out docs/bench/loadtest.json
      bundlerec loadtest --export runs/demo/export --build-catalog 100000 --to runs/export100k
      bundlerec loadtest --export runs/demo/export --token-file runs/demo/api_token --concurrency 4 --requests 600 --bundle-pressure 32
      bundlerec loadtest --export runs/demo/export --token-file runs/demo/api_token --concurrency 8 --requests 2000 --slow-bodies 200 --out docs/bench/slow_bodies.json
      bundlerec loadtest --export runs/demo/export --token-file runs/demo/api_token --side-by-side --with-bundles --with-mlflow --user-key-file runs/demo/user_key --out docs/bench/serving_side_by_side.json
    """
    from bundlerec.runtime import setup_env

    setup_env()  # before Ray is imported (the handle path, --kill-replica-at)
    from bundlerec.serving.deploy import read_token
    from bundlerec.serving.loadtest import build_large_catalog, format_report, run_loadtest

    if build_catalog:
        print(build_large_catalog(export, to, build_catalog))
        return {}
    if slow_bodies:
        from bundlerec.serving.hostile import slow_bodies_level
        from bundlerec.serving.loadtest import users_of

        res = slow_bodies_level(url, users_of(export), concurrency[0], requests, k, read_token(token_file), slow_bodies, slow_kind)
        print(json.dumps(res, indent=2))
        if out:
            with open(out, "w") as f:
                json.dump(res, f, indent=2)
        return res
    if side_by_side:
        from bundlerec.serving.loadtest import format_side_by_side, side_by_side as measure

        res = measure(url, export, concurrency, requests, k, token_file, bare_workers,
                      ["recommendations", "bundles"] if with_bundles else ["recommendations"], user_key_file=user_key_file)
        if with_mlflow:
            from bundlerec.serving.mlflow_serve import add_mlflow_leg, format_levels

            add_mlflow_leg(res, export, concurrency, requests, k, bare_workers, user_key_file)
        print(format_side_by_side(res))
        if with_mlflow:
            print(format_levels(res["mlflow"]))
        if out:
            with open(out, "w") as f:
                json.dump(res, f, indent=2)
        return res
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
