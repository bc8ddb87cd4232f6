"""ADSC-style SMV images (unsigned 16 bit), written atomically: the header
from the models of an image, and corrected data stored with a pedestal (an
offset recorded as IMAGE_PEDESTAL, which dxtbx subtracts)."""

from __future__ import annotations

import time

import numpy as np

from dials_truncfix.core.assignment import LOWEST_VALUE
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
        raise ValueError(
            f"{path}: values outside 0..65535 cannot be stored as unsigned 16 bit"
        )
    slow, fast = data.shape
    header = smv_header(fast, slow, **header_items)
    atomic_write_bytes(path, [header, data.astype("<u2").tobytes()])


def check_single_panel(detector) -> None:
    """An SMV file holds one panel (checked when planning, before any work,
    and by every writer of SMV headers)."""
    if len(detector) != 1:
        raise OutputFormatError(
            "SMV output needs a single-panel detector: use output.format=cbf"
        )


def smv_header_items(beam, detector, scan, index, pedestal=0):
    """SMV header keys of image ``index`` from its models (single panel, the
    beam centre read along the panel normal)."""
    check_single_panel(detector)
    panel = detector[0]
    fast_mm, slow_mm = panel.get_beam_centre(beam.get_s0())
    items = {
        "PIXEL_SIZE": f"{panel.get_pixel_size()[0]:.8g}",
        "DISTANCE": f"{panel.get_distance():.6f}",
        "WAVELENGTH": f"{beam.get_wavelength():.8f}",
        # FormatSMVADSC reads the beam centre as (fast, slow) = (Y, X)
        "BEAM_CENTER_X": f"{slow_mm:.6f}",
        "BEAM_CENTER_Y": f"{fast_mm:.6f}",
        "GAIN": f"{panel.get_gain():.6g}",
    }
    if pedestal:
        items["IMAGE_PEDESTAL"] = int(pedestal)
    if scan is not None and not scan.is_still():
        image = scan.get_image_range()[0] + index
        start, width = scan.get_image_oscillation(image)
        times, epochs = scan.get_exposure_times(), scan.get_epochs()
        items.update(
            OSC_START=f"{start:.6f}",
            OSC_RANGE=f"{width:.6f}",
            PHI=f"{start:.6f}",
            TIME=f"{times[index] if len(times) > index else 0.0:.6f}",
        )
        if len(epochs) > index and epochs[index] > 0:
            items["DATE"] = time.strftime(
                "%a %b %d %H:%M:%S %Y", time.gmtime(epochs[index])
            )
    else:
        items.update(
            OSC_START="0.000000", OSC_RANGE="0.000000", PHI="0.000000", TIME="0.000000"
        )
    return items


def smv_pedestal(lowest_value):
    """The pedestal P added to every pixel so that the lowest value is stored
    as 1 or more (0 is masked by current dxtbx's ADSC trusted range)."""
    return 1 - min(0, int(lowest_value)) if lowest_value is not None else 1


def smv_valid_range(pedestal):
    """(lo, hi) of the stored values that are valid pixels: 1 .. 65534 - P.
    Higher values are stored as 65535 (overloaded): dxtbx 3.11 masks stored
    values from 65535 - P up, current dxtbx only 65535, so both read the same
    valid pixels."""
    return 1, SMV_MAX - 1 - pedestal


def smv_data(panel_data, pedestal):
    """(uint16 stored values, number of pixels stored as overloaded that were
    valid before): corrected values plus the pedestal, those above the valid
    range set to 65535."""
    stored = np.asarray(panel_data, dtype=np.int64) + int(pedestal)
    not_valid = (
        np.asarray(panel_data) < LOWEST_VALUE
    )  # zeros left alone where stock masks them
    if stored.size and stored[~not_valid].min(initial=1) < 1:
        raise OutputFormatError(
            "corrected values below the pedestal: cannot be stored as unsigned"
        )
    stored[not_valid] = 0  # below the valid range: masked, as stock
    high = stored > smv_valid_range(pedestal)[1]
    n_clipped = int(np.count_nonzero(high & (np.asarray(panel_data) < SMV_MAX)))
    stored[high] = SMV_MAX
    return stored.astype(np.uint16), n_clipped


def write_smv_image(path, imageset, index, panels, pedestal):
    """Write image ``index`` of ``imageset`` with these corrected panels;
    returns the number of pixels stored as overloaded."""
    from dxtbx.imageset import ImageSequence

    if isinstance(imageset, ImageSequence):
        scan, in_scan = imageset.get_scan(), index
    else:
        scan, in_scan = imageset.get_scan(index), 0
    items = smv_header_items(
        imageset.get_beam(index), imageset.get_detector(index), scan, in_scan, pedestal
    )
    (panel,) = panels  # one panel, as its detector
    data, n_clipped = smv_data(panel, pedestal)
    write_smv(path, data, **items)
    return n_clipped
