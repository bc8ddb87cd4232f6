"""The demo behind `make demo`: a small truncated sweep with known truth,
corrected by dials.correct_truncation and on read, then processed by DIALS.

    /usr/bin/python3 -m dials_truncfix.demo [directory]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from dials_truncfix.format_wrapper import ENVIRONMENT_VARIABLE
from dials_truncfix.synthetic import write_truncated_smv_sweep

MARKER = ".dials-truncfix-demo"


def _run(args, cwd, **env_extra):
    env = {k: v for k, v in os.environ.items() if k != ENVIRONMENT_VARIABLE}
    env.update(env_extra)
    shown = " ".join(f"{k}={v}" for k, v in env_extra.items())
    print(f"\n$ {shown + ' ' if shown else ''}{' '.join(args)}", flush=True)
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"demo: {args[0]} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


FIND_SPOTS = ["dials.find_spots", "spotfinder.filter.max_strong_pixel_fraction=0.9"]


def _spots(stdout):
    for line in stdout.splitlines():
        if line.startswith("Saved") and "reflections" in line:
            return int(line.split()[1])
    return None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    directory = os.path.abspath(argv[0] if argv else "demo")
    if os.path.exists(directory):
        if not os.path.exists(os.path.join(directory, MARKER)):
            sys.exit(f"demo: {directory} exists and is not a demo directory: choose another")
        shutil.rmtree(directory)
    os.makedirs(directory)
    open(os.path.join(directory, MARKER), "w").close()

    print("Writing 6 truncated 512x512 SMV images (known per-shell lognormal background)")
    paths, truth = write_truncated_smv_sweep(os.path.join(directory, "images"), n_images=6, size=512, seed=2016)

    _run(["dials.import", *paths, "output.experiments=imported.expt"], directory)
    out = _run(["dials.correct_truncation", "imported.expt", "nproc=2"], directory)
    print("\n".join(line for line in out.splitlines() if line.strip())[-1500:])
    stock = _spots(_run([*FIND_SPOTS, "imported.expt", "output.reflections=strong_uncorrected.refl"], directory))
    fixed = _spots(_run([*FIND_SPOTS, "corrected.expt", "output.reflections=strong_corrected.refl"], directory))

    on_read = os.path.join(directory, "on_read")
    os.makedirs(on_read)
    _run(["dials.import", *paths, "output.experiments=imported.expt"], on_read, **{ENVIRONMENT_VARIABLE: "1"})
    on_read_spots = _spots(_run([*FIND_SPOTS, "imported.expt"], on_read))

    with open(os.path.join(directory, "dials.correct_truncation.json")) as fh:
        report = json.load(fh)
    image = report["sweeps"][0]["images"][0] if "sweeps" in report else report["images"][0]
    print("\nFirst image: fitted against true shell parameters")
    print(" shell   d range (A)    zeros   theta (true)     mu (true)    sigma (true)")
    for shell in image["shells"]:
        k = shell["shell"]
        fit = shell.get("fit") or {}
        if not fit:
            continue
        print(
            f"{k:5d} {shell['d_max']:6.2f}-{shell['d_min']:5.2f} {shell['zero_fraction']:7.1%}"
            f" {fit['theta']:7.2f} ({truth.theta[k]:6.2f}) {fit['mu']:6.3f} ({truth.mu[k]:5.3f})"
            f" {fit['sigma']:6.3f} ({truth.sigma[k]:5.3f})"
        )
    print(f"\nSpots found: uncorrected {stock}, corrected images {fixed}, corrected on read {on_read_spots}")
    print(f"Report: {os.path.join(directory, 'dials.correct_truncation.html')}")
    print(f"All outputs in {directory}")


if __name__ == "__main__":
    main()
