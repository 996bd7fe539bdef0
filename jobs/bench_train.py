"""Training throughput of the train loop (Ray Train + DeepSpeed) on synthetic fixed-shape data, as JSON."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import replace
from typing import Annotated, Optional

import typer

from bundlerec.cli import Config, Overrides, load, path_option, run, usage_error


def command(config: Config = None, overrides: Overrides = None,
            steps: Annotated[int, typer.Option(help="optimizer steps per epoch (2 epochs run)")] = 30,
            out: Annotated[Optional[str], path_option("--out", help="JSON file for the record (default: print only)", output=True)] = None,
            workdir: Annotated[Optional[str], path_option("--workdir", help="scratch folder for data and checkpoints (default: a temp dir)",
                                                          output=True)] = None,
            shape: Annotated[Optional[str], typer.Option(help="a random-init model shape instead of model.name_or_path")] = None,
            tokenizer: Annotated[str, typer.Option(help="tokenizer folder for --shape")] = "all-MiniLM-L6-v2") -> dict:
    """Training throughput of the train loop (Ray Train + DeepSpeed) on synthetic fixed-shape data:
    samples/s, tokens/s, MFU, step-time breakdown, peak memory, device and versions, as JSON.
    --shape (minilm-l6, bert-large, qwen2-0.5b, qwen2-1.5b, tiny-bert, tiny-qwen2) trains a
    random-init model of that shape (a config and a tokenizer: no weights needed); without it, the
    config's model. Two epochs of --steps steps run; the record is the second's (the first is
    warm-up). No MLflow run is made: the tracking server is not needed.

    \b
    Examples (`python -m jobs.bench_train` takes the same arguments):
      python -m jobs.bench_train --config jobs/configs/demo.yaml --steps 30 --out docs/bench/train-cpu.json
      python -m jobs.bench_train --config jobs/configs/demo.yaml --shape bert-large --steps 50 --out bench/bert-large-z2.json \\
          train.use_gpu=true train.num_workers=1 train.zero_stage=2 train.micro_batch=128
    """
    from bundlerec.runtime import check_versions, init_ray, setup_env
    from bundlerec.train.bench import run_bench, shape_dir

    setup_env()
    cfg = load(config, overrides)
    if steps < 1:
        raise usage_error("--steps must be >= 1")
    check_versions()
    workdir = workdir or tempfile.mkdtemp(prefix="bundlerec-bench-")
    if shape:
        try:
            path = shape_dir(shape, os.path.join(workdir, "models"), tokenizer)
        except ValueError as e:
            raise usage_error(str(e)) from None
        cfg = replace(cfg, model=replace(cfg.model, name_or_path=path, random_init=True))
    init_ray()
    record = run_bench(cfg, steps, out, workdir, shape=shape)
    print(json.dumps(record, indent=2))
    return record


def main(argv: list[str] | None = None) -> dict:
    return run(command, argv)


if __name__ == "__main__":
    main()
