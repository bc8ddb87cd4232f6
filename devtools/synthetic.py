"""Synthetic truncated images with known truth, for tests, the demo and the
benchmarks: the background of each resolution shell follows a shifted
lognormal whose mode and spread fall with resolution (as in Fig. 1b of
Hattne et al., 2016), and negative values are truncated to zero."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ShellTruth:
    theta: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray


def falling_parameters(n_shells):
    """Shell parameters from low (index 0) to high resolution: the mode falls
    from about +2 to -3.5 counts and the spread from about 9 to 3 counts."""
    t = np.linspace(0.0, 1.0, n_shells)
    return ShellTruth(theta=-20.0 + 12.0 * t, mu=3.2 - 1.4 * t, sigma=0.35 + 0.2 * t)


def draw_true_values(labels, truth: ShellTruth, rng):
    """Real-valued true counts for pixels labelled 0..n-1 (labels < 0 get 0)."""
    labels = np.asarray(labels)
    values = np.zeros(labels.shape)
    valid = labels >= 0
    lab = labels[valid]
    z = rng.standard_normal(lab.size)
    values[valid] = truth.theta[lab] + np.exp(truth.mu[lab] + truth.sigma[lab] * z)
    return values


def truncate(true_values, dtype=np.uint16):
    """What the camera stores: the rounded value, negatives truncated to 0."""
    info = np.iinfo(dtype)
    return np.clip(np.rint(true_values), 0, info.max).astype(dtype)


def radial_inv_d2(shape, centre, pixel_size=0.0312, distance=2200.0, wavelength=0.0251):
    """1/d^2 of a flat detector normal to the beam, for tests without dxtbx."""
    slow, fast = np.mgrid[0 : shape[0], 0 : shape[1]]
    r = np.hypot(
        (fast + 0.5 - centre[0]) * pixel_size, (slow + 0.5 - centre[1]) * pixel_size
    )
    two_theta = np.arctan2(r, distance)
    return (2 * np.sin(two_theta / 2) / wavelength) ** 2


def add_spots(values, n_spots, rng, peak=300.0, sigma=1.2):
    """Add Gaussian Bragg-like spots at random positions (in place)."""
    ny, nx = values.shape
    yy, xx = np.mgrid[-4:5, -4:5]
    profile = np.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    for y, x, height in zip(
        rng.integers(4, ny - 5, n_spots),
        rng.integers(4, nx - 5, n_spots),
        rng.exponential(peak, n_spots),
    ):
        values[y - 4 : y + 5, x - 4 : x + 5] += height * profile
    return values


def smv_geometry(size=512, pixel_size=None, distance=2200.0, wavelength=0.0251):
    """Header items of a MicroED-like ADSC SMV image: the detector covers the
    same angles as 2048 x 0.0312 mm pixels at 2.2 m, whatever ``size`` is."""
    pixel_size = pixel_size or 0.0312 * 2048 / size
    return {
        "PIXEL_SIZE": round(pixel_size, 6),
        "BIN": "2x2",
        "DISTANCE": distance,
        "WAVELENGTH": wavelength,
        "BEAM_CENTER_X": round(size * pixel_size * 0.52, 4),
        "BEAM_CENTER_Y": round(size * pixel_size * 0.49, 4),
        "TIME": 1.0,
        "DATE": "Wed Nov 25 12:00:00 2026",
    }


def write_truncated_smv_sweep(
    directory,
    n_images=4,
    size=512,
    seed=0,
    n_shells=10,
    osc_width=0.36,
    spots=50,
    prefix="trunc",
    header_centre_shift=(0.0, 0.0),
    **extra_items,
):
    """Write a sweep of truncated SMV images whose background follows known
    per-shell shifted lognormals computed from the real dxtbx geometry.
    ``header_centre_shift`` (fast, slow, pixels) writes a beam centre that
    far from the true one into the headers (a MicroED camera whose header
    centre is wrong); ``extra_items`` are further header keys.
    Returns (paths, truth) where truth holds the shell parameters."""
    import os

    import dxtbx

    from dials_truncfix.core.shells import build_shell_map
    from dials_truncfix.geometry import inv_d2_per_panel
    from dials_truncfix.io.smv import write_smv

    os.makedirs(directory, exist_ok=True)
    header = smv_geometry(size)
    rng = np.random.default_rng(seed)
    truth = falling_parameters(n_shells)
    paths, shell_map = [], None
    for i in range(n_images):
        path = os.path.join(directory, f"{prefix}_{i + 1:05d}.img")
        items = dict(
            header,
            OSC_START=round(i * osc_width, 4),
            OSC_RANGE=osc_width,
            PHI=round(i * osc_width, 4),
            **extra_items,
        )
        if (
            shell_map is None
        ):  # the true geometry, as dxtbx sees it, from a throw-away file
            probe = os.path.join(directory, f".{prefix}_probe_00000.img")
            write_smv(probe, np.zeros((size, size), np.uint16), **items)
            image = dxtbx.load(probe)
            os.unlink(probe)
            inv_d2 = inv_d2_per_panel(image.get_detector(), image.get_beam().get_s0())
            shell_map = build_shell_map(
                inv_d2, [np.ones((size, size), bool)], n_shells, 100
            )
        values = draw_true_values(shell_map.labels.reshape(size, size), truth, rng)
        add_spots(values, spots, rng)
        pixel = header["PIXEL_SIZE"]
        # BEAM_CENTER_X is along slow, BEAM_CENTER_Y along fast (ADSC convention)
        items["BEAM_CENTER_X"] = round(
            header["BEAM_CENTER_X"] + header_centre_shift[1] * pixel, 4
        )
        items["BEAM_CENTER_Y"] = round(
            header["BEAM_CENTER_Y"] + header_centre_shift[0] * pixel, 4
        )
        write_smv(path, truncate(values), **items)
        paths.append(path)
    return paths, truth
