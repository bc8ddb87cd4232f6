"""End-to-end tests of dials.correct_truncation on small synthetic sweeps."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from dials_truncfix.io.smv import write_smv
from devtools.synthetic import add_spots, draw_true_values, falling_parameters, radial_inv_d2, truncate

SHAPE = (256, 256)
ARGS = ["n_shells=4", "min_pixels_per_shell=100"]


def _images(n, seed=0):
    inv = radial_inv_d2(SHAPE, (128.0, 128.0), pixel_size=0.1248)
    edges = np.quantile(inv, np.linspace(0, 1, 7))
    labels = np.clip(np.searchsorted(edges, inv) - 1, 0, 5)
    out = []
    for i in range(n):
        rng = np.random.default_rng(seed * 100 + i)
        values = draw_true_values(labels, falling_parameters(6), rng)
        add_spots(values, 20, rng)
        out.append(truncate(values))
    return out


def make_smv_sweep(directory, n=5, seed=0, prefix="img"):
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(_images(n, seed)):
        path = directory / f"{prefix}_{i + 1:03d}.img"
        write_smv(path, image, PIXEL_SIZE=0.1248, DISTANCE=2200.0, WAVELENGTH=0.0251,
                  BEAM_CENTER_X=16.0, BEAM_CENTER_Y=16.0, OSC_START=i * 0.5,
                  OSC_RANGE=0.5, TIME=1.0, PHI=i * 0.5)
        paths.append(str(path))
    return paths


def run_cmd(args, cwd, program="dials.correct_truncation"):
    env = dict(os.environ)
    env.pop("DIALS_TRUNCFIX", None)
    return subprocess.run([program, *args], cwd=cwd, env=env, capture_output=True, text=True)


def load(path):
    from dxtbx.model.experiment_list import ExperimentListFactory

    return ExperimentListFactory.from_json_file(str(path))


def expected_correction(imageset, index, path):
    from dials_truncfix.core.parameters import CorrectionParameters
    from dials_truncfix.corrector import ImageCorrector, image_identity
    from dials_truncfix.geometry import imageset_masks

    corrector = ImageCorrector(imageset.get_detector(), imageset.get_beam(),
                               CorrectionParameters(n_shells=4, min_pixels_per_shell=100),
                               masks=imageset_masks(imageset))
    raw = imageset.get_raw_data(index)
    return corrector.correct(raw, image_identity(path, 0))[0][0].as_numpy_array(), raw[0].as_numpy_array()


@pytest.fixture(scope="module")
def smv_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smv")
    paths = make_smv_sweep(tmp / "data")
    result = run_cmd([*paths, *ARGS], tmp)
    assert result.returncode == 0, result.stderr + result.stdout
    return tmp, paths


@pytest.mark.slow
def test_cbf_output_reads_back_exactly(smv_run):
    tmp, paths = smv_run
    corrected = load(tmp / "corrected.expt")
    iset = corrected[0].imageset
    assert type(iset).__name__ == "ImageSequence" and len(iset) == 5
    inputs = load_inputs(paths)
    for i in range(5):
        want, raw = expected_correction(inputs, i, paths[i])
        got = iset.get_raw_data(i)[0].as_numpy_array()
        assert np.array_equal(got, want)
        assert np.array_equal(got[raw > 0], raw[raw > 0])
        assert (got < 0).any()
        mask = iset.get_mask(i)[0].as_numpy_array()
        assert mask[got < 0].all()
    # a fresh import of the CBF files is a sweep that keeps negatives valid
    from dxtbx.model.experiment_list import ExperimentListFactory

    fresh = ExperimentListFactory.from_filenames(sorted(str(p) for p in (tmp / "corrected").iterdir()))
    assert len(fresh) == 1 and type(fresh[0].imageset).__name__ == "ImageSequence"
    data = fresh[0].imageset.get_raw_data(0)[0].as_numpy_array()
    assert fresh[0].imageset.get_mask(0)[0].as_numpy_array()[data < 0].all()
    assert corrected[0].scan == inputs.get_scan()


def load_inputs(paths):
    from dxtbx.model.experiment_list import ExperimentListFactory

    return ExperimentListFactory.from_filenames(paths)[0].imageset


@pytest.mark.slow
def test_json_log_report(smv_run):
    tmp, paths = smv_run
    record = json.loads((tmp / "dials.correct_truncation.json").read_text())
    images = record["sweeps"][0]["images"]
    assert len(images) == 5
    shell = images[0]["shells"][0]
    for key in ("d_max", "d_min", "n_valid", "zero_fraction", "n_changed"):
        assert key in shell
    for key in ("theta", "mu", "sigma", "log_likelihood", "rmsd", "converged"):
        assert key in shell["fit"]
    assert record["sweeps"][0]["offset"] == -min(i["min_value"] for i in images)
    report = (tmp / "dials.correct_truncation.html").read_text()
    assert "Plotly.newPlot" in report and "<script src=" not in report
    assert "DIALS" in (tmp / "dials.correct_truncation.log").read_text()


@pytest.mark.slow
def test_find_spots_without_plugin(smv_run):
    tmp, _ = smv_run
    result = run_cmd(["corrected.expt", "output.reflections=strong.refl"], tmp, "dials.find_spots")
    assert result.returncode == 0, result.stderr
    assert (tmp / "strong.refl").exists()


@pytest.mark.slow
def test_existing_outputs_refused_and_overwrite_identical(smv_run, tmp_path):
    tmp, paths = smv_run
    result = run_cmd([*paths, *ARGS], tmp)
    assert result.returncode != 0 and "output.overwrite=True" in result.stdout + result.stderr
    before = (tmp / "corrected" / "img_002.cbf").read_bytes()
    result = run_cmd([*paths, *ARGS, "output.overwrite=True", "nproc=2"], tmp)
    assert result.returncode == 0, result.stderr
    assert (tmp / "corrected" / "img_002.cbf").read_bytes() == before


@pytest.mark.slow
def test_smv_output_with_offset_two_sweeps(tmp_path):
    a = make_smv_sweep(tmp_path / "a", n=3, seed=1, prefix="a")
    b = make_smv_sweep(tmp_path / "b", n=3, seed=2, prefix="b")
    result = run_cmd([*a, *b, *ARGS, "output.format=smv"], tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    record = json.loads((tmp_path / "dials.correct_truncation.json").read_text())
    corrected = load(tmp_path / "corrected.expt")
    assert len(corrected) == 2
    for expt, sweep in zip(corrected, record["sweeps"]):
        offset = sweep["offset"]
        assert offset == -min(i["min_value"] for i in sweep["images"]) > 0
        panel = expt.detector[0]
        assert panel.get_pedestal() == offset
        iset = expt.imageset
        raw = iset.get_raw_data(0)[0].as_numpy_array()
        data = iset.get_corrected_data(0)[0].as_numpy_array()
        assert np.array_equal(data, raw - offset)
        assert iset.get_mask(0)[0].as_numpy_array().all()
        assert f"IMAGE_PEDESTAL={offset};".encode() in open(iset.get_path(0), "rb").read(1024)


@pytest.mark.slow
def test_mrc_stack_input_nproc_identical(tmp_path):
    mrcfile = pytest.importorskip("mrcfile")
    stack = np.stack(_images(4, seed=3)).astype(np.uint16)
    with mrcfile.new(str(tmp_path / "stack.mrc")) as mrc:
        mrc.set_data(stack)
    outs = []
    for nproc in (1, 2):
        d = tmp_path / f"n{nproc}"
        d.mkdir()
        result = run_cmd([str(tmp_path / "stack.mrc"), *ARGS, f"nproc={nproc}"], d)
        assert result.returncode == 0, result.stderr + result.stdout
        outs.append(sorted((d / "corrected").iterdir()))
    assert [p.name for p in outs[0]] == [f"stack_{i:05d}.cbf" for i in range(1, 5)]
    for p, q in zip(*outs):
        assert p.read_bytes() == q.read_bytes()
    corrected = load(tmp_path / "n1" / "corrected.expt")
    assert len(corrected[0].imageset) == 4


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, message",
    [("missing", "no such file"), ("notexpt", "not an experiment list"),
     ("badimage", "cannot be read"), ("masked", "valid pixels")],
)
def test_bad_input(tmp_path, case, message):
    paths = make_smv_sweep(tmp_path / "data", n=2)
    args = list(paths)
    if case == "missing":
        args = [str(tmp_path / "nothing.expt")]
    elif case == "notexpt":
        (tmp_path / "x.expt").write_text("{}")
        args = [str(tmp_path / "x.expt")]
    elif case == "badimage":
        assert run_cmd([*paths, "output.experiments=in.expt"], tmp_path, "dials.import").returncode == 0
        with open(paths[1], "wb") as fh:
            fh.write(b"not an image any more")
        args = ["in.expt"]
    elif case == "masked":
        import pickle

        from scitbx.array_family import flex

        with open(tmp_path / "mask.pickle", "wb") as fh:
            pickle.dump((flex.bool(flex.grid(*SHAPE), False),), fh)
        args += ["truncfix.mask=mask.pickle"]
    result = run_cmd([*args, *ARGS], tmp_path)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not (tmp_path / "corrected.expt").exists()


@pytest.mark.slow
def test_no_zeros_and_too_few_pixels(tmp_path):
    paths = make_smv_sweep(tmp_path, n=2)
    for p in paths:  # lift every pixel above zero
        data = np.fromfile(p, dtype="<u2", offset=512).reshape(SHAPE)
        write_smv(p, data + 5, PIXEL_SIZE=0.1248, DISTANCE=2200.0, WAVELENGTH=0.0251,
                  BEAM_CENTER_X=16.0, BEAM_CENTER_Y=16.0, OSC_START=0.5 * paths.index(p),
                  OSC_RANGE=0.5, TIME=1.0)
    result = run_cmd([*paths, "n_shells=10", "min_pixels_per_shell=20000"], tmp_path)
    assert result.returncode == 0, result.stderr
    text = result.stdout + (tmp_path / "dials.correct_truncation.log").read_text()
    assert "Nothing to correct" in text and "instead of 10" in text
    assert len(os.listdir(tmp_path / "corrected")) == 2


def _pixels(expt):
    iset = load(expt)[0].imageset
    return iset, [iset.get_raw_data(i)[0].as_numpy_array() for i in range(len(iset))]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["smv", "mrc"])
def test_on_read_experiments_equal_the_written_images(tmp_path, kind):
    """output.format=on_read copies no image, yet every program reads the
    same pixels as from the CBF images written by a normal run."""
    if kind == "smv":
        inputs = make_smv_sweep(tmp_path / "data", n=3)
    else:
        mrcfile = pytest.importorskip("mrcfile")
        with mrcfile.new(str(tmp_path / "stack.mrc")) as mrc:
            mrc.set_data(np.stack(_images(3, seed=5)).astype(np.uint16))
        inputs = [str(tmp_path / "stack.mrc")]
    result = run_cmd([*inputs, *ARGS, "output.format=on_read", "output.experiments=on_read.expt",
                      "output.json=on_read.json", "output.report=None"], tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    assert not (tmp_path / "corrected").exists()
    result = run_cmd([*inputs, *ARGS], tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    on_read, on_read_pixels = _pixels(tmp_path / "on_read.expt")
    assert on_read.get_format_class().__name__.startswith("Truncfix_")
    assert json.loads((tmp_path / "on_read.expt").read_text())["imageset"][0]["params"]["truncfix"]["parameters"]["n_shells"] == 4
    written, written_pixels = _pixels(tmp_path / "corrected.expt")
    assert len(on_read_pixels) == len(written_pixels) == 3
    for a, b in zip(on_read_pixels, written_pixels):
        assert np.array_equal(a, b) and (a < 0).any()
    for i in range(3):
        assert on_read.get_mask(i)[0].as_numpy_array()[on_read_pixels[i] < 0].all()
    # the JSON of the on_read run describes exactly what is read
    record = json.loads((tmp_path / "on_read.json").read_text())
    assert record["sweeps"][0]["images"][0]["n_changed"] == int(np.count_nonzero(on_read_pixels[0] < 0))
