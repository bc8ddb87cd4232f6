"""The datasets of the validation (the columns of the report): which
versions of the simulated images each lane processes, and how each is made."""

from __future__ import annotations

#: the simulated crystals (devtools.simulate presets)
CRYSTALS = ("strong", "weak", "readnoise")

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
    "sectors": (
        "truncfix.assignment=%s" % SECTORS_ASSIGNMENT,
        "truncfix.n_sectors=%d" % N_SECTORS,
    ),
}
#: the dataset corrected on read: DIALS_TRUNCFIX=1 exported for dials.import
ON_READ = "on_read"


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


#: what each dataset is, as the report says it
DATASET_TEXT = {
    "truth": "the signed images before truncation (CBF)",
    "truncated": "negative pixels set to 0 (what the camera wrote, SMV)",
    "distribution": "truncated images after `dials.correct_truncation truncfix.assignment=distribution` (CBF output)",
    "expectation": "the same with `truncfix.assignment=expectation`",
    "sectors": "the same with `truncfix.assignment=%s truncfix.n_sectors=%d`"
    % (SECTORS_ASSIGNMENT, N_SECTORS),
    "on_read": "the truncated images imported with `DIALS_TRUNCFIX=1` (correction on read, default parameters, "
    "set for `dials.import` only)",
}
