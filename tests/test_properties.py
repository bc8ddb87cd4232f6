"""Property-based tests of the core on random images and masks."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dials_truncfix.core.assignment import ASSIGNMENTS
from dials_truncfix.core.correction import correct_image
from dials_truncfix.core.parameters import CorrectionParameters
from dials_truncfix.core.shells import ShellError, build_shell_map

SHAPE = (24, 30)


@st.composite
def scenes(draw):
    image = draw(arrays(np.uint16, SHAPE, elements=st.integers(0, 40)))
    # bias towards many zeros and a lognormal-ish spread so that fits succeed sometimes
    noise = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        rng = np.random.default_rng(noise)
        image = np.clip(
            np.rint(-6 + np.exp(2 + 0.4 * rng.standard_normal(SHAPE))), 0, 65535
        ).astype(np.uint16)
    valid = draw(arrays(np.bool_, SHAPE, elements=st.booleans()))
    centre = (draw(st.floats(-10, 40)), draw(st.floats(-10, 40)))
    slow, fast = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    inv_d2 = (fast - centre[0]) ** 2 + (slow - centre[1]) ** 2
    azimuth = np.arctan2(slow - centre[1], fast - centre[0])
    n_shells = draw(st.integers(1, 6))
    n_sectors = draw(st.sampled_from([1, 1, 2, 3]))
    seed = draw(st.integers(0, 2**40))
    assignment = draw(st.sampled_from(ASSIGNMENTS))
    return image, valid, inv_d2, azimuth, n_shells, n_sectors, seed, assignment


# derandomized: CI sees the same 300 examples every run (explore more by hand)
@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(scenes())
def test_correction_invariants(scene):
    image, valid, inv_d2, azimuth, n_shells, n_sectors, seed, assignment = scene
    try:
        shell_map = build_shell_map(
            [inv_d2],
            [valid],
            n_shells,
            min_pixels_per_shell=20,
            azimuth=[azimuth],
            n_sectors=n_sectors,
        )
    except ShellError:
        assert valid.sum() < 20
        return
    before = image.copy()
    params = CorrectionParameters(
        n_shells=n_shells,
        seed=seed,
        min_pixels_per_shell=20,
        assignment=assignment,
        n_sectors=n_sectors,
    )
    result = correct_image([image], shell_map, params, "prop")
    out = np.asarray(result.data[0])
    assert np.array_equal(image, before), "input modified"
    assert out.shape == image.shape
    positive = image > 0
    assert np.array_equal(out[positive], image[positive]), "a positive pixel changed"
    assert np.all(out[image == 0] <= 0), "a former zero became positive"
    assert np.array_equal(out[~valid], image[~valid]), "a masked pixel changed"
    assert result.n_changed == int(np.count_nonzero(out != image))
    again = correct_image([image], shell_map, params, "prop")
    assert np.array_equal(np.asarray(again.data[0]), out)
    labels = shell_map.labels.reshape(SHAPE)
    for region, shell in enumerate(result.shells):
        assert (shell.shell, shell.sector) == (
            shell_map.shell[region],
            shell_map.sector[region],
        )
        if shell.n_changed and assignment == "expectation":
            # independent draws of floor(m) or floor(m) + 1: within 6 binomial
            # standard deviations of n m (300 examples), plus the slot rounding
            given = out[(labels == region) & (image == 0)].astype(np.int64)
            m = shell.conditional_mean
            f = m - np.floor(m)
            bound = (
                6 * np.sqrt(shell.n_zero * f * (1 - f)) + shell.n_zero / 65536 + 1e-9
            )
            assert abs(given.sum() - shell.n_zero * m) <= bound
            assert set(np.unique(given)) <= {np.floor(m), np.floor(m) + 1}
