"""Pipeline: prep -> train (or tune) -> price -> register -> deploy in one job. What `make demo` submits."""

from __future__ import annotations

import json

from bundlerec.cli import Config, Overrides, config_job, run


def command(config: Config = None, overrides: Overrides = None) -> dict:
    """The config's stages in one job: prep, train (or tune), price, register, deploy. What
    `make demo` submits; prints the summary (also in runs/<name>/summary.json).

    \b
    Examples (`python -m jobs.pipeline` takes the same arguments):
      bundlerec pipeline --config jobs/configs/demo.yaml
      bundlerec submit pipeline --config jobs/configs/demo.yaml train.epochs=3
    """
    from bundlerec.pipeline import run_pipeline
    from bundlerec.privacy import redact

    summary = run_pipeline(config_job(config, overrides))
    print(json.dumps(redact(summary), indent=2))  # summary.json keeps the ids; logs do not
    return summary


def main(argv: list[str] | None = None) -> dict:
    return run(command, argv)


if __name__ == "__main__":
    main()
