"""Atomic file writing: a temporary file next to the target, renamed into
place only when complete, so that an interrupted run never leaves a
half-written file that looks valid."""

from __future__ import annotations

import contextlib
import os
import tempfile


def _usual_permissions(path):
    """mkstemp makes 0600 files: give the permissions open() would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary name in the directory of ``path`` (same extension,
    which some writers dispatch on); rename it to ``path`` on success, remove
    it on failure."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.",
        suffix=".partial" + os.path.splitext(path)[1],
        dir=directory,
    )
    os.close(fd)
    try:
        yield tmp
        _usual_permissions(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path, chunks):
    """Write an iterable of bytes objects to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
