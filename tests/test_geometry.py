"""The dxtbx adapter: per-pixel resolution from real beam and detector models."""

from __future__ import annotations

import numpy as np
import pytest

from dxtbx.model import BeamFactory, Detector, DetectorFactory

from dials_truncfix.geometry import inv_d2_per_panel, shell_geometry, shell_map_for


def _beam():
    return BeamFactory.simple(0.0251)


def _simple(size=(300, 200), centre_mm=(2.0, 3.5), distance=2200.0):
    return DetectorFactory.simple(
        "PAD", distance, centre_mm, "+x", "-y", (0.0312, 0.0312), size, (-1, 65535)
    )


def _two_tilted_panels():
    detector = Detector()
    for k, (origin, fast) in enumerate(
        [
            ((-5.0, 4.0, -2200.0), (1.0, 0.0, 0.0)),
            ((0.5, 4.0, -2190.0), (0.99, 0.0, 0.141)),
        ]
    ):
        panel = detector.add_panel()
        panel.set_image_size((160, 128))
        panel.set_pixel_size((0.0312, 0.0312))
        panel.set_trusted_range((-1, 65535))
        fast = np.array(fast) / np.linalg.norm(fast)
        panel.set_frame(tuple(fast), (0.0, -1.0, 0.0), origin)
        panel.set_name(f"panel{k}")
    return detector


@pytest.mark.parametrize(
    "detector", [_simple(), _simple(centre_mm=(-1.0, 9.0)), _two_tilted_panels()]
)
def test_resolution_matches_dxtbx_per_pixel(detector):
    beam = _beam()
    arrays = inv_d2_per_panel(detector, beam.get_s0())
    rng = np.random.default_rng(0)
    for panel, inv_d2 in zip(detector, arrays):
        fast, slow = panel.get_image_size()
        assert inv_d2.shape == (slow, fast)
        for _ in range(20):
            i, j = rng.integers(0, slow), rng.integers(0, fast)
            d = panel.get_resolution_at_pixel(beam.get_s0(), (j + 0.5, i + 0.5))
            assert inv_d2[i, j] == pytest.approx(1 / d**2, rel=1e-6)


def test_shell_map_equal_area_on_two_tilted_panels_and_cached():
    detector, beam = _two_tilted_panels(), _beam()
    valid = [np.ones((128, 160), bool), np.ones((128, 160), bool)]
    valid[0][:, :20] = False
    geometry = shell_geometry(beam, detector, [valid])
    shell_map = shell_map_for(geometry, 5, 100)
    assert shell_map.n_shells == 5
    assert shell_map.n_valid.sum() == sum(v.sum() for v in valid)
    assert shell_map.n_valid.max() - shell_map.n_valid.min() <= 5
    assert np.all(np.diff(shell_map.d_min) < 0)
    assert shell_map_for(shell_geometry(beam, detector, [valid]), 5, 100) is shell_map
    other = shell_map_for(geometry, 4, 100)
    assert other is not shell_map and other.n_shells == 4


def test_image_corrector_leaves_the_raw_flex_data_alone():
    from scitbx.array_family import flex

    from devtools.synthetic import draw_true_values, falling_parameters, truncate
    from dials_truncfix.core.parameters import CorrectionParameters
    from dials_truncfix.corrector import NOT_VALID, ImageCorrector

    detector, beam = _simple(size=(300, 200)), _beam()
    corrector = ImageCorrector(
        shell_geometry(beam, detector),
        CorrectionParameters(n_shells=4, min_pixels_per_shell=100),
    )
    labels = corrector.shell_map.labels.reshape(200, 300)
    image = truncate(
        draw_true_values(labels, falling_parameters(4), np.random.default_rng(1))
    ).astype(np.int32)
    raw = (flex.int(image),)
    corrected, result = corrector.correct(raw, "img#0")
    assert np.array_equal(raw[0].as_numpy_array(), image)
    got = corrected[0].as_numpy_array()
    assert result.n_changed > 0 and np.array_equal(got[image > 0], image[image > 0])
    assert np.count_nonzero(got != image) == result.n_changed
    # passed through (negative values: not truncated), its zeros masked for
    # a stock class that masks zeros: a new array, the raw one untouched
    signed = image.copy()
    signed[0, 0] = -5
    raw = (flex.int(signed),)
    masked, result = corrector.correct(raw, "img#1", zeros_valid=False)
    assert result.status.startswith("not truncated") and np.array_equal(
        raw[0].as_numpy_array(), signed
    )
    got = masked[0].as_numpy_array()
    assert (
        np.array_equal(got[signed != 0], signed[signed != 0])
        and (got[signed == 0] == NOT_VALID).all()
    )
