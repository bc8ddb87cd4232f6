"""Tests of the MicroED sweep simulator (devtools.simulate)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

dxtbx = pytest.importorskip("dxtbx")
pytest.importorskip("dials")

from devtools import simulate  # noqa: E402
from dials_truncfix import compat  # noqa: E402

# A small sweep: the detector covers the angles of the real one, so the
# resolution range (and hence the truncation statistics) is the same.
SMALL = ["image_size=512", "n_images=6", "seed=7"]


def make_params(directory, *extra):
    return simulate.get_params(
        list(SMALL) + ["output.directory=%s" % directory] + list(extra)
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A written small sweep: (params, result, directory)."""
    directory = str(tmp_path_factory.mktemp("sim"))
    params = make_params(directory)
    result = simulate.simulate_sweep(params)
    simulate.write_sweep(result)
    return params, result, directory


def read_raw(path):
    return dxtbx.load(path).get_raw_data().as_numpy_array()


def image_pairs(params, directory):
    return [simulate.image_paths(params, i, directory) for i in range(params.n_images)]


def pixel_resolution(detector, beam):
    """d (A) at every pixel centre, from the dxtbx panel (slow, fast)."""
    from scitbx.array_family import flex

    panel = detector[0]
    nf, ns = panel.get_image_size()
    f, s = np.meshgrid(np.arange(nf) + 0.5, np.arange(ns) + 0.5)
    xy = flex.vec2_double(flex.double(f.ravel()), flex.double(s.ravel()))
    lab = np.array(panel.get_lab_coord(panel.pixel_to_millimeter(xy)))
    s1 = lab / np.linalg.norm(lab, axis=1)[:, None] / beam.get_wavelength()
    q = np.linalg.norm(s1 - np.array(beam.get_s0()), axis=1)
    with np.errstate(divide="ignore"):
        return (1 / q).reshape(ns, nf)


def test_phil_scope_documented():
    for d in simulate.phil_scope.all_definitions():
        assert d.object.help, "parameter %s has no help" % d.path
    p = simulate.get_params([])
    assert p.image_size == 2048 and p.n_images == 50
    assert p.osc_width == pytest.approx(0.36)
    assert p.beam.wavelength == pytest.approx(0.0251)
    assert simulate.pixel_size_for(p) == pytest.approx(0.0312)
    p = simulate.get_params(["image_size=512"])
    assert simulate.pixel_size_for(p) == pytest.approx(0.0312 * 4)
    assert str(p.crystal.space_group) == "P 43 21 2"


def test_outputs_written_atomically(sweep):
    params, result, directory = sweep
    for smv, cbf in image_pairs(params, directory):
        assert os.path.isfile(smv) and os.path.isfile(cbf)
    for name in (
        "truth_intensities.mtz",
        "truth_reflections.refl",
        "truth.expt",
        "simulation.json",
    ):
        assert os.path.isfile(os.path.join(directory, name))
    leftovers = [
        p
        for p in glob.glob(os.path.join(directory, "**", ".*"), recursive=True)
        if os.path.isfile(p)
    ]
    assert not leftovers
    meta = json.load(open(os.path.join(directory, "simulation.json")))
    assert meta["gain_adu_per_electron"] == pytest.approx(params.camera.gain)


def test_smv_header(sweep):
    params, result, directory = sweep
    from dxtbx.format.FormatSMV import FormatSMV

    path = image_pairs(params, directory)[2][0]
    size, header = FormatSMV.get_smv_header(path)
    assert size % 512 == 0
    assert os.path.getsize(path) == size + 2 * params.image_size**2
    for key in (
        "HEADER_BYTES DIM BYTE_ORDER TYPE SIZE1 SIZE2 PIXEL_SIZE DISTANCE "
        "OSC_START OSC_RANGE PHI WAVELENGTH BEAM_CENTER_X BEAM_CENTER_Y TIME DATE"
    ).split():
        assert key in header
    assert header["BYTE_ORDER"] == "little_endian"
    assert header["TYPE"] == "unsigned_short"
    assert float(header["OSC_START"]) == pytest.approx(2 * params.osc_width)


def test_determinism(tmp_path):
    tiny = ["image_size=96", "n_images=3", "d_min=2.5"]
    runs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        d = str(tmp_path / name)
        p = simulate.get_params(tiny + ["seed=%d" % seed, "output.directory=%s" % d])
        simulate.write_sweep(simulate.simulate_sweep(p))
        runs.append(d)

    def contents(d):
        files = sorted(
            os.path.relpath(f, d)
            for f in glob.glob(os.path.join(d, "**", "*"), recursive=True)
            if os.path.isfile(f)
        )
        return {f: open(os.path.join(d, f), "rb").read() for f in files}

    a, b, c = (contents(d) for d in runs)
    assert a.keys() == b.keys()
    for f in a:
        if f.endswith((".img", ".cbf", ".json", ".mtz")):
            assert a[f] == b[f], f
    assert a["truncated/sim_00001.img"] != c["truncated/sim_00001.img"]


def test_truncated_is_clipped_truth(sweep):
    params, result, directory = sweep
    n_neg = 0
    for smv, cbf in image_pairs(params, directory):
        trunc = read_raw(smv)
        truth = read_raw(cbf)
        assert trunc.shape == truth.shape == (params.image_size,) * 2
        np.testing.assert_array_equal(trunc, np.clip(truth, 0, 65535))
        below = truth <= 65535
        np.testing.assert_array_equal(trunc[below], np.maximum(truth[below], 0))
        n_neg += (truth < 0).sum()
    assert n_neg > 0
    # the files hold what the in-memory renderer produces
    np.testing.assert_array_equal(
        read_raw(cbf), result.truth_image(params.n_images - 1)
    )


def test_zeros_concentrated_at_high_resolution(sweep):
    params, result, directory = sweep
    expt = result.experiments[0]
    d = pixel_resolution(expt.detector, expt.beam)
    high = d < 2.0
    low = d > 4.0
    assert high.sum() > 1000 and low.sum() > 1000
    zero_high, zero_low = [], []
    for smv, _ in image_pairs(params, directory):
        trunc = read_raw(smv)
        zero_high.append((trunc[high] == 0).mean())
        zero_low.append((trunc[low] == 0).mean())
    assert np.mean(zero_high) > 0.10
    assert np.mean(zero_low) < 0.02
    assert np.mean(zero_high) > 10 * np.mean(zero_low)


def test_formats_and_trusted_ranges(sweep):
    params, result, directory = sweep
    from dxtbx.format.Registry import get_format_class_for_file

    smv, cbf = image_pairs(params, directory)[0]
    assert get_format_class_for_file(smv).__name__ == "FormatSMVADSC"
    assert get_format_class_for_file(cbf).__name__ == "FormatCBFFullByteOffset"
    img = dxtbx.load(smv)
    assert (
        compat.valid_integer_range(img.get_detector()[0].get_trusted_range())[1]
        == 65534
    )
    truth = dxtbx.load(cbf)
    assert (
        compat.valid_integer_range(truth.get_detector()[0].get_trusted_range())
        == simulate.TRUTH_VALID_RANGE
    )
    raw = truth.get_raw_data()
    assert raw.as_numpy_array().min() < 0
    mask = truth.get_detector()[0].get_trusted_range_mask(raw).as_numpy_array()
    assert mask.all()


def test_models_match_simulation(sweep):
    """The headers of both outputs describe the geometry that was simulated."""
    params, result, directory = sweep
    from dxtbx.model.experiment_list import ExperimentListFactory

    truth = result.experiments[0]
    for k in (0, 1):
        files = [pair[k] for pair in image_pairs(params, directory)]
        expts = ExperimentListFactory.from_filenames(files)
        assert len(expts) == 1
        e = expts[0]
        assert len(e.imageset) == params.n_images
        assert e.scan.get_image_range() == (1, params.n_images)
        assert e.scan.get_oscillation() == pytest.approx(truth.scan.get_oscillation())
        p, q = e.detector[0], truth.detector[0]
        assert p.get_origin() == pytest.approx(q.get_origin(), abs=1e-6)
        assert p.get_fast_axis() == pytest.approx(q.get_fast_axis())
        assert p.get_slow_axis() == pytest.approx(q.get_slow_axis())
        assert p.get_pixel_size() == pytest.approx(q.get_pixel_size())
        assert p.get_gain() == pytest.approx(params.camera.gain)
        assert e.beam.get_s0() == pytest.approx(truth.beam.get_s0())
        assert e.beam.get_polarization_fraction() == pytest.approx(
            truth.beam.get_polarization_fraction()
        )
        assert e.goniometer.get_rotation_axis() == pytest.approx(
            truth.goniometer.get_rotation_axis()
        )


@pytest.mark.slow
def test_fresh_dials_import(sweep, tmp_path):
    """Stock dials.import of both directories: format classes, trusted
    ranges, and that negative truth pixels are not masked."""
    params, result, directory = sweep
    from dxtbx.model.experiment_list import ExperimentListFactory

    outputs = {}
    for k, name in ((0, "truncated"), (1, "truth")):
        files = [pair[k] for pair in image_pairs(params, directory)]
        out = str(tmp_path / (name + ".expt"))
        subprocess.run(
            [sys.executable, "-m", "dials.command_line.dials_import"]
            + files
            + ["output.experiments=%s" % out],
            cwd=str(tmp_path),
            check=True,
            capture_output=True,
        )
        outputs[name] = ExperimentListFactory.from_json_file(out)[0]
    t, r = outputs["truncated"], outputs["truth"]
    assert t.imageset.get_format_class().__name__ == "FormatSMVADSC"
    assert r.imageset.get_format_class().__name__ == "FormatCBFFullByteOffset"
    assert compat.valid_integer_range(t.detector[0].get_trusted_range())[1] == 65534
    assert (
        compat.valid_integer_range(r.detector[0].get_trusted_range())
        == simulate.TRUTH_VALID_RANGE
    )
    for i in range(len(r.imageset)):
        truth = r.imageset.get_raw_data(i)[0].as_numpy_array()
        trunc = t.imageset.get_raw_data(i)[0].as_numpy_array()
        np.testing.assert_array_equal(truth, result.truth_image(i))
        np.testing.assert_array_equal(trunc, np.clip(truth, 0, 65535))
        mask = r.imageset.get_mask(i)[0].as_numpy_array()
        assert mask[truth < 0].all()
        assert mask.all()


def test_predicted_spots_on_bright_pixels(sweep):
    params, result, directory = sweep
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentListFactory

    refl = flex.reflection_table.from_file(
        os.path.join(directory, "truth_reflections.refl")
    )
    truth_expt = ExperimentListFactory.from_json_file(
        os.path.join(directory, "truth.expt"), check_format=False
    )[0]
    # DIALS' own prediction from the imported SMV models + the true crystal
    files = [pair[0] for pair in image_pairs(params, directory)]
    expt = ExperimentListFactory.from_filenames(files)[0]
    expt.crystal = truth_expt.crystal
    pred = simulate.predict_reflections(expt, params.d_min)
    pred_pos = dict(zip(pred["miller_index"], pred["xyzcal.px"]))
    n_common = 0
    for h, xyz in zip(refl["miller_index"], refl["xyzcal.px"]):
        if h in pred_pos:
            assert pred_pos[h] == pytest.approx(xyz, abs=1e-3)
            n_common += 1
    assert n_common > 0.5 * len(pred)

    # strong recorded spots sit on bright pixels: the pixel at the predicted
    # position is brighter than the pixels 4 px away, and brighter than the
    # pixel at the transposed position (a fast/slow swap would fail)
    x, y, z = (np.array(c) for c in refl["xyzcal.px"].parts())
    recorded = np.array(refl["intensity.true.value"])
    n = params.image_size
    offsets = ((4, 0), (-4, 0), (0, 4), (0, -4))
    brighter, transposed = [], []
    for i, (smv, _) in enumerate(image_pairs(params, directory)):
        img = read_raw(smv).astype(float)
        sel = (
            (np.floor(z) == i)
            & (recorded > 2000)  # electrons
            & (x > 5)
            & (x < n - 5)
            & (y > 5)
            & (y < n - 5)
        )
        ix, iy = x[sel].astype(int), y[sel].astype(int)
        peak = img[iy, ix]
        ring = np.stack([img[iy + dy, ix + dx] for dx, dy in offsets], axis=1)
        brighter.extend(peak > np.median(ring, axis=1))
        transposed.extend(peak > img[ix, iy])
    assert len(brighter) > 20
    assert np.mean(brighter) > 0.9
    assert np.mean(transposed) > 0.9


def test_truth_intensities(sweep):
    params, result, directory = sweep
    from cctbx import miller
    from dials.array_family import flex
    from iotbx import mtz

    m = mtz.object(os.path.join(directory, "truth_intensities.mtz"))
    arrays = {a.info().labels[0]: a for a in m.as_miller_arrays()}
    i_true = arrays["I"]
    assert i_true.is_xray_intensity_array()
    assert str(i_true.space_group_info()) == "P 43 21 2"
    assert i_true.d_min() < params.d_min
    # strong at low resolution, weak at high resolution
    low = i_true.resolution_filter(d_min=4.0)
    high = i_true.resolution_filter(d_max=1.6)
    assert np.mean(np.array(low.data())) > 10 * np.mean(np.array(high.data()))

    refl = flex.reflection_table.from_file(
        os.path.join(directory, "truth_reflections.refl")
    )
    corrected = np.array(refl["intensity.true.corrected"])
    lp = np.array(refl["lp"])
    # intensity_scale: mean electrons recorded per reflection (before LP)
    assert np.mean(corrected / lp) == pytest.approx(params.intensity_scale, rel=1e-9)
    assert (corrected > 0).all()
    recorded = np.array(refl["intensity.true.value"])
    fraction = np.array(refl["fraction_recorded"])
    np.testing.assert_allclose(recorded, corrected / lp * fraction, rtol=1e-9)
    # the observations carry the intensities of the MTZ
    obs = miller.set(
        i_true.crystal_symmetry(), refl["miller_index"], anomalous_flag=False
    ).map_to_asu()
    lookup = dict(zip(i_true.indices(), i_true.data()))
    expected = np.array([lookup[h] for h in obs.indices()])
    np.testing.assert_allclose(corrected, expected, rtol=1e-5)
    # and the rendered spots carry the recorded electrons
    total = np.bincount(
        result.pair_refl, weights=result.pair_electrons, minlength=len(refl)
    )
    strong = recorded > 1
    np.testing.assert_allclose(total[strong], recorded[strong], rtol=1e-3)


def test_cli(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "devtools.simulate",
            "image_size=64",
            "n_images=2",
            "d_min=3",
            "output.truth_images=False",
            "output.directory=%s" % out,
        ],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(simulate.__file__))),
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out / "truncated")) == ["sim_00001.img", "sim_00002.img"]
    assert not (out / "truth").exists()


@pytest.mark.slow
def test_readnoise_camera_is_corrected_through_dials(tmp_path):
    """The read-noise-dominated camera (preset=readnoise: read noise 8 ADU
    above a gain of 2 ADU per electron, low background): its outer-shell low
    counts are near-Gaussian, and through DIALS_TRUNCFIX=1 dials.import the
    zero pixels read back with at least 80% of their bias against the truth
    removed, positive pixels unchanged, and the record names the normal
    where the fits ended there."""
    from helpers import read_back, run

    directory = str(tmp_path / "sim")
    params = simulate.get_params(
        [
            "image_size=512",
            "n_images=3",
            "seed=5",
            "preset=readnoise",
            "output.directory=%s" % directory,
        ]
    )
    assert (params.camera.read_noise, params.camera.gain) == (8, 2)
    result = simulate.simulate_sweep(params)
    simulate.write_sweep(result)
    smvs = [smv for smv, _ in image_pairs(params, directory)]
    run(
        ["dials.import", *smvs, "output.experiments=on_read.expt"],
        tmp_path,
        DIALS_TRUNCFIX="1",
    )
    _, pixels, masks = read_back("on_read.expt", tmp_path)
    run(["dials.import", *smvs, "output.experiments=stock.expt"], tmp_path)
    run(
        [
            "dials.correct_truncation",
            "stock.expt",
            "output.format=on_read",
            "output.report=None",
            "nproc=1",
        ],
        tmp_path,
    )
    with open(tmp_path / "dials.correct_truncation.json") as fh:
        record = json.load(fh)
    regions = [
        sh
        for sweep in record["sequences"]
        for image in sweep["images"]
        for sh in image["shells"]
    ]
    assert all(r["status"] == "corrected" for r in regions if r["n_zero"]), [
        r["status"] for r in regions
    ]
    assert "normal" in [r["fit"]["model"] for r in regions if r["fit"]]
    for i, (smv, corrected, mask) in enumerate(zip(smvs, pixels, masks)):
        truth = result.truth_image(i).ravel().astype(float)
        trunc = read_raw(smv).ravel()
        zero = trunc == 0
        assert zero.mean() > 0.1
        assert np.array_equal(corrected[~zero], trunc[~zero])
        given = np.where(mask, corrected, 0)[zero].astype(float)
        removed = 1 - (given.mean() - truth[zero].mean()) / (0 - truth[zero].mean())
        print(f"image {i}: zeros {zero.mean():.1%}, bias removed {removed:.1%}")
        assert removed > 0.8
