"""What controls the correction (the PHIL help in dials_truncfix.phil
explains each parameter to the user)."""

from __future__ import annotations

from dataclasses import dataclass

from dials_truncfix.core.assignment import ASSIGNMENTS
from dials_truncfix.core.lognormal import LIKELIHOODS


@dataclass(frozen=True)
class CorrectionParameters:
    n_shells: int = 10
    likelihood: str = "exact"
    histogram_max: int | None = None
    histogram_quantile: float | None = None
    min_pixels_per_shell: int = 1000
    seed: int = 0
    fit_all_shells: bool = False
    assignment: str = "distribution"
    n_sectors: int = 1

    def __post_init__(self):
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}")
        if self.assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment must be one of {ASSIGNMENTS}")
        if self.histogram_quantile is not None and not 0 < self.histogram_quantile <= 1:
            raise ValueError("histogram_quantile must be in (0, 1]")
        if self.histogram_max is not None and self.histogram_max < 3:
            raise ValueError("histogram_max must be at least 3")
        if self.seed < 0:
            raise ValueError("seed must be non-negative")
