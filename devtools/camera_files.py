"""Writers for small camera files, so that tests can make the files of
electron-diffraction cameras (Gatan DM4, FEI/Thermo Fisher TIA SER) and of
counting detectors (Pilatus mini CBF, TimePix SMV) that the stock dxtbx
format classes read, without shipping binary data.

For DM4 and SER only the structure the readers parse is written; neither carries
geometry they use, so dxtbx builds dummy models (e.g. a fixed pixel size).
Pixels are stored little-endian, as dxtbx reads them in the machine's native
byte order."""

from __future__ import annotations

import struct

import numpy as np

# uint32 is left out of both tables: current dxtbx reads it as flex.uint32,
# which an ImageSet cannot return, and dxtbx 3.11 rejects values > 2**31 - 1.

# numpy dtype -> (DM4 ImageData.DataType, DM4 tag element type)
_DM4_TYPES = {
    np.dtype(np.int16): (1, 2),
    np.dtype(np.float32): (2, 6),
    np.dtype(np.int32): (7, 3),
    np.dtype(np.uint16): (10, 4),
}

# numpy dtype -> SER DataType
_SER_TYPES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.uint16): 2,
    np.dtype(np.int16): 5,
    np.dtype(np.int32): 6,
}


def _dm4_tag(name, info, payload):
    """A DM4 data tag: type 21, name, length, '%%%%', info array, value."""
    body = b"%%%%" + struct.pack(f">Q{len(info)}Q", len(info), *info) + payload
    head = struct.pack(">BH", 21, len(name)) + name
    return head + struct.pack(">Q", len(body)) + body


def _dm4_group(name, entries):
    """A DM4 tag directory: type 20, name, length, unsorted/open, entries."""
    body = struct.pack(">BBQ", 0, 0, len(entries)) + b"".join(entries)
    head = struct.pack(">BH", 20, len(name)) + name
    return head + struct.pack(">Q", len(body)) + body


def write_dm4(path, data):
    """Write `data` ((ny, nx) or (n, ny, nx); int16, uint16, int32 or float32)
    as a DM4 file: a root directory holding ImageList with one unnamed image
    whose ImageData has DataType, Dimensions (fastest first, as DM stores
    them) and the Data array. This is what FormatGatanDM4 reads: it takes the
    image size from the first two Dimensions and the number of images from
    the length of Data. No thumbnail image is written. Give a single image a
    number in its name (e.g. image_0001.dm4): otherwise dxtbx takes the 4 of
    '.dm4' as the image number when it builds an imageset."""
    data = np.asarray(data)
    data_type, element_type = _DM4_TYPES[data.dtype]
    uint32 = (5,)
    image_data = _dm4_group(
        b"ImageData",
        [
            _dm4_tag(b"DataType", uint32, struct.pack("<I", data_type)),
            _dm4_group(
                b"Dimensions",
                [_dm4_tag(b"", uint32, struct.pack("<I", d)) for d in data.shape[::-1]],
            ),
            _dm4_tag(
                b"Data",
                (20, element_type, data.size),
                data.astype(data.dtype.newbyteorder("<")).tobytes(),
            ),
        ],
    )
    root = struct.pack(">BBQ", 0, 0, 1) + _dm4_group(
        b"ImageList", [_dm4_group(b"", [image_data])]
    )
    with open(path, "wb") as f:
        # version 4, root length, little-endian values; 8 zero bytes end the file
        f.write(struct.pack(">IQI", 4, len(root), 1) + root + bytes(8))


def write_ser(path, data):
    """Write `data` ((n, ny, nx); uint8, uint16, int16 or int32) as a TIA SER
    file (version 0x0220, 8-byte offsets): the series header with one
    dimension of n elements, the data and tag offset arrays, n 2D data
    elements (calibration, DataType, ArraySizeX/Y, pixels) and n time tags.
    FormatSER takes the image count from ValidNumberElements and the image
    size from the first element. Give `path` a .ser suffix: FormatSER looks
    for the companion .emi by replacing '.ser' in the name, and would try to
    parse the .ser file itself as an .emi otherwise."""
    data = np.asarray(data)
    n, ny, nx = data.shape
    data_type = _SER_TYPES[data.dtype]
    description = b"Number"
    dimension = struct.pack(
        f"<IddII{len(description)}sI", n, 0, 1, 0, len(description), description, 0
    )
    element_header = "<ddIddIHII"  # X, Y calibration; DataType, ArraySizeX/Y
    tag = "<HI"  # TagTypeID, time
    offset_array = 34 + len(dimension)
    element_size = struct.calcsize(element_header) + data[0].nbytes
    first_element = offset_array + 16 * n
    first_tag = first_element + n * element_size
    offsets = [first_element + i * element_size for i in range(n)]
    offsets += [first_tag + i * struct.calcsize(tag) for i in range(n)]
    with open(path, "wb") as f:
        # byte order, SeriesID, SeriesVersion, DataTypeID (2D), TagTypeID (time)
        f.write(struct.pack("<2sHHII", b"II", 0x0197, 0x0220, 0x4122, 0x4142))
        # total and valid number of elements, offset array offset, 1 dimension
        f.write(struct.pack("<IIQI", n, n, offset_array, 1) + dimension)
        f.write(struct.pack(f"<{2 * n}Q", *offsets))
        for image in data:
            f.write(struct.pack(element_header, 0, 1, 0, 0, 1, 0, data_type, nx, ny))
            f.write(image.astype(data.dtype.newbyteorder("<")).tobytes())
        f.write(struct.pack(tag, 0x4142, 0) * n)


def write_pilatus_cbfs(directory, n_images=2, seed=0):
    """Mini CBFs of a Pilatus 300K (487 x 619 pixels) holding Poisson counts,
    the real zeros of a counting detector."""
    import os

    from dxtbx.format.FormatCBFMini import FormatCBFMini
    from dxtbx.model import BeamFactory, DetectorFactory, GoniometerFactory, ScanFactory
    from scitbx.array_family import flex

    detector = DetectorFactory.simple(
        "PAD",
        300.0,
        (42.0, 53.0),
        "+x",
        "-y",
        (0.172, 0.172),
        (487, 619),
        (-1, 1000000),
        [],
    )
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n_images):
        path = os.path.join(str(directory), f"pilatus_{k + 1:05d}.cbf")
        scan = ScanFactory.make_scan((k + 1, k + 1), 0.1, (0.5 * k, 0.5), {k + 1: 0.0})
        counts = flex.int(rng.poisson(0.17, (619, 487)).astype(np.int32))
        FormatCBFMini.as_file(
            detector,
            BeamFactory.simple(0.9795),
            GoniometerFactory.single_axis(),
            scan,
            counts,
            path,
            header_convention="PILATUS_1.2",
            det_type="PILATUS3 300K",
        )
        paths.append(path)
    return paths


def write_timepix_smvs(directory, n_images=2, seed=0):
    """SMV files of the Stockholm TimePix camera (FormatSMVTimePix_SU,
    512 x 512) holding Poisson counts."""
    import os

    from devtools.synthetic import smv_geometry
    from dials_truncfix.io.smv import write_smv

    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n_images):
        path = os.path.join(str(directory), f"timepix_{k + 1:05d}.img")
        items = {
            **smv_geometry(512),
            "BEAMLINE": "TIMEPIX_SU",
            "DETECTOR_SN": "unknown",
            "PIXEL_SIZE": 0.055,
        }
        write_smv(
            path,
            rng.poisson(0.17, (512, 512)).astype(np.uint16),
            **items,
            OSC_START=0.36 * k,
            OSC_RANGE=0.36,
            PHI=0.36 * k,
        )
        paths.append(path)
    return paths
