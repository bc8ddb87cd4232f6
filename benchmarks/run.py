"""Speed and memory of the correction, as ratios against dxtbx's own read
time measured in the same run (run by hand or with `make bench`).

Two sweeps of 2048x2048 unsigned 16-bit SMV images:
  * "microed": simulated by devtools.simulate (proteinase-K-like
    crystal, truncating camera; 0-40% zeros per shell, as in real data);
  * "heavy": a lognormal background truncated much harder (16-73% zeros per
    shell, about 60% overall), a stress case.

For each:
1. median time to read an image with the stock dxtbx class;
2. median time to correct it with the shell map cached (ratio to 1; target
   <= 0.5, limit 1.0);
3. median time to read an image through a corrected imageset (correction on
   read) against the stock imageset (limit 1.5);
4. peak resident memory after N, 2N and 4N corrections in sequence (must not
   grow).
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


def _median_time(function, repeats):
    times = []
    for k in range(repeats):
        start = time.perf_counter()
        function(k)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _sweep(kind, workdir, n_images, size):
    from devtools.synthetic import write_truncated_smv_sweep

    directory = os.path.join(workdir, f"{kind}{size}")
    if kind == "microed":
        paths = [os.path.join(directory, "truncated", f"sim_{i + 1:05d}.img") for i in range(n_images)]
        if not all(os.path.exists(p) for p in paths):
            print(f"Simulating {n_images} {size}x{size} MicroED images in {directory}", flush=True)
            subprocess.run(
                [sys.executable, "-m", "devtools.simulate", f"output.directory={directory}",
                 f"image_size={size}", f"n_images={n_images}", "seed=7", "output.nproc=2",
                 "output.truth_images=False"],
                check=True, capture_output=True,
            )
        return paths
    paths = [os.path.join(directory, f"bench_{i + 1:05d}.img") for i in range(n_images)]
    if not all(os.path.exists(p) for p in paths):
        print(f"Writing {n_images} {size}x{size} heavily truncated images in {directory}", flush=True)
        paths, _ = write_truncated_smv_sweep(directory, n_images, size, seed=7, spots=400, prefix="bench")
    return paths


def measure(paths):
    import dxtbx
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_truncfix.core.parameters import CorrectionParameters
    from dials_truncfix.corrector import ImageCorrector, image_identity

    stock_class = type(dxtbx.load(paths[0]))
    n = len(paths)
    for p in paths:  # warm the page cache
        stock_class(p).get_raw_data()
    read = _median_time(lambda k: stock_class(paths[k % n]).get_raw_data(), 3 * n)

    first = stock_class(paths[0])
    corrector = ImageCorrector(first.get_detector(), first.get_beam(), CorrectionParameters())
    raws = [stock_class(p).get_raw_data() for p in paths]
    zeros = []  # (zero pixels, valid pixels) per image; not the images themselves

    def correct(k):
        result = corrector.correct(raws[k % n], image_identity(paths[k % n]))[1]
        zeros.append((sum(s.n_zero for s in result.shells), sum(s.n_valid for s in result.shells)))

    correction = _median_time(correct, 3 * n)
    zero_fraction = sum(z for z, _ in zeros[:n]) / max(1, sum(v for _, v in zeros[:n]))

    stock_iset = ExperimentListFactory.from_filenames(paths)[0].imageset
    os.environ["DIALS_TRUNCFIX"] = "1"
    corrected_iset = ExperimentListFactory.from_filenames(paths)[0].imageset
    os.environ.pop("DIALS_TRUNCFIX")
    assert corrected_iset.get_format_class().__name__.startswith("Truncfix_")
    corrected_iset.get_raw_data(0)  # the shell map is built once per geometry
    stock_read = _median_time(lambda k: stock_iset.get_raw_data(k % n), 2 * n)
    corrected_read = _median_time(lambda k: corrected_iset.get_raw_data(k % n), 2 * n)

    rss = []
    for k in range(4 * n):
        corrector.correct(raws[k % n], image_identity(paths[k % n]))
        rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {
        "images": n,
        "zero_fraction": round(zero_fraction, 3),
        "read_ms": round(1e3 * read, 1),
        "correct_ms": round(1e3 * correction, 1),
        "correct_over_read": round(correction / read, 2),
        "stock_imageset_read_ms": round(1e3 * stock_read, 1),
        "corrected_imageset_read_ms": round(1e3 * corrected_read, 1),
        "corrected_over_stock_read": round(corrected_read / stock_read, 2),
        "peak_rss_mib_after_corrections": {str(i + 1): round(rss[i], 1) for i in (n - 1, 2 * n - 1, 4 * n - 1)},
        "peak_rss_growth_mib": round(rss[-1] - rss[n - 1], 1),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12, help="images per sweep")
    parser.add_argument("--size", type=int, default=2048, help="image width and height")
    parser.add_argument("--workdir", default=os.path.join(os.path.dirname(__file__), "work"))
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    os.environ.pop("DIALS_TRUNCFIX", None)

    figures = {"image_size": args.size, "load_average_before": os.getloadavg()[0]}
    for kind in ("microed", "heavy"):
        figures[kind] = measure(_sweep(kind, args.workdir, args.images, args.size))
        f = figures[kind]
        print(
            f"{kind:8s} zeros {f['zero_fraction']:.0%}: read {f['read_ms']} ms, correction {f['correct_ms']} ms"
            f" -> correction/read {f['correct_over_read']} (target <= 0.5, limit 1.0); corrected/stock"
            f" imageset read {f['corrected_over_stock_read']} (limit 1.5); peak RSS growth"
            f" {f['peak_rss_growth_mib']} MiB over {3 * f['images']} more corrections",
            flush=True,
        )
    print(json.dumps(figures, indent=2))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)
    realistic = figures["microed"]
    failed = (
        realistic["correct_over_read"] > 1.0
        or realistic["corrected_over_stock_read"] > 1.5
        or max(figures[k]["peak_rss_growth_mib"] for k in ("microed", "heavy")) > 16
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
