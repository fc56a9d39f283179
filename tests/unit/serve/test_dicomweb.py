"""``volumed dicomweb``: deterministic output UIDs, credentials, and every bad-input path against a
closed loopback port and a tiny in-process DICOMweb stub (QIDO JSON, WADO multipart, STOW), so
they run in seconds. The round trip against a real Orthanc is tests/integration/test_orthanc_dicomweb.py."""

from __future__ import annotations

import base64
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest

from shared_helpers import run_cli
from volumed.errors import ConfigError
from volumed.io.writer import DicomOutputUids, derived_uid
from volumed.serve.dicomweb import (
    BundleInfo,
    DicomwebError,
    check_url,
    load_credentials,
    output_uids,
    run_round_trip,
    watch,
)

REPO = Path(__file__).resolve().parents[3]
PROMPTSEG = REPO / "bundles" / "volumed_promptseg_ct"
STUDY = "1.2.826.0.1.3680043.8.498.1"
CT = "1.2.826.0.1.3680043.8.498.2"
MR = "1.2.826.0.1.3680043.8.498.3"
SECRET = "s3cr3t-Pa55"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _series_json(study, series, modality, n=20):
    return {"0020000D": {"vr": "UI", "Value": [study]}, "0020000E": {"vr": "UI", "Value": [series]},
            "00080060": {"vr": "CS", "Value": [modality]}, "00201209": {"vr": "IS", "Value": [n]}}


class Stub:
    """A DICOMweb server on a free loopback port: ``series`` answers QIDO, ``files`` WADO, STOW
    appends to ``stored``; ``fail`` maps a method + path prefix to an HTTP status."""

    def __init__(self):
        self.series: list[dict] = []
        self.files: list[Path] = []
        self.stored: list[tuple[str, bytes]] = []  # (Content-Type, body) of each STOW request
        self.fail: dict[tuple[str, str], int] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Authorization
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _failing(self, method):
                stub.requests.append((method, self.path, self.headers.get("Authorization")))
                for (m, prefix), status in stub.fail.items():
                    if m == method and self.path.startswith(prefix):
                        body = b'{"Message": "stub failure"}'
                        self.send_response(status)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                        return True
                return False

            def do_GET(self):
                if self._failing("GET"):
                    return
                path = self.path.split("?")[0]
                parts = path.strip("/").split("/")  # dicom-web, studies, X, series[, Y]
                if parts[-1] == "series":
                    study = parts[2] if len(parts) > 3 else None
                    query = self.path.split("?")[1] if "?" in self.path else ""
                    hits = [s for s in stub.series if study in (None, s["0020000D"]["Value"][0])]
                    if "Modality=" in query:
                        want = query.split("Modality=")[1].split("&")[0]
                        hits = [s for s in hits if s["00080060"]["Value"][0] == want]
                    if "offset=" in query and int(query.split("offset=")[1].split("&")[0]) > 0:
                        hits = []
                    body = json.dumps(hits).encode()
                    self.send_response(200 if hits else 204)
                    self.send_header("Content-Type", "application/dicom+json")
                    self.send_header("Content-Length", str(len(body) if hits else 0))
                    self.end_headers()
                    if hits:
                        self.wfile.write(body)
                    return
                boundary = "volumedstubboundary"
                body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
                                + f.read_bytes() + b"\r\n" for f in stub.files) + b"--" + boundary.encode() + b"--"
                self.send_response(200)
                self.send_header("Content-Type", f'multipart/related; type="application/dicom"; boundary={boundary}')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # how dicomweb-client streams STOW
                    data = b""
                    while (size := int(self.rfile.readline().split(b";")[0], 16)):
                        data += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                else:
                    data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self._failing("POST"):
                    return
                stub.stored.append((self.headers.get("Content-Type", ""), data))
                body = b"{}"
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    s = Stub()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI points the root logger at the stderr pytest captured for that test; undo it after."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("VOLUMED_DICOMWEB_USER", "VOLUMED_DICOMWEB_PASSWORD", "VOLUMED_DICOMWEB_TOKEN"):
        monkeypatch.delenv(name, raising=False)


# -- deterministic UIDs ---------------------------------------------------------------------------

def test_output_uids_are_a_function_of_series_bundle_version_and_prompts():
    a = DicomOutputUids.derive("1.2.3", "bundle", "0.2.0", "liver")
    assert a == DicomOutputUids.derive("1.2.3", "bundle", "0.2.0", "liver")
    uids = [a.seg_series, a.seg_instance, a.sr_series, a.sr_instance]
    assert len(set(uids)) == 4
    for uid in uids:
        assert uid.startswith("2.25.") and pydicom.uid.UID(uid).is_valid and len(uid) <= 64
    for other in [("1.2.4", "bundle", "0.2.0", "liver"), ("1.2.3", "bundle", "0.2.1", "liver"),
                  ("1.2.3", "bundle", "0.2.0", "spleen"), ("1.2.3", "bundl", "e0.2.0", "liver")]:
        assert DicomOutputUids.derive(*other).seg_series != a.seg_series, other
    bundle = BundleInfo(PROMPTSEG, "b", "1", "CT", ("liver",))
    assert output_uids("1.2.3", bundle, ["liver", "spleen"]) != output_uids("1.2.3", bundle, ["spleen", "liver"])
    with pytest.raises(Exception):
        DicomOutputUids.derive("1.2.3", "")


# -- URL and credentials --------------------------------------------------------------------------

def test_url_with_credentials_is_refused_without_echoing_the_password(clean_env, capsys):
    with pytest.raises(ConfigError) as err:
        check_url(f"http://alice:{SECRET}@pacs.example:8042/dicom-web")
    assert SECRET not in str(err.value) and "VOLUMED_DICOMWEB_USER" in str(err.value) and "--credentials-file" in str(err.value)
    code, out, errtext = run_cli(["dicomweb", "run", "--url", f"http://alice:{SECRET}@127.0.0.1:1/dicom-web", "--study", STUDY,
                              "--bundle", str(PROMPTSEG)], capsys)
    assert code == 2 and SECRET not in out + errtext and "holds credentials" in errtext
    with pytest.raises(ConfigError):
        check_url("ftp://pacs/dicom-web")
    assert check_url("http://127.0.0.1:8042/dicom-web/") == "http://127.0.0.1:8042/dicom-web"


def test_credentials_from_environment_and_files(tmp_path):
    assert load_credentials(environ={}) is None
    token = load_credentials(environ={"VOLUMED_DICOMWEB_TOKEN": SECRET})
    assert token.token == SECRET and token.user is None
    basic = load_credentials(environ={"VOLUMED_DICOMWEB_USER": "alice", "VOLUMED_DICOMWEB_PASSWORD": SECRET})
    assert (basic.user, basic.password) == ("alice", SECRET)
    assert SECRET not in repr(basic) and SECRET not in repr(token)
    with pytest.raises(ConfigError, match="needs a password"):
        load_credentials(environ={"VOLUMED_DICOMWEB_USER": "alice"})
    line = tmp_path / "cred.txt"
    line.write_text(f"alice:{SECRET}\n")
    assert (load_credentials(line, environ={"VOLUMED_DICOMWEB_TOKEN": "ignored"}).password) == SECRET
    js = tmp_path / "cred.json"
    js.write_text(json.dumps({"token": SECRET}))
    assert load_credentials(js).token == SECRET
    bad = tmp_path / "bad.json"
    bad.write_text('{"user": "alice", "pass": "x"}')
    with pytest.raises(ConfigError) as err:
        load_credentials(bad)
    assert "x" not in str(err.value).split(":")[-1] or "keys user, password, token" in str(err.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load_credentials(tmp_path / "missing.txt")


def test_basic_credentials_reach_the_pacs_and_never_the_output(stub, clean_env, monkeypatch, capsys, tmp_path):
    stub.fail[("GET", "/dicom-web/studies")] = 401
    monkeypatch.setenv("VOLUMED_DICOMWEB_USER", "alice")
    monkeypatch.setenv("VOLUMED_DICOMWEB_PASSWORD", SECRET)
    code, out, err = run_cli(["dicomweb", "run", "--url", stub.url, "--study", STUDY, "--bundle", str(PROMPTSEG)], capsys)
    assert code == 2 and "HTTP 401" in err and stub.url in err
    assert SECRET not in out + err
    sent = [auth for _, _, auth in stub.requests]
    assert sent and sent[0] == "Basic " + base64.b64encode(f"alice:{SECRET}".encode()).decode()


# -- unreachable PACS, HTTP errors, wrong studies and series ---------------------------------------

def test_unreachable_pacs_names_the_step_and_url_and_writes_nothing(clean_env, capsys, tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/dicom-web"
    out_dir = tmp_path / "out"
    code, out, err = run_cli(["dicomweb", "run", "--url", url, "--study", STUDY, "--bundle", str(PROMPTSEG), "-o", str(out_dir)], capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"volumed: error: QIDO at {url}: ") and "connection refused" in last and STUDY in last
    assert not out_dir.exists()


@pytest.mark.parametrize("status", [500, 404])
def test_http_errors_on_qido_name_the_status(stub, clean_env, capsys, status):
    stub.fail[("GET", "/dicom-web/studies")] = status
    code, _, err = run_cli(["dicomweb", "run", "--url", stub.url, "--study", STUDY, "--bundle", str(PROMPTSEG)], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith(f"volumed: error: QIDO at {stub.url}: ") and f"HTTP {status}" in last
    assert not stub.stored


def test_missing_study_study_without_ct_and_series_of_another_modality(stub, clean_env, capsys):
    code, _, err = run_cli(["dicomweb", "run", "--url", stub.url, "--study", STUDY, "--bundle", str(PROMPTSEG)], capsys)
    assert code == 2 and f"no study {STUDY}" in err
    stub.series = [_series_json(STUDY, MR, "MR"), _series_json(STUDY, "1.2.9", "SR", 1)]
    code, _, err = run_cli(["dicomweb", "run", "--url", stub.url, "--study", STUDY, "--bundle", str(PROMPTSEG)], capsys)
    assert code == 2 and f"study {STUDY} has no CT series (it has MR, SR)" in err and stub.url in err
    code, _, err = run_cli(["dicomweb", "run", "--url", stub.url, "--study", STUDY, "--series", MR, "--bundle", str(PROMPTSEG)], capsys)
    assert code == 2 and f"series {MR} of study {STUDY} is MR" in err and "segments CT only" in err
    code, _, err = run_cli(["dicomweb", "run", "--url", stub.url, "--study", STUDY, "--series", CT, "--bundle", str(PROMPTSEG)], capsys)
    assert code == 2 and f"study {STUDY} has no series {CT}" in err
    stub.series = [_series_json(STUDY, CT, "CT"), _series_json(STUDY, CT + "1", "CT")]
    code, _, err = run_cli(["dicomweb", "run", "--url", stub.url, "--study", STUDY, "--bundle", str(PROMPTSEG)], capsys)
    assert code == 2 and "has 2 CT series; choose one with --series" in err
    assert not stub.stored and all(method == "GET" for method, _, _ in stub.requests)


def test_wado_failure_names_wado_and_stores_nothing(stub, clean_env, capsys, tmp_path):
    stub.series = [_series_json(STUDY, CT, "CT")]
    stub.fail[("GET", f"/dicom-web/studies/{STUDY}/series/{CT}")] = 500
    out_dir = tmp_path / "out"
    code, _, err = run_cli(["dicomweb", "run", "--url", stub.url, "--study", STUDY, "--bundle", str(PROMPTSEG), "-o", str(out_dir)], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith(f"volumed: error: WADO at {stub.url}: series {CT} of study {STUDY}: HTTP 500")
    assert not stub.stored and not out_dir.exists()


def test_watch_refuses_an_interval_out_of_bounds(clean_env, capsys):
    for interval in ("1", "7200"):
        code, _, err = run_cli(["dicomweb", "watch", "--url", "http://127.0.0.1:1/dicom-web", "--bundle", str(PROMPTSEG),
                            "--interval", interval], capsys)
        assert code == 2 and "between 5 and 3600 seconds" in err


def test_watch_stops_cleanly_on_sigterm_and_keeps_polling_through_pacs_errors(stub, clean_env, caplog):
    """SIGTERM while watch waits: it returns (the CLI then exits 0) and the previous handler is back.
    A failing poll (HTTP 500) is logged and retried, not fatal."""
    import logging
    import os
    import signal

    caplog.set_level(logging.INFO, logger="volumed.serve.dicomweb")
    stub.fail[("GET", "/dicom-web/series")] = 500
    previous = signal.getsignal(signal.SIGTERM)
    done = threading.Event()

    def terminate_once_polling():  # the first poll comes after watch installed its handlers
        while not stub.requests and not done.wait(0.05):
            pass
        if not done.is_set():
            os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_once_polling, daemon=True)
    killer.start()
    try:
        outcomes = watch(stub.url, PROMPTSEG, interval_s=5)
    finally:
        done.set()
        killer.join()
    assert outcomes == [] and signal.getsignal(signal.SIGTERM) is previous
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("poll failed, retrying in 5 s: QIDO at " + stub.url) and "HTTP 500" in m for m in messages), messages
    assert messages[-1] == "stopped (SIGTERM)"
    assert not stub.stored


# -- the whole round trip on the stub, with a tiny bundle --------------------------------------------

@pytest.fixture
def ct_stub(stub, ts_dir):
    series_dir = ts_dir / "example_ct_dicom_with_uids"
    first = pydicom.dcmread(sorted(series_dir.iterdir())[0], stop_before_pixels=True)
    stub.series = [_series_json(first.StudyInstanceUID, first.SeriesInstanceUID, "CT")]
    stub.files = sorted(p for p in series_dir.iterdir() if p.is_file())
    stub.study, stub.ct = first.StudyInstanceUID, first.SeriesInstanceUID
    return stub


def _stored_datasets(request: tuple[str, bytes]) -> list:
    """The instances of one STOW-RS request (multipart/related, one application/dicom part each)."""
    from io import BytesIO

    content_type, body = request
    boundary = content_type.split("boundary=")[1].split(";")[0].strip('"').encode()
    parts = body.split(b"--" + boundary)[1:-1]  # between the first delimiter and the close delimiter
    # Each part: CRLF, headers, CRLF CRLF, payload, CRLF (the CRLF before a delimiter belongs to it).
    return [pydicom.dcmread(BytesIO(part.split(b"\r\n\r\n", 1)[1][:-2]), stop_before_pixels=True) for part in parts]


def test_round_trip_stores_seg_and_sr_with_derived_uids_and_skips_when_present(ct_stub, tiny_bundle, clean_env, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="volumed.serve.dicomweb")
    outcome = run_round_trip(ct_stub.url, ct_stub.study, tiny_bundle, prompts=["liver", "spleen"], device="cpu",
                             output_dir=tmp_path / "out")
    assert outcome.status == "stored" and outcome.stored == ("SEG", "SR")
    bundle = BundleInfo.read(tiny_bundle)
    uids = output_uids(ct_stub.ct, bundle, ["liver", "spleen"])
    assert outcome.uids == uids
    seg = pydicom.dcmread(tmp_path / "out" / "segmentation.dcm", stop_before_pixels=True)
    sr = pydicom.dcmread(tmp_path / "out" / "report_sr.dcm", stop_before_pixels=True)
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) == (uids.seg_series, uids.seg_instance)
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID) == (uids.sr_series, uids.sr_instance)
    # Tracking UIDs too follow from the SEG's UID: a SEG written again is the same object.
    assert [str(d.TrackingUID) for d in seg.SegmentSequence] == [
        derived_uid(uids.seg_instance, "tracking", str(d.SegmentNumber)) for d in seg.SegmentSequence]
    assert len(ct_stub.stored) == 1  # one STOW request, after everything was computed
    stored = _stored_datasets(ct_stub.stored[0])
    assert sorted(d.SOPInstanceUID for d in stored) == sorted([uids.seg_instance, uids.sr_instance])
    posts = [path for method, path, _ in ct_stub.requests if method == "POST"]
    assert posts == [f"/dicom-web/studies/{ct_stub.study}"]
    steps = " ".join(r.getMessage() for r in caplog.records)
    for step in ("QIDO", "WADO", "inference", "STOW"):
        assert step in steps

    # The study now holds this run's SEG and SR: a re-run retrieves, computes and stores nothing.
    ct_stub.series += [_series_json(ct_stub.study, uids.seg_series, "SEG", 1), _series_json(ct_stub.study, uids.sr_series, "SR", 1)]
    n_requests = len(ct_stub.requests)
    again = run_round_trip(ct_stub.url, ct_stub.study, tiny_bundle, prompts=["liver", "spleen"], device="cpu")
    assert again.status == "already stored" and again.uids == uids and len(ct_stub.stored) == 1
    assert all("/series/" + ct_stub.ct not in path for _, path, _ in ct_stub.requests[n_requests:])  # no WADO
    # watch sees nothing to do either; with other prompts, the series is new work.
    assert watch(ct_stub.url, tiny_bundle, interval_s=5, prompts=["liver", "spleen"], once=True) == []


def test_study_holding_the_seg_but_not_the_sr_gets_only_the_sr(ct_stub, tiny_bundle, clean_env, tmp_path):
    """This run's SEG is in the study, its SR is not (deleted, or a STOW cut short): the re-run
    retrieves and computes again and stores the SR alone, so the study ends with one of each."""
    uids = output_uids(ct_stub.ct, BundleInfo.read(tiny_bundle), ["liver", "spleen"])
    ct_stub.series.append(_series_json(ct_stub.study, uids.seg_series, "SEG", 1))
    outcome = run_round_trip(ct_stub.url, ct_stub.study, tiny_bundle, prompts=["liver", "spleen"], device="cpu")
    assert (outcome.status, outcome.stored, outcome.uids) == ("stored", ("SR",), uids)
    assert any(f"/series/{ct_stub.ct}" in path for method, path, _ in ct_stub.requests if method == "GET")  # WADO ran
    assert len(ct_stub.stored) == 1
    (sr,) = _stored_datasets(ct_stub.stored[0])
    assert (sr.Modality, sr.SeriesInstanceUID, sr.SOPInstanceUID) == ("SR", uids.sr_series, uids.sr_instance)
    assert "stored SR in study" in outcome.summary()


def test_stow_failure_names_stow_and_keeps_nothing_half_stored(ct_stub, tiny_bundle, clean_env, tmp_path):
    ct_stub.fail[("POST", "/dicom-web/studies")] = 503
    with pytest.raises(DicomwebError) as err:
        run_round_trip(ct_stub.url, ct_stub.study, tiny_bundle, prompts=["liver", "spleen"], device="cpu")
    assert err.value.step == "STOW" and str(err.value).startswith(f"STOW at {ct_stub.url}: ") and "HTTP 503" in str(err.value)
    assert not ct_stub.stored


def test_inference_failure_names_inference_and_stores_nothing(ct_stub, tiny_bundle, clean_env, tmp_path):
    with pytest.raises(DicomwebError) as err:
        run_round_trip(ct_stub.url, ct_stub.study, tiny_bundle, prompts=["brian"], device="cpu")
    assert err.value.step == "inference" and "brian" in str(err.value) and ct_stub.ct in str(err.value)
    assert not ct_stub.stored and all(method == "GET" for method, _, _ in ct_stub.requests)
