"""dials-truncfix: model pixel values truncated to zero in diffraction images
(Hattne et al., 2016, J. Appl. Cryst. 49, 1029-1034), as a DIALS/dxtbx plugin."""

from __future__ import annotations

__version__ = "0.4.0.dev0"
