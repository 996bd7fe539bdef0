"""Argument parsing shared by the jobs: ``--config FILE`` plus dotted overrides (``train.lr=3e-5``)."""

from __future__ import annotations

import argparse

from bundlerec.config import PipelineConfig, load_config


def parse(argv: list[str] | None, description: str) -> PipelineConfig:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=None, help="YAML config (jobs/configs/*.yaml); defaults otherwise")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-5 data.history_len=20")
    args = p.parse_args(argv)
    return load_config(args.config, args.overrides)
