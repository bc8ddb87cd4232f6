"""dials-truncfix: model pixel values truncated to zero in diffraction images
(Hattne et al., 2016, J. Appl. Cryst. 49, 1029-1034) as a DIALS/dxtbx plugin.

DIALS and dxtbx are required but not listed in install_requires: they come
from the DIALS environment (conda-forge, a DIALS bundle, or Debian's package),
and pip cannot install them on its own.
"""

import re

from setuptools import find_packages, setup

with open("dials_truncfix/__init__.py", encoding="utf-8") as fh:
    VERSION = re.search(r'__version__ = "([^"]+)"', fh.read()).group(1)

setup(
    name="dials-truncfix",
    version=VERSION,
    description="Correct diffraction images whose negative pixel counts were truncated to zero",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    packages=find_packages(include=["dials_truncfix", "dials_truncfix.*"]),
    package_data={"dials_truncfix": ["templates/*.html"]},
    python_requires=">=3.8",
    install_requires=["numpy", "scipy"],
    extras_require={"test": ["pytest", "hypothesis"]},
    entry_points={
        # names sorting before every stock top-level class: see format_wrapper
        "dxtbx.format": [
            "FormatATruncfix:Format = dials_truncfix.format_wrapper:FormatATruncfix",
            "FormatATruncfixMultiImage:Format = dials_truncfix.format_wrapper:FormatATruncfixMultiImage",
        ],
        "console_scripts": [
            "dials.correct_truncation=dials_truncfix.command_line.correct_truncation:run",
        ],
    },
)
