"""The playground page in headless Chromium, driven over the DevTools protocol: it loads, draws an image on
its own, then takes a typed prompt and seed and shows the generator's image (pixel-equal to POST
/generate) beside the reference's, with timings; a screenshot is saved (to $DISTAR_SCREENSHOT_DIR if set).

Needs Debian's `chromium` package (apt-get install -y chromium); skipped without it."""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from distar.images import decode_png
from distar.serving.service import Job

from .serve_fixtures import LiveServer, make_app, service

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install -y chromium)")
websockets_sync = pytest.importorskip("websockets.sync.client", reason="websockets (a uvicorn extra) is needed")


class Page:
    """A minimal DevTools-protocol client for one page target."""

    def __init__(self, ws_url: str):
        self.ws = websockets_sync.connect(ws_url, max_size=2**25, open_timeout=30)
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_done(self, timeout: float = 90.0) -> None:
        t0 = time.monotonic()
        while self.js("document.body && document.body.dataset.state") != "done":
            if time.monotonic() - t0 > timeout:
                raise TimeoutError("playground never reached state 'done'")
            time.sleep(0.1)


GREY = """(() => { const im = document.getElementById('%s'); const c = document.createElement('canvas');
  c.width = im.naturalWidth; c.height = im.naturalHeight; const x = c.getContext('2d'); x.drawImage(im, 0, 0);
  return Array.from(x.getImageData(0, 0, c.width, c.height).data.filter((_, i) => i %% 4 == 0)); })()"""


@pytest.fixture
def browser():
    profile = tempfile.mkdtemp(prefix="distar_chromium_")
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", f"--user-data-dir={profile}",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "--window-size=820,520",
         "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file, t0 = Path(profile) / "DevToolsActivePort", time.monotonic()
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() - t0 > 30:
                pytest.fail(f"chromium did not start (exit {proc.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = Page(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
        yield page
        page.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def test_playground_in_headless_chromium(browser, tmp_path):
    with LiveServer(make_app()) as live:
        browser.call("Emulation.setDeviceMetricsOverride", width=820, height=600, deviceScaleFactor=1, mobile=False)
        browser.call("Page.navigate", url=live.url + "/")
        browser.wait_done()
        assert browser.js("document.getElementById('gen-img').naturalWidth") == 16   # drew on load
        browser.js("document.getElementById('prompt').value = 'the digit seven';"
                   "document.getElementById('seed').value = '42'; document.getElementById('go').click()")
        browser.wait_done()
        assert browser.js("document.getElementById('error').textContent") == ""
        gen_time = browser.js("document.getElementById('gen-time').textContent")
        ref_time = browser.js("document.getElementById('ref-time').textContent")
        assert "ms round trip (server" in gen_time and "ms round trip (server" in ref_time
        assert browser.js("document.getElementById('ref-card').hidden") is False
        shown = browser.js(GREY % "gen-img")
        expected = decode_png(service().generate([Job(("the digit seven",), 1, 42)])[0][0])
        assert shown == expected.flatten().tolist()                  # the page shows exactly /generate's image
        assert len(browser.js(GREY % "ref-img")) == 256
        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        out = Path(os.environ.get("DISTAR_SCREENSHOT_DIR", tmp_path))
        out.mkdir(parents=True, exist_ok=True)
        (out / "playground.png").write_bytes(shot)
        assert shot[:8] == b"\x89PNG\r\n\x1a\n"

        browser.js("document.getElementById('prompt').value = '';"
                   "document.getElementById('go').click()")                  # the server's 422, shown
        browser.wait_done()
        errors = browser.js("document.getElementById('error').textContent").splitlines()
        assert sorted(errors) == ["generate: prompt: prompt is empty", "reference: prompt: prompt is empty"], errors
