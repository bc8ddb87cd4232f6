"""Zeros are given values only where they are truncation: the censored low
tail of the region's fit.  The zeros of an offset camera (dead border, beam
stop, dead pixels, a gap of empty bins above 0) read exactly as stock."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import read_back, run

from devtools.synthetic import (
    draw_true_values,
    falling_parameters,
    smv_geometry,
    truncate,
)
from devtools.truncation_rates import offset_camera_image, radial_map
from dials_truncfix.core.correction import CORRECTED, correct_image
from dials_truncfix.core.histogram import counts_up_to, imax
from dials_truncfix.core.lognormal import Distribution, LognormalFit, fit_lognormal
from dials_truncfix.core.parameters import CorrectionParameters
from dials_truncfix.core.truncation import why_not_truncation
from dials_truncfix.corrector import NOT_VALID
from dials_truncfix.io.smv import smv_pedestal

PARAMS = CorrectionParameters()


def _fit(histogram, n):
    top = imax(histogram, n, PARAMS)
    h = counts_up_to(histogram, top)
    return fit_lognormal(h, n - h.sum())


def _truncated(theta, mu, sigma, n, seed):
    values = truncate(
        theta + np.exp(mu + sigma * np.random.default_rng(seed).standard_normal(n))
    )
    return np.bincount(values)


@pytest.mark.parametrize(
    "theta, mu, sigma",
    [(-8.0, 2.2, 0.5), (-20.0, 3.2, 0.35), (-14.0, 2.5, 0.45), (-5.0, 1.6, 0.5)],
)
@pytest.mark.parametrize("n", [3000, 400000])
def test_real_truncation_is_accepted(theta, mu, sigma, n):
    """Truncated shifted lognormals from 1% to 75% zeros, few and many pixels."""
    histogram = _truncated(theta, mu, sigma, n, seed=n)
    assert 0.01 < histogram[0] / n < 0.8
    fit = _fit(histogram, n)
    assert fit.converged
    assert why_not_truncation(histogram, n, fit) is None


@pytest.mark.parametrize("offset", [10, 25, 40])
def test_offset_camera_zeros_with_a_gap_are_not_truncation(offset):
    """Dead pixels at 0 below a background that starts well above 0."""
    rng = np.random.default_rng(offset)
    values = np.rint(offset + 8 + rng.normal(0, 3, 200000)).clip(1).astype(int)
    values[:4000] = 0
    histogram = np.bincount(values)
    fit = _fit(histogram, values.size)
    reason = why_not_truncation(histogram, values.size, fit)
    assert reason is not None and reason.startswith("gap of empty bins above 0")


def _converged(theta, mu, sigma):
    """A converged fit of the paper's lognormal (theta, mu, sigma)."""
    d = Distribution.from_lognormal(theta, mu, sigma)
    return LognormalFit(d.location, d.scale, d.shape, 0.0, 0.0, True, 1)


def test_a_fit_that_misses_the_low_bins_is_not_truncation():
    """Converged fits whose low bins miss the observed ones several-fold
    (theta shifted either way): the zeros are not their censored tail, but
    under the true parameters they are."""
    n, theta, mu, sigma = 200000, -8.0, 2.2, 0.5
    histogram = _truncated(theta, mu, sigma, n, seed=3)
    assert why_not_truncation(histogram, n, _converged(theta, mu, sigma)) is None
    for shift in (-8.0, 4.0):
        reason = why_not_truncation(histogram, n, _converged(theta + shift, mu, sigma))
        assert reason is not None and reason.startswith(
            "the fit misses the low counts"
        ), shift


def test_offset_camera_image_is_left_exactly_as_it_was(caplog):
    """Every region of an offset camera is left alone, with the reason in its
    status and one line for the image."""
    image = offset_camera_image(512, 25, np.random.default_rng(1))
    with caplog.at_level("INFO"):
        result = correct_image([image], radial_map(512), PARAMS, "offset#0")
    np.testing.assert_array_equal(result.data[0], image)
    with_zeros = [s for s in result.shells if s.n_zero]
    assert with_zeros and all(
        s.status.startswith("not truncation: gap of empty bins above 0")
        for s in with_zeros
    )
    # every zero pixel is given no value: those of the regions and of the
    # all-zero border lines (left as they were as damaged lines)
    left = result.zeros_left()
    assert len(left) == len(np.unique(left)) == np.count_nonzero(image == 0)
    assert not image.ravel()[left].any()
    lines = [r.message for r in caplog.records if "not truncation" in r.message]
    assert len(lines) == 1 and f"{len(with_zeros)} of 10 regions" in lines[0]
    # the next image of the sweep, alike: no second line
    with caplog.at_level("INFO"):
        correct_image(
            [offset_camera_image(512, 25, np.random.default_rng(2))],
            radial_map(512),
            PARAMS,
            "offset#1",
        )
    assert len([r for r in caplog.records if "not truncation" in r.message]) == 1


# --- end to end: a camera whose inner shells carry an offset and a beam stop ------------------

SIZE = 512
OFFSET_SHELLS = 2  # shells 0 and 1 are offset, the others truncated


def _offset_and_truncated_sweep(directory, n_images=2):
    """SMV images whose inner shells (by the dxtbx geometry) hold a 40-count
    offset background with a beam-stop disc and dead pixels at 0, the outer
    shells a truncated background.  Returns (paths, boolean map of the
    offset shells' pixels)."""
    import dxtbx

    from dials_truncfix.core.shells import build_shell_map
    from dials_truncfix.geometry import inv_d2_per_panel
    from dials_truncfix.io.smv import write_smv

    header = dict(smv_geometry(SIZE), OSC_RANGE=0.36)
    probe = str(directory / "probe_00000.img")
    write_smv(probe, np.zeros((SIZE, SIZE), np.uint16), **header, OSC_START=0, PHI=0)
    image = dxtbx.load(probe)
    inv_d2 = inv_d2_per_panel(image.get_detector(), image.get_beam().get_s0())
    (directory / "probe_00000.img").unlink()
    labels = build_shell_map(
        inv_d2, [np.ones((SIZE, SIZE), bool)], 10, 1000
    ).labels.reshape(SIZE, SIZE)
    offset_region = labels < OFFSET_SHELLS
    slow, fast = np.mgrid[0:SIZE, 0:SIZE]
    centre = np.unravel_index(np.argmax(inv_d2[0] == inv_d2[0].min()), (SIZE, SIZE))
    beam_stop = np.hypot(slow - centre[0], fast - centre[1]) < 20
    rng = np.random.default_rng(7)
    paths = []
    for k in range(n_images):
        values = draw_true_values(labels, falling_parameters(10), rng)
        values[offset_region] += 40.0
        stored = truncate(values)
        stored[beam_stop] = 0
        dead = offset_region & (rng.random((SIZE, SIZE)) < 0.01)
        stored[dead] = 0
        path = str(directory / f"offset_{k + 1:05d}.img")
        write_smv(path, stored, **header, OSC_START=0.36 * k, PHI=0.36 * k)
        paths.append(path)
    return paths, offset_region.ravel()


@pytest.fixture(scope="module")
def offset_sweep(tmp_path_factory):
    directory = tmp_path_factory.mktemp("offset")
    paths, offset_region = _offset_and_truncated_sweep(directory)
    run(["dials.import", *paths, "output.experiments=stock.expt"], directory)
    return directory, paths, offset_region, read_back("stock.expt", directory)


def _assert_stock_where_left_alone(read, stock, offset_region, pedestal=0):
    """Masks as stock; pixels (raw SMV values less their pedestal) as stock
    where stock counts them valid.  Where the stock class masks zero pixels
    (current dxtbx's ADSC) they stay masked by holding NOT_VALID (in an SMV
    file: 0), the only way a trusted range can mask them while the zeros the
    correction gives stay valid."""
    (_, pixels, masks), (_, stock_pixels, stock_masks) = read, stock
    for data, mask, stock_data, stock_mask in zip(
        pixels, masks, stock_pixels, stock_masks
    ):
        assert np.count_nonzero(stock_data[offset_region] == 0) > 1000
        np.testing.assert_array_equal(mask[offset_region], stock_mask[offset_region])
        values = data - pedestal
        compared = offset_region & stock_mask
        np.testing.assert_array_equal(values[compared], stock_data[compared])
        masked = offset_region & ~stock_mask
        held = NOT_VALID if not pedestal else 0
        assert np.all((values[masked] == stock_data[masked]) | (data[masked] == held))
        # the truncated shells are corrected, their negative values valid
        negative = ~offset_region & (values < 0)
        assert np.count_nonzero(negative) > 10000 and mask[negative].all()


@pytest.mark.slow
def test_offset_shells_read_as_stock_on_read(offset_sweep):
    directory, paths, offset_region, stock = offset_sweep
    run(
        ["dials.import", *paths, "output.experiments=on_read.expt"],
        directory,
        DIALS_TRUNCFIX="1",
    )
    _assert_stock_where_left_alone(
        read_back("on_read.expt", directory), stock, offset_region
    )


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["cbf", "smv"])
def test_offset_shells_read_as_stock_after_correct_truncation(offset_sweep, fmt):
    directory, _, offset_region, stock = offset_sweep
    out = f"corrected_{fmt}"
    run(
        [
            "dials.correct_truncation",
            "stock.expt",
            f"output.format={fmt}",
            f"output.directory={out}",
            f"output.experiments={out}.expt",
            f"output.json={out}.json",
            "output.report=None",
            f"output.log={out}.log",
        ],
        directory,
    )
    record = json.loads((directory / f"{out}.json").read_text())
    pedestal = (
        smv_pedestal(record["sequences"][0]["lowest_value"]) if fmt == "smv" else 0
    )
    _assert_stock_where_left_alone(
        read_back(f"{out}.expt", directory), stock, offset_region, pedestal
    )
    shells = [
        s
        for sweep in record["sequences"]
        for image in sweep["images"]
        for s in image["shells"]
    ]
    assert {
        s["status"].split(":")[0] for s in shells if s["shell"] < OFFSET_SHELLS
    } == {"not truncation"}
    assert {s["status"] for s in shells if s["shell"] >= OFFSET_SHELLS} == {CORRECTED}
