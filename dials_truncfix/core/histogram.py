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


def pooled_histogram(first, second):
    """The histogram of two regions together."""
    if len(first) < len(second):
        first, second = second, first
    pooled = first.copy()
    pooled[: len(second)] += second
    return pooled


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
