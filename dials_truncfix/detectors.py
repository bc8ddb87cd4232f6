"""Which detectors truncate: integrating cameras do (the dark-subtracted,
gain-corrected signal of a CCD or CMOS camera is stored as unsigned
integers), photon/electron-counting hybrid pixel detectors do not (their
zeros are real counts).  Decided by the dxtbx format class family, or by the
user (``truncfix.detector``) where a class cannot tell."""

from __future__ import annotations

#: name fragments of the dxtbx format classes of counting detectors
COUNTING_FAMILIES = (
    "pilatus",
    "eiger",
    "timepix",
    "medipix",
    "merlin",
    "lambda",
    "tristan",
)


def is_counting_detector(format_class: type) -> bool:
    """Whether a format class (or one of its bases) belongs to a counting family."""
    return any(
        family in cls.__name__.lower()
        for cls in format_class.__mro__
        for family in COUNTING_FAMILIES
    )


def correction_refused(format_class: type, detector_choice: str) -> str | None:
    """Why images of this format class are not corrected under the user's
    ``truncfix.detector`` choice, or None if they are."""
    name = format_class.__name__
    if detector_choice == "counting":
        return "truncfix.detector=counting"
    if detector_choice == "auto" and is_counting_detector(format_class):
        return (
            f"{name} is a counting detector (truncfix.detector=integrating corrects it)"
        )
    return None
