"""Prep: raw clickstream -> validated, sessionized, split, tokenized Parquet shards + manifest."""

from __future__ import annotations

import json

from bundlerec.cli import Config, Overrides, config_job, run


def command(config: Config = None, overrides: Overrides = None) -> dict:
    """Ray Data: read the clickstream, validate it (bad rows quarantined with reasons), sessionize,
    split and tokenize it into Parquet shards and a manifest (data.output_dir).

    \b
    Examples (a local Ray is started on the fly; `python -m jobs.prep` takes the same arguments):
      bundlerec prep --config jobs/configs/demo.yaml
      bundlerec submit prep --config jobs/configs/demo.yaml data.events=s3://bucket/events/ data.output_dir=s3://bucket/prep
    """
    from bundlerec.data.prep import run_prep

    cfg = config_job(config, overrides, tracking=False)
    manifest = run_prep(cfg)
    print(json.dumps({k: manifest[k] for k in ("rows", "quarantine", "examples", "schema_hash")}, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> dict:
    return run(command, argv)


if __name__ == "__main__":
    main()
