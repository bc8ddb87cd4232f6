"""Correction on read through the dxtbx format wrappers, driving the real
DIALS programs in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import dxtbx
import dxtbx.format.Registry
import numpy as np
import pytest

from dxtbx.format.FormatMultiImage import FormatMultiImage

from dials_truncfix import format_wrapper
from dials_truncfix.settings import ENVIRONMENT_VARIABLE
from dials_truncfix.core.parameters import CorrectionParameters
from dials_truncfix.corrector import ImageCorrector, image_identity
from devtools.synthetic import (
    draw_true_values,
    falling_parameters,
    smv_geometry,
    truncate,
    write_truncated_smv_sweep,
)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != ENVIRONMENT_VARIABLE}
    env.update(extra)
    return env


def _run(args, cwd, **extra):
    result = subprocess.run(args, cwd=cwd, env=_env(**extra), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


READ_BACK = """
import json, sys, numpy as np
from dxtbx.model.experiment_list import ExperimentList
el = ExperimentList.from_file(sys.argv[1])
iset = el[0].imageset
out = {"format": iset.get_format_class().__name__, "paths": [iset.get_path(i) for i in range(len(iset))],
       "trusted": list(el[0].detector[0].get_trusted_range())}
for i in range(len(iset)):
    data = np.concatenate([p.as_numpy_array().ravel() for p in iset.get_raw_data(i)])
    mask = np.concatenate([m.as_numpy_array().ravel() for m in iset.get_mask(i)])
    np.save(f"{sys.argv[2]}_{i}.npy", data)
    out[f"negative_masked_{i}"] = int((~mask[data < 0]).sum())
    out[f"negative_{i}"] = int((data < 0).sum())
print(json.dumps(out))
"""


def _read_back(expt, workdir):
    result = _run([sys.executable, "-c", READ_BACK, str(expt), str(workdir / "pix")], workdir)
    info = json.loads(result.stdout.strip().splitlines()[-1])
    return info, [np.load(workdir / f"pix_{i}.npy") for i in range(len(info["paths"]))]


def _core_correction(path, index=0, params=CorrectionParameters()):
    """What the core makes of the raw file, independently of the wrappers."""
    stock_class = format_wrapper.stock_format_class(path)
    image = stock_class(path)
    raw = image.get_raw_data(index) if isinstance(image, FormatMultiImage) else image.get_raw_data()
    static = image.get_static_mask()
    corrector = ImageCorrector(image.get_detector(), image.get_beam(), params, masks=[static] if static else [])
    corrected, _ = corrector.correct(raw, image_identity(path, index))
    return np.concatenate([p.as_numpy_array().ravel() for p in corrected]), raw


def _import_on_read_and_check(files, workdir, format_prefix, images=None):
    """DIALS_TRUNCFIX=1 dials.import, then dials.find_spots and a read-back in
    new processes without the variable: the pixels are the core's correction
    of the raw files, with many negative values and none of them masked.
    ``images``: (file, index in file) of each image, one per file by default."""
    images = images or [(f, 0) for f in files]
    _run(["dials.import", *files, "output.experiments=imported.expt"], workdir, DIALS_TRUNCFIX="1")
    _run(["dials.find_spots", "imported.expt"], workdir)
    info, pixels = _read_back(workdir / "imported.expt", workdir)
    assert info["format"].startswith(format_prefix), info["format"]
    assert len(pixels) == len(images)
    for i, (data, (path, index)) in enumerate(zip(pixels, images)):
        expected, _ = _core_correction(path, index)
        assert np.array_equal(data, expected)
        assert info[f"negative_{i}"] > 1000 and info[f"negative_masked_{i}"] == 0
    return info, pixels


@pytest.fixture(scope="module")
def smv_sweep(tmp_path_factory):
    directory = tmp_path_factory.mktemp("smv")
    paths, _ = write_truncated_smv_sweep(directory, n_images=3, size=384, seed=1)
    return directory, paths


def test_variable_unset_reads_exactly_as_stock(smv_sweep, monkeypatch):
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    directory, paths = smv_sweep
    image = dxtbx.load(paths[0])
    stock = format_wrapper.stock_format_class(paths[0])
    assert type(image) is stock and stock.__name__ == "FormatSMVADSC"
    reference = stock(paths[0])
    assert image.get_detector() == reference.get_detector()
    assert image.get_beam() == reference.get_beam()
    assert image.get_scan() == reference.get_scan()
    assert np.array_equal(image.get_raw_data().as_numpy_array(), reference.get_raw_data().as_numpy_array())


@pytest.mark.slow
def test_variable_unset_dials_import_is_stock(smv_sweep, tmp_path):
    directory, paths = smv_sweep
    _run(["dials.import", *paths, "output.experiments=stock.expt"], tmp_path)
    expt = json.loads((tmp_path / "stock.expt").read_text())
    assert not expt["imageset"][0]["template"].startswith("truncfix")
    assert "truncfix" not in expt["imageset"][0].get("params", {})
    info, pixels = _read_back(tmp_path / "stock.expt", tmp_path)
    assert info["format"] == "FormatSMVADSC"
    for path, data in zip(paths, pixels):
        assert np.array_equal(data, dxtbx.load(path).get_raw_data().as_numpy_array().ravel())


@pytest.mark.slow
def test_smv_import_then_find_spots_in_new_processes(smv_sweep, tmp_path):
    directory, paths = smv_sweep
    before = [open(p, "rb").read() for p in paths]
    _run(["dials.import", *paths, "output.experiments=imported.expt"], tmp_path, DIALS_TRUNCFIX="1")
    expt = json.loads((tmp_path / "imported.expt").read_text())
    assert expt["imageset"][0]["template"].startswith("truncfix://")
    assert expt["imageset"][0]["params"]["truncfix"]["parameters"]["n_shells"] == 10
    # a later program, in a new process, without the variable
    _run(["dials.find_spots", "imported.expt", "nproc=2"], tmp_path)
    assert (tmp_path / "strong.refl").exists()
    info, pixels = _read_back(tmp_path / "imported.expt", tmp_path)
    assert info["format"] == "Truncfix_FormatSMVADSC"
    assert info["trusted"][0] < -1e6
    for i, (path, data) in enumerate(zip(paths, pixels)):
        expected, raw = _core_correction(path)
        assert np.array_equal(data, expected)
        raw = raw.as_numpy_array().ravel()
        assert np.array_equal(data[raw > 0], raw[raw > 0])
        assert info[f"negative_{i}"] > 1000 and info[f"negative_masked_{i}"] == 0
    assert [open(p, "rb").read() for p in paths] == before, "input modified"


def _write_mrc_stack(path, n_images=3, size=256, seed=2, dtype=np.uint16):
    import mrcfile

    from dials_truncfix.geometry import inv_d2_per_panel
    from dials_truncfix.core.shells import build_shell_map

    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.zeros((n_images, size, size), dtype=dtype))
    image = format_wrapper.stock_format_class(path)(path)
    inv_d2 = inv_d2_per_panel(image.get_detector(), image.get_beam())
    shell_map = build_shell_map(inv_d2, [np.ones((size, size), bool)], 10, 100)
    rng = np.random.default_rng(seed)
    data = np.stack(
        [truncate(draw_true_values(shell_map.labels.reshape(size, size), falling_parameters(10), rng), dtype) for _ in range(n_images)]
    )
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
    return data


@pytest.mark.slow
def test_mrc_stack_import_then_find_spots(tmp_path):
    path = str(tmp_path / "stack.mrc")
    _write_mrc_stack(path)
    _import_on_read_and_check([path], tmp_path, "Truncfix_FormatMRCstack", images=[(path, i) for i in range(3)])


@pytest.mark.slow
def test_cbf_import_then_find_spots(smv_sweep, tmp_path):
    """Mini CBF (as dials.convert_to_cbf writes) holding truncated data."""
    from dxtbx.format.FormatCBFMini import FormatCBFMini

    directory, paths = smv_sweep
    cbfs = []
    for k, path in enumerate(paths):
        image = dxtbx.load(path)
        cbf = str(tmp_path / f"trunc_{k + 1:05d}.cbf")
        FormatCBFMini.as_file(image.get_detector(), image.get_beam(), image.get_goniometer(), image.get_scan(), image.get_raw_data(), cbf)
        cbfs.append(cbf)
    _import_on_read_and_check(cbfs, tmp_path, "Truncfix_FormatCBFMini")


@pytest.mark.slow
def test_full_cbf_import_then_find_spots(smv_sweep, tmp_path):
    """Full CBF (byte offset, with goniometer and scan) holding truncated data."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_truncfix.io.atomic import atomic_write_bytes
    from dials_truncfix.io.cbf import full_cbf_bytes

    directory, paths = smv_sweep
    imageset = ExperimentListFactory.from_filenames(paths)[0].imageset
    cbfs = []
    for k in range(len(imageset)):
        cbf = str(tmp_path / f"full_{k + 1:05d}.cbf")
        data = [imageset.get_raw_data(k)[0].as_numpy_array().astype(np.int32)]
        atomic_write_bytes(cbf, [full_cbf_bytes(imageset, k, data, [(-1.0, 65535.0)])])
        cbfs.append(cbf)
    assert format_wrapper.stock_format_class(cbfs[0]).__name__.startswith("FormatCBFFull")
    _import_on_read_and_check(cbfs, tmp_path, "Truncfix_FormatCBFFull")


def test_signed_and_float_data_pass_through_with_one_notice(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "1")
    path = str(tmp_path / "signed.mrc")
    data = _write_mrc_stack(path, dtype=np.int16).astype(np.int16)
    import mrcfile

    with mrcfile.open(path, "r+") as mrc:
        mrc.data[:, :10, :10] = -5  # real negatives: not truncated data
        data = np.array(mrc.data)
    format_class = dxtbx.format.Registry.get_format_class_for_file(path)
    assert format_class.__name__ == "FormatATruncfixMultiImage"
    iset = format_class.get_imageset([path], as_sequence=True)
    with caplog.at_level("INFO"):
        for i in range(len(iset)):
            assert np.array_equal(iset.get_raw_data(i)[0].as_numpy_array(), data[i].astype(float))
    assert caplog.text.count("passed through uncorrected") == 1


def test_corrupt_file_gives_the_normal_dxtbx_error(smv_sweep, tmp_path, monkeypatch):
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "1")
    directory, paths = smv_sweep
    bad = tmp_path / "trunc_00001.img"
    bad.write_bytes(open(paths[0], "rb").read().replace(b"SIZE1=384", b"SIZE1=3x4"))
    stock_error = None
    try:
        format_wrapper.stock_format_class(str(bad))(str(bad))
    except Exception as e:  # noqa: BLE001 - whatever dxtbx raises
        stock_error = type(e)
    assert stock_error is not None
    with pytest.raises(stock_error):
        dxtbx.load(str(bad))


def test_unknown_parameter_in_phil_file_is_a_clear_error(tmp_path, smv_sweep):
    phil = tmp_path / "bad.phil"
    phil.write_text("truncfix.n_shells = 8\ntruncfix.nshells = 8\n")
    directory, paths = smv_sweep
    result = subprocess.run(
        ["dials.import", paths[0], "output.experiments=x.expt"],
        cwd=tmp_path, env=_env(DIALS_TRUNCFIX=str(phil)), capture_output=True, text=True,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"{phil}: unknown parameter(s): truncfix.nshells" in output
    assert "Traceback" not in output
    assert not (tmp_path / "x.expt").exists()


def test_missing_phil_file_is_a_clear_error(tmp_path, smv_sweep):
    directory, paths = smv_sweep
    result = subprocess.run(
        ["dials.import", paths[0], "output.experiments=x.expt"],
        cwd=tmp_path, env=_env(DIALS_TRUNCFIX=str(tmp_path / "nowhere.phil")), capture_output=True, text=True,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output
    assert f"DIALS_TRUNCFIX: {tmp_path / 'nowhere.phil'}: no such PHIL file" in output


def test_phil_file_parameters_are_used_and_recorded(tmp_path, smv_sweep, monkeypatch):
    phil = tmp_path / "good.phil"
    phil.write_text("truncfix { n_shells = 4\n seed = 9 }\n")
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, str(phil))
    directory, paths = smv_sweep
    image = dxtbx.load(paths[0])
    assert type(image).__name__ == "Truncfix_FormatSMVADSC"
    params = CorrectionParameters(n_shells=4, seed=9)
    expected, _ = _core_correction(paths[0], params=params)
    assert np.array_equal(image.get_raw_data().as_numpy_array().ravel(), expected)
    iset = type(image).get_imageset(paths, as_sequence=True)
    assert iset.params()["truncfix"]["parameters"]["seed"] == 9


def test_more_specific_stock_class_is_not_taken(tmp_path, monkeypatch):
    """A TimePix_SU SMV file is read by the wrapper of that very class."""
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "1")
    from dials_truncfix.io.smv import write_smv

    path = str(tmp_path / "timepix_00001.img")
    rng = np.random.default_rng(0)
    write_smv(path, truncate(-3 + np.exp(1.5 + 0.5 * rng.standard_normal((512, 512)))), **{**smv_geometry(512), "BEAMLINE": "TIMEPIX_SU", "DETECTOR_SN": "unknown", "PIXEL_SIZE": 0.055}, OSC_START=0, OSC_RANGE=0.36, PHI=0)
    stock = format_wrapper.stock_format_class(path)
    image = dxtbx.load(path)
    assert type(image).__name__ == f"Truncfix_{stock.__name__}"
    assert stock.__name__.startswith("FormatSMVTimePix_SU")
    raw = image.get_raw_data()
    assert min(p.as_numpy_array().min() for p in (raw if isinstance(raw, tuple) else (raw,))) < 0
