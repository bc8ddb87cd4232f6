"""Writing ADSC-style SMV images (unsigned 16 bit), atomically."""

from __future__ import annotations

import numpy as np

from dials_truncfix.files import atomic_write_bytes

HEADER_BYTES = 512


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
