"""The `bundlerec` command as users run it: the installed console script, its help, and
`bundlerec submit` through a real `ray job submit` to the suite's Ray cluster."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml

from jobs.cli import STAGES, submit_command
from tests.support import ROOT, require_job_agent

BUNDLEREC = str(Path(sys.executable).with_name("bundlerec"))  # the console script `make setup` installs


def _run(*args, cwd=None, timeout=120):
    return subprocess.run([BUNDLEREC, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_stage_and_each_stage_explains_itself():
    r = _run("--help")
    assert r.returncode == 0, r.stderr
    for stage in [*STAGES, "submit"]:
        assert f"  {stage} " in r.stdout, stage
    r = _run("prep", "--help")  # the stage's own help: its docstring, --config and the overrides
    assert r.returncode == 0 and r.stdout.startswith("Usage: bundlerec prep"), r.stdout + r.stderr
    assert "--config" in r.stdout and "dotted overrides" in r.stdout and "Ray Data" not in r.stderr
    r = _run("eval-bundles", "--help")
    assert r.returncode == 0 and "--eval-dir" in r.stdout
    from importlib.metadata import version

    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"bundlerec {version('bundlerec')}"


def test_every_stage_is_one_typer_command_whose_examples_render_as_written():
    """One style: `bundlerec STAGE --help` and `python -m jobs.STAGE --help` print the same command's
    help (its usage line named as it was called), with the docstring's example lines verbatim."""
    import importlib
    import inspect

    from bundlerec.cli import option_paths

    for stage, (module, _) in STAGES.items():
        doc = inspect.getdoc(importlib.import_module(module).command)
        examples = [ln.strip() for ln in doc.split("\b", 1)[1].splitlines() if ln.strip().startswith(("bundlerec ", "python -m"))]
        assert examples, stage  # every stage shows how it is run
        r = _run(stage, "--help")
        assert r.returncode == 0 and r.stdout.startswith(f"Usage: bundlerec {stage} [OPTIONS]"), (stage, r.stdout + r.stderr)
        for line in examples:
            assert line in r.stdout, (stage, line)  # not re-wrapped into runs of spaces
        paths, takes_config = option_paths(importlib.import_module(module).command)
        assert not takes_config or ("--config FILE" in r.stdout and "KEY=VALUE" in r.stdout), stage
        assert all(o in r.stdout for o in paths), stage
    r = subprocess.run([sys.executable, "-m", "jobs.split_intent", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("Usage: python -m jobs.split_intent [OPTIONS]")
    r = subprocess.run([sys.executable, "-m", "jobs.eval_bundles", "--out", "x.json", "--folds", "one"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--folds" in r.stderr and "Traceback" not in r.stderr, r.stderr  # not a list of integers
    from bundlerec.cli import click_command
    from jobs.eval_bundles import command

    ctx = click_command(command).make_context("eval-bundles", ["--out", "o", "--folds", "1", "2", "3", "train.epochs=1"])
    assert ctx.params["folds"] == [1, 2, 3] and ctx.params["overrides"] == ["train.epochs=1"]  # argparse's nargs kept
    assert click_command(command).make_context("eval-bundles", ["--out", "o", "--folds=2,4"]).params["folds"] == [2, 4]


def test_a_bad_override_fails_with_one_clear_line_and_no_compute():
    r = _run("prep", "--config", "jobs/configs/tiny.yaml", "data.no_such_key=3", cwd=ROOT)
    assert r.returncode != 0
    assert "data.no_such_key" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.returncode == 2 and r.stderr.startswith("Usage: bundlerec prep")


def test_submit_keeps_outputs_where_the_command_runs(tmp_path, monkeypatch):
    local = "http://127.0.0.1:8265"
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer")  # MLflow with authentication: forwarded
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret-of-the-trainer")
    cmd = submit_command("train", ["--config", "jobs/configs/tiny.yaml"], address=local, output_root=None,
                         runtime_env=None, no_wait=False, cwd=str(tmp_path))
    assert cmd[cmd.index("--") + 1:] == ["python", "-m", "jobs.train", "--config", "jobs/configs/tiny.yaml",
                                         f"output_root={tmp_path.resolve()}"]
    env = yaml.safe_load(open(cmd[cmd.index("--runtime-env") + 1]))  # the project's, made explicit
    assert env["working_dir"] == str(ROOT) and ".venv" in env["excludes"]
    assert env["env_vars"]["BUNDLEREC_GIT_COMMIT"].split("-")[0] == subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    # the identity goes as a private file whose path the job's env holds: Ray shows env_vars in its
    # dashboard and keeps them in its job table, so the password itself is never there
    assert "secret-of-the-trainer" not in yaml.safe_dump(env) and "MLFLOW_TRACKING_PASSWORD" not in env["env_vars"]
    creds = env["env_vars"]["BUNDLEREC_MLFLOW_CREDENTIALS_FILE"]
    assert stat.S_IMODE(os.stat(creds).st_mode) == 0o600
    from bundlerec.tracking import load_credentials

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    monkeypatch.setenv("BUNDLEREC_MLFLOW_CREDENTIALS_FILE", creds)
    load_credentials()  # what the job's driver, its Train workers and its Tune trials do first
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "trainer" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "secret-of-the-trainer"
    # a remote cluster gets no credentials from this shell
    remote = submit_command("pipeline", [], address="http://10.0.0.5:8265", output_root="s3://b/p", runtime_env=None,
                            no_wait=False)
    renv = yaml.safe_load(open(remote[remote.index("--runtime-env") + 1]))
    assert "BUNDLEREC_MLFLOW_CREDENTIALS_FILE" not in renv.get("env_vars", {}) and "secret" not in yaml.safe_dump(renv)
    # the documented switch for hub downloads reaches the job (and overrides the offline default)
    monkeypatch.setenv("BUNDLEREC_ALLOW_DOWNLOAD", "1")
    cmd = submit_command("train", ["--config", "jobs/configs/tiny.yaml"], address=local, output_root=None,
                         runtime_env=None, no_wait=False, cwd=str(tmp_path))
    env = yaml.safe_load(open(cmd[cmd.index("--runtime-env") + 1]))
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "0" and env["env_vars"]["BUNDLEREC_ALLOW_DOWNLOAD"] == "1"
    from bundlerec.runtime import setup_env, worker_env

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as the Makefile exports it
    setup_env()
    assert os.environ["HF_HUB_OFFLINE"] == "0" and worker_env()["HF_HUB_OFFLINE"] == "0"
    monkeypatch.delenv("BUNDLEREC_ALLOW_DOWNLOAD")
    assert worker_env()["HF_HUB_OFFLINE"] == "1"
    # an explicit output_root wins; argparse stages get their relative paths resolved here
    cmd = submit_command("train", ["output_root=s3://b/p"], address=local, output_root=None, runtime_env=None,
                         no_wait=True, cwd=str(tmp_path))
    assert cmd.count("output_root=s3://b/p") == 1 and "--no-wait" in cmd
    cmd = submit_command("split-intent", ["--src", "/data/x", "--out", "split", "--fold=2"], address=local,
                         output_root=None, runtime_env=None, no_wait=False, cwd=str(tmp_path))
    assert cmd[-5:] == ["--src", "/data/x", "--out", str(tmp_path.resolve() / "split"), "--fold=2"]
    # the path options come from each command's typed options: a config-driven stage's own ones too
    cmd = submit_command("simulate-traffic", ["--out=sim.json", "--users", "5"], address=local, output_root=None,
                         runtime_env=None, no_wait=False, cwd=str(tmp_path))
    assert f"--out={tmp_path.resolve() / 'sim.json'}" in cmd and cmd[-1] == f"output_root={tmp_path.resolve()}"
    cmd = submit_command("eval-bundles", ["--src", "d", "--folds", "1", "2", "--out", "/abs/r.json", "--work-dir", "w"],
                         address=local, output_root=None, runtime_env=None, no_wait=False, cwd=str(tmp_path))
    assert cmd[cmd.index("--") + 1:] == ["python", "-m", "jobs.eval_bundles", "--src", str(tmp_path.resolve() / "d"), "--folds",
                                         "1", "2", "--out", "/abs/r.json", "--work-dir", str(tmp_path.resolve() / "w")]


def test_submit_to_a_remote_cluster_refuses_outputs_that_would_be_lost(tmp_path):
    remote = "http://10.0.0.5:8265"
    with pytest.raises(typer.BadParameter, match="--output-root"):
        submit_command("pipeline", ["--config", "jobs/configs/demo.yaml"], address=remote, output_root=None,
                       runtime_env=None, no_wait=False)
    cmd = submit_command("pipeline", [], address=remote, output_root="s3://bucket/br", runtime_env=None, no_wait=False)
    assert cmd[-1] == "output_root=s3://bucket/br"
    with pytest.raises(typer.BadParameter, match="relative"):
        submit_command("eval-pricing", ["--data-dir", "/d", "--out", "res.json"], address=remote, output_root=None,
                       runtime_env=None, no_wait=False)
    with pytest.raises(typer.BadParameter, match="--work-dir w is relative"):
        submit_command("eval-bundles", ["--src", "/d", "--folds", "1", "--out", "s3://b/r.json", "--work-dir", "w"],
                       address=remote, output_root=None, runtime_env=None, no_wait=False)
    with pytest.raises(typer.BadParameter, match="unknown stage"):
        submit_command("trian", [], address=remote, output_root="s3://b", runtime_env=None, no_wait=False)
    r = _run("submit", "--address", remote, "prep", cwd=tmp_path)  # the command itself: exit 2, nothing sent
    assert r.returncode == 2 and "--output-root" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.e2e
def test_submit_runs_a_ray_job_whose_outputs_land_here(ray_cluster, tmp_path):
    """A real `ray job submit` from a folder outside the project: the job runs in the uploaded copy of
    the project, and its relative --out still lands in the folder the command was run from."""
    require_job_agent()
    r = _run("submit", "--address", ray_cluster, "generate", "--out", "synth", "synthetic.n_users=20",
             "synthetic.n_items=40", "synthetic.n_events=1000", "synthetic.n_bundles=3", cwd=tmp_path, timeout=280)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "succeeded" in r.stdout
    assert (tmp_path / "synth" / "catalog.parquet").exists(), os.listdir(tmp_path)
    assert "synth" in r.stdout and str(tmp_path) in r.stdout  # the job's own output streamed back
