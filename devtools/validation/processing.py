"""Processing one dataset from the simulated images to scaled, exported
intensities (dials.import to dials.export), and what the statistics read
back from a processed dataset besides the intensities."""

from __future__ import annotations

import json
import logging
import os
import time

from devtools import simulate as simulator
from devtools.validation.datasets import CORRECTION_ARGUMENTS, DATASETS, ON_READ
from devtools.validation.lanes import StepError, without_truncfix_variable
from devtools.validation.runner import run_step
from dials_truncfix.program.record import sequences
from dials_truncfix.settings import ENVIRONMENT_VARIABLE

logger = logging.getLogger(__name__)


def simulation_arguments(
    directory, image_size=2048, n_images=50, seed=1, nproc=2, preset="strong"
):
    """The devtools.simulate arguments of one crystal's sweep (the report
    quotes them without the first and the last: directory and nproc)."""
    return [
        "output.directory=%s" % directory,
        "preset=%s" % preset,
        "image_size=%d" % image_size,
        "n_images=%d" % n_images,
        "seed=%d" % seed,
        "output.nproc=%d" % nproc,
    ]


def simulate(params):
    """Write the sweep of the devtools.simulate parameters ``params`` (phil
    extract) to its output directory."""
    start = time.time()
    simulator.write_sweep(simulator.simulate_sweep(params))
    logger.info(
        "Simulated %d %dx%d images (preset=%s) in %s (%.1f s)",
        params.n_images,
        params.image_size,
        params.image_size,
        params.preset,
        params.output.directory,
        time.time() - start,
    )


def simulation_matches(sim_dir, params):
    """Whether ``sim_dir`` holds a finished simulation with ``params``
    (simulation.json is written last and records the parameters)."""
    path = os.path.join(sim_dir, "simulation.json")
    if not os.path.exists(path):
        return False
    with open(path) as fh:
        recorded = json.load(fh).get("parameters")
    wanted = "\n".join(
        line
        for line in simulator.phil_scope.format(python_object=params)
        .as_str()
        .splitlines()
        if not line.strip().startswith(("directory =", "nproc ="))
    )
    return recorded == wanted


def _images(directory, dataset):
    """The image files of ``dataset``: the truth CBFs or the truncated SMVs."""
    sub = "truth" if dataset == "truth" else "truncated"
    ext = ".cbf" if dataset == "truth" else ".img"
    folder = os.path.join(directory, sub)
    return sorted(
        os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(ext)
    )


def symmetry_arguments(sim_params):
    """dials.index arguments fixing the simulation's space group and cell."""
    cell = sim_params.crystal.unit_cell.parameters()
    sg = sim_params.crystal.space_group.group().type().lookup_symbol().replace(" ", "")
    return ["space_group=%s" % sg, "unit_cell=%s" % ",".join("%g" % p for p in cell)]


#: the outputs of process() the statistics read
OUTPUTS = ("integrated.refl", "scaled.expt", "scaled.refl", "scaled.mtz")

#: what a dataset's outputs depend on besides its lane, dataset, simulation
#: and d_min (in validate.json): raise it when process() changes
PROTOCOL = 2


def scale_d_min(experiments, sim_params, d_min):
    """The common resolution limit ``d_min`` (in the simulation's true cell)
    expressed in the refined cell of ``experiments``: d_min (V_refined /
    V_true)^(1/3).  A short sweep can refine the cell a few per cent off
    (the detector distance absorbing it: 16 images of 0.36 deg gave 65.0
    instead of 67.3 A), and dials.scale d_min=1.3 in that cell would cut
    reflections whose true d lies above 1.3 A; so every dataset keeps the
    same reflections whatever its refined cell."""
    with open(experiments) as fh:
        crystal = json.load(fh)["crystal"][0]
    a, b, c = (crystal["real_space_%s" % k] for k in "abc")
    cross = (
        b[1] * c[2] - b[2] * c[1],
        b[2] * c[0] - b[0] * c[2],
        b[0] * c[1] - b[1] * c[0],
    )
    volume = abs(sum(x * y for x, y in zip(a, cross)))
    return d_min * (volume / sim_params.crystal.unit_cell.volume()) ** (1.0 / 3.0)


#: dials.find_spots parameters of a crystal (devtools.simulate preset) beyond
#: DIALS' defaults, the same for each of its datasets, the truth included:
#: the default dispersion threshold assumes Poisson noise and flags most
#: pixels of a read-noise-dominated camera as strong (over DIALS' limit of
#: strong pixels, on the untruncated truth as well), so that camera's sweep
#: is spot-found as electron-diffraction users do, with the radial-profile
#: threshold
SPOT_FINDING_ARGUMENTS = {
    "readnoise": ("spotfinder.threshold.algorithm=radial_profile",)
}


def process(
    dataset_dir, dataset, sim_dir, sim_params, d_min, nproc=2, log=None, env=None
):
    """Process one ``dataset`` (one of DATASETS) of the simulation in
    ``sim_dir`` inside ``dataset_dir``, with the programs of ``env`` (default:
    this environment without DIALS_TRUNCFIX).  Returns a dict of the output
    paths (integrated.refl, scaled.expt/refl, scaled.mtz)."""
    if dataset not in DATASETS:
        raise ValueError("unknown dataset %r" % dataset)
    env = without_truncfix_variable(os.environ if env is None else env)
    os.makedirs(dataset_dir, exist_ok=True)
    images = _images(sim_dir, dataset)
    if not images:
        raise StepError("no %s images in %s" % (dataset, sim_dir))
    # the image directory holds only the images of this sweep
    if dataset == ON_READ:
        run_step(
            ["dials.import", os.path.dirname(images[0])],
            dataset_dir,
            dict(env, **{ENVIRONMENT_VARIABLE: "1"}),
            log,
            "imported.expt",
            show_env=(ENVIRONMENT_VARIABLE,),
        )
    else:
        run_step(
            ["dials.import", os.path.dirname(images[0])],
            dataset_dir,
            env,
            log,
            "imported.expt",
        )
    experiments = "imported.expt"
    if dataset in CORRECTION_ARGUMENTS:
        run_step(
            [
                "dials.correct_truncation",
                "imported.expt",
                "nproc=%d" % nproc,
                *CORRECTION_ARGUMENTS[dataset],
            ],
            dataset_dir,
            env,
            log,
            "corrected.expt",
        )
        experiments = "corrected.expt"
    run_step(
        [
            "dials.find_spots",
            experiments,
            "nproc=%d" % nproc,
            *SPOT_FINDING_ARGUMENTS.get(sim_params.preset, ()),
        ],
        dataset_dir,
        env,
        log,
        "strong.refl",
    )
    run_step(
        ["dials.index", experiments, "strong.refl", *symmetry_arguments(sim_params)],
        dataset_dir,
        env,
        log,
        "indexed.expt",
    )
    run_step(
        ["dials.refine", "indexed.expt", "indexed.refl"],
        dataset_dir,
        env,
        log,
        "refined.expt",
    )
    run_step(
        ["dials.integrate", "refined.expt", "refined.refl", "nproc=%d" % nproc],
        dataset_dir,
        env,
        log,
        "integrated.refl",
    )
    run_step(
        [
            "dials.scale",
            "integrated.expt",
            "integrated.refl",
            "d_min=%.4f"
            % scale_d_min(
                os.path.join(dataset_dir, "integrated.expt"), sim_params, d_min
            ),
            "anomalous=False",
        ],
        dataset_dir,
        env,
        log,
        "scaled.refl",
    )
    run_step(
        [
            "dials.export",
            "scaled.expt",
            "scaled.refl",
            "format=mtz",
            "mtz.hklout=scaled.mtz",
        ],
        dataset_dir,
        env,
        log,
        "scaled.mtz",
    )
    return {name: os.path.join(dataset_dir, name) for name in OUTPUTS}


def imported_trusted_range(dataset_dir):
    """The trusted range of the first panel as dials.import recorded it."""
    path = os.path.join(dataset_dir, "imported.expt")
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        detectors = json.load(fh).get("detector") or [{}]
    panels = detectors[0].get("panels") or [{}]
    return panels[0].get("trusted_range")


def correction_summary(dataset_dir):
    """Fits of the dials.correct_truncation run in ``dataset_dir`` (None
    without one): regions with zero pixels, fits that failed (their zeros
    left unchanged), fits pooled with a neighbouring region, pixels changed."""
    path = os.path.join(dataset_dir, "dials.correct_truncation.json")
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        record = json.load(fh)
    out = {
        "images": 0,
        "regions": 0,
        "failed": 0,
        "pooled": 0,
        "n_changed": 0,
        "n_zero": 0,
    }
    for sequence in sequences(record):
        for image in sequence["images"]:
            out["images"] += 1
            out["n_changed"] += image.get("n_changed", 0)
            for region in image["shells"]:
                if not region.get("n_zero"):
                    continue
                out["regions"] += 1
                out["n_zero"] += region["n_zero"]
                if str(region.get("status", "")).startswith("fit failed"):
                    out["failed"] += 1
                elif len(region.get("fitted_regions") or ()) > 1:
                    out["pooled"] += 1
    out["parameters"] = {
        k: record["parameters"].get(k)
        for k in ("assignment", "n_shells", "n_sectors", "likelihood")
    }
    return out
