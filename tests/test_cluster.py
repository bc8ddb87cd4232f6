"""dials.correct_truncation on a real cluster scheduler: real jobs of a
one-node Slurm (CI starts one with ../shared/cluster/slurm-one-node.sh up)
and, where one is up, a one-node Grid Engine (sge-one-node.sh).  Without a
scheduler these tests skip with one line; with TRUNCFIX_TEST_SLURM=1 (or
TRUNCFIX_TEST_SGE=1), as CI sets, they are required and fail instead."""

from __future__ import annotations

import filecmp
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import environment, one_line_error, read_back, run
from test_command import ARGS, make_smv_sweep

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

JOB_NAME = "dials.correct_truncation"
SGE_ENV = {"SGE_ROOT": "/var/lib/gridengine", "SGE_CELL": "default"}
#: what each cluster run of these tests asks for (small: a one-node cluster)
SMALL = ["mp.cluster.memory=1GB", "mp.cluster.walltime=00:10:00"]


def _missing(method):
    """Why the scheduler of ``method`` cannot be used here, or None."""
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        return "dask-jobqueue is not installed (pip install 'dials-truncfix[cluster]')"
    submit, probe = {
        "slurm": ("sbatch", ["sinfo", "-h", "-o", "%T"]),
        "sge": ("qsub", ["qstat", "-f"]),
    }[method]
    if shutil.which(submit) is None:
        return f"no {method} here ({submit} not on PATH; CI starts one with ../shared/cluster/{method}-one-node.sh up)"
    try:
        answer = subprocess.run(
            probe,
            capture_output=True,
            text=True,
            timeout=20,
            env=environment(**SGE_ENV),
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{method} does not answer ({e})"
    if answer.returncode != 0 or (method == "slurm" and not answer.stdout.strip()):
        return f"{method} does not answer: {' '.join(probe)}: {(answer.stderr.strip().splitlines() or [''])[0][:200]}"
    return None


def _scheduler(method):
    reason = _missing(method)
    if reason:
        if os.environ.get(f"TRUNCFIX_TEST_{method.upper()}") == "1":
            pytest.fail(f"TRUNCFIX_TEST_{method.upper()}=1 but {reason}")
        pytest.skip(reason)
    return method


@pytest.fixture(scope="module")
def slurm():
    return _scheduler("slurm")


@pytest.fixture(scope="module", params=["slurm", "sge"])
def scheduler(request):
    return _scheduler(request.param)


def our_jobs(method):
    """The jobs of dials.correct_truncation the scheduler still holds."""
    if method == "slurm":
        out = subprocess.run(
            ["squeue", "-h", "-n", JOB_NAME, "-o", "%i %T"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    else:
        out = subprocess.run(
            ["qstat"],
            capture_output=True,
            text=True,
            check=True,
            env=environment(**SGE_ENV),
        ).stdout
        out = "\n".join(line for line in out.splitlines() if JOB_NAME[:10] in line)
    return out.split("\n") if out.strip() else []


def wait_until_gone(method, timeout=30):
    start = time.time()
    while our_jobs(method) and time.time() - start < timeout:
        time.sleep(0.5)
    return our_jobs(method)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    paths = make_smv_sweep(tmp / "data", n=6)
    run(["dials.import", *paths, "output.experiments=in.expt"], tmp)
    return tmp


def _normalised(expt, directory):
    """An experiment list's JSON with its output directory's name and the
    time of its history line (current dxtbx) taken out."""
    with open(expt) as fh:
        text = fh.read().replace(os.path.abspath(directory), "<out>")
    return re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "<time>", text)


def _left_behind(directory):
    """Files a run must not leave: staging, job logs, job scripts, libtbx's
    pickles, dask's worker directories."""
    found = []
    for pattern in (
        ".dials.correct_truncation.staging-*",
        "slurm-*.out",
        "*.sh",
        "libtbx_python*",
        "dask-worker-space",
        "dask-scratch-space",
        "dials.correct_truncation-*.err",
        "dials.correct_truncation-*.out",
    ):
        found += glob.glob(os.path.join(str(directory), "**", pattern), recursive=True)
    return found


@pytest.mark.parametrize(
    "fmt, jobs",
    [
        ("cbf", ["mp.njobs=2"]),
        ("smv", ["mp.cluster.cores=2"]),
        ("on_read", []),
    ],
    ids=["cbf-2-jobs", "smv-1-job-2-cores", "on_read-1-job"],
)
def test_cluster_run_equals_local_run(sweep, scheduler, fmt, jobs, tmp_path):
    """Images byte-identical and the same experiment list as nproc=1 here;
    the log names the jobs; nothing left in the output or working directory
    or the temporary directory, no job left in the queue."""
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    common = [str(sweep / "in.expt"), *ARGS, f"output.format={fmt}"]
    names = {}
    for where in ("local", scheduler):
        out = tmp_path / where
        names[where] = out
        run(
            [
                "dials.correct_truncation",
                *common,
                f"output.directory={out}",
                f"output.experiments={out}.expt",
                f"output.json={out}.json",
                f"output.log={out}.log",
                "output.report=None",
                *(
                    ["nproc=1"]
                    if where == "local"
                    else [f"mp.method={scheduler}", *jobs, *SMALL]
                ),
            ],
            tmp_path,
            TMPDIR=str(tmpdir),
            **(SGE_ENV if scheduler == "sge" else {}),
        )
    log = open(f"{names[scheduler]}.log").read()
    njobs = 2 if "mp.njobs=2" in jobs else 1
    assert f"Submitting {njobs} " in log and " job(s): " in log, log
    if fmt != "on_read":
        local = sorted(os.listdir(names["local"]))
        assert local and sorted(os.listdir(names[scheduler])) == local
        match, mismatch, errors = filecmp.cmpfiles(
            names["local"], names[scheduler], local, shallow=False
        )
        assert (mismatch, errors) == ([], []) and match == local
    assert _normalised(f"{names['local']}.expt", names["local"]) == _normalised(
        f"{names[scheduler]}.expt", names[scheduler]
    )
    local_record, cluster_record = (
        json.load(open(f"{names[w]}.json")) for w in ("local", scheduler)
    )
    for record in (local_record, cluster_record):
        record.pop("run", None)  # when, where, how long
    assert json.dumps(local_record, sort_keys=True).replace(
        str(names["local"]), "<out>"
    ) == json.dumps(cluster_record, sort_keys=True).replace(
        str(names[scheduler]), "<out>"
    )
    assert _left_behind(tmp_path) == [] and os.listdir(tmpdir) == []
    assert wait_until_gone(scheduler) == []


def test_interrupted_cluster_run_cancels_its_jobs_and_leaves_nothing(tmp_path, slurm):
    """SIGINT while the jobs correct: the jobs leave the queue, the output
    directory holds nothing, no experiment list, no traceback; while the run
    worked, its job logs were in its staging directory."""
    paths = make_smv_sweep(tmp_path / "data", n=120)
    process = subprocess.Popen(
        [
            "dials.correct_truncation",
            *paths,
            *ARGS,
            "mp.method=slurm",
            "mp.njobs=2",
            *SMALL,
        ],
        cwd=tmp_path,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    corrected = tmp_path / "corrected"
    start, seen = time.time(), []
    while time.time() - start < 120 and process.poll() is None:
        running = [j for j in our_jobs("slurm") if j.endswith("RUNNING")]
        staged = glob.glob(str(corrected / ".dials.correct_truncation.staging-*/*.cbf"))
        if len(running) == 2 and len(staged) >= 4:
            seen = glob.glob(
                str(corrected / ".dials.correct_truncation.staging-*/cluster/*.err")
            )
            break
        time.sleep(0.1)
    assert process.poll() is None, "the run ended before it could be interrupted"
    assert len(seen) == 2, seen  # each job's log in the staging directory
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, out + err
    assert "Traceback" not in out + err and "interrupted" in err, out + err
    assert wait_until_gone("slurm") == []
    assert os.listdir(corrected) == []
    assert not (tmp_path / "corrected.expt").exists()
    assert _left_behind(tmp_path) == []


def test_refused_submission_is_one_line(sweep, slurm, tmp_path):
    """A partition that does not exist: Slurm's complaint in one line, no
    traceback, nothing written, nothing queued."""
    result = run(
        [
            "dials.correct_truncation",
            str(sweep / "in.expt"),
            *ARGS,
            "mp.method=slurm",
            "mp.njobs=2",
            "mp.cluster.queue=no_such_partition",
            *SMALL,
        ],
        tmp_path,
        ok=False,
    )
    output = one_line_error(result)
    assert "sbatch failed: sbatch: error: Batch job submission failed" in output
    assert "Invalid partition" in output, output
    assert not (tmp_path / "corrected.expt").exists()
    assert os.listdir(tmp_path / "corrected") == []
    assert _left_behind(tmp_path) == [] and our_jobs("slurm") == []


@pytest.mark.parametrize("method, command", [("slurm", "sbatch"), ("sge", "qsub")])
def test_absent_scheduler_is_one_line(sweep, tmp_path, method, command):
    """No submit command on PATH (a machine without the scheduler): one
    line that says so, no traceback, nothing written."""
    pytest.importorskip("dask_jobqueue")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = shutil.which("dials.correct_truncation")
    (bin_dir / "dials.correct_truncation").symlink_to(program)
    result = run(
        [
            "dials.correct_truncation",
            str(sweep / "in.expt"),
            *ARGS,
            f"mp.method={method}",
        ],
        tmp_path,
        ok=False,
        PATH=str(bin_dir),
    )
    output = one_line_error(result)
    assert f"mp.method={method}: {command} not found on PATH" in output, output
    assert not (tmp_path / "corrected.expt").exists()
    assert _left_behind(tmp_path) == []


READ_IN_JOB = """
import hashlib, json, sys
import numpy as np
from dxtbx.model.experiment_list import ExperimentListFactory
assert "DIALS_TRUNCFIX" not in __import__("os").environ
iset = ExperimentListFactory.from_json_file(sys.argv[1])[0].imageset
data = [np.concatenate([p.as_numpy_array().ravel() for p in iset.get_raw_data(i)]) for i in range(len(iset))]
np.save(sys.argv[2], np.stack(data))
print(json.dumps({"format": iset.get_format_class().__name__}))
"""


def test_on_read_experiment_list_read_in_a_slurm_job(sweep, slurm, tmp_path):
    """An experiment list written by dials.import with DIALS_TRUNCFIX=1,
    read by a Slurm job whose environment has no DIALS_TRUNCFIX: the
    corrected pixels, as read here, not the stock ones."""
    paths = sorted(glob.glob(str(sweep / "data" / "*.img")))
    run(
        ["dials.import", *paths, "output.experiments=on_read.expt"],
        tmp_path,
        DIALS_TRUNCFIX="1",
    )
    _, here, _ = read_back("on_read.expt", tmp_path)
    _, stock, _ = read_back(str(sweep / "in.expt"), tmp_path)
    (tmp_path / "read.py").write_text(READ_IN_JOB)
    env = environment()
    exported = {
        k: env[k]
        for k in ("PATH", "HOME", "PYTHONPATH", "LD_LIBRARY_PATH", "LANG")
        if k in env and "," not in env[k]
    }
    job = subprocess.run(
        [
            "sbatch",
            "--wait",
            "-Q",
            "-J",
            "truncfix-on-read-test",
            "-o",
            str(tmp_path / "job.out"),
            "--export=" + ",".join(f"{k}={v}" for k, v in exported.items()),
            "--wrap",
            f"{sys.executable} {tmp_path / 'read.py'} {tmp_path / 'on_read.expt'} {tmp_path / 'job.npy'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert job.returncode == 0, job.stderr + log
    assert json.loads(log.strip().splitlines()[-1])["format"].startswith("Truncfix_")
    in_job = np.load(tmp_path / "job.npy")
    assert np.array_equal(in_job, np.stack(here))
    assert not np.array_equal(in_job, np.stack(stock))
    assert (in_job < 0).any() and not (np.stack(stock) < 0).any()


def _mp(method, **cluster):
    """The mp PHIL parameters of dials.correct_truncation with ``cluster``."""
    from dials_truncfix.command_line.correct_truncation import phil_scope

    words = [f"mp.method={method}"] + [
        f"mp.cluster.{k}={v}" for k, v in cluster.items()
    ]
    import iotbx.phil

    return phil_scope.fetch(sources=[iotbx.phil.parse(w) for w in words]).extract().mp


def test_job_options_follow_the_parameters(tmp_path):
    """What each job asks for: cores as worker processes, memory, queue,
    walltime; Grid Engine gets the submitting environment (-V) and a
    parallel environment for more than one core; every file in the work
    directory."""
    from dials_truncfix.program.cluster import cluster_options

    slurm = cluster_options(
        _mp("slurm", cores=3, memory="2GB", queue="short", extra="--qos=low"),
        str(tmp_path),
    )
    assert (slurm["cores"], slurm["processes"], slurm["memory"], slurm["queue"]) == (
        3,
        3,
        "2GB",
        "short",
    )
    assert slurm["job_extra_directives"] == ["--qos=low"]
    assert {
        slurm[k] for k in ("local_directory", "log_directory", "shared_temp_directory")
    } == {str(tmp_path)}
    assert slurm["python"] == sys.executable
    sge = cluster_options(_mp("sge", cores=2), str(tmp_path))
    assert sge["job_extra_directives"] == ["-V", "-pe smp 2"]
    assert cluster_options(_mp("sge"), str(tmp_path))["job_extra_directives"] == ["-V"]


def test_without_dask_jobqueue_one_line(monkeypatch):
    """The extra not installed: one line naming it."""
    from dials_truncfix.program import cluster

    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)
    with pytest.raises(cluster.ClusterError) as error:
        with cluster.cluster_client(_mp("slurm"), "unused"):
            pass
    assert "pip install 'dials-truncfix[cluster]'" in str(error.value)
