"""The ``bundlerec`` command: one subcommand per stage, ``bundlerec submit <stage>`` for a Ray cluster.

    bundlerec --help                                   # the stages
    bundlerec prep --help                              # one stage: what it does, its options
    bundlerec pipeline --config jobs/configs/demo.yaml train.epochs=3
    bundlerec submit pipeline --config jobs/configs/demo.yaml           # ray job submit, outputs kept here
    bundlerec submit --address http://head:8265 --output-root s3://bucket/bundlerec train --config ...

Every stage is a thin module beside this one in ``jobs/`` whose ``command`` is the typer command registered
here, the one ``python -m jobs.<stage>`` and ``ray job submit`` run: all three spellings take the same options
(``--config`` and dotted overrides ``train.lr=3e-5`` for the config-driven stages). The options that name files
are typed as such in each command (``bundlerec.cli.path_option``), which is how ``submit`` finds them.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import typer

from bundlerec.cli import StageCommand, option_paths

# subcommand -> (module under jobs/ whose `command` it runs, one line for `bundlerec --help`)
STAGES: dict[str, tuple[str, str]] = {
    "generate": ("jobs.generate", "synthetic clickstream logs with planted bundles (Parquet)"),
    "prep": ("jobs.prep", "Ray Data: validate (quarantine), sessionize, split, tokenize"),
    "train": ("jobs.train", "Ray Train + DeepSpeed ZeRO fine-tuning, export, test-split evaluation"),
    "tune": ("jobs.tune", "Ray Tune sweep of train (ASHA, Optuna); resumable"),
    "price": ("jobs.price", "fit the bundle-pricing model into the trained export (new pricing data, no retraining)"),
    "register": ("jobs.register", "MLflow registry: new version; champion only if it wins on validation"),
    "deploy": ("jobs.deploy", "Ray Serve: deploy models:/bundlerec@champion and wait until it answers"),
    "pipeline": ("jobs.pipeline", "prep + train (or tune) + price + register + deploy, as the config's stages say"),
    "eval-bundles": ("jobs.eval_bundles", "bundle completion/detection/intents on bundlerec_intent data"),
    "eval-pricing": ("jobs.eval_pricing", "bundle-price accuracy on the Steam bundles (k-fold)"),
    "split-intent": ("jobs.split_intent", "split a bundlerec_intent directory by user (dev folds)"),
    "loadtest": ("jobs.loadtest", "latency percentiles of the live endpoint at several concurrencies"),
    "experiment": ("jobs.experiment", "start / status / stop an online experiment (arms = registry versions)"),
    "experiment-report": ("jobs.experiment_report", "per-arm online metrics with intervals, SRM; --promote"),
    "simulate-traffic": ("jobs.simulate_traffic", "simulated shoppers against the live endpoint (A/B, A/A)"),
    "fit-demand": ("jobs.fit_demand", "refit the bundle demand model on the endpoint's offers and feedback; register it"),
    "bench-demand": ("jobs.bench_demand", "the pricing loop in the simulator: explore, refit, compare with the oracle"),
}
NO_AGENT = "No available agent to submit job"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# ---------------------------------------------------------------- the command

app = typer.Typer(name="bundlerec", no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                  help="bundlerec: clickstream logs -> fine-tuned two-tower model -> priced bundles over HTTP. "
                       "Each stage takes --config FILE and dotted overrides; `bundlerec STAGE --help` explains it.")


def stage_function(stage: str):
    """The typer command function of a stage (its job module's ``command``)."""
    return importlib.import_module(STAGES[stage][0]).command


for _stage, (_module, _short) in STAGES.items():
    app.command(_stage, cls=StageCommand, short_help=_short)(stage_function(_stage))


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"bundlerec {version('bundlerec')}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                           help="Print the installed bundlerec version and exit.")) -> None:
    """bundlerec: clickstream logs -> fine-tuned two-tower model -> priced bundles over HTTP."""


def project_root() -> Path:
    """The folder holding jobs/ (what ``ray job submit`` uploads as the job's working directory)."""
    return Path(__file__).resolve().parent.parent


def submit_command(stage: str, args: list[str], *, address: str, output_root: Optional[str],
                   runtime_env: Optional[str], no_wait: bool, cwd: Optional[str] = None) -> list[str]:
    """The ``ray job submit`` command line for a stage, with every output location made explicit.

    A job runs in an uploaded copy of the project: a relative output path would land in that copy and
    vanish with it. On a cluster on this machine (loopback address) relative paths are resolved here,
    where the command runs; on a remote cluster they are refused unless ``--output-root`` (s3://…, or
    a path every node shares) says where outputs go."""
    if stage not in STAGES:
        raise typer.BadParameter(f"unknown stage {stage!r}; one of {', '.join(STAGES)}", param_hint="STAGE")
    module = STAGES[stage][0]
    path_options, takes_config = option_paths(stage_function(stage))
    here = Path(cwd or os.getcwd()).resolve()
    local = (urlparse(address).hostname or "") in LOOPBACK
    args = list(args)
    if takes_config:
        if not any(a.startswith("output_root=") for a in args):
            if output_root:
                args.append(f"output_root={output_root}")
            elif local:
                args.append(f"output_root={here}")
            else:
                raise typer.BadParameter(
                    f"{address} is not this machine: the job runs in an uploaded copy of the project, so outputs "
                    "written under it are lost when the job ends. Say where they go: --output-root s3://bucket/prefix "
                    "(or a path every node shares), or the override output_root=...", param_hint="--output-root")
        for i, a in enumerate(args):  # a config file outside the uploaded project: pass it by absolute path
            if a == "--config" and i + 1 < len(args) and local and (here / args[i + 1]).exists():
                args[i + 1] = str((here / args[i + 1]).resolve())
    for i, a in enumerate(args):  # the options that name files: resolved where the command runs
        opt, eq, val = a.partition("=")
        if opt not in path_options:
            continue
        j = i if eq else i + 1
        v = val if eq else (args[j] if j < len(args) else "")
        if not v or "://" in v or os.path.isabs(v):
            continue
        if local:
            v = str(here / v)
        elif path_options[opt]:  # an output
            raise typer.BadParameter(f"{opt} {v} is relative: on {address} it would be written into the job's "
                                     "uploaded copy of the project and lost; give s3://… or a shared absolute path",
                                     param_hint=opt)
        else:
            continue
        if eq:
            args[i] = f"{opt}={v}"
        else:
            args[j] = v
    env = job_runtime_env(runtime_env, here, local)
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [str(ray_bin) if ray_bin.exists() else "ray", "job", "submit", "--address", address, "--runtime-env", env]
    if no_wait:
        cmd.append("--no-wait")
    return [*cmd, "--", "python", "-m", module, *args]


def job_runtime_env(runtime_env: Optional[str], cwd: Path, local: bool = True) -> str:
    """The runtime env the job gets, written to a temp file: the given file (default
    jobs/runtime_env.yaml) with its working_dir made absolute (relative to the project for the
    default file, to ``cwd`` for the user's own) and BUNDLEREC_GIT_COMMIT in env_vars (the uploaded
    copy has no .git; the job's MLflow runs are tagged with the commit from it), and
    BUNDLEREC_ALLOW_DOWNLOAD=1 (with HF_HUB_OFFLINE=0) when the shell allows hub downloads.

    The submitting shell's MLFLOW_TRACKING_USERNAME/PASSWORD, when set, go to a cluster on this
    machine (``local``) as a private file beside the runtime env (mode 0600, removed with it) whose
    path is in env_vars (:data:`bundlerec.tracking.CREDENTIALS_ENV`): Ray keeps a job's env_vars in
    its job table and shows them in the dashboard. A remote cluster gets no credentials from here
    (give it its identity, e.g. the RayJob's ``bundlerec-mlflow-trainer`` Secret)."""
    import tempfile

    import yaml

    from bundlerec.runtime import git_commit

    base = cwd if runtime_env else project_root()
    src = Path(runtime_env) if runtime_env else project_root() / "jobs" / "runtime_env.yaml"
    conf = yaml.safe_load((cwd / src).read_text()) or {}
    wd = conf.get("working_dir")
    if wd and "://" not in wd and not os.path.isabs(wd):
        conf["working_dir"] = str((base / wd).resolve())
    commit = git_commit()
    if commit:
        conf.setdefault("env_vars", {})["BUNDLEREC_GIT_COMMIT"] = commit
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # never as values in the job's env
        conf.get("env_vars", {}).pop(k, None)
    if os.environ.get("BUNDLEREC_ALLOW_DOWNLOAD") == "1":  # the documented switch: hub downloads allowed
        conf.setdefault("env_vars", {}).update({"BUNDLEREC_ALLOW_DOWNLOAD": "1", "HF_HUB_OFFLINE": "0"})
    fd, path = tempfile.mkstemp(prefix="bundlerec-runtime-env-", suffix=".yaml")
    creds = {k: os.environ[k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD") if os.environ.get(k)}
    if creds and local:
        from bundlerec.tracking import CREDENTIALS_ENV, write_env_file

        write_env_file(credentials_file(path), creds)
        conf.setdefault("env_vars", {})[CREDENTIALS_ENV] = credentials_file(path)
    elif creds:
        typer.echo("bundlerec: this shell's MLflow credentials are not sent to a remote cluster (Ray shows a job's "
                   "environment in its dashboard); give the cluster its own identity, e.g. the RayJob's "
                   "bundlerec-mlflow-trainer Secret", err=True)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(conf, f)
    return path


def credentials_file(runtime_env_file: str) -> str:
    """The private file of a job's MLflow identity beside its runtime env file."""
    return runtime_env_file[:-len(".yaml")] + ".mlflow.env"


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(ctx: typer.Context,
           stage: str = typer.Argument(..., help=f"one of: {', '.join(STAGES)}"),
           address: str = typer.Option(os.environ.get("RAY_ADDRESS", "").startswith("http") and os.environ["RAY_ADDRESS"]
                                       or "http://127.0.0.1:8265", help="Ray dashboard (job API) address; $RAY_ADDRESS"),
           output_root: Optional[str] = typer.Option(None, help="where outputs go (s3://…): required for a remote "
                                                     "cluster; default on this machine: the current directory"),
           runtime_env: Optional[str] = typer.Option(None, help="runtime env YAML (default: jobs/runtime_env.yaml)"),
           no_wait: bool = typer.Option(False, "--no-wait", help="return once submitted (follow with `ray job logs -f`)"),
           retries: int = typer.Option(12, help="resubmit this often (every 10 s) while a starting or loaded head has no job agent yet")) -> None:
    """Run a stage as a Ray job (`ray job submit` with the runtime environment and the outputs handled).

    Options of submit come before STAGE; everything after STAGE goes to the stage, e.g.
    `bundlerec submit pipeline --config jobs/configs/demo.yaml train.epochs=3`."""
    cmd = submit_command(stage, ctx.args, address=address, output_root=output_root, runtime_env=runtime_env,
                         no_wait=no_wait)
    typer.echo("bundlerec: " + " ".join(cmd[cmd.index("--") + 1:]) + f"  (on {address})", err=True)
    env_file = cmd[cmd.index("--runtime-env") + 1]
    try:
        _submit_with_retries(cmd, retries)
    finally:
        os.unlink(env_file)
        if os.path.exists(credentials_file(env_file)):
            if no_wait:  # the job reads it when it starts, after this command has returned
                typer.echo(f"bundlerec: the job's MLflow identity is in {credentials_file(env_file)} (mode 0600); "
                           "remove it once the job has started", err=True)
            else:
                os.unlink(credentials_file(env_file))


def _submit_with_retries(cmd: list[str], retries: int) -> None:
    for attempt in range(retries + 1):
        # the uploaded working directory is the project, wherever the command is run from
        proc = subprocess.Popen(cmd, cwd=project_root(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        no_agent = False
        for line in proc.stdout:  # streamed as the job logs arrive
            sys.stdout.write(line)
            sys.stdout.flush()
            no_agent = no_agent or NO_AGENT in line
        rc = proc.wait()
        if rc == 0 or not no_agent or attempt == retries:
            raise typer.Exit(rc)
        # the job was not created: a just-started (or loaded) head's job agent is not up yet
        typer.echo(f"bundlerec: Ray's job agent is not ready yet; submitting again in 10 s ({attempt + 1}/{retries})",
                   err=True)
        time.sleep(10)


def main() -> None:
    from bundlerec.runtime import setup_env

    setup_env()  # before any command imports Ray: it reads its environment (single-node mode, auth) on import
    app()


if __name__ == "__main__":
    main()
