"""Signed 32-bit "full" CBF (imgCIF) images: the detector, beam and -- for a
rotation sweep -- goniometer and scan of the image, and the range of valid
pixel values in ``_array_intensities``, so that a fresh ``dials.import`` of
the images admits negative values.  Written to a temporary file and renamed
into place.

The valid range [lo, hi] is written so that every dxtbx reads it alike:
``underload`` = lo (read by dxtbx >= 3.12, inclusive), ``undefined_value`` =
lo - 1 and ``overload`` = hi + 1 (read by dxtbx 3.11 as an exclusive range,
and ``overload - 1`` by dxtbx >= 3.12)."""

from __future__ import annotations

import math
import time

import numpy as np

import pycbf
from dxtbx.format.cbf_writer import FullCBFWriter
from dxtbx.imageset import ImageSequence

from dials_truncfix.io.atomic import atomic_path


def _set_column(cbf, category, column, values):
    cbf.find_category(category.encode())
    try:
        cbf.find_column(column.encode())
    except Exception:  # noqa: BLE001 - pycbf raises a bare Exception when absent
        cbf.new_column(column.encode())
    for row, value in enumerate(values):
        cbf.select_row(row)
        cbf.set_value(str(value).encode())


def _add_rotation(cbf, goniometer, scan, index):
    """Goniometer axis, measurement and per-frame angle, so that FormatCBFFull
    (not FormatCBFFullStill) reads the image as part of a rotation scan."""
    axis = np.array(goniometer.get_setting_rotation()).reshape(3, 3) @ np.array(
        goniometer.get_rotation_axis_datum()
    )
    image = scan.get_image_range()[0] + index
    start, width = scan.get_image_oscillation(image)
    exposure = (
        scan.get_exposure_times()[index]
        if len(scan.get_exposure_times()) > index
        else 0.0
    )

    # the writer makes an empty 'unknown' measurement: make it the goniometer
    _set_column(cbf, "diffrn_measurement", "id", ["GONIOMETER"])
    _set_column(cbf, "diffrn_measurement", "number_of_axes", ["1"])
    _set_column(cbf, "diffrn_measurement", "method", ["rotation"])
    cbf.add_category("diffrn_measurement_axis", ["measurement_id", "axis_id"])
    cbf.add_row(["GONIOMETER", "GONIOMETER_OMEGA"])
    cbf.find_category(b"axis")
    cbf.add_row(
        ["GONIOMETER_OMEGA", "rotation", "goniometer", "."]
        + [repr(float(v)) for v in axis]
        + ["0", "0", "0", "."]
    )
    cbf.find_category(b"diffrn_scan_axis")
    cbf.add_row(
        [
            "GONIOMETER_OMEGA",
            "SCAN1",
            repr(start),
            repr(width),
            repr(width),
            "0",
            "0",
            "0",
        ]
    )
    cbf.find_category(b"diffrn_scan_frame_axis")
    cbf.add_row(["GONIOMETER_OMEGA", "FRAME1", repr(start), "0"])
    _set_column(cbf, "diffrn_scan_frame", "integration_time", [repr(float(exposure))])
    _set_column(cbf, "diffrn_scan_frame", "frame_number", [str(image)])
    # CBFlib cannot parse the writer's "unknown" date, which the scan needs
    epochs = scan.get_epochs()
    epoch = float(epochs[index]) if len(epochs) > index else 0.0
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(epoch)))
    _set_column(cbf, "diffrn_scan_frame", "date", [stamp + f"{epoch % 1:.3f}"[1:]])


def _rename_values(cbf, mapping):
    """Replace every (text) value found in ``mapping`` throughout the handle."""
    cbf.rewind_datablock()
    for c in range(cbf.count_categories()):
        cbf.select_category(c)
        for col in range(cbf.count_columns()):
            cbf.select_column(col)
            for row in range(cbf.count_rows()):
                cbf.select_row(row)
                try:
                    value = cbf.get_value()
                except Exception:
                    continue
                if value is not None and value.decode() in mapping:
                    cbf.set_value(mapping[value.decode()].encode())


def write_full_cbf(path, imageset, index, panels, valid_ranges):
    """Write image ``index`` of ``imageset`` as a full CBF holding ``panels``
    (int32 arrays, slow x fast), each valid in [lo, hi] of ``valid_ranges``,
    with the goniometer and scan of the image (of zero width for a still)."""
    writer = FullCBFWriter(imageset=imageset)
    cbf = writer.get_cbf_handle(index=index, header_only=True)

    # FullCBFWriter leaves out the polarization (dxtbx would read 0.999:
    # X-rays from a synchrotron, not the unpolarized electrons of MicroED)
    beam = imageset.get_beam(index)
    normal = beam.get_polarization_normal()
    _set_column(
        cbf,
        "diffrn_radiation",
        "polarizn_source_ratio",
        [repr(beam.get_polarization_fraction())],
    )
    _set_column(
        cbf,
        "diffrn_radiation",
        "polarizn_source_norm",
        [repr(math.degrees(math.atan2(normal[0], normal[1])))],
    )
    _set_column(
        cbf, "array_intensities", "underload", [str(int(lo)) for lo, _ in valid_ranges]
    )
    _set_column(
        cbf,
        "array_intensities",
        "undefined_value",
        [str(int(lo) - 1) for lo, _ in valid_ranges],
    )
    _set_column(
        cbf,
        "array_intensities",
        "overload",
        [str(int(hi) + 1) for _, hi in valid_ranges],
    )

    if isinstance(imageset, ImageSequence):
        goniometer, scan, in_scan = (
            imageset.get_goniometer(),
            imageset.get_scan(),
            index,
        )
    else:
        goniometer, scan, in_scan = (
            imageset.get_goniometer(index),
            imageset.get_scan(index),
            0,
        )
    if goniometer is not None and scan is not None:
        # the goniometer axis also for stills (zero width): dxtbx reads
        # byte-offset full CBFs only with one
        if len(panels) == 1:
            # stock FormatCBFFull reads sequences through cbflib_adaptbx,
            # which expects the Pilatus-style names of the pixel axes
            _rename_values(
                cbf, {"AXIS_L0M0_L1M0_F": "ELEMENT_X", "AXIS_L0M0_L1M0_S": "ELEMENT_Y"}
            )
        _add_rotation(cbf, goniometer, scan, in_scan)

    cbf.find_category(b"diffrn_data_frame")
    cbf.find_column(b"array_id")
    names = []
    for row in range(len(panels)):
        cbf.select_row(row)
        names.append(cbf.get_value().decode())
    cbf.add_category(
        "array_structure", ["id", "encoding_type", "compression_type", "byte_order"]
    )
    for name in names:
        cbf.add_row(
            [name, "signed 32-bit integer", "x-CBF_BYTE_OFFSET", "little_endian"]
        )
    cbf.add_category("array_data", ["array_id", "binary_id", "data"])
    for binary_id, (name, data) in enumerate(zip(names, panels), start=1):
        data = np.ascontiguousarray(data, dtype="<i4")
        ny, nx = data.shape
        cbf.add_row([name, str(binary_id)])
        cbf.find_column(b"data")
        cbf.set_integerarray_wdims_fs(
            pycbf.CBF_BYTE_OFFSET,
            binary_id,
            data.tobytes(),
            4,
            1,
            data.size,
            b"little_endian",
            nx,
            ny,
            1,
            0,
        )

    with atomic_path(path) as tmp:
        writer.write_cbf(tmp, cbf=cbf)


def panels_read_back(imageset) -> int:
    """How many panels dxtbx reads from the full CBF this module writes for
    image 0 of ``imageset`` (a probe of zeros, written to a temporary
    directory and removed): dxtbx reads the full CBFs of some multi-panel
    detectors (a TimePix quad, a Pilatus 12M) as one panel, and an
    experiment list naming such files cannot be read back at all."""
    import os
    import tempfile

    import dxtbx

    detector = imageset.get_detector()
    panels = [np.zeros(p.get_image_size()[::-1], dtype=np.int32) for p in detector]
    with tempfile.TemporaryDirectory(prefix="dials.correct_truncation.probe-") as tmp:
        path = os.path.join(tmp, "probe.cbf")
        write_full_cbf(path, imageset, 0, panels, [(0, 1)] * len(panels))
        return len(dxtbx.load(path).get_detector())
