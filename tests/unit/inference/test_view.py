"""``volumed view`` (volumed.inference.view): the self-contained HTML page of a segment output folder.

The output folder is made by ``segment`` with the tiny untrained package and a stand-in for the
network whose masks are known: liver on one half of the body, spleen on the other, the left
kidney everywhere under both (so it loses every voxel of the label map to them and lives only
in the page's second layer), the right kidney absent. The page is then rendered in headless
Chromium and its pixels are counted by colour.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from volumed.cli import main
from volumed.errors import ConfigError, OutputExistsError
from volumed.inference.preview import label_color, to_ras
from volumed.inference.segment import PromptSegPredictor, segment
from volumed.inference.view import WINDOWS, page_strides, render_view, report_sentences, window_to_uint8
from volumed.io import read_volume

TERMS = ["liver", "spleen", "kidney_left", "kidney_right"]


def halves_probabilities(self, case, queries, *, progress=False):
    """Soft tissue (HU above about -100) split along the first model axis: liver on the first
    half, spleen on the second, the left kidney at 0.9 of both away from the seam (present, never
    the highest), the right kidney at 0.3 (absent)."""
    hu = case.image.as_tensor()[0] * 2000.0 - 1000.0  # undo the -1000..1000 window
    base = torch.sigmoid((hu + 100.0) / 30.0)
    mid = base.shape[0] // 2
    half = torch.zeros_like(base)
    half[:mid] = 1.0
    # Away from the seam, where trilinear inversion mixes the halves, the kidney stays below both.
    away = torch.ones_like(base)
    away[mid - 3 : mid + 3] = 0.0
    maps = [base * half, base * (1.0 - half), base * 0.9 * away, base * 0.3]
    return torch.stack(maps[: queries.shape[0]]).float()


@pytest.fixture(scope="module")
def out_dir(package, ts_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("view") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PromptSegPredictor, "predict_probabilities", halves_probabilities)
        segment(ts_dir / "example_ct_sm.nii.gz", ["liver", "spleen", "left kidney", "right kidney"], model_dir=package,
                out_dir=out, progress=False)
    stats = json.loads((out / "statistics.json").read_text())["terms"]
    assert [stats[t]["present"] for t in TERMS] == [True, True, True, False]
    labels = np.asarray(nib.load(str(out / "labels.nii.gz")).dataobj)
    assert set(np.unique(labels)) == {0, 1, 2}  # the left kidney lost every voxel to liver or spleen
    return out


def page_data(page: str) -> dict:
    blob = re.search(r'<script type="application/json" id="volumed-data">(.*?)</script>', page, re.S).group(1)
    data = json.loads(blob)
    shape = tuple(data["shape"])
    for key in ("ct", "labels", "hidden"):
        flat = np.frombuffer(zlib.decompress(base64.b64decode(data[key])), dtype=np.uint8 if key == "ct" or data["label_bytes"] == 1 else "<u2")
        data[key] = flat.reshape(shape[::-1]).transpose(2, 1, 0)  # stored (Z, Y, X) C order
    return data


# ---------------------------------------------------------------------------------- the page


def test_page_is_self_contained_with_every_structure_its_statistics_and_the_report(out_dir, tmp_path):
    result = render_view(out_dir, tmp_path / "page.html")
    page = result.path.read_text(encoding="utf-8")
    # Nothing fetched at view time: no external src/href, no script file, no CSS import, no fetch.
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I)
    assert not re.search(r"<link\b|@import|\bfetch\(|XMLHttpRequest|https?://", page, re.I)
    stats = json.loads((out_dir / "statistics.json").read_text())["terms"]
    for term in TERMS:
        assert f">{term}</td>" in page or f"{term}</td>" in page, term
    for term in ("liver", "spleen", "kidney_left"):
        s = stats[term]
        volume = f"{s['volume_ml']:.1f}" if s["volume_ml"] >= 1 else f"{s['volume_ml']:.2f}"
        row = re.search(rf'<tr class="present" data-values="{s["value"]}">(.*?)</tr>', page).group(1)
        assert volume in row and f"{s['intensity']['mean']:.1f}" in row and f"{s['confidence']:.2f}" in row
        assert f'data-value="{s["value"]}"' in page  # its checkbox
    absent = re.search(r'<tr class="absent" data-values="4">(.*?)</tr>', page).group(1)
    assert "kidney_right" in absent and f"p &le; {stats['kidney_right']['max_probability_bound']:.2f}" in absent
    # report.txt, every line of it, with the sentence naming the liver wired to value 1.
    plain = html.unescape(re.sub(r"<[^>]+>", "", page))
    for line in (out_dir / "report.txt").read_text().splitlines():
        assert line in plain, line
    sentence = re.search(r'<span class="sentence" data-values="([\d ]+)"[^>]*>\s*1 liver\b', page)
    assert sentence and sentence.group(1) == "1"
    assert [s.name for s in result.structures] == TERMS and [s.present for s in result.structures] == [True, True, True, False]
    assert result.size_bytes == result.path.stat().st_size


def test_page_carries_the_ras_volume_the_label_map_and_the_layer_under_it(out_dir, tmp_path):
    """The embedded arrays are the CT windowed and the label map, reoriented to RAS and
    subsampled by the reported strides; the left kidney, absent from the label map, is in the
    second layer exactly where its mask is under liver or spleen; centroids are the masks'."""
    result = render_view(out_dir, tmp_path / "page.html", max_voxels=60_000)
    assert result.strides != (1, 1, 1) and np.prod(result.shape) <= 60_000
    data = page_data(result.path.read_text(encoding="utf-8"))
    volume = read_volume(json.loads((out_dir / "statistics.json").read_text())["image"])
    grid = tuple(slice(None, None, s) for s in result.strides)
    ct, _ = to_ras(volume)
    np.testing.assert_array_equal(data["ct"], window_to_uint8(ct, "CT", "soft")[0][grid])

    def ras(path: Path) -> np.ndarray:
        img = nib.load(str(path))
        return nib.orientations.apply_orientation(np.asarray(img.dataobj), nib.orientations.io_orientation(img.affine))

    np.testing.assert_array_equal(data["labels"], ras(out_dir / "labels.nii.gz")[grid])
    kidney = ras(out_dir / "masks" / "kidney_left.nii.gz")[grid] > 0
    assert kidney.any() and not (data["labels"] == 3).any()
    np.testing.assert_array_equal(data["hidden"] == 3, kidney)
    assert not data["hidden"][data["labels"] == 0].any()
    structures = {s["name"]: s for s in data["structures"]}
    liver = ras(out_dir / "masks" / "liver.nii.gz") > 0
    expected = [round(float(c) / s) for c, s in zip(np.argwhere(liver).mean(axis=0), result.strides)]
    assert structures["liver"]["centroid"] == expected
    assert structures["kidney_right"]["centroid"] is None and structures["kidney_right"]["present"] is False
    assert structures["liver"]["color"] == "#" + "".join(f"{round(c * 255):02x}" for c in label_color(1))


def test_page_is_coarsened_until_it_fits_the_byte_budget(out_dir, tmp_path):
    full = render_view(out_dir, tmp_path / "full.html")
    assert full.strides == (1, 1, 1)  # example_ct_sm is small: the page keeps every voxel
    small = render_view(out_dir, tmp_path / "small.html", max_bytes=full.size_bytes // 3)
    assert small.size_bytes <= full.size_bytes // 3 and small.strides != (1, 1, 1)


def test_existing_page_is_refused_unless_overwrite(out_dir, tmp_path):
    page = tmp_path / "page.html"
    page.write_text("mine")
    with pytest.raises(OutputExistsError, match="overwrite"):
        render_view(out_dir, page)
    assert page.read_text() == "mine"
    render_view(out_dir, page, overwrite=True)
    assert page.read_text().startswith("<!DOCTYPE html>")
    assert not list(tmp_path.glob(".tmp-*"))  # written atomically, no leftover


def test_default_page_goes_into_the_output_folder(out_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(out_dir, copy)
    assert render_view(copy).path == copy / "view.html" and (copy / "view.html").is_file()


def test_cli_writes_the_page_and_reports_clear_errors(out_dir, tmp_path, capsys):
    page = tmp_path / "page.html"
    with pytest.raises(SystemExit) as exit_info:
        main(["view", str(out_dir), "-o", str(page)])
    assert exit_info.value.code == 0 and page.is_file()
    assert capsys.readouterr().out.startswith(f"wrote {page} (")

    def error(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(["view", *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("volumed: error: ") and err.count("\n") == 1
        return err

    assert "output exists already" in error(str(out_dir), "-o", str(page))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a `volumed segment` output folder: no labels.nii.gz and no labels.json" in error(str(empty), "-o", str(tmp_path / "e.html"))
    assert "unknown window" in error(str(out_dir), "-o", str(tmp_path / "w.html"), "--window", "brain")

    # The image moved: the recorded path is named, --image finds it.
    moved = tmp_path / "moved"
    shutil.copytree(out_dir, moved)
    stats = json.loads((moved / "statistics.json").read_text())
    image = Path(stats["image"])
    stats["image"] = str(tmp_path / "gone" / image.name)
    (moved / "statistics.json").write_text(json.dumps(stats))
    err = error(str(moved), "-o", str(tmp_path / "m.html"))
    assert f"the segmented image {tmp_path / 'gone' / image.name} (recorded in statistics.json) is not there" in err and "--image" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["view", str(moved), "-o", str(tmp_path / "m.html"), "--image", str(image)])
    assert exit_info.value.code == 0


def test_an_image_other_than_the_segmented_one_is_refused(out_dir, ts_dir, tmp_path):
    with pytest.raises(ConfigError, match="pass the CT that was segmented"):
        render_view(out_dir, tmp_path / "page.html", image=ts_dir / "example_ct.nii.gz")


# ----------------------------------------------------------------------------- pure helpers


def test_report_sentences_find_structures_by_name_readable_form_and_synonym():
    text = ("found 2 of 3 structure(s) (probability above 0.5):\n"
            " 12 kidney_left   88.6 mL, confidence 0.69\n"
            "The left kidney is normal. The liver measures 1.2 L! Nothing delivered here.\n"
            "absent (1): spleen (p <= 0.30)\n")
    surfaces = {1: ["liver"], 2: ["spleen"], 3: ["kidney_left", "kidney left", "left kidney"], 4: ["kidney"]}
    pieces = report_sentences(text, surfaces)
    assert "".join(p.text for p in pieces) == text
    named = {p.text.strip(): p.values for p in pieces if p.values}
    assert named == {
        "12 kidney_left   88.6 mL, confidence 0.69": (3,),
        "The left kidney is normal.": (3,),  # the longer phrase wins over "kidney"
        "The liver measures 1.2 L!": (1,),
        "absent (1): spleen (p <= 0.30)": (2,),
    }
    assert any(p.text.startswith("Nothing delivered") and p.values == () for p in pieces)  # not inside a word


def test_page_strides_coarsen_the_finest_spaced_axis_first():
    assert page_strides((512, 512, 100), (0.7, 0.7, 5.0), 10**9) == (1, 1, 1)
    # Thin in-plane pixels go first; the 5 mm slices are kept.
    assert page_strides((512, 512, 100), (0.7, 0.7, 5.0), 512 * 512 * 100 // 4) == (2, 2, 1)
    # 1.4 mm pixels are still finer than 1.5 mm slices, 2.1 mm ones no longer: towards isotropic.
    assert page_strides((512, 512, 300), (0.7, 0.7, 1.5), 8_000_000) == (3, 3, 2)
    # Equal in-plane spacing stays equal (the TCIA CT, 22.8 M voxels, onto 16 M).
    assert page_strides((311, 248, 296), (1.5, 1.5, 2.5), 16_000_000) == (2, 2, 1)
    assert np.prod([-(-n // s) for n, s in zip((40, 30, 20), page_strides((40, 30, 20), (1, 1, 1), 1))]) == 1


def test_ct_windows_map_level_minus_half_width_to_0_and_plus_to_255():
    for name, (level, width) in WINDOWS.items():
        out, used = window_to_uint8(np.array([[[level - width / 2, level, level + width / 2 + 500]]]), "CT", name)
        assert used == name and out.ravel().tolist() == [0, 128, 255]


# --------------------------------------------------------------------------- headless Chromium


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("VOLUMED_REQUIRE_CHROMIUM"):
        pytest.fail("VOLUMED_REQUIRE_CHROMIUM is set (.ci/run) but no chromium is installed")
    pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    return None


def _screenshot(browser: str, page: Path, fragment: str, tmp_path: Path) -> np.ndarray:
    from PIL import Image

    shot = tmp_path / f"shot-{re.sub(r'[^a-z0-9]+', '_', fragment)}.png"
    # Virtual time lets the page's asynchronous inflate and first draw finish before the shot.
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000", f"--screenshot={shot}",
           "--window-size=1400,1000", f"{page.resolve().as_uri()}#{fragment}"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    return np.asarray(Image.open(shot).convert("RGB"))


def _count(pixels: np.ndarray, value: int) -> int:
    colour = np.array([round(c * 255) for c in label_color(value)], dtype=np.int16)
    return int(np.all(np.abs(pixels.astype(np.int16) - colour) <= 1, axis=-1).sum())


def test_headless_chromium_draws_the_overlay_and_the_toggle_removes_it(out_dir, tmp_path):
    browser = _chromium()
    page = render_view(out_dir, tmp_path / "page.html").path
    # Opaque overlay and no crosshair: a mask's pixels are exactly its colour.
    shown = _screenshot(browser, page, "alpha=1&cross=0", tmp_path)
    liver_off = _screenshot(browser, page, "alpha=1&cross=0&off=liver", tmp_path)
    swatches = 2 * 13 * 13  # the liver's legend and table swatches, at most
    assert _count(shown, 1) > 1000, "no liver overlay in the screenshot"
    assert _count(shown, 2) > 1000, "no spleen overlay in the screenshot"
    assert _count(liver_off, 1) <= swatches
    assert _count(liver_off, 2) == pytest.approx(_count(shown, 2), rel=0.02)  # the spleen is untouched
    # Unticking the liver uncovers the left kidney's mask under it (the page's second layer).
    assert _count(liver_off, 3) > _count(shown, 3) + 500
