"""Speed and memory of the correction, as ratios against dxtbx's own read
time measured in the same run (``make bench``).

Two sweeps of 2048x2048 unsigned 16-bit SMV images:
  * "microed": simulated by devtools.simulate (proteinase-K-like crystal,
    truncating camera; 0-40% zeros per shell, as in real data);
  * "heavy": a lognormal background truncated much harder (16-73% zeros per
    shell, about 60% overall), a stress case;
  * "readnoise": simulated by devtools.simulate preset=readnoise (a camera
    whose read noise exceeds its gain: near-Gaussian low counts, the fits of
    the outer shells at the normal limit; about 40% zeros), held to the
    targets of the heavy sweep: the cost of a correction grows with its
    zero pixels (core_speed.py shows that its fits cost what others do).

For each sweep and each assignment mode:
1. time to read an image with the stock dxtbx class;
2. time to correct it, shell map cached (target: at most 0.3 x 1 for the
   MicroED sweep, 0.7 x 1 for the heavy one);
3. time to read an image through an imageset corrected on read, against
   the stock imageset (target: at most 1.3, heavy 1.7);
(times: medians over 3 passes of the sweep; ratios: medians of the ratios
of calls made one after the other, which share the machine's load);
4. peak resident memory after N, 2N and 4N corrections in sequence (must not
   grow; a growth of more than 16 MiB fails the benchmark).
Also the memory the cached shell map holds per panel pixel.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# the development tools (devtools/) live in the checkout, not in the package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = ("distribution", "expectation")
TARGETS = {
    "microed": {"correct_over_read": 0.3, "corrected_over_stock_read": 1.3},
    "heavy": {"correct_over_read": 0.7, "corrected_over_stock_read": 1.7},
    "readnoise": {"correct_over_read": 0.7, "corrected_over_stock_read": 1.7},
}
#: devtools.simulate presets of the simulated sweeps
SIMULATED = {"microed": "strong", "readnoise": "readnoise"}


def shell_map_bytes_per_pixel(shell_map):
    """What the cached shell map of the correction holds (labels, the fit
    subsample's histogram keys, per-line counts), per panel pixel."""
    arrays = [shell_map.labels, *shell_map.histogram_sample()[1:]]
    arrays += [a for lines in shell_map.valid_per_line() for a in lines]
    return sum(a.nbytes for a in arrays) / shell_map.n_pixels


def _interleaved_times(functions, repeats):
    """Seconds of each function(k), k = 0 .. repeats - 1, the calls
    interleaved so that a changing machine load affects all alike."""
    times = [[] for _ in functions]
    for k in range(repeats):
        for function, spent in zip(functions, times):
            start = time.perf_counter()
            function(k)
            spent.append(time.perf_counter() - start)
    return times


def _median_ratio(times, baseline):
    """The median over the repeats of time / baseline time of the same
    repeat: the neighbouring calls share the machine's load of the moment,
    so their ratio is steadier than a ratio of medians."""
    return statistics.median(t / b for t, b in zip(times, baseline))


def _sweep(kind, workdir, n_images, size):
    from devtools.synthetic import write_truncated_smv_sweep

    directory = os.path.join(workdir, f"{kind}{size}")
    if kind in SIMULATED:
        paths = [
            os.path.join(directory, "truncated", f"sim_{i + 1:05d}.img")
            for i in range(n_images)
        ]
        if not all(os.path.exists(p) for p in paths):
            print(
                f"Simulating {n_images} {size}x{size} {kind} images in {directory}",
                flush=True,
            )
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "devtools.simulate",
                    f"output.directory={directory}",
                    f"image_size={size}",
                    f"n_images={n_images}",
                    "seed=7",
                    f"preset={SIMULATED[kind]}",
                    "output.nproc=2",
                    "output.truth_images=False",
                ],
                check=True,
                capture_output=True,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            )
        return paths
    paths = [os.path.join(directory, f"bench_{i + 1:05d}.img") for i in range(n_images)]
    if not all(os.path.exists(p) for p in paths):
        print(
            f"Writing {n_images} {size}x{size} heavily truncated images in {directory}",
            flush=True,
        )
        paths, _ = write_truncated_smv_sweep(
            directory, n_images, size, seed=7, spots=400, prefix="bench"
        )
    return paths


def measure(paths, mode, targets):
    import dxtbx
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_truncfix.core.parameters import CorrectionParameters
    from dials_truncfix.corrector import corrector_for, image_identity
    from dials_truncfix.format_wrapper import wrapped_class
    from dials_truncfix.geometry import experiment_shell_geometry
    from dials_truncfix.settings import Settings

    settings = Settings(CorrectionParameters(assignment=mode))
    stock_class = type(dxtbx.load(paths[0]))
    n = len(paths)
    for p in paths:  # warm the page cache
        stock_class(p).get_raw_data()
    stock_iset = ExperimentListFactory.from_filenames(paths)[0].imageset
    corrector = corrector_for(
        experiment_shell_geometry(stock_iset, 0, stock_class(paths[0]), None),
        settings.parameters,
    )
    raws = [stock_class(p).get_raw_data() for p in paths]
    read, correction = _interleaved_times(
        [
            lambda k: stock_class(paths[k % n]).get_raw_data(),
            lambda k: corrector.correct(raws[k % n], image_identity(paths[k % n])),
        ],
        3 * n,
    )
    zeros = []  # (zero pixels, valid pixels) per image, not timed
    for k in range(n):
        shells = corrector.correct(raws[k], image_identity(paths[k]))[1].shells
        zeros.append((sum(s.n_zero for s in shells), sum(s.n_valid for s in shells)))
    zero_fraction = sum(z for z, _ in zeros) / max(1, sum(v for _, v in zeros))

    corrected_iset = wrapped_class(stock_class.__name__).get_imageset(
        paths, as_sequence=True, format_kwargs={"truncfix": settings.to_record()}
    )
    corrected_iset.get_raw_data(0)  # the shell map is built once per geometry
    stock_read, corrected_read = _interleaved_times(
        [
            lambda k: stock_iset.get_raw_data(k % n),
            lambda k: corrected_iset.get_raw_data(k % n),
        ],
        3 * n,
    )

    rss = []
    for k in range(4 * n):
        corrector.correct(raws[k % n], image_identity(paths[k % n]))
        rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    figures = {
        "images": n,
        "zero_fraction": round(zero_fraction, 3),
        "read_ms": round(1e3 * statistics.median(read), 1),
        "correct_ms": round(1e3 * statistics.median(correction), 1),
        "correct_over_read": round(_median_ratio(correction, read), 2),
        "stock_imageset_read_ms": round(1e3 * statistics.median(stock_read), 1),
        "corrected_imageset_read_ms": round(1e3 * statistics.median(corrected_read), 1),
        "corrected_over_stock_read": round(
            _median_ratio(corrected_read, stock_read), 2
        ),
        "peak_rss_mib_after_corrections": {
            str(i + 1): round(rss[i], 1) for i in (n - 1, 2 * n - 1, 4 * n - 1)
        },
        "peak_rss_growth_mib": round(rss[-1] - rss[n - 1], 1),
        "shell_map_bytes_per_pixel": round(
            shell_map_bytes_per_pixel(corrector.shell_map), 2
        ),
    }
    figures["targets_met"] = all(figures[k] <= v for k, v in targets.items())
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12, help="images per sweep")
    parser.add_argument("--size", type=int, default=2048, help="image width and height")
    parser.add_argument(
        "--workdir", default=os.path.join(os.path.dirname(__file__), "work")
    )
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    os.environ.pop("DIALS_TRUNCFIX", None)

    figures = {
        "image_size": args.size,
        "load_average_before": os.getloadavg()[0],
        "targets": TARGETS,
    }
    for kind in TARGETS:
        paths = _sweep(kind, args.workdir, args.images, args.size)
        for mode in MODES:
            targets = TARGETS[kind]
            f = figures[f"{kind}/{mode}"] = measure(paths, mode, targets)
            print(
                f"{kind:8s} {mode:12s} zeros {f['zero_fraction']:.0%}: read {f['read_ms']} ms, correction"
                f" {f['correct_ms']} ms -> {f['correct_over_read']} (target <= {targets['correct_over_read']});"
                f" corrected/stock imageset read {f['corrected_over_stock_read']} (target <="
                f" {targets['corrected_over_stock_read']}); peak RSS growth {f['peak_rss_growth_mib']} MiB over"
                f" {3 * f['images']} more corrections; shell map {f['shell_map_bytes_per_pixel']} bytes/pixel",
                flush=True,
            )
    figures["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(figures, indent=2))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)
    grew = max(f["peak_rss_growth_mib"] for k, f in figures.items() if "/" in k) > 16
    return 1 if grew else 0


if __name__ == "__main__":
    sys.exit(main())
