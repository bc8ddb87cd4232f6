"""The values given to a region's zero pixels.

With P(v) the fitted probability of [v - 0.5, v + 0.5) for v = 0, -1, ...,
each zero pixel of a fitted region receives, independently, by the
``assignment`` mode:

``distribution``
    a value v drawn with probability P(v) / F(0.5): a draw from the
    truncated part of the fitted distribution itself (the paper's method);
``expectation``
    floor(m) + 1 with probability f = m - floor(m), else floor(m), where
    m = sum v P(v) / sum P(v) is the conditional mean: less noise per pixel,
    the same expectation m.

The draws resolve probabilities in steps of 1/65536: each region's values
fill a lookup table of 65536 slots in proportion to their probabilities,
and a pixel takes the slot of a 16-bit random integer from a generator
seeded by the user's seed and the image's identity only, drawn for the zero
pixels in the image's raster order, so that an image is corrected
identically in any process and order.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from dials_truncfix.core.lognormal import Distribution

#: the lowest value the assignment may give (keeps int32 output safe)
LOWEST_VALUE = -(2**30)
#: the lowest value bin absorbs the tail whose expected pixel count is below this
TAIL_PIXELS = 0.01
#: slots of a region's lookup table: the resolution of the draws' probabilities
TABLE_SIZE = 65536

#: the assignment modes (see the module's docstring)
ASSIGNMENTS = ("distribution", "expectation")


def image_rng(seed: int, image_key) -> np.random.Generator:
    """A generator that depends only on the user seed and the image's identity,
    so that an image is corrected identically in any process and order."""
    digest = hashlib.blake2b(str(image_key).encode("utf-8"), digest_size=16).digest()
    words = [int(w) for w in np.frombuffer(digest, dtype="<u4")]
    entropy = [seed & 0xFFFFFFFF, seed >> 32] + words
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def uniform_slots(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` independent uniform integers 0 .. TABLE_SIZE - 1 (four from each
    64-bit word of the generator, the same on any platform)."""
    words = rng.bit_generator.random_raw((n + 3) // 4)
    return np.ascontiguousarray(words, dtype="<u8").view("<u2")[:n]


def zero_value_probabilities(n_zero: int, distribution: Distribution):
    """(values v = 0, -1, ..., v_lo; their probabilities P(v), not normalised).

    P(v) is the probability of [v - 0.5, v + 0.5), the lowest bin also takes
    the tail below it; the values stop where the expected number of the
    ``n_zero`` pixels further down is below TAIL_PIXELS."""
    f_half = float(distribution.cdf([0.5])[0])
    if not f_half > 0:
        raise ValueError("the fitted distribution gives no probability below 0.5")
    x_tail = distribution.quantile(f_half * TAIL_PIXELS / n_zero)
    v_lo = max(math.floor(x_tail + 0.5), LOWEST_VALUE)
    if distribution.shape > 0:  # not below the lognormal's support
        v_lo = max(v_lo, math.floor(distribution.theta + 0.5))
    v_lo = min(v_lo, 0)
    values = np.arange(0, v_lo - 1, -1, dtype=np.int64)
    upper = distribution.cdf(values + 0.5)
    lower = np.append(upper[1:], 0.0)
    return values, np.clip(upper - lower, 0, None)


def value_distribution(mode: str, n_zero: int, distribution: Distribution):
    """(values in descending order, the probability of each, the conditional
    mean m) of a zero pixel's value in this assignment mode, for a region
    whose fit is ``distribution``."""
    if mode not in ASSIGNMENTS:
        raise ValueError(f"unknown assignment {mode!r}; use one of {ASSIGNMENTS}")
    values, prob = zero_value_probabilities(n_zero, distribution)
    prob = prob / prob.sum()
    mean = float(np.dot(values, prob))
    if mode == "expectation":
        low = math.floor(mean)
        return (
            np.array([low + 1, low], dtype=np.int64),
            np.array([mean - low, 1 - (mean - low)]),
            mean,
        )
    return values, prob, mean


def slot_ends(probabilities) -> np.ndarray:
    """The end of each value's run of slots in a lookup table: the cumulative
    probabilities in steps of 1/TABLE_SIZE (a value may get no slot)."""
    ends = np.rint(np.cumsum(probabilities) * TABLE_SIZE).astype(np.int64)
    ends = np.minimum(ends, TABLE_SIZE)
    ends[-1] = TABLE_SIZE
    return ends


#: a region's lookup table is filled run by run (one slice per value) up to
#: this many runs of slots, else by np.repeat: slices are faster for the
#: dozen or so values a region usually has
SLICED_RUNS = 64


def fill_slots(row, values, ends):
    """Fill ``row`` (TABLE_SIZE slots) with a region's lookup table:
    ``values[i]`` in slots ``ends[i - 1]`` .. ``ends[i] - 1`` (slot_ends)."""
    starts = np.concatenate(([0], ends[:-1]))
    kept = np.flatnonzero(ends > starts)
    if len(kept) > SLICED_RUNS:
        row[:] = np.repeat(values[kept], (ends - starts)[kept])
        return
    for i in kept.tolist():
        row[starts[i] : ends[i]] = values[i]
