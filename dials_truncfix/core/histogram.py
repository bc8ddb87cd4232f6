"""Low-count histograms per region, and Imax, the largest count they hold.

The Imax rule (its one statement): unless the user sets it
(``histogram.max``), Imax is the count at or below which a fraction q of the
region's *positive* counts lie, at least 3, where q is ``histogram.quantile``
or, by default, 0.5 for the exact likelihood and 0.99 for the paper's.  The
exact likelihood treats the counts above Imax as censored, so it is best kept
to the low counts near zero (spots, Poisson tails and the spread of
resolution within a shell distort the upper part); equation (4) of the paper
ignores the counts above Imax, so it needs nearly all of them.
"""

from __future__ import annotations

import numpy as np

from dials_truncfix.core.shells import histogram_bins

#: counts above this are all "above Imax" for histogramming
HISTOGRAM_CAP = 65535

#: the default quantile q of the Imax rule, per likelihood
AUTO_QUANTILE = {"exact": 0.5, "paper": 0.99}


def effective_quantile(params):
    """q of the Imax rule for these CorrectionParameters."""
    if params.histogram_quantile is not None:
        return params.histogram_quantile
    return AUTO_QUANTILE[params.likelihood]


def histogram_values(by_region):
    """The valid pixel values (sorted by region) as bincount takes them:
    integers, every count above HISTOGRAM_CAP as HISTOGRAM_CAP + 1."""
    if by_region.dtype.itemsize > 2 and by_region.max(initial=0) > HISTOGRAM_CAP:
        by_region = np.minimum(by_region, HISTOGRAM_CAP + 1)
    if by_region.dtype.kind == "f":
        by_region = by_region.astype(np.intp)
    return by_region


def region_histogram(values, region_starts, region):
    """H(I) of one region for I = 0 .. its largest value, from
    histogram_values: only as long as the region needs."""
    return np.bincount(values[region_starts[region] : region_starts[region + 1]])


#: the sampled pixels are counted this many at a time, so that their keys
#: stay in the processor's cache (one bincount over a 2048x2048 image's
#: whole sample is slower: its keys, and their conversion to the index type
#: bincount counts, travel through main memory)
HISTOGRAM_BLOCK = 65536


class SampleCounter:
    """Counts the sampled pixels of an image into the one bincount of
    RegionHistograms, block by block: ``add`` each block of pixels that
    starts at a multiple of ``stride`` (at most HISTOGRAM_BLOCK sampled
    pixels), in order; ``base``: the sample's key bases
    (ShellMap.histogram_sample)."""

    def __init__(self, n_regions, stride, base):
        self.bins = histogram_bins(n_regions)
        self.n_regions, self.stride, self.base = n_regions, stride, base
        #: the pixels of one block (``add``): HISTOGRAM_BLOCK sampled ones
        self.block = stride * HISTOGRAM_BLOCK
        self.counts = np.zeros((n_regions + 1) * self.bins, dtype=np.intp)
        size = min(HISTOGRAM_BLOCK, len(base))
        self._keys = np.empty(size, dtype=np.int32)
        self._indices = np.empty(size, dtype=np.intp)
        self._next = 0  # the sample index of the next block's first pixel

    def add(self, pixels, clip_negative):
        """Count the sampled pixels of the next block (``clip_negative``:
        whether it may hold negative values, which count as 0)."""
        sampled = pixels[:: self.stride]
        if sampled.dtype.kind == "f":  # masked pixels may hold nan or inf
            sampled = np.nan_to_num(sampled, nan=0.0, posinf=HISTOGRAM_CAP, neginf=0.0)
        start, end = self._next, self._next + len(sampled)
        self._next = end
        keys = self._keys[: end - start]
        # unsafe: integer-valued float pixels (the only float data
        # corrected) become their integers
        top = self.bins - 1
        if clip_negative:
            np.clip(sampled, 0, top, out=keys, casting="unsafe")
        else:
            np.minimum(sampled, top, out=keys, casting="unsafe")
        keys += self.base[start:end]
        # bincount counts intp indices (it would convert the block itself)
        indices = self._indices[: end - start]
        indices[...] = keys
        self.counts += np.bincount(indices, minlength=len(self.counts))

    def capped(self):
        """The counts of each region: (n_regions, bins)."""
        return self.counts[: self.n_regions * self.bins].reshape(
            self.n_regions, self.bins
        )


class RegionHistograms:
    """The low-count histograms of every region's sampled pixels (counts
    above ``bins - 2`` share the last bin of a region); a region whose Imax
    lies above that gets its full histogram.

    ``flat``: the pixels; ``labels``: their regions (INVALID for masked or
    damaged pixels); ``stride``, ``base``, ``n_sampled``: the fixed subsample
    (ShellMap.histogram_sample); ``clip_negative``: whether masked pixels may
    hold negative values; ``counter``: a SampleCounter that has counted the
    image already (correction.scan_image), else it is counted here."""

    def __init__(
        self, flat, labels, stride, base, n_sampled, clip_negative=False, counter=None
    ):
        self.n_regions = len(n_sampled)
        self.bins = histogram_bins(self.n_regions)
        self.flat, self.labels, self.stride, self.n_sampled = (
            flat,
            labels,
            stride,
            n_sampled,
        )
        if counter is None:
            counter = SampleCounter(self.n_regions, stride, base)
            for start in range(0, len(flat), counter.block):
                counter.add(flat[start : start + counter.block], clip_negative)
        self.capped = counter.capped()

    def of(self, regions, params):
        """(H(0 .. at least Imax), number of sampled pixels) of these regions
        together."""
        regions = list(regions)
        n = int(self.n_sampled[regions].sum())
        exact = self.capped[regions].sum(axis=0)[:-1]
        if imax(exact, n, params) < len(exact):
            return exact, n
        sampled = self.flat[:: self.stride][
            np.isin(self.labels[:: self.stride], regions)
        ]
        return np.bincount(histogram_values(np.clip(sampled, 0, None))), n


def imax(histogram, n_valid, params):
    """Imax of one region by the rule above, from its histogram (which may
    end at the region's largest count)."""
    if params.histogram_max is not None:
        return int(min(params.histogram_max, HISTOGRAM_CAP + 1))
    n_positive = n_valid - histogram[0]
    target = effective_quantile(params) * n_positive
    head = np.cumsum(histogram[1:4097])  # Imax is almost always small
    if head.size and head[-1] < target:
        head = np.cumsum(histogram[1:])
    return max(3, int(np.searchsorted(head, target)) + 1)


def counts_up_to(histogram, top):
    """H(0..top), zero beyond the histogram's end."""
    h = np.zeros(top + 1, dtype=histogram.dtype)
    n = min(len(histogram), top + 1)
    h[:n] = histogram[:n]
    return h
