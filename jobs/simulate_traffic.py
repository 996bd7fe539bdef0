"""Simulate traffic: synthetic shoppers (the generator's planted preferences, a known response model
with price sensitivity) browse, click, buy and accept bundles against the live endpoint over HTTP.

    python -m jobs.simulate_traffic --config jobs/configs/demo.yaml --users 2000
    python -m jobs.simulate_traffic --config jobs/configs/demo.yaml --aa-runs 20 --users 400   # A/A false positives

``--aa-runs N``: N A/A experiments in a row (both arms = the champion, a new salt each), each
simulated, reported and judged by the promotion rule (never applied): the false-positive rate.
"""

from __future__ import annotations

import json


def main(argv: list[str] | None = None) -> dict:
    from bundlerec.cli import parse_with
    from bundlerec.experiments.simulator import simulate
    from bundlerec.runtime import setup_env
    from bundlerec.serving.deploy import read_token

    def options(p):
        p.add_argument("--users", type=int, default=1000, help="simulated shoppers (two answers each)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--concurrency", type=int, default=4)
        p.add_argument("--aa-runs", type=int, default=0, help="repeated A/A experiments: the false-positive rate")
        p.add_argument("--out", default=None, help="write the result as JSON here")

    setup_env()
    cfg, args = parse_with(argv, __doc__, options)
    token = read_token(cfg.serve.token_file) if cfg.serve.auth else None

    def progress(done, total, s):
        what = "A/A runs" if args.aa_runs else "shoppers"
        print(f"[simulate] {done}/{total} {what}" + (f", {s:.0f}s" if s else ""), flush=True)

    if args.aa_runs:
        from bundlerec.experiments.lifecycle import aa_false_positives
        from bundlerec.runtime import init_ray

        init_ray()  # the reports read the logs with Ray Data

        out = aa_false_positives(cfg, args.aa_runs, args.users, token, args.seed, args.concurrency, progress)
    else:
        out = simulate(cfg.serve.url, cfg.data.output_dir, args.users, token, args.seed, args.concurrency,
                       progress=progress)
    print(json.dumps(out, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
