"""A real viewer session: OHIF, fed by a real Orthanc over DICOMweb, draws volumed's DICOM SEG.

The real 20-slice CT series goes into a private Orthanc; headless Chromium opens the study in OHIF
(the released build of ``@ohif/app``, taken from the npm registry, not built here). The CT is
opened and no segment colour is in the viewport. `volumed dicomweb run` then stores the SEG and SR
with the default bundle. On reopening with the SEG as the initial series, OHIF overlays the three
segments on the CT in the colours the SEG recommends (our preview's yellow, purple, orange), and
lists the SEG and SR series in the study browser (seen on the screenshot; not asserted).

OHIF is served with the study's DICOMweb from one origin (a small proxy in this test; in a
deployment, Orthanc's ServeFolders plugin or a web server, docs/viewers.md); headless Chromium
draws with its software GL.

Tools: Orthanc (Debian ``orthanc``, ``orthanc-dicomweb``), Chromium (Debian ``chromium``), npm (to
fetch the OHIF package once into ``~/.cache/volumed/ohif``) and ``websocket-client`` (a dev
dependency, for Chromium's DevTools protocol). Without one of the Debian tools the test skips,
except where ``VOLUMED_REQUIRE_OHIF=1``, which makes it fail instead.
"""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import tarfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from test_orthanc_dicomweb import BUNDLE, _free_port, _orthanc_server

from shared_helpers import run_cli

OHIF_VERSION = "3.13.2"
PROMPTS = ["liver", "spleen", "aorta"]
# The SEG recommends our preview's colours (volumed.inference.preview.label_color of values 1-3:
# yellow F3C300, purple 875692, orange F38400) and OHIF draws them, blended over the CT at about
# half opacity (measured 2026-12-03: liver 216/192/94, spleen 148/123/154, aorta 234/178/112).
HUES = {
    "yellow": lambda r, g, b: (r > b + 60) & (g > b + 50) & (abs(r - g) < 45),
    "purple": lambda r, g, b: (b > g + 18) & (r > g + 12),
    "orange": lambda r, g, b: (r > g + 40) & (g > b + 35),
}

# Slow and out of `make test`: it fetches 50 MB from npm once and takes 1-2 minutes. `make test-slow`
# runs it; the DICOMweb path itself is covered by test_orthanc_dicomweb.py. Chromium is driven over
# its DevTools protocol and screenshots until the overlay is drawn: the plain `--screenshot` run it
# replaced fired before OHIF had drawn the CT in 1 of 5 runs (2026-12-02), and in most runs on busy cores.
pytestmark = [pytest.mark.realdata, pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

APP_CONFIG = """window.config = {
  routerBasename: null,
  showStudyList: true,
  extensions: [],
  modes: [],
  showWarningMessageForCrossOrigin: false,
  investigationalUseDialog: { option: 'never' },
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'dicomweb',
    configuration: {
      friendlyName: 'Orthanc', name: 'orthanc',
      wadoUriRoot: '/dicom-web', qidoRoot: '/dicom-web', wadoRoot: '/dicom-web',
      qidoSupportsIncludeField: false, supportsReject: false,
      imageRendering: 'wadors', thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true, supportsFuzzyMatching: false, supportsWildcard: true,
      singlepart: 'bulkdata',
      acceptHeader: ['multipart/related; type=application/octet-stream; transfer-syntax=*'],
    },
  }],
  defaultDataSourceName: 'dicomweb',
};
"""


def _missing(why: str):
    if os.environ.get("VOLUMED_REQUIRE_OHIF") == "1":
        pytest.fail(f"{why}; VOLUMED_REQUIRE_OHIF=1 requires it", pytrace=False)
    pytest.skip(why)


def _ohif_dist() -> Path:
    """OHIF's released build (``package/dist`` of ``@ohif/app``), fetched once with ``npm pack``."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "volumed" / "ohif" / OHIF_VERSION
    dist = cache / "package" / "dist"
    if (dist / "index.html").is_file():
        return dist
    npm = shutil.which("npm")
    if npm is None:
        _missing("npm is not installed (needed once to fetch the OHIF viewer package)")
    cache.mkdir(parents=True, exist_ok=True)
    for _ in range(2):  # one retry: the registry is the only network this needs
        done = subprocess.run([npm, "pack", f"@ohif/app@{OHIF_VERSION}", "--silent"], cwd=cache, capture_output=True,
                              text=True, timeout=300, check=False)
        if done.returncode == 0:
            break
    else:
        _missing(f"npm pack @ohif/app@{OHIF_VERSION} failed: {done.stderr.strip()[-500:]}")
    (archive,) = cache.glob("ohif-app-*.tgz")
    staging = cache / ".extract"
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(staging, filter="data")
    os.replace(staging / "package", cache / "package")
    shutil.rmtree(staging, ignore_errors=True)
    archive.unlink()
    return dist


class _ViewerHandler(http.server.SimpleHTTPRequestHandler):
    """OHIF's files, our app-config.js, every other route -> index.html (a single-page app), and
    /dicom-web/ passed on to Orthanc: one origin, as a deployment behind one web server."""

    dist: Path
    orthanc: str

    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=str(self.dist), **kwargs)

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, ctype: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path.startswith("/dicom-web/"):
            accept = {"Accept": self.headers["Accept"]} if self.headers.get("Accept") else {}
            try:
                with urllib.request.urlopen(urllib.request.Request(self.orthanc + self.path, headers=accept), timeout=60) as r:
                    return self._send(r.status, r.headers.get("Content-Type", "application/octet-stream"), r.read())
            except urllib.error.HTTPError as err:
                return self._send(err.code, err.headers.get("Content-Type", "text/plain"), err.read())
        if self.path.split("?")[0] == "/app-config.js":
            return self._send(200, "application/javascript", APP_CONFIG.encode())
        if not Path(self.translate_path(self.path.split("?")[0])).is_file():
            self.path = "/index.html"
        return super().do_GET()


@pytest.fixture(scope="module")
def viewer(tmp_path_factory):
    """(OHIF base URL, Orthanc DICOMweb URL): a private Orthanc and OHIF in front of it."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        _missing("chromium is not installed (apt-get install chromium)")
    dist = _ohif_dist()
    with _orthanc_server(tmp_path_factory.mktemp("orthanc-ohif")) as (url, base):
        handler = type("Handler", (_ViewerHandler,), {"dist": dist, "orthanc": base})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", _free_port()), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_port}", url, browser
        finally:
            server.shutdown()
            server.server_close()


class _Chromium:
    """Headless Chromium driven over the DevTools protocol (``websocket-client``, a dev dependency):
    open a page, then take screenshots until the picture is drawn or a real-time limit passes, as a
    user waits for a viewer. (A plain ``--screenshot`` run fires at a virtual time that OHIF's web
    workers do not keep to, which made this test flaky.)"""

    def __init__(self, browser: str, profile: Path):
        import json
        import time

        import websocket

        port = _free_port()
        # OHIF's viewports need WebGL: without a GPU, Chromium's SwiftShader software GL provides it.
        self.proc = subprocess.Popen(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
             "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}", "--window-size=1400,900",
             f"--remote-debugging-port={port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                    pages = [t for t in json.load(r) if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise AssertionError("headless Chromium did not open its DevTools port")
            time.sleep(0.5)
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=120, suppress_origin=True)
        self.next_id = 0
        self.call("Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params):
        import json

        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # events arrive in between; the answer carries our id
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                assert "error" not in message, (method, message["error"])
                return message["result"]

    def screenshot(self, url: str, path: Path, drawn, limit_s: float) -> np.ndarray:
        """Open ``url``; screenshots every 2 s until ``drawn(pixels)`` or ``limit_s`` seconds. The
        last one is saved to ``path`` and returned."""
        import base64
        import io
        import time

        from PIL import Image

        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + limit_s
        while True:
            time.sleep(2)
            png = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
            pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
            if drawn(pixels) or time.monotonic() > deadline:
                path.write_bytes(png)
                return pixels

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _viewport(pixels: np.ndarray) -> np.ndarray:
    """The image viewport of OHIF's default layout at 1400 x 900: right of the study browser,
    below the segmentation prompt bar."""
    return pixels[170:790, 300:1340]


def _hue_counts(pixels: np.ndarray) -> dict[str, int]:
    r, g, b = (pixels[..., i] for i in range(3))
    return {name: int(test(r, g, b).sum()) for name, test in HUES.items()}


def test_ohif_overlays_the_seg_that_dicomweb_run_stored(viewer, ts_dir, tmp_path, capsys):
    from volumed.serve.dicomweb import make_client

    ohif, url, browser = viewer
    series_dir = ts_dir / "example_ct_dicom_with_uids"
    client = make_client(url)
    client.store_instances([pydicom.dcmread(p) for p in sorted(series_dir.iterdir()) if p.is_file()])
    first = pydicom.dcmread(min(series_dir.iterdir()), stop_before_pixels=True)
    study = first.StudyInstanceUID

    def grey(view: np.ndarray) -> int:  # CT pixels: neutral and not dark
        return int(((np.ptp(view, axis=-1) < 12) & (view.mean(-1) > 60)).sum())

    def overlaid(pixels: np.ndarray) -> bool:
        view = _viewport(pixels)
        return min(_hue_counts(view).values()) > 0 and grey(view) > 30_000

    chromium = _Chromium(browser, tmp_path / "profile")
    try:
        # Before: OHIF opens the study (the CT alone) and its viewport holds no segment colour, so
        # the colours counted below come from the SEG. (On a fresh profile OHIF shows its tour
        # here and leaves this viewport black; 30 s is all it gets.)
        before = _viewport(chromium.screenshot(f"{ohif}/viewer?StudyInstanceUIDs={study}", tmp_path / "before.png",
                                               lambda p: grey(_viewport(p)) > 30_000, limit_s=30))
        assert max(_hue_counts(before).values()) < 200, _hue_counts(before)

        args = ["dicomweb", "run", "--url", url, "--study", study, "--bundle", str(BUNDLE), "--device", "cpu"]
        code, out, err = run_cli(args + sum((["-p", p] for p in PROMPTS), []), capsys)
        assert code == 0, err
        found = client.search_for_series(study_instance_uid=study, fields=["Modality", "SeriesInstanceUID"])
        seg_series = next(s["0020000E"]["Value"][0] for s in found if s["00080060"]["Value"][0] == "SEG")

        # After: with the SEG as the initial series, OHIF overlays its segments on the CT, once it has
        # fetched the SEG and the 20 CT frames (up to 3 minutes on two busy cores).
        shot = tmp_path / "after.png"
        after = _viewport(chromium.screenshot(
            f"{ohif}/viewer?StudyInstanceUIDs={study}&initialSeriesInstanceUID={seg_series}", shot, overlaid, limit_s=180))
    finally:
        chromium.close()
    counts = _hue_counts(after)
    # Liver (726 mL) > spleen (252 mL) > aorta (22 mL) on the volumes; on one slice, in pixels.
    assert counts["yellow"] > 20_000 and counts["purple"] > 8_000 and counts["orange"] > 800, (counts, shot)
    assert counts["yellow"] > counts["purple"] > counts["orange"], counts
    assert grey(after) > 30_000, "the overlay is drawn without the CT under it"
