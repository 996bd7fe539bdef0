"""Load test: p50/p95/p99 of POST /v1/recommendations at several concurrencies, and in-process.

    python -m jobs.loadtest --url http://127.0.0.1:8000 --export runs/demo/export \
        --concurrency 1 8 32 --requests 400 --out docs/bench/loadtest.json --token-file runs/demo/api_token
    python -m jobs.loadtest --export runs/demo/export --build-catalog 100000 --to runs/export100k
    python -m jobs.loadtest --export runs/demo/export --token-file runs/demo/api_token \
        --concurrency 4 --requests 600 --bundle-pressure 32      # /v1/bundles must not starve recommendations
"""

from __future__ import annotations

import argparse
import json

from bundlerec.serving.deploy import read_token
from bundlerec.serving.loadtest import build_large_catalog, format_report, run_loadtest


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--export", required=True, help="export dir of the deployed model (users + in-process baseline)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--out", default=None)
    p.add_argument("--token-file", default=None, help="bearer token file when the endpoint requires auth")
    p.add_argument("--kill-replica-at", type=float, default=None, metavar="FRACTION",
                   help="fault injection: SIGKILL one replica after this fraction of the requests (one level)")
    p.add_argument("--bundle-pressure", type=int, default=0, metavar="N",
                   help="recommendations alone, then beside N clients sending maximal /v1/bundles requests")
    p.add_argument("--honor-retry-after", action="store_true",
                   help="with --bundle-pressure: a bundle client answered 503 waits Retry-After before retrying")
    p.add_argument("--build-catalog", type=int, default=0, metavar="N",
                   help="only build a copy of --export grown to N items into --to, then exit")
    p.add_argument("--to", default=None, help="destination export dir for --build-catalog")
    args = p.parse_args(argv)
    if args.build_catalog:
        print(build_large_catalog(args.export, args.to, args.build_catalog))
        return {}
    out = run_loadtest(args.url, args.export, args.concurrency, args.requests, args.k,
                       read_token(args.token_file), args.kill_replica_at, args.bundle_pressure,
                       args.honor_retry_after)
    plain = args.kill_replica_at is None and not args.bundle_pressure
    print(format_report(out) if plain else json.dumps(out, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
