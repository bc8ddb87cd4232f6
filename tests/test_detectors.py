"""Which detectors are corrected (detectors.py), checked against every class
of this lane's dxtbx registry, and what DIALS is told about corrected data."""

from __future__ import annotations

import inspect
import json
import re
import sys

import numpy as np
import pytest

from dials_truncfix import detectors
from dials_truncfix.format_wrapper import can_wrap
from tests.helpers import install_plugin_camera, read_back, run, write_plugin_image

#: counting detectors, by what their class names say (independently of the
#: rule's class lists): DECTRIS Pilatus, Eiger, SINGLA (NXmx ED), TimePix,
#: Lambda, ADSC HF-4M, Rigaku HyPix (ROD), Diamond's NeXus (Eiger, Pilatus),
#: neutron time-of-flight (ISIS SXD, SNS MaNDi, ESS NMX)
COUNTING_NAME = re.compile(
    r"pilatus|eiger|nxmxed|nxmxdls|timepix|lambda|hf4m|^formatrod|isissxd|mandi|essnmx",
    re.IGNORECASE,
)

#: wrappable classes whose files may describe either kind of detector: the
#: file's panel type decides (detectors.py, rule 2).  A new dxtbx class that
#: labels its panels "PAD" must be added to the rule's lists or here.
DECIDED_BY_THE_FILE = {
    "FormatCBFMini",  # generic mini-CBF (mostly Pilatus)
    "FormatSMVJHSim",  # simulated: PAD for Pilatus pixels, CCD otherwise
    "FormatBrukerModern",  # Photon II (CCD) or an Eiger (PAD)
    "FormatTRPX",  # TERSE/PROLIX compressed electron data, camera unknown
    "FormatEDFALS733",  # EDF of ALS 7.3.3 (a Pilatus)
}


def registry_classes():
    """(name, class) of every format class of this lane's dxtbx that imports
    here, and the names of those that do not (optional packages missing)."""
    from dxtbx.format.Registry import get_format_class_index

    classes, missing = [], []
    for name, (load, _) in sorted(get_format_class_index().items()):
        if name.startswith("FormatATruncfix"):
            continue
        try:
            classes.append((name, load()))
        except ImportError:
            missing.append(name)
    return classes, missing


def labels_pad(cls):
    """Whether the class's source (or a base's, up to dxtbx's abstract
    classes) can give a panel the dxtbx type PAD."""
    for base in cls.__mro__:
        if base.__module__.startswith("dxtbx.format.Format") and base.__name__ in (
            "Format",
            "FormatMultiImage",
            "FormatStill",
            "FormatHDF5",
        ):
            break
        try:
            source = inspect.getsource(sys.modules[base.__module__])
        except (OSError, TypeError, KeyError):
            continue
        if re.search(r"""["'](SENSOR_)?PAD["']""", source):
            return True
    return False


def test_every_class_of_the_registry_is_decided_by_the_rule():
    classes, missing = registry_classes()
    assert len(classes) > 100, missing
    decisions = {name: detectors.class_decision(cls) for name, cls in classes}
    # every counting detector of this dxtbx, whatever its file format
    counting_by_name = {name for name, _ in classes if COUNTING_NAME.search(name)}
    assert counting_by_name >= {"FormatCBFMiniPilatus", "FormatCBFMiniEiger"}
    wrong = {n: decisions[n] for n in counting_by_name if decisions[n] != "counting"}
    assert not wrong, f"counting detectors not left alone: {wrong}"
    # the cameras dxtbx labels PAD that integrate are named
    for name in ("FormatGatanDM4", "FormatMRC", "FormatSER"):
        assert decisions[name] == "integrating"
    # nothing else is taken for a counting detector by its class
    assert {n for n, d in decisions.items() if d == "counting"} <= counting_by_name
    # a wrappable class that can label its panels PAD is decided explicitly
    # or listed as decided by the file: none slips through unexamined
    unexamined = sorted(
        name
        for name, cls in classes
        if can_wrap(cls)
        and labels_pad(cls)
        and decisions[name] is None
        and name not in DECIDED_BY_THE_FILE
    )
    assert not unexamined, (
        f"classes labelling panels PAD, not in the rule: {unexamined}"
    )
    # the rule's lists name only classes of some supported dxtbx
    assert set(DECIDED_BY_THE_FILE) & set(decisions) <= set(DECIDED_BY_THE_FILE)


def test_current_counting_classes_are_counting_where_this_dxtbx_has_them():
    """The classes the 0.3 name list missed (issue 22)."""
    classes, _ = registry_classes()
    names = dict(classes)
    for name in ("FormatNXmxED", "FormatROD", "FormatCBFMiniADSCHF4M"):
        if name in names:
            assert detectors.class_decision(names[name]) == "counting", name


def test_the_file_decides_for_an_unlisted_class():
    class FormatSomeCamera:
        pass

    assert detectors.class_decision(FormatSomeCamera) is None
    refused = detectors.correction_refused(
        FormatSomeCamera, "auto", lambda: ["SENSOR_PAD"]
    )
    assert "pixel array detector" in refused and "integrating" in refused
    assert (
        detectors.correction_refused(FormatSomeCamera, "auto", lambda: ["SENSOR_CCD"])
        is None
    )
    assert (
        detectors.correction_refused(
            FormatSomeCamera, "integrating", lambda: ["SENSOR_PAD"]
        )
        is None
    )
    assert detectors.correction_refused(FormatSomeCamera, "counting") is not None


def test_corrected_pad_panels_are_described_as_integrating():
    from dxtbx.model import DetectorFactory

    detector = DetectorFactory.simple(
        "PAD", 100, (10, 10), "+x", "-y", (0.1, 0.1), (200, 200), (-1, 65535), []
    )
    assert detector[0].get_type() == "SENSOR_PAD"
    assert detectors.describe_as_integrating(detector)
    assert detector[0].get_type() == detectors.INTEGRATING_TYPE
    assert not detectors.describe_as_integrating(detector)


@pytest.fixture(scope="module")
def pad_camera(tmp_path_factory):
    """Two truncated images of a third-party class labelled PAD, and the
    environment whose dxtbx registry has the class."""
    tmp_path = tmp_path_factory.mktemp("pad_camera")
    env = install_plugin_camera(
        tmp_path, "FormatTestPadCamera", b"TESTPAD1", 256, "PAD"
    )
    paths = []
    for k in range(2):
        rng = np.random.default_rng(k)
        values = np.clip(
            np.round(-4 + np.exp(1.6 + 0.5 * rng.standard_normal((256, 256)))), 0, None
        )
        paths.append(
            write_plugin_image(tmp_path / f"pad_{k + 1:05d}.tpd", b"TESTPAD1", values)
        )
    return tmp_path, paths, env


@pytest.mark.slow
def test_an_unknown_pad_class_stays_uncorrected_by_default(pad_camera):
    tmp_path, paths, env = pad_camera
    work = tmp_path / "auto"
    work.mkdir()
    result = run(["dials.import", *paths], work, DIALS_TRUNCFIX="1", **env)
    lines = [line for line in result.stdout.splitlines() if "read uncorrected" in line]
    assert len(lines) == 1, result.stdout
    assert (
        "FormatTestPadCamera" in lines[0]
        and "truncfix.detector=integrating" in lines[0]
    )
    info, pixels, _ = read_back("imported.expt", work, **env)
    assert info["format"] == "FormatTestPadCamera"
    assert all((data >= 0).all() for data in pixels)
    expt = json.loads((work / "imported.expt").read_text())
    assert {p["type"] for d in expt["detector"] for p in d["panels"]} == {"SENSOR_PAD"}


@pytest.mark.slow
def test_an_unknown_pad_class_is_corrected_when_the_user_says_integrating(pad_camera):
    """...and DIALS is told it is an integrating camera, so that its default
    background model takes the negative pixels."""
    tmp_path, paths, env = pad_camera
    work = tmp_path / "integrating"
    work.mkdir()
    phil = work / "integrating.phil"
    phil.write_text("truncfix.detector=integrating\n")
    result = run(["dials.import", *paths], work, DIALS_TRUNCFIX=str(phil), **env)
    assert "read uncorrected" not in result.stdout
    info, pixels, masks = read_back("imported.expt", work, **env)
    assert info["format"] == "Truncfix_FormatTestPadCamera"
    for data, mask in zip(pixels, masks):
        assert (data < 0).sum() > 1000 and mask[data < 0].all()
    expt = json.loads((work / "imported.expt").read_text())
    assert {p["type"] for d in expt["detector"] for p in d["panels"]} == {
        detectors.INTEGRATING_TYPE
    }
