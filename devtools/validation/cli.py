"""The command line of the validation: ``python -m devtools.validation
[phil]``, PHIL ``key=value`` arguments as in :mod:`devtools.simulate`."""

from __future__ import annotations

import logging
import os
import shlex
import sys

import libtbx.phil
from libtbx.utils import Sorry

import devtools.validation
from devtools.validation.datasets import CRYSTALS, DATASETS
from devtools.validation.driver import run_validation
from devtools.validation.lanes import DEFAULT_CURRENT_DIALS, LANES, StepError
from devtools.validation.report import report

logger = logging.getLogger("devtools.validation")

phil_scope = libtbx.phil.parse(
    """
output = validation.md
  .type = path
  .help = "The markdown report to write."
workdir = validation_work
  .type = path
  .help = "Working directory: simulations, processed datasets, commands.log,"
          "statistics.json and info.json (what the report is made from)."
image_size = 2048
  .type = int(value_min=16)
  .help = "Pixels N of the simulated N x N detector."
n_images = 90
  .type = int(value_min=1)
  .help = "Images per simulated sweep."
seed = 1
  .type = int(value_min=0)
  .help = "Seed of the simulations."
nproc = 2
  .type = int(value_min=1)
  .help = "Processes of the simulation and of the DIALS programs."
d_min = 1.3
  .type = float(value_min=0)
  .help = "The common resolution limit (A, in the true cell)."
crystals = %(crystals)s
  .type = choice(multi=True)
  .help = "The simulated crystals (devtools.simulate presets)."
lanes = %(lanes)s
  .type = choice(multi=True)
  .help = "debian: /usr/bin/dials.*; current: the programs of current_dials;"
          "this: the programs on PATH as they are."
datasets = %(datasets)s
  .type = choice(multi=True)
  .help = "Only these columns (of each lane that has them); none chosen: all."
current_dials = None
  .type = path
  .help = "The current-DIALS environment (a conda-forge DIALS environment or a"
          "virtualenv whose python imports dials); None: %(venv)s"
reuse = False
  .type = bool
  .help = "Reuse the simulations and processed datasets found in workdir"
          "when they were made with the same parameters and programs."
"""
    % {
        "crystals": " ".join("*" + c for c in CRYSTALS),
        "lanes": " ".join(["*" + lane for lane in LANES] + ["this"]),
        "datasets": " ".join(DATASETS),
        "venv": DEFAULT_CURRENT_DIALS,
    }
)


def main(argv: list[str] | None = None) -> int:
    """Run the validation and write its report; a one-line error on bad
    arguments or a failing program."""
    args = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help", "-c", "--show-config") for a in args):
        print(devtools.validation.__doc__)
        print(phil_scope.as_str(attributes_level=1))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    python = (
        "/usr/bin/python3"
        if os.path.realpath(sys.executable) == os.path.realpath("/usr/bin/python3")
        else sys.executable
    )
    command = "%s -m devtools.validation %s" % (
        python,
        " ".join(shlex.quote(a) for a in args),
    )
    try:
        params = (
            phil_scope.command_line_argument_interpreter(home_scope="")
            .process_and_fetch(args)
            .extract()
        )
        results, info = run_validation(
            params.workdir,
            params.image_size,
            params.n_images,
            params.seed,
            params.nproc,
            params.d_min,
            params.reuse,
            crystals=params.crystals,
            lanes=params.lanes,
            datasets=params.datasets or None,
            current_dials=os.path.expanduser(
                params.current_dials or DEFAULT_CURRENT_DIALS
            ),
        )
    except (Sorry, StepError) as e:
        sys.exit("devtools.validation: %s" % e)
    info["driver"] = python
    text = report(results, info, command)
    os.makedirs(os.path.dirname(os.path.abspath(params.output)), exist_ok=True)
    with open(params.output, "w") as fh:
        fh.write(text)
    logger.info(text)
    logger.info("Wrote %s (%.1f min)", params.output, info["wall_time"] / 60)
    return 0
