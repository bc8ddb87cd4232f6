"""The numerical core of the correction (numpy and scipy only, no DIALS):

* :mod:`.shells`: resolution shells of equal valid-pixel count (optionally
  split into azimuthal sectors): the regions modelled separately;
* :mod:`.histogram`: low-count histograms per region and the choice of Imax;
* :mod:`.lognormal`: the maximum-likelihood fit of a shifted lognormal;
* :mod:`.assignment`: the values given to the zero pixels and their arrangement;
* :mod:`.parameters`: what controls the correction;
* :mod:`.correction`: one image, end to end, and the sweep offset.
"""
