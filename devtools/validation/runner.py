"""Running one DIALS program of the validation, logged and checked."""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import time

from devtools.validation.lanes import StepError

logger = logging.getLogger(__name__)


def run_step(args, cwd, env, log=None, check_output=None, show_env=()):
    """Run a DIALS program in ``cwd`` with ``env``; log the command line
    (with the variables named in ``show_env``); raise StepError with the tail
    of its log if it fails or ``check_output`` is missing."""
    prefix = "".join("%s=%s " % (k, shlex.quote(env[k])) for k in show_env)
    line = "(cd %s && %s%s)" % (
        shlex.quote(cwd),
        prefix,
        " ".join(shlex.quote(a) for a in args),
    )
    logger.info("$ %s", line)
    if log is not None:
        log.write(line + "\n")
        log.flush()
    start = time.time()
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.time() - start
    missing = check_output and not os.path.exists(os.path.join(cwd, check_output))
    if result.returncode or missing:
        program_log = os.path.join(cwd, os.path.basename(args[0]) + ".log")
        text = result.stdout + "\n" + result.stderr
        if os.path.exists(program_log):
            with open(program_log) as fh:
                text = fh.read() + "\n" + result.stderr
        tail = "\n".join(text.strip().splitlines()[-30:])
        why = (
            "exit status %d" % result.returncode
            if result.returncode
            else "no %s" % check_output
        )
        raise StepError("%s failed (%s) in %s:\n%s" % (args[0], why, cwd, tail))
    logger.info("  (%.1f s)", elapsed)
