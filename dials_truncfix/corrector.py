"""Thin adapter between dxtbx raw data (tuples of flex arrays) and the
numpy core, shared by the format wrappers and dials.correct_truncation."""

from __future__ import annotations

import logging
import os

import numpy as np
from scitbx.array_family import flex

from dials_truncfix.core.correction import correct_image
from dials_truncfix.core.parameters import CorrectionParameters
from dials_truncfix.geometry import combine_masks, load_mask_file, shell_map_for

logger = logging.getLogger(f"dials.{__name__}")


def _to_numpy(panel_data):
    return panel_data.as_numpy_array()


def _to_flex(array, like):
    if isinstance(like, flex.double):
        return flex.double(np.ascontiguousarray(array, dtype=np.float64))
    return flex.int(np.ascontiguousarray(array, dtype=np.int32))


class ImageCorrector:
    """Corrects images of one detector geometry; the shell map is built once.

    ``masks`` are per-panel masks (flex.bool or numpy, True = valid) such as a
    format's static mask or a user mask; ``mask_file`` a DIALS mask pickle.
    """

    def __init__(self, detector, beam, params: CorrectionParameters, masks=(), mask_file=None):
        self.params = params
        masks = list(masks)
        if mask_file:
            masks.append(load_mask_file(mask_file, detector))
        valid = combine_masks(detector, *masks)
        self.shell_map = shell_map_for(
            detector, beam, valid, params.n_shells, params.min_pixels_per_shell
        )

    def correct(self, raw_data, image_key):
        """(corrected raw data as a tuple of flex arrays, ImageCorrection).

        Images that need no correction come back as the very same objects."""
        if not isinstance(raw_data, tuple):
            raw_data = (raw_data,)
        panels = [_to_numpy(p) for p in raw_data]
        # the numpy arrays are private copies of the flex data: correct them in place
        result = correct_image(panels, self.shell_map, self.params, image_key, overwrite_input=True)
        if result.data is not None and all(a is b for a, b in zip(result.data, panels)):
            return raw_data, result
        corrected = tuple(_to_flex(a, like) for a, like in zip(result.data, raw_data))
        return corrected, result


def image_identity(path, index=0):
    """What seeds an image's correction: its file name and its index within a
    multi-image file, not the directory, so that moved data correct alike."""
    return f"{os.path.basename(os.fspath(path))}#{index}"
