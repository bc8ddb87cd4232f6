"""Low-count histograms per shell, and Imax, the largest count they hold.

The Imax rule (its one statement): unless the user sets it
(``histogram.max``), Imax is the count at or below which a fraction q of the
shell's *positive* counts lie, at least 3, where q is ``histogram.quantile``
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


def shell_histograms(by_shell, shell_starts):
    """H(I) per shell for I = 0..HISTOGRAM_CAP, counts above the cap in the
    last column, from the valid pixel values sorted by shell."""
    if by_shell.dtype.itemsize > 2 and by_shell.max(initial=0) > HISTOGRAM_CAP:
        by_shell = np.minimum(by_shell, HISTOGRAM_CAP + 1)
    if by_shell.dtype.kind == "f":
        by_shell = by_shell.astype(np.intp)
    n_shells = len(shell_starts) - 1
    histograms = np.zeros((n_shells, HISTOGRAM_CAP + 2), dtype=np.int64)
    for s in range(n_shells):
        counts = np.bincount(by_shell[shell_starts[s] : shell_starts[s + 1]])
        histograms[s, : len(counts)] = counts
    return histograms


def imax(histogram, n_valid, params):
    """Imax of one shell by the rule above, from its full histogram."""
    if params.histogram_max is not None:
        return int(min(params.histogram_max, len(histogram) - 1))
    n_positive = n_valid - histogram[0]
    target = effective_quantile(params) * n_positive
    head = np.cumsum(histogram[1:4097])  # Imax is almost always small
    if head[-1] < target:
        head = np.cumsum(histogram[1:])
    value = int(np.searchsorted(head, target)) + 1
    return max(3, min(value, len(histogram) - 1))
