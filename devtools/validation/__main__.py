"""``python -m devtools.validation``: see :mod:`devtools.validation.cli`."""

from __future__ import annotations

import sys

from devtools.validation.cli import main

sys.exit(main())
