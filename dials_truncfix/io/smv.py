"""ADSC-style SMV images (unsigned 16 bit), written atomically: the header
from the models of an image, and the corrected data with an offset added."""

from __future__ import annotations

import numpy as np

from dials_truncfix.io import OutputFormatError
from dials_truncfix.io.atomic import atomic_write_bytes

HEADER_BYTES = 512
SMV_MAX = 65535


def smv_header(size_fast, size_slow, **items):
    """Header text for an ADSC-style SMV file; ``items`` are extra keys such as
    PIXEL_SIZE, DISTANCE, WAVELENGTH, BEAM_CENTER_X, OSC_START, IMAGE_PEDESTAL."""
    keys = {
        "DIM": 2,
        "BYTE_ORDER": "little_endian",
        "TYPE": "unsigned_short",
        "SIZE1": size_fast,
        "SIZE2": size_slow,
        **items,
    }
    body = "".join(f"{k}={v};\n" for k, v in keys.items())
    header_bytes = HEADER_BYTES
    while True:
        text = "{\n" + f"HEADER_BYTES={header_bytes:5d};\n" + body + "}\n"
        if len(text) < header_bytes:
            return text.encode("ascii").ljust(header_bytes, b" ")
        header_bytes += HEADER_BYTES


def write_smv(path, data, **header_items):
    """Write a 2D array of 0..65535 as an SMV file."""
    data = np.asarray(data)
    if data.ndim != 2:
        raise ValueError("SMV images are two-dimensional")
    if data.size and (data.min() < 0 or data.max() > 65535):
        raise ValueError(f"{path}: values outside 0..65535 cannot be stored as unsigned 16 bit")
    slow, fast = data.shape
    header = smv_header(fast, slow, **header_items)
    atomic_write_bytes(path, [header, data.astype("<u2").tobytes()])


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
