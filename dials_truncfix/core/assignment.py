"""The values given to a shell's zero pixels, and which pixel gets which.

With P(v) the fitted probability of [v - 0.5, v + 0.5) for v = 0, -1, ...,
the H(0) zero pixels of a fitted shell receive, by the ``assignment`` mode:

``distribution``
    the values v in the counts H(0) P(v) / F(0.5): the truncated part of the
    fitted distribution itself;
``expectation``
    the conditional mean m = sum v P(v) / sum P(v), as the two integers
    floor(m) and floor(m) + 1 in the proportions that keep the sum H(0) m:
    less noise per pixel, the same total.

Counts are rounded by largest remainder so that they sum to H(0) exactly;
the values are arranged over the pixels uniformly at random, from a
generator seeded by the user's seed and the image's identity only.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from scipy import special

from dials_truncfix.core.lognormal import cdf

#: the lowest value the assignment may give (keeps int32 output safe)
LOWEST_VALUE = -(2**30)
#: the lowest value bin absorbs the tail whose expected pixel count is below this
TAIL_PIXELS = 0.01


def image_rng(seed, image_key):
    """A generator that depends only on the user seed and the image's identity,
    so that an image is corrected identically in any process and order."""
    digest = hashlib.blake2b(str(image_key).encode("utf-8"), digest_size=16).digest()
    words = [int(w) for w in np.frombuffer(digest, dtype="<u4")]
    entropy = [seed & 0xFFFFFFFF, seed >> 32] + words
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


#: the assignment modes (see the module's docstring)
ASSIGNMENTS = ("distribution", "expectation")


def zero_value_probabilities(n_zero, theta, mu, sigma):
    """(values v = 0, -1, ..., v_lo; their probabilities P(v), not normalised).

    P(v) is the probability of [v - 0.5, v + 0.5), the lowest bin also takes
    the tail below it; the values stop where the expected number of the
    ``n_zero`` pixels further down is below TAIL_PIXELS."""
    f_half = float(cdf([0.5], theta, mu, sigma)[0])
    if not f_half > 0:
        raise ValueError("the fitted distribution gives no probability below 0.5")
    p_tail = f_half * TAIL_PIXELS / n_zero
    x_tail = theta + math.exp(mu + sigma * float(special.ndtri(p_tail)))
    v_lo = max(math.floor(x_tail + 0.5), math.floor(theta + 0.5), LOWEST_VALUE)
    v_lo = min(v_lo, 0)
    values = np.arange(0, v_lo - 1, -1, dtype=np.int64)
    upper = cdf(values + 0.5, theta, mu, sigma)
    lower = np.append(upper[1:], 0.0)
    return values, np.clip(upper - lower, 0, None)


def zero_assignment(mode, n_zero, theta, mu, sigma):
    """(values in descending order, how many of the ``n_zero`` pixels get
    each, the conditional mean m) in this assignment mode."""
    if mode not in ASSIGNMENTS:
        raise ValueError(f"unknown assignment {mode!r}; use one of {ASSIGNMENTS}")
    values, prob = zero_value_probabilities(n_zero, theta, mu, sigma)
    mean = float(np.dot(values, prob) / prob.sum())
    if mode == "expectation":
        return (*expectation_counts(n_zero, mean), mean)
    return values, largest_remainder(n_zero * prob / prob.sum(), n_zero), mean


def expectation_counts(n_zero, mean):
    """(floor(m) + 1 and floor(m); counts n_zero f and n_zero (1 - f) by
    largest remainder, f = m - floor(m)): the nearest integer split of the
    sum n_zero m."""
    low = math.floor(mean)
    fraction = mean - low
    values = np.array([low + 1, low], dtype=np.int64)
    return values, largest_remainder(n_zero * np.array([fraction, 1 - fraction]), n_zero)


def largest_remainder(expected, total):
    """Integer counts summing to ``total`` that round ``expected`` by largest
    remainder (ties to the lower index)."""
    counts = np.floor(expected).astype(np.int64)
    deficit = int(total - counts.sum())
    if deficit:
        remainder = expected - counts
        order = np.lexsort((np.arange(len(expected)), -remainder))
        counts[order[:deficit]] += 1
    return counts


#: random draws are resolved in steps of 1/65536 through a lookup table
_TABLE_SIZE = 65536
#: categories drawn directly are held this many standard deviations below
#: their exact count, so that the direct draws (almost) never overshoot
DIRECT_DRAW_MARGIN = 5.0


def _sequence(values, counts):
    out = np.empty(int(counts.sum()), dtype=values.dtype)
    ends = np.cumsum(counts)
    for value, start, end in zip(values, ends - counts, ends):
        out[start:end] = value
    return out


def random_arrangement(values, counts, rng):
    """``values`` repeated ``counts`` times, in uniformly random order.

    Faster than shuffling all n: each position first draws a value
    independently from a lookup table whose probabilities are held a few
    standard deviations below the exact counts, the rest of the table meaning
    "undecided"; the undecided positions then receive a shuffle of what is
    left.  Every step treats the positions alike, so the result is
    exchangeable, hence uniform over the arrangements with exactly these
    counts.  Should a direct draw overshoot (p < 1e-6), the whole multiset is
    shuffled instead, which is uniform too."""
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    direct = np.maximum(counts - DIRECT_DRAW_MARGIN * np.sqrt(counts) - 1, 0)
    slots = np.floor(direct / max(n, 1) * _TABLE_SIZE).astype(np.int64)
    n_decided = int(slots.sum())  # table slots 0 .. n_decided - 1 hold values, in order
    if n == 0 or n_decided == 0:
        out = _sequence(values, counts)
        rng.shuffle(out)
        return out
    draws = rng.integers(0, _TABLE_SIZE, size=n, dtype=np.uint16)
    # draws per value from the draws below each slot (bincount fills
    # 65536 counters faster than a few, which it would hit repeatedly)
    below = np.concatenate(([0], np.cumsum(np.bincount(draws, minlength=_TABLE_SIZE)[:n_decided])))
    ends = np.cumsum(slots)
    drawn = below[ends] - below[ends - slots]
    if np.any(drawn > counts):
        out = _sequence(values, counts)
        rng.shuffle(out)
        return out
    table = np.full(_TABLE_SIZE, values[0], dtype=values.dtype)
    table[:n_decided] = np.repeat(values, slots)
    out = table[draws]
    rest = _sequence(values, counts - drawn)
    rng.shuffle(rest)
    out[draws >= n_decided] = rest
    return out
