"""The validation run: simulate each crystal, process every dataset of every
lane, compute the statistics, and record them (statistics.json, info.json,
times.json and commands.log in the working directory).  With ``reuse``, a
simulation or dataset made before with the same parameters and programs is
kept."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import time

from devtools import simulate as simulator
from devtools.validation.datasets import (
    CORRECTION_ARGUMENTS,
    CRYSTALS,
    default_assignment,
    lane_datasets,
)
from devtools.validation.lanes import (
    DEFAULT_CURRENT_DIALS,
    LANES,
    StepError,
    describe_lane,
    lane_environment,
    lane_order,
)
from devtools.validation.processing import (
    OUTPUTS,
    PROTOCOL,
    correction_summary,
    imported_trusted_range,
    process,
    simulate,
    simulation_arguments,
    simulation_matches,
    symmetry_arguments,
)
from devtools.validation.statistics import count_integrated, dataset_statistics


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
    current_dials=DEFAULT_CURRENT_DIALS,
):
    """Simulate, process and analyse.  Returns (results, info), results =
    {crystal: {lane: {dataset: statistics dict}}}.  ``datasets`` (None: all
    of each lane's) restricts the columns (see lane_datasets)."""
    workdir = os.path.abspath(workdir)
    start = time.time()
    os.makedirs(workdir, exist_ok=True)
    lanes = lane_order(lanes)
    envs = {lane: lane_environment(lane, current_dials) for lane in lanes}
    lane_info = {lane: describe_lane(lane, envs[lane]) for lane in lanes}
    columns = {lane: lane_datasets(lane, datasets) for lane in lanes}
    if not any(columns.values()):
        raise StepError(
            "no dataset of %s in lanes %s" % (" ".join(datasets), " ".join(lanes))
        )
    log = open(os.path.join(workdir, "commands.log"), "a")
    log.write("# %s\n" % datetime.datetime.now().isoformat(timespec="seconds"))
    times_file = os.path.join(workdir, "times.json")
    previous = {}
    if reuse and os.path.exists(times_file):
        with open(times_file) as fh:
            previous = json.load(fh)
    times = dict(previous) if reuse else {}
    results, sim_args = {}, {}
    for crystal in crystals:
        crystal_dir = os.path.join(workdir, crystal)
        sim_dir = os.path.join(crystal_dir, "simulation")
        args = simulation_arguments(
            sim_dir, image_size, n_images, seed, nproc, preset=crystal
        )
        sim_args[crystal] = args
        sim_params = simulator.get_params(args)
        crystal_times = times.setdefault(crystal, {})
        if not (reuse and simulation_matches(sim_dir, sim_params)):
            if os.path.exists(sim_dir):
                shutil.rmtree(sim_dir)
            log.write("%s -m devtools.simulate %s\n" % (sys.executable, " ".join(args)))
            t0 = time.time()
            simulate(sim_params)
            crystal_times["simulation"] = time.time() - t0
            with open(times_file, "w") as fh:
                json.dump(times, fh, indent=2)
        results[crystal] = {}
        for lane in lanes:
            results[crystal][lane] = {}
            lane_times = crystal_times.setdefault(lane, {})
            for name in columns[lane]:
                t0 = time.time()
                dataset_dir = os.path.join(crystal_dir, lane, name)
                paths = {n: os.path.join(dataset_dir, n) for n in OUTPUTS}
                stamp = {
                    "lane": {k: lane_info[lane].get(k) for k in STAMP_KEYS},
                    "dataset": name,
                    "simulation": args[1:-1],
                    "d_min": d_min,
                    "protocol": PROTOCOL,
                    "correction": list(CORRECTION_ARGUMENTS.get(name, ())),
                }
                stamp_file = os.path.join(dataset_dir, "validate.json")
                reused = (
                    reuse
                    and os.path.exists(paths["scaled.mtz"])
                    and _same_stamp(stamp_file, stamp)
                )
                if not reused:
                    if os.path.exists(dataset_dir):
                        shutil.rmtree(dataset_dir)
                    log.write(
                        "# %s crystal, lane %s (%s), dataset %s\n"
                        % (crystal, lane, lane_info[lane]["label"], name)
                    )
                    paths = process(
                        dataset_dir,
                        name,
                        sim_dir,
                        sim_params,
                        d_min,
                        nproc,
                        log,
                        envs[lane],
                    )
                    with open(stamp_file, "w") as fh:
                        json.dump(stamp, fh, indent=1)
                    lane_times[name] = time.time() - t0
                    with open(times_file, "w") as fh:  # kept if a later step fails
                        json.dump(times, fh, indent=2)
                results[crystal][lane][name] = dataset_statistics(
                    paths["scaled.expt"],
                    paths["scaled.refl"],
                    os.path.join(sim_dir, "truth_intensities.mtz"),
                    d_min=d_min,
                    scaled_mtz=paths["scaled.mtz"],
                    integrated=count_integrated(
                        paths["integrated.refl"], lane_info[lane]["python"], envs[lane]
                    ),
                )
                results[crystal][lane][name]["trusted_range"] = imported_trusted_range(
                    dataset_dir
                )
                summary = correction_summary(dataset_dir)
                if summary:
                    results[crystal][lane][name]["correction"] = summary
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
            times[c].get("simulation", 0)
            + sum(
                times[c].get(lane, {}).get(n, 0)
                for lane in lanes
                for n in columns[lane]
            )
            for c in crystals
        )
        if reuse
        else time.time() - start,
        "lanes": lane_info,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "simulation_parameters": {c: a[1:-1] for c, a in sim_args.items()},
        "symmetry": symmetry_arguments(sim_params),
        "default_assignment": default_assignment(),
    }
    with open(os.path.join(workdir, "info.json"), "w") as fh:
        json.dump(info, fh, indent=2)
    return results, info


#: what identifies the programs of a lane in a dataset's stamp (validate.json)
STAMP_KEYS = (
    "lane",
    "python",
    "dials_version",
    "dials",
    "dxtbx",
    "plugin",
    "plugin_version",
)


def _same_stamp(path, stamp):
    """Whether the stamp file at ``path`` records ``stamp`` (as JSON reads it back)."""
    if not os.path.exists(path):
        return False
    with open(path) as fh:
        return json.load(fh) == json.loads(json.dumps(stamp))
