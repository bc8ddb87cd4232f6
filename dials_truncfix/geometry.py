"""What the shells of an image are made from, taken from its experiment:
the beam, the detector and the valid pixels (:class:`ShellGeometry`), and the
shell map built from them, computed once and reused.

The valid pixels are those that every mask of the experiment leaves valid:
the format's static mask, the imageset's external mask (``dials.import
mask=``, ``dials.apply_mask``), the panels' untrusted regions and the user's
``truncfix.mask``.  The panels' trusted ranges are not used: zero pixels are
what the correction is for, and pixels above the trusted maximum are never
zero, so they only ever count as "above Imax".
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import pickle
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dials_truncfix.core.shells import ShellMap, build_shell_map

if TYPE_CHECKING:
    from dxtbx.format.Format import Format
    from dxtbx.imageset import ImageSet
    from dxtbx.model import Beam, Detector


class MaskFileError(ValueError):
    """A mask file that cannot be used."""


@dataclass(frozen=True, eq=False)
class ShellGeometry:
    """The beam direction (s0), the detector (as ``Detector.to_dict()``) and
    the valid pixels (one boolean array per panel, or None for all).  Two
    geometries are equal when their digests are, so that caches find the
    shell map of a geometry rebuilt from the same experiment."""

    s0: tuple
    detector: dict
    valid: tuple | None = None

    def __eq__(self, other):
        return isinstance(other, ShellGeometry) and self.digest == other.digest

    def __hash__(self):
        return hash(self.digest)

    def detector_model(self) -> Detector:
        from dxtbx.model import DetectorFactory

        return DetectorFactory.from_dict(self.detector)

    @functools.cached_property
    def digest(self) -> str:
        """Identifies the geometry and mask (for caches)."""
        h = hashlib.blake2b(digest_size=20)
        h.update(json.dumps([self.s0, self.detector], sort_keys=True).encode())
        for v in self.valid or ():
            h.update(np.packbits(v).tobytes())
        return h.hexdigest()

    def to_record(self) -> dict:
        """JSON-able form, the valid pixels packed and compressed."""
        return {
            "s0": list(self.s0),
            "detector": self.detector,
            "valid": None if self.valid is None else [_pack(v) for v in self.valid],
        }

    @classmethod
    def from_record(cls, record: dict) -> ShellGeometry:
        valid = record.get("valid")
        shapes = [p["image_size"][::-1] for p in record["detector"]["panels"]]
        return cls(
            s0=tuple(record["s0"]),
            detector=record["detector"],
            valid=None
            if valid is None
            else tuple(_unpack(v, s) for v, s in zip(valid, shapes)),
        )


def _pack(mask):
    return base64.b64encode(zlib.compress(np.packbits(mask).tobytes(), 9)).decode(
        "ascii"
    )


def _unpack(text, shape):
    bits = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint8)
    return np.unpackbits(bits, count=int(np.prod(shape))).astype(bool).reshape(shape)


def shell_geometry(beam: Beam, detector: Detector, masks=()) -> ShellGeometry:
    """ShellGeometry of these models, valid where all ``masks`` (per-panel
    flex.bool or numpy arrays, True = valid; None entries ignored) are."""
    valid = combine_masks(detector, *masks)
    return ShellGeometry(
        s0=tuple(beam.get_s0()),
        detector=detector.to_dict(),
        valid=None if all(v.all() for v in valid) else tuple(valid),
    )


def experiment_shell_geometry(
    imageset: ImageSet, position: int, format_instance: Format, mask_path: str | None
) -> ShellGeometry:
    """The ShellGeometry of the image at ``position`` of an imageset: the one
    rule both routes (the correction on read and dials.correct_truncation)
    follow, so that they give the same pixels.  Its beam and detector models
    and every mask the imageset carries (external mask, untrusted regions),
    the static mask of its format class (``format_instance``, an instance
    for that image) and the user's ``truncfix.mask`` file (MaskFileError if
    it cannot be used)."""
    beam, detector = imageset.get_beam(position), imageset.get_detector(position)
    external = imageset.external_lookup.mask.data
    masks = [
        format_instance.get_static_mask(),
        None
        if external.empty()
        else [external.tile(i).data() for i in range(len(external))],
        [panel.get_untrusted_rectangle_mask() for panel in detector],
        user_mask(mask_path, detector),
    ]
    return shell_geometry(beam, detector, masks)


def _pixel_centres(panel):
    """Laboratory coordinates (mm) of the pixel centres of a panel, (slow, fast, 3)."""
    fast, slow = panel.get_image_size()
    size_fast, size_slow = panel.get_pixel_size()
    origin = np.array(panel.get_origin())
    f_axis = np.array(panel.get_fast_axis()) * size_fast
    s_axis = np.array(panel.get_slow_axis()) * size_slow
    j = np.arange(fast) + 0.5
    i = np.arange(slow) + 0.5
    return origin + i[:, None, None] * s_axis + j[None, :, None] * f_axis


def inv_d2_per_panel(detector: Detector, s0) -> list:
    """1/d^2 (A^-2) at every pixel centre, one (slow, fast) array per panel,
    from the panel frames (any number of panels, tilts, beam position)."""
    s0 = np.array(s0)
    k = np.linalg.norm(s0)
    out = []
    for panel in detector:
        lab = _pixel_centres(panel)
        s1 = lab * (k / np.linalg.norm(lab, axis=2))[:, :, None]
        # |s1 - s0| = 1/d
        out.append(np.sum((s1 - s0) ** 2, axis=2))
    return out


def azimuth_per_panel(detector: Detector, s0) -> list:
    """The azimuth (radians) of every pixel centre about the beam, one
    (slow, fast) array per panel (for regions of annulus x sector)."""
    beam = np.array(s0) / np.linalg.norm(s0)
    helper = (
        np.array([0.0, 1.0, 0.0]) if abs(beam[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
    )
    e1 = np.cross(helper, beam)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(beam, e1)
    return [
        np.arctan2(_pixel_centres(panel) @ e2, _pixel_centres(panel) @ e1)
        for panel in detector
    ]


def mask_to_numpy(mask, detector):
    """A list of per-panel boolean arrays from flex.bool panels or None."""
    shapes = [p.get_image_size()[::-1] for p in detector]
    if mask is None:
        return [np.ones(s, dtype=bool) for s in shapes]
    arrays = [
        np.asarray(
            m.as_numpy_array() if hasattr(m, "as_numpy_array") else m, dtype=bool
        )
        for m in mask
    ]
    if len(arrays) != len(shapes) or any(
        a.shape != tuple(s) for a, s in zip(arrays, shapes)
    ):
        raise MaskFileError("the mask does not match the detector's panels")
    return arrays


def combine_masks(detector, *masks):
    """Logical AND of per-panel masks (None entries are ignored)."""
    combined = mask_to_numpy(None, detector)
    for mask in masks:
        if mask is not None:
            combined = [c & m for c, m in zip(combined, mask_to_numpy(mask, detector))]
    return combined


def load_mask_file(path: str, detector: Detector) -> list:
    """A DIALS mask pickle (tuple of flex.bool, True = valid) as numpy arrays;
    MaskFileError naming the file if it cannot be used."""
    if not os.path.isfile(path):
        raise MaskFileError(f"{path}: no such mask file")
    try:
        with open(path, "rb") as fh:
            mask = pickle.load(fh)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a mask"
        raise MaskFileError(
            f"{path}: not a DIALS mask file ({type(e).__name__})"
        ) from None
    if not isinstance(mask, (tuple, list)):
        mask = (mask,)
    try:
        return mask_to_numpy(mask, detector)
    except (MaskFileError, TypeError, ValueError) as e:
        raise MaskFileError(f"{path}: {e}") from None


def user_mask(path: str | None, detector: Detector) -> list | None:
    """The user's ``truncfix.mask`` as per-panel arrays (None without one);
    MaskFileError naming the file if it cannot be used."""
    return load_mask_file(path, detector) if path else None


@functools.lru_cache(maxsize=8)
def shell_map_for(
    geometry: ShellGeometry,
    n_shells: int,
    min_pixels_per_shell: int,
    n_sectors: int = 1,
) -> ShellMap:
    """The shell map of this geometry and mask, computed once and reused."""
    detector = geometry.detector_model()
    valid = geometry.valid or mask_to_numpy(None, detector)
    azimuth = azimuth_per_panel(detector, geometry.s0) if n_sectors > 1 else None
    return build_shell_map(
        inv_d2_per_panel(detector, geometry.s0),
        valid,
        n_shells,
        min_pixels_per_shell,
        azimuth,
        n_sectors,
    )
