"""dials.correct_truncation against a hostile user: every misuse either
works or stops before writing anything, with a one-line error naming the
file or parameter; an input is never replaced, a run interrupted or run
twice at once leaves nothing half done."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import environment, one_line_error, run
from test_command import ARGS, SHAPE, make_smv_sweep

from dxtbx.model.experiment_list import ExperimentList

from dials_truncfix.core.correction import BLANK
from dials_truncfix.corrector import NOT_VALID, stock_zeros_valid
from dials_truncfix.io.smv import write_smv

pytestmark = pytest.mark.slow


def checksums(paths):
    return {str(p): hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths}


def outputs_in(directory):
    """What a run left in a directory, its inputs aside."""
    return sorted(
        p
        for p in os.listdir(directory)
        if not p.startswith(("data", "in.expt", "mask", "settings", "dials.import"))
    )


@pytest.fixture
def sweep(tmp_path):
    paths = make_smv_sweep(tmp_path / "data", n=3)
    run(["dials.import", *paths, "output.experiments=in.expt"], tmp_path)
    return tmp_path, paths


@pytest.fixture
def long_sweep(tmp_path):
    """Long enough to be caught in the middle."""
    paths = make_smv_sweep(tmp_path / "data", n=200)
    run(["dials.import", *paths, "output.experiments=in.expt"], tmp_path)
    return tmp_path, paths


def correct(tmp_path, *args, ok=True):
    return run(["dials.correct_truncation", *ARGS, *args], tmp_path, ok=ok)


def left_zero_value(path):
    """What a zero pixel the correction gives no value holds: 0, or NOT_VALID
    (still masked) where the stock class masks zeros (current dxtbx's ADSC)."""
    import dxtbx

    return 0 if stock_zeros_valid(dxtbx.load(path).get_detector()) else NOT_VALID


@pytest.mark.parametrize(
    "option",
    [
        "output.log={image}",
        "output.json={image}",
        "output.report={expt}",
        "output.experiments={expt}",
        "output.log={phil}",
        "output.json={mask}",
    ],
)
def test_no_output_replaces_an_input(sweep, option):
    """Whichever parameter names it, with or without overwrite."""
    tmp_path, paths = sweep
    (tmp_path / "settings.phil").write_text("truncfix.seed = 3\n")
    import pickle

    from scitbx.array_family import flex

    (tmp_path / "mask.pickle").write_bytes(
        pickle.dumps((flex.bool(flex.grid(*SHAPE), True),))
    )
    option = option.format(
        image=paths[0], expt="in.expt", phil="settings.phil", mask="mask.pickle"
    )
    inputs = [
        *paths,
        tmp_path / "in.expt",
        tmp_path / "settings.phil",
        tmp_path / "mask.pickle",
    ]
    before = checksums(inputs)
    for overwrite in ("False", "True"):
        result = correct(
            tmp_path,
            "in.expt",
            "settings.phil",
            "truncfix.mask=mask.pickle",
            option,
            f"output.overwrite={overwrite}",
            ok=False,
        )
        assert "would replace the input" in one_line_error(result)
        assert checksums(inputs) == before
        assert outputs_in(tmp_path) == []


def test_two_outputs_on_one_path_are_refused(sweep):
    tmp_path, _ = sweep
    result = correct(
        tmp_path, "in.expt", "output.json=out.txt", "output.report=out.txt", ok=False
    )
    assert "output.report=out.txt is also output.json" in one_line_error(result)
    assert outputs_in(tmp_path) == []


def test_refused_run_leaves_the_previous_log_alone(sweep):
    """Outputs exist, the run is refused, the earlier log is intact."""
    tmp_path, _ = sweep
    correct(tmp_path, "in.expt")
    log = (tmp_path / "dials.correct_truncation.log").read_bytes()
    assert "exists" in one_line_error(
        correct(tmp_path, "in.expt", "truncfix.seed=4", ok=False)
    )
    assert (tmp_path / "dials.correct_truncation.log").read_bytes() == log


@pytest.mark.parametrize(
    "option, message",
    [
        ("output.directory=None", "output.directory=None"),
        ("truncfix.n_shells=32769", "n_shells"),
        ("truncfix.likelihood=fancy", "likelihood"),
    ],
)
def test_bad_parameters_stop_before_writing(sweep, option, message):
    """A missing directory, a value out of range, an unknown choice."""
    tmp_path, _ = sweep
    extra = ["truncfix.min_pixels_per_shell=1"] if "n_shells" in option else []
    result = correct(tmp_path, "in.expt", option, *extra, ok=False)
    assert message in one_line_error(result)
    assert outputs_in(tmp_path) == []


def test_no_experiment_list_written_when_none_is_asked(sweep):
    """output.experiments=None works and writes the rest."""
    tmp_path, _ = sweep
    correct(tmp_path, "in.expt", "output.experiments=None")
    assert (
        "corrected.expt" not in outputs_in(tmp_path)
        and len(os.listdir(tmp_path / "corrected")) == 3
    )


def test_directory_given_as_input(sweep):
    """A directory named a.expt."""
    tmp_path, _ = sweep
    (tmp_path / "a.expt").mkdir()
    result = correct(tmp_path, "a.expt", ok=False)
    assert "a.expt: is a directory" in one_line_error(result)


def test_concurrent_runs_into_one_directory(long_sweep):
    """The second run says in one line that the first owns the
    directory; the first completes as if alone."""
    tmp_path, paths = long_sweep
    slow = ["dials.correct_truncation", "in.expt", *ARGS, "nproc=1"]
    first = subprocess.Popen(
        slow,
        cwd=tmp_path,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_staging(tmp_path / "corrected")
    # Paused, the first run surely still owns the directory while the second
    # starts up (a first run that finished meanwhile failed this test in CI).
    os.kill(first.pid, signal.SIGSTOP)
    try:
        assert first.poll() is None, "the first run ended before the second could start"
        second = run(
            [
                "dials.correct_truncation",
                "in.expt",
                *ARGS,
                "output.overwrite=True",
                "output.log=second.log",
                "output.json=second.json",
                "output.report=None",
                "output.experiments=second.expt",
            ],
            tmp_path,
            ok=False,
        )
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert "another dials.correct_truncation is writing there" in one_line_error(second)
    assert first.wait(timeout=600) == 0, first.stderr
    assert (
        not (tmp_path / "second.expt").exists()
        and not (tmp_path / "second.log").exists()
    )
    assert len(os.listdir(tmp_path / "corrected")) == 200


def _wait_for_staging(directory, timeout=120):
    start = time.time()
    while time.time() - start < timeout:
        if directory.exists() and any(
            p.startswith(".dials.correct_truncation.staging")
            for p in os.listdir(directory)
        ):
            return
        time.sleep(0.05)
    raise AssertionError("the run never started staging images")


@pytest.mark.parametrize(
    "signum, whole_group",
    [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True)],
    ids=["SIGTERM", "SIGINT", "Ctrl-C"],
)
def test_interrupted_run_leaves_nothing_half_done(long_sweep, signum, whole_group):
    """No staging, no partial files, no experiment list, no
    traceback (of the run or of its workers, which Ctrl-C in a terminal
    signals too); a later run starts clean."""
    tmp_path, _ = long_sweep
    process = subprocess.Popen(
        ["dials.correct_truncation", "in.expt", *ARGS, "nproc=2"],
        cwd=tmp_path,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=whole_group,
    )
    _wait_for_staging(tmp_path / "corrected")
    if whole_group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode != 0
    assert (
        "Traceback" not in out + err
        and "CAUGHT EXCEPTION" not in out
        and "interrupted" in err
    )
    left = os.listdir(tmp_path / "corrected")
    assert left == [], left
    assert not (tmp_path / "corrected.expt").exists()
    correct(tmp_path, "in.expt", "output.overwrite=True")
    assert len(os.listdir(tmp_path / "corrected")) == 200


@pytest.mark.parametrize(
    "when", ["as the staging is made", "as the images are committed"]
)
def test_a_signal_at_any_step_of_the_staging_leaves_nothing(
    tmp_path, monkeypatch, when
):
    """A signal lands just after ``mkdtemp`` made a staging directory and
    before its name was kept (a race CI once hit), or halfway through moving
    the images into place: no staging directory stays, and the commit is
    whole."""
    import tempfile

    from dials_truncfix.program import outputs
    from dials_truncfix.program.interruption import Interrupted, interruptible

    finals = [str(tmp_path / f"image_{i}.img") for i in range(3)]
    if when == "as the staging is made":
        made = tempfile.mkdtemp

        def mkdtemp_then_signal(**kwargs):
            made(**kwargs)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)

        monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp_then_signal)
    with pytest.raises(Interrupted), interruptible():
        with outputs.staging(finals) as staging:
            for final in finals:
                open(staging.path(final), "w").close()
            replace = os.replace

            def replace_then_signal(source, target):
                replace(source, target)
                if target == finals[0]:
                    os.kill(os.getpid(), signal.SIGTERM)

            monkeypatch.setattr(os, "replace", replace_then_signal)
            staging.commit(finals)
    left = sorted(os.listdir(tmp_path))
    assert left == (
        []
        if when == "as the staging is made"
        else [os.path.basename(f) for f in finals]
    ), left


class _SignalledWhileCollected:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)


@pytest.mark.parametrize("where", ["bare except", "__del__"])
def test_a_swallowed_interruption_still_stops_the_commit(where, monkeypatch):
    """Where the exception cannot surface -- a library that catches
    everything (libtbx's pool wrappers use bare excepts), a place where Python
    prints it as "Exception ignored" (CI saw one in logging's fork handler) --
    the run must neither complete nor print a traceback."""
    from dials_truncfix.program.interruption import Interrupted, interruptible

    printed = []  # what Python would print as "Exception ignored"
    monkeypatch.setattr(sys, "unraisablehook", printed.append)
    with interruptible() as interruption:
        if where == "bare except":
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
            except BaseException:
                pass
        else:
            _SignalledWhileCollected()
        with pytest.raises(Interrupted) as caught:
            interruption.check()
    assert caught.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert printed == []


def test_cut_image_rows_are_left_as_they_are(tmp_path):
    """A file cut short (stock dxtbx reads the missing rows as 0) is
    reported by name; those rows are not corrected, the rest is."""
    paths = make_smv_sweep(tmp_path / "data", n=2)
    with open(paths[1], "r+b") as fh:
        fh.truncate(512 + 2 * SHAPE[1] * 200)  # rows 200 .. 255 missing
    result = correct(tmp_path, *paths)
    assert f"{paths[1]}" in result.stdout and "rows 200-255" in result.stdout
    iset = ExperimentList.from_file(str(tmp_path / "corrected.expt"))[0].imageset
    cut = iset.get_raw_data(1)[0].as_numpy_array()
    left = left_zero_value(paths[0])
    assert (cut[200:] == left).all() and (
        (cut[:200] < 0) & (cut[:200] != left)
    ).sum() > 1000
    assert (iset.get_raw_data(0)[0].as_numpy_array()[200:] < 0).sum() > 1000


def test_all_zero_images_are_left_alone_as_blank(tmp_path):
    """Images with no pixel above zero have nothing to model: written
    unchanged, each reported as blank in a strict JSON record."""
    paths = make_smv_sweep(tmp_path / "data", n=2)
    for k, p in enumerate(paths):
        write_smv(
            p,
            np.zeros(SHAPE, np.uint16),
            PIXEL_SIZE=0.1248,
            DISTANCE=2200.0,
            WAVELENGTH=0.0251,
            BEAM_CENTER_X=16.0,
            BEAM_CENTER_Y=16.0,
            OSC_START=0.5 * k,
            OSC_RANGE=0.5,
            TIME=1.0,
        )
    correct(tmp_path, *paths)
    record = json.loads(
        (tmp_path / "dials.correct_truncation.json").read_text(), parse_constant=_refuse
    )
    assert [
        (i["status"], i["n_changed"]) for i in record["sequences"][0]["images"]
    ] == [(BLANK, 0)] * 2
    iset = ExperimentList.from_file(str(tmp_path / "corrected.expt"))[0].imageset
    assert all(
        (iset.get_raw_data(i)[0].as_numpy_array() == left_zero_value(paths[0])).all()
        for i in range(2)
    )


def _refuse(constant):
    raise ValueError(f"non-strict JSON constant {constant}")


def test_record_is_strict_json():
    """A value that is not a finite number (the parameters of a failed fit)
    is written as null, which every JSON reader accepts."""
    from dials_truncfix.program.record import as_json

    text = as_json(
        {"fit": {"theta": math.nan, "mu": math.inf}, "values": [-math.inf, 1.5]}
    )
    assert json.loads(text, parse_constant=_refuse) == {
        "fit": {"theta": None, "mu": None},
        "values": [None, 1.5],
    }


def test_slow_settings_warn_once_with_an_estimate(sweep, monkeypatch, capsys):
    """In process: the first image is timed and the run's duration
    estimated when it is slow."""
    from dials_truncfix.command_line import correct_truncation
    from dials_truncfix.program import tasks

    tmp_path, _ = sweep
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tasks, "SLOW_IMAGE_SECONDS", 0.0)
    correct_truncation.run(
        ["in.expt", *ARGS, "histogram.max=60000", "output.report=None", "nproc=1"]
    )
    log = (tmp_path / "dials.correct_truncation.log").read_text()
    assert log.count("the 3 images will take about") == 1


@pytest.mark.parametrize("fmt", ["cbf", "smv"])
def test_a_single_image_is_corrected_in_either_format(tmp_path, fmt):
    """One MRC image (no scan, no number in its name) gives one image whose
    negative values a new DIALS process reads as valid pixels; the pixels
    it had above zero are kept (stills are read back in test_command)."""
    import mrcfile

    paths = make_smv_sweep(tmp_path / "data", n=1, osc=0.0)
    raw = np.fromfile(paths[0], dtype="<u2", offset=512).reshape(SHAPE)
    with mrcfile.new(str(tmp_path / "single.mrc")) as mrc:
        mrc.set_data(raw)
    correct(
        tmp_path,
        "single.mrc",
        f"output.format={fmt}",
        "output.directory=single",
        "output.experiments=single.expt",
        "output.json=single.json",
        "output.log=single.log",
        "output.report=None",
    )
    assert len(os.listdir(tmp_path / "single")) == 1
    (expt,) = ExperimentList.from_file(str(tmp_path / "single.expt"))
    assert len(expt.imageset) == 1
    data = expt.imageset.get_corrected_data(0)[
        0
    ].as_numpy_array()  # an SMV pedestal subtracted
    negative = data < 0
    assert (
        negative.sum() > 1000
        and expt.imageset.get_mask(0)[0].as_numpy_array()[negative].all()
    )
    kept = raw > 0
    assert np.array_equal(data[kept], raw[kept])
