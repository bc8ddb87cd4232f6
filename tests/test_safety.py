"""A release that installs anywhere and is safe as a library: the report
without the plotly package, the output lock by each platform's own call, no
process-wide signal handling outside the command line, bounded memories of
what was said, and a resolution flag that nests."""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import environment, one_line_error, run
from test_command import ARGS, make_smv_sweep

from dxtbx.model.experiment_list import ExperimentList

from dials_truncfix import format_wrapper
from dials_truncfix.command_line.correct_truncation import correct, phil_scope
from dials_truncfix.core import correction
from dials_truncfix.core.correction import REMEMBERED_KEYS, RecentKeys, say_once
from dials_truncfix.program import outputs, report
from dials_truncfix.program.outputs import LOCK_NAME, OutputError, run_lock

# --- the report without the plotly package -------------------------------------------------------

#: run dials.correct_truncation as its entry point does, after an import of plotly has been made to fail and,
#: with "no-dials-js" as first argument, with no plotly.js shipped by DIALS either (or a given file as DIALS')
WRAPPER = textwrap.dedent("""
    import sys
    sys.modules["plotly"] = None  # import plotly raises ImportError
    from dials_truncfix.program import report
    what = sys.argv.pop(1)
    if what != "-":
        report.dials_plotly_js = lambda: None if what == "no-dials-js" else what
    from dials_truncfix.command_line.correct_truncation import run
    run(sys.argv[1:])
""")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imported")
    paths = make_smv_sweep(tmp / "data", n=2)
    run(["dials.import", *paths, "output.experiments=imported.expt"], tmp)
    return tmp


def _outputs(directory):
    return sorted(
        p
        for p in os.listdir(directory)
        if p not in ("data", "imported.expt", "dials.import.log")
    )


def _blocked_plotly(tmp_path):
    """A PYTHONPATH whose plotly package cannot be imported."""
    blocked = tmp_path / "blocked"
    (blocked / "plotly").mkdir(parents=True, exist_ok=True)
    (blocked / "plotly" / "__init__.py").write_text(
        'raise ImportError("No module named plotly (blocked by the test)")\n'
    )
    return os.pathsep.join(
        [str(blocked), *filter(None, [os.environ.get("PYTHONPATH")])]
    )


def _check_refused(result, workdir):
    output = one_line_error(result)
    lines = [line for line in output.splitlines() if "plotly" in line]
    assert len(lines) == 1 and "output.report=None" in lines[0], output
    assert _outputs(workdir) == [], (
        "nothing written, not even the log or the output directory"
    )


@pytest.mark.slow
def test_report_without_the_plotly_package(imported, tmp_path):
    """The stock program with plotly unimportable: DIALS' own plotly.js where
    DIALS ships it (current DIALS), else a one-line error before anything is
    written (DIALS 3.12)."""
    work = tmp_path / "work"
    work.mkdir()
    result = run(
        ["dials.correct_truncation", imported / "imported.expt", *ARGS, "nproc=1"],
        work,
        ok=False,
        PYTHONPATH=_blocked_plotly(tmp_path),
    )
    if report.dials_plotly_js() is None:
        _check_refused(result, work)
        run(
            [
                "dials.correct_truncation",
                imported / "imported.expt",
                *ARGS,
                "nproc=1",
                "output.report=None",
            ],
            work,
            PYTHONPATH=_blocked_plotly(tmp_path),
        )
        assert "dials.correct_truncation.html" not in _outputs(
            work
        ) and "corrected.expt" in _outputs(work)
    else:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "plotly-js-gzip" in (work / "dials.correct_truncation.html").read_text()


@pytest.mark.slow
def test_neither_plotly_nor_dials_plotly_js_stops_in_one_line_before_any_output(
    imported, tmp_path
):
    result = run(
        [
            sys.executable,
            "-c",
            WRAPPER,
            "no-dials-js",
            imported / "imported.expt",
            *ARGS,
            "nproc=1",
        ],
        tmp_path,
        ok=False,
    )
    _check_refused(result, tmp_path)


@pytest.mark.slow
def test_dials_plotly_js_is_embedded_without_the_plotly_package(imported, tmp_path):
    import base64
    import gzip
    import re

    fake = tmp_path / "plotly-latest.min.js"
    fake.write_text(
        "/* plotly.js as DIALS ships it */ window.Plotly = window.Plotly;\n"
    )
    work = tmp_path / "work"
    work.mkdir()
    run(
        [
            sys.executable,
            "-c",
            WRAPPER,
            fake,
            imported / "imported.expt",
            *ARGS,
            "nproc=1",
        ],
        work,
    )
    page = (work / "dials.correct_truncation.html").read_text()
    embedded = re.findall(r'id="plotly-js-gzip">([^<]*)</script>', page)
    assert (
        gzip.decompress(base64.b64decode(embedded[0])).decode("utf-8")
        == fake.read_text()
    )
    assert (work / "corrected.expt").exists()


def test_the_report_module_needs_no_plotly():
    """Every import of the report is at its top, and none is plotly's."""
    code = "import sys; sys.modules['plotly'] = None; import dials_truncfix.program.report as r; print(len(r.COLOURS))"
    assert run([sys.executable, "-c", code], os.getcwd()).stdout.strip() == "10"


# --- the output lock ---------------------------------------------------------------------------------

LOCKER = textwrap.dedent("""
    import sys, time
    from dials_truncfix.program.outputs import OutputError, run_lock
    try:
        with run_lock([sys.argv[1]]):
            print("locked", flush=True)
            time.sleep(float(sys.argv[2]))
    except OutputError as e:
        print(e)
        sys.exit(1)
""")


def _lock_in_another_process(directory, hold=0.0):
    return subprocess.run(
        [sys.executable, "-c", LOCKER, str(directory), str(hold)],
        capture_output=True,
        text=True,
        env=environment(),
    )


def test_a_second_process_cannot_take_the_lock_and_gets_it_once_released(tmp_path):
    with run_lock([tmp_path]):
        assert (tmp_path / LOCK_NAME).exists()
        second = _lock_in_another_process(tmp_path)
        assert second.returncode == 1
        assert second.stdout.strip() == (
            f"{tmp_path}: another dials.correct_truncation is writing there; wait for it or choose another output "
            "directory"
        ), second.stdout + second.stderr
    assert not (tmp_path / LOCK_NAME).exists()
    assert _lock_in_another_process(tmp_path).stdout.strip() == "locked"


def test_the_lock_of_a_killed_process_is_released(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(tmp_path), "600"],
        stdout=subprocess.PIPE,
        text=True,
        env=environment(),
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            OutputError, match="another dials.correct_truncation is writing there"
        ):
            with run_lock([tmp_path]):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / LOCK_NAME).exists(), (
        "killed outright: its lock file stays, unlocked"
    )
    with run_lock([tmp_path]):
        pass
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_lock_module_imports_no_posix_only_module_at_its_top():
    import ast

    tree = ast.parse(open(outputs.__file__).read())
    top = {
        alias.name
        for node in tree.body
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    top |= {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert not top & {"fcntl", "msvcrt"}, top


# --- no process-wide signal handling outside the command line --------------------------------------


def _sleep():
    time.sleep(600)


@pytest.mark.slow
def test_the_library_entry_point_installs_nothing_and_kills_nothing(
    imported, tmp_path, monkeypatch
):
    """correct(), which the command line's run() calls, called from Python:
    no signal handler set (not even for a moment), the unraisable hook
    unchanged, the caller's multiprocessing children alive."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    hook = sys.unraisablehook
    set_signals = []
    real_signal = signal.signal
    monkeypatch.setattr(
        signal, "signal", lambda s, h: set_signals.append(s) or real_signal(s, h)
    )
    child = multiprocessing.get_context("spawn").Process(target=_sleep, daemon=True)
    child.start()
    try:
        experiments = ExperimentList.from_file(str(imported / "imported.expt"))
        params = phil_scope.extract()
        (
            params.truncfix.n_shells,
            params.truncfix.min_pixels_per_shell,
            params.mp.nproc,
        ) = 4, 100, 1
        params.output.report = None
        params.output.directory = str(tmp_path / "corrected")
        params.output.experiments = str(tmp_path / "corrected.expt")
        params.output.json = str(tmp_path / "record.json")
        params.output.log = None
        correct(experiments, params, argparse.Namespace(verbose=0))
        assert (
            len(os.listdir(tmp_path / "corrected")) == 2
            and (tmp_path / "corrected.expt").exists()
        )
        assert set_signals == []
        assert {s: signal.getsignal(s) for s in handlers} == handlers
        assert sys.unraisablehook is hook
        assert child.is_alive(), "the caller's child process was killed"
    finally:
        child.kill()
        child.join()


# --- bounded memories --------------------------------------------------------------------------------


def test_recent_keys_stay_bounded_and_remember_the_latest():
    keys = RecentKeys(3)
    assert [keys.first_time(k) for k in "abca"] == [True, True, True, False]
    assert keys.first_time("d") and len(keys) == 3
    assert "b" not in keys and "a" in keys, "the least recently seen is forgotten first"
    assert not keys.first_time("a") and not keys.first_time("d")


def test_say_once_says_once_within_the_bound_and_its_memory_stays_bounded(caplog):
    caplog.set_level(logging.INFO, logger=correction.logger.name)
    for _ in range(3):
        say_once(("test", "repeated news"), logging.INFO, "news %s", "once")
    assert caplog.text.count("news once") == 1
    for k in range(REMEMBERED_KEYS + 100):
        say_once(("test", k), logging.DEBUG, "key %d", k)
    assert len(correction.said) == REMEMBERED_KEYS
    caplog.clear()
    say_once(("test", REMEMBERED_KEYS), logging.INFO, "recent key")
    assert "recent key" not in caplog.text, "a key within the bound is still said once"
    say_once(("test", 0), logging.INFO, "forgotten key")
    assert "forgotten key" in caplog.text


def test_the_settings_remember_a_bounded_number_of_records(caplog):
    from dials_truncfix.core.parameters import CorrectionParameters
    from dials_truncfix.settings import Settings, noted_records

    record = dict(Settings(CorrectionParameters()).to_record(), algorithm=1)
    with caplog.at_level(logging.WARNING):
        for seed in range(REMEMBERED_KEYS + 10):
            Settings.from_record(
                dict(record, parameters=dict(record["parameters"], seed=seed))
            )
        Settings.from_record(
            dict(record, parameters=dict(record["parameters"], seed=REMEMBERED_KEYS))
        )
    assert len(noted_records) == REMEMBERED_KEYS
    assert (
        caplog.text.count("truncation-correction algorithm 1") == REMEMBERED_KEYS + 10
    ), "one warning per record"


# --- the stock-class resolution nests ----------------------------------------------------------------


def test_resolving_the_stock_class_restores_the_state_it_found(tmp_path):
    path = make_smv_sweep(tmp_path, n=1)[0]
    assert not format_wrapper.stock_class_being_resolved()
    with format_wrapper.resolving_stock_class():
        stock = format_wrapper.stock_format_class(
            path
        )  # nested: a resolution inside another
        assert format_wrapper.stock_class_being_resolved(), (
            "the inner resolution ended the outer one"
        )
        with format_wrapper.resolving_stock_class():
            pass
        assert format_wrapper.stock_class_being_resolved()
    assert not format_wrapper.stock_class_being_resolved()
    assert stock.__name__.startswith("FormatSMV")
