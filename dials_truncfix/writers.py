"""Output writers for corrected images.

* :func:`write_full_cbf`: signed 32-bit "full" CBF (imgCIF) with the detector,
  beam and -- for a rotation sweep -- goniometer and scan of the image, and the
  trusted range in ``_array_intensities.undefined_value`` / ``overload`` so
  that a fresh ``dials.import`` of the corrected images admits negative values.
* :func:`write_smv_image`: ADSC-style unsigned 16-bit SMV with the sweep-wide
  offset added to every pixel and recorded as ``IMAGE_PEDESTAL``.

Both write to a temporary file next to the target and rename it into place.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from dials_truncfix.files import atomic_write_bytes
from dials_truncfix.smv import write_smv

SMV_MAX = 65535


class OutputFormatError(ValueError):
    """The corrected data cannot be written in the requested format."""


def _set_column(cbf, category, column, values):
    cbf.find_category(category.encode())
    cbf.find_column(column.encode())
    for row, value in enumerate(values):
        cbf.select_row(row)
        cbf.set_value(str(value).encode())


def _add_rotation(cbf, goniometer, scan, index, diffrn_id):
    """Goniometer axis, measurement and per-frame angle, so that FormatCBFFull
    (not FormatCBFFullStill) reads the image as part of a rotation scan."""
    axis = np.array(goniometer.get_setting_rotation()).reshape(3, 3) @ np.array(
        goniometer.get_rotation_axis_datum()
    )
    image = scan.get_image_range()[0] + index
    start, width = scan.get_image_oscillation(image)
    exposure = scan.get_exposure_times()[index] if len(scan.get_exposure_times()) > index else 0.0

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
    cbf.add_row(["GONIOMETER_OMEGA", "SCAN1", repr(start), repr(width), repr(width), "0", "0", "0"])
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


def full_cbf_bytes(imageset, index, panels, trusted_ranges, rotation=True):
    """The bytes of a full CBF for image ``index`` of ``imageset`` holding
    ``panels`` (int32 arrays, slow x fast) and the given trusted ranges."""
    import pycbf
    from dxtbx.format.cbf_writer import FullCBFWriter

    writer = FullCBFWriter(imageset=imageset)
    cbf = writer.get_cbf_handle(index=index, header_only=True)

    _set_column(cbf, "array_intensities", "undefined_value", [repr(float(lo)) for lo, _ in trusted_ranges])
    _set_column(cbf, "array_intensities", "overload", [repr(float(hi)) for _, hi in trusted_ranges])

    goniometer = imageset.get_goniometer()
    scan = imageset.get_scan()
    if rotation and goniometer is not None and scan is not None and not scan.is_still():
        if len(panels) == 1:
            # stock FormatCBFFull reads sequences through cbflib_adaptbx,
            # which expects the Pilatus-style names of the pixel axes
            _rename_values(cbf, {"AXIS_L0M0_L1M0_F": "ELEMENT_X", "AXIS_L0M0_L1M0_S": "ELEMENT_Y"})
        cbf.find_category(b"diffrn")
        cbf.find_column(b"id")
        _add_rotation(cbf, goniometer, scan, index, cbf.get_value().decode())

    cbf.find_category(b"diffrn_data_frame")
    cbf.find_column(b"array_id")
    names = []
    for row in range(len(panels)):
        cbf.select_row(row)
        names.append(cbf.get_value().decode())
    cbf.add_category("array_structure", ["id", "encoding_type", "compression_type", "byte_order"])
    for name in names:
        cbf.add_row([name, "signed 32-bit integer", "x-CBF_BYTE_OFFSET", "little_endian"])
    cbf.add_category("array_data", ["array_id", "binary_id", "data"])
    for binary_id, (name, data) in enumerate(zip(names, panels), start=1):
        data = np.ascontiguousarray(data, dtype="<i4")
        ny, nx = data.shape
        cbf.add_row([name, str(binary_id)])
        cbf.find_column(b"data")
        cbf.set_integerarray_wdims_fs(
            pycbf.CBF_BYTE_OFFSET, binary_id, data.tobytes(), 4, 1, data.size,
            b"little_endian", nx, ny, 1, 0,
        )

    # CBFlib writes to a named file only: write to a private temporary file
    fd, tmp = tempfile.mkstemp(suffix=".cbf")
    os.close(fd)
    try:
        writer.write_cbf(tmp, cbf=cbf)
        with open(tmp, "rb") as fh:
            return fh.read()
    finally:
        os.unlink(tmp)


def write_full_cbf(path, imageset, index, panels, trusted_ranges, rotation=True):
    atomic_write_bytes(path, [full_cbf_bytes(imageset, index, panels, trusted_ranges, rotation)])


def smv_header_items(imageset, index, offset):
    """SMV header keys from the models of image ``index`` (single panel,
    detector normal to the beam assumed for the beam centre)."""
    detector = imageset.get_detector()
    if len(detector) != 1:
        raise OutputFormatError("SMV output needs a single-panel detector: use output.format=cbf")
    panel = detector[0]
    beam = imageset.get_beam()
    fast_mm, slow_mm = panel.get_beam_centre(beam.get_s0())
    items = {
        "PIXEL_SIZE": f"{panel.get_pixel_size()[0]:.6f}",
        "DISTANCE": f"{panel.get_distance():.6f}",
        "WAVELENGTH": f"{beam.get_wavelength():.8f}",
        # FormatSMVADSC reads the beam centre as (fast, slow) = (Y, X)
        "BEAM_CENTER_X": f"{slow_mm:.6f}",
        "BEAM_CENTER_Y": f"{fast_mm:.6f}",
        "IMAGE_PEDESTAL": int(offset),
        "GAIN": f"{panel.get_gain():g}",
    }
    scan = imageset.get_scan()
    if scan is not None and not scan.is_still():
        start, width = scan.get_image_oscillation(scan.get_image_range()[0] + index)
        times = scan.get_exposure_times()
        items.update(
            OSC_START=f"{start:.6f}",
            OSC_RANGE=f"{width:.6f}",
            PHI=f"{start:.6f}",
            TIME=f"{times[index] if len(times) > index else 0.0:.6f}",
        )
    else:
        items.update(OSC_START="0.000000", OSC_RANGE="0.000000", PHI="0.000000", TIME="0.000000")
    return items


def smv_data(panel_data, offset):
    """uint16 pixels: corrected values plus the offset, values above the
    16-bit range clipped to 65535 (which stock DIALS treats as overloaded)."""
    shifted = np.asarray(panel_data, dtype=np.int64) + int(offset)
    if shifted.size and shifted.min() < 0:
        raise OutputFormatError("corrected values below the offset: cannot be stored as unsigned")
    n_clipped = int(np.count_nonzero(shifted > SMV_MAX))
    return np.minimum(shifted, SMV_MAX).astype(np.uint16), n_clipped


def write_smv_image(path, imageset, index, panels, offset):
    if len(panels) != 1:
        raise OutputFormatError("SMV output needs a single-panel detector: use output.format=cbf")
    data, n_clipped = smv_data(panels[0], offset)
    write_smv(path, data, **smv_header_items(imageset, index, offset))
    return n_clipped
