"""``python -m devtools.validation``: see :mod:`devtools.validation.cli`."""

import sys

from devtools.validation.cli import main

sys.exit(main())
