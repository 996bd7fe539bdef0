"""bundlerec.serving.auth: token sources, 401/403 decisions, rotation through the secret file, no clear-text ids."""

import os
import stat
import time

import pytest

from bundlerec.serving.auth import (
    AuthConfigError,
    TokenAuth,
    read_token_file,
    write_token_file,
)
from bundlerec.privacy import hash_id


def test_token_file_is_private_and_fresh(tmp_path):
    p = tmp_path / "sub" / "api_token"
    a = write_token_file(str(p))
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert read_token_file(str(p)) == [a] and len(a) >= 40
    b = write_token_file(str(p))
    assert a != b and read_token_file(str(p)) == [b] and stat.S_IMODE(os.stat(p).st_mode) == 0o600


PAD = "-padded-to-at-least-24-chars"  # tokens below MIN_TOKEN_CHARS are refused
OLD, NEW = "old" + PAD, "new" + PAD


def test_decisions_env_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("BUNDLEREC_API_TOKENS", f"alpha{PAD}, beta{PAD}")
    f = tmp_path / "tokens"
    f.write_text(f"# comment\ngamma{PAD}\n\n")
    auth = TokenAuth(str(f))
    assert len(auth) == 3
    assert auth.check(None) == (401, auth.check(None)[1]) and auth.check(None)[0] == 401
    assert auth.check("Basic alpha")[0] == 401 and auth.check("Bearer ")[0] == 401
    assert auth.check("Bearer wrong")[0] == 403 and auth.check(f"Bearer alph{PAD}")[0] == 403
    for t in (f"alpha{PAD}", f"beta{PAD}", f"gamma{PAD}"):
        assert auth.check(f"Bearer {t}") is None and auth.check(f"bearer {t}") is None


def test_rotation_reads_the_file_again(tmp_path, monkeypatch):
    monkeypatch.delenv("BUNDLEREC_API_TOKENS", raising=False)
    f = tmp_path / "tokens"
    f.write_text(f"{OLD}\n")
    auth = TokenAuth(str(f))
    assert auth.verify(OLD) and not auth.verify(NEW)
    f.write_text(f"{OLD}\n{NEW}\n")
    os.utime(f, (time.time() + 2, time.time() + 2))
    assert auth.verify(NEW) and auth.verify(OLD)
    f.write_text(f"{NEW}\n")
    os.utime(f, (time.time() + 4, time.time() + 4))
    assert auth.verify(NEW) and not auth.verify(OLD)
    f.unlink()  # briefly missing mid-rotation: the loaded tokens stay valid, nothing opens up
    assert auth.verify(NEW) and not auth.verify("anything")
    f.write_text(f"{NEW}\nshort\n")  # a rotation that adds a guessable token is not taken
    os.utime(f, (time.time() + 6, time.time() + 6))
    assert auth.verify(NEW) and not auth.verify("short")
    with pytest.raises(AuthConfigError, match="1 configured token.s. shorter than 24") as e:
        TokenAuth(str(f))
    assert "short" not in str(e.value).replace("shorter", "")  # the token itself is never shown


def test_a_rotation_caught_mid_write_or_within_one_mtime_tick_is_read_right(tmp_path, monkeypatch):
    """A non-atomic writer caught between truncate and write (an empty file) does not lock every
    client out; a rewrite that keeps the modification time (one tick) is still read; the project's
    own writer replaces the file atomically, so a reader never sees it empty."""
    import threading

    monkeypatch.delenv("BUNDLEREC_API_TOKENS", raising=False)
    f = tmp_path / "tokens"
    f.write_text(f"{OLD}\n")
    auth = TokenAuth(str(f))
    f.write_text("")  # truncated, not yet written
    os.utime(f, (time.time() + 2, time.time() + 2))
    st = os.stat(f)
    assert auth.verify(OLD)  # the empty read is not taken
    f.write_text(f"{NEW}\n")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # the rewrite lands in the empty file's mtime tick
    assert auth.verify(NEW) and not auth.verify(OLD)
    # write_token_file: never empty to a reader, 200 rotations while another thread reads
    path = str(tmp_path / "api" / "tokens")
    write_token_file(path)
    seen_empty, done = [], threading.Event()

    def read():
        while not done.is_set():
            try:
                if not read_token_file(path):
                    seen_empty.append(1)
            except FileNotFoundError:
                seen_empty.append(0)

    th = threading.Thread(target=read)
    th.start()
    for _ in range(200):
        write_token_file(path)
    done.set()
    th.join()
    assert not seen_empty and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not [p for p in os.listdir(tmp_path / "api") if p.endswith(".tmp")]


def test_no_token_configured_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("BUNDLEREC_API_TOKENS", raising=False)
    with pytest.raises(AuthConfigError, match="no token"):
        TokenAuth(None)
    with pytest.raises(AuthConfigError, match="does not exist"):
        TokenAuth(str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n# nothing\n")
    with pytest.raises(AuthConfigError):
        TokenAuth(str(tmp_path / "empty"))


def test_hash_id_is_stable_and_not_clear():
    assert hash_id("U0000007") == hash_id("U0000007") != hash_id("U0000008")
    assert "U0000007" not in hash_id("U0000007") and len(hash_id("x")) == 12


def test_redact_hashes_every_user_id():
    from bundlerec.privacy import redact

    out = redact({"sample_request": {"user_id": "U1", "k": 5}, "rows": [{"user_id": "U2"}], "user": "keep"})
    assert out == {"sample_request": {"user_id": f"<user {hash_id('U1')}>", "k": 5},
                   "rows": [{"user_id": f"<user {hash_id('U2')}>"}], "user": "keep"}


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_the_ray_control_plane_requires_its_token(ray_cluster):
    """Ray's token authentication is on (bundlerec.runtime, the Makefile, cluster/local.sh): the
    dashboard's job API refuses a request without the token and answers one that carries it."""
    import urllib.error
    import urllib.request

    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    assert os.environ["RAY_AUTH_MODE"] == "token"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{ray_cluster}/api/jobs/", timeout=10)
    assert e.value.code in (401, 403)
    headers = get_auth_headers_if_auth_enabled({})
    assert headers, "no Ray auth token found"
    with urllib.request.urlopen(urllib.request.Request(f"{ray_cluster}/api/jobs/", headers=headers), timeout=10) as r:
        assert r.status == 200


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_mlflow_basic_auth_only_the_training_identity_writes_the_registry(tmp_path, monkeypatch):
    """`mlflow server --app-name basic-auth` (what cluster/local.sh MLFLOW_AUTH=basic starts) with the
    identities bundlerec sets up: no request without a user; `trainer` registers, moves aliases and
    starts experiments; `serving` (the replicas) reads the champion and every write it tries is 403."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from bundlerec.config import ExperimentConfig
    from bundlerec.experiments import lifecycle
    from bundlerec.registry.promotion import set_alias
    from bundlerec.serving.loading import resolve_version as _resolve
    from bundlerec.tracking import TrackingError, check_server, read_env_file, setup_basic_auth
    from tests.support import free_port, start_mlflow, stop_mlflow

    (tmp_path / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path}/auth.db\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = true\n")  # the file cluster/local.sh writes
    admin = "admin-" + os.urandom(12).hex()
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(k, raising=False)
    proc, uri = start_mlflow(tmp_path, free_port(), app_name="basic-auth",
                             env={"MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini"),
                                  "MLFLOW_AUTH_ADMIN_PASSWORD": admin, "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(8).hex()})
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    try:
        ids = setup_basic_auth(uri, admin, str(tmp_path))
        assert stat.S_IMODE(os.stat(ids["trainer"]).st_mode) == 0o600 and setup_basic_auth(uri, admin, str(tmp_path)) == ids
        with pytest.raises(TrackingError, match="without credentials"):  # a job without a user stops at once
            check_server(uri)

        def as_identity(name):
            for k, v in read_env_file(ids[name]).items():
                monkeypatch.setenv(k, v)
            return mlflow.MlflowClient(uri)

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password-123456")
        with pytest.raises(TrackingError, match="HTTP 401"):
            check_server(uri)
        trainer = as_identity("trainer")
        check_server(uri)
        run = trainer.create_run(trainer.create_experiment("auth-test"))
        trainer.create_registered_model("bundlerec")
        v = trainer.create_model_version("bundlerec", f"runs:/{run.info.run_id}/model", run.info.run_id).version
        set_alias(trainer, "bundlerec", "champion", v)
        lifecycle.start(trainer, "bundlerec", ExperimentConfig(arms={"control": "champion", "treatment": "1"}))

        serving = as_identity("serving")
        check_server(uri)  # reading is allowed
        assert _resolve("models:/bundlerec@champion", uri)[1] == v  # what a replica does
        assert lifecycle.read(serving, "bundlerec")["name"] == "exp-1"
        for write in (lambda: set_alias(serving, "bundlerec", "champion", v),
                      lambda: serving.create_model_version("bundlerec", f"runs:/{run.info.run_id}/model", run.info.run_id),
                      lambda: lifecycle.stop(serving, "bundlerec"),
                      lambda: serving.set_model_version_tag("bundlerec", v, "promotion", "{}")):
            with pytest.raises(MlflowException, match="403"):
                write()
        assert as_identity("trainer").get_model_version_by_alias("bundlerec", "champion").version == v
    finally:
        stop_mlflow(proc)
