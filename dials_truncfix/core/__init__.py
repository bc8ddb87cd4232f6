"""The numerical core of the correction (numpy and scipy only, no DIALS):

* :mod:`.shells`: resolution shells of equal valid-pixel count (optionally
  split into azimuthal sectors): the regions modelled separately;
* :mod:`.histogram`: low-count histograms per region and the choice of Imax;
* :mod:`.lognormal`: the maximum-likelihood fit of a shifted lognormal,
  closed by its normal limit;
* :mod:`.truncation`: whether a region's zeros are truncation at all;
* :mod:`.assignment`: the values given to the zero pixels (independent draws);
* :mod:`.parameters`: what controls the correction;
* :mod:`.correction`: one image, end to end.
"""

#: the version of the correction algorithm: same input, settings and seed give
#: the same pixels within one version; recorded with the settings.
#: 1: dials-truncfix 0.1-0.2 (exact per-region counts by largest remainder,
#: shuffled); 2: fits on a fixed pixel subsample (an image's regions fitted
#: together), independent draws through 65536-slot lookup tables, Newton
#: stopped at the objective's rounding, and the truncation test (regions
#: whose zeros are not truncation left alone); 3: the fit in location, scale
#: and shape, the normal (shape 0) included, so that near-Gaussian read noise
#: fits (dials-truncfix 0.4).
from __future__ import annotations

ALGORITHM = 3
