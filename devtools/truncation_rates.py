"""How often the truncation test (dials_truncfix/core/truncation.py) rejects
real truncation, and whether it leaves the zeros of an offset camera alone.

Real truncation: every region with at least 1% zeros of simulated sweeps
(devtools/simulate.py, preset=strong, weak and readnoise), of the test
cameras' synthetic scenes (devtools/synthetic.py, at several sizes and
seeds), of read-noise scenes (normal noise, near-Gaussian low counts) and of
the real Ceta dark frame of ../shared/realdata shifted by 0-6 ADU (where
present) must be corrected.  Not truncation: an offset camera (background offset 10-40 counts,
dead border, beam-stop disc and dead pixels at 0) must have every region with
zeros left alone.  Prints one table row per data set.

    /usr/bin/python3 -m devtools.truncation_rates [--images 3] [--size 2048]
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile

import numpy as np

from devtools.synthetic import (
    draw_true_values,
    falling_parameters,
    radial_inv_d2,
    truncate,
)
from dials_truncfix.core.correction import CORRECTED, NOT_TRUNCATION, correct_image
from dials_truncfix.core.parameters import CorrectionParameters
from dials_truncfix.core.shells import build_shell_map

#: regions with fewer zeros are not counted (the rate is over truncating regions)
MIN_ZERO_FRACTION = 0.01


def offset_camera_image(
    size, offset, rng, dead_fraction=0.01, border=8, beam_stop_radius=None
):
    """A camera that adds ``offset`` counts: gain-scaled Poisson background
    plus read noise on top of the offset (no value reaches 0 by itself),
    with a dead border, a beam-stop disc at the centre and scattered dead
    pixels that read 0."""
    slow, fast = np.mgrid[0:size, 0:size]
    r = np.hypot(fast - 0.52 * size, slow - 0.49 * size)
    background = 3.0 + 20.0 * np.exp(-r / (0.3 * size))
    values = offset + 1.5 * rng.poisson(background) + rng.normal(0.0, 2.0, (size, size))
    image = np.clip(np.rint(values), 1, 65535).astype(np.uint16)
    image[:border], image[-border:], image[:, :border], image[:, -border:] = 0, 0, 0, 0
    image[r < (beam_stop_radius or 0.04 * size)] = 0
    image.ravel()[
        rng.choice(image.size, int(dead_fraction * image.size), replace=False)
    ] = 0
    return image


def core_scene(size, seed):
    """The tests' synthetic truncated scene (falling lognormal shells)."""
    inv_d2 = radial_inv_d2((size, size), centre=(0.52 * size, 0.49 * size))
    shell_map = build_shell_map([inv_d2], [np.ones((size, size), bool)], 10)
    true = draw_true_values(
        shell_map.labels.reshape(size, size),
        falling_parameters(10),
        np.random.default_rng(seed),
    )
    return shell_map, truncate(true)


def read_noise_scene(size, seed):
    """Normal read noise (sd 2-8 ADU by seed) around shell means falling from
    +3 to -1 sd: near-Gaussian low counts, 10-85% zeros."""
    shell_map = radial_map(size)
    rng = np.random.default_rng(seed)
    sd = 2.0 + 6.0 * rng.random()
    means = sd * np.linspace(3.0, -1.0, 10)
    values = means[shell_map.labels.reshape(size, size)] + sd * rng.standard_normal(
        (size, size)
    )
    return shell_map, truncate(values)


def radial_map(size):
    inv_d2 = radial_inv_d2((size, size), centre=(0.52 * size, 0.49 * size))
    return build_shell_map([inv_d2], [np.ones((size, size), bool)], 10)


def counted(shells):
    """(regions with at least MIN_ZERO_FRACTION zeros, of them corrected,
    left alone as not truncation, other statuses)."""
    regions = [s for s in shells if s.zero_fraction >= MIN_ZERO_FRACTION]
    corrected = sum(s.status == CORRECTED for s in regions)
    rejected = sum(s.status.startswith(NOT_TRUNCATION) for s in regions)
    return len(regions), corrected, rejected, len(regions) - corrected - rejected


def dxtbx_shells(paths, params):
    """Region results of image files read by stock dxtbx, shells from their
    header geometry and the format's static mask, as the plugin builds them."""
    import dxtbx

    from dials_truncfix.geometry import shell_geometry, shell_map_for

    shells = []
    for path in paths:
        image = dxtbx.load(path)
        geometry = shell_geometry(
            image.get_beam(), image.get_detector(), [image.get_static_mask()]
        )
        shell_map = shell_map_for(
            geometry, params.n_shells, params.min_pixels_per_shell
        )
        raw = image.get_raw_data()
        panels = [
            p.as_numpy_array() for p in (raw if isinstance(raw, tuple) else (raw,))
        ]
        shells += correct_image(
            panels, shell_map, params, os.path.basename(path)
        ).shells
    return shells


def simulated_sweep(preset, n_images, size, directory):
    """The truncated images of devtools.simulate (written once into ``directory``)."""
    out = os.path.join(directory, f"sim_{preset}_{size}")
    paths = sorted(glob.glob(os.path.join(out, "truncated", "*.img")))
    if len(paths) < n_images:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "devtools.simulate",
                f"preset={preset}",
                f"n_images={n_images}",
                f"image_size={size}",
                f"output.directory={out}",
            ],
            check=True,
            capture_output=True,
        )
        paths = sorted(glob.glob(os.path.join(out, "truncated", "*.img")))
    return paths[:n_images]


def row(name, images, counts, expect_rejected=False):
    n, corrected, rejected, other = counts
    wrong = corrected if expect_rejected else rejected
    rate = wrong / n if n else float("nan")
    label = "corrected" if expect_rejected else "rejected"
    print(
        f"{name:<34} {images:>6} {n:>8} {corrected:>9} {rejected:>9} {other:>6}   {label} {rate:.4%}"
    )
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images", type=int, default=3, help="images per simulated sweep and scene"
    )
    parser.add_argument(
        "--size", type=int, default=2048, help="detector size of the simulated sweeps"
    )
    parser.add_argument(
        "--directory",
        default=None,
        help="where the simulated sweeps are kept (default: a temporary one)",
    )
    parser.add_argument(
        "--skip-simulation", action="store_true", help="only the synthetic scenes"
    )
    args = parser.parse_args(argv)
    params = CorrectionParameters()
    print(
        f"{'data':<34} {'images':>6} {'regions':>8} {'corrected':>9} {'left':>9} {'other':>6}"
        f"   (regions with >= {MIN_ZERO_FRACTION:.0%} zeros)"
    )
    total = np.zeros(4, int)
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.directory or scratch
        if not args.skip_simulation:
            for preset in ("strong", "weak", "readnoise"):
                paths = simulated_sweep(preset, args.images, args.size, directory)
                total += row(
                    f"simulate preset={preset} {args.size}",
                    len(paths),
                    counted(dxtbx_shells(paths, params)),
                )
        scenes = [
            ("synthetic scene", "scene", core_scene, size)
            for size in (256, 512, 1024, 2048)
        ]
        scenes += [
            ("read-noise scene", "read_noise", read_noise_scene, size)
            for size in (512, 2048)
        ]
        for label, key, scene, size in scenes:
            shells = []
            for seed in range(args.images):
                shell_map, image = scene(size, seed)
                shells += correct_image(
                    [image], shell_map, params, f"{key}_{size}_{seed}"
                ).shells
            total += row(f"{label} {size}", args.images, counted(shells))
        ceta = os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            "..",
            "shared",
            "realdata",
            "Ceta_dark_frame_512x512_int16.npy",
        )
        if os.path.exists(ceta):
            dark = np.load(ceta).astype(np.int64)
            shells = []
            for shift in range(7):
                image = np.clip(dark + shift, 0, None).astype(np.uint16)
                shells += correct_image(
                    [image], radial_map(512), params, f"ceta_{shift}"
                ).shells
            total += row("real Ceta frame +0..6 ADU 512", 7, counted(shells))
        from devtools.synthetic import write_truncated_smv_sweep

        smv = write_truncated_smv_sweep(
            os.path.join(scratch, "smv"), n_images=args.images, size=512, seed=1
        )[0]
        total += row(
            "synthetic SMV sweep 512 (dxtbx)",
            len(smv),
            counted(dxtbx_shells(smv, params)),
        )
        print(
            f"{'all truncated data':<34} {'':>6} {total[0]:>8} {total[1]:>9} {total[2]:>9} {total[3]:>6}"
            f"   rejected {total[2] / max(total[0], 1):.4%}"
        )
        for offset in (10, 25, 40):
            shells = []
            for seed in range(args.images):
                image = offset_camera_image(1024, offset, np.random.default_rng(seed))
                shells += correct_image(
                    [image], radial_map(1024), params, f"offset_{offset}_{seed}"
                ).shells
            n, corrected, rejected, other = counted(shells)
            with_zeros = [s for s in shells if s.n_zero]
            left = sum(s.status != CORRECTED for s in with_zeros)
            row(
                f"offset camera +{offset} 1024",
                args.images,
                (n, corrected, rejected, other),
                expect_rejected=True,
            )
            print(
                f"{'':<34} {'':>6} regions with any zeros: {len(with_zeros)}, left alone {left}"
            )


if __name__ == "__main__":
    main()
