"""Nothing lost, nothing half-done: the rules for the outputs of
dials.correct_truncation.

* Every output path is checked before any work, the log included: none may
  be an input (image, experiment list, mask), two outputs may not share a
  path, and existing files are refused unless ``output.overwrite=True``.
* One run at a time owns its output directories: a hidden lock file in
  each, locked for the run (``flock``, ``msvcrt.locking`` on Windows: released
  by the system if the process dies) and removed at its end.
* Images are written into a hidden staging directory next to their final
  place and moved there only when every image is done; the experiment list
  is written last.  An interrupted run (SIGTERM, SIGINT, an error) removes
  its staging directory (:mod:`.interruption` says how); one killed
  outright leaves only that hidden directory, which the next run in the
  same place removes.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import sys
import tempfile
from typing import Iterable, Iterator, Mapping, Sequence

from dials_truncfix.program.interruption import signals_held, stop_workers

LOCK_NAME = ".dials.correct_truncation.lock"
STAGING_PREFIX = ".dials.correct_truncation.staging-"


class OutputError(RuntimeError):
    """An output that cannot be written (reported as a one-line error)."""


def _same_file(a, b):
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output_paths(
    named: Mapping[str, str | None],
    image_outputs: Sequence[str],
    inputs: Sequence[str],
    overwrite: bool,
) -> None:
    """Refuse, before any work, an output that would replace an input, share
    a path with another or (without ``overwrite``) replace a file.
    ``named``: {parameter: path or None}; ``image_outputs``: the image files
    to write; ``inputs``: every file the run reads."""
    outputs = [(name, path) for name, path in named.items() if path]
    outputs += [("output.directory", path) for path in image_outputs]
    seen = {}
    for name, path in outputs:
        for source in inputs:
            if _same_file(path, source):
                raise OutputError(f"{name}={path} would replace the input {source}")
        key = os.path.realpath(path)
        if key in seen:
            raise OutputError(
                f"{name}={path} is also {seen[key]}: give each output its own path"
            )
        seen[key] = name
        if os.path.isdir(path):
            raise OutputError(f"{name}={path} is a directory")
    if not overwrite:
        existing = [path for _, path in outputs if os.path.lexists(path)]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise OutputError(
                f"{existing[0]} exists{more}: choose another output or set output.overwrite=True"
            )


@contextlib.contextmanager
def run_lock(directories: Iterable[str]) -> Iterator[None]:
    """Hold the lock of every output directory (created if needed)."""
    with contextlib.ExitStack() as stack:
        for directory in sorted({os.path.abspath(d) for d in directories}):
            os.makedirs(directory, exist_ok=True)
            stack.enter_context(_directory_lock(directory))
        yield


def try_lock(fh) -> bool:
    """Lock the open file ``fh`` for this process without waiting: False if
    another process holds it.  The system releases it when the process ends,
    however it ends.  POSIX: ``flock``; Windows: ``msvcrt.locking`` of its
    first byte (each imported only where it exists)."""
    if sys.platform == "win32":
        import msvcrt

        fh.seek(0)
        try:
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EDEADLK, errno.EAGAIN):
                raise
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return False
    return True


def unlock(fh) -> None:
    """Release the lock :func:`try_lock` took on ``fh``."""
    if sys.platform == "win32":
        import msvcrt

        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _directory_lock(directory):
    """The lock of a hidden file, removed when done; a lock taken on a file
    that another run removed meanwhile is taken again on the new one."""
    path = os.path.join(directory, LOCK_NAME)
    while True:
        fh = open(path, "a")
        if not try_lock(fh):
            fh.close()
            raise OutputError(
                f"{directory}: another dials.correct_truncation is writing there; wait for it or choose "
                "another output directory"
            )
        if (
            os.path.exists(path)
            and os.path.samefile(path, fh.name)
            and os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino
        ):
            break
        fh.close()
    try:
        yield
    finally:
        if (
            sys.platform == "win32"
        ):  # an open file cannot be removed there; a run that opens it meanwhile keeps it
            unlock(fh)
            fh.close()
            with contextlib.suppress(OSError):
                os.remove(path)
        else:
            os.remove(path)
            fh.close()


class Staging:
    """The hidden directory of each output directory that holds this run's images."""

    def __init__(self, directories: Mapping[str, str]) -> None:
        self.directories = directories

    def path(self, final: str) -> str:
        """Where the image of ``final`` is written first."""
        return os.path.join(
            self.directories[os.path.dirname(final)], os.path.basename(final)
        )

    def scratch(self, name: str) -> str:
        """A directory for the run's temporary files (a cluster's job scripts,
        logs and worker directories) in a staging directory, so that it goes
        with it however the run ends."""
        path = os.path.join(self.directories[min(self.directories)], name)
        os.makedirs(path, exist_ok=True)
        return path

    def commit(self, finals: Iterable[str]) -> None:
        """Move the staged images into place, all of them even if a signal
        comes meanwhile."""
        with signals_held():
            for final in finals:
                os.replace(self.path(final), final)


@contextlib.contextmanager
def staging(image_outputs: Sequence[str]) -> Iterator[Staging]:
    """A :class:`Staging` for the images to write, removed at the end.

    The removal takes every staging directory in the output directories, not
    only those this run knows it made: a signal may land after ``mkdtemp``
    made one and before its name is kept.  That is safe because the run holds
    the lock of those directories (:func:`run_lock`), so no other run can be
    staging there; a stale one is of a run killed outright.  Workers of an
    interrupted parallel run are stopped first, so that none still writes
    into them, and further signals wait until the removal is done.
    """
    directories = sorted({os.path.dirname(p) for p in image_outputs})
    try:
        _remove_staging(directories)
        yield Staging(
            {d: tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=d) for d in directories}
        )
    finally:
        with signals_held():
            stop_workers()
            _remove_staging(directories)


def _remove_staging(directories):
    for directory in directories:
        for found in glob.glob(
            os.path.join(glob.escape(directory), STAGING_PREFIX + "*")
        ):
            shutil.rmtree(found, ignore_errors=True)
