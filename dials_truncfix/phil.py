"""The correction's PHIL scope, importable by other programs:

include scope dials_truncfix.phil.correction_phil_scope
"""

from __future__ import annotations

import os

import iotbx.phil
from libtbx import Auto

from dials_truncfix.core.parameters import CorrectionParameters

correction_phil_str = """
truncfix
  .help = "Modelling of pixel values truncated to zero (Hattne et al., 2016)"
{
  n_shells = 10
    .type = int(value_min=1, value_max=1000, allow_none=False)
    .help = "Number of concentric resolution shells of equal valid-pixel count"
            "(about equal area) that are modelled separately."
  n_sectors = 1
    .type = int(value_min=1, allow_none=False)
    .help = "Experimental: split every resolution shell into this many"
            "azimuthal sectors of equal angle, each modelled separately (for"
            "backgrounds that vary around the beam). A sector whose fit fails"
            "is fitted together with a neighbouring sector of its shell."
    .expert_level = 1
  likelihood = *exact paper
    .type = choice
    .help = "exact: multinomial likelihood of the binned counts, with bin"
            "probabilities F(I+0.5)-F(I-0.5) and counts above Imax treated as"
            "censored. paper: equation (4) of Hattne et al. (2016),"
            "H(0) log F(0.5) + sum H(I) log f(I), which is biased when much of"
            "the distribution lies above Imax."
  assignment = *distribution expectation
    .type = choice
    .help = "What the zero pixels of a fitted shell receive, each drawn"
            "independently. distribution: a value v <= 0 with the probability"
            "the fitted distribution gives it (the truncated part of the"
            "distribution restored). expectation: floor(m)+1 with probability"
            "m-floor(m), else floor(m), for the fitted conditional mean m of"
            "the values below 0.5: the same expectation, less noise per pixel."
  seed = 0
    .type = int(value_min=0, allow_none=False)
    .help = "Seed for the random draws of the assigned values."
            "Combined with each image's identity, so that an image is always"
            "corrected identically."
  histogram
    .help = "Which low counts enter the fit"
    .expert_level = 1
  {
    max = None
      .type = int(value_min=3)
      .help = "Largest count Imax in the fitted histogram. None: per shell, the"
              "count below which 'quantile' of the shell's positive counts lie."
    quantile = Auto
      .type = float(value_min=0, value_max=1)
      .help = "Fraction of a shell's positive counts at or below the automatic"
              "Imax. Auto: 0.5 for the exact likelihood, which treats the"
              "counts above Imax as censored and is best kept to the low"
              "counts (spots and Poisson tails distort the upper part); 0.99"
              "for the paper's, which ignores the counts above Imax."
  }
  min_pixels_per_shell = 1000
    .type = int(value_min=1, allow_none=False)
    .help = "Shells with fewer valid pixels are not made: fewer shells are used."
    .expert_level = 1
  fit_all_shells = False
    .type = bool
    .help = "Fit shells without zero pixels too (for diagnostics only: the"
            "corrected pixels are the same)."
    .expert_level = 1
  mask = None
    .type = path
    .help = "Optional DIALS mask file (as from dials.generate_mask) of pixels"
            "to exclude, for example a beam-stop shadow."
  detector = *auto integrating counting
    .type = choice
    .help = "Whether the images come from a camera that truncates. auto: the"
            "rule of dials_truncfix/detectors.py: counting detectors (Pilatus,"
            "Eiger, SINGLA, TimePix, Lambda, HF-4M, HyPix; recognised by their"
            "dxtbx format class), whose zeros are real counts, are left"
            "uncorrected, and so are unlisted classes whose panels dxtbx labels"
            "PAD; every other integer format is treated as an integrating"
            "camera and corrected. integrating: correct whatever the format"
            "class. counting: correct nothing (e.g. an MRC file from a camera"
            "in counting mode)."
}
"""

correction_phil_scope = iotbx.phil.parse(correction_phil_str)


def correction_parameters(truncfix):
    """CorrectionParameters from an extracted ``truncfix`` scope."""
    return CorrectionParameters(
        n_shells=truncfix.n_shells,
        likelihood=truncfix.likelihood,
        histogram_max=truncfix.histogram.max,
        histogram_quantile=None
        if truncfix.histogram.quantile in (None, Auto)
        else truncfix.histogram.quantile,
        min_pixels_per_shell=truncfix.min_pixels_per_shell,
        seed=truncfix.seed,
        fit_all_shells=truncfix.fit_all_shells,
        assignment=truncfix.assignment,
        n_sectors=truncfix.n_sectors,
    )


class PhilFileError(ValueError):
    pass


def read_phil_file(path, scope=correction_phil_scope):
    """Parse a user PHIL file strictly: unknown parameters are an error."""
    if not os.path.isfile(path):
        raise PhilFileError(f"{path}: no such PHIL file")
    try:
        with open(path, encoding="utf-8") as fh:
            source = iotbx.phil.parse(fh.read(), source_info=path)
        working, unused = scope.fetch(source=source, track_unused_definitions=True)
        extracted = working.extract()
    except RuntimeError as e:
        raise PhilFileError(f"{path}: {e}") from None
    if unused:
        names = ", ".join(u.path for u in unused)
        raise PhilFileError(f"{path}: unknown parameter(s): {names}")
    return working, extracted
