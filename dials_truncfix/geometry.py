"""dxtbx adapter: per-pixel resolution and validity from the beam and
detector models, turned into a (cached) shell map."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from collections import OrderedDict

import numpy as np

from dials_truncfix.core.shells import build_shell_map

logger = logging.getLogger(f"dials.{__name__}")

_CACHE_SIZE = 8
_shell_map_cache: OrderedDict = OrderedDict()


def inv_d2_per_panel(detector, beam):
    """1/d^2 (A^-2) at every pixel centre, one (slow, fast) array per panel,
    from the panel frames (any number of panels, tilts, beam position)."""
    s0 = np.array(beam.get_s0())
    k = np.linalg.norm(s0)
    out = []
    for panel in detector:
        fast, slow = panel.get_image_size()
        size_fast, size_slow = panel.get_pixel_size()
        origin = np.array(panel.get_origin())
        f_axis = np.array(panel.get_fast_axis()) * size_fast
        s_axis = np.array(panel.get_slow_axis()) * size_slow
        j = np.arange(fast) + 0.5
        i = np.arange(slow) + 0.5
        lab = origin + i[:, None, None] * s_axis + j[None, :, None] * f_axis
        s1 = lab * (k / np.linalg.norm(lab, axis=2))[:, :, None]
        # |s1 - s0| = 1/d
        out.append(np.sum((s1 - s0) ** 2, axis=2))
    return out


def mask_to_numpy(mask, detector):
    """A list of per-panel boolean arrays from flex.bool panels or None."""
    shapes = [p.get_image_size()[::-1] for p in detector]
    if mask is None:
        return [np.ones(s, dtype=bool) for s in shapes]
    arrays = [np.asarray(m.as_numpy_array() if hasattr(m, "as_numpy_array") else m, dtype=bool) for m in mask]
    if len(arrays) != len(shapes) or any(a.shape != tuple(s) for a, s in zip(arrays, shapes)):
        raise ValueError("the mask does not match the detector's panels")
    return arrays


def combine_masks(detector, *masks):
    """Logical AND of per-panel masks (None entries are ignored)."""
    combined = mask_to_numpy(None, detector)
    for mask in masks:
        if mask is not None:
            combined = [c & m for c, m in zip(combined, mask_to_numpy(mask, detector))]
    return combined


def load_mask_file(path, detector):
    """A DIALS mask pickle (tuple of flex.bool, True = valid) as numpy arrays."""
    with open(path, "rb") as fh:
        mask = pickle.load(fh)
    if not isinstance(mask, (tuple, list)):
        mask = (mask,)
    return mask_to_numpy(mask, detector)


def _geometry_key(detector, beam, valid, n_shells, min_pixels):
    digest = hashlib.blake2b(digest_size=20)
    digest.update(json.dumps(detector.to_dict(), sort_keys=True).encode())
    digest.update(json.dumps(list(beam.get_s0())).encode())
    for v in valid:
        digest.update(np.packbits(v).tobytes())
    digest.update(f"{n_shells},{min_pixels}".encode())
    return digest.hexdigest()


def shell_map_for(detector, beam, valid, n_shells, min_pixels_per_shell):
    """The shell map for this geometry and mask, computed once and reused."""
    key = _geometry_key(detector, beam, valid, n_shells, min_pixels_per_shell)
    if key in _shell_map_cache:
        _shell_map_cache.move_to_end(key)
        return _shell_map_cache[key]
    shell_map = build_shell_map(
        inv_d2_per_panel(detector, beam), valid, n_shells, min_pixels_per_shell
    )
    _shell_map_cache[key] = shell_map
    while len(_shell_map_cache) > _CACHE_SIZE:
        _shell_map_cache.popitem(last=False)
    return shell_map


def imageset_masks(imageset, user_mask=True):
    """The format's static mask and the external (user) mask, as tuples of
    flex.bool; not the trusted-range mask."""
    masks = []
    try:
        fmt = imageset.get_format_class().get_instance(
            imageset.get_path(0), **imageset.data().get_format_kwargs()
        )
        static = fmt.get_static_mask()
        if static is not None:
            masks.append(tuple(static))
    except Exception as e:  # pragma: no cover - formats without instances
        logger.debug("no static mask: %s", e)
    lookup = imageset.external_lookup.mask
    if user_mask and lookup.data is not None and not lookup.data.empty():
        masks.append(tuple(lookup.data.tile(i).data() for i in range(len(lookup.data))))
    return masks
