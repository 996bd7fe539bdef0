"""Deploy the Serve application (serve/config.yaml) to the running cluster and wait until it answers.

Uses the same REST API as ``serve deploy``; the registry URI and tracking server come from the
pipeline config so the endpoint serves what was just registered.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

import yaml

from bundlerec.client import http_json
from bundlerec.config import PipelineConfig

log = logging.getLogger(__name__)


def serve_config(cfg: PipelineConfig, model_uri: Optional[str] = None, token_file: Optional[str] = None) -> dict:
    from urllib.parse import urlparse

    conf = yaml.safe_load(open(cfg.serve.config_path))
    url = urlparse(cfg.serve.url)  # the proxy listens where the config says the endpoint is
    if url.hostname not in ("127.0.0.1", "localhost", "::1") and not cfg.serve.auth:
        raise ValueError(f"serve.url {cfg.serve.url} listens beyond this machine: set serve.auth=true (bearer "
                         "tokens), or keep 127.0.0.1 behind an authenticating proxy; an open endpoint is refused")
    conf.setdefault("http_options", {}).update({"host": url.hostname, "port": url.port or 80})
    app = conf["applications"][0]
    app["args"].update({"model_uri": model_uri or cfg.serve.model_uri or f"models:/{cfg.serve.model_name}@champion",
                        "tracking_uri": cfg.mlflow.tracking_uri, **cfg.serve.app_args()})  # the pipeline config wins
    if app["args"].get("event_log_dir"):  # replicas run in Ray's working dirs: never a relative path
        from bundlerec.storage import absolute

        app["args"]["event_log_dir"] = absolute(app["args"]["event_log_dir"])
    if cfg.serve.auth:
        app["args"]["auth_token_file"] = os.path.abspath(token_file or cfg.serve.token_file)
        if cfg.serve.admin_token_file:  # the explore routes' own tokens
            app["args"]["admin_token_file"] = os.path.abspath(cfg.serve.admin_token_file)
    if cfg.serve.tracking_credentials_file:  # a read-only MLflow identity (basic-auth servers)
        app["args"]["tracking_credentials_file"] = os.path.abspath(cfg.serve.tracking_credentials_file)
    if os.path.exists(cfg.serve.user_key_file):  # histories are keyed by pseudonym (bundlerec.privacy)
        app["args"]["user_key_file"] = os.path.abspath(cfg.serve.user_key_file)
    return conf


def read_token(token_file: Optional[str]) -> Optional[str]:
    from bundlerec.serving.auth import read_token_file

    return read_token_file(token_file)[0] if token_file else None


def wait_ready(url: str, timeout_s: float = 300.0, version: Optional[str] = None) -> dict:
    """Poll /readyz (open even with authentication on) until the app answers with ``version``."""
    deadline = time.time() + timeout_s
    last: Exception | None = None
    while time.time() < deadline:
        try:
            info = http_json(f"{url}/readyz", timeout=5)["model"]
            if version is None or str(info.get("version")) == str(version):
                return info
        except Exception as e:  # not up yet
            last = e
        time.sleep(1.0)
    raise TimeoutError(f"Serve app at {url} not ready after {timeout_s:.0f}s (last error: {last})")


def deploy(cfg: PipelineConfig, model_uri: Optional[str] = None, version: Optional[str] = None,
           timeout_s: float = 300.0, token_file: Optional[str] = None) -> dict:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    conf = serve_config(cfg, model_uri, token_file)
    t0 = time.time()
    client = ServeSubmissionClient(cfg.serve.dashboard_url)
    client.deploy_applications(conf)
    app = conf["applications"][0]
    deadline = time.time() + timeout_s
    while True:  # until the app runs *this* config (the previous one keeps answering meanwhile)
        details = client.get_serve_details().get("applications", {}).get(app["name"], {})
        live_args = (details.get("deployed_app_config") or {}).get("args")
        if details.get("status") == "DEPLOY_FAILED" and live_args == app["args"]:
            raise RuntimeError(f"Serve deployment of {app['name']} failed: {details.get('message')}")
        if details.get("status") == "RUNNING" and live_args == app["args"]:
            break
        if time.time() > deadline:
            raise TimeoutError(f"Serve app {app['name']} not running the new config after {timeout_s:.0f}s: "
                               f"{details.get('status')} {details.get('message')}")
        time.sleep(1.0)
    wait_ready(cfg.serve.url, max(5.0, deadline - time.time()), version)
    info = http_json(f"{cfg.serve.url}/v1/model", token=read_token(conf["applications"][0]["args"].get("auth_token_file")))
    log.info("deploy: %s ready in %.1fs: %s", cfg.serve.url, time.time() - t0, info)
    return {"serve_url": cfg.serve.url, "model": info, "seconds": round(time.time() - t0, 1)}
