"""One image, end to end: per-region histograms (a region is a resolution
shell or a sector of one), lognormal fits (a failed region is fitted
together with a neighbour, else left unchanged), and the assignment of
non-positive values to the zero-valued pixels (only where they are
truncation, core/truncation.py).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import numpy as np

from dials_truncfix.core.assignment import (
    TABLE_SIZE,
    fill_slots,
    image_rng,
    slot_ends,
    uniform_slots,
    value_distribution,
)
from dials_truncfix.core.histogram import (
    HISTOGRAM_BLOCK,
    RegionHistograms,
    SampleCounter,
    counts_up_to,
    imax,
)
from dials_truncfix.core.lognormal import LognormalFit, fit_lognormals
from dials_truncfix.core.parameters import CorrectionParameters
from dials_truncfix.core.shells import INVALID, ShellMap, sample_keys
from dials_truncfix.core.truncation import why_not_truncation

logger = logging.getLogger(f"dials.{__name__}")

CORRECTED = "corrected"
NO_ZEROS = "no zero pixels"
NOT_TRUNCATED_NEGATIVE = "not truncated data: holds negative values"
NOT_TRUNCATED_FLOAT = "not truncated data: holds non-integer values"
NOT_TRUNCATION = "not truncation"
BLANK = (
    "blank or damaged image: most valid pixels lie in rows or columns that are all zero"
)

#: a row or column is damaged when all of at least this many valid pixels
#: are zero: a file cut short (dxtbx reads the missing rows as 0) or a dead
#: line of the camera.  By chance that is all but impossible: 0.73**128 ~ 3e-18
#: for a line entirely in a shell with the 73% zeros of a heavily truncated
#: outer shell, and lines cross shells of fewer zeros.
DAMAGED_LINE_MIN_PIXELS = 128


@dataclass
class ShellResult:
    """What was done in one region: resolution shell ``shell``, azimuthal
    sector ``sector`` (0 without sectors)."""

    shell: int
    d_max: float
    d_min: float
    n_valid: int
    n_zero: int
    sector: int = 0
    n_sampled: int = 0  # valid pixels of the fixed subsample the fit saw
    imax: int | None = None
    fit: LognormalFit | None = None
    fitted_regions: tuple = ()  # the (shell, sector) pairs whose pixels the fit used
    status: str = NO_ZEROS
    n_changed: int = 0
    min_value: int | None = None
    assignment: str | None = None
    conditional_mean: float | None = None

    @property
    def zero_fraction(self) -> float:
        return self.n_zero / self.n_valid if self.n_valid else 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out["zero_fraction"] = self.zero_fraction
        out["fit"] = self.fit.as_dict() if self.fit else None
        out["fitted_regions"] = [list(r) for r in self.fitted_regions]
        return out


def _ranges(indices):
    """'3, 200-255' from sorted integers."""
    if not len(indices):
        return ""
    breaks = np.flatnonzero(np.diff(indices) != 1)
    starts = np.concatenate(([indices[0]], indices[breaks + 1]))
    ends = np.concatenate((indices[breaks], [indices[-1]]))
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in zip(starts, ends))


#: all-zero lines other than a file's missing end count as damage (dead
#: lines) only while they are at most this fraction of a panel's lines: a
#: real camera's fixed-pattern line offsets put many scattered lines wholly
#: below 0.5 when the background is low (a Ceta dark frame shifted to 89%
#: zeros has 104 of its 512 columns all zero), and those are truncated data
DEAD_LINES_MAX_FRACTION = 0.02


def _damage(lines, n_lines, trailing):
    """The all-zero ``lines`` (sorted indices) that are damage: a run that
    ends at the panel's last line when ``trailing`` (rows: a file cut short,
    read as zeros), and the others while they are few (dead lines)."""
    if not len(lines):
        return lines
    end = len(lines)
    if trailing:
        while end and lines[end - 1] == n_lines - (len(lines) - end) - 1:
            end -= 1
    others, block = lines[:end], lines[end:]
    if len(others) > DEAD_LINES_MAX_FRACTION * n_lines:
        return block
    return lines


#: rows (columns) checked first: a line can be all zero only where these
#: columns (rows) are zero, so only such candidates are checked in full
PROBE_LINES = 16
#: the probe columns come in bands of this many neighbours: a row's probe
#: pixels then share a few cache lines rather than taking one each
PROBE_BAND = 4


def _probes(across, axis):
    """The PROBE_LINES probe lines (fewer on a small panel): spread evenly
    across, in bands of PROBE_BAND neighbours for columns (axis 1)."""
    if across <= PROBE_LINES:
        return np.arange(across)
    if axis == 0:
        return np.linspace(0, across - 1, PROBE_LINES).astype(np.intp)
    bands = np.linspace(0, across - PROBE_BAND, PROBE_LINES // PROBE_BAND)
    return (bands.astype(np.intp)[:, None] + np.arange(PROBE_BAND)).ravel()


def _zero_lines(panel, axis, n_valid_per_line):
    """Indices of the lines along ``axis`` (1: rows, 0: columns) that are all
    zero and hold enough valid pixels to count as damaged."""
    probe = np.take(panel, _probes(panel.shape[axis], axis), axis=axis)
    candidates = np.flatnonzero(
        (probe == 0).all(axis=axis) & (n_valid_per_line >= DAMAGED_LINE_MIN_PIXELS)
    )
    if not len(candidates):
        return candidates
    lines = np.take(panel, candidates, axis=1 - axis)
    return candidates[lines.max(axis=axis) == 0]


def damaged_lines(panels: list, shell_map: ShellMap) -> tuple:
    """(flat boolean mask of the pixels in damaged rows and columns, or None;
    their description, e.g. 'rows 200-255'), from the per-panel arrays.
    Only integer data without negative values is checked (all the correction
    ever changes)."""
    damaged, described, offset = None, [], 0
    for k, (panel, (per_row, per_column)) in enumerate(
        zip(panels, shell_map.valid_per_line())
    ):
        panel = np.asarray(panel)
        rows = _damage(_zero_lines(panel, 1, per_row), panel.shape[0], trailing=True)
        columns = _damage(
            _zero_lines(panel, 0, per_column), panel.shape[1], trailing=False
        )
        if len(rows) or len(columns):
            if damaged is None:
                damaged = np.zeros(
                    sum(int(np.prod(np.shape(p))) for p in panels), dtype=bool
                )
            block = np.zeros(panel.shape, dtype=bool)
            block[rows] = True
            block[:, columns] = True
            damaged[offset : offset + panel.size] = block.ravel()
            where = " and ".join(
                f"{name} {_ranges(lines)}"
                for name, lines in (("rows", rows), ("columns", columns))
                if len(lines)
            )
            described.append(where if len(panels) == 1 else f"panel {k} {where}")
        offset += panel.size
    return damaged, "; ".join(described)


@dataclass
class ImageCorrection:
    """The corrected panels (same shapes as the input, int32 for integer
    input, float64 for integer-valued float input) and what was done."""

    data: list
    status: str
    _shells: list = field(default_factory=list)
    damaged: str = ""  # rows and columns left as they were
    #: fills in the regions' n_changed and min_value when first asked (the
    #: correction on read never asks: it saves two passes over the zeros)
    _tally: object = field(default=None, repr=False, compare=False)
    #: gives the positions of the zero pixels left at zero (see zeros_left)
    _zeros_left: object = field(default=None, repr=False, compare=False)

    @property
    def shells(self) -> list:
        """The ShellResult of every region."""
        if self._tally is not None:
            tally, self._tally = self._tally, None
            tally()
        return self._shells

    def zeros_left(self) -> np.ndarray:
        """Flat positions (over the concatenated panels) of the zero pixels
        given no value: masked ones, those of damaged lines, of regions not
        corrected (fit failed, not truncation) and of images passed through.
        Where the stock format class masks zero pixels they must stay masked."""
        return (
            np.array([], dtype=np.intp)
            if self._zeros_left is None
            else self._zeros_left()
        )

    @property
    def n_changed(self) -> int:
        return sum(s.n_changed for s in self.shells)

    @property
    def min_value(self) -> int | None:
        """The most negative value given to a pixel, or None."""
        values = [s.min_value for s in self.shells if s.min_value is not None]
        return min(values) if values else None


def _fit_shells(problems, params):
    """[(Imax, LognormalFit)] of each (histogram, sampled pixels) of
    ``problems``, fitted together."""
    tops = [imax(histogram, n_valid, params) for histogram, n_valid in problems]
    heads = [
        counts_up_to(histogram, top) for (histogram, _), top in zip(problems, tops)
    ]
    fits = fit_lognormals(
        [(h, int(n_valid - h.sum())) for h, (_, n_valid) in zip(heads, problems)],
        params.likelihood,
    )
    return [(top, _usable(fit)) for top, fit in zip(tops, fits)]


def _usable(fit):
    """The fit, not converged if it gives no probability below 0.5 (no
    values for the zero pixels)."""
    if fit.converged and not fit.distribution.cdf([0.5])[0] > 0:
        return LognormalFit(
            fit.location,
            fit.scale,
            fit.shape,
            fit.log_likelihood,
            fit.rmsd,
            False,
            fit.n_iterations,
            "no probability below 0.5",
        )
    return fit


def _flatten(panels):
    """(the panels as one flat array, whether that is a copy of its own):
    several panels are concatenated, one is viewed."""
    arrays = [np.asarray(p) for p in panels]
    if len(arrays) == 1:
        flat = arrays[0].ravel()
        copied = not np.may_share_memory(flat, arrays[0])
    else:
        flat, copied = np.concatenate([a.ravel() for a in arrays]), True
    if flat.dtype.kind not in "iuf":
        raise TypeError(f"unsupported pixel type {flat.dtype}")
    return flat, copied


def _not_truncated(flat, labels):
    """Why the valid pixels cannot be truncated data, or None, for float
    data (negative values are found with the zeros).  Masked pixels
    (detector gaps flagged with negative values, say) do not count."""
    if flat.dtype.kind == "f":
        valid_values = flat[labels != INVALID]
        if not np.all(np.isfinite(valid_values)) or not np.array_equal(
            valid_values, np.floor(valid_values)
        ):
            return NOT_TRUNCATED_FLOAT
    return None


def correct_image(
    panels: list, shell_map: ShellMap, params: CorrectionParameters, image_key: str
) -> ImageCorrection:
    """Correct one image given as a list of per-panel integer arrays.

    The input is never written: the corrected values go into a new array
    (into the concatenation of several panels, which is one already)."""
    shapes = [np.shape(p) for p in panels]
    _check_map(shapes, shell_map, params)
    flat, copied = _flatten(panels)
    labels = shell_map.labels
    stride, base, n_sampled = shell_map.histogram_sample()
    out = _output(flat, copied)
    # float data are counted once known to be integer-valued (_not_truncated)
    counter = (
        None
        if flat.dtype.kind == "f"
        else SampleCounter(shell_map.n_regions, stride, base)
    )
    zeros, negative = scan_image(flat, labels, out=out, counter=counter)
    reason = _not_truncated(flat, labels) or (
        NOT_TRUNCATED_NEGATIVE if np.any(np.take(labels, negative) != INVALID) else None
    )
    if reason:
        logger.info("Image %s passed through unchanged: %s", image_key, reason)
        return ImageCorrection(
            data=list(panels),
            status=reason,
            _zeros_left=lambda: zeros.positions,
        )
    negative_masked = len(negative) > 0

    n_valid = shell_map.n_valid
    damaged, described = (
        damaged_lines(panels, shell_map) if flat.dtype.kind != "f" else (None, "")
    )
    if damaged is not None:  # not valid pixels for this image
        labels = np.where(damaged, INVALID, labels).astype(labels.dtype)
        n_valid = np.bincount(labels[labels != INVALID], minlength=shell_map.n_regions)
        if n_valid.sum() < 0.5 * shell_map.n_valid.sum():
            logger.info(
                "Image %s passed through unchanged: %s (%s)",
                image_key,
                BLANK,
                described,
            )
            return ImageCorrection(
                data=list(panels),
                status=BLANK,
                damaged=described,
                _zeros_left=lambda: zeros.positions,
            )
        base, n_sampled = sample_keys(labels, stride, shell_map.n_regions)
        zeros.regions = np.take(labels, zeros.positions)
        counter = None  # counted again with these labels

    n_zero = zeros_per_region(zeros.regions, shell_map.n_regions)
    if not n_zero.any() and not params.fit_all_shells:
        return ImageCorrection(
            data=list(panels),
            status=NO_ZEROS,
            damaged=described,
            _zeros_left=lambda: zeros.positions,
        )

    histograms = RegionHistograms(
        flat, labels, stride, base, n_sampled, negative_masked, counter
    )
    results = [
        _region_result(shell_map, r, n_valid[r], n_zero[r], n_sampled[r])
        for r in range(shell_map.n_regions)
    ]
    fits = _fit_regions(results, histograms, shell_map, params, image_key)

    tally = None
    if fits:
        tally = _assign(
            out,
            zeros,
            results,
            fits,
            params,
            image_rng(params.seed, image_key),
        )

    def zeros_left():
        fitted = np.zeros(
            shell_map.n_regions + 1, dtype=bool
        )  # the last entry: INVALID
        fitted[list(fits)] = True
        return zeros.positions[~np.take(fitted, zeros.regions)]

    return ImageCorrection(
        data=_split(out, shapes),
        status=CORRECTED,
        _shells=results,
        damaged=described,
        _tally=tally,
        _zeros_left=zeros_left,
    )


class ZeroPixels:
    """The zero pixels of an image, masked ones too, as scan_image finds
    them block by block: their flat positions per block (``blocks``, joined
    into ``positions`` only when asked: the assignment does without that
    copy) and their regions (``regions``, INVALID for masked pixels)."""

    def __init__(self, blocks, regions):
        self.blocks, self.regions = blocks, regions
        self._positions = None

    def __len__(self):
        return len(self.regions)

    @property
    def positions(self):
        if self._positions is None:
            self._positions = _joined(self.blocks, np.intp)
            self.blocks = [self._positions]
        return self._positions


def scan_image(flat, labels, out=None, counter=None):
    """(the ZeroPixels, flat positions of the negative pixels), in one pass
    over the image, block by block: while a block is in the
    processor's cache it is also copied into ``out`` (the corrected image,
    if it is not ``flat`` itself) and its sampled pixels are counted by
    ``counter`` (a SampleCounter): faster than three passes over an image
    larger than the cache."""
    zeros, regions, negative = [], [], []
    unsigned = flat.dtype.kind == "u"
    size = counter.block if counter else HISTOGRAM_BLOCK
    for start in range(0, flat.size, size):
        block = flat[start : start + size]
        has_negative = not unsigned and not block.min() >= 0
        if has_negative:
            at = np.flatnonzero(block <= 0)
            values = np.take(block, at)
            negative.append(at[values < 0] + start)
            at = at[values == 0]
        else:  # usual: the pixels <= 0 are the zeros
            at = np.flatnonzero(block == 0)
        regions.append(np.take(labels[start : start + size], at))
        at += start
        zeros.append(at)
        if counter is not None:
            counter.add(block, has_negative)
        if out is not None and out is not flat:
            out[start : start + size] = block
    return ZeroPixels(zeros, _joined(regions, labels.dtype)), _joined(negative, np.intp)


def _joined(arrays, dtype):
    return np.concatenate(arrays) if arrays else np.array([], dtype=dtype)


#: up to this many regions, the zero pixels of each are counted by one
#: comparison per region: faster than bincount, which first widens the labels
FEW_REGIONS = 16


def zeros_per_region(regions, n_regions):
    """The number of zero pixels per region, from the regions of the zero
    pixels (INVALID ones not counted)."""
    if n_regions <= FEW_REGIONS:
        return np.array(
            [np.count_nonzero(regions == r) for r in range(n_regions)], dtype=np.intp
        )
    if regions.dtype.itemsize <= 2:  # INVALID counts in the last bin (255, 65535)
        unsigned = regions.view(f"u{regions.dtype.itemsize}")
        return np.bincount(unsigned, minlength=n_regions)[:n_regions]
    return np.bincount(regions + 1, minlength=n_regions + 1)[1:]


def corrected_dtype(dtype: np.dtype) -> type:
    """The type of corrected pixels: int32 (room for the non-positive values)
    for integer input, float64 for float input."""
    return np.float64 if np.dtype(dtype).kind == "f" else np.int32


def _output(flat, writable):
    """The flat array the corrected values go into (corrected_dtype):
    ``flat`` itself when it may be written and has that type, else a new
    array, which scan_image fills with the pixels."""
    dtype = corrected_dtype(flat.dtype)
    if writable and flat.dtype == dtype:
        return flat
    return np.empty(flat.shape, dtype=dtype)


#: regions per value table (64 x 65536 int32 slots, 16 MiB at most): images
#: with more regions are assigned in batches of consecutive regions
TABLE_ROWS = 63


def value_table(batch, results, fits, params):
    """(slot -> value table of a batch of consecutive regions, values and
    slot ends of each fitted one).  Row 1 + i holds the lookup table of
    region ``batch[i]`` (value_distribution, slot_ends); row 0 and the rows
    of regions not fitted hold 0, which leaves their zero pixels (and the
    masked ones) as they are.  The table is int16 where the values allow
    (half the memory the lookups wander through), else int32."""
    distributions = {}
    for r in batch:
        if r in fits:
            values, probabilities, results[r].conditional_mean = value_distribution(
                params.assignment, results[r].n_zero, fits[r].distribution
            )
            results[r].assignment = params.assignment
            distributions[r] = (values, slot_ends(probabilities))
    lowest = min(int(values[-1]) for values, _ in distributions.values())
    dtype = np.int16 if lowest >= np.iinfo(np.int16).min else np.int32
    table = np.empty((len(batch) + 1, TABLE_SIZE), dtype=dtype)
    for row, r in enumerate(batch, start=1):
        if r in distributions:
            fill_slots(table[row], *distributions[r])
        else:
            table[row] = 0
    table[0] = 0
    return table.ravel(), distributions


def _assign(out, zeros, results, fits, params, rng):
    """Give the zero pixels (ZeroPixels) of the fitted regions their values:
    one 16-bit random integer per zero pixel (raster order) picks a slot of
    its region's row of the value table, the key row * TABLE_SIZE + slot
    indexing it directly; the keys, counted, give how many pixels got each
    value (the returned tally, run when the regions' results are first asked
    for)."""
    slots = uniform_slots(rng, len(zeros))
    fitted = sorted(fits)
    n_regions = len(results)
    tallies = []
    for first in range(fitted[0] - fitted[0] % TABLE_ROWS, fitted[-1] + 1, TABLE_ROWS):
        batch = range(first, min(first + TABLE_ROWS, n_regions))
        if not any(r in fits for r in batch):
            continue
        table, distributions = value_table(batch, results, fits, params)
        blocks, rows, batch_slots = zeros.blocks, zeros.regions.astype(np.int32), slots
        if n_regions > TABLE_ROWS:  # keep this batch's pixels (INVALID is -1)
            chosen = np.flatnonzero((rows >= first) & (rows < first + TABLE_ROWS))
            blocks, rows, batch_slots = (
                [zeros.positions[chosen]],
                rows[chosen],
                slots[chosen],
            )
        keys = rows
        keys += 1 - first  # row 0: masked pixels
        keys *= TABLE_SIZE
        keys += batch_slots
        values = np.take(table, keys)
        done = 0
        for positions in blocks:  # scattered block by block: no joined copy
            out[positions] = values[done : done + len(positions)]
            done += len(positions)
        tallies.append((batch, distributions, keys))

    def tally():
        """Each fitted region's n_changed and min_value, from the keys drawn."""
        for batch, distributions, keys in tallies:
            counts = np.bincount(keys, minlength=(len(batch) + 1) * TABLE_SIZE).reshape(
                -1, TABLE_SIZE
            )
            for row, r in enumerate(batch, start=1):
                if r not in distributions:
                    continue
                values, ends = distributions[r]
                below_slot = np.concatenate(([0], np.cumsum(counts[row])))
                given = np.diff(below_slot[np.concatenate(([0], ends))])
                results[r].n_changed = int(given[values != 0].sum())
                results[r].min_value = int(values[np.flatnonzero(given)[-1]])

    return tally


def _check_map(shapes, shell_map, params):
    if shapes != list(shell_map.panel_shapes):
        raise ValueError(
            f"image shape {shapes} does not match the shell map {shell_map.panel_shapes}"
        )
    if shell_map.n_sectors != params.n_sectors:
        raise ValueError(
            f"n_sectors={params.n_sectors} but the shell map has {shell_map.n_sectors} sector(s) per shell:"
            " build it with build_shell_map(..., azimuth=..., n_sectors=n_sectors)"
        )


def _region_result(shell_map, region, n_valid, n_zero, n_sampled):
    return ShellResult(
        n_sampled=int(n_sampled),
        shell=int(shell_map.shell[region]),
        sector=int(shell_map.sector[region]),
        d_max=float(shell_map.d_max[region]),
        d_min=float(shell_map.d_min[region]),
        n_valid=int(n_valid),
        n_zero=int(n_zero),
    )


def _fit_regions(results, histograms, shell_map, params, image_key):
    """Fit every region that has zero pixels (or all, with fit_all_shells);
    a failed fit is retried on the region pooled with each of its merge
    candidates in turn.  ``histograms.of(regions, params)`` gives the
    histogram of regions together.  Returns {region: fit} of the regions to
    correct; a region whose zeros are not truncation (core/truncation.py) is
    left alone, with one line per image."""
    fitted = [
        r for r, result in enumerate(results) if result.n_zero or params.fit_all_shells
    ]
    own = [histograms.of([r], params) for r in fitted]
    fits = {}
    for r, (histogram, n_sampled), (top, fit) in zip(
        fitted, own, _fit_shells(own, params)
    ):
        result = results[r]
        result.imax, result.fit = top, fit
        result.fitted_regions = ((result.shell, result.sector),)
        if not result.fit.converged:
            _fit_merged(result, r, histograms, shell_map, params, image_key)
        if result.n_zero == 0:
            continue
        reason = why_not_truncation(histogram, n_sampled, result.fit)
        if reason:
            result.status = f"{NOT_TRUNCATION}: {reason}; zero pixels left alone"
        elif result.fit.converged:
            fits[r] = result.fit
            result.status = CORRECTED
        else:
            result.status = (
                f"fit failed: {result.fit.message}; zero pixels left unchanged"
            )
            say_once(
                (image_key, r),
                logging.WARNING,
                "Image %s %s (%.2f-%.2f A): %s",
                image_key,
                shell_map.region_name(r),
                result.d_max,
                result.d_min,
                result.status,
            )
    _summarise_left_alone(results, shell_map, image_key)
    return fits


def _summarise_left_alone(results, shell_map, image_key):
    """One line for the regions whose zeros are not truncation, said once
    for all the images that leave the same regions alone for the same
    reasons (a sweep from an offset camera says it once, not per image)."""
    left_alone = [s for s in results if s.status.startswith(NOT_TRUNCATION)]
    if left_alone:
        names = tuple(
            shell_map.region_name(r)
            for r, s in enumerate(results)
            if s.status.startswith(NOT_TRUNCATION)
        )
        reasons = tuple(
            sorted(
                {s.status[len(NOT_TRUNCATION) + 2 :].split(" (")[0] for s in left_alone}
            )
        )
        say_once(
            (NOT_TRUNCATION, names, reasons),
            logging.INFO,
            "Image %s and any other with the same: zeros of %d of %d regions (%s) left alone, not truncation (%s)",
            image_key,
            len(left_alone),
            len(results),
            ", ".join(names),
            "; ".join(reasons),
        )


def _fit_merged(result, region, histograms, shell_map, params, image_key):
    for other in shell_map.merge_candidates(region):
        [(merged_imax, merged_fit)] = _fit_shells(
            [histograms.of([region, other], params)], params
        )
        if merged_fit.converged:
            first, second = sorted((region, other))
            logger.info(
                "Image %s %s: fit failed (%s); using the fit of %s and %s together",
                image_key,
                shell_map.region_name(region),
                result.fit.message,
                shell_map.region_name(first),
                shell_map.region_name(second),
            )
            result.imax, result.fit = merged_imax, merged_fit
            result.fitted_regions = tuple(
                (int(shell_map.shell[k]), int(shell_map.sector[k]))
                for k in (first, second)
            )
            return


def _split(flat, shapes):
    """The flattened panels as arrays of their own shapes (views)."""
    data = []
    offset = 0
    for shape in shapes:
        size = int(np.prod(shape))
        data.append(flat[offset : offset + size].reshape(shape))
        offset += size
    return data


#: how many keys a "say once" memory keeps.  The news that repeats comes
#: close together (a program reads each image of a sweep several times, a
#: sweep's images repeat each other's news), while a long session (a
#: notebook, a server, dials.stills_process) may read unboundedly many
#: images: the memory keeps the keys last seen, a few thousand, and forgets
#: older ones, so that it stays a few hundred kB whatever the session reads.
REMEMBERED_KEYS = 4096


class RecentKeys:
    """The last ``size`` distinct keys seen (an LRU set), thread-safe."""

    def __init__(self, size: int = REMEMBERED_KEYS) -> None:
        self.size = size
        self._keys: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def first_time(self, key) -> bool:
        """Whether ``key`` is not among the keys remembered; remember it as
        the latest either way."""
        with self._lock:
            if key in self._keys:
                self._keys.move_to_end(key)
                return False
            self._keys[key] = None
            while len(self._keys) > self.size:
                self._keys.popitem(last=False)
            return True

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._keys


#: the keys :func:`say_once` has said (the latest REMEMBERED_KEYS)
said = RecentKeys()


def say_once(key, level, message, *args):
    """Log ``message % args`` at ``level`` the first time ``key`` comes up
    (among the last REMEMBERED_KEYS keys): DIALS programs read images
    repeatedly, and a sweep's images repeat each other's news."""
    if said.first_time(key):
        logger.log(level, message, *args)
