"""Real images from public DIALS test data (../shared/realdata beside the
clone; its README says what each is): DIALS_TRUNCFIX=1 dials.import, a read
of every image, dials.find_spots and dials.correct_truncation run without a
traceback; images the plugin must not correct read exactly as stock."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import read_back, realdata, run

#: file -> whether it must read exactly as stock (pixels and mask)
FILES = {
    "TIMEPIX_SU_512-stdgoni_0001.img": True,  # counting detector
    "TIMEPIX_SU_516-stdgoni_0001.img": True,
    "simtbx_FormatSMVJHSim_001.img.gz": False,  # no traceback; whatever it does is logged
    "Gatan_float32_zero_array_001.dm4.gz": True,  # float data, all zero
    "DLS_I03_smargon_0001.cbf.gz": True,  # Pilatus
    "DLS_I23_P12M_thau_00001.cbf.gz": True,  # Pilatus 12M, 24 panels
    "dlsnxs2cbf_therm_0001.cbf.gz": True,  # Eiger 16M
    "idx-20130301060858401.cbf": True,  # CSPAD, signed dark-subtracted data
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FILES))
def test_real_file_through_the_programs(tmp_path, name):
    path = realdata(name)
    env = {"DIALS_TRUNCFIX": "1"}
    for result in (
        run(["dials.import", path, "output.experiments=on_read.expt"], tmp_path, **env),
        run(["dials.import", path, "output.experiments=stock.expt"], tmp_path),
    ):
        assert "Traceback" not in result.stdout + result.stderr
    info, pixels, masks = read_back("on_read.expt", tmp_path)  # every image (one per file)
    if FILES[name]:
        stock_info, stock_pixels, stock_masks = read_back("stock.expt", tmp_path)
        assert all(np.array_equal(a, b) for a, b in zip(pixels, stock_pixels))
        assert all(np.array_equal(a, b) for a, b in zip(masks, stock_masks))
    found = run(["dials.find_spots", "on_read.expt", "nproc=1", "max_strong_pixel_fraction=1"], tmp_path, **env)
    # may stop with a one-line error (a CSPAD still without goniometer axes cannot be written as CBF)
    corrected = run(["dials.correct_truncation", "stock.expt", "output.report=None", "nproc=1"], tmp_path, ok=False,
                    **env)
    for result in (found, corrected):
        assert "Traceback" not in result.stdout + result.stderr
