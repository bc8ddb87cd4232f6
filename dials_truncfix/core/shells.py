"""Resolution shells of equal valid-pixel count (about equal area).

The shell map is built once per sweep geometry from a per-pixel resolution
measure (1/d^2, which grows with scattering angle and is finite at the beam
centre) and a validity mask per panel, then reused for every image.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(f"dials.{__name__}")

#: label of pixels that belong to no shell (masked)
INVALID = -1


class ShellError(ValueError):
    """The detector has too few valid pixels for any shell."""


@dataclass
class ShellMap:
    """Shell label per pixel, flattened over all panels in panel order.

    ``labels`` holds 0 (lowest resolution) .. n_shells - 1 (highest), or
    INVALID for masked pixels.  ``d_max``/``d_min`` give each shell's
    resolution range in Angstrom.
    """

    labels: np.ndarray
    panel_shapes: list
    d_max: np.ndarray
    d_min: np.ndarray
    n_valid: np.ndarray
    requested_shells: int
    _order: tuple = field(default=None, repr=False)

    @property
    def n_shells(self):
        return len(self.d_max)

    @property
    def n_pixels(self):
        return self.labels.size

    def pixel_order(self):
        """(indices of the valid pixels sorted by shell, raster order within
        a shell; start of each shell in it): cached, the same for every image."""
        if self._order is None:
            order = np.argsort(self.labels, kind="stable").astype(np.intp)
            n_invalid = int(np.count_nonzero(self.labels == INVALID))
            order = order[n_invalid:]
            starts = np.concatenate(([0], np.cumsum(self.n_valid)))
            self._order = (order, starts)
        return self._order


def _d_from_inv_d2(inv_d2):
    return math.inf if inv_d2 <= 0 else 1.0 / math.sqrt(inv_d2)


def build_shell_map(inv_d2, valid, n_shells=10, min_pixels_per_shell=1000):
    """Split the valid pixels into ``n_shells`` shells of (nearly) equal count.

    inv_d2: per-panel arrays of 1/d^2 (any shape); valid: matching boolean
    arrays.  When there are fewer than ``n_shells * min_pixels_per_shell``
    valid pixels, fewer shells are made and a warning is logged.
    """
    if n_shells < 1:
        raise ValueError("n_shells must be at least 1")
    if len(inv_d2) != len(valid):
        raise ValueError("need one validity mask per panel")
    shapes = [np.shape(a) for a in inv_d2]
    for a, m in zip(inv_d2, valid):
        if np.shape(a) != np.shape(m):
            raise ValueError("resolution and mask arrays differ in shape")
    resolution = np.concatenate([np.asarray(a, dtype=float).ravel() for a in inv_d2])
    is_valid = np.concatenate([np.asarray(m, dtype=bool).ravel() for m in valid])
    is_valid &= np.isfinite(resolution)
    n_valid = int(is_valid.sum())

    n_possible = n_valid // max(int(min_pixels_per_shell), 1)
    if n_possible < 1:
        raise ShellError(
            f"only {n_valid} valid pixels: at least {min_pixels_per_shell} are needed for one shell"
        )
    n_made = min(n_shells, n_possible)
    if n_made < n_shells:
        logger.warning(
            "Only %d valid pixels: using %d resolution shells instead of %d",
            n_valid,
            n_made,
            n_shells,
        )

    valid_resolution = np.sort(resolution[is_valid])
    ranks = (np.arange(1, n_made) * n_valid) // n_made
    inner_edges = valid_resolution[ranks]
    labels = np.full(resolution.shape, INVALID, dtype=np.int16)
    labels[is_valid] = np.searchsorted(inner_edges, resolution[is_valid], side="right")

    counts = np.bincount(labels[is_valid], minlength=n_made)
    keep = counts > 0  # ties can empty a shell: renumber the ones left
    if not keep.all():
        remap = np.cumsum(keep) - 1
        labels[is_valid] = remap[labels[is_valid]]
        counts = counts[keep]
    n_final = len(counts)
    lo = np.full(n_final, np.inf)
    hi = np.full(n_final, -np.inf)
    np.minimum.at(lo, labels[is_valid], resolution[is_valid])
    np.maximum.at(hi, labels[is_valid], resolution[is_valid])
    return ShellMap(
        labels=labels,
        panel_shapes=shapes,
        d_max=np.array([_d_from_inv_d2(x) for x in lo]),
        d_min=np.array([_d_from_inv_d2(x) for x in hi]),
        n_valid=counts,
        requested_shells=n_shells,
    )
