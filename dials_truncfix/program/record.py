"""The JSON record of a dials.correct_truncation run (strict JSON: a value
that is not a finite number, such as the parameters of a failed fit, is
written as null)."""

from __future__ import annotations

import dataclasses
import json
import math


def _strict(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def run_record(plans, settings, fmt):
    return {
        "program": "dials.correct_truncation",
        "parameters": {**dataclasses.asdict(settings.parameters), "detector": settings.detector, "format": fmt},
        "sweeps": [
            {
                "sweep": p.number,
                "description": p.description,
                "not_corrected": p.refused,
                "lowest_value": p.lowest_value,
                **({"pedestal": p.pedestal} if fmt == "smv" else {}),
                "images": [{k: v for k, v in s.items() if k != "histograms"} for s in p.corrections],
            }
            for p in plans
        ],
    }


def as_json(record):
    return json.dumps(_strict(record), indent=1, sort_keys=True, allow_nan=False)
