"""Argument parsing shared by the jobs: ``--config FILE`` plus dotted overrides (``train.lr=3e-5``).
The ``bundlerec`` command itself (a subcommand per stage, ``submit``) is ``jobs/cli.py``."""

from __future__ import annotations

import argparse

from bundlerec.config import ConfigError, PipelineConfig, load_config


def parse(argv: list[str] | None, description: str) -> PipelineConfig:
    return parse_with(argv, description)[0]


def parse_with(argv: list[str] | None, description: str, add_arguments=None) -> tuple[PipelineConfig, argparse.Namespace]:
    """``parse`` for a job with options of its own: ``add_arguments(parser)`` adds them."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (jobs/configs/*.yaml); defaults otherwise")
    if add_arguments is not None:
        add_arguments(p)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-5 data.history_len=20")
    args = p.parse_args(argv)
    try:
        return load_config(args.config, args.overrides), args
    except ConfigError as e:  # a typo in a key or value: one line and exit status 2, before any compute
        p.error(str(e))


def config_job(argv: list[str] | None, description: str, *, ray: bool = True, tracking: bool = True) -> PipelineConfig:
    """The preamble every config-driven job shares: environment, config + overrides, the version
    check, the MLflow server check (before any compute is spent) and the Ray connection."""
    from bundlerec.tracking import check_server, load_credentials
    from bundlerec.runtime import check_versions, init_ray, setup_env

    setup_env()
    load_credentials()
    cfg = parse(argv, description)
    if ray:
        check_versions()
    if tracking:
        from bundlerec.tracking import TrackingError

        try:
            check_server(cfg.mlflow.tracking_uri)  # a down tracking server fails here, before Ray or compute
        except TrackingError as e:
            raise SystemExit(f"bundlerec: {e}") from None  # one clear line, exit status 1, no traceback
    if ray:
        init_ray()
    return cfg
