"""Helpers shared by the end-to-end tests: running DIALS programs as a user
would, and what a DIALS program reads back from an experiment list."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from dials_truncfix.settings import ENVIRONMENT_VARIABLE


def environment(**extra):
    """This environment without DIALS_TRUNCFIX, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != ENVIRONMENT_VARIABLE}
    env.update(extra)
    return env


def run(args, cwd, ok=True, **extra_env):
    """Run a program; with ``ok`` it must succeed."""
    result = subprocess.run(
        list(map(str, args)),
        cwd=cwd,
        env=environment(**extra_env),
        capture_output=True,
        text=True,
    )
    if ok:
        assert result.returncode == 0, (
            f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def one_line_error(result):
    """The error of a failed program: a non-zero status, no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    return output


READ_BACK = """
import json, sys, numpy as np
from dxtbx.model.experiment_list import ExperimentList
experiments = ExperimentList.from_file(sys.argv[1])
iset = experiments[0].imageset
out = {"format": iset.get_format_class().__name__, "n": len(iset),
       "trusted": list(experiments[0].detector[0].get_trusted_range())}
for i in range(len(iset)):
    np.save(f"{sys.argv[2]}_data_{i}.npy", np.concatenate([p.as_numpy_array().ravel() for p in iset.get_raw_data(i)]))
    np.save(f"{sys.argv[2]}_mask_{i}.npy", np.concatenate([m.as_numpy_array().ravel() for m in iset.get_mask(i)]))
print(json.dumps(out))
"""


def read_back(expt, workdir, **extra_env):
    """What a new DIALS process reads from ``expt``: (info, [pixels], [mask])
    per image, pixels flattened over the panels."""
    prefix = os.path.join(str(workdir), "readback")
    result = run([sys.executable, "-c", READ_BACK, expt, prefix], workdir, **extra_env)
    info = json.loads(result.stdout.strip().splitlines()[-1])
    pixels = [np.load(f"{prefix}_data_{i}.npy") for i in range(info["n"])]
    masks = [np.load(f"{prefix}_mask_{i}.npy") for i in range(info["n"])]
    return info, pixels, masks


def spot_count(result):
    """Spots saved by dials.find_spots, from its output."""
    for line in result.stdout.splitlines():
        if line.startswith("Saved") and "reflections" in line:
            return int(line.split()[1])
    raise AssertionError(
        "dials.find_spots saved no reflections:\n" + result.stdout[-2000:]
    )


def record_of(expt):
    """The settings record of the first imageset of an .expt file."""
    with open(expt) as fh:
        return json.load(fh)["imageset"][0]["params"].get("truncfix")


#: real images from public DIALS test data, beside the clone (see its README)
REALDATA = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "..",
    "shared",
    "realdata",
)


def realdata(name):
    """The path of a real image, or a skip saying where it was looked for."""
    import pytest

    path = os.path.normpath(os.path.join(REALDATA, name))
    if not os.path.exists(path):
        pytest.skip(
            f"real images not found: {path} (the public DIALS test data beside the clone)"
        )
    return path


def write_truncated_mrc_stack(path, n_images=2, size=128):
    """A truncated two-image MRC stack (truncated shifted lognormal noise,
    one seed per image) at ``path``; returns the path."""
    import mrcfile

    from devtools.synthetic import truncate

    images = [
        truncate(
            -4
            + np.exp(1.6 + 0.5 * np.random.default_rng(k).standard_normal((size, size)))
        )
        for k in range(n_images)
    ]
    with mrcfile.new(str(path)) as mrc:
        mrc.set_data(np.stack(images))
    return str(path)


PLUGIN_CLASS = '''
import numpy as np
from dxtbx.format.Format import Format
from scitbx.array_family import flex

class {name}(Format):
    """A third-party camera: magic {magic!r}, uint16 {size} x {size}, panel type {sensor}."""

    @staticmethod
    def understand(image_file):
        with open(image_file, "rb") as fh:
            return fh.read(8) == {magic!r}

    def _start(self):
        with open(self._image_file, "rb") as fh:
            self._pixels = np.frombuffer(fh.read()[8:], dtype="<u2").reshape({size}, {size})

    def _detector(self):
        return self._detector_factory.simple({sensor!r}, {distance!r}, ({origin!r}, {origin!r}), "+x", "-y",
                                             ({pixel!r}, {pixel!r}), ({size}, {size}), (-1, 65535), [])

    def _beam(self):
        return self._beam_factory.simple(0.0251)

    def _goniometer(self):
        return self._goniometer_factory.single_axis()

    def _scan(self):
        number = int(self._image_file[-9:-4])
        return self._scan_factory.make_scan((number, number), 1.0, (0.5 * (number - 1), 0.5), {{number: 0.0}})

    def get_raw_data(self):
        return flex.int(self._pixels.astype(np.int32))
'''


def install_plugin_camera(
    directory, name, magic, size, sensor="CCD", distance=500.0, origin=7.68, pixel=0.03
):
    """Register a third-party dxtbx format class ``name`` as another package
    would (a module and a dist-info with a ``dxtbx.format`` entry point, in
    ``directory``/site): files of ``magic`` (8 bytes) then uint16 pixels,
    ``size`` x ``size``, panels of type ``sensor``, no geometry beyond the
    class's own.  The environment whose dxtbx registry has the class."""
    module = "truncfix_" + "".join(
        f"_{c.lower()}" if c.isupper() else c for c in name[len("Format") :]
    ).lstrip("_")
    site = directory / "site"
    site.mkdir()
    (site / f"{module}.py").write_text(
        PLUGIN_CLASS.format(
            name=name,
            magic=magic,
            size=size,
            sensor=sensor,
            distance=distance,
            origin=origin,
            pixel=pixel,
        )
    )
    info = site / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text(
        f"[dxtbx.format]\n{name}:Format = {module}:{name}\n"
    )
    return {
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    }


def write_plugin_image(path, magic, pixels):
    """An image file of a class of :func:`install_plugin_camera`."""
    path.write_bytes(magic + np.asarray(pixels).astype("<u2").tobytes())
    return str(path)
