"""Image and file writers shared by dials.correct_truncation and the
development tools: atomic writing (:mod:`.atomic`), full CBF (:mod:`.cbf`)
and ADSC SMV (:mod:`.smv`)."""

from __future__ import annotations


class OutputFormatError(ValueError):
    """The corrected data cannot be written in the requested format."""
