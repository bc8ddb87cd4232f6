"""dials.correct_truncation end to end on small synthetic sweeps: what stock
DIALS reads back from its outputs, under either trusted-range semantics."""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np
import pytest
from helpers import one_line_error, read_back, run, spot_count

from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

from devtools.camera_files import write_timepix_smvs
from devtools.synthetic import (
    add_spots,
    draw_true_values,
    falling_parameters,
    radial_inv_d2,
    truncate,
)
from dials_truncfix import compat
from dials_truncfix.core.parameters import CorrectionParameters
from dials_truncfix.corrector import corrector_for
from dials_truncfix.io.smv import write_smv
from dials_truncfix.program.tasks import shell_geometry_of
from dials_truncfix.settings import Settings

SHAPE = (256, 256)
ARGS = ["n_shells=4", "min_pixels_per_shell=100"]
PARAMS = CorrectionParameters(n_shells=4, min_pixels_per_shell=100)
OVERLOADED = (slice(100, 103), slice(200, 203))


def _images(n, seed=0, overloads=False):
    inv = radial_inv_d2(SHAPE, (128.0, 128.0), pixel_size=0.1248)
    edges = np.quantile(inv, np.linspace(0, 1, 7))
    labels = np.clip(np.searchsorted(edges, inv) - 1, 0, 5)
    out = []
    for i in range(n):
        rng = np.random.default_rng(seed * 100 + i)
        values = draw_true_values(labels, falling_parameters(6), rng)
        add_spots(values, 20, rng)
        image = truncate(values)
        if overloads:
            image[OVERLOADED] = 65535  # saturated: an ADSC overload
        out.append(image)
    return out


def make_smv_sweep(directory, n=5, seed=0, prefix="img", osc=0.5, overloads=False):
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(_images(n, seed, overloads)):
        path = directory / f"{prefix}_{i + 1:03d}.img"
        write_smv(
            path,
            image,
            PIXEL_SIZE=0.1248,
            DISTANCE=2200.0,
            WAVELENGTH=0.0251,
            BEAM_CENTER_X=16.0,
            BEAM_CENTER_Y=16.0,
            OSC_START=i * osc,
            OSC_RANGE=osc,
            TIME=1.0,
            PHI=i * osc,
            DATE="Wed Nov 25 12:00:00 2026",
        )
        paths.append(str(path))
    return paths


def expected_correction(imageset, index):
    """What the correction gives image ``index`` of an input imageset."""
    raw = imageset.get_raw_data(index)
    corrected = corrector_for(
        shell_geometry_of(imageset, index, Settings(PARAMS)), PARAMS
    ).correct(raw, _key(imageset, index))
    return corrected[0][0].as_numpy_array(), raw[0].as_numpy_array()


def _key(imageset, index):
    from dials_truncfix.corrector import image_identity

    return image_identity(imageset.get_path(index), 0)


def inputs(paths):
    return ExperimentListFactory.from_filenames(paths)[0].imageset


def check_valid(mask, data, raw):
    """Every corrected value valid, every overloaded pixel not."""
    overloaded = raw == 65535
    assert mask[~overloaded].all(), "a corrected pixel is masked"
    assert not mask[overloaded].any() and overloaded.any(), (
        "an overloaded pixel is valid"
    )
    assert (data < 0).any()


@pytest.fixture(scope="module")
def cbf_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cbf")
    paths = make_smv_sweep(tmp / "data", overloads=True)
    run(["dials.correct_truncation", *paths, *ARGS], tmp)
    return tmp, paths


@pytest.mark.slow
def test_cbf_output_reads_back_exactly_with_stock_dials(cbf_run):
    """Through corrected.expt and through a fresh dials.import of the CBFs:
    the corrected pixels, all valid, overloads invalid, the same scan."""
    tmp, paths = cbf_run
    original = inputs(paths)
    run(
        [
            "dials.import",
            *sorted(glob.glob(str(tmp / "corrected" / "*.cbf"))),
            "output.experiments=fresh.expt",
        ],
        tmp,
    )
    for name in ("corrected.expt", "fresh.expt"):
        info, pixels, masks = read_back(name, tmp)
        assert info["n"] == 5
        for i in range(5):
            want, raw = expected_correction(original, i)
            assert np.array_equal(pixels[i], want.ravel())
            assert np.array_equal(
                pixels[i][raw.ravel() > 0], raw.ravel()[raw.ravel() > 0]
            )
            check_valid(masks[i], pixels[i], raw.ravel())
    fresh = ExperimentList.from_file(str(tmp / "fresh.expt"))
    assert (
        type(fresh[0].imageset).__name__ == "ImageSequence"
        and fresh[0].scan == original.get_scan()
    )
    assert fresh[0].beam.get_polarization_fraction() == pytest.approx(
        original.get_beam().get_polarization_fraction()
    )
    assert compat.valid_integer_range(fresh[0].detector[0].get_trusted_range()) == (
        -(2**30),
        65534,
    )


@pytest.mark.slow
def test_json_and_log_say_what_was_done_to_the_images(cbf_run):
    """Per image, the pixels changed and the lowest value of the JSON record
    are those of the written image against its input; per imageset, the
    lowest value and the log's summary line agree with them."""
    tmp, paths = cbf_run
    original = inputs(paths)
    _, pixels, _ = read_back("corrected.expt", tmp)
    record = json.loads((tmp / "dials.correct_truncation.json").read_text())
    (sweep,) = record["sequences"]
    assert (
        record["parameters"]["n_shells"] == 4
        and record["parameters"]["format"] == "cbf"
    )
    assert len(sweep["images"]) == len(pixels) == 5
    for i, image in enumerate(sweep["images"]):
        raw = original.get_raw_data(i)[0].as_numpy_array().ravel()
        assert image["n_changed"] == np.count_nonzero(pixels[i] != raw) > 0
        assert image["min_value"] == pixels[i].min() < 0
        assert (
            sum(shell["n_changed"] for shell in image["shells"]) == image["n_changed"]
        )
        assert all(shell["fit"]["converged"] for shell in image["shells"])
    lowest = min(int(p.min()) for p in pixels)
    n_changed = sum(
        int(np.count_nonzero(p != original.get_raw_data(i)[0].as_numpy_array().ravel()))
        for i, p in enumerate(pixels)
    )
    assert sweep["lowest_value"] == lowest
    log = (tmp / "dials.correct_truncation.log").read_text()
    assert "dials-truncfix" in log
    assert f"5 images, {n_changed} pixels changed, lowest value {lowest}" in log


#: Run before a DIALS program so that it runs as stock DIALS without this
#: plugin: dxtbx finds format classes through the entry points of group
#: "dxtbx.format" (importlib.metadata in current dxtbx, pkg_resources in
#: dxtbx 3.11), so the plugin's distribution is left out of both, and any
#: import of the plugin fails.
WITHOUT_PLUGIN = """
import importlib.metadata, sys
sys.modules["dials_truncfix"] = None
distributions = importlib.metadata.distributions
importlib.metadata.distributions = lambda **kwargs: (
    d for d in distributions(**kwargs) if d.metadata["Name"] != "dials-truncfix")
try:
    import pkg_resources
except ImportError:
    pass
else:
    entry_points = pkg_resources.iter_entry_points
    pkg_resources.iter_entry_points = lambda group, name=None: (
        e for e in entry_points(group, name) if e.dist.project_name != "dials-truncfix")
from dials.command_line.find_spots import run
run()
"""


def find_spots_without_plugin(args, cwd, ok=True):
    """dials.find_spots as stock DIALS runs it, without this plugin."""
    return run([sys.executable, "-c", WITHOUT_PLUGIN, *args], cwd, ok=ok)


@pytest.mark.slow
def test_find_spots_without_plugin(cbf_run):
    """Stock DIALS, which cannot see the plugin, finds the same spots in
    corrected.expt as DIALS with it; the same stock DIALS cannot read an
    experiment list that needs the plugin (output.format=on_read)."""
    tmp, paths = cbf_run
    without = find_spots_without_plugin(
        ["corrected.expt", "output.reflections=stock.refl"], tmp
    )
    with_plugin = run(
        ["dials.find_spots", "corrected.expt", "output.reflections=strong.refl"], tmp
    )
    assert spot_count(without) == spot_count(with_plugin) > 0
    run(
        [
            "dials.correct_truncation",
            *paths,
            *ARGS,
            "output.format=on_read",
            "output.experiments=on_read.expt",
            "output.json=None",
            "output.report=None",
            "output.log=on_read.log",
        ],
        tmp,
    )
    needs_plugin = find_spots_without_plugin(
        ["on_read.expt", "output.reflections=on_read.refl"], tmp, ok=False
    )
    output = needs_plugin.stdout + needs_plugin.stderr
    assert (
        needs_plugin.returncode != 0
        and "Saved" not in output
        and "truncfix" in output.lower()
    )


@pytest.mark.slow
def test_existing_outputs_refused_and_overwrite_identical_for_any_nproc(cbf_run):
    tmp, paths = cbf_run
    result = run(["dials.correct_truncation", *paths, *ARGS], tmp, ok=False)
    assert (
        result.returncode != 0
        and "output.overwrite=True" in result.stdout + result.stderr
    )
    before = {
        p: open(p, "rb").read() for p in glob.glob(str(tmp / "corrected" / "*.cbf"))
    }
    for nproc in (1, 2):
        run(
            [
                "dials.correct_truncation",
                *paths,
                *ARGS,
                "output.overwrite=True",
                f"nproc={nproc}",
            ],
            tmp,
        )
        assert {p: open(p, "rb").read() for p in before} == before


@pytest.mark.slow
def test_smv_output_two_sweeps_read_back_by_stock_dials(tmp_path):
    """Each imageset its own pedestal (1 - lowest value); through
    corrected.expt and a fresh dials.import the corrected values come back
    (raw - pedestal), all valid, overloads invalid."""
    a = make_smv_sweep(tmp_path / "a", n=3, seed=1, prefix="a", overloads=True)
    b = make_smv_sweep(tmp_path / "b", n=3, seed=2, prefix="b", overloads=True)
    run(["dials.correct_truncation", *a, *b, *ARGS, "output.format=smv"], tmp_path)
    record = json.loads((tmp_path / "dials.correct_truncation.json").read_text())
    corrected = ExperimentList.from_file(str(tmp_path / "corrected.expt"))
    assert len(corrected) == 2
    for expt, sweep, paths in zip(corrected, record["sequences"], (a, b)):
        assert sweep["pedestal"] == 1 - sweep["lowest_value"] > 1
        assert expt.detector[0].get_pedestal() == sweep["pedestal"]
        fresh = ExperimentListFactory.from_filenames(
            sorted(glob.glob(str(tmp_path / "corrected" / f"{paths[0][-9]}_*.img")))
        )
        assert fresh[0].detector[0].get_pedestal() == sweep["pedestal"]
        original = inputs(paths)
        for iset in (expt.imageset, fresh[0].imageset):
            for i in range(3):
                want, raw = expected_correction(original, i)
                data = iset.get_corrected_data(i)[0].as_numpy_array()
                stored = (
                    raw < 65535
                )  # overloads are stored as 65535, minus the pedestal here
                assert np.array_equal(data[stored], want[stored])
                check_valid(iset.get_mask(i)[0].as_numpy_array(), data, raw)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["cbf", "smv"])
def test_stills_read_back_as_stills(tmp_path, fmt):
    """Zero-width images, imported as stills, come back as stills with their
    negative values valid, through corrected.expt and a fresh import."""
    paths = make_smv_sweep(tmp_path / "data", n=2, osc=0.0)
    run(["dials.import", *paths, "output.experiments=stills.expt"], tmp_path)
    run(
        ["dials.correct_truncation", "stills.expt", *ARGS, f"output.format={fmt}"],
        tmp_path,
    )
    stills = ExperimentList.from_file(str(tmp_path / "stills.expt"))
    for name in ("corrected.expt", "fresh.expt"):
        if name == "fresh.expt":
            run(
                [
                    "dials.import",
                    *sorted(glob.glob(str(tmp_path / "corrected" / "*"))),
                    "output.experiments=fresh.expt",
                ],
                tmp_path,
            )
        expts = ExperimentList.from_file(str(tmp_path / name))
        assert len(expts) == len(stills) == 2
        assert all(e.scan is None or e.scan.is_still() for e in expts)
        for i in range(2):
            iset = expts[i].imageset
            data = iset.get_corrected_data(i if len(iset) > 1 else 0)[
                0
            ].as_numpy_array()
            assert (data < 0).sum() > 1000
            assert (
                iset.get_mask(i if len(iset) > 1 else 0)[0]
                .as_numpy_array()[data < 0]
                .all()
            )


@pytest.mark.slow
def test_single_mrc_image_gives_a_single_corrected_image(tmp_path):
    import mrcfile

    with mrcfile.new(str(tmp_path / "single.mrc")) as mrc:
        mrc.set_data(_images(1)[0])
    run(["dials.correct_truncation", "single.mrc", *ARGS], tmp_path)
    assert os.listdir(tmp_path / "corrected") == ["single_00001.cbf"]
    info, pixels, masks = read_back("corrected.expt", tmp_path)
    assert (
        info["n"] == 1
        and (pixels[0] < 0).sum() > 1000
        and masks[0][pixels[0] < 0].all()
    )


@pytest.mark.slow
def test_mrc_stack_input_nproc_identical(tmp_path):
    import mrcfile

    with mrcfile.new(str(tmp_path / "stack.mrc")) as mrc:
        mrc.set_data(np.stack(_images(4, seed=3)).astype(np.uint16))
    outs = []
    for nproc in (1, 2):
        d = tmp_path / f"n{nproc}"
        d.mkdir()
        run(
            [
                "dials.correct_truncation",
                str(tmp_path / "stack.mrc"),
                *ARGS,
                f"nproc={nproc}",
            ],
            d,
        )
        outs.append(sorted((d / "corrected").iterdir()))
    assert [p.name for p in outs[0]] == [f"stack_{i:05d}.cbf" for i in range(1, 5)]
    for p, q in zip(*outs):
        assert p.read_bytes() == q.read_bytes()
    assert (
        len(
            ExperimentList.from_file(str(tmp_path / "n1" / "corrected.expt"))[
                0
            ].imageset
        )
        == 4
    )


@pytest.mark.slow
def test_no_zeros_and_too_few_pixels_write_the_images_unchanged(tmp_path):
    paths = make_smv_sweep(tmp_path, n=2)
    for k, p in enumerate(paths):  # lift every pixel above zero
        data = np.fromfile(p, dtype="<u2", offset=512).reshape(SHAPE)
        write_smv(
            p,
            data + 5,
            PIXEL_SIZE=0.1248,
            DISTANCE=2200.0,
            WAVELENGTH=0.0251,
            BEAM_CENTER_X=16.0,
            BEAM_CENTER_Y=16.0,
            OSC_START=0.5 * k,
            OSC_RANGE=0.5,
            TIME=1.0,
        )
    result = run(
        [
            "dials.correct_truncation",
            *paths,
            "n_shells=10",
            "min_pixels_per_shell=20000",
        ],
        tmp_path,
    )
    text = result.stdout + (tmp_path / "dials.correct_truncation.log").read_text()
    assert "Nothing to correct" in text and "instead of 10" in text
    assert len(os.listdir(tmp_path / "corrected")) == 2
    original = inputs(paths)
    _, pixels, _ = read_back("corrected.expt", tmp_path)
    for i, written in enumerate(pixels):
        assert np.array_equal(
            written, original.get_raw_data(i)[0].as_numpy_array().ravel()
        )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["smv", "mrc"])
def test_on_read_experiments_equal_the_written_images(tmp_path, kind):
    """output.format=on_read copies no image, yet every program reads the
    same pixels as from the CBF images written by a normal run."""
    if kind == "smv":
        files = make_smv_sweep(tmp_path / "data", n=3)
    else:
        import mrcfile

        with mrcfile.new(str(tmp_path / "stack.mrc")) as mrc:
            mrc.set_data(np.stack(_images(3, seed=5)).astype(np.uint16))
        files = [str(tmp_path / "stack.mrc")]
    run(
        [
            "dials.correct_truncation",
            *files,
            *ARGS,
            "output.format=on_read",
            "output.experiments=on_read.expt",
            "output.json=on_read.json",
            "output.report=None",
            "output.log=on_read.log",
        ],
        tmp_path,
    )
    assert not (tmp_path / "corrected").exists()
    run(["dials.correct_truncation", *files, *ARGS], tmp_path)
    on_read, on_read_pixels, on_read_masks = read_back("on_read.expt", tmp_path)
    assert on_read["format"].startswith("Truncfix_")
    record = json.loads((tmp_path / "on_read.expt").read_text())["imageset"][0][
        "params"
    ]["truncfix"]
    assert record["parameters"]["n_shells"] == 4 and record["geometry"] is not None
    _, written_pixels, _ = read_back("corrected.expt", tmp_path)
    assert len(on_read_pixels) == len(written_pixels) == 3
    for a, b, mask in zip(on_read_pixels, written_pixels, on_read_masks):
        assert np.array_equal(a, b) and (a < 0).any() and mask[a < 0].all()
    record = json.loads((tmp_path / "on_read.json").read_text())
    assert record["sequences"][0]["images"][0]["n_changed"] == int(
        np.count_nonzero(on_read_pixels[0] < 0)
    )


@pytest.mark.slow
def test_counting_detector_images_pass_through(tmp_path):
    """A TimePix sweep is not corrected by default: read unchanged with its
    stock trusted range, every panel, and the log says why.  Its full CBFs
    dxtbx would read back as one panel (a quad of four), so CBF output is
    refused before any work, in one line, and on_read is the route."""
    paths = write_timepix_smvs(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    error = one_line_error(
        run(["dials.correct_truncation", *paths], tmp_path, ok=False)
    )
    assert "dxtbx cannot read back a full CBF of this 4-panel detector" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing written"
    result = run(
        ["dials.correct_truncation", *paths, "output.format=on_read"], tmp_path
    )
    assert "counting detector" in result.stdout
    original = inputs(paths)
    expts = ExperimentList.from_file(str(tmp_path / "corrected.expt"))
    assert [p.get_trusted_range() for p in expts[0].detector] == [
        p.get_trusted_range() for p in original.get_detector()
    ]
    for i in range(2):
        read = expts[0].imageset.get_raw_data(i)
        assert len(read) == len(original.get_detector()) == 4
        for panel, stock in zip(read, original.get_raw_data(i)):
            assert np.array_equal(panel.as_numpy_array(), stock.as_numpy_array())
