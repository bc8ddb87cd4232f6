"""The demo behind `make demo`: a small simulated MicroED sweep truncated by
the camera, corrected by dials.correct_truncation and on read, compared with
the truth, and processed by DIALS.

    /usr/bin/python3 -m devtools.demo [directory]
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np

from devtools import simulate
from dials_truncfix.program.record import sequences
from dials_truncfix.settings import ENVIRONMENT_VARIABLE

MARKER = ".dials-truncfix-demo"
SIMULATION = ["image_size=1024", "n_images=12", "seed=2016", "output.nproc=2"]


def _run(args, cwd, **env_extra):
    env = {k: v for k, v in os.environ.items() if k != ENVIRONMENT_VARIABLE}
    env.update(env_extra)
    shown = " ".join(f"{k}={v}" for k, v in env_extra.items())
    print(f"$ {shown + ' ' if shown else ''}{' '.join(args)}", flush=True)
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(
            f"demo: {args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result.stdout


def _spots(stdout):
    for line in stdout.splitlines():
        if line.startswith("Saved") and "reflections" in line:
            return int(line.split()[1])
    return None


def _pixels(expt, index):
    from dxtbx.model.experiment_list import ExperimentList

    imageset = ExperimentList.from_file(expt)[0].imageset
    return imageset.get_raw_data(index)[0].as_numpy_array().ravel()


def compare_with_truth(directory, image_index=0):
    """Per shell of one image: how the values given to the truncated pixels
    compare with the true values of the same pixels."""
    from dxtbx.model.experiment_list import ExperimentList

    with open(os.path.join(directory, "dials.correct_truncation.json")) as fh:
        record = json.load(fh)
    shells = sequences(record)[0]["images"][image_index]["shells"]
    imported = ExperimentList.from_file(os.path.join(directory, "imported.expt"))[
        0
    ].imageset
    from dials_truncfix.corrector import corrector_for
    from dials_truncfix.geometry import shell_geometry
    from dials_truncfix.phil import correction_parameters, correction_phil_scope

    params = correction_parameters(correction_phil_scope.extract().truncfix)
    geometry = shell_geometry(imported.get_beam(), imported.get_detector())
    labels = corrector_for(geometry, params).shell_map.labels
    truncated = imported.get_raw_data(image_index)[0].as_numpy_array().ravel()
    corrected = _pixels(os.path.join(directory, "corrected.expt"), image_index)
    truth_files = sorted(
        glob.glob(os.path.join(directory, "simulated", "truth", "*.cbf"))
    )
    import dxtbx

    truth = dxtbx.load(truth_files[image_index]).get_raw_data().as_numpy_array().ravel()
    assert np.array_equal(np.clip(truth, 0, 65535), truncated), (
        "simulation and import disagree"
    )

    print(
        f"\nImage {image_index + 1}: the truncated pixels of each shell, truth against correction"
    )
    print(
        " shell  d range (A)   truncated   true mean (sd)   corrected mean (sd)   fit theta  mu  sigma"
    )
    for shell in shells:
        k = shell["shell"]
        lost = (labels == k) & (truncated == 0)
        if not lost.any():
            continue
        t, c = truth[lost], corrected[lost]
        fit = shell.get("fit") or {}
        print(
            f"{k + 1:5d} {shell['d_max']:6.2f}-{shell['d_min']:5.2f} {lost.sum() / max(1, (labels == k).sum()):10.1%}"
            f"   {t.mean():6.2f} ({t.std():5.2f})    {c.mean():6.2f} ({c.std():5.2f})"
            + (
                f"        {fit['theta']:7.2f} {fit['mu']:5.2f} {fit['sigma']:5.2f}"
                if fit
                else ""
            )
        )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    directory = os.path.abspath(argv[0] if argv else "demo")
    if os.path.exists(directory):
        if not os.path.exists(os.path.join(directory, MARKER)):
            sys.exit(
                f"demo: {directory} exists and is not a demo directory: choose another"
            )
        shutil.rmtree(directory)
    os.makedirs(directory)
    open(os.path.join(directory, MARKER), "w").close()

    print(
        "Simulating a 12-image MicroED sweep (1024x1024, proteinase-K-like crystal, truncating camera)"
    )
    print(
        f"$ python -m devtools.simulate output.directory=simulated {' '.join(SIMULATION)}",
        flush=True,
    )
    simulate.run(
        [f"output.directory={os.path.join(directory, 'simulated')}", *SIMULATION]
    )
    images = sorted(
        glob.glob(os.path.join(directory, "simulated", "truncated", "*.img"))
    )
    truth_images = sorted(
        glob.glob(os.path.join(directory, "simulated", "truth", "*.cbf"))
    )

    _run(["dials.import", *images, "output.experiments=imported.expt"], directory)
    out = _run(["dials.correct_truncation", "imported.expt", "nproc=2"], directory)
    print(
        "\n".join(
            line
            for line in out.splitlines()
            if line.startswith(("Sweep", "Wrote", "Nothing"))
        )
    )
    compare_with_truth(directory)

    print()
    _run(["dials.import", *truth_images, "output.experiments=truth.expt"], directory)
    spots = {
        name: _spots(
            _run(
                [
                    "dials.find_spots",
                    expt,
                    f"output.reflections=strong_{name}.refl",
                    "nproc=2",
                ],
                directory,
            )
        )
        for name, expt in (
            ("truth", "truth.expt"),
            ("truncated", "imported.expt"),
            ("corrected", "corrected.expt"),
        )
    }
    on_read = os.path.join(directory, "on_read")
    os.makedirs(on_read)
    _run(
        ["dials.import", *images, "output.experiments=imported.expt"],
        on_read,
        **{ENVIRONMENT_VARIABLE: "1"},
    )
    spots["corrected on read"] = _spots(
        _run(["dials.find_spots", "imported.expt", "nproc=2"], on_read)
    )
    same = np.array_equal(
        _pixels(os.path.join(on_read, "imported.expt"), 0),
        _pixels(os.path.join(directory, "corrected.expt"), 0),
    )

    print(
        "\nSpots found by dials.find_spots: "
        + ", ".join(f"{k} {v}" for k, v in spots.items())
    )
    print(f"Pixels read on read equal the corrected images: {same}")
    print(f"Report: {os.path.join(directory, 'dials.correct_truncation.html')}")
    print(f"All outputs in {directory}")


if __name__ == "__main__":
    main()
