"""Thin adapter between dxtbx raw data (tuples of flex arrays) and the
numpy core, shared by the correction on read and dials.correct_truncation,
so that both give the very same pixels for the same experiment."""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

from dxtbx import flumpy

from dials_truncfix import compat
from dials_truncfix.core.assignment import LOWEST_VALUE
from dials_truncfix.core.correction import (
    ImageCorrection,
    correct_image,
    corrected_dtype,
)
from dials_truncfix.core.parameters import CorrectionParameters
from dials_truncfix.detectors import describe_as_integrating
from dials_truncfix.geometry import ShellGeometry, shell_map_for

if TYPE_CHECKING:
    from dxtbx.model import Detector, Panel


class ImageCorrector:
    """Corrects images of one ShellGeometry; the shell map is built once."""

    def __init__(self, geometry: ShellGeometry, params: CorrectionParameters):
        self.params = params
        self.shell_map = shell_map_for(
            geometry, params.n_shells, params.min_pixels_per_shell, params.n_sectors
        )

    def correct(
        self, raw_data, image_key: str, zeros_valid: bool = True
    ) -> tuple[tuple, ImageCorrection]:
        """(corrected raw data as a tuple of flex arrays, ImageCorrection).

        Images that need no correction come back as the very same objects.
        Without ``zeros_valid`` (the stock format class masks zero pixels)
        every zero pixel the correction gives no value becomes NOT_VALID, so
        that it stays masked under the corrected trusted range."""
        if not isinstance(raw_data, tuple):
            raw_data = (raw_data,)
        # numpy views of the stock flex arrays, which the core never writes
        # (a format class may keep and hand out its arrays again); the one
        # copy is the core's output, which the returned flex arrays share
        panels = [flumpy.to_numpy(p) for p in raw_data]
        result = correct_image(panels, self.shell_map, self.params, image_key)
        masked_zeros = () if zeros_valid else result.zeros_left()
        data = result.data
        if all(a is b for a, b in zip(data, panels)):
            if not len(masked_zeros):
                return raw_data, result
            data = [a.astype(corrected_dtype(a.dtype)) for a in data]
        if len(masked_zeros):
            _set_flat(data, masked_zeros, NOT_VALID)
        return tuple(flumpy.from_numpy(a) for a in data), result


#: what the zero pixels given no value hold where the stock format class
#: masks zeros: below the corrected trusted range, so still masked
NOT_VALID = LOWEST_VALUE - 1


def _set_flat(panels, positions, value):
    """Set the pixels at flat positions over the concatenated panels."""
    offset = 0
    for panel in panels:
        inside = positions[(positions >= offset) & (positions < offset + panel.size)]
        panel.reshape(-1)[inside - offset] = value
        offset += panel.size


def stock_zeros_valid(detector: Detector | None) -> bool:
    """Whether a stock detector model counts a zero pixel as valid (current
    dxtbx's ADSC trusted range starts at 1)."""
    return detector is None or all(
        compat.valid_integer_range(p.get_trusted_range())[0] <= 0 for p in detector
    )


@functools.lru_cache(maxsize=4)
def corrector_for(
    geometry: ShellGeometry, params: CorrectionParameters
) -> ImageCorrector:
    """The ImageCorrector of this geometry and these parameters, reused."""
    return ImageCorrector(geometry, params)


def image_identity(path: str, index: int = 0) -> str:
    """What seeds an image's correction: its file name and its index within a
    multi-image file, not the directory, so that moved data correct alike."""
    return f"{os.path.basename(os.fspath(path))}#{index}"


def corrected_value_range(panel: Panel) -> tuple[int, int]:
    """(lowest, highest) integer a corrected image of this panel may hold as a
    valid pixel: any corrected value, up to the panel's highest valid count."""
    return LOWEST_VALUE, compat.valid_integer_range(panel.get_trusted_range())[1]


def describe_corrected(detector: Detector) -> Detector:
    """The detector model of corrected images (changed in place): each panel's
    trusted range widened to admit the corrected values (the maximum stays),
    and "PAD" panels described as the integrating camera they are
    (detectors.describe_as_integrating says why)."""
    for panel in detector:
        panel.set_trusted_range(compat.trusted_range_for(*corrected_value_range(panel)))
    describe_as_integrating(detector)
    return detector
