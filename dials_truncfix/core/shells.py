"""Resolution shells of equal valid-pixel count (about equal area), and
optionally their azimuthal sectors: the regions modelled separately.

The shell map is built once per sweep geometry from a per-pixel resolution
measure (1/d^2, which grows with scattering angle and is finite at the beam
centre), a validity mask per panel and, for sectors, a per-pixel azimuth,
then reused for every image.
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
    """Region label per pixel, flattened over all panels in panel order.

    A region is a resolution shell, or with ``n_sectors`` > 1 an azimuthal
    sector of one.  ``labels`` holds the region, 0 .. n_regions - 1 ordered
    by shell (0 is the lowest resolution) then sector, or INVALID for masked
    pixels.  Per region: ``shell`` and ``sector`` indices, the resolution
    range ``d_max``/``d_min`` in Angstrom and the number of valid pixels.
    """

    labels: np.ndarray
    panel_shapes: list
    d_max: np.ndarray
    d_min: np.ndarray
    n_valid: np.ndarray
    shell: np.ndarray
    sector: np.ndarray
    n_sectors: int = 1
    _order: tuple = field(default=None, repr=False)
    _sample: tuple = field(default=None, repr=False)
    _keys: np.ndarray = field(default=None, repr=False)
    _lines: list = field(default=None, repr=False)

    @property
    def n_regions(self) -> int:
        return len(self.d_max)

    @property
    def n_shells(self) -> int:
        return int(self.shell[-1]) + 1

    @property
    def n_pixels(self) -> int:
        return self.labels.size

    def pixel_order(self):
        """(indices of the valid pixels sorted by region, raster order within
        a region; start of each region in it): cached, the same for every image."""
        if self._order is None:
            order = np.argsort(self.labels, kind="stable").astype(np.intp)
            n_invalid = int(np.count_nonzero(self.labels == INVALID))
            order = order[n_invalid:]
            starts = np.concatenate(([0], np.cumsum(self.n_valid)))
            self._order = (order, starts)
        return self._order

    def histogram_sample(self):
        """(stride s, histogram key base of every s-th pixel, valid pixels of
        each region among them) of the fixed pixel subsample the fits see,
        cached (see sample_keys)."""
        if self._sample is None:
            stride = fit_sample_stride(self.n_valid)
            self._sample = (stride, *sample_keys(self.labels, stride, self.n_regions))
        return self._sample

    def valid_per_line(self):
        """Per panel, the number of valid pixels in each row and each column
        (cached)."""
        if self._lines is None:
            self._lines, offset = [], 0
            for shape in self.panel_shapes:
                size = int(np.prod(shape))
                valid = (self.labels[offset : offset + size] >= 0).reshape(shape)
                self._lines.append((valid.sum(axis=1), valid.sum(axis=0)))
                offset += size
        return self._lines

    def merge_candidates(self, region: int) -> list:
        """The regions whose pixels a failed fit of ``region`` is pooled with,
        in order of preference: the neighbouring sectors of the same shell,
        then the same sector of the next shell in (or out, for the first)."""
        shell, sector = int(self.shell[region]), int(self.sector[region])
        wanted = [
            (shell, (sector - 1) % self.n_sectors),
            (shell, (sector + 1) % self.n_sectors),
        ]
        wanted.append((shell - 1 if shell > 0 else shell + 1, sector))
        candidates = []
        for s, k in wanted:
            found = self._region(s, k)
            if found is not None and found != region and found not in candidates:
                candidates.append(found)
        return candidates

    def _region(self, shell, sector):
        """The region of this shell and sector, or None if it was not made."""
        if self._keys is None:  # regions are ordered by shell, then sector
            self._keys = self.shell * self.n_sectors + self.sector
        key = shell * self.n_sectors + sector
        found = int(np.searchsorted(self._keys, key))
        return found if found < len(self._keys) and self._keys[found] == key else None

    def region_name(self, region: int) -> str:
        """How logs and reports name a region (region_label)."""
        return region_label(
            int(self.shell[region]), int(self.sector[region]), self.n_sectors
        )


def region_label(shell: int, sector: int, n_sectors: int) -> str:
    """A region as users read it, counted from 1 from the lowest resolution:
    "shell 3", or "shell 3 sector 1" where shells are split into sectors
    (the JSON record keeps the indices from 0)."""
    name = f"shell {shell + 1}"
    return name if n_sectors == 1 else f"{name} sector {sector + 1}"


#: the fits see every SAMPLE_STRIDE-th pixel (in flat order: on a detector
#: whose width is not a multiple of 3 the sampled pixels run diagonally, so
#: no column or row is favoured) when every region keeps at least
#: MIN_SAMPLED_PIXELS of its valid pixels; else every pixel.  The zero
#: pixels are always all found and all assigned.
SAMPLE_STRIDE = 3
MIN_SAMPLED_PIXELS = 30_000
#: the one bincount of the low-count histograms has at most this many bins
MAX_HISTOGRAM_BINS = 2**20


def fit_sample_stride(n_valid_per_region):
    """The stride of the fixed pixel subsample the fits use."""
    if (
        len(n_valid_per_region)
        and min(n_valid_per_region) >= SAMPLE_STRIDE * MIN_SAMPLED_PIXELS
    ):
        return SAMPLE_STRIDE
    return 1


def histogram_bins(n_regions):
    """Bins per region of the capped low-count histograms: counts 0 .. bins - 2
    and one bin for all higher counts (at most 1024, fewer with many regions)."""
    return int(max(8, min(1024, MAX_HISTOGRAM_BINS // (n_regions + 1))))


def sample_keys(labels, stride, n_regions):
    """(key base of every ``stride``-th pixel, valid pixels of each region
    among them): a sampled pixel of region r with capped value v counts in
    bin ``r * histogram_bins(n_regions) + v`` of one bincount, a masked
    pixel in bins from ``n_regions * histogram_bins(n_regions)`` on."""
    bins = histogram_bins(n_regions)
    sampled = labels[::stride]
    base = sampled.astype(np.int32) * bins  # int32: the keys are built in place
    base[sampled == INVALID] = n_regions * bins
    return base, np.bincount(sampled[sampled >= 0], minlength=n_regions)


def _d_from_inv_d2(inv_d2):
    return math.inf if inv_d2 <= 0 else 1.0 / math.sqrt(inv_d2)


def build_shell_map(
    inv_d2: list,
    valid: list,
    n_shells: int = 10,
    min_pixels_per_shell: int = 1000,
    azimuth: list | None = None,
    n_sectors: int = 1,
) -> ShellMap:
    """Split the valid pixels into ``n_shells`` shells of (nearly) equal count,
    each into ``n_sectors`` sectors of equal angle (experimental).

    inv_d2: per-panel arrays of 1/d^2 (any shape); valid: matching boolean
    arrays; azimuth: matching arrays of the azimuth in radians (any origin
    and range), needed for n_sectors > 1 only.  When there are fewer than
    ``n_shells * min_pixels_per_shell`` valid pixels, fewer shells are made
    and a warning is logged; sectors may hold fewer pixels (a sector whose
    fit fails is pooled with its neighbour).  Empty regions are not made.
    """
    resolution, angle, is_valid = _flat_geometry(
        inv_d2, valid, azimuth, n_shells, n_sectors
    )
    n_valid = int(is_valid.sum())
    n_made = _number_of_shells(n_valid, n_shells, min_pixels_per_shell)
    if n_made * n_sectors > n_valid:
        raise ValueError(
            f"n_sectors={n_sectors}: {n_made} shells of {n_sectors} sectors are more regions than"
            f" the {n_valid} valid pixels"
        )
    valid_resolution = resolution[is_valid]
    region = _equal_count_shells(valid_resolution, n_made)
    if n_sectors > 1:
        region = region * n_sectors + _sector(angle[is_valid], n_sectors)

    counts = np.bincount(region, minlength=n_made * n_sectors)
    keep = (
        counts > 0
    )  # ties (or the detector's outline) can empty a region: renumber the ones left
    shell, sector = np.divmod(np.flatnonzero(keep), n_sectors)
    shell = np.cumsum(np.bincount(shell, minlength=n_made) > 0)[shell] - 1
    if not keep.all():
        region = (np.cumsum(keep) - 1)[region]
        counts = counts[keep]
    n_final = len(counts)
    labels = np.full(resolution.shape, INVALID, dtype=_label_dtype(n_final))
    labels[is_valid] = region
    lo = np.full(n_final, np.inf)
    hi = np.full(n_final, -np.inf)
    np.minimum.at(lo, region, valid_resolution)
    np.maximum.at(hi, region, valid_resolution)
    return ShellMap(
        labels=labels,
        panel_shapes=[np.shape(a) for a in inv_d2],
        d_max=np.array([_d_from_inv_d2(x) for x in lo]),
        d_min=np.array([_d_from_inv_d2(x) for x in hi]),
        n_valid=counts,
        shell=shell,
        sector=sector,
        n_sectors=n_sectors,
    )


def _flat_geometry(inv_d2, valid, azimuth, n_shells, n_sectors):
    """(1/d^2, azimuth or None, validity) of all pixels, flattened in panel
    order; pixels with a non-finite 1/d^2 (or azimuth) are not valid."""
    if n_shells < 1:
        raise ValueError("n_shells must be at least 1")
    if n_sectors < 1:
        raise ValueError("n_sectors must be at least 1")
    if len(inv_d2) != len(valid):
        raise ValueError("need one validity mask per panel")
    if n_sectors > 1 and (azimuth is None or len(azimuth) != len(valid)):
        raise ValueError("n_sectors > 1 needs one azimuth array per panel")
    for k, (a, m) in enumerate(zip(inv_d2, valid)):
        if np.shape(a) != np.shape(m) or (
            n_sectors > 1 and np.shape(azimuth[k]) != np.shape(m)
        ):
            raise ValueError("resolution, azimuth and mask arrays differ in shape")
    resolution = np.concatenate([np.asarray(a, dtype=float).ravel() for a in inv_d2])
    is_valid = np.concatenate([np.asarray(m, dtype=bool).ravel() for m in valid])
    is_valid &= np.isfinite(resolution)
    angle = None
    if n_sectors > 1:
        angle = np.concatenate([np.asarray(a, dtype=float).ravel() for a in azimuth])
        is_valid &= np.isfinite(angle)
    return resolution, angle, is_valid


def _number_of_shells(n_valid, n_shells, min_pixels_per_shell):
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
    return n_made


def _equal_count_shells(resolution, n_shells):
    """Shell 0 .. n_shells - 1 of each value, at ranks of equal spacing."""
    ranks = (np.arange(1, n_shells) * resolution.size) // n_shells
    inner_edges = np.sort(resolution)[ranks]
    return np.searchsorted(inner_edges, resolution, side="right")


def _label_dtype(n_regions):
    """The narrowest signed integer type for labels INVALID .. n_regions - 1
    (narrow labels sort fast, and the correction of every image looks up and
    counts the labels of its zero pixels)."""
    for dtype in (np.int8, np.int16, np.int32):
        if n_regions - 1 <= np.iinfo(dtype).max:
            return dtype
    return np.int64


def _sector(angle, n_sectors):
    """Sector 0 .. n_sectors - 1 of each azimuth: [0, 2 pi) in equal parts."""
    turns = np.mod(angle, 2 * np.pi) / (2 * np.pi)
    return np.minimum((turns * n_sectors).astype(np.int64), n_sectors - 1)
