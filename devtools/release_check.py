"""make test-release: the release as a user installs it.

From a clean copy of the checkout (the files git tracks or would track), build the sdist
with setuptools' PEP 517 hook, then the wheel from the unpacked sdist
(``pip wheel --no-build-isolation --no-deps``), and check what each holds.
Then, for each DIALS lane, install the wheel (not editable) into a fresh
environment that sees that lane's DIALS but no other dials-truncfix, and
from that environment:

* check that the plugin imported, the dxtbx format classes dxtbx's registry
  loads and the distribution's metadata all come from the fresh environment;
* run ``dials.correct_truncation`` (the console script the wheel installed)
  on a small truncated SMV sweep, and ``DIALS_TRUNCFIX=1 dials.import`` on
  the same images (checking in that process that every module of the plugin
  it loaded lies in the environment);
* read both outputs back: corrected pixels (negative where the input had
  zeros, positive ones unchanged), the same pixels through either route.

The fresh environment of a lane (fresh_environment) is a new virtualenv of
the lane's interpreter. Where DIALS lives in the interpreter's own site
directories (Debian's /usr/bin/python3, a conda-forge environment) it is
made with --system-site-packages; where the DIALS environment is itself a
virtualenv (which a new one cannot inherit), a .pth file names its
site-packages instead. Either way the new environment's site-packages come
first on sys.path, before any dials-truncfix the DIALS environment may hold
(on the development machines an editable install in /usr/local, which Debian
puts on /usr/bin/python3's path): the first copy on sys.path is the one
Python imports and the one pkg_resources (dxtbx 3.11) and importlib.metadata
(current dxtbx) take the entry points from, so nothing is hidden or patched;
the checks above fail if another copy is used. A .pth names directories
only, so the DIALS environment's own .pth files (an editable install's
finder among them) are not run. libtbx is pointed at its build (LIBTBX_BUILD)
because it looks for it under sys.prefix, which is the new environment's.

Usage: python -m devtools.release_check [--current-dials PREFIX] [--keep]
(the Debian lane always; the current-DIALS lane where PREFIX is given).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBIAN_PYTHON = "/usr/bin/python3"
DISTRIBUTION = "dials-truncfix"

#: the entry points of pyproject.toml, as the wheel's entry_points.txt must name them
ENTRY_POINTS = {
    (
        "console_scripts",
        "dials.correct_truncation",
        "dials_truncfix.command_line.correct_truncation:run",
    ),
    (
        "dxtbx.format",
        "FormatATruncfix:Format",
        "dials_truncfix.format_wrapper:FormatATruncfix",
    ),
    (
        "dxtbx.format",
        "FormatATruncfixMultiImage:Format",
        "dials_truncfix.format_wrapper:FormatATruncfixMultiImage",
    ),
}

#: what the environment of a lane must not pass on to the fresh environment
DROPPED = (
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PYTHONUSERBASE",
    "VIRTUAL_ENV",
    "LIBTBX_BUILD",
    "DIALS_TRUNCFIX",
)


class ReleaseError(Exception):
    pass


def run(args, cwd, env=None, what=None):
    """Run a command; fail with its output."""
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise ReleaseError(
            f"{what or args[0]} failed (exit {result.returncode}):\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result.stdout


def version():
    namespace: dict = {}
    with open(os.path.join(ROOT, "dials_truncfix", "__init__.py")) as fh:
        exec(compile(fh.read(), "__init__.py", "exec"), namespace)
    return namespace["__version__"]


# ---------------------------------------------------------------- building


def tracked_files():
    """The checkout's files as a fresh clone of the working tree would hold
    them: tracked or new, not ignored by git (every file but build and test
    output where this is no git checkout)."""
    try:
        out = subprocess.run(
            [
                "git",
                "-C",
                ROOT,
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
            ],
            capture_output=True,
            check=True,
        ).stdout
        return [
            f
            for f in out.decode().split("\0")
            if f and os.path.isfile(os.path.join(ROOT, f))
        ]
    except (OSError, subprocess.CalledProcessError):
        skip = {
            ".git",
            "build",
            "dist",
            "demo",
            ".hypothesis",
            ".pytest_cache",
            "__pycache__",
        }
        found = []
        for top, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
            found += [
                os.path.relpath(os.path.join(top, f), ROOT)
                for f in files
                if not f.endswith(".pyc")
            ]
        return found


def build(work):
    """(sdist, wheel) built from a clean copy; their contents checked."""
    files = tracked_files()
    source = os.path.join(work, "source")
    for name in files:
        os.makedirs(os.path.dirname(os.path.join(source, name)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), os.path.join(source, name))
    dist = os.path.join(work, "dist")
    os.makedirs(dist)
    # the PEP 517 hook itself (what `python -m build --sdist --no-isolation` calls)
    name = run(
        [
            sys.executable,
            "-c",
            "import sys; from setuptools import build_meta; "
            "print(build_meta.build_sdist(sys.argv[1]))",
            dist,
        ],
        source,
        what="build_sdist",
    ).split()[-1]
    sdist = os.path.join(dist, name)
    check_sdist(sdist, files)
    unpacked = os.path.join(work, "unpacked")
    with tarfile.open(sdist) as tar:
        tar.extractall(
            unpacked, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {})
        )
    (top,) = os.listdir(unpacked)
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--wheel-dir",
            dist,
            os.path.join(unpacked, top),
        ],
        work,
        what="pip wheel (from the sdist)",
    )
    (wheel,) = glob.glob(os.path.join(dist, "*.whl"))
    check_wheel(wheel)
    return sdist, wheel


def check_sdist(sdist, files):
    """The sdist is the tracked tree (MANIFEST.in): nothing missing, nothing else
    but setuptools' own PKG-INFO, setup.cfg and egg-info."""
    with tarfile.open(sdist) as tar:
        names = {
            n.split("/", 1)[1]
            for n in tar.getnames()
            if "/" in n and tar.getmember(n).isfile()
        }
    generated = {
        n
        for n in names
        if n in ("PKG-INFO", "setup.cfg") or n.startswith("dials_truncfix.egg-info/")
    }
    wanted = set(files) - {".gitignore"}
    missing, extra = wanted - names, names - generated - wanted
    if missing or extra:
        raise ReleaseError(
            f"sdist {os.path.basename(sdist)}: missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
    for required in (
        "README.md",
        "LICENSE",
        "CHANGELOG.md",
        "dials_truncfix/templates/correct_truncation_report.html",
        "tests/test_core.py",
        "libtbx_config",
        "libtbx_refresh.py",
    ):
        if required not in names:
            raise ReleaseError(f"sdist lacks {required}")
    if not any(n.startswith("phil/") and n.endswith(".phil") for n in names):
        raise ReleaseError("sdist lacks the phil/ examples")


def check_wheel(wheel):
    """The wheel holds dials_truncfix alone, templates included, with the
    version of __init__.py, the dependencies and the entry points."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(f"{info}/METADATA").decode()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    tops = {n.split("/")[0] for n in names}
    if tops != {"dials_truncfix", info}:
        raise ReleaseError(f"wheel: top-level entries {sorted(tops)}")
    if "dials_truncfix/templates/correct_truncation_report.html" not in names:
        raise ReleaseError("wheel lacks the report template")
    if not any(n.endswith("/LICENSE") for n in names if n.startswith(info)):
        raise ReleaseError("wheel lacks LICENSE")
    fields = [
        line.split(": ", 1)
        for line in metadata.split("\n\n")[0].splitlines()
        if ": " in line
    ]
    get = lambda key: [v for k, v in fields if k == key]  # noqa: E731
    if get("Version") != [version()] or get("Name") != [DISTRIBUTION]:
        raise ReleaseError(
            f"wheel metadata: {get('Name')} {get('Version')}, not {DISTRIBUTION} {version()}"
        )
    if not {"numpy", "scipy"} <= set(get("Requires-Dist")):
        raise ReleaseError(f"wheel Requires-Dist: {get('Requires-Dist')}")
    found = set()
    group = None
    for line in entry_points.splitlines():
        line = line.strip()
        if line.startswith("["):
            group = line.strip("[]")
        elif "=" in line:
            key, value = (s.strip() for s in line.split("=", 1))
            found.add((group, key, value))
    if found != ENTRY_POINTS:
        raise ReleaseError(f"wheel entry points {sorted(found)}")


# ------------------------------------------------------------ environments


def interpreter_facts(python):
    """Where the interpreter's DIALS lives."""
    script = (
        "import json, sys, sysconfig, libtbx.load_env, libtbx\n"
        "import dials.util.options  # DIALS' compiled extensions load (not merely import dials)\n"
        "paths = sysconfig.get_paths()\n"
        "print(json.dumps({'venv': sys.prefix != sys.base_prefix, 'version': sys.version.split()[0],\n"
        "  'site': sorted({paths['purelib'], paths['platlib']}), 'libtbx_build': abs(libtbx.env.build_path)}))\n"
    )
    out = run(
        [python, "-c", script],
        "/",
        env=clean_environment(),
        what=f"{python} (the lane's own DIALS, before any release is installed): loading DIALS",
    )
    return json.loads(out.strip().splitlines()[-1])


def clean_environment(**extra):
    env = {k: v for k, v in os.environ.items() if k not in DROPPED}
    # a fresh environment compiles nothing into the DIALS installation it
    # borrows, and no per-user site directory comes between
    env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONNOUSERSITE="1")
    env.update(extra)
    return env


def fresh_environment(python, prefix):
    """A new virtualenv of ``python`` that imports its DIALS but no
    dials-truncfix (see the module docstring); returns its python, the
    environment variables to run it with, and interpreter_facts(python)."""
    facts = interpreter_facts(python)
    if facts["venv"]:
        run(
            [python, "-m", "venv", "--without-pip", prefix],
            "/",
            env=clean_environment(),
        )
        new = os.path.join(prefix, "bin", "python")
        site = run(
            [new, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            "/",
        ).strip()
        with open(os.path.join(site, "_dials_environment.pth"), "w") as fh:
            fh.write("".join(p + "\n" for p in facts["site"]))
    else:
        run(
            [python, "-m", "venv", "--without-pip", "--system-site-packages", prefix],
            "/",
            env=clean_environment(),
        )
        new = os.path.join(prefix, "bin", "python")
    env = clean_environment(LIBTBX_BUILD=facts["libtbx_build"], VIRTUAL_ENV=prefix)
    env["PATH"] = os.path.join(prefix, "bin") + os.pathsep + env.get("PATH", "")
    # the environment has no pip of its own: the DIALS installation's pip
    # installs into it (pip installs into sys.prefix)
    run(
        [new, "-c", "import dials, dxtbx, pip"],
        "/",
        env=env,
        what=f"{prefix}: import dials, dxtbx, pip",
    )
    return new, env, facts


PROBE = """
import importlib.metadata as md, json, os, sys
prefix = os.path.realpath(sys.prefix)
inside = lambda path: os.path.realpath(path).startswith(prefix + os.sep)
import dials_truncfix
from dxtbx.format.Registry import get_format_class_index
index = get_format_class_index()
classes = {name: sys.modules[index[name][0]().__module__].__file__
           for name in ("FormatATruncfix", "FormatATruncfixMultiImage")}
dist = md.distribution("dials-truncfix")
copies = sorted({str(d._path) for d in md.distributions() if (d.metadata["Name"] or "").lower() == "dials-truncfix"})
template = os.path.join(os.path.dirname(dials_truncfix.__file__), "templates", "correct_truncation_report.html")
print(json.dumps({
    "package": dials_truncfix.__file__, "package_inside": inside(dials_truncfix.__file__),
    "classes_inside": all(inside(f) for f in classes.values()), "classes": classes,
    "distribution_inside": inside(str(dist._path)), "version": dist.version,
    "entry_points": sorted([e.group, e.name, e.value] for e in dist.entry_points),
    "copies": copies, "template": os.path.isfile(template),
    "script": os.path.isfile(os.path.join(sys.prefix, "bin", "dials.correct_truncation")),
}))
"""

RUN_IN_PROCESS = """
import os, runpy, sys
module, prefix = sys.argv[1], os.path.realpath(sys.argv[2])
sys.argv = [module] + sys.argv[3:]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit as exit:
    if exit.code not in (None, 0):
        raise
loaded = {n: m.__file__ for n, m in list(sys.modules.items())
          if n.split(".")[0] == "dials_truncfix" and getattr(m, "__file__", None)}
assert "dials_truncfix.format_wrapper" in loaded, "the plugin was never loaded"
outside = {n: f for n, f in loaded.items() if not os.path.realpath(f).startswith(prefix + os.sep)}
assert not outside, f"plugin modules from outside {prefix}: {outside}"
print(f"RELEASE-CHECK: {len(loaded)} plugin modules, all from {prefix}")
"""

READ_BACK = """
import json, os, sys
import numpy as np
import dxtbx
from dxtbx.model.experiment_list import ExperimentList
prefix = os.path.realpath(sys.prefix)
corrected = ExperimentList.from_file(sys.argv[1])[0].imageset
on_read = ExperimentList.from_file(sys.argv[2])[0].imageset
images = sys.argv[3:]
assert len(corrected) == len(on_read) == len(images), (len(corrected), len(on_read), len(images))
cls = on_read.get_format_class()
assert "Truncfix" in cls.__name__, cls.__name__
assert os.path.realpath(sys.modules[cls.__module__].__file__).startswith(prefix + os.sep)
changed = 0
for i, path in enumerate(images):
    raw = dxtbx.load(path).get_raw_data().as_numpy_array()
    a = corrected.get_raw_data(i)[0].as_numpy_array()
    b = on_read.get_raw_data(i)[0].as_numpy_array()
    assert a.shape == b.shape == raw.shape
    assert np.array_equal(a[raw > 0], raw[raw > 0]) and (a[raw == 0] <= 0).all()
    assert np.array_equal(a, b), f"image {i}: the CBF and the on-read pixels differ"
    changed += int(np.count_nonzero(a != raw))
assert changed > 0, "no pixel was given a value"
print(json.dumps({"images": len(images), "changed": changed, "on_read_class": cls.__name__}))
"""


def check_lane(lane, python, wheel, images, work):
    """Install the wheel into a fresh environment of ``python`` and run the plugin from it."""
    start = time.time()
    slug = lane.split()[0].lower()
    prefix = os.path.join(work, f"env-{slug}")
    new, env, facts = fresh_environment(python, prefix)
    run(
        [
            new,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            wheel,
        ],
        work,
        env=env,
        what=f"{lane}: pip install the wheel",
    )
    where = os.path.join(work, f"run-{slug}")
    os.makedirs(where)
    probe = json.loads(
        run([new, "-c", PROBE], where, env=env, what=f"{lane}: probe")
        .strip()
        .splitlines()[-1]
    )
    problems = [
        key
        for key in (
            "package_inside",
            "classes_inside",
            "distribution_inside",
            "template",
            "script",
        )
        if not probe[key]
    ]
    if probe["version"] != version():
        problems.append(f"version {probe['version']}")
    if {tuple(e) for e in probe["entry_points"]} != ENTRY_POINTS:
        problems.append(f"entry points {probe['entry_points']}")
    if problems:
        raise ReleaseError(
            f"{lane}: the plugin is not the wheel's in {prefix}: {problems}\n{json.dumps(probe, indent=1)}"
        )
    run(
        [os.path.join(prefix, "bin", "dials.correct_truncation"), *images, "nproc=1"],
        where,
        env=env,
        what=f"{lane}: dials.correct_truncation",
    )
    for name in (
        "corrected.expt",
        "dials.correct_truncation.json",
        "dials.correct_truncation.html",
        "dials.correct_truncation.log",
    ):
        if not os.path.isfile(os.path.join(where, name)):
            raise ReleaseError(f"{lane}: dials.correct_truncation wrote no {name}")
    if len(glob.glob(os.path.join(where, "corrected", "*.cbf"))) != len(images):
        raise ReleaseError(
            f"{lane}: dials.correct_truncation wrote not {len(images)} CBF images"
        )
    script = os.path.join(where, "in_process.py")
    with open(script, "w") as fh:
        fh.write(RUN_IN_PROCESS)
    run(
        [
            new,
            script,
            "dials.command_line.dials_import",
            prefix,
            *images,
            "output.experiments=on_read.expt",
        ],
        where,
        env=dict(env, DIALS_TRUNCFIX="1"),
        what=f"{lane}: DIALS_TRUNCFIX=1 dials.import",
    )
    read = json.loads(
        run(
            [new, "-c", READ_BACK, "corrected.expt", "on_read.expt", *images],
            where,
            env=env,
            what=f"{lane}: reading the outputs back",
        )
        .strip()
        .splitlines()[-1]
    )
    shadowed = [
        c
        for c in probe["copies"]
        if not os.path.realpath(c).startswith(os.path.realpath(prefix) + os.sep)
    ]
    note = f"; also on its path, shadowed: {', '.join(shadowed)}" if shadowed else ""
    return (
        f"{lane} (Python {facts['version']}): wheel installed in a fresh environment, plugin and entry points "
        f"from it{note}; dials.correct_truncation and DIALS_TRUNCFIX=1 dials.import on {read['images']} images, "
        f"{read['changed']} pixels given values, the same through both ({time.time() - start:.0f} s)"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--current-dials",
        help="prefix of a current DIALS environment (the second lane)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    start = time.time()
    work = tempfile.mkdtemp(prefix="truncfix-release-")
    ok = False
    try:
        sdist, wheel = build(work)
        print(
            f"make test-release: built {os.path.basename(sdist)} and {os.path.basename(wheel)} "
            f"from a clean copy ({time.time() - start:.0f} s)",
            flush=True,
        )
        sys.path.insert(0, ROOT)
        from devtools.synthetic import write_truncated_smv_sweep

        images, _ = write_truncated_smv_sweep(
            os.path.join(work, "images"), n_images=3, size=256, n_shells=4
        )
        lanes = [("Debian DIALS", DEBIAN_PYTHON)]
        if args.current_dials:
            lanes.append(
                ("current DIALS", os.path.join(args.current_dials, "bin", "python"))
            )
        for lane, python in lanes:
            print(
                "make test-release: " + check_lane(lane, python, wheel, images, work),
                flush=True,
            )
        ok = True
    except ReleaseError as error:
        print(f"make test-release: FAILED: {error}", file=sys.stderr)
    finally:
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"make test-release: work directory kept: {work}", file=sys.stderr)
    print(
        f"make test-release: {'passed' if ok else 'failed'} ({time.time() - start:.0f} s)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
