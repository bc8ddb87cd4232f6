"""Inside xia2, out of the box: what xia2 does with the imagesets it imports
with DIALS_TRUNCFIX exported, done here without xia2.

xia2 checks that every image file is readable (``os.access(imageset.get_path(j),
os.R_OK)``, xia2/Schema/XSweep.py), imports the images in forked worker
processes (libtbx.easy_mp, xia2/Applications/xia2setup.py), pickles the
imagesets back to its own process, copies and slices them there and writes
the experiment lists its DIALS steps read
(``ExperimentListFactory.from_imageset_and_crystal(imageset, None).as_file``)."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
from helpers import read_back, record_of, write_truncated_mrc_stack

from dxtbx.model.experiment_list import ExperimentListFactory

from devtools.synthetic import write_truncated_smv_sweep
from dials_truncfix.settings import ENVIRONMENT_VARIABLE


def _mrc_stack(directory):
    os.makedirs(directory, exist_ok=True)
    return [write_truncated_mrc_stack(os.path.join(directory, "stack.mrc"))]


FILES = {
    "smv_sweep": lambda d: write_truncated_smv_sweep(d, n_images=3, size=256, seed=2)[
        0
    ],
    "smv_stills": lambda d: write_truncated_smv_sweep(
        d, n_images=2, size=256, seed=3, osc_width=0.0
    )[0],
    "mrc_stack": _mrc_stack,
}


def _pixels(imageset):
    return [
        np.concatenate([p.as_numpy_array().ravel() for p in imageset.get_raw_data(i)])
        for i in range(len(imageset))
    ]


@pytest.mark.parametrize("kind", sorted(FILES))
def test_imported_imagesets_name_files_programs_can_open(kind, tmp_path, monkeypatch):
    """get_path and paths give the image files (xia2's readability check
    passes); the experiment list still names them as truncfix URLs with the
    settings record, and reads back corrected in a new process without the
    variable."""
    files = [os.path.abspath(f) for f in FILES[kind](tmp_path / "data")]
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "1")
    experiments = ExperimentListFactory.from_filenames(files)
    imageset = experiments[0].imageset
    assert imageset.get_format_class().__name__.startswith("Truncfix_")
    names = [imageset.get_path(i) for i in range(len(imageset))]
    assert all(os.access(name, os.R_OK) for name in names)
    assert set(names) == set(files) and set(imageset.paths()) == set(files)
    if kind == "mrc_stack":
        assert imageset.reader().master_path() == files[0]
    expt = tmp_path / "imported.expt"
    experiments.as_file(str(expt))
    written = json.loads(expt.read_text())["imageset"][0]
    for name in [written["template"]] if "template" in written else written["images"]:
        assert name.startswith("truncfix:///"), name
    assert record_of(expt)["version"] == 2
    in_process = _pixels(imageset)
    info, pixels, masks = read_back(
        str(expt), tmp_path
    )  # a new process, without the variable
    assert info["format"] == imageset.get_format_class().__name__
    for a, b, mask in zip(pixels, in_process, masks):
        assert np.array_equal(a, b) and (a < 0).sum() > 100 and mask[a < 0].all()


def import_sweep(args):
    """What xia2's worker does (xia2setup_helpers.get_sweep): import a sweep;
    the result goes back to xia2's process pickled."""
    (files,) = args
    imageset = ExperimentListFactory.from_filenames(files)[0].imageset
    return os.getpid(), imageset


def test_imported_in_a_forked_worker_as_xia2_does(tmp_path, monkeypatch):
    """The worker imports, xia2's process writes the experiment list: the
    shell geometry is recorded as by an import in one process, and a new
    process without the variable reads the same pixels from either list."""
    from libtbx import easy_mp

    sweeps = [
        [
            os.path.abspath(f)
            for f in write_truncated_smv_sweep(
                tmp_path / name, n_images=2, size=256, seed=seed
            )[0]
        ]
        for name, seed in (("a", 7), ("b", 8))
    ]
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "1")
    results = easy_mp.parallel_map(  # as xia2setup._get_sweeps calls it
        import_sweep,
        [(files,) for files in sweeps],
        processes=2,
        method="multiprocessing",
        asynchronous=True,
        preserve_order=True,
        preserve_exception_message=True,
    )
    for k, ((pid, imageset), files) in enumerate(zip(results, sweeps)):
        assert pid != os.getpid()
        # xia2's process: XSweep copies (and slices) the imageset, checks the files, writes the list
        imageset = copy.deepcopy(imageset)[0 : len(imageset)]
        assert all(
            os.access(imageset.get_path(j), os.R_OK) for j in range(len(imageset))
        )
        forked = tmp_path / f"SWEEP{k + 1}_import.expt"
        ExperimentListFactory.from_imageset_and_crystal(imageset, None).as_file(
            str(forked)
        )
        single = tmp_path / f"single{k + 1}.expt"
        ExperimentListFactory.from_filenames(files).as_file(str(single))
        assert json.loads(forked.read_text())["imageset"][0]["template"].startswith(
            "truncfix:///"
        )
        assert record_of(forked)["geometry"] is not None
        assert record_of(forked) == record_of(single)
        _, from_worker, _ = read_back(
            str(forked), tmp_path
        )  # new processes, without the variable
        _, from_one_process, _ = read_back(str(single), tmp_path)
        for a, b in zip(from_worker, from_one_process):
            assert np.array_equal(a, b) and (a < 0).sum() > 1000
