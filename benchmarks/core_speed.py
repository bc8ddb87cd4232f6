"""Speed of the numerical core alone: ``correct_image`` on synthetic
2048x2048 images with the shell map cached, as the dxtbx adapter calls it
(on the int32 pixels of the stock read, which it leaves alone: the core's
one copy, its output, is timed), for both assignment modes.

Three images with known per-shell backgrounds and 400 spots:
  * "realistic": lognormal, about 16% zero pixels, as in real MicroED data;
  * "heavy": lognormal, about 59% zero pixels, the stress case of
    benchmarks/run.py;
  * "readnoise": normal read noise (sd 3 ADU, shell means falling from +3 to
    -1 ADU), about 40% zero pixels: fits that end at the normal limit.

Prints the median time per image and where it goes: the time spent in each
function of dials_truncfix.core that ``correct_image`` calls (totals per
call of correct_image), the rest being correct_image's own array work
(checks, copies).  Run with

    PYTHONPATH=. /usr/bin/python3 benchmarks/core_speed.py [--repeats N]

The correction on read views the flex arrays as numpy arrays and returns
flex arrays that share the output (dials_truncfix/corrector.py), so this is
nearly all it costs; benchmarks/run.py measures the whole against dxtbx's
read time.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections import defaultdict

import numpy as np

from devtools.synthetic import (
    ShellTruth,
    add_spots,
    draw_true_values,
    falling_parameters,
    radial_inv_d2,
    truncate,
)
from dials_truncfix.core import correction
from dials_truncfix.core.parameters import CorrectionParameters
from dials_truncfix.core.shells import build_shell_map

SIZE = 2048
N_SHELLS = 10
#: added to the falling parameters' theta: ~16% and ~59% zeros; None: the
#: read-noise image
THETA_SHIFT = {"realistic": 5.7, "heavy": 0.0, "readnoise": None}
#: the read-noise image: shell means (ADU) and the noise's sd
READ_NOISE_MEANS, READ_NOISE_SD = np.linspace(3.0, -1.0, N_SHELLS), 3.0


def synthetic_image(kind, shell_map, seed=7):
    """A truncated 2048x2048 image (uint16) of the given kind."""
    rng = np.random.default_rng(seed)
    labels = shell_map.labels.reshape(SIZE, SIZE)
    if THETA_SHIFT[kind] is None:
        values = READ_NOISE_MEANS[labels] + READ_NOISE_SD * rng.standard_normal(
            (SIZE, SIZE)
        )
    else:
        truth = falling_parameters(N_SHELLS)
        truth = ShellTruth(truth.theta + THETA_SHIFT[kind], truth.mu, truth.sigma)
        values = draw_true_values(labels, truth, rng)
    return truncate(add_spots(values, 400, rng))


class StepTimer:
    """Wraps the core functions correct_image calls, accumulating the time of
    each; calls made inside another wrapped function count under "within"."""

    def __init__(self):
        self.totals = defaultdict(float)
        self.within = defaultdict(float)
        self.originals = {}
        self.depth = 0

    def __enter__(self):
        for name, value in vars(correction).items():
            if (
                callable(value)
                and not isinstance(value, type)
                and getattr(value, "__module__", "").startswith("dials_truncfix.core")
                and name != "correct_image"
            ):
                self.originals[name] = value
                setattr(correction, name, self._timed(name, value))
        return self

    def __exit__(self, *exc):
        for name, value in self.originals.items():
            setattr(correction, name, value)

    def _timed(self, name, function):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            totals = self.within if self.depth else self.totals
            self.depth += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - start
                self.depth -= 1

        return timed


def median_correction_time(image, shell_map, params, repeats):
    """Median seconds of correct_image on the int32 pixels."""
    times = []
    pixels = image.astype(np.int32)
    for k in range(repeats):
        start = time.perf_counter()
        correction.correct_image([pixels], shell_map, params, f"bench#{k}")
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_times(image, shell_map, params, repeats):
    """Mean seconds per image: in total, in each wrapped core function called
    by correct_image, and in those called by them."""
    total = 0.0
    pixels = image.astype(np.int32)
    with StepTimer() as timer:
        for k in range(repeats):
            start = time.perf_counter()
            correction.correct_image([pixels], shell_map, params, f"bench#{k}")
            total += time.perf_counter() - start

    def per_image(totals):
        return {
            name: t / repeats
            for name, t in sorted(totals.items(), key=lambda kv: -kv[1])
        }

    return total / repeats, per_image(timer.totals), per_image(timer.within)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--modes", nargs="+", default=["distribution", "expectation"])
    args = parser.parse_args(argv)

    shape = (SIZE, SIZE)
    inv_d2 = radial_inv_d2(shape, centre=(0.52 * SIZE, 0.49 * SIZE))
    start = time.perf_counter()
    shell_map = build_shell_map([inv_d2], [np.ones(shape, bool)], N_SHELLS)
    shell_map.histogram_sample()
    print(
        f"shell map (built once per geometry): {1e3 * (time.perf_counter() - start):.0f} ms"
    )
    for kind in THETA_SHIFT:
        image = synthetic_image(kind, shell_map)
        print(f"\n{kind}: {np.count_nonzero(image == 0) / image.size:.1%} zero pixels")
        for mode in args.modes:
            params = CorrectionParameters(n_shells=N_SHELLS, assignment=mode)
            median = median_correction_time(image, shell_map, params, args.repeats)
            print(
                f"  {mode:12s} correct_image median {1e3 * median:6.1f} ms over {args.repeats} repeats"
            )
            fits = [
                s.fit
                for s in correction.correct_image(
                    [image.astype(np.int32)], shell_map, params, "models"
                ).shells
            ]
            print(
                "    models: "
                + ", ".join(
                    f"{m} {sum(f.model == m for f in fits)}"
                    for m in ("lognormal", "normal")
                )
                + f"; Newton iterations {sum(f.n_iterations for f in fits)} over {len(fits)} fits"
            )
            total, steps, within = step_times(
                image, shell_map, params, max(3, args.repeats // 3)
            )
            print(
                f"    per step (mean of the timed runs, {1e3 * total:.1f} ms an image):"
            )
            for name, seconds in steps.items():
                print(f"      {name:28s} {1e3 * seconds:6.1f} ms")
            print(
                f"      {'correct_image itself':28s} {1e3 * (total - sum(steps.values())):6.1f} ms  (checks, copies)"
            )
            print(
                "      of which within the steps: "
                + ", ".join(f"{n} {1e3 * t:.1f} ms" for n, t in within.items())
            )


if __name__ == "__main__":
    main()
