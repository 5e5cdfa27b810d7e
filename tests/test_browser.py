"""A real headless Chromium, driven over the DevTools protocol, looks at what a user looks at:
the MLflow UI started by `sweep ui` after a smoke study (experiment, parent run, nested trial
runs, a trial's `lr` chart) and the `sweep report` page opened from disk (every image loads).

Screenshots are saved beside the study in the test's tmp folder (their paths are printed)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sweep.study.spec import load_study

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-quic", "--hide-scrollbars", "--window-size=1400,900"]


class Browser:
    """A minimal DevTools-protocol client: one page, navigate, evaluate JS, screenshot."""

    def __init__(self, executable: str):
        import websocket  # websocket-client, from the 'test' extra

        self.profile = tempfile.mkdtemp(prefix="sweep-chromium-")  # fresh --user-data-dir
        self.proc = subprocess.Popen(
            [executable, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"  # Chromium writes its port here
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port, path = port_file.read_text().split()[:2]
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=60,
                                              suppress_origin=True)
        self._id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=1400, height=900,
                  deviceScaleFactor=1, mobile=False)

    def call(self, method: str, session: bool = False, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", session=True, expression=expression,
                           returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error in {expression[:80]!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", session=True, url=url)

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def wait_for(self, expression: str, what: str, timeout: float = 90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; page text:\n"
                             f"{self.text()[:3000]}")

    def wait_text(self, *needles: str, timeout: float = 90) -> str:
        cond = " && ".join(f"document.body.innerText.includes({json.dumps(n)})" for n in needles)
        self.wait_for(f"!!document.body && {cond}", f"text {needles}", timeout)
        return self.text()

    def click_text(self, selector: str, text: str) -> None:
        """Click, with real mouse events at its centre, the first ``selector`` element whose
        visible text is exactly ``text`` (some widgets react to mousedown, not to click())."""
        box = self.js(f"""(() => {{
            const el = [...document.querySelectorAll({json.dumps(selector)})]
                .find(e => e.innerText && e.innerText.trim() === {json.dumps(text)});
            if (!el) return null;
            el.scrollIntoView({{block: 'center'}});
            const r = el.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        assert box, f"no {selector} with text {text!r} on the page"
        self.click_at(*box)

    def click_at(self, x: float, y: float) -> None:
        self.call("Input.dispatchMouseEvent", session=True, type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", session=True, type=kind, x=x, y=y,
                      button="left", clickCount=1)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        print(f"screenshot: {path}")
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


def _sweep(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "sweep.cli", *args], cwd=cwd, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, f"sweep {' '.join(args)} failed:\n{res.stdout}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def site(tmp_path_factory, shared_cifar):
    """One smoke study (real training on the shared subset), its report, `sweep ui` on a free
    port, and a headless Chromium; all shared by this module's tests."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium); the browser tests need it")
    pytest.importorskip("websocket", reason="websocket-client is not installed (extra 'test')")
    root = tmp_path_factory.mktemp("browser")
    # the study's budget, epochs and steps; a third of its images (the UI shows the same runs)
    _sweep("launch", "--study", "smoke", "--data-dir", str(shared_cifar), "--quiet",
           "--set", "data.train_size=300", "--set", "data.val_size=100", "--set",
           "data.test_size=100", "--set", "train.batch_size=30", cwd=root)
    _sweep("report", "--study", "smoke", cwd=root)
    # stderr to a file: an undrained pipe could fill up and block `sweep ui`
    ui_log = open(root / "sweep_ui.log", "w")
    ui = subprocess.Popen([sys.executable, "-m", "sweep.cli", "ui", "--study", "smoke", "--port", "0"],
                          cwd=root, stdout=subprocess.PIPE, stderr=ui_log, text=True,
                          start_new_session=True)
    browser = None
    try:
        first = ui.stdout.readline()
        assert first.startswith("MLflow UI for sqlite:///mlflow.db at http://127.0.0.1:"), \
            first + (root / "sweep_ui.log").read_text()[-2000:]
        exp_line = ui.stdout.readline().strip()
        assert exp_line.startswith("experiment smoke: http://127.0.0.1:"), exp_line
        browser = Browser(CHROMIUM)
        yield {"root": root, "url": exp_line.split(": ", 1)[1], "browser": browser}
    finally:
        if browser is not None:
            browser.close()
        ui.send_signal(signal.SIGTERM)  # sweep ui stops its mlflow server child on SIGTERM
        try:
            ui.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)  # the session we started: sweep ui and its child
            ui.wait()
        ui_log.close()


def test_mlflow_ui_shows_parent_run_nested_trials_and_lr_chart(site):
    b, root = site["browser"], site["root"]
    b.goto(site["url"])
    b.wait_text("Run Name", "matching runs")
    assert "/#/experiments/" in b.js("location.href")
    # The study's parent run is the only top-level row; its trials are nested under it.
    expanded = b.js("""(() => {
        const row = [...document.querySelectorAll('.ag-row')]
            .find(r => r.innerText.split('\\n').some(t => t.trim() === 'smoke'));
        const button = row && row.querySelector('button');
        if (!button) return false; button.click(); return true; })()""")
    assert expanded, "no expandable parent run row named 'smoke'"
    trials = load_study("smoke").trials  # the study file's budget: that many trial runs
    text = b.wait_text(*(f"trial-{n:04d}" for n in range(trials)))
    assert f"{trials + 1} matching runs" in text  # the parent and its trials
    b.screenshot(root / "mlflow_experiment.png")
    # Open a trial run and its metric charts.
    b.click_text("a", "trial-0000")
    b.wait_text("Model metrics", "Parent run")
    b.click_text("[role=tab]", "Model metrics")
    b.wait_text("trial-0000 (lr)", "val_acc", "train_loss", "val_loss")
    b.wait_for("""(() => {
        const label = [...document.querySelectorAll('*')]
            .find(e => e.children.length === 0 && e.textContent.trim() === 'trial-0000 (lr)');
        for (let card = label, up = 0; card && up < 8; card = card.parentElement, up++) {
            if (card.querySelector('svg path.js-line')) return true; }
        return false; })()""",
               "a drawn line in the lr chart")
    shot = b.screenshot(root / "mlflow_trial_lr.png")
    assert shot.stat().st_size > 20_000


def test_report_page_loads_every_image_from_disk(site):
    b, root = site["browser"], site["root"]
    index = root / "reports" / "smoke" / "index.html"
    b.goto(index.as_uri())
    b.wait_for("document.readyState === 'complete' && [...document.images].every(i => i.complete)",
               "the report's images to finish loading", timeout=30)
    images = b.js("[...document.images].map(i => [i.getAttribute('src'), i.naturalWidth])")
    assert len(images) >= 4, images
    assert all(width > 0 for _, width in images), f"images that did not load: {images}"
    text = b.text()
    question = " ".join(load_study("smoke").description.split())
    assert f"Question: {question[:40]}" in " ".join(text.split())
    assert "Best trial" in text and "Per scheduler type" in text
    b.screenshot(root / "report.png")
