"""Training throughput of the jobs.train loop (Ray Train + DeepSpeed) on synthetic fixed-shape data:
samples/s, tokens/s, MFU, step-time breakdown, peak memory, device and versions, as JSON.

    python -m jobs.bench_train --config jobs/configs/demo.yaml --steps 30 --out docs/bench/train-cpu.json
    python -m jobs.bench_train --config jobs/configs/demo.yaml --shape bert-large --steps 50 \\
        --out bench/bert-large-z2.json train.use_gpu=true train.num_workers=1 train.zero_stage=2 train.micro_batch=128

--shape (minilm-l6, bert-large, qwen2-0.5b, qwen2-1.5b, tiny-bert, tiny-qwen2) trains a random-init
model of that shape (a config and a tokenizer: no weights needed); without it, the config's model.

Two epochs of --steps steps each run; the record is the second's (the first is warm-up). No MLflow
run is made: the tracking server is not needed.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import replace


def main(argv: list[str] | None = None) -> dict:
    from bundlerec.cli import parse_with
    from bundlerec.runtime import check_versions, init_ray, setup_env
    from bundlerec.train.bench import run_bench, shape_dir

    def options(p):
        p.add_argument("--steps", type=int, default=30, help="optimizer steps per epoch (2 epochs run)")
        p.add_argument("--out", default=None, help="JSON file for the record (default: print only)")
        p.add_argument("--workdir", default=None, help="scratch folder for data and checkpoints (default: a temp dir)")
        p.add_argument("--shape", default=None, help="a random-init model shape instead of model.name_or_path")
        p.add_argument("--tokenizer", default="all-MiniLM-L6-v2", help="tokenizer folder for --shape")

    setup_env()
    cfg, args = parse_with(argv, __doc__, options)
    if args.steps < 1:
        raise SystemExit("bundlerec: --steps must be >= 1")
    check_versions()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bundlerec-bench-")
    if args.shape:
        try:
            path = shape_dir(args.shape, os.path.join(workdir, "models"), args.tokenizer)
        except ValueError as e:
            raise SystemExit(f"bundlerec: {e}") from None
        cfg = replace(cfg, model=replace(cfg.model, name_or_path=path, random_init=True))
    init_ray()
    record = run_bench(cfg, args.steps, args.out, workdir, shape=args.shape)
    print(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
