"""The correction's tasks as jobs of a cluster scheduler (Slurm, Grid
Engine), through dask-jobqueue (the optional extra
``dials-truncfix[cluster]``).

Why not DIALS' own ``mp.method`` (``dials.util.mp`` and libtbx's
``cluster_method``): on Python 3 its job submission fails in Debian's cctbx
(a ``TypeError`` about memoryview) and in the current wheels, it passes Grid
Engine's ``qsub -pe smp N`` to every scheduler, and with ``njobs=1`` it runs
locally without a word.  dask-jobqueue is maintained, speaks Slurm, SGE,
PBS, LSF and HTCondor, and cancels its jobs when the cluster is closed.
Only the schedulers that are tested for real are offered (:data:`METHODS`).

How a run uses it: ``mp.njobs`` jobs are submitted, each one dask worker
process per core (``mp.cluster.cores``, one thread each: the correction is
numpy code that holds the GIL), started with this Python (so the nodes need
the plugin installed in the same environment, on a filesystem they share
with this machine, as they need the images and the output directory).  The
run's task is sent once and every image is one dask task; results come back
in order, so a cluster run gives the same bytes as a local one.  Every file
of the cluster (job scripts, job logs, worker directories) is made in the
run's staging directory and goes with it; the jobs are cancelled when the
run ends for any reason, an interruption included.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from typing import Callable, Iterator, Sequence

from dials_truncfix.program.interruption import signals_held

logger = logging.getLogger("dials.command_line.correct_truncation")

#: mp.method: (dask_jobqueue class, submit command, scheduler's name)
METHODS = {
    "slurm": ("SLURMCluster", "sbatch", "Slurm"),
    "sge": ("SGECluster", "qsub", "Grid Engine"),
}

#: the name of the jobs in the scheduler's queue
JOB_NAME = "dials.correct_truncation"


class ClusterError(RuntimeError):
    """A cluster run that cannot start or fails (reported as a one-line error)."""


def is_cluster(mp) -> bool:
    return mp.method not in (None, "none")


def _import_dask_jobqueue(method):
    """dask_jobqueue and distributed; importing dask_jobqueue replaces the
    process's SIGINT handler with one that exits with status 0 (its
    runner module, for jobs that run a scheduler): the handler in force
    (the command line's, which cancels the jobs and removes the staging
    directory) is put back."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        import dask_jobqueue
        import distributed
    except ImportError as e:
        raise ClusterError(
            f"mp.method={method} needs dask-jobqueue ({e}): install it with "
            "pip install 'dials-truncfix[cluster]' in this environment"
        ) from None
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGINT, previous)
    return dask_jobqueue, distributed


def _one_line(error: Exception) -> str:
    """The scheduler's own complaint from dask-jobqueue's "Command exited
    with non-zero exit code" error (its stderr's last line), else the error."""
    text = str(error)
    if "stderr:" in text:
        lines = [
            line.strip()
            for line in text.split("stderr:", 1)[1].splitlines()
            if line.strip()
        ]
        if lines:
            return lines[-1]
    return " ".join(text.split())


class _DropSubmissionErrors(logging.Filter):
    """The tracebacks that asyncio and tornado log for a refused submission
    ("Task exception was never retrieved", "Exception in callback ...
    _correct_state"): the same error that :func:`cluster_client` raises as
    one line."""

    def filter(self, record):
        message = record.getMessage()
        return not (
            "exception was never retrieved" in message or "_correct_state" in message
        )


@contextlib.contextmanager
def _files_in(directory: str) -> Iterator[None]:
    """dask-jobqueue writes each job script with ``tempfile`` in the
    system's temporary directory: here, in ``directory``, for the run."""
    previous, tempfile.tempdir = tempfile.tempdir, directory
    try:
        yield
    finally:
        tempfile.tempdir = previous


def cluster_options(mp, workdir: str) -> dict:
    """dask-jobqueue's arguments for the PHIL parameters ``mp``."""
    cores = mp.cluster.cores
    extra = list(mp.cluster.extra or [])
    if mp.method == "sge":
        # the submitting shell's environment, as Slurm passes it by default
        extra.insert(0, "-V")
        if cores > 1:
            extra.append(f"-pe {mp.cluster.parallel_environment} {cores}")
    return {
        "cores": cores,
        "processes": cores,
        "memory": mp.cluster.memory,
        "queue": mp.cluster.queue,
        "walltime": mp.cluster.walltime,
        "job_name": JOB_NAME,
        "job_extra_directives": extra,
        "python": sys.executable,
        "local_directory": workdir,
        "log_directory": workdir,
        "shared_temp_directory": workdir,
        "scheduler_options": {"dashboard_address": None},
    }


@contextlib.contextmanager
def cluster_client(mp, workdir: str):
    """A dask client whose workers are ``mp.njobs`` jobs of the scheduler of
    ``mp.method``, submitted before it is yielded (a scheduler that refuses
    them is a :class:`ClusterError`) and cancelled when the block ends."""
    class_name, submit, name = METHODS[mp.method]
    dask_jobqueue, distributed = _import_dask_jobqueue(mp.method)
    if shutil.which(submit) is None:
        raise ClusterError(
            f"mp.method={mp.method}: {submit} not found on PATH: run on a "
            f"machine that submits {name} jobs"
        )
    if mp.nproc not in (None, 0) and str(mp.nproc) != "Auto":
        logger.warning(
            "mp.nproc=%s is for runs on this machine: each %s job runs "
            "mp.cluster.cores=%d worker process(es)",
            mp.nproc,
            name,
            mp.cluster.cores,
        )
    os.makedirs(workdir, exist_ok=True)
    quiet = _DropSubmissionErrors()
    loggers = [logging.getLogger(n) for n in ("asyncio", "tornado.application")]
    for each in loggers:
        each.addFilter(quiet)
    cluster = client = None
    try:
        with _files_in(workdir):
            try:
                cluster = getattr(dask_jobqueue, class_name)(
                    **cluster_options(mp, workdir)
                )
            except ValueError as e:  # e.g. an invalid memory or walltime
                raise ClusterError(f"mp.cluster: {e}") from None
            logger.info(
                "Submitting %d %s job(s)%s, each %d core(s) and %s",
                mp.njobs,
                name,
                f" to {mp.cluster.queue}" if mp.cluster.queue else "",
                mp.cluster.cores,
                mp.cluster.memory,
            )
            try:
                cluster.sync(_submit, cluster, mp.njobs)
            except RuntimeError as e:
                _mark_refused(cluster)
                raise ClusterError(
                    f"mp.method={mp.method}: {submit} failed: {_one_line(e)}"
                ) from None
            logger.info(
                "%s job(s): %s", name, " ".join(str(j) for j in job_ids(cluster))
            )
            client = distributed.Client(cluster)
        yield client
    finally:
        with signals_held():
            if client is not None:
                client.close()
            if cluster is not None:
                cluster.close()  # cancels the jobs (scancel, qdel)
        for each in loggers:
            each.removeFilter(quiet)


def _mark_refused(cluster):
    """dask-jobqueue leaves a job whose submission was refused in the state
    "created", and closing the cluster then fails an assertion of
    distributed's: it is a failed job."""
    from distributed.core import Status

    for job in getattr(cluster, "_created", ()):
        if job.status == Status.created:
            job.status = Status.failed


async def _submit(cluster, njobs):
    """Submit the jobs and wait for the submissions, so that a scheduler's
    refusal is raised here.  In the cluster's event loop: ``scale`` schedules
    the same submission for the loop's next turn, which then joins the one
    started here (called from another thread, it could run first, and its
    error would be lost)."""
    cluster.scale(jobs=njobs)
    await cluster._correct_state()


def job_ids(cluster) -> list[str]:
    return [
        str(job.job_id)
        for job in cluster.workers.values()
        if getattr(job, "job_id", None)
    ]


def _apply(task, item):
    return task(item)


def _identity(value):
    return value


def cluster_map(
    client, func: Callable, items: Sequence, callback: Callable | None
) -> list:
    """``func`` over ``items`` as dask tasks of the jobs of ``client`` (from
    :func:`cluster_client`); the results in the order of ``items``,
    ``callback`` called with each as it comes."""
    if not items:
        return []
    import distributed

    # the task (plans, imagesets) sent once, then fetched by each worker
    shared = client.submit(_identity, func, pure=False)
    futures = client.map(_apply, [shared] * len(items), items, pure=False)
    for future in distributed.as_completed(futures):
        try:
            result = future.result()  # a task's error is raised here
        except distributed.KilledWorker:
            raise ClusterError(
                "a cluster job stopped while correcting an image (killed by the "
                "scheduler: its walltime or memory, mp.cluster.walltime and "
                "mp.cluster.memory?)"
            ) from None
        if callback:
            callback(result)
    return client.gather(futures)
