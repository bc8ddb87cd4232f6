"""Validation against a simulated truth (behind ``make validate``).

Three simulated MicroED sweeps (:mod:`devtools.simulate`, ``preset=strong``,
``preset=weak``: the same crystal with a tenth of the flux, and
``preset=readnoise``: the strong crystal on a read-noise-dominated camera,
near-Gaussian low counts) are each
processed in several versions ("datasets", the columns of the report), with
identical DIALS parameters, by two installations of DIALS ("lanes"):

    lane debian   Debian's DIALS 3.12 (/usr/bin/dials.*)
      truth         the signed images before truncation (CBF)
      truncated     the same images with negative pixels set to 0 (SMV)
      distribution  the truncated images after dials.correct_truncation
                    truncfix.assignment=distribution (CBF output)
      expectation   the same with truncfix.assignment=expectation
      sectors       the same with truncfix.assignment=expectation
                    truncfix.n_sectors=8 (regions = shell x sector)
    lane current  current DIALS (3.2x: the environment named by
                  CURRENT_DIALS, as for ``make test-current``)
      truth         as above
      truncated     as above: current dxtbx masks every zero pixel of the
                    truncated SMVs (what current users get today)
      on_read       the truncated images imported with DIALS_TRUNCFIX=1
                    (correction on read, default parameters)

through ``dials.import``, ``dials.find_spots``, ``dials.index`` (known space
group and unit cell), ``dials.refine``, ``dials.integrate``, ``dials.scale``
(``anomalous=False``, a common ``d_min``: see scale_d_min) and ``dials.export``.  Each lane runs
its own programs (the subprocess environment is built from the lane: Debian
= /usr/bin first on PATH and no LD_PRELOAD; current = the environment's
bin first on PATH; in both the driver's PYTHONPATH is passed on,
so that a checkout given by PYTHONPATH is the plugin every lane imports);
the statistics are computed by the interpreter running this module.  It
then writes, per crystal, a table like Table 1 of Hattne et al. (2016) --
merging statistics overall and in the highest-resolution shell -- plus what
only a simulation can show: the correlation of the merged intensities with
the true intensities and the mean normalised error of the weak reflections,
per resolution shell; the share of the truncation's effect that every
corrected column removes (against the truncated column of its own lane);
which assignment mode the evidence favours; and whether regions smaller
than annuli (azimuthal sectors) help.

    /usr/bin/python3 -m devtools.validation output=validation.md \\
        [workdir=validation_work] [image_size=2048] [n_images=90] [seed=1] \\
        [nproc=2] [d_min=1.3] [crystals=strong+weak+readnoise] [lanes=debian+current] \\
        [datasets=truth+truncated+...] \\
        [current_dials=~/.cache/dials-truncfix/current-dials] [reuse=True]

(PHIL arguments as in :mod:`devtools.simulate`, ``-h`` lists them;
defaults: 2048 x 2048 pixels, 90 images, all three crystals, both lanes, every
column of each lane; ``make validate`` runs it with
``output=benchmarks/results/validation.md``).  A third lane, ``this``, runs
the programs found on PATH as they are (the CI test uses it: there PATH
holds the programs of the interpreter running pytest).

The package, by concern: ``lanes`` (which DIALS a lane runs; the
interpreter check tests/conftest.py uses), ``datasets`` (the columns),
``runner`` (running one program), ``processing`` (import to export of one
dataset), ``statistics`` (merging statistics, truth comparison), ``rules``
(the decisions: gap removed, assignment, sectors), ``tables`` and
``prose`` (the generated markdown), ``report`` (the document), ``driver``
(the run) and ``cli`` (the command line).

Definitions (also written into the report):

* All statistics use the simulation's known crystal symmetry (cell and space
  group), so that all datasets are binned identically, and the same
  resolution range ``d_max``-``d_min``.
* Merging statistics: ``iotbx.merging_statistics`` on the unmerged scaled
  intensities exported by ``dials.export`` with the settings of dials.scale
  (no sigma filtering, ``use_internal_variance=False``), 20 shells of equal
  reciprocal volume between the common d_max and d_min (the same shells for
  every dataset; a shell without data has no statistics); the
  highest-resolution shell is the last of them.
* Truth comparison: merged intensities (``merge_equivalents``) matched by
  Miller index to ``truth_intensities.mtz``.  One scale factor ``k`` is fitted
  by least squares (I_obs ~ k I_true) on all matched reflections; the
  normalised error is z = (I_obs - k I_true) / sigma(I_obs).  *Weak*
  reflections are those whose true intensity lies below the median true
  intensity of all unique truth reflections of their resolution shell (a
  definition that depends on the truth only, so it selects the same
  reflections in every dataset).  For an unbiased dataset with correct
  sigmas <z> of the weak reflections is ~0 and rms(z) ~1.  z depends on the
  error model dials.scale fits to each dataset; the weak relative bias
  <I - k I_true> / <k I_true> does not.
* Gap removed: 1 - |corrected - truth| / |truncated - truth|, with the truth
  and truncated columns of the corrected column's own lane.
"""
