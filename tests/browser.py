"""A real headless Chromium driven over the DevTools protocol (Debian's `chromium`, `websockets`).

    with Chromium(tmp_path) as page:
        page.goto("http://127.0.0.1:8000/")
        page.run("document.getElementById('go').click()")
        page.wait_for("document.body.dataset.rendered === '1'")
        page.screenshot("shot.png")
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Chromium:
    def __init__(self, workdir: Path, width: int = 1280, height: int = 900):
        self.workdir, self.size = Path(workdir), (width, height)
        self.proc = None
        self.ws = None
        self._id = 0
        self.console: list[str] = []  # console messages and uncaught exceptions of the page

    def __enter__(self) -> "Chromium":
        from websockets.sync.client import connect

        from tests.support import require_system_package

        require_system_package(bool(CHROMIUM), "chromium")
        profile = self.workdir / "chromium-profile"
        (profile / "DevToolsActivePort").unlink(missing_ok=True)  # a previous browser's port is not ours
        log = open(self.workdir / "chromium.log", "w")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             f"--window-size={self.size[0]},{self.size[1]}", "about:blank"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            port_file = profile / "DevToolsActivePort"  # chromium writes the port it chose here
            deadline = time.time() + 60
            while not (port_file.exists() and port_file.read_text().strip()) and time.time() < deadline:
                assert self.proc.poll() is None, (self.workdir / "chromium.log").read_text()[-2000:]
                time.sleep(0.1)
            port = port_file.read_text().split()[0]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                target = next(t for t in json.loads(r.read()) if t["type"] == "page")
            self.ws = connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
            self.send("Page.enable")
            self.send("Runtime.enable")
        except BaseException:
            self.__exit__()  # a browser that never became usable is stopped, not left behind
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.ws is not None:
            self.ws.close()
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def send(self, method: str, timeout: float = 60, **params) -> dict:
        self._id += 1
        my = self._id
        self.ws.send(json.dumps({"id": my, "method": method, "params": params}))
        deadline = time.time() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.time())))
            if msg.get("method") == "Runtime.consoleAPICalled":
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in msg["params"]["args"]))
            elif msg.get("method") == "Runtime.exceptionThrown":
                self.console.append("exception: " + json.dumps(msg["params"]["exceptionDetails"])[:500])
            if msg.get("id") == my:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")

    def run(self, expression: str):
        """Evaluate JavaScript in the page; the value (promises awaited) comes back as JSON."""
        r = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails'].get('text')} {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, condition: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.run(f"Boolean({condition})"):
                return
            time.sleep(0.2)
        raise TimeoutError(f"page never satisfied {condition!r}; console: {self.console[-5:]}; "
                           f"text: {self.text('body')[:1500]!r}")

    def text(self, selector: str) -> str:
        return self.run(f"(document.querySelector({json.dumps(selector)}) || {{innerText: ''}}).innerText")

    def fill(self, selector: str, value: str) -> None:
        self.run(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.value = {json.dumps(value)}; "
                 f"e.dispatchEvent(new Event('input', {{bubbles: true}})); }})()")

    def click(self, selector: str) -> None:
        self.run(f"document.querySelector({json.dumps(selector)}).click()")

    def screenshot(self, path) -> Path:
        png = base64.b64decode(self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"])
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(png)
        return Path(path)
