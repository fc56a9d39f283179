"""``volumed dicomweb run`` against a real Orthanc PACS with its DICOMweb plugin (Debian packages
``orthanc`` and ``orthanc-dicomweb``): the real 20-slice CT series goes in by STOW-RS, the round
trip runs the committed default bundle, and Orthanc then holds a DICOM SEG and SR that highdicom
parses, that reference the source series and frame of reference, and whose masks equal a local
`volumed segment` of the same series voxel for voxel. A second run stores nothing.

Orthanc is a test-time Debian package, not a Python dependency. Without it this test skips,
except where ``VOLUMED_REQUIRE_ORTHANC=1`` (set by .ci/run, which installs the packages when
missing): there the test installs them itself when it can (root, apt-get) and fails otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest

from shared_helpers import run_cli

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "volumed_promptseg_ct"
PROMPTS = ["liver", "spleen"]
PLUGIN_PATHS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",)

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not (BUNDLE / "models" / "model.safetensors").is_file(), reason="no trained default bundle"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def _orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.access(p, os.X_OK)), None)


def _plugin() -> str | None:
    found = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, check=False).stdout.split()
    candidates = [p for p in found if p.endswith(".so") and "/plugins/" in p] + list(PLUGIN_PATHS)
    return next((p for p in candidates if Path(p).is_file()), None)


def _require_orthanc() -> tuple[str, str]:
    """The Orthanc binary and its DICOMweb plugin; installed with apt-get when missing and
    VOLUMED_REQUIRE_ORTHANC=1, else the test skips."""
    binary, plugin = _orthanc_binary(), shutil.which("dpkg") and _plugin()
    if binary and plugin:
        return binary, plugin
    why = "Orthanc with its DICOMweb plugin is not installed (Debian packages orthanc, orthanc-dicomweb)"
    if os.environ.get("VOLUMED_REQUIRE_ORTHANC") != "1":
        pytest.skip(f"{why}; apt-get install orthanc orthanc-dicomweb, or set VOLUMED_REQUIRE_ORTHANC=1 to install them here")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", "orthanc", "orthanc-dicomweb"]):
        done = subprocess.run(sudo + cmd, capture_output=True, text=True, env=env, check=False, timeout=600)
        if done.returncode != 0:
            pytest.fail(f"{why}, and `{' '.join(cmd)}` failed ({done.returncode}): {done.stderr.strip()[-500:]}; "
                        "VOLUMED_REQUIRE_ORTHANC=1 requires it", pytrace=False)
    binary, plugin = _orthanc_binary(), _plugin()
    if not (binary and plugin):
        pytest.fail(f"{why} even after apt-get install; VOLUMED_REQUIRE_ORTHANC=1 requires it", pytrace=False)
    return binary, plugin


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A private Orthanc on a free loopback port (no DICOM port, storage in a temporary folder,
    no remote access), with the DICOMweb plugin at /dicom-web; stopped afterwards."""
    with _orthanc_server(tmp_path_factory.mktemp("orthanc")) as urls:
        yield urls


@contextmanager
def _orthanc_server(root: Path):
    """Start an Orthanc keeping its files in ``root``; yields (DICOMweb URL, REST base URL)."""
    binary, plugin = _require_orthanc()
    root.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    config = {
        "Name": "volumed-test",
        "HttpPort": port,
        "DicomServerEnabled": False,
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpCompressionEnabled": False,
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    log = open(root / "orthanc.log", "w")
    proc = subprocess.Popen([binary, str(root / "config.json")], stdout=log, stderr=subprocess.STDOUT, cwd=root)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/system", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Orthanc did not start: {(root / 'orthanc.log').read_text()[-2000:]}", pytrace=False)
            time.sleep(0.2)
        yield f"{base}/dicom-web", base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def test_round_trip_through_orthanc_stores_seg_and_sr_once(orthanc, ts_dir, tmp_path, capsys):
    import highdicom as hd

    from volumed.io import read_volume
    from volumed.io.writer import read_dicom_seg
    from volumed.serve.dicomweb import make_client

    url, base = orthanc
    series_dir = ts_dir / "example_ct_dicom_with_uids"
    client = make_client(url)
    response = client.store_instances([pydicom.dcmread(p) for p in sorted(series_dir.iterdir()) if p.is_file()])
    assert len(response.ReferencedSOPSequence) == 20 and not getattr(response, "FailedSOPSequence", None)
    source = read_volume(series_dir)
    study, series = source.source.study_uid, source.source.series_uid

    args = ["dicomweb", "run", "--url", url, "--study", study, "--bundle", str(BUNDLE), "--device", "cpu"]
    for p in PROMPTS:
        args += ["-p", p]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert out.strip().splitlines()[-1].startswith(f"stored SEG and SR in study {study}"), out  # MONAI may print before it
    for step in ("QIDO", "WADO", "inference", "STOW"):
        assert f"{step}" in err, err

    # Orthanc holds the source series, one SEG and one SR, all in the study.
    found = client.search_for_series(study_instance_uid=study, fields=["Modality", "SeriesInstanceUID"])
    by_modality = sorted(s["00080060"]["Value"][0] for s in found)
    assert by_modality == ["CT", "SEG", "SR"], by_modality
    seg_series = next(s["0020000E"]["Value"][0] for s in found if s["00080060"]["Value"][0] == "SEG")
    sr_series = next(s["0020000E"]["Value"][0] for s in found if s["00080060"]["Value"][0] == "SR")
    (seg_ds,) = client.retrieve_series(study, seg_series, media_types=(("application/dicom", "*"),))
    (sr_ds,) = client.retrieve_series(study, sr_series, media_types=(("application/dicom", "*"),))
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    pydicom.dcmwrite(seg_path, seg_ds, enforce_file_format=True)
    pydicom.dcmwrite(sr_path, sr_ds, enforce_file_format=True)

    seg = hd.seg.segread(seg_path)
    assert seg.StudyInstanceUID == study and seg.FrameOfReferenceUID == source.source.frame_of_reference_uid
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [series]
    assert [str(d.TrackingID) for d in seg.SegmentSequence] == PROMPTS
    sr = hd.sr.srread(sr_path)
    assert sr.StudyInstanceUID == study
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert sorted(g.tracking_identifier for g in groups) == PROMPTS
    referenced_seg = {str(g.referenced_segment[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for g in groups}
    assert referenced_seg == {seg.SOPInstanceUID}

    # The stored masks are the local `volumed segment` of the same series, voxel for voxel.
    local = tmp_path / "local"
    code, _, err = run_cli(["segment", str(series_dir), *sum((["-p", p] for p in PROMPTS), []), "-o", str(local),
                         "--model", str(BUNDLE / "models"), "--no-progress"], capsys)
    assert code == 0, err
    import nibabel as nib

    labels = np.asarray(nib.load(local / "labels.nii.gz").dataobj)
    content = read_dicom_seg(seg_path, source)
    assert [s.name for s in content.segments] == PROMPTS
    for segment, value in zip(content.segments, (1, 2)):
        mask = content.masks[segment.number]
        assert mask.any()
        np.testing.assert_array_equal(mask, labels == value)

    # A second run finds this run's SEG and SR and stores nothing.
    before = _get(f"{base}/statistics")["CountInstances"]
    assert before == 22
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert out.strip().splitlines()[-1].startswith(f"already stored: study {study}"), out
    assert "WADO" not in err and "STOW" not in err
    assert _get(f"{base}/statistics")["CountInstances"] == before


def _delete(url: str) -> None:
    with urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=30) as r:
        assert r.status == 200


def _study_series(client, study: str) -> dict[str, list[str]]:
    """Modality -> SeriesInstanceUIDs of ``study``."""
    found = client.search_for_series(study_instance_uid=study, fields=["Modality", "SeriesInstanceUID"])
    by_modality: dict[str, list[str]] = {}
    for s in found or []:
        by_modality.setdefault(s["00080060"]["Value"][0], []).append(s["0020000E"]["Value"][0])
    return by_modality


def test_watch_processes_a_new_series_once_and_a_rerun_restores_only_a_missing_sr(ts_dir, tmp_path, tiny_bundle):
    """``volumed dicomweb watch`` (one pass, in-process) on a fresh Orthanc holding an unprocessed CT
    study stores its SEG and SR; a second pass stores nothing. With the SR deleted from the study
    (the SEG kept), a re-run computes again and stores only the SR: one SEG and one SR, not two SEGs."""
    from volumed.serve.dicomweb import (
        BundleInfo,
        make_client,
        output_uids,
        run_round_trip,
        watch,
    )

    bundle = tiny_bundle
    series_dir = ts_dir / "example_ct_dicom_with_uids"
    with _orthanc_server(tmp_path / "orthanc") as (url, base):  # its own Orthanc: the module's already holds a SEG
        client = make_client(url)
        response = client.store_instances([pydicom.dcmread(p) for p in sorted(series_dir.iterdir()) if p.is_file()])
        assert len(response.ReferencedSOPSequence) == 20
        first = pydicom.dcmread(min(series_dir.iterdir()), stop_before_pixels=True)
        study, ct = first.StudyInstanceUID, first.SeriesInstanceUID
        uids = output_uids(ct, BundleInfo.read(bundle), PROMPTS)
        assert _study_series(client, study) == {"CT": [ct]}

        outcomes = watch(url, bundle, interval_s=5, prompts=PROMPTS, device="cpu", once=True)
        assert [(o.status, o.study_uid, o.series_uid, o.stored) for o in outcomes] == [("stored", study, ct, ("SEG", "SR"))]
        assert _study_series(client, study) == {"CT": [ct], "SEG": [uids.seg_series], "SR": [uids.sr_series]}
        count = _get(f"{base}/statistics")["CountInstances"]
        assert count == 22

        assert watch(url, bundle, interval_s=5, prompts=PROMPTS, device="cpu", once=True) == []
        assert _get(f"{base}/statistics")["CountInstances"] == count

        # The study keeps this run's SEG but loses its SR: the re-run stores the SR alone.
        with urllib.request.urlopen(urllib.request.Request(f"{base}/tools/lookup", data=uids.sr_instance.encode()),
                                    timeout=30) as r:
            (sr,) = json.loads(r.read())  # Orthanc's ID of the SR instance
        assert sr["Type"] == "Instance"
        _delete(f"{base}/instances/{sr['ID']}")
        assert _study_series(client, study) == {"CT": [ct], "SEG": [uids.seg_series]}
        again = run_round_trip(url, study, bundle, prompts=PROMPTS, device="cpu")
        assert (again.status, again.stored) == ("stored", ("SR",))
        assert _study_series(client, study) == {"CT": [ct], "SEG": [uids.seg_series], "SR": [uids.sr_series]}
        assert _get(f"{base}/statistics")["CountInstances"] == count
