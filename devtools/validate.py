"""Validation against a simulated truth (issues 5, 8 and 12; behind
``make validate``).

Two simulated MicroED sweeps (:mod:`devtools.simulate`, ``preset=strong``
and ``preset=weak``: the same crystal with a tenth of the flux) are each
processed in several versions ("datasets", the columns of the report), with
identical DIALS parameters, by two installations of DIALS ("lanes"):

    lane debian   Debian's DIALS 3.12 (/usr/bin/dials.*)
      truth         the signed images before truncation (CBF)
      truncated     the same images with negative pixels set to 0 (SMV)
      distribution  the truncated images after dials.correct_truncation
                    truncfix.assignment=distribution (CBF output)
      expectation   the same with truncfix.assignment=expectation
      sectors       the same with truncfix.assignment=expectation
                    truncfix.n_sectors=8 (regions = shell x sector)
    lane current  current DIALS (3.25.dev, a virtualenv built by
                  ``make setup-current``; its current-dials-env.sh)
      truth         as above
      truncated     as above: current dxtbx masks every zero pixel of the
                    truncated SMVs (what current users get today)
      on_read       the truncated images imported with DIALS_TRUNCFIX=1
                    (correction on read, default parameters)

through ``dials.import``, ``dials.find_spots``, ``dials.index`` (known space
group and unit cell), ``dials.refine``, ``dials.integrate``, ``dials.scale``
(``anomalous=False``, a common ``d_min``: see scale_d_min) and ``dials.export``.  Each lane runs
its own programs (the subprocess environment is built from the lane: Debian
= /usr/bin first on PATH and no LD_PRELOAD; current = what the venv's
current-dials-env.sh sets, except that the driver's PYTHONPATH is passed on,
so that a checkout given by PYTHONPATH is the plugin every lane imports);
the statistics are computed by the interpreter running this module.  It
then writes, per crystal, a table like Table 1 of Hattne et al. (2016) --
merging statistics overall and in the highest-resolution shell -- plus what
only a simulation can show: the correlation of the merged intensities with
the true intensities and the mean normalised error of the weak reflections,
per resolution shell; the share of the truncation's effect that every
corrected column removes (against the truncated column of its own lane);
which assignment mode the evidence favours; and whether regions smaller
than annuli (azimuthal sectors) help.

    /usr/bin/python3 -m devtools.validate --output validation.md \\
        [--workdir validation_work] [--image-size 2048] [--n-images 90] \\
        [--seed 1] [--nproc 2] [--d-min 1.3] [--crystals strong weak] \\
        [--lanes debian current] [--datasets truth truncated ...] \\
        [--current-venv ~/.cache/dials-truncfix/current-dials] [--reuse]

(defaults: 2048 x 2048 pixels, 90 images, both crystals, both lanes, every
column of each lane; ``make validate`` runs it with ``--output
benchmarks/results/validation.md``).  A third lane, ``this``, runs the
programs found on PATH as they are (the CI test uses it: there PATH holds
the programs of the interpreter running pytest).

Definitions (also written into the report):

* All statistics use the simulation's known crystal symmetry (cell and space
  group), so that all datasets are binned identically, and the same
  resolution range ``d_max``-``d_min``.
* Merging statistics: ``iotbx.merging_statistics`` on the unmerged scaled
  intensities exported by ``dials.export`` with the settings of dials.scale
  (no sigma filtering, ``use_internal_variance=False``), 20 shells of equal
  reciprocal volume between the common d_max and d_min (the same shells for
  every dataset; a shell without data has no statistics); the
  highest-resolution shell is the last of them.
* Truth comparison: merged intensities (``merge_equivalents``) matched by
  Miller index to ``truth_intensities.mtz``.  One scale factor ``k`` is fitted
  by least squares (I_obs ~ k I_true) on all matched reflections; the
  normalised error is z = (I_obs - k I_true) / sigma(I_obs).  *Weak*
  reflections are those whose true intensity lies below the median true
  intensity of all unique truth reflections of their resolution shell (a
  definition that depends on the truth only, so it selects the same
  reflections in every dataset).  For an unbiased dataset with correct
  sigmas <z> of the weak reflections is ~0 and rms(z) ~1.  z depends on the
  error model dials.scale fits to each dataset; the weak relative bias
  <I - k I_true> / <k I_true> does not.
* Gap removed: 1 - |corrected - truth| / |truncated - truth|, with the truth
  and truncated columns of the corrected column's own lane.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

ENVIRONMENT_VARIABLE = "DIALS_TRUNCFIX"

CRYSTALS = ("strong", "weak")
LANES = ("debian", "current")
#: the columns of each lane, in the order of the report
LANE_DATASETS = {
    "debian": ("truth", "truncated", "distribution", "expectation", "sectors"),
    "current": ("truth", "truncated", "on_read"),
}
#: every kind of dataset (the lane ``this`` runs any of them)
DATASETS = ("truth", "truncated", "distribution", "expectation", "sectors", "on_read")
#: the uncorrected datasets; every other one is a corrected version of
#: ``truncated``
REFERENCES = ("truth", "truncated")
#: the assignment modes of the correction (truncfix.assignment)
ASSIGNMENTS = ("distribution", "expectation")
#: the region experiment: sectors per shell, and the assignment mode it
#: uses (expectation gives every zero pixel of a region the region's own
#: conditional mean, so it is the mode in which the size of the regions
#: matters most directly); it is compared with the column of that mode
N_SECTORS = 8
SECTORS_ASSIGNMENT = "expectation"
#: dials.correct_truncation arguments of the corrected datasets written as
#: images (CBF output, the program's default)
CORRECTION_ARGUMENTS = {
    "distribution": ("truncfix.assignment=distribution",),
    "expectation": ("truncfix.assignment=expectation",),
    "sectors": ("truncfix.assignment=%s" % SECTORS_ASSIGNMENT, "truncfix.n_sectors=%d" % N_SECTORS),
}
#: the dataset corrected on read: DIALS_TRUNCFIX=1 exported for dials.import
ON_READ = "on_read"

DEFAULT_CURRENT_VENV = os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
    "dials-truncfix",
    "current-dials",
)

#: the DIALS programs a lane runs; all must belong to one interpreter
PROGRAMS = (
    "dials.import",
    "dials.find_spots",
    "dials.index",
    "dials.refine",
    "dials.integrate",
    "dials.scale",
    "dials.export",
    "dials.correct_truncation",
)

#: Number of shells of the merging statistics (as in the dials.scale summary)
MERGING_SHELLS = 20
#: Number of shells of the truth comparison
TRUTH_SHELLS = 8
#: The outer truth-comparison shells over which the bias removal is judged
#: (the truncation bias grows with resolution and is negligible below
#: ~1.8 A; with 8 shells to 1.3 A these are 1.64-1.30 A)
OUTER = 4


class StepError(RuntimeError):
    """A DIALS program failed (or a lane cannot run)."""


def default_assignment():
    """The default of truncfix.assignment (dials_truncfix.phil)."""
    from dials_truncfix.phil import correction_phil_scope

    return correction_phil_scope.extract().truncfix.assignment


def lane_datasets(lane, datasets=None):
    """The columns of ``lane``: its own (LANE_DATASETS; for ``this``: truth,
    truncated and the default assignment), or those of ``datasets`` it
    has (``this``: all of ``datasets``)."""
    own = LANE_DATASETS.get(lane, ("truth", "truncated", default_assignment()))
    if datasets is None:
        return tuple(own)
    if lane not in LANE_DATASETS:
        return tuple(datasets)
    return tuple(d for d in own if d in datasets)


# ---------------------------------------------------------------------------
# lanes: which DIALS runs the programs


def _without_variable(env):
    return {k: v for k, v in env.items() if k != ENVIRONMENT_VARIABLE}


#: variables that sourcing a script in bash sets by itself
_SHELL_VARIABLES = ("_", "SHLVL", "PWD", "OLDPWD")


def sourced_environment(script, base):
    """``base`` changed as ``. script`` in bash changes it."""
    result = subprocess.run(
        ["bash", "-c", '. "$1" >/dev/null && env -0', "bash", script], env=base, capture_output=True
    )
    if result.returncode:
        raise StepError("sourcing %s failed: %s" % (script, result.stderr.decode(errors="replace").strip()))
    sourced = dict(item.split("=", 1) for item in result.stdout.decode().split("\0") if "=" in item)
    env = dict(base)
    for key, value in sourced.items():
        if key not in _SHELL_VARIABLES:
            env[key] = value
    for key in base:
        if key not in sourced and key not in _SHELL_VARIABLES:
            del env[key]
    return env


def lane_environment(lane, current_venv=DEFAULT_CURRENT_VENV, base=None):
    """The environment of the programs of ``lane``: debian = /usr/bin first
    on PATH and no LD_PRELOAD; current = what ``current-dials-env.sh`` of
    ``current_venv`` sets, with the PYTHONPATH of ``base`` kept (the script
    unsets it; kept so that the plugin under test is the same in every
    lane); this = ``base`` as it is.  Never DIALS_TRUNCFIX (it is added for
    the dials.import of the on-read dataset only)."""
    base = _without_variable(os.environ if base is None else base)
    if lane == "this":
        return base
    if lane == "debian":
        env = {k: v for k, v in base.items() if k != "LD_PRELOAD"}
        env["PATH"] = os.pathsep.join(["/usr/bin"] + [p for p in base.get("PATH", "").split(os.pathsep) if p])
        return env
    if lane == "current":
        script = os.path.join(current_venv, "bin", "current-dials-env.sh")
        if not os.path.isfile(script):
            raise StepError("no %s: build current DIALS first (make setup-current)" % script)
        env = _without_variable(sourced_environment(script, base))
        if "PYTHONPATH" in base:
            env["PYTHONPATH"] = base["PYTHONPATH"]
        return env
    raise ValueError("unknown lane %r" % lane)


def _interpreter(script):
    with open(script, "rb") as fh:
        first = fh.readline().decode(errors="replace").strip()
    return first[2:].split()[0] if first.startswith("#!") else None


def same_interpreter(a, b):
    """Whether two interpreter paths are one Python environment: compared by
    their resolved directories, since a virtualenv's python is a symlink to
    the base interpreter that realpath would make identical to it."""
    return bool(a and b) and os.path.realpath(os.path.dirname(a)) == os.path.realpath(os.path.dirname(b))


def program_interpreters(search_path=None):
    """{program: (its path, the interpreter of its #! line)} for PROGRAMS on
    ``search_path`` (default: PATH); None for what is missing."""
    paths = {name: shutil.which(name, path=search_path) for name in PROGRAMS}
    return {name: (path, path and _interpreter(path)) for name, path in paths.items()}


_PROBE = """
import importlib.metadata as m, json, os, sys
import dials_truncfix
from dials.util.version import dials_version
from dials_truncfix.compat import trusted_range_is_inclusive
out = {"python": sys.executable, "dials_version": dials_version(),
       "plugin": os.path.dirname(os.path.realpath(dials_truncfix.__file__)),
       "plugin_version": dials_truncfix.__version__,
       "trusted_range_inclusive": trusted_range_is_inclusive()}
for name in ("dials", "dxtbx"):
    try:
        out[name] = m.version(name)
    except Exception:
        out[name] = None
print(json.dumps(out))
"""


def describe_lane(lane, env):
    """What ``lane`` runs: its programs' interpreter, DIALS and dxtbx versions
    and the plugin it imports.  Every program must be on the lane's PATH and
    run the same interpreter (else StepError)."""
    found = program_interpreters(env.get("PATH", ""))
    paths = {name: path for name, (path, _) in found.items()}
    interpreters = {name: interpreter for name, (_, interpreter) in found.items()}
    python = interpreters["dials.import"]
    wrong = [
        "%s: %s (runs %s)" % (name, paths[name] or "not on PATH", interpreters[name])
        for name in PROGRAMS
        if not same_interpreter(interpreters[name], python)
    ]
    if wrong:
        raise StepError("lane %s: programs of different interpreters:\n  %s" % (lane, "\n  ".join(wrong)))
    result = subprocess.run([python, "-c", _PROBE], env=env, capture_output=True, text=True)
    if result.returncode:
        raise StepError("lane %s: %s cannot import DIALS and the plugin:\n%s" % (lane, python, result.stderr[-2000:]))
    info = json.loads(result.stdout.strip().splitlines()[-1])
    # Debian's DIALS names its version in dials_version() ("DIALS 3.12";
    # its package metadata says 3.9.dev0), current DIALS only in its
    # metadata (dials_version() is "DIALS 3.dev")
    if not re.search(r"\d+\.\d+", info["dials_version"]) and info["dials"]:
        info["dials_version"] = "DIALS " + info["dials"]
    info["lane"] = lane
    info["programs"] = os.path.dirname(paths["dials.import"])
    info["label"] = {"debian": "Debian", "current": "current"}.get(lane, "PATH") + " " + info["dials_version"]
    return info


def column_label(lane, dataset, lanes):
    """The report's name of a column: the dataset, prefixed by the DIALS
    version of its lane when the report has several lanes."""
    name = dataset.replace("_", " ")
    if len(lanes) < 2:
        return name
    return "%s %s" % (short_version(lanes[lane]), name)


def short_version(lane_info):
    """'3.12', '3.25' from the lane's DIALS version."""
    text = lane_info["dials_version"].replace("DIALS", "").strip()
    parts = text.split(".")
    return ".".join(parts[:2]) if len(parts) >= 2 else text


# ---------------------------------------------------------------------------
# running programs


def run_step(args, cwd, env, log=None, check_output=None, show_env=()):
    """Run a DIALS program in ``cwd`` with ``env``; log the command line
    (with the variables named in ``show_env``); raise StepError with the tail
    of its log if it fails or ``check_output`` is missing."""
    prefix = "".join("%s=%s " % (k, shlex.quote(env[k])) for k in show_env)
    line = "(cd %s && %s%s)" % (shlex.quote(cwd), prefix, " ".join(shlex.quote(a) for a in args))
    print("$ " + line, flush=True)
    if log is not None:
        log.write(line + "\n")
        log.flush()
    start = time.time()
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.time() - start
    missing = check_output and not os.path.exists(os.path.join(cwd, check_output))
    if result.returncode or missing:
        program_log = os.path.join(cwd, os.path.basename(args[0]) + ".log")
        text = result.stdout + "\n" + result.stderr
        if os.path.exists(program_log):
            with open(program_log) as fh:
                text = fh.read() + "\n" + result.stderr
        tail = "\n".join(text.strip().splitlines()[-30:])
        why = "exit status %d" % result.returncode if result.returncode else "no %s" % check_output
        raise StepError("%s failed (%s) in %s:\n%s" % (args[0], why, cwd, tail))
    print("  (%.1f s)" % elapsed, flush=True)
    return result.stdout


# ---------------------------------------------------------------------------
# simulation and processing


def simulation_arguments(directory, image_size=2048, n_images=50, seed=1, nproc=2, extra=(), preset="strong"):
    return [
        "output.directory=%s" % directory,
        "preset=%s" % preset,
        "image_size=%d" % image_size,
        "n_images=%d" % n_images,
        "seed=%d" % seed,
        "output.nproc=%d" % nproc,
        *extra,
    ]


def simulate(directory, image_size=2048, n_images=50, seed=1, nproc=2, extra=(), preset="strong"):
    """Write the simulated sweep to ``directory``; returns the simulate
    parameters (phil extract)."""
    from devtools import simulate as sim

    params = sim.get_params(simulation_arguments(directory, image_size, n_images, seed, nproc, extra, preset))
    start = time.time()
    result = sim.simulate_sweep(params)
    sim.write_sweep(result)
    print(
        "Simulated %d %dx%d images (preset=%s) in %s (%.1f s)"
        % (n_images, image_size, image_size, preset, directory, time.time() - start),
        flush=True,
    )
    return params


def _simulation_matches(sim_dir, params):
    """Whether ``sim_dir`` holds a finished simulation with ``params``
    (simulation.json is written last and records the parameters)."""
    from devtools import simulate as sim

    path = os.path.join(sim_dir, "simulation.json")
    if not os.path.exists(path):
        return False
    with open(path) as fh:
        recorded = json.load(fh).get("parameters")
    wanted = "\n".join(
        line
        for line in sim.phil_scope.format(python_object=params).as_str().splitlines()
        if not line.strip().startswith(("directory =", "nproc ="))
    )
    return recorded == wanted


def _images(directory, dataset):
    sub = "truth" if dataset == "truth" else "truncated"
    ext = ".cbf" if dataset == "truth" else ".img"
    folder = os.path.join(directory, sub)
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(ext))


def _symmetry_arguments(sim_params):
    cell = sim_params.crystal.unit_cell.parameters()
    sg = sim_params.crystal.space_group.group().type().lookup_symbol().replace(" ", "")
    return ["space_group=%s" % sg, "unit_cell=%s" % ",".join("%g" % p for p in cell)]


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
    cross = (b[1] * c[2] - b[2] * c[1], b[2] * c[0] - b[0] * c[2], b[0] * c[1] - b[1] * c[0])
    volume = abs(sum(x * y for x, y in zip(a, cross)))
    return d_min * (volume / sim_params.crystal.unit_cell.volume()) ** (1.0 / 3.0)


def process(dataset_dir, dataset, sim_dir, sim_params, d_min, nproc=2, log=None, env=None):
    """Process one ``dataset`` (one of DATASETS) of the simulation in
    ``sim_dir`` inside ``dataset_dir``, with the programs of ``env`` (default:
    this environment without DIALS_TRUNCFIX).  Returns a dict of the output
    paths (integrated.refl, scaled.expt/refl, scaled.mtz)."""
    if dataset not in DATASETS:
        raise ValueError("unknown dataset %r" % dataset)
    env = _without_variable(os.environ if env is None else env)
    os.makedirs(dataset_dir, exist_ok=True)
    images = _images(sim_dir, dataset)
    if not images:
        raise StepError("no %s images in %s" % (dataset, sim_dir))
    # the image directory holds only the images of this sweep
    if dataset == ON_READ:
        run_step(
            ["dials.import", os.path.dirname(images[0])], dataset_dir, dict(env, **{ENVIRONMENT_VARIABLE: "1"}),
            log, "imported.expt", show_env=(ENVIRONMENT_VARIABLE,),
        )
    else:
        run_step(["dials.import", os.path.dirname(images[0])], dataset_dir, env, log, "imported.expt")
    experiments = "imported.expt"
    if dataset in CORRECTION_ARGUMENTS:
        run_step(
            ["dials.correct_truncation", "imported.expt", "nproc=%d" % nproc, *CORRECTION_ARGUMENTS[dataset]],
            dataset_dir,
            env,
            log,
            "corrected.expt",
        )
        experiments = "corrected.expt"
    run_step(["dials.find_spots", experiments, "nproc=%d" % nproc], dataset_dir, env, log, "strong.refl")
    run_step(
        ["dials.index", experiments, "strong.refl", *_symmetry_arguments(sim_params)],
        dataset_dir,
        env,
        log,
        "indexed.expt",
    )
    run_step(["dials.refine", "indexed.expt", "indexed.refl"], dataset_dir, env, log, "refined.expt")
    run_step(
        ["dials.integrate", "refined.expt", "refined.refl", "nproc=%d" % nproc],
        dataset_dir,
        env,
        log,
        "integrated.refl",
    )
    run_step(
        ["dials.scale", "integrated.expt", "integrated.refl",
         "d_min=%.4f" % scale_d_min(os.path.join(dataset_dir, "integrated.expt"), sim_params, d_min), "anomalous=False"],
        dataset_dir,
        env,
        log,
        "scaled.refl",
    )
    run_step(
        ["dials.export", "scaled.expt", "scaled.refl", "format=mtz", "mtz.hklout=scaled.mtz"],
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
    out = {"images": 0, "regions": 0, "failed": 0, "pooled": 0, "n_changed": 0, "n_zero": 0}
    for sweep in record["sweeps"]:
        for image in sweep["images"]:
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
        k: record["parameters"].get(k) for k in ("assignment", "n_shells", "n_sectors", "likelihood")
    }
    return out


# ---------------------------------------------------------------------------
# statistics


def _truth_array(truth_mtz):
    import iotbx.mtz

    for array in iotbx.mtz.object(truth_mtz).as_miller_arrays():
        if array.is_xray_intensity_array() or array.info().label_string().startswith("I"):
            array = array.customized_copy(sigmas=None).set_observation_type_xray_intensity()
            return array.map_to_asu().merge_equivalents().array()
    raise ValueError("no intensity array in %s" % truth_mtz)


def _unmerged_intensities(scaled_mtz, symmetry):
    """Unmerged scaled intensities of a dials.export MTZ, with the known
    crystal symmetry."""
    import iotbx.mtz

    arrays = iotbx.mtz.object(scaled_mtz).as_miller_arrays(merge_equivalents=False)
    for array in arrays:
        labels = array.info().labels
        if labels and labels[0] == "I" and array.sigmas() is not None:
            array = array.customized_copy(crystal_symmetry=symmetry).set_observation_type_xray_intensity()
            return array.map_to_asu()
    raise ValueError("no unmerged I/SIGI in %s" % scaled_mtz)


_COUNT_INTEGRATED = """
import json, sys
from dials.array_family import flex
table = flex.reflection_table.from_file(sys.argv[1])
print(json.dumps({
    "integrated_sum": int(table.get_flags(table.flags.integrated_sum).count(True)),
    "integrated_prf": int(table.get_flags(table.flags.integrated_prf).count(True)),
    "bad_foreground": int(table.get_flags(table.flags.foreground_includes_bad_pixels).count(True)),
}))
"""


def count_integrated(integrated_refl, python=None, env=None):
    """Numbers of reflections with the integrated_sum and integrated_prf
    flags and with masked pixels in their foreground, read by ``python`` (the interpreter of the DIALS that wrote the
    file: DIALS 3.12 cannot read the reflection files of current DIALS) or
    by this interpreter."""
    if python is None:
        python = sys.executable
    result = subprocess.run([python, "-c", _COUNT_INTEGRATED, integrated_refl], env=env, capture_output=True, text=True)
    if result.returncode:
        raise StepError("%s cannot read %s:\n%s" % (python, integrated_refl, result.stderr[-2000:]))
    return json.loads(result.stdout.strip().splitlines()[-1])


def scaling_model(scaled_expt):
    """What dials.scale refined that the comparison depends on: the spread
    (max - min) of the decay component's parameters (a relative B per
    rotation interval; an ill-determined decay tilts intensities against
    resolution) and the error model parameters (a, b), from the JSON of
    ``scaled_expt`` (readable whichever DIALS wrote it)."""
    with open(scaled_expt) as fh:
        model = (json.load(fh).get("scaling_model") or [{}])[0]
    decay = model.get("decay", {}).get("parameters")
    return {
        "decay_spread": float(max(decay) - min(decay)) if decay else None,
        "error_model": model.get("configuration_parameters", {}).get("error_model_parameters"),
    }


def _shell_stats(bin_stats):
    if not bin_stats.n_obs:  # an empty shell: no statistic
        nan = float("nan")
        return {
            "d_max": bin_stats.d_max, "d_min": bin_stats.d_min, "n_obs": 0, "n_uniq": 0, "completeness": 0.0,
            "multiplicity": nan, "r_merge": nan, "cc_one_half": nan, "i_over_sigma": nan, "mean_i": nan,
        }
    return {
        "d_max": bin_stats.d_max,
        "d_min": bin_stats.d_min,
        "n_obs": int(bin_stats.n_obs),
        "n_uniq": int(bin_stats.n_uniq),
        "completeness": 100.0 * bin_stats.completeness,
        "multiplicity": bin_stats.mean_redundancy,
        "r_merge": bin_stats.r_merge,
        "cc_one_half": bin_stats.cc_one_half,
        "i_over_sigma": bin_stats.i_over_sigma_mean,
        "mean_i": bin_stats.i_mean,
    }


def _pearson(x, y):
    import numpy as np

    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def statistics(scaled_expt, scaled_refl, truth_mtz, d_min, d_max=None, scaled_mtz=None, integrated_refl=None,
               integrated=None):
    """Merging statistics and comparison with the truth of one dataset.

    ``scaled_mtz`` (dials.export of scaled_expt/refl) defaults to scaled.mtz
    next to scaled_refl; ``integrated`` (count_integrated of the dataset)
    defaults to counting ``integrated_refl`` (default: next to scaled_refl)
    here.  Returns a JSON-serialisable dict."""
    import numpy as np

    import iotbx.merging_statistics

    truth = _truth_array(truth_mtz)
    symmetry = truth.crystal_symmetry()
    if d_max is None:
        d_max = truth.d_max_min()[0]
    truth = truth.resolution_filter(d_max=d_max, d_min=d_min)
    if scaled_mtz is None:
        scaled_mtz = os.path.join(os.path.dirname(scaled_refl), "scaled.mtz")
    unmerged = _unmerged_intensities(scaled_mtz, symmetry).resolution_filter(d_max=d_max, d_min=d_min)

    merging = iotbx.merging_statistics.dataset_statistics(
        i_obs=unmerged,
        d_min=d_min,
        d_max=d_max,
        n_bins=MERGING_SHELLS,
        anomalous=False,
        sigma_filtering=None,
        eliminate_sys_absent=False,
        use_internal_variance=False,
        assert_is_not_unique_set_under_symmetry=False,
        # the same shells for every dataset, also one whose data stop short
        # of d_min (empty shells)
        extend_d_max_min=True,
        log=open(os.devnull, "w"),
    )
    out = {
        "overall": _shell_stats(merging.overall),
        "highest_shell": _shell_stats(merging.bins[-1]),
        "d_max": d_max,
        "d_min": d_min,
    }
    out["scaling_model"] = scaling_model(scaled_expt)
    if integrated is not None:
        out["integrated"] = integrated
    else:
        if integrated_refl is None:
            integrated_refl = os.path.join(os.path.dirname(scaled_refl), "integrated.refl")
        if os.path.exists(integrated_refl):
            out["integrated"] = count_integrated(integrated_refl)

    # truth comparison
    merged = unmerged.merge_equivalents(use_internal_variance=False).array()
    merged = merged.select(merged.sigmas() > 0)
    obs, true = merged.common_sets(truth)
    i_obs = np.array(obs.data())
    s_obs = np.array(obs.sigmas())
    i_true = np.array(true.data())
    k = float(np.dot(i_obs, i_true) / np.dot(i_true, i_true))
    z = (i_obs - k * i_true) / s_obs

    # shells of equal reciprocal volume on the complete truth set
    truth.setup_binner(n_bins=TRUTH_SHELLS, d_max=d_max, d_min=d_min)
    binner = truth.binner()
    true_bins = np.array(binner.bin_indices())
    obs.use_binning(binner)
    obs_bins = np.array(obs.binner().bin_indices())
    truth_data = np.array(truth.data())
    shells = []
    weak_all = np.zeros(len(i_obs), dtype=bool)
    for i_bin in binner.range_used():
        d_lo, d_hi = binner.bin_d_range(i_bin)
        in_truth = true_bins == i_bin
        median = float(np.median(truth_data[in_truth])) if in_truth.any() else float("nan")
        sel = obs_bins == i_bin
        weak = sel & (i_true < median)
        weak_all |= weak
        shells.append(
            {
                "d_max": d_lo,
                "d_min": d_hi,
                "n_truth": int(in_truth.sum()),
                "n_matched": int(sel.sum()),
                "n_weak": int(weak.sum()),
                "cc_truth": _pearson(i_obs[sel], i_true[sel]),
                "k_shell": float(np.dot(i_obs[sel], i_true[sel]) / np.dot(i_true[sel], i_true[sel]))
                if sel.any()
                else float("nan"),
                # standard errors from the sigmas: of k_shell (least squares),
                # and of <z> from the scatter of z
                "k_shell_se": float(np.sqrt(np.dot(i_true[sel] ** 2, s_obs[sel] ** 2)) / np.dot(i_true[sel], i_true[sel]))
                if sel.any()
                else float("nan"),
                "weak_mean_z_se": float(np.std(z[weak]) / np.sqrt(weak.sum())) if weak.sum() > 1 else float("nan"),
                # the bias of the weak reflections without their sigmas (which
                # depend on the error model dials.scale fits to each dataset):
                # <I - k I_true> / <k I_true>
                "weak_relative_bias": float(np.mean(i_obs[weak] - k * i_true[weak]) / np.mean(k * i_true[weak]))
                if weak.any()
                else float("nan"),
                "weak_mean_z": float(np.mean(z[weak])) if weak.any() else float("nan"),
                "weak_rms_z": float(np.sqrt(np.mean(z[weak] ** 2))) if weak.any() else float("nan"),
                "weak_mean_i_over_sigma": float(np.mean(i_obs[weak] / s_obs[weak])) if weak.any() else float("nan"),
                "weak_fraction_negative": float(np.mean(i_obs[weak] < 0)) if weak.any() else float("nan"),
            }
        )
    out["truth"] = {
        "n_matched": int(len(i_obs)),
        "n_truth": int(truth.size()),
        "k": k,
        "cc_truth": _pearson(i_obs, i_true),
        "cc_truth_log": None,
        "weak_mean_z": float(np.mean(z[weak_all])),
        "weak_rms_z": float(np.sqrt(np.mean(z[weak_all] ** 2))),
        "shells": shells,
    }
    return out


# ---------------------------------------------------------------------------
# report


# ---------------------------------------------------------------------------
# report: tables


def _fmt(value, spec):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def _pct(gap):
    return _fmt(100 * gap, ".0f") + ("%" if gap is not None and math.isfinite(gap) else "")


TABLE1_ROWS = [
    ("Resolution (A)", None, None),
    ("Integrated observations (integrated_sum)", "integrated", "d"),
    ("Profile-fitted (integrated_prf)", "integrated_prf", "d"),
    ("Reflections with masked foreground pixels", "bad_foreground", "d"),
    ("Merged observations", "n_obs", "d"),
    ("Unique reflections", "n_uniq", "d"),
    ("Completeness (%)", "completeness", ".1f"),
    ("Multiplicity", "multiplicity", ".2f"),
    ("Rmerge", "r_merge", ".3f"),
    ("CC1/2", "cc_one_half", ".3f"),
    ("<I/sigI>", "i_over_sigma", ".2f"),
    ("dials.scale error model a, b", "error_model", None),
    ("dials.scale decay parameters, max - min", "decay_spread", ".2f"),
]

TRUTH_ROWS = [
    ("n matched / n true", None, None),
    ("CC(I_merged, I_true)", "cc_truth", ".4f"),
    ("k_shell / k", "k_shell", ".3f"),
    ("weak: <z>", "weak_mean_z", "+.3f"),
    ("weak: <I - k I_true> / <k I_true>", "weak_relative_bias", "+.3f"),
    ("weak: rms(z)", "weak_rms_z", ".3f"),
    ("weak: <I/sigI>", "weak_mean_i_over_sigma", "+.3f"),
    ("weak: fraction I < 0", "weak_fraction_negative", ".3f"),
]


def table(columns, level="###"):
    """Markdown tables of ``columns``, a list of (label, statistics dict) or
    a {label: statistics dict}: merging statistics and the comparison with
    the true intensities, one column each."""
    if isinstance(columns, dict):
        columns = list(columns.items())
    names = [label for label, _ in columns]
    stats = [r for _, r in columns]
    lines = []
    head = "| | " + " | ".join(names) + " |"
    rule = "|---|" + "---|" * len(names)

    lines += ["%s Merging statistics (Table 1 of Hattne et al. 2016)" % level, ""]
    lines += ["Overall, with the highest-resolution shell in parentheses.", "", head, rule]
    for label, key, spec in TABLE1_ROWS:
        cells = []
        for r in stats:
            o, h = r["overall"], r["highest_shell"]
            if key is None:
                cells.append("%.2f-%.2f (%.2f-%.2f)" % (o["d_max"], o["d_min"], h["d_max"], h["d_min"]))
            elif key in ("integrated", "integrated_prf", "bad_foreground"):
                name = "integrated_sum" if key == "integrated" else key
                cells.append(str(r.get("integrated", {}).get(name, "n/a")))
            elif key == "error_model":
                em = r.get("scaling_model", {}).get("error_model")
                cells.append("%.3f, %.4f" % tuple(em[:2]) if em else "n/a")
            elif key == "decay_spread":
                cells.append(_fmt(r.get("scaling_model", {}).get("decay_spread"), spec))
            else:
                cells.append("%s (%s)" % (_fmt(o[key], spec), _fmt(h[key], spec)))
        lines.append("| %s | %s |" % (label, " | ".join(cells)))
    lines.append("")

    lines += ["%s Comparison with the true intensities" % level, ""]
    lines += ["Overall:", "", head, rule]
    overall_rows = [
        ("matched merged reflections", lambda t: "%d / %d" % (t["n_matched"], t["n_truth"])),
        ("scale k (I_obs ~ k I_true)", lambda t: _fmt(t["k"], ".4f")),
        ("CC(I_merged, I_true)", lambda t: _fmt(t["cc_truth"], ".4f")),
        ("weak: <z> = <(I - k I_true)/sigma>", lambda t: _fmt(t["weak_mean_z"], "+.3f")),
        ("weak: rms(z)", lambda t: _fmt(t["weak_rms_z"], ".3f")),
    ]
    for label, get in overall_rows:
        lines.append("| %s | %s |" % (label, " | ".join(get(r["truth"]) for r in stats)))
    lines.append("")

    shells = stats[0]["truth"]["shells"]
    lines += ["Per resolution shell (%d shells of equal reciprocal volume):" % len(shells), ""]
    lines += ["| shell (A) | metric | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for i, s in enumerate(shells):
        label = "%.2f-%.2f" % (s["d_max"], s["d_min"])
        for j, (metric, key, spec) in enumerate(TRUTH_ROWS):
            cells = []
            for r in stats:
                t = r["truth"]
                sh = t["shells"][i]
                if key is None:
                    cells.append("%d / %d (weak %d)" % (sh["n_matched"], sh["n_truth"], sh["n_weak"]))
                elif key == "k_shell":
                    cells.append(_fmt(sh["k_shell"] / t["k"], spec))
                else:
                    cells.append(_fmt(sh[key], spec))
            lines.append("| %s | %s | %s |" % (label if j == 0 else "", metric, " | ".join(cells)))
    lines.append("")
    return "\n".join(lines)


def _ratio(r, i):
    """k_shell / k of truth-comparison shell ``i``."""
    return r["truth"]["shells"][i]["k_shell"] / r["truth"]["k"]


def _shell_label(r, i):
    s = r["truth"]["shells"][i]
    return "%.2f-%.2f A" % (s["d_max"], s["d_min"])


def _metrics(results):
    """(label, {dataset: value}, spec) of the rows compared in the summary,
    for ``results`` = {dataset: statistics dict}."""
    rows = []
    names = list(results)
    get = lambda f: {n: f(results[n]) for n in names}  # noqa: E731
    rows.append(("integrated observations", get(lambda r: r.get("integrated", {}).get("integrated_sum", float("nan"))), "d"))
    for part, tag in (("overall", "overall"), ("highest_shell", "outer shell")):
        for key, label, spec in (
            ("n_obs", "merged observations", "d"),
            ("completeness", "completeness (%)", ".1f"),
            ("multiplicity", "multiplicity", ".2f"),
            ("r_merge", "Rmerge", ".3f"),
            ("cc_one_half", "CC1/2", ".3f"),
            ("i_over_sigma", "<I/sigI>", ".2f"),
        ):
            rows.append(("%s, %s" % (label, tag), get(lambda r, p=part, k=key: r[p][k]), spec))
    rows.append(("CC(I, I_true), overall", get(lambda r: r["truth"]["cc_truth"]), ".4f"))
    first = results[names[0]]
    n = len(first["truth"]["shells"])
    for i in range(n):
        rows.append(("k_shell/k, %s" % _shell_label(first, i), get(lambda r, i=i: _ratio(r, i)), ".3f"))
    for i in range(n):
        rows.append(("weak <z>, %s" % _shell_label(first, i), get(lambda r, i=i: r["truth"]["shells"][i]["weak_mean_z"]), "+.3f"))
    for i in range(n):
        rows.append(("weak relative bias, %s" % _shell_label(first, i),
                     get(lambda r, i=i: r["truth"]["shells"][i].get("weak_relative_bias", float("nan"))), "+.3f"))
    for i in range(n):
        rows.append(("weak rms(z), %s" % _shell_label(first, i), get(lambda r, i=i: r["truth"]["shells"][i]["weak_rms_z"]), ".3f"))
    for i in range(n):
        rows.append(("CC(I, I_true), %s" % _shell_label(first, i), get(lambda r, i=i: r["truth"]["shells"][i]["cc_truth"]), ".4f"))
    return rows


#: A difference truncated - truth smaller than this fraction of the truth
#: value (or than ABS_TOLERANCE for values near 0) counts as "not harmed".
REL_TOLERANCE = 0.02
ABS_TOLERANCE = 0.02


def _tolerance(label, t):
    tol = max(REL_TOLERANCE * abs(t), ABS_TOLERANCE)
    if label.startswith(("integrated observations", "merged observations")) and t > 0:
        tol = max(tol, 2 * math.sqrt(t))
    return tol


def _gap(t, u, c):
    return 1 - abs(c - t) / abs(u - t) if u != t else float("nan")


def _harmed_gap(t, u, c):
    """The gap removed where truncation harms the value (beyond the
    tolerance), else nan."""
    return _gap(t, u, c) if abs(u - t) > max(REL_TOLERANCE * abs(t), ABS_TOLERANCE) else float("nan")


def compare(lane_results, corrected=None):
    """Rows of (label, spec, truth, truncated, harmed, {corrected: (value,
    gap_removed, verdict)}) of one lane's ``lane_results`` ({dataset:
    statistics dict}): gap_removed = 1 - |corrected - truth| / |truncated -
    truth| where the truncation harms the row (|truncated - truth| above the
    tolerance), else nan."""
    if corrected is None:
        corrected = [n for n in lane_results if n not in REFERENCES]
    out = []
    for label, values, spec in _metrics(lane_results):
        t, u = values["truth"], values["truncated"]
        finite = math.isfinite(t) and math.isfinite(u)
        tol = _tolerance(label, t) if finite else float("nan")
        harmed = finite and abs(u - t) > tol
        cells = {}
        for name in corrected:
            c = values[name]
            if not (finite and math.isfinite(c)):
                cells[name] = (c, float("nan"), "n/a")
            elif harmed:
                gap = _gap(t, u, c)
                cells[name] = (c, gap, "closer to truth" if gap > 0 else "further from truth")
            else:
                cells[name] = (c, float("nan"), "within tolerance" if abs(c - t) <= tol else "moves away")
        out.append((label, spec, t, u, harmed, cells))
    return out


def comparison_table(lane_results, labels=None, title=None, level="###"):
    """The 'gap removed' table of one lane: every corrected column against
    the truth and truncated columns of that lane."""
    labels = labels or {n: n for n in lane_results}
    corrected = [n for n in lane_results if n not in REFERENCES]
    lines = [
        "%s %s" % (level, title or "Is the corrected data closer to the truth processing than the truncated data?"),
        "",
        "Each corrected cell: the value and, in parentheses, the gap removed = 1 - |corrected - truth| / "
        "|truncated - truth| (100%% = truncation effect fully undone, < 0 = further from the truth than "
        "truncated). Rows where |truncated - truth| is at most %d%% of the truth value (or %.2f; for "
        "observation counts 2 sqrt(N)) are not harmed by truncation (column 'harmed': no); there a corrected "
        "value is marked only if it moves beyond that tolerance. Differences of a few per cent in the outer "
        "shells (a few hundred unique reflections) are within noise."
        % (100 * REL_TOLERANCE, ABS_TOLERANCE),
        "",
        "| metric | %s | %s | harmed | %s |" % (labels["truth"], labels["truncated"], " | ".join(labels[n] for n in corrected)),
        "|---|---|---|---|" + "---|" * len(corrected),
    ]
    for label, spec, t, u, harmed, cells in compare(lane_results, corrected):
        shown = []
        for n in corrected:
            c, gap, verdict = cells[n]
            if harmed:
                shown.append("%s (%s)" % (_fmt(c, spec), _pct(gap)))
            elif verdict == "moves away":
                shown.append("%s (moves away)" % _fmt(c, spec))
            else:
                shown.append(_fmt(c, spec))
        lines.append(
            "| %s | %s | %s | %s | %s |"
            % (label, _fmt(t, spec), _fmt(u, spec), "yes" if harmed else "no", " | ".join(shown))
        )
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# report: decisions


def _bias_metrics():
    """(metric, value of shell i, its standard error) of the bias rows."""
    return (
        ("k_shell/k", _ratio, lambda r, i: r["truth"]["shells"][i].get("k_shell_se", float("nan")) / r["truth"]["k"]),
        ("weak <z>", lambda r, i: r["truth"]["shells"][i]["weak_mean_z"],
         lambda r, i: r["truth"]["shells"][i].get("weak_mean_z_se", float("nan"))),
    )


def bias_rows(lane_results, name):
    """The bias removal of column ``name``: [(metric, shell label, gap
    removed)] for k_shell/k and weak <z> in each of the OUTER outermost
    truth-comparison shells; gap removed is nan where the truncation does
    not harm the row (|truncated - truth| within tolerance)."""
    T, U, C = lane_results["truth"], lane_results["truncated"], lane_results[name]
    n = len(T["truth"]["shells"])
    rows = []
    for metric, get, _ in _bias_metrics():
        for i in range(n - OUTER, n):
            t, u, c = get(T, i), get(U, i), get(C, i)
            harmed = abs(u - t) > max(REL_TOLERANCE * abs(t), ABS_TOLERANCE)
            rows.append((metric, _shell_label(T, i), _gap(t, u, c) if harmed else float("nan")))
    return rows


#: a mode is eligible when its bias removal is nowhere worse than this
#: fraction of distribution's (for a positive gap g: at least 0.9 g; for a
#: non-positive g: at least g - 0.1 |g|)
ELIGIBLE_FRACTION = 0.9


def _threshold(gap):
    return gap - (1 - ELIGIBLE_FRACTION) * abs(gap)


def closer_rows(lane_results, a, b):
    """(rows where ``a`` is closer to the truth processing than ``b``, rows
    where ``b`` is, ties, rows compared) over every row of the comparison
    table."""
    n_a = n_b = n_tie = 0
    for label, values, spec in _metrics(lane_results):
        t, va, vb = values["truth"], values[a], values[b]
        if not all(math.isfinite(v) for v in (t, va, vb)):
            continue
        da, db = abs(va - t), abs(vb - t)
        if da < db:
            n_a += 1
        elif db < da:
            n_b += 1
        else:
            n_tie += 1
    return n_a, n_b, n_tie, n_a + n_b + n_tie


def choose_assignment(lane_results, current=None):
    """The rule of the 'Which assignment' section, on one lane's results with
    a column per assignment mode: a mode is eligible when its bias removal
    (bias_rows) is on every row where the truncation harms at least
    ELIGIBLE_FRACTION of distribution's; the default is the eligible mode
    closer to the truth processing on more rows of the comparison table
    (a tie keeps ``current``, the present default).  Returns a dict."""
    current = current or default_assignment()
    reference = "distribution"
    bias = {m: bias_rows(lane_results, m) for m in ASSIGNMENTS}
    # per bias row: the two modes' values and the standard error of the
    # truth column's value (the modes share their images, so the noise of
    # their difference is smaller: 2 s.e. is a generous yardstick)
    T = lane_results["truth"]
    n = len(T["truth"]["shells"])
    noise = []
    for metric, get, se in _bias_metrics():
        for i in range(n - OUTER, n):
            noise.append(abs(get(lane_results["expectation"], i) - get(lane_results["distribution"], i)) < 2 * se(T, i))
    eligible, failures = {}, {}
    for m in ASSIGNMENTS:
        bad = [
            (metric, shell, g, gd, within)
            for (metric, shell, g), (_, _, gd), within in zip(bias[m], bias[reference], noise)
            if math.isfinite(gd) and not (math.isfinite(g) and g >= _threshold(gd))
        ]
        eligible[m] = not bad
        failures[m] = bad
    others = [m for m in ASSIGNMENTS if m != reference]
    counts = {}
    for m in others:
        counts[m] = closer_rows(lane_results, m, reference)
    # the two-mode case (distribution, expectation)
    challenger = others[0]
    n_c, n_r, n_tie, n_rows = counts[challenger]
    if not eligible[challenger] or n_c == n_r:
        choice = reference if not eligible[challenger] else current
    else:
        choice = challenger if n_c > n_r else reference
    models = {m: (lane_results[m].get("scaling_model") or {}).get("error_model") for m in ASSIGNMENTS}
    return {
        "error_models": models,
        "bias": bias,
        "eligible": eligible,
        "failures": failures,
        "challenger": challenger,
        "reference": reference,
        "counts": counts[challenger],
        "choice": choice,
        "current": current,
    }


#: the least gain in mean gap removed (a fraction) that counts as a bias
#: improvement of the sectors over whole shells
BIAS_MARGIN = 0.05

#: robustness is lost when more regions' fits fail (their zeros are left
#: unchanged), or when more than this fraction of the regions (and more than
#: with whole shells) must be pooled with a neighbour to be fitted
POOLED_TOLERANCE = 0.01


def sectors_verdict(lane_results, corrections):
    """The region experiment on one lane: the sectors column against the
    column of its own assignment mode (SECTORS_ASSIGNMENT), on measures that
    do not depend on the sigmas (the two columns may get different error
    models from dials.scale, which moves <z> and rms(z) without any change
    in the intensities):

    * bias: gap removed on k_shell/k and on the weak reflections' relative
      bias <I - k I_true> / <k I_true> in the OUTER outer shells; improved
      when the mean over the rows harmed by truncation is higher by more
      than BIAS_MARGIN;
    * accuracy: CC(I, I_true) in the outer shells; improved when higher in
      more than half of them;
    * robustness: more failed fits, or more than POOLED_TOLERANCE of the
      regions pooled (and more than with whole shells), lose it.

    Also reported: the rule's own bias rows (k_shell/k and weak <z>), the
    rows of the comparison table closer to the truth processing, and the
    error models.  ``corrections`` = {dataset: correction_summary}.
    Returns a dict."""
    own = SECTORS_ASSIGNMENT
    T, U = lane_results["truth"], lane_results["truncated"]
    n = len(T["truth"]["shells"])
    outer = range(n - OUTER, n)

    def gaps(name, get):
        out = []
        for i in outer:
            t, u, c = get(T, i), get(U, i), get(lane_results[name], i)
            harmed = abs(u - t) > max(REL_TOLERANCE * abs(t), ABS_TOLERANCE)
            out.append(_gap(t, u, c) if harmed else float("nan"))
        return out

    def mean_pairs(a, b):
        pairs = [(x, y) for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
        if not pairs:
            return float("nan"), float("nan")
        return sum(p[0] for p in pairs) / len(pairs), sum(p[1] for p in pairs) / len(pairs)

    rel = lambda r, i: r["truth"]["shells"][i].get("weak_relative_bias", float("nan"))  # noqa: E731
    sigma_free = {name: gaps(name, _ratio) + gaps(name, rel) for name in ("sectors", own)}
    mean_s, mean_o = mean_pairs(sigma_free["sectors"], sigma_free[own])
    rule = {name: [g for _, _, g in bias_rows(lane_results, name)] for name in ("sectors", own)}
    rule_s, rule_o = mean_pairs(rule["sectors"], rule[own])
    n_s, n_o, n_tie, n_rows = closer_rows(lane_results, "sectors", own)
    cc = {name: [lane_results[name]["truth"]["shells"][i]["cc_truth"] for i in outer] for name in ("truth", "truncated", own, "sectors")}
    cc_better = sum(1 for x, y in zip(cc["sectors"], cc[own]) if x > y)
    robust = {}
    for name in (own, "sectors"):
        c = corrections.get(name) or {}
        regions = c.get("regions", 0)
        robust[name] = {
            "regions": regions,
            "failed": c.get("failed", 0),
            "pooled": c.get("pooled", 0),
            "failed_fraction": c.get("failed", 0) / regions if regions else float("nan"),
            "pooled_fraction": c.get("pooled", 0) / regions if regions else float("nan"),
        }
    improves_bias = math.isfinite(mean_s) and mean_s > mean_o + BIAS_MARGIN
    improves_accuracy = 2 * cc_better > len(cc["sectors"])
    loses_robustness = robust["sectors"]["failed_fraction"] > robust[own]["failed_fraction"] or (
        robust["sectors"]["pooled_fraction"] > max(robust[own]["pooled_fraction"], POOLED_TOLERANCE)
    )
    model = {name: lane_results[name].get("scaling_model") or {} for name in ("truth", own, "sectors")}
    return {
        "own": own,
        "sigma_free": sigma_free,
        "mean_gap": (mean_s, mean_o),
        "rule_gap": (rule_s, rule_o),
        "counts": (n_s, n_o, n_tie, n_rows),
        "cc_outer": cc,
        "cc_better": cc_better,
        "robust": robust,
        "improves_bias": improves_bias,
        "improves_accuracy": improves_accuracy,
        "loses_robustness": loses_robustness,
        "decay_spread": {name: m.get("decay_spread") for name, m in model.items()},
        "error_model": {name: m.get("error_model") for name, m in model.items()},
        "keep": improves_bias and improves_accuracy and not loses_robustness,
    }


# ---------------------------------------------------------------------------
# report: generated text


def _direction(u, t, more="higher", less="lower"):
    return more if u > t else less


def _gap_list(gaps):
    return ", ".join("n.h." if not math.isfinite(g) else "%.0f%%" % (100 * g) for g in gaps)


def discussion(T, U, C, mode="distribution", lane_label="this DIALS"):
    """The 'What improves and what does not' paragraphs for one lane, from
    the truth (T), truncated (U) and corrected (C, assignment ``mode``)
    statistics, written from the numbers (so that a re-run regenerates them
    consistently)."""
    paras = []
    shells = T["truth"]["shells"]
    n = len(shells)
    last = shells[-1]
    outer = range(n - OUTER, n)

    # 1. intensity deficit per shell; weak reflections
    harmed = [i for i in range(n) if abs(_ratio(U, i) - _ratio(T, i)) > max(REL_TOLERANCE * _ratio(T, i), ABS_TOLERANCE)]
    z = lambda r, i: r["truth"]["shells"][i]["weak_mean_z"]  # noqa: E731
    z_gaps = [
        _gap(z(T, i), z(U, i), z(C, i)) if abs(z(U, i) - z(T, i)) > max(REL_TOLERANCE * abs(z(T, i)), ABS_TOLERANCE) else float("nan")
        for i in outer
    ]
    if harmed:
        gaps = [100 * _gap(_ratio(T, i), _ratio(U, i), _ratio(C, i)) for i in harmed]
        low = sum(_ratio(U, i) < _ratio(T, i) for i in harmed)
        direction = "lower" if 2 * low > len(harmed) else "higher" if 2 * low < len(harmed) else "both ways"
        text = (
            "**Intensities.** Truncation biases the merged intensities %s at high resolution: relative to the "
            "overall scale, the per-shell scale k_shell/k of the truncated data departs from the truth processing "
            "by more than %d%% in %d of %d shells (from %.2f A on; lower in %d of them), and is %.3f against %.3f "
            "in the outermost shell (%.2f-%.2f A; standard error of the truth value %.3f). With the %s "
            "correction it is %.3f there; in the affected shells the correction removes %s of the difference."
            % (
                direction,
                100 * REL_TOLERANCE,
                len(harmed),
                n,
                shells[harmed[0]]["d_max"],
                low,
                _ratio(U, n - 1),
                _ratio(T, n - 1),
                last["d_max"],
                last["d_min"],
                last.get("k_shell_se", float("nan")) / T["truth"]["k"],
                mode,
                _ratio(C, n - 1),
                "%.0f%%" % gaps[0] if len(gaps) == 1 else "%.0f%% to %.0f%%" % (min(gaps), max(gaps)),
            )
        )
        if direction == "lower":
            text += (
                " (Replacing negative pixels by 0 raises the background pixels more than the spot pixels, so the "
                "background subtracted from each spot is too large.)"
            )
    else:
        text = (
            "**Intensities.** Truncation changes the per-shell scale k_shell/k by no more than %d%% in any shell "
            "(outermost shell: truth %.3f, truncated %.3f, %s %.3f)."
            % (100 * REL_TOLERANCE, _ratio(T, n - 1), _ratio(U, n - 1), mode, _ratio(C, n - 1))
        )
    text += (
        " The weak reflections (true I below the shell median): their mean normalised error <z> in the "
        "outermost shell is %+.3f truncated (truth %+.3f, %s %+.3f); in the %d outer shells (%.2f-%.2f A) "
        "the correction removes %s of the truncation's shift of <z> (n.h.: shift within tolerance)."
        % (z(U, n - 1), z(T, n - 1), mode, z(C, n - 1), OUTER, shells[n - OUTER]["d_max"], last["d_min"], _gap_list(z_gaps))
    )
    paras.append(text)

    # 2. outer-shell I/sigI and rms(z)
    t, u, c = (r["highest_shell"]["i_over_sigma"] for r in (T, U, C))
    zt, zu, zc = (r["truth"]["shells"][-1]["weak_rms_z"] for r in (T, U, C))
    ot, ou, oc = (r["overall"]["i_over_sigma"] for r in (T, U, C))
    if u < t:
        paper = (
            "Here truncation lowers <I/sigI>, unlike Table 1 of Hattne et al., where in weaker data (overall "
            "<I/sigI> 2.2, against %.1f here) truncation inflated it and correction halved it: here the loss of "
            "intensity outweighs any shrinking of the sigmas." % ot
        )
    else:
        paper = (
            "Here truncation raises <I/sigI>, as in Table 1 of Hattne et al. (overall <I/sigI> 2.2 there, %.1f "
            "here): it shrinks the sigmas more than it lowers the intensities." % ot
        )
    cc_same = abs(U["truth"]["cc_truth"] - T["truth"]["cc_truth"]) <= 0.002
    paras.append(
        "**Outer-shell <I/sigI>; error model.** In the highest-resolution shell <I/sigI> is %.2f for the "
        "truth, %.2f truncated and %.2f corrected (%s). %s rms(z) of the weak reflections in the outermost "
        "shell is %.2f truncated against %.2f for the truth (%s) and %.2f corrected (%s). Caution: dials.scale "
        "refines an error model for each dataset (mostly determined by the strong low-resolution reflections), "
        "so all sigmas -- and with them <I/sigI> and rms(z) -- also depend on how that model fits each version; "
        "overall <I/sigI> is %.1f / %.1f / %.1f (truth / truncated / corrected)%s."
        % (
            t,
            u,
            c,
            "%s of the difference removed" % _pct(_gap(t, u, c)) if u != t else "no difference to remove",
            paper,
            zu,
            zt,
            "truncated weak intensities scatter less about the truth, relative to their sigmas, than in the truth "
            "processing: the paper's 'artificially homogeneous' intensities"
            if zu < zt
            else "truncated weak intensities scatter more about the truth, relative to their sigmas, than in the "
            "truth processing",
            zc,
            "closer to the truth processing than truncated"
            if abs(zc - zt) < abs(zu - zt)
            else "further from the truth processing than truncated: corrected sigmas too small relative to the "
            "scatter, or the scatter too large",
            ot,
            ou,
            oc,
            ", a difference that comes from the error models, not from the low-resolution intensities, whose "
            "overall CC with the truth is the same within 0.002"
            if abs(ou - ot) > REL_TOLERANCE * ot and cc_same
            else "",
        )
    )

    # 3. precision indicators of the outer shell
    rm = [r["highest_shell"]["r_merge"] for r in (T, U, C)]
    cc = [r["highest_shell"]["cc_one_half"] for r in (T, U, C)]
    ct = [r["truth"]["shells"][-1]["cc_truth"] for r in (T, U, C)]
    trunc_better = rm[1] <= rm[0] * (1 + REL_TOLERANCE) and cc[1] > cc[0] and ct[1] > ct[0]
    better = [name for name, v, low in (("Rmerge", rm, True), ("CC1/2", cc, False), ("CC(I, I_true)", ct, False))
              if (v[1] < v[0] if low else v[1] > v[0])]
    worse = [name for name in ("Rmerge", "CC1/2", "CC(I, I_true)") if name not in better]
    corr_closer = sum(abs(v[2] - v[0]) < abs(v[1] - v[0]) for v in (rm, cc, ct))
    if mode == "distribution":
        why = (
            " The distribution mode gives every zero-valued pixel (including the pixels whose true value was "
            "exactly 0) an independent random draw from the fitted distribution, which adds pixel noise of its "
            "own; the information in the negative pixel values is lost, and the correction restores their "
            "distribution, not the values."
        )
    else:
        why = (
            " The expectation mode draws nothing: the zero-valued pixels of a region get the region's "
            "conditional mean (as two neighbouring integers), so it adds no noise of its own but does not "
            "restore the spread of the lost values either; the values themselves are lost."
        )
    paras.append(
        "**Rmerge, CC1/2, CC with the truth.** In the highest-resolution shell the truncated data look %s: "
        "Rmerge %.3f (truth %.3f), CC1/2 %.3f (%.3f), and in the outermost "
        "truth-comparison shell CC(I, I_true) %.4f (%.4f)%s. Corrected (%s): Rmerge %.3f, CC1/2 %.3f, "
        "CC(I, I_true) %.4f -- closer to the truth processing than truncated on %d of these 3.%s"
        % (
            "better than the truth data by all three precision measures"
            if not worse
            else "worse than the truth data by all three precision measures"
            if not better
            else "better than the truth data by %s, worse by %s" % (" and ".join(better), " and ".join(worse)),
            rm[1], rm[0], cc[1], cc[0], ct[1], ct[0],
            ": clipping the negative noise to zero removes part of the pixel noise, so truncated intensities are "
            "biased but less noisy" if trunc_better else "",
            mode, rm[2], cc[2], ct[2], corr_closer, why,
        )
    )

    # 4. counts
    ni = [r.get("integrated", {}).get("integrated_sum", 0) for r in (T, U, C)]
    m = [r["overall"]["n_obs"] for r in (T, U, C)]
    comp = [r["overall"]["completeness"] for r in (T, U, C)]
    same = abs(ni[1] - ni[0]) <= 2 * math.sqrt(max(ni[0], 1)) and abs(m[1] - m[0]) <= 2 * math.sqrt(max(m[0], 1))
    paras.append(
        "**Observations, completeness, multiplicity.** DIALS (%s) integrated %d / %d / %d reflections and merged "
        "%d / %d / %d observations (truth / truncated / corrected; completeness %.1f / %.1f / %.1f%%). %s "
        "Overall Rmerge, CC1/2 and CC with the truth are dominated by the strong low-resolution reflections and "
        "differ from the truth processing by at most %.3f, %.4f and %.4f."
        % (
            lane_label, ni[0], ni[1], ni[2], m[0], m[1], m[2], comp[0], comp[1], comp[2],
            "Truncation does not cost observations here (within 2 sqrt(N)): the paper's 2.5-fold gain in merged "
            "observations came from MOSFLM rejecting spots of the truncated images for their background "
            "gradient, which dials.integrate does not do."
            if same
            else "Truncation changes these counts beyond 2 sqrt(N).",
            max(abs(r["overall"]["r_merge"] - T["overall"]["r_merge"]) for r in (U, C)),
            max(abs(r["overall"]["cc_one_half"] - T["overall"]["cc_one_half"]) for r in (U, C)),
            max(abs(r["truth"]["cc_truth"] - T["truth"]["cc_truth"]) for r in (U, C)),
        )
    )
    return "\n\n".join(paras)


def masked_discussion(T, U, C, lane_label, trusted_range=None):
    """The paragraph on current DIALS, whose truncated baseline has every
    zero pixel masked, and the correction on read (C)."""
    n = len(T["truth"]["shells"])
    shells = T["truth"]["shells"]
    counts = [r.get("integrated", {}) for r in (T, U, C)]
    ns = [c.get("integrated_sum", 0) for c in counts]
    npf = [c.get("integrated_prf", 0) for c in counts]
    bad = [c.get("bad_foreground", 0) for c in counts]
    m = [r["overall"]["n_obs"] for r in (T, U, C)]
    hs = [r["highest_shell"]["n_uniq"] for r in (T, U, C)]
    matched = [r["truth"]["shells"][i]["n_matched"] for r in (U,) for i in range(n)]
    # the truth-comparison shells the truncated column has (enough) data in
    with_data = [i for i in range(1, n) if matched[i] >= 100 and math.isfinite(_ratio(U, i))]
    empty = [i for i in range(n) if matched[i] == 0]
    z = lambda r, i: r["truth"]["shells"][i]["weak_mean_z"]  # noqa: E731
    text = (
        "**%s: the zero pixels masked.** Current dxtbx reads the trusted range of these SMV files as %s "
        "inclusive, so in the truncated column every zero pixel is masked (what current users of such data get "
        "today); the correction on read gives those pixels values and lowers the trusted-range minimum. "
        "dials.integrate found masked pixels in the foreground of %d reflections (truth %d, on read %d) and "
        "summation-integrated %d (truth %d, on read %d); profile fitting gave %d (%d, %d). dials.scale merged "
        "%d observations (truth %d, on read %d); the highest-resolution shell holds %d unique reflections "
        "(truth %d, on read %d)."
        % (lane_label, "%g..%g" % tuple(trusted_range) if trusted_range else "excluding 0",
           bad[1], bad[0], bad[2], ns[1], ns[0], ns[2], npf[1], npf[0], npf[2], m[1], m[0], m[2],
           hs[1], hs[0], hs[2])
    )
    if empty:
        text += " The truncated column has no reflection in the truth-comparison shells beyond %.2f A." % shells[empty[0]]["d_max"]
    if with_data:
        text += (
            " Where it has data (at least 100 matched reflections; shells %s), k_shell/k is %s truncated against "
            "%s for the truth and %s on read (gap removed %s; n.h.: within tolerance); weak <z> %s against %s and %s (gap removed %s)."
            % (
                ", ".join(_shell_label(T, i).replace(" A", "") for i in with_data) + " A",
                " / ".join("%.3f" % _ratio(U, i) for i in with_data),
                " / ".join("%.3f" % _ratio(T, i) for i in with_data),
                " / ".join("%.3f" % _ratio(C, i) for i in with_data),
                _gap_list([_harmed_gap(_ratio(T, i), _ratio(U, i), _ratio(C, i)) for i in with_data]),
                " / ".join("%+.3f" % z(U, i) for i in with_data),
                " / ".join("%+.3f" % z(T, i) for i in with_data),
                " / ".join("%+.3f" % z(C, i) for i in with_data),
                _gap_list([_harmed_gap(z(T, i), z(U, i), z(C, i)) for i in with_data]),
            )
        )
    outer = range(n - OUTER, n)
    text += (
        " In the %d outer shells the on-read column has k_shell/k %s (truth %s) and weak <z> %s (truth %s)."
        % (
            OUTER,
            " / ".join("%.3f" % _ratio(C, i) for i in outer),
            " / ".join("%.3f" % _ratio(T, i) for i in outer),
            " / ".join("%+.3f" % z(C, i) for i in outer),
            " / ".join("%+.3f" % z(T, i) for i in outer),
        )
    )
    return text


def assignment_section(decisions, labels):
    """'Which assignment': the rule, its figures and outcome per crystal.
    ``decisions`` = {crystal: choose_assignment(...)}."""
    lines = [
        "## Which assignment",
        "",
        "Rule: a mode is *eligible* when its bias removal -- the gap removed (as above) on k_shell/k "
        "and on weak <z> in each of the %d outer truth-comparison shells, %d rows -- is on every row where "
        "truncation harms it at least %d%% of distribution's (for a non-positive gap g of distribution: at "
        "least g - %d%% |g|); the default is the eligible mode that is closer to the truth processing on more "
        "rows of the comparison table (all %s rows, counted; exact ties count for neither; equal counts keep "
        "the present default, `truncfix.assignment = %s`). Columns of %s."
        % (
            OUTER, 2 * OUTER, round(100 * ELIGIBLE_FRACTION), round(100 * (1 - ELIGIBLE_FRACTION)),
            next(iter(decisions.values()))["counts"][3] if decisions else 0,
            next(iter(decisions.values()))["current"] if decisions else default_assignment(),
            labels,
        ),
        "",
    ]
    outcomes = {}
    for crystal, d in decisions.items():
        ref, ch = d["reference"], d["challenger"]
        lines += [
            "**%s crystal.** Bias removal (k_shell/k in the %d outer shells; weak <z> in the same shells):" % (crystal.capitalize(), OUTER),
            "",
            "| mode | k_shell/k | weak <z> | eligible |",
            "|---|---|---|---|",
        ]
        for mode in (ref, ch):
            rows = d["bias"][mode]
            lines.append(
                "| %s | %s | %s | %s |"
                % (
                    mode,
                    _gap_list([g for metric, _, g in rows if metric == "k_shell/k"]),
                    _gap_list([g for metric, _, g in rows if metric == "weak <z>"]),
                    "yes" if d["eligible"][mode] else "no (%s)" % "; ".join(
                        "%s %s: %s < %s%s" % (metric, shell, _pct(g), _pct(_threshold(gd)), " *" if within else "")
                        for metric, shell, g, gd, within in d["failures"][mode]
                    ),
                )
            )
        noisy = [f for f in d["failures"][ch] if f[4]]
        if d["failures"][ch]:
            lines += [
                "",
                "%d of the %d failing rows (marked *) differ between the two modes by less than 2 standard errors "
                "of the truth column's value in that shell (a generous yardstick: the modes share their images)%s."
                % (
                    len(noisy),
                    len(d["failures"][ch]),
                    "; without them %s would be eligible, and the row count below would decide" % ch
                    if len(noisy) == len(d["failures"][ch])
                    else "",
                ),
            ]
        a_ref, a_ch = (d["error_models"].get(m) for m in (ref, ch))
        if a_ref and a_ch and abs(a_ch[0] - a_ref[0]) > 0.05 * a_ref[0]:
            lines += [
                "",
                "Note: dials.scale fitted different error models to the two columns (a = %.3f for %s, %.3f for "
                "%s), so their weak <z> and rms(z) differ partly through the sigmas; compare the sigma-free "
                "rows (k_shell/k, weak relative bias, CC)." % (a_ref[0], ref, a_ch[0], ch),
            ]
        n_c, n_r, n_tie, n_rows = d["counts"]
        if not d["eligible"][ch]:
            why = "%s is not eligible, so %s stays" % (ch, ref)
        elif n_c == n_r:
            why = "equal counts: the present default %s stays" % d["current"]
        else:
            why = "%s is closer on more rows" % (ch if n_c > n_r else ref)
        lines += [
            "",
            "Closer to the truth processing: %s on %d rows, %s on %d rows, %d ties (of %d rows). Outcome: **%s** (%s)."
            % (ch, n_c, ref, n_r, n_tie, n_rows, d["choice"], why),
            "",
        ]
        outcomes[crystal] = d["choice"]
    if outcomes:
        choices = set(outcomes.values())
        current = next(iter(decisions.values()))["current"]
        if len(choices) == 1:
            choice = choices.pop()
            lines.append(
                "Both crystals give **%s**%s." % (
                    choice,
                    ": the present default is confirmed" if choice == current
                    else " -- the rule says the default should change from %s to %s" % (current, choice),
                )
                if len(outcomes) > 1
                else "Outcome: **%s**%s." % (choice, " (the present default)" if choice == current else " (the present default is %s)" % current)
            )
        else:
            lines.append(
                "The crystals disagree (%s): the evidence does not single out one mode for every dataset; "
                "the present default, %s, stays until it does."
                % (", ".join("%s: %s" % kv for kv in outcomes.items()), current)
            )
        lines.append("")
    return "\n".join(lines)


def sectors_section(verdicts, labels):
    """'Regions smaller than annuli': {crystal: sectors_verdict(...)}."""
    lines = [
        "## Regions smaller than annuli",
        "",
        "The sectors column (`truncfix.n_sectors=%d`: each of the 10 resolution shells split into %d azimuthal "
        "sectors of equal angle, each fitted and assigned on its own) against the column of its own mode "
        "(`truncfix.assignment=%s`, whole shells), both %s. The two columns can get different error models "
        "from dials.scale, which moves <z> and rms(z) without any change in the intensities, so the verdict "
        "uses measures that do not depend on the sigmas. Bias: gap removed on k_shell/k and on the weak "
        "reflections' relative bias <I - k I_true>/<k I_true> in the %d outer shells (mean over the rows "
        "truncation harms); improved when higher by more than %d points. Accuracy: CC(I, I_true) in the outer "
        "shells; improved when higher in more than half of them. Robustness, from "
        "`dials.correct_truncation.json`: regions with zero pixels whose fit failed (zeros left unchanged) or "
        "was pooled with a neighbouring region; lost when more fits fail, or when more than %d%% of the regions "
        "(and more than with whole shells) are pooled. Also shown: the gap removed on the rows of the "
        "assignment rule (k_shell/k and weak <z>), the rows of the comparison table closer to the truth "
        "processing, and the error models."
        % (N_SECTORS, N_SECTORS, SECTORS_ASSIGNMENT, labels, OUTER, round(100 * BIAS_MARGIN),
           round(100 * POOLED_TOLERANCE)),
        "",
    ]
    keeps = {}
    for crystal, v in verdicts.items():
        own = v["own"]
        ms, mo = v["mean_gap"]
        rs_, ro_ = v["rule_gap"]
        n_s, n_o, n_tie, n_rows = v["counts"]
        rs, ro = v["robust"]["sectors"], v["robust"][own]
        cc = v["cc_outer"]
        em = v["error_model"]
        fmt_em = lambda e: "%.3f, %.4f" % tuple(e[:2]) if e else "n/a"  # noqa: E731
        lines += [
            "**%s crystal.**" % crystal.capitalize(),
            "",
            "| | %s | sectors |" % own,
            "|---|---|---|",
            "| gap removed, k_shell/k (outer shells) | %s | %s |"
            % (_gap_list(v["sigma_free"][own][:OUTER]), _gap_list(v["sigma_free"]["sectors"][:OUTER])),
            "| gap removed, weak relative bias (outer shells) | %s | %s |"
            % (_gap_list(v["sigma_free"][own][OUTER:]), _gap_list(v["sigma_free"]["sectors"][OUTER:])),
            "| **mean of these (bias)** | %s | %s |" % (_pct(mo), _pct(ms)),
            "| mean gap removed on the rule's rows (k_shell/k, weak <z>) | %s | %s |" % (_pct(ro_), _pct(rs_)),
            "| **CC(I, I_true), outer shells (accuracy; truth: %s)** | %s | %s |"
            % (" / ".join("%.4f" % x for x in cc["truth"]), " / ".join("%.4f" % x for x in cc[own]), " / ".join("%.4f" % x for x in cc["sectors"])),
            "| rows of the comparison table closer to the truth processing | %d | %d (%d ties, %d rows) |" % (n_o, n_s, n_tie, n_rows),
            "| regions with zeros (all images) | %d | %d |" % (ro["regions"], rs["regions"]),
            "| **failed fits** | %d (%s) | %d (%s) |" % (ro["failed"], _fmt(100 * ro["failed_fraction"], ".2f") + "%", rs["failed"], _fmt(100 * rs["failed_fraction"], ".2f") + "%"),
            "| **pooled fits** | %d (%s) | %d (%s) |" % (ro["pooled"], _fmt(100 * ro["pooled_fraction"], ".2f") + "%", rs["pooled"], _fmt(100 * rs["pooled_fraction"], ".2f") + "%"),
            "| dials.scale error model a, b (truth: %s) | %s | %s |" % (fmt_em(em["truth"]), fmt_em(em[own]), fmt_em(em["sectors"])),
            "| dials.scale decay parameters, max - min (truth: %s) | %s | %s |"
            % tuple(_fmt(v["decay_spread"][n], ".2f") for n in ("truth", own, "sectors")),
            "",
            "Sectors %s the bias, %s the accuracy (CC higher in %d of %d outer shells) and %s robustness: %s."
            % (
                "improve" if v["improves_bias"] else "do not improve",
                "improve" if v["improves_accuracy"] else "do not improve",
                v["cc_better"], len(cc["sectors"]),
                "lose" if v["loses_robustness"] else "do not lose",
                "keep them" if v["keep"] else "not worth keeping on this evidence",
            ),
            "",
        ]
        if math.isfinite(rs_) and math.isfinite(ro_) and rs_ > ro_ + BIAS_MARGIN and not v["improves_bias"]:
            lines += [
                "On the assignment rule's rows the sectors look better (%s against %s), but the gain is in weak "
                "<z> alone and the sigma-free relative bias does not show it: it comes from the sigmas (error "
                "model a = %s for the sectors, %s for whole shells), not from the intensities."
                % (_pct(rs_), _pct(ro_), fmt_em(em["sectors"]).split(",")[0], fmt_em(em[own]).split(",")[0]),
                "",
            ]
        spreads = v["decay_spread"]
        if all(spreads.get(k) is not None for k in ("truth", own, "sectors")) and spreads["sectors"] > 3 * max(spreads["truth"], spreads[own]):
            lines += [
                "Caution: dials.scale's decay component came out %.1f times as spread for the sectors column as "
                "for its own mode's (%.2f against %.2f; truth %.2f): a relative B that varies that much across "
                "the sweep tilts the merged intensities against resolution, so the k_shell/k rows of this column "
                "reflect the scaling model as much as the pixels."
                % (spreads["sectors"] / max(spreads[own], 1e-9), spreads["sectors"], spreads[own], spreads["truth"]),
                "",
            ]
        keeps[crystal] = v["keep"]
    if keeps:
        if all(keeps.values()):
            lines.append("Verdict: regions smaller than annuli help on every crystal here; keep `n_sectors` and consider it beyond the experiment.")
        elif not any(keeps.values()):
            lines.append(
                "Verdict: on these simulated sweeps (a background that depends on resolution only, as in the "
                "paper) regions smaller than annuli bring no gain that would justify them; keep "
                "`truncfix.n_sectors` experimental at 1 unless real data with an azimuthally varying background "
                "show otherwise."
            )
        else:
            lines.append(
                "Verdict: mixed (%s); no case for making sectors more than an experiment."
                % ", ".join("%s: %s" % (c, "keep" if k else "no gain") for c, k in keeps.items())
            )
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# driver


def _lane_order(lanes):
    return [l for l in LANES if l in lanes] + [l for l in lanes if l not in LANES]


def run_validation(
    workdir,
    image_size=2048,
    n_images=90,
    seed=1,
    nproc=2,
    d_min=1.3,
    reuse=False,
    crystals=CRYSTALS,
    lanes=LANES,
    datasets=None,
    current_venv=DEFAULT_CURRENT_VENV,
):
    """Simulate, process and analyse.  Returns (results, info), results =
    {crystal: {lane: {dataset: statistics dict}}}.  ``datasets`` (None: all
    of each lane's) restricts the columns (see lane_datasets)."""
    workdir = os.path.abspath(workdir)
    start = time.time()
    os.makedirs(workdir, exist_ok=True)
    lanes = _lane_order(lanes)
    envs = {lane: lane_environment(lane, current_venv) for lane in lanes}
    lane_info = {lane: describe_lane(lane, envs[lane]) for lane in lanes}
    columns = {lane: lane_datasets(lane, datasets) for lane in lanes}
    if not any(columns.values()):
        raise StepError("no dataset of %s in lanes %s" % (" ".join(datasets), " ".join(lanes)))
    log = open(os.path.join(workdir, "commands.log"), "a")
    log.write("# %s\n" % datetime.datetime.now().isoformat(timespec="seconds"))
    from devtools import simulate as sim

    times_file = os.path.join(workdir, "times.json")
    previous = {}
    if reuse and os.path.exists(times_file):
        with open(times_file) as fh:
            previous = json.load(fh)
    times = dict(previous) if reuse else {}
    results, corrections, sim_args = {}, {}, {}
    for crystal in crystals:
        crystal_dir = os.path.join(workdir, crystal)
        sim_dir = os.path.join(crystal_dir, "simulation")
        args = simulation_arguments(sim_dir, image_size, n_images, seed, nproc, preset=crystal)
        sim_args[crystal] = args
        sim_params = sim.get_params(args)
        crystal_times = times.setdefault(crystal, {})
        if not (reuse and _simulation_matches(sim_dir, sim_params)):
            if os.path.exists(sim_dir):
                shutil.rmtree(sim_dir)
            log.write("%s -m devtools.simulate %s\n" % (sys.executable, " ".join(args)))
            t0 = time.time()
            simulate(sim_dir, image_size, n_images, seed, nproc, preset=crystal)
            crystal_times["simulation"] = time.time() - t0
            with open(times_file, "w") as fh:
                json.dump(times, fh, indent=2)
        results[crystal], corrections[crystal] = {}, {}
        for lane in lanes:
            results[crystal][lane], corrections[crystal][lane] = {}, {}
            lane_times = crystal_times.setdefault(lane, {})
            for name in columns[lane]:
                t0 = time.time()
                dataset_dir = os.path.join(crystal_dir, lane, name)
                paths = {n: os.path.join(dataset_dir, n) for n in OUTPUTS}
                stamp = {"lane": {k: lane_info[lane].get(k) for k in STAMP_KEYS}, "dataset": name, "simulation": args[1:-1], "d_min": d_min, "protocol": PROTOCOL,
                         "correction": list(CORRECTION_ARGUMENTS.get(name, ()))}
                stamp_file = os.path.join(dataset_dir, "validate.json")
                reused = reuse and os.path.exists(paths["scaled.mtz"]) and _same_stamp(stamp_file, stamp)
                if not reused:
                    if os.path.exists(dataset_dir):
                        shutil.rmtree(dataset_dir)
                    log.write("# %s crystal, lane %s (%s), dataset %s\n" % (crystal, lane, lane_info[lane]["label"], name))
                    paths = process(dataset_dir, name, sim_dir, sim_params, d_min, nproc, log, envs[lane])
                    with open(stamp_file, "w") as fh:
                        json.dump(stamp, fh, indent=1)
                    lane_times[name] = time.time() - t0
                    with open(times_file, "w") as fh:  # kept if a later step fails
                        json.dump(times, fh, indent=2)
                results[crystal][lane][name] = statistics(
                    paths["scaled.expt"],
                    paths["scaled.refl"],
                    os.path.join(sim_dir, "truth_intensities.mtz"),
                    d_min=d_min,
                    scaled_mtz=paths["scaled.mtz"],
                    integrated=count_integrated(paths["integrated.refl"], lane_info[lane]["python"], envs[lane]),
                )
                results[crystal][lane][name]["trusted_range"] = imported_trusted_range(dataset_dir)
                summary = correction_summary(dataset_dir)
                if summary:
                    results[crystal][lane][name]["correction"] = summary
                    corrections[crystal][lane][name] = summary
    log.close()
    with open(times_file, "w") as fh:
        json.dump(times, fh, indent=2)
    with open(os.path.join(workdir, "statistics.json"), "w") as fh:
        json.dump(results, fh, indent=2)

    info = {
        "image_size": image_size,
        "n_images": n_images,
        "seed": seed,
        "nproc": nproc,
        "d_min": d_min,
        "osc_width": sim_params.osc_width,
        "workdir": workdir,
        "times": times,
        "wall_time": time.time() - start,
        # with reused datasets, the time the whole run would take: the sum
        # of the recorded times of what the report shows
        "total_time": sum(
            times[c].get("simulation", 0) + sum(times[c].get(lane, {}).get(n, 0) for lane in lanes for n in columns[lane])
            for c in crystals
        )
        if reuse
        else time.time() - start,
        "lanes": lane_info,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "simulation_parameters": {c: a[1:-1] for c, a in sim_args.items()},
        "symmetry": _symmetry_arguments(sim_params),
        "default_assignment": default_assignment(),
    }
    with open(os.path.join(workdir, "info.json"), "w") as fh:
        json.dump(info, fh, indent=2)
    return results, info


#: what identifies the programs of a lane in a dataset's validate.json
STAMP_KEYS = ("lane", "python", "dials_version", "dials", "dxtbx", "plugin", "plugin_version")


def _same_stamp(path, stamp):
    if not os.path.exists(path):
        return False
    with open(path) as fh:
        return json.load(fh) == json.loads(json.dumps(stamp))


def _labels(results, info):
    """{lane: {dataset: column label}}."""
    lanes = info["lanes"]
    return {
        lane: {name: column_label(lane, name, lanes) for name in by_dataset}
        for crystal in results.values()
        for lane, by_dataset in crystal.items()
    }


def _lane_description(info, lane):
    i = info["lanes"][lane]
    return "%s, dxtbx %s (`%s/dials.*`, %s; dials-truncfix %s from %s)" % (
        i["dials_version"], i["dxtbx"], i["programs"], i["python"], i["plugin_version"], i["plugin"])


DATASET_TEXT = {
    "truth": "the signed images before truncation (CBF)",
    "truncated": "negative pixels set to 0 (what the camera wrote, SMV)",
    "distribution": "truncated images after `dials.correct_truncation truncfix.assignment=distribution` (CBF output)",
    "expectation": "the same with `truncfix.assignment=expectation`",
    "sectors": "the same with `truncfix.assignment=%s truncfix.n_sectors=%d`" % (SECTORS_ASSIGNMENT, N_SECTORS),
    "on_read": "the truncated images imported with `DIALS_TRUNCFIX=1` (correction on read, default parameters, "
    "set for `dials.import` only)",
}


def zeros_masked(truncated, lane_info):
    """Whether the lane's dxtbx masks the zero pixels of the truncated
    images (from the trusted range dials.import recorded and the lane's
    trusted-range semantics), or None if unknown."""
    if not truncated or not truncated.get("trusted_range"):
        return None
    low, high = truncated["trusted_range"]
    if lane_info.get("trusted_range_inclusive"):
        return not low <= 0 <= high
    return not low < 0 < high


def _trusted_range_text(results, info, labels):
    """How each lane's dxtbx reads the truncated SMVs' trusted range."""
    parts = []
    for lane, lane_info in info["lanes"].items():
        for by_lane in results.values():
            r = by_lane.get(lane, {}).get("truncated")
            if r and r.get("trusted_range"):
                low, high = r["trusted_range"]
                inclusive = lane_info.get("trusted_range_inclusive")
                zero_valid = not zeros_masked(r, lane_info)
                parts.append(
                    "%s reads it as %g..%g %s: zero pixels %s"
                    % (lane_info["dials_version"].replace("DIALS ", "DIALS "), low, high,
                       "inclusive" if inclusive else "exclusive", "valid" if zero_valid else "masked")
                )
                break
    return ("Trusted range of the truncated SMVs: " + "; ".join(parts) + ".") if parts else ""


def report(results, info, command):
    """The complete markdown document."""
    labels = _labels(results, info)
    lanes = [l for l in _lane_order(info["lanes"])]
    times = info["times"]
    time_parts = []
    for crystal in results:
        ct = times.get(crystal, {})
        parts = ["simulation %.0f s" % ct.get("simulation", float("nan"))]
        for lane in lanes:
            parts += ["%s %.0f s" % (labels[lane][n], ct.get(lane, {}).get(n, float("nan"))) for n in results[crystal].get(lane, {})]
        time_parts.append("%s: %s" % (crystal, ", ".join(parts)))
    lines = [
        "# Validation against a simulated truth (issues 5, 8 and 12)",
        "",
        "Generated by (`make validate` runs it with the default options):",
        "",
        "    " + command,
        "",
        "- Date: %s; wall time %.1f min on %d processes (%s)"
        % (info["date"], info["total_time"] / 60, info["nproc"], "; ".join(time_parts)),
        "- Lanes (each runs its own programs; the statistics are computed by %s): %s"
        % (info.get("driver", sys.executable), "; ".join("%s = %s" % (lane, _lane_description(info, lane)) for lane in lanes)),
        "- Simulation, one sweep per crystal: %s (%s x %s pixels, %d images of %.2f deg, other parameters at "
        "their defaults; the weak crystal is the strong one with a tenth of the flux)"
        % (
            "; ".join("`python -m devtools.simulate %s`" % " ".join(a) for a in info["simulation_parameters"].values()),
            info["image_size"], info["image_size"], info["n_images"], info["osc_width"],
        ),
        "- Processing, identical for every column: `dials.import` (on read: with `DIALS_TRUNCFIX=1`); (corrected "
        "images: `dials.correct_truncation imported.expt nproc=%d truncfix...`, CBF output); `dials.find_spots`; "
        "`dials.index %s`; `dials.refine`; `dials.integrate`; `dials.scale d_min=... anomalous=False` (d_min = "
        "%g A in the true cell, expressed in the dataset's refined cell, so that a cell refined slightly off "
        "does not change which reflections are kept); "
        "`dials.export format=mtz`. Every command line is in `%s/commands.log`."
        % (info["nproc"], " ".join(info["symmetry"]), info["d_min"], os.path.basename(info["workdir"])),
        "- Columns: " + "; ".join(
            "%s = %s" % (", ".join(labels[lane][name] for lane in lanes if name in labels[lane]), DATASET_TEXT[name])
            for name in DATASETS
            if any(name in labels[lane] for lane in lanes)
        ) + ". " + _trusted_range_text(results, info, labels),
        "",
        "Definitions: statistics with the known cell and space group, so all datasets share the "
        "resolution bins. Merging statistics by `iotbx.merging_statistics` on the unmerged scaled "
        "intensities (settings of dials.scale: no sigma filter, sigmas not from internal variance), "
        "%d shells of equal reciprocal volume between the common d_max and d_min (the same shells for every "
        "column; n/a where a column has no data), the last being the highest-resolution shell. Truth comparison: "
        "merged intensities matched by Miller index to `truth_intensities.mtz`; one scale factor k fitted by "
        "least squares (I_obs ~ k I_true) on all matched reflections; z = (I_obs - k I_true)/sigma(I_obs); "
        "*weak* = true intensity below the median true intensity of all unique reflections of its "
        "resolution shell (a truth-only definition, so the same reflections are selected in every dataset); "
        "`k_shell / k` is the per-shell least-squares scale relative to the overall one. For unbiased "
        "intensities with correct sigmas, weak <z> ~ 0 and rms(z) ~ 1; at low resolution the 'weak' half "
        "is still strong (<I/sigI> >> 1), so there z measures small systematic errors of integration in units "
        "of small sigmas, and moves with the error model dials.scale fits to each column. The weak relative "
        "bias <I - k I_true>/<k I_true> measures the bias of the same reflections without the sigmas. "
        "'Outer shells' are the %d outermost of the %d truth-comparison shells. "
        "Standard errors: of k_shell from the sigmas, sqrt(sum I_true^2 sigma^2) / sum I_true^2; of weak <z> "
        "from the scatter of z. The merging table also lists dials.scale's error model (a, b: "
        "sigma'^2 = a^2 (sigma^2 + (b I)^2)) and the spread (max - min) of the parameters of its decay "
        "component (a relative B along the sweep): the sigmas, and the resolution dependence of the scaled "
        "intensities, depend on both."
        % (MERGING_SHELLS, OUTER, TRUTH_SHELLS),
        "",
    ]
    decisions, verdicts = {}, {}
    for crystal, by_lane in results.items():
        lines += ["## %s crystal (`preset=%s`)" % (crystal.capitalize(), crystal), ""]
        columns = [(labels[lane][n], r) for lane in lanes for n, r in by_lane.get(lane, {}).items()]
        lines += [table(columns), ""]
        for lane in lanes:
            lane_results = by_lane.get(lane, {})
            if not all(n in lane_results for n in REFERENCES) or len(lane_results) < 3:
                continue
            lines += [
                comparison_table(
                    lane_results, labels[lane],
                    "Gap removed, %s (against the truncated column of this lane)" % info["lanes"][lane]["dials_version"],
                ),
                "",
            ]
        lines += ["### What improves and what does not", ""]
        for lane in lanes:
            lane_results = by_lane.get(lane, {})
            if not all(n in lane_results for n in REFERENCES):
                continue
            label = info["lanes"][lane]["dials_version"]
            mode = info["default_assignment"]
            if mode in lane_results:
                lines += [
                    "%s, default assignment (%s):" % (label, mode),
                    "",
                    discussion(lane_results["truth"], lane_results["truncated"], lane_results[mode], mode, label),
                    "",
                ]
            if ON_READ in lane_results and not zeros_masked(lane_results["truncated"], info["lanes"][lane]):
                lines += [
                    "%s, corrected on read:" % label,
                    "",
                    discussion(lane_results["truth"], lane_results["truncated"], lane_results[ON_READ], "on-read", label),
                    "",
                ]
            elif ON_READ in lane_results:
                lines += [
                    masked_discussion(
                        lane_results["truth"], lane_results["truncated"], lane_results[ON_READ], label,
                        lane_results["truncated"].get("trusted_range"),
                    ),
                    "",
                ]
        for lane in lanes:
            lane_results = by_lane.get(lane, {})
            if all(n in lane_results for n in REFERENCES + ASSIGNMENTS) and crystal not in decisions:
                decisions[crystal] = choose_assignment(lane_results, info["default_assignment"])
                decision_lane = lane
            if all(n in lane_results for n in REFERENCES + (SECTORS_ASSIGNMENT, "sectors")) and crystal not in verdicts:
                verdicts[crystal] = sectors_verdict(lane_results, {n: lane_results[n].get("correction") for n in lane_results})
                sectors_lane = lane
    if decisions:
        lines += [assignment_section(decisions, info["lanes"][decision_lane]["dials_version"]), ""]
    if verdicts:
        lines += [sectors_section(verdicts, info["lanes"][sectors_lane]["dials_version"]), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="validation.md", help="markdown report to write")
    parser.add_argument("--workdir", default="validation_work", help="working directory (simulation and processing)")
    parser.add_argument("--image-size", type=int, default=2048)
    parser.add_argument("--n-images", type=int, default=90)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--d-min", type=float, default=1.3)
    parser.add_argument("--crystals", nargs="+", choices=CRYSTALS, default=list(CRYSTALS))
    parser.add_argument("--lanes", nargs="+", choices=LANES + ("this",), default=list(LANES),
                        help="debian: /usr/bin/dials.*; current: the --current-venv; this: the programs on PATH")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=None,
                        help="only these columns (of each lane that has them; default: all)")
    parser.add_argument("--current-venv", default=DEFAULT_CURRENT_VENV, help="the current-DIALS virtualenv (make setup-current)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the simulation and processed datasets found in workdir (when made with the same parameters)")
    args = parser.parse_args(argv)
    python = "/usr/bin/python3" if os.path.realpath(sys.executable) == os.path.realpath("/usr/bin/python3") else sys.executable
    command = "%s -m devtools.validate %s" % (
        python, " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    )
    try:
        results, info = run_validation(
            args.workdir, args.image_size, args.n_images, args.seed, args.nproc, args.d_min, args.reuse,
            crystals=args.crystals, lanes=args.lanes, datasets=args.datasets, current_venv=args.current_venv,
        )
    except StepError as e:
        sys.exit("validate: %s" % e)
    info["driver"] = python
    text = report(results, info, command)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as fh:
        fh.write(text)
    print(text)
    print("Wrote %s (%.1f min)" % (args.output, info["wall_time"] / 60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
