"""The JSON record of a dials.correct_truncation run (strict JSON: a value
that is not a finite number, such as the parameters of a failed fit, is
written as null)."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dials_truncfix.program.tasks import SweepResult
    from dials_truncfix.settings import Settings


def _strict(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


#: the version of the record's layout: 1 (dials-truncfix 0.1-0.3, no
#: "version"): imagesets under "sweeps", each numbered by "sweep"; 2: under
#: "sequences", numbered by "sequence" (DIALS' word since 3.0), fits with
#: their model, location, scale and shape
RECORD_VERSION = 2


def run_record(results: list[SweepResult], settings: Settings, fmt: str) -> dict:
    """What the run did, per imageset and image, without the report's histograms."""
    return {
        "program": "dials.correct_truncation",
        "version": RECORD_VERSION,
        "parameters": {
            **dataclasses.asdict(settings.parameters),
            "detector": settings.detector,
            "format": fmt,
        },
        "sequences": [
            {
                "sequence": r.plan.number,
                "description": r.plan.description,
                "not_corrected": r.plan.refused,
                "lowest_value": r.lowest_value,
                **({"pedestal": r.pedestal} if fmt == "smv" else {}),
                "images": [
                    {k: v for k, v in s.items() if k != "histograms"} for s in r.images
                ],
            }
            for r in results
        ],
    }


def sequences(record: dict) -> list:
    """The per-imageset entries of a record of any version (each with
    "sequence", its number), older records (version 1: "sweeps") included."""
    if record.get("version", 1) >= 2:
        return record["sequences"]
    return [
        {**{k: v for k, v in entry.items() if k != "sweep"}, "sequence": entry["sweep"]}
        for entry in record["sweeps"]
    ]


def as_json(record: dict) -> str:
    return json.dumps(_strict(record), indent=1, sort_keys=True, allow_nan=False)
