"""The correction settings as recorded in an experiment list, and the
``DIALS_TRUNCFIX`` environment variable that asks for them where image
files become imagesets (format_wrapper.py says when that is).

An imageset corrected on read carries its settings in its format parameters
(``imageset.params()["truncfix"]``), which dxtbx writes into every .expt and
which every later program reads back, whatever its environment says.

The record is versioned.  Version 1 (dials-truncfix 0.1) was the flat dict of
the parameters plus ``mask``; version 2 nests the parameters and adds the
detector choice and, optionally, the shell geometry fixed when the record was
written (``dials.correct_truncation output.format=on_read`` fixes it; a record
made at import leaves it to the experiment list).  Older records are migrated
on read; a record of a newer release is refused with a clear message.

The record also names the correction algorithm that wrote it (``algorithm``;
records of dials-truncfix 0.1-0.2 have none: algorithm 1).  A record of
another algorithm is read with the current one, and one warning per process
and record says that its corrected pixels may differ from what earlier
processing steps saw.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass

from libtbx.utils import Sorry

from dials_truncfix.core import ALGORITHM
from dials_truncfix.core.correction import RecentKeys
from dials_truncfix.core.parameters import CorrectionParameters
from dials_truncfix.geometry import ShellGeometry
from dials_truncfix.phil import (
    correction_parameters,
    correction_phil_scope,
    read_phil_file,
)

ENVIRONMENT_VARIABLE = "DIALS_TRUNCFIX"
#: the key of the record in an imageset's format parameters
FORMAT_KWARG = "truncfix"
RECORD_VERSION = 2
#: the algorithm of records that do not name one (dials-truncfix 0.1-0.2)
FIRST_ALGORITHM = 1

logger = logging.getLogger(f"dials.{__name__}")


class TruncfixError(Sorry):
    """Bad settings for the correction on read: DIALS programs report a
    Sorry as a one-line error."""


@dataclass(frozen=True)
class Settings:
    """What the correction of an imageset needs besides its images."""

    parameters: CorrectionParameters
    mask: str | None = None  # truncfix.mask: a DIALS mask file
    detector: str = "auto"  # truncfix.detector
    geometry: ShellGeometry | None = None  # fixed shell geometry, if any

    def to_record(self) -> dict:
        """The JSON-able record kept in the experiment list."""
        return {
            "version": RECORD_VERSION,
            "algorithm": ALGORITHM,
            "parameters": dataclasses.asdict(self.parameters),
            "mask": os.path.abspath(self.mask) if self.mask else None,
            "detector": self.detector,
            "geometry": None if self.geometry is None else self.geometry.to_record(),
        }

    @classmethod
    def from_record(cls, record: dict) -> Settings:
        record = dict(record)
        _note_algorithm(record)
        record.pop("algorithm", None)
        version = record.pop("version", 1)
        if version == 1:
            mask = record.pop("mask", None)
            return cls(CorrectionParameters(**record), mask)
        if version == RECORD_VERSION:
            geometry = record.get("geometry")
            return cls(
                CorrectionParameters(**record["parameters"]),
                record.get("mask"),
                record.get("detector", "auto"),
                None if geometry is None else ShellGeometry.from_record(geometry),
            )
        raise TruncfixError(
            f"the truncation-correction settings in this experiment list have format version "
            f"{version}; this dials-truncfix understands versions 1-{RECORD_VERSION}: upgrade dials-truncfix"
        )

    @classmethod
    def from_phil(cls, truncfix) -> Settings:
        """From an extracted ``truncfix`` PHIL scope."""
        mask = os.path.abspath(truncfix.mask) if truncfix.mask else None
        return cls(correction_parameters(truncfix), mask, truncfix.detector)


#: records already warned about (the latest REMEMBERED_KEYS: a long session reads many experiment lists)
noted_records = RecentKeys()


def _note_algorithm(record):
    """One warning per process and record written by another correction
    algorithm than this release's (its pixels are corrected with this one)."""
    algorithm = record.get("algorithm", FIRST_ALGORITHM)
    if algorithm == ALGORITHM:
        return
    key = json.dumps(record, sort_keys=True, default=str)
    if noted_records.first_time(key):
        logger.warning(
            "This experiment list was made with truncation-correction algorithm %s; its images are now corrected"
            " with algorithm %s, so corrected pixels may differ from what earlier processing steps saw:"
            " re-import the images (dials.import) for consistent results",
            algorithm,
            ALGORITHM,
        )


def variable_set(environ=os.environ) -> bool:
    """Whether DIALS_TRUNCFIX asks for the correction: set, not empty, not ``0``."""
    return environ.get(ENVIRONMENT_VARIABLE, "").strip() not in ("", "0")


def settings_from_environment(environ=os.environ) -> Settings | None:
    """The settings DIALS_TRUNCFIX asks for (``1`` for the defaults or the
    path of a PHIL file), or None when it does not ask (variable_set)."""
    if not variable_set(environ):
        return None
    value = environ[ENVIRONMENT_VARIABLE].strip()
    if value == "1":
        return Settings.from_phil(correction_phil_scope.extract().truncfix)
    try:
        return Settings.from_phil(read_phil_file(value)[1].truncfix)
    except ValueError as e:
        raise TruncfixError(f"{ENVIRONMENT_VARIABLE}: {e}") from None
