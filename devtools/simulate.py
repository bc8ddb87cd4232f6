"""Simulate a MicroED rotation sweep recorded by a camera that truncates
negative pixel values to zero (the situation of Hattne et al., 2016).

The geometry follows the proteinase K experiment of the paper: 200 kV
electrons (0.0251 A), a 2048 x 2048 detector with 0.0312 mm pixels at a
virtual distance of 2.2 m, a P 43 21 2 crystal with a = b = 67.3, c = 101 A
rotating continuously at 0.36 degrees per image.  Reflections are placed where
DIALS' own static predictor puts them, with intensities |F|^2 of a random
protein-like structure (electron scattering factors) and a Gaussian rocking
curve split over the images it is recorded on.

The camera model, per pixel and image::

    N     ~ Poisson(background + spots)               electrons
    raw   = clip(round(dark + gain * N / g + read_noise * eps), 0, 65535)
    truth = round((raw - dark) * g)                    signed, written as CBF
    trunc = clip(truth, 0, 65535)                      uint16 ADSC SMV

where ``dark`` is the (known) mean dark frame, ``g`` the per-pixel gain
(flat-field) image applied by the camera software (close to 1), whose
inverse is the pixel response, so that a flat illumination is featureless
after correction, and ``eps`` unit Gaussian read noise.

Outputs (in ``output.directory``)::

    truncated/sim_#####.img   ADSC SMV, unsigned 16 bit (FormatSMVADSC)
    truth/sim_#####.cbf       full imgCIF with goniometer and scan, signed
                              32 bit, byte-offset (FormatCBFFullByteOffset),
                              trusted range wide enough for negative values
    truth_intensities.mtz     unique reflections, I = scale * |F|^2
                              (electrons, Lorentz corrected)
    truth_reflections.refl    every simulated observation (positions, LP,
                              recorded fraction, expected electrons)
    truth.expt                the exact models used (no imageset)
    simulation.json           parameters and derived constants

Run as ``python -m devtools.simulate image_size=512 n_images=20`` (add
``preset=weak`` for the weak crystal).
Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import calendar
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from scipy.special import ndtr

import iotbx.phil
import libtbx.phil

from dials_truncfix.io.atomic import atomic_path, atomic_write_bytes
from dials_truncfix.io.cbf import write_full_cbf
from dials_truncfix.io.smv import smv_header_items, write_smv

logger = logging.getLogger("devtools.simulate")

#: Detector of the paper: 2048 pixels of 0.0312 mm (TVIPS F416, 2x binned)
REFERENCE_IMAGE_SIZE = 2048
REFERENCE_PIXEL_SIZE = 0.0312

#: Valid pixel values of the truth CBF files: negative values are valid.
TRUTH_VALID_RANGE = (-1000000, 10000000)

#: Reflections closer to the rotation axis than this |zeta| are not simulated
#: (their rocking curves would extend over tens of degrees).
ZETA_MIN = 0.05

#: Epoch of the first image (2016-01-01T00:00:00Z) for deterministic headers.
EPOCH0 = calendar.timegm((2016, 1, 1, 0, 0, 0, 0, 0, 0))

#: Parameter values of each ``preset``; explicit parameters override them.
#: strong: the defaults of the scope (outer-shell <I/sigI> ~1 at 2048 x 90
#: images, stronger than typical MicroED data); weak: a tenth of the flux,
#: outer-shell <I/sigI> ~0.2, closer to real MicroED data (the paper's
#: overall <I/sigI> was 2.2); readnoise: the strong crystal on a camera whose
#: read noise (8 ADU) exceeds its gain (2 ADU per electron) under a low
#: background (0.2-4 electrons): near-Gaussian low counts, as on real CMOS
#: and CCD cameras at high resolution, where the lognormal runs to its
#: normal limit.
PRESETS = {
    "strong": "",
    "weak": "intensity_scale = 500",
    "readnoise": "camera.gain = 2\ncamera.read_noise = 8\nbackground.scale = 4\nbackground.constant = 0.2",
}

phil_str = """
preset = *strong weak readnoise
  .type = choice
  .help = "A simulated crystal: strong (the defaults of this scope), weak"
          "(intensity_scale=500, a tenth of the flux: outer-shell I/sigI"
          "~0.2, closer to real MicroED data) or readnoise (the strong"
          "crystal on a read-noise-dominated camera: gain 2 ADU/e, read"
          "noise 8 ADU, background 0.2-4 e: near-Gaussian low counts)."
          "Parameters given explicitly override the preset."
seed = 1
  .type = int(value_min=0)
  .help = "Random seed: crystal orientation, structure, camera calibration"
          "frames and the noise of every image derive from it."
image_size = 2048
  .type = int(value_min=16)
  .help = "Number of pixels N of the square N x N detector."
n_images = 50
  .type = int(value_min=1)
  .help = "Number of images in the rotation sweep."
osc_start = 0.0
  .type = float
  .help = "Rotation angle at the start of the first image (degrees)."
osc_width = 0.36
  .type = float(value_min=0, allow_none=False)
  .help = "Rotation per image (degrees); the rotation is continuous."
exposure_time = 4.0
  .type = float(value_min=0)
  .help = "Exposure time per image (s), written to the headers only."
d_min = 1.3
  .type = float(value_min=0.5)
  .help = "High resolution limit (A) of the predicted reflections."
intensity_scale = 5000
  .type = float(value_min=0)
  .help = "Flux: mean number of electrons recorded on the detector per"
          "reflection (whole rocking curve), averaged over the reflections of"
          "the sweep. The truth intensities are I = scale * |F|^2 (electrons,"
          "Lorentz corrected) with scale = intensity_scale / <|F|^2 / LP>,"
          "LP being the correction factor DIALS applies."
beam {
  wavelength = 0.0251
    .type = float(value_min=0)
    .help = "Wavelength (A); 0.0251 A corresponds to 200 kV electrons."
  centre = None
    .type = floats(size=2)
    .help = "Beam centre (fast, slow) in pixels. None: slightly off the"
            "middle of the detector, (0.5 N + 0.31, 0.5 N - 0.27)."
}
detector {
  distance = 2200
    .type = float(value_min=0)
    .help = "Sample-to-detector (virtual) distance in mm."
  pixel_size = None
    .type = float(value_min=0)
    .help = "Pixel size in mm. None: 0.0312 * 2048 / image_size, so that the"
            "detector always covers the angles of 2048 x 0.0312 mm pixels."
}
crystal {
  space_group = "P 43 21 2"
    .type = space_group
    .help = "Space group of the crystal."
  unit_cell = 67.3 67.3 101 90 90 90
    .type = unit_cell
    .help = "Unit cell (proteinase K)."
  atoms_per_asu = 300
    .type = int(value_min=1)
    .help = "Number of random C/N/O atoms in the asymmetric unit of the"
            "random protein-like structure."
  b_iso = 17
    .type = float(value_min=0)
    .help = "Isotropic B factor (A^2) of all atoms."
  mosaicity = 0.3
    .type = float(value_min=0)
    .help = "Standard deviation (degrees) of the Gaussian rocking curve, in"
            "DIALS' sigma_m convention; the width in phi is mosaicity/|zeta|."
}
spot_sigma = 1.2
  .type = float(value_min=0.1)
  .help = "Standard deviation (pixels) of the 2D Gaussian spot profile."
background {
  scale = 12
    .type = float(value_min=0)
    .help = "Resolution-dependent background at the direct beam position"
            "(electrons/pixel/image): scale * exp(-falloff / d^2)."
  falloff = 10
    .type = float(value_min=0)
    .help = "Falloff constant k (A^2) of the background scale*exp(-k/d^2)."
  constant = 0.3
    .type = float(value_min=0)
    .help = "Flat background added everywhere (electrons/pixel/image)."
}
camera {
  gain = 4.0
    .type = float(value_min=0)
    .help = "Camera gain, ADU per detected electron."
  read_noise = 3.0
    .type = float(value_min=0)
    .help = "Standard deviation of the Gaussian read noise (ADU)."
  dark_level = 100
    .type = float
    .help = "Mean dark level (ADU) of the raw frames; subtracted exactly"
            "(its per-pixel mean is known to the camera software)."
  dark_variation = 5
    .type = float(value_min=0)
    .help = "Standard deviation (ADU) of the fixed pattern of the dark frame"
            "around dark_level."
  gain_variation = 0.02
    .type = float(value_min=0)
    .help = "Standard deviation of the per-pixel gain (flat-field) image"
            "around 1."
}
output {
  directory = simulated
    .type = path
    .help = "Output directory; receives truncated/, truth/ and the truth"
            "intensities."
  prefix = sim
    .type = str
    .help = "File name prefix of the images: <prefix>_#####.img/.cbf"
  truth_images = True
    .type = bool
    .help = "Also write the signed truth images as CBF."
  nproc = 1
    .type = int(value_min=1)
    .help = "Number of processes rendering and writing images."
}
"""

# iotbx's converter registry adds the unit_cell and space_group types
phil_scope = libtbx.phil.parse(
    phil_str, converter_registry=iotbx.phil.default_converter_registry
)


# ---------------------------------------------------------------------------
# Data containers
# ---------------------------------------------------------------------------


@dataclass
class CameraCalibration:
    """Per-pixel calibration frames of the simulated camera (slow, fast)."""

    dark: np.ndarray  # mean dark frame (ADU), float64
    gain_image: np.ndarray  # flat-field gain applied by the camera, float64


@dataclass
class SimulationResult:
    """Everything needed to render the images of a simulated sweep.

    Images are rendered lazily (one 2048^2 sweep would not fit comfortably in
    memory): use :func:`expected_image`, :func:`render_truth` or
    :meth:`truth_image`.
    """

    params: object
    experiments: object  # dxtbx ExperimentList with one experiment
    reflections: object  # dials reflection table of simulated observations
    miller_array: object  # unique intensities I = scale |F|^2 (electrons)
    scale: float  # electrons per unit |F|^2 (LP corrected)
    background: np.ndarray  # expected background (electrons/pixel/image)
    calibration: CameraCalibration
    # rendering arrays, one entry per (reflection, image) pair, sorted by image
    pair_image: np.ndarray = field(repr=False, default=None)
    pair_refl: np.ndarray = field(repr=False, default=None)  # row in reflections
    pair_x: np.ndarray = field(repr=False, default=None)
    pair_y: np.ndarray = field(repr=False, default=None)
    pair_electrons: np.ndarray = field(repr=False, default=None)

    @property
    def image_size(self):
        return int(self.params.image_size)

    @property
    def n_images(self):
        return int(self.params.n_images)

    def truth_image(self, index):
        """Signed truth image (int32, shape (N, N)) of 0-based image index."""
        return render_truth(self, index)

    def truncated_image(self, index):
        """The truncated image (uint16) of 0-based image index."""
        return truncate(self.truth_image(index))


# ---------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------


def get_params(args=None):
    """Parse command-line style phil arguments (list of strings) and return
    the extracted parameters: the ``preset``'s values (PRESETS) first, then
    the arguments, so that a parameter given explicitly wins."""
    sources = []
    interp = phil_scope.command_line_argument_interpreter(home_scope="")
    for arg in args or []:
        if os.path.isfile(arg):
            sources.append(iotbx.phil.parse(file_name=arg))
        else:
            sources.append(interp.process(arg=arg))
    preset = phil_scope.fetch(sources=sources).extract().preset
    preset_source = libtbx.phil.parse(
        PRESETS[preset], converter_registry=iotbx.phil.default_converter_registry
    )
    return phil_scope.fetch(sources=[preset_source] + sources).extract()


def pixel_size_for(params):
    if params.detector.pixel_size is not None:
        return float(params.detector.pixel_size)
    return REFERENCE_PIXEL_SIZE * REFERENCE_IMAGE_SIZE / params.image_size


def beam_centre_px(params):
    if params.beam.centre is not None:
        return tuple(float(v) for v in params.beam.centre)
    n = params.image_size
    return (0.5 * n + 0.31, 0.5 * n - 0.27)


def _rng(params, *keys):
    """Independent numpy generator for a named purpose."""
    return np.random.default_rng([int(params.seed)] + [int(k) for k in keys])


# stream identifiers for _rng
_RNG_ORIENTATION, _RNG_CAMERA, _RNG_IMAGE = 1, 2, 3


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def random_rotation(rng):
    """Uniformly distributed random rotation matrix (3x3 numpy)."""
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def build_experiment(params):
    """ExperimentList (one experiment, no imageset) with the models that
    stock dxtbx reconstructs from the written SMV headers."""
    from cctbx import uctbx
    from dxtbx.model import (
        BeamFactory,
        Crystal,
        DetectorFactory,
        GoniometerFactory,
        ScanFactory,
    )
    from dxtbx.model.experiment_list import Experiment, ExperimentList
    from scitbx import matrix

    n = params.image_size
    px = pixel_size_for(params)
    bx, by = beam_centre_px(params)
    beam = BeamFactory.simple(params.beam.wavelength)
    detector = DetectorFactory.simple(
        "CCD",
        params.detector.distance,
        (bx * px, by * px),
        "+x",
        "-y",
        (px, px),
        (n, n),
        (-1, 65535),
        [],
        gain=params.camera.gain,
        pedestal=0.0,
    )
    goniometer = GoniometerFactory.single_axis()
    scan = ScanFactory.make_scan(
        image_range=(1, params.n_images),
        exposure_times=params.exposure_time,
        oscillation=(params.osc_start, params.osc_width),
        epochs={
            i + 1: EPOCH0 + i * params.exposure_time for i in range(params.n_images)
        },
        deg=True,
    )

    uc = uctbx.unit_cell(params.crystal.unit_cell.parameters())
    sg = params.crystal.space_group.group()
    if not sg.is_compatible_unit_cell(uc):
        raise ValueError("unit cell incompatible with the space group")
    O = matrix.sqr(uc.orthogonalization_matrix())
    U = matrix.sqr(
        tuple(random_rotation(_rng(params, _RNG_ORIENTATION)).ravel().tolist())
    )
    M = U * O
    real_a, real_b, real_c = (M.transpose().elems[3 * i : 3 * i + 3] for i in range(3))
    crystal = Crystal(real_a, real_b, real_c, space_group=sg)

    experiments = ExperimentList()
    experiments.append(
        Experiment(
            beam=beam,
            detector=detector,
            goniometer=goniometer,
            scan=scan,
            crystal=crystal,
        )
    )
    return experiments


def random_intensities(params):
    """Unique (asu) |F|^2 of a random C/N/O structure with electron
    scattering factors, as a cctbx miller array of intensities (unscaled)."""
    from cctbx import crystal as cctbx_crystal
    from cctbx.development import random_structure
    from scitbx.array_family import flex

    n = params.crystal.atoms_per_asu
    # roughly protein-like composition C:N:O = 64:17:19
    n_n = int(round(0.17 * n))
    n_o = int(round(0.19 * n))
    elements = ["N"] * n_n + ["O"] * n_o + ["C"] * (n - n_n - n_o)

    symmetry = cctbx_crystal.symmetry(
        unit_cell=params.crystal.unit_cell.parameters(),
        space_group_info=params.crystal.space_group,
    )
    state = random.getstate()
    try:
        random.seed(int(params.seed))
        flex.set_random_seed(int(params.seed))
        xrs = random_structure.xray_structure(
            space_group_info=symmetry.space_group_info(),
            unit_cell=symmetry.unit_cell(),
            elements=elements,
            min_distance=1.2,
            u_iso=params.crystal.b_iso / (8 * math.pi**2),
            use_u_iso=True,
        )
    finally:
        random.setstate(state)
    xrs.scattering_type_registry(table="electron", d_min=max(params.d_min, 0.25))
    d_min = params.d_min * 0.98  # margin for predicted d slightly below d_min
    f_calc = xrs.structure_factors(d_min=d_min, algorithm="fft").f_calc()
    return f_calc.as_intensity_array()


def detector_pixel_s2(experiment):
    """(1/d)^2 at the centre of every pixel (slow, fast) of panel 0."""
    panel = experiment.detector[0]
    beam = experiment.beam
    nf, ns = panel.get_image_size()
    px_f, px_s = panel.get_pixel_size()
    origin = np.array(panel.get_origin())
    fast = np.array(panel.get_fast_axis())
    slow = np.array(panel.get_slow_axis())
    f = (np.arange(nf) + 0.5) * px_f
    s = (np.arange(ns) + 0.5) * px_s
    lab = (
        origin[None, None, :]
        + s[:, None, None] * slow[None, None, :]
        + f[None, :, None] * fast[None, None, :]
    )
    s0 = np.array(beam.get_s0())
    k = 1.0 / beam.get_wavelength()
    s1 = lab / np.linalg.norm(lab, axis=2)[:, :, None] * k
    q = s1 - s0[None, None, :]
    return np.einsum("ijk,ijk->ij", q, q)


def expected_background(params, experiment):
    """Background in electrons/pixel/image, falling with resolution."""
    s2 = detector_pixel_s2(experiment)
    bg = params.background.constant + params.background.scale * np.exp(
        -params.background.falloff * s2
    )
    return bg


def camera_calibration(params):
    """Dark frame and gain image of the camera (deterministic given seed)."""
    n = params.image_size
    rng = _rng(params, _RNG_CAMERA)
    dark = params.camera.dark_level + params.camera.dark_variation * rng.normal(
        size=(n, n)
    )
    gain_image = 1.0 + params.camera.gain_variation * rng.normal(size=(n, n))
    np.clip(gain_image, 0.5, 1.5, out=gain_image)
    return CameraCalibration(dark=dark, gain_image=gain_image)


# ---------------------------------------------------------------------------
# Simulation
# ---------------------------------------------------------------------------


def predict_reflections(experiment, d_min, padding=0.0):
    """Scan-static prediction with DIALS' own predictor (as dials.integrate
    does it for a scan-static model); ``padding`` in degrees extends the
    predicted rotation range on both sides."""
    from dials.algorithms.spot_prediction import ScanStaticReflectionPredictor
    from dials.array_family import flex  # noqa: F401 (registers converters)

    predictor = ScanStaticReflectionPredictor(experiment, dmin=d_min, padding=padding)
    # dials' ReflectionPredictor uses this index generator for sweeps of more
    # than 50 images; positions are the same with either, but this one is
    # faster with a large padding and does not return reflections (slightly)
    # beyond d_min as for_ub does
    return predictor.for_ub_old_index_generator(experiment.crystal.get_A())


def lp_correction(experiment, s1):
    """DIALS' Lorentz-polarization correction factor (the factor
    dials.integrate multiplies summed intensities by; see
    dials/algorithms/integration/corrections.h) for s1 vectors (M, 3)."""
    beam = experiment.beam
    s0 = np.array(beam.get_s0())
    pn = np.array(beam.get_polarization_normal())
    pf = beam.get_polarization_fraction()
    m2 = np.array(experiment.goniometer.get_rotation_axis())
    s1 = np.asarray(s1, dtype=float).reshape(-1, 3)
    s1_len = np.linalg.norm(s1, axis=1)
    s0_len = np.linalg.norm(s0)
    L = np.abs(s1 @ np.cross(m2, s0)) / (s0_len * s1_len)
    P1 = (s1 @ pn) / s1_len
    P2 = (1.0 - 2.0 * pf) * (1.0 - P1 * P1)
    P3 = (s1 @ s0) / (s1_len * s0_len)
    P4 = pf * (1.0 + P3 * P3)
    return L / (P2 + P4)


def rocking_fractions(phi, zeta, mosaicity, params):
    """Fraction of each reflection recorded on each image of the sweep.

    ``phi``: predicted rotation angle of the centroid (radians), ``zeta``:
    DIALS' zeta factor, ``mosaicity``: sigma_m (radians).  The rocking curve
    is a Gaussian in phi of width mosaicity / |zeta| (DIALS' profile model),
    integrated over each image's oscillation range (continuous rotation).
    Returns (reflection index, 0-based image index, fraction) arrays for the
    (reflection, image) pairs within +-5 sigma, all images of the sweep."""
    osc = math.radians(params.osc_width)
    start = math.radians(params.osc_start)
    sigma_phi = np.maximum(mosaicity / np.abs(zeta), 1e-9)
    j0 = np.floor((phi - 5 * sigma_phi - start) / osc).astype(np.int64)
    j1 = np.floor((phi + 5 * sigma_phi - start) / osc).astype(np.int64)
    j0 = np.clip(j0, 0, params.n_images)
    j1 = np.clip(j1, -1, params.n_images - 1)
    span = np.maximum(j1 - j0 + 1, 0)
    ridx = np.repeat(np.arange(len(phi)), span)
    offs = np.arange(span.sum()) - np.repeat(np.cumsum(span) - span, span)
    image = j0[ridx] + offs
    a = start + image * osc
    frac = ndtr((a + osc - phi[ridx]) / sigma_phi[ridx]) - ndtr(
        (a - phi[ridx]) / sigma_phi[ridx]
    )
    return ridx, image, frac


def simulate_sweep(params):
    """Predict the reflections of the sweep with DIALS, give them intensities
    and split them over the images; returns a :class:`SimulationResult` from
    which the images are rendered (:func:`render_truth`) or written
    (:func:`write_sweep`)."""
    from cctbx import miller
    from dials.array_family import flex

    t0 = time.time()
    experiments = build_experiment(params)
    expt = experiments[0]

    # also reflections whose rocking curve reaches into the sweep from outside
    padding = 3 * params.crystal.mosaicity / ZETA_MIN
    refl = predict_reflections(expt, params.d_min, padding=padding)
    logger.info("%d reflections predicted (%.1f s)", len(refl), time.time() - t0)
    refl["id"] = flex.int(len(refl), 0)
    refl.compute_zeta(expt)
    refl = refl.select(flex.abs(refl["zeta"]) >= ZETA_MIN)

    # split each reflection over the images of the sweep; keep those recorded
    phi = np.array(refl["xyzcal.mm"].parts()[2])
    zeta = np.array(refl["zeta"])
    ridx, image, frac = rocking_fractions(
        phi, zeta, math.radians(params.crystal.mosaicity), params
    )
    recorded = np.bincount(ridx, weights=frac, minlength=len(refl))
    contributes = recorded > 1e-6
    new_index = np.cumsum(contributes) - 1
    refl = refl.select(flex.bool(contributes))
    refl["fraction_recorded"] = flex.double(recorded[contributes])
    keep = contributes[ridx]
    ridx, image, frac = new_index[ridx[keep]], image[keep], frac[keep]
    refl["d"] = expt.crystal.get_unit_cell().d(refl["miller_index"])
    refl.set_flags(flex.bool(len(refl), True), refl.flags.predicted)

    # |F|^2 of the unique reflections for every observation (symmetry
    # equivalents and repeats; systematic absences are not predicted)
    intensities = random_intensities(params).map_to_asu()
    obs_set = miller.set(
        intensities.crystal_symmetry(), refl["miller_index"], anomalous_flag=False
    ).map_to_asu()
    pairs = miller.match_multi_indices(
        miller_indices_unique=intensities.indices(),
        miller_indices=obs_set.indices(),
    ).pairs()
    f2 = np.zeros(len(refl))
    f2[np.array(pairs.column(1))] = np.array(intensities.data().select(pairs.column(0)))

    # the rotation-integrated (recorded) intensity is |F|^2 / LP; DIALS
    # multiplies summed intensities by the same LP factor
    lp = lp_correction(expt, np.array(refl["s1"]))
    refl["lp"] = flex.double(lp)
    mean_recorded = np.mean(f2 / lp) if len(refl) else 0.0
    scale = params.intensity_scale / mean_recorded if mean_recorded > 0 else 0.0
    true_e = f2 * scale  # electrons, fully recorded, LP corrected
    observed_e = true_e / lp  # electrons in the whole rocking curve
    # LP-corrected full intensity and the electrons recorded in the sweep:
    # what dials.integrate reports as intensity.sum.value * lp and
    # intensity.sum.value, given the gain in the image headers
    refl["intensity.true.corrected"] = flex.double(true_e)
    refl["intensity.true.value"] = flex.double(observed_e * refl["fraction_recorded"])

    electrons = frac * observed_e[ridx]
    keep = electrons > 1e-3
    order = np.argsort(image[keep], kind="stable")
    pair_refl = ridx[keep][order]
    x, y, _ = (np.array(c) for c in refl["xyzcal.px"].parts())

    truth_i = intensities.customized_copy(data=intensities.data() * scale)
    result = SimulationResult(
        params=params,
        experiments=experiments,
        reflections=refl,
        miller_array=truth_i.set_observation_type_xray_intensity(),
        scale=scale,
        background=expected_background(params, expt),
        calibration=camera_calibration(params),
        pair_image=image[keep][order],
        pair_refl=pair_refl,
        pair_x=x[pair_refl],
        pair_y=y[pair_refl],
        pair_electrons=electrons[keep][order],
    )
    logger.info(
        "%d reflections in the sweep, %d spot renderings, %.1f s",
        len(refl),
        len(result.pair_image),
        time.time() - t0,
    )
    return result


def render_spots(shape, x, y, electrons, sigma):
    """Expected electrons (float64 image of ``shape`` = (slow, fast)) of
    Gaussian spots centred at pixel coordinates (x, y) (DIALS convention:
    pixel i covers [i, i+1)), integrated exactly over each pixel, rendered
    only within a box of +-4 sigma."""
    ns, nf = shape
    image = np.zeros(ns * nf)
    if len(x) == 0:
        return image.reshape(shape)
    h = int(math.ceil(4 * sigma))
    box = np.arange(-h, h + 1)
    ix = np.floor(x).astype(np.int64)[:, None] + box[None, :]  # (K, B)
    iy = np.floor(y).astype(np.int64)[:, None] + box[None, :]
    inv = 1.0 / sigma
    px = ndtr((ix + 1 - x[:, None]) * inv) - ndtr((ix - x[:, None]) * inv)
    py = ndtr((iy + 1 - y[:, None]) * inv) - ndtr((iy - y[:, None]) * inv)
    px *= electrons[:, None]
    values = py[:, :, None] * px[:, None, :]  # (K, B, B)
    valid = ((iy >= 0) & (iy < ns))[:, :, None] & ((ix >= 0) & (ix < nf))[:, None, :]
    flat = iy[:, :, None] * nf + ix[:, None, :]
    image += np.bincount(flat[valid], weights=values[valid], minlength=ns * nf)
    return image.reshape(shape)


def expected_image(result, index):
    """Expected electrons per pixel (float64, (slow, fast)) of image
    ``index`` (0-based): background plus the recorded part of the spots."""
    lo, hi = np.searchsorted(result.pair_image, [index, index + 1])
    n = result.image_size
    spots = render_spots(
        (n, n),
        result.pair_x[lo:hi],
        result.pair_y[lo:hi],
        result.pair_electrons[lo:hi],
        result.params.spot_sigma,
    )
    return spots + result.background


def render_truth(result, index):
    """Signed truth image (int32) of image ``index`` (0-based): counting noise,
    camera read-out, dark subtraction and gain correction, rounded."""
    params = result.params
    cam = params.camera
    cal = result.calibration
    rng = _rng(params, _RNG_IMAGE, index)
    electrons = rng.poisson(expected_image(result, index)).astype(np.float64)
    raw = cal.dark + electrons * (cam.gain / cal.gain_image)
    if cam.read_noise > 0:
        raw += cam.read_noise * rng.standard_normal(size=raw.shape)
    raw = np.clip(np.rint(raw), 0, 65535)  # 16 bit ADC
    truth = np.rint((raw - cal.dark) * cal.gain_image)
    return truth.astype(np.int32)


def truncate(truth):
    """What the camera stores: negatives set to 0, clipped to 65535, uint16."""
    return np.clip(truth, 0, 65535).astype(np.uint16)


# ---------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------


def models_imageset(result, directory):
    """An imageset of the simulated models alone (no file is read), whose
    paths are the truncated images: what the shared image writers take."""
    from dxtbx.imageset import ImageSetFactory

    expt = result.experiments[0]
    template = image_paths(result.params, 0, directory)[0].replace("00001", "#####")
    return ImageSetFactory.make_sequence(
        template,
        list(range(1, result.n_images + 1)),
        beam=expt.beam,
        detector=expt.detector,
        goniometer=expt.goniometer,
        scan=expt.scan,
        check_format=False,
    )


def write_truth_intensities(result, path):
    """MTZ with the unique true intensities I = scale * |F|^2 in electrons
    (columns I and SIGI = 0): the Lorentz-corrected intensity of a fully
    recorded reflection, in the units dials.integrate reports for these
    images (dxtbx divides pixel values by the header's gain)."""
    import iotbx.mtz

    ma = result.miller_array
    ma = ma.customized_copy(sigmas=ma.data() * 0)
    mtz = ma.as_mtz_dataset(
        column_root_label="I", wavelength=result.params.beam.wavelength
    ).mtz_object()
    mtz.set_title("dials_truncfix simulated truth intensities (electrons)")
    with atomic_path(path) as tmp:
        mtz.write(tmp)
        # replace the creation time stamps of the column sources (written by
        # the first write of a new object) so that identical parameters give
        # identical files
        mtz = iotbx.mtz.object(tmp)
        for column in mtz.columns():
            column.set_source("devtools.simulate")
        mtz.write(tmp)


def write_truth_reflections(result, path):
    """The simulated observations as a DIALS reflection table."""
    with atomic_path(path) as tmp:
        result.reflections.as_file(tmp)


def write_truth_experiments(result, path):
    """The exact models (beam, detector, goniometer, scan, crystal)."""
    with atomic_path(path) as tmp:
        result.experiments.as_file(tmp)


def image_paths(params, index, directory=None):
    """(truncated SMV path, truth CBF path) of 0-based image ``index``."""
    directory = directory or params.output.directory
    name = "%s_%05d" % (params.output.prefix, index + 1)
    return (
        os.path.join(directory, "truncated", name + ".img"),
        os.path.join(directory, "truth", name + ".cbf"),
    )


def write_image(result, index, directory=None):
    """Render image ``index`` (0-based) and write its truncated SMV and (if
    output.truth_images) truth CBF files, with the shared writers of the
    corrected images."""
    params = result.params
    directory = directory or params.output.directory
    truth = render_truth(result, index)
    smv_path, cbf_path = image_paths(params, index, directory)
    expt = result.experiments[0]
    write_smv(
        smv_path,
        truncate(truth),
        **smv_header_items(expt.beam, expt.detector, expt.scan, index),
    )
    if params.output.truth_images:
        write_full_cbf(
            cbf_path,
            models_imageset(result, directory),
            index,
            [truth],
            [TRUTH_VALID_RANGE],
        )
    return index


_WORKER_RESULT = None


def _worker(args):
    index, directory = args
    return write_image(_WORKER_RESULT, index, directory)


def write_sweep(result, directory=None, nproc=None):
    """Write all images and truth files of ``result`` to ``directory``
    (default output.directory).  Returns the directory."""
    global _WORKER_RESULT
    params = result.params
    directory = directory or params.output.directory
    nproc = nproc or params.output.nproc
    os.makedirs(os.path.join(directory, "truncated"), exist_ok=True)
    if params.output.truth_images:
        os.makedirs(os.path.join(directory, "truth"), exist_ok=True)
    jobs = [(i, directory) for i in range(params.n_images)]
    if nproc > 1 and len(jobs) > 1:
        import multiprocessing

        _WORKER_RESULT = result
        try:
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(min(nproc, len(jobs))) as pool:
                for _ in pool.imap_unordered(_worker, jobs):
                    pass
        finally:
            _WORKER_RESULT = None
    else:
        for i, d in jobs:
            write_image(result, i, d)
    write_truth_intensities(result, os.path.join(directory, "truth_intensities.mtz"))
    write_truth_reflections(result, os.path.join(directory, "truth_reflections.refl"))
    write_truth_experiments(result, os.path.join(directory, "truth.expt"))
    meta = {
        # without output.directory and output.nproc, so that the file is
        # identical wherever and however the sweep is written
        "parameters": "\n".join(
            line
            for line in phil_scope.format(python_object=params).as_str().splitlines()
            if not line.strip().startswith(("directory =", "nproc ="))
        ),
        "scale_electrons_per_F2": result.scale,
        "gain_adu_per_electron": params.camera.gain,
        "pixel_size_mm": pixel_size_for(params),
        "beam_centre_px": beam_centre_px(params),
        "n_reflections": len(result.reflections),
        "truth_valid_range": list(TRUTH_VALID_RANGE),
        "crystal_A_matrix": list(result.experiments[0].crystal.get_A()),
        "intensity_units": "electrons (image pixel values are ADU = gain * "
        "electrons; dxtbx divides by the header gain). truth_intensities.mtz I "
        "and truth_reflections.refl intensity.true.corrected: Lorentz-corrected "
        "full intensity scale*|F|^2; intensity.true.value: expected electrons "
        "recorded within the sweep, before the LP correction",
    }
    atomic_write_bytes(
        os.path.join(directory, "simulation.json"),
        [(json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()],
    )
    return directory


def run(args=None):
    """Command-line entry: ``python -m devtools.simulate [phil]``."""
    if args is None:
        args = sys.argv[1:]
    if any(a in ("-h", "--help", "-c", "--show-config") for a in args):
        print(__doc__)
        print(phil_scope.as_str(attributes_level=1))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = get_params(args)
    t0 = time.time()
    result = simulate_sweep(params)
    directory = write_sweep(result)
    logger.info(
        "Wrote %d images to %s in %.1f s", params.n_images, directory, time.time() - t0
    )
    return 0


if __name__ == "__main__":
    sys.exit(run())
