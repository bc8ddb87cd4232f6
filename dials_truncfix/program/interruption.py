"""SIGTERM and SIGINT during dials.correct_truncation: the run stops without
a partial output and without a traceback, and exits 143 or 130.

All of it is process-wide (signal handlers, ``sys.unraisablehook``, the
process's multiprocessing children), so it is in force only while the
command line holds :func:`interruptible` (``run()`` enters it); the
library functions a program calls from Python install nothing and kill
nothing (:func:`current` gives them an :class:`Interruption` that no signal
sets).

Why this needs more than a signal handler:

* The handler raises :class:`Interrupted` at once, but the code it lands in
  may swallow it (a bare ``except`` in a library, such as libtbx's pool
  wrappers).  So the handler also records the signal, and the run checks
  the record (:meth:`Interruption.check`) before every commit: moving the
  staged images into place, writing the experiment list.
* Where Python cannot raise it at all (a ``__del__``, a fork handler), it
  would print the exception as "Exception ignored": the unraisable hook
  stays silent about :class:`Interrupted` while the run works, since the
  recorded signal stops the run anyway.
* The workers of a parallel run would go on writing images into the
  staging directory (a signal they get is caught by DIALS' worker wrapper):
  :func:`stop_workers` kills them before the staging directory is removed.
* A signal must not cut the commit or the clean-up in half: both run with
  the signals held (:func:`signals_held`), and the clean-up removes every
  staging directory of its output directories, also one made just before a
  signal landed (:func:`dials_truncfix.program.outputs.staging`).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import sys
from typing import Iterator


class Interrupted(SystemExit):
    """SIGTERM or SIGINT: unwind (so that staging is removed), exit 128 + signal."""


class Interruption:
    """The signal received while the run works, if any."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def check(self) -> None:
        """Raise :class:`Interrupted` if a signal came, even one whose
        exception was swallowed where it landed."""
        if self.signum is not None:
            raise Interrupted(128 + self.signum)


#: the command line's Interruption while :func:`interruptible` is installed
_installed: list[Interruption] = []


@contextlib.contextmanager
def interruptible() -> Iterator[Interruption]:
    """The command line's process-wide installation, entered by
    ``dials.correct_truncation``'s ``run()`` only: SIGTERM and SIGINT become
    :class:`Interrupted` while the run works, the unraisable hook stays
    silent about it, and :func:`signals_held` and :func:`stop_workers` act.
    Yields the :class:`Interruption` to check before committing.  Everything
    is restored on leaving."""
    interruption = Interruption()

    def handler(signum, frame):
        interruption.signum = signum
        raise Interrupted(128 + signum)

    def unraisable(report):
        if not isinstance(report.exc_value, Interrupted):
            previous_hook(report)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    _installed.append(interruption)
    try:
        yield interruption
    finally:
        _installed.remove(interruption)
        sys.unraisablehook = previous_hook
        for s, h in previous.items():
            signal.signal(s, h)


def current() -> Interruption:
    """The command line's :class:`Interruption` when :func:`interruptible` is
    installed; else one that no signal ever sets (a program calling the
    library handles its signals itself)."""
    return _installed[-1] if _installed else Interruption()


def installed() -> bool:
    """Whether the command line's :func:`interruptible` is in force."""
    return bool(_installed)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGTERM and SIGINT back until the block is done (a clean-up or a
    commit that a signal must not cut in half): a signal that comes meanwhile
    is only noted, and raised again on leaving the block.  (Swapping the
    handlers, not masking the signals: a mask holds only the calling thread,
    and the pool of a parallel run has threads of its own.)  Only under the
    command line's :func:`interruptible`: a library call leaves the
    process's handlers alone."""
    if not installed():
        yield
        return
    came = []
    previous = {
        s: signal.signal(s, lambda signum, frame: came.append(signum))
        for s in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if came:
            signal.raise_signal(came[0])


def stop_workers() -> None:
    """Kill this process's multiprocessing children: the workers of an
    interrupted parallel run, which would go on writing their images.  Only
    under the command line's :func:`interruptible`, where the process is the
    run's own: a program calling the library keeps its children."""
    if not installed():
        return
    for child in multiprocessing.active_children():
        child.kill()
        child.join()
