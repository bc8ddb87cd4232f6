"""dials-truncfix as a module of a DIALS source (bootstrap) build.

libtbx.configure / libtbx.refresh run this file for the module: it installs
the checkout, editable and without dependencies, into the build's Python, as
dxtbx's own libtbx_refresh.py does, so that the build's Python has the
package's metadata: the dxtbx format entry points (correction on read) and
the dials.correct_truncation program. libtbx puts the checkout on the
dispatchers' PYTHONPATH itself (its dials_truncfix/__init__.py).

libtbx runs this file with exec() in the namespace of libtbx.env_config, the
module being configured as ``self``; it is not imported. So everything is
inside one function with a name of its own (no name of env_config is
replaced) and the checkout is found from ``self``, not from ``__file__``
(which is env_config's there). ``python libtbx_refresh.py`` installs the
checkout holding this file into the Python running it.
tests/test_packaging.py runs it through libtbx's own module class.
"""


def _dials_truncfix_libtbx_refresh(module=None):
    import os
    import subprocess
    import sys

    if module is not None:
        root = abs(next(module.dist_paths_active()))  # libtbx path object -> str
    else:
        root = os.path.dirname(os.path.abspath(__file__))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-build-isolation",
            "--no-deps",
            "-e",
            root,
        ],
        check=True,
    )


if __name__ == "__main__":
    _dials_truncfix_libtbx_refresh()
elif __name__.endswith(".libtbx_refresh") and "self" in globals():
    _dials_truncfix_libtbx_refresh(globals()["self"])
