"""Real images from public DIALS test data (../shared/realdata beside the
clone; its README says what each is): DIALS_TRUNCFIX=1 dials.import, a read
of every image, dials.find_spots and dials.correct_truncation, each with an
asserted outcome per file: images the plugin must not correct read exactly
as stock and are written unchanged with the reason in the log."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import one_line_error, read_back, realdata, run

#: counting detectors: read as stock on read; dials.correct_truncation writes them unchanged and says why
COUNTING = {
    "TIMEPIX_SU_512-stdgoni_0001.img": "FormatSMVTimePix_SU_512x512",
    "TIMEPIX_SU_516-stdgoni_0001.img": "FormatSMVTimePix_SU_516x516",
    "DLS_I03_smargon_0001.cbf.gz": "FormatCBFFullPilatusDLS6MSN126",
    "DLS_I23_P12M_thau_00001.cbf.gz": "FormatCBFMiniPilatusDLS12M",
    "dlsnxs2cbf_therm_0001.cbf.gz": "FormatCBFMiniEigerDLS16MSN160",
}
#: multi-panel detectors whose full CBFs dxtbx reads back as one panel: refused for CBF output
MULTI_PANEL_CBF = ("TIMEPIX_SU_512-stdgoni_0001.img", "DLS_I23_P12M_thau_00001.cbf.gz")
FLOAT_ZERO = "Gatan_float32_zero_array_001.dm4.gz"
CSPAD = "idx-20130301060858401.cbf"
JHSIM = "simtbx_FormatSMVJHSim_001.img.gz"
CORRECT = ["dials.correct_truncation", "stock.expt", "output.report=None", "nproc=1"]


def _import(tmp_path, name):
    """(on read, stock) imports of one real file, each without a traceback."""
    path = realdata(name)
    for result in (
        run(
            ["dials.import", path, "output.experiments=on_read.expt"],
            tmp_path,
            DIALS_TRUNCFIX="1",
        ),
        run(["dials.import", path, "output.experiments=stock.expt"], tmp_path),
    ):
        assert "Traceback" not in result.stdout + result.stderr
    return read_back("on_read.expt", tmp_path), read_back("stock.expt", tmp_path)


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def _assert_as_stock(tmp_path, name):
    (info, pixels, masks), (stock_info, stock_pixels, stock_masks) = _import(
        tmp_path, name
    )
    # the class may be the wrapper passing the data through (the float DM4 then has another trusted range)
    assert _same(pixels, stock_pixels) and _same(masks, stock_masks)
    found = run(
        ["dials.find_spots", "on_read.expt", "nproc=1", "max_strong_pixel_fraction=1"],
        tmp_path,
    )
    assert "Traceback" not in found.stdout + found.stderr
    return stock_pixels


def _corrected_unchanged(tmp_path, stock_pixels, *args):
    """dials.correct_truncation writes the images with the stock pixels; its log."""
    run([*CORRECT, *args], tmp_path)
    assert _same(read_back("corrected.expt", tmp_path)[1], stock_pixels)
    record = json.loads((tmp_path / "dials.correct_truncation.json").read_text())
    assert (
        sum(
            image["n_changed"]
            for sweep in record["sequences"]
            for image in sweep["images"]
        )
        == 0
    )
    return (tmp_path / "dials.correct_truncation.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COUNTING))
def test_counting_detector_reads_as_stock_and_is_written_unchanged_with_the_reason(
    tmp_path, name
):
    """Read as stock on read; dials.correct_truncation writes the images
    unchanged and says why.  The multi-panel detectors whose full CBFs dxtbx
    would read back as one panel are refused for CBF output before any work,
    in one line (an experiment list naming such files could not be read),
    and written through output.format=on_read."""
    stock_pixels = _assert_as_stock(tmp_path, name)
    args = ()
    if name in MULTI_PANEL_CBF:
        before = sorted(p.name for p in tmp_path.iterdir())
        error = one_line_error(run(CORRECT, tmp_path, ok=False))
        assert "dxtbx cannot read back a full CBF of this" in error
        assert "use output.format=on_read" in error
        assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing written"
        args = ("output.format=on_read",)
    log = _corrected_unchanged(tmp_path, stock_pixels, *args)
    assert f"not corrected: {COUNTING[name]} is a counting detector" in log


@pytest.mark.slow
def test_float_dm4_all_zero_reads_as_stock_and_is_written_unchanged(tmp_path):
    stock_pixels = _assert_as_stock(tmp_path, FLOAT_ZERO)
    assert all((p == 0).all() for p in stock_pixels)
    log = _corrected_unchanged(tmp_path, stock_pixels, "n_shells=2")
    assert "Nothing to correct" in log


@pytest.mark.slow
def test_cspad_still_with_signed_data(tmp_path):
    """Read as stock; as full CBF it stops before any work in one line (a
    still without a goniometer); on read it passes through unchanged."""
    stock_pixels = _assert_as_stock(tmp_path, CSPAD)
    assert min(p.min() for p in stock_pixels) < 0
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run(CORRECT, tmp_path, ok=False)
    assert (
        "a still without a goniometer (an XFEL still) cannot be written as a full CBF: use output.format=on_read"
        in one_line_error(result)
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing written"
    log = _corrected_unchanged(tmp_path, stock_pixels, "output.format=on_read")
    assert "passed through unchanged: not truncated data: holds negative values" in log


@pytest.mark.slow
def test_jhsim_still_is_corrected_alike_on_read_and_by_correct_truncation(tmp_path):
    """A simulated ED still with half of its pixels zero: corrected on read
    (the zeros given values <= 0, positive pixels kept) and by
    dials.correct_truncation, to the same pixels."""
    (info, pixels, masks), (stock_info, stock_pixels, _) = _import(tmp_path, JHSIM)
    assert (
        info["format"].startswith("Truncfix_")
        and stock_info["format"] == "FormatSMVJHSim"
    )
    (data,), (raw,) = pixels, stock_pixels
    assert np.array_equal(data[raw > 0], raw[raw > 0])
    assert (data < 0).sum() > 0.1 * (raw == 0).sum() and (data <= 0)[raw == 0].all()
    run(
        ["dials.find_spots", "on_read.expt", "nproc=1", "max_strong_pixel_fraction=1"],
        tmp_path,
    )
    run(CORRECT, tmp_path)
    _, corrected, _ = read_back("corrected.expt", tmp_path)
    assert np.array_equal(corrected[0], data)
    record = json.loads((tmp_path / "dials.correct_truncation.json").read_text())
    assert record["sequences"][0]["images"][0]["n_changed"] == int((data != raw).sum())
