"""Speed and memory of the correction, as ratios against dxtbx's own read
time measured in the same run (run by hand or with `make bench`).

1. median time to read a 2048x2048 unsigned 16-bit SMV image with dxtbx;
2. median time to correct it with the shell map cached (ratio to 1; target
   <= 0.5, limit 1.0);
3. median time to read an image through a corrected imageset (correction on
   read) against the stock imageset (limit 1.5);
4. peak resident memory after each of N corrections in sequence (must not grow).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import numpy as np


def _median_time(function, repeats):
    times = []
    for k in range(repeats):
        start = time.perf_counter()
        function(k)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12, help="images in the sweep")
    parser.add_argument("--size", type=int, default=2048, help="image width and height")
    parser.add_argument("--workdir", default=os.path.join(os.path.dirname(__file__), "work"))
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    os.environ.pop("DIALS_TRUNCFIX", None)
    import dxtbx
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_truncfix.correct import CorrectionParameters
    from dials_truncfix.dxtbx_correction import ImageCorrector, image_identity
    from dials_truncfix.synthetic import write_truncated_smv_sweep

    directory = os.path.join(args.workdir, f"smv{args.size}")
    paths = [os.path.join(directory, f"bench_{i + 1:05d}.img") for i in range(args.images)]
    if not all(os.path.exists(p) for p in paths):
        print(f"Writing {args.images} {args.size}x{args.size} SMV images to {directory}")
        paths, _ = write_truncated_smv_sweep(directory, args.images, args.size, seed=7, spots=400, prefix="bench")

    stock_class = type(dxtbx.load(paths[0]))
    n = len(paths)
    # warm up the page cache and imports
    for p in paths:
        stock_class(p).get_raw_data()

    read = _median_time(lambda k: stock_class(paths[k % n]).get_raw_data(), 3 * n)

    first = stock_class(paths[0])
    params = CorrectionParameters()
    corrector = ImageCorrector(first.get_detector(), first.get_beam(), params)
    raws = [stock_class(p).get_raw_data() for p in paths]
    results = []

    def correct(k):
        results.append(corrector.correct(raws[k % n], image_identity(paths[k % n]))[1])

    correction = _median_time(correct, 3 * n)
    zero_fraction = float(np.mean([sum(s.n_zero for s in r.shells) / sum(s.n_valid for s in r.shells) for r in results[:n]]))

    stock_iset = ExperimentListFactory.from_filenames(paths)[0].imageset
    os.environ["DIALS_TRUNCFIX"] = "1"
    corrected_iset = ExperimentListFactory.from_filenames(paths)[0].imageset
    os.environ.pop("DIALS_TRUNCFIX")
    assert corrected_iset.get_format_class().__name__.startswith("Truncfix_")
    corrected_iset.get_raw_data(0)  # shell map built once per geometry
    stock_read = _median_time(lambda k: stock_iset.get_raw_data(k % n), 2 * n)
    corrected_read = _median_time(lambda k: corrected_iset.get_raw_data(k % n), 2 * n)

    rss = []
    for k in range(4 * n):
        corrector.correct(raws[k % n], image_identity(paths[k % n]))
        rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)

    figures = {
        "image_size": args.size,
        "images": n,
        "zero_fraction": round(zero_fraction, 3),
        "read_ms": round(1e3 * read, 1),
        "correct_ms": round(1e3 * correction, 1),
        "correct_over_read": round(correction / read, 2),
        "stock_imageset_read_ms": round(1e3 * stock_read, 1),
        "corrected_imageset_read_ms": round(1e3 * corrected_read, 1),
        "corrected_over_stock_read": round(corrected_read / stock_read, 2),
        "peak_rss_mib_after_images": {str(i + 1): round(rss[i], 1) for i in (n - 1, 2 * n - 1, 4 * n - 1)},
    }
    print(json.dumps(figures, indent=2))
    growth = rss[-1] - rss[n - 1]
    print(f"correction / read = {figures['correct_over_read']} (target <= 0.5, limit 1.0)")
    print(f"corrected / stock imageset read = {figures['corrected_over_stock_read']} (limit 1.5)")
    print(f"peak RSS growth from image {n} to {4 * n}: {growth:.1f} MiB")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)
    failed = figures["correct_over_read"] > 1.0 or figures["corrected_over_stock_read"] > 1.5 or growth > 16
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
