"""dials.correct_truncation: write corrected copies of diffraction images
whose negative pixel counts were truncated to zero (Hattne et al., 2016)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Sequence

import iotbx.phil
import libtbx.phil
from dials.util import Sorry, show_mail_handle_errors
from dials.util.options import ArgumentParser, flatten_experiments

from dials_truncfix import __version__
from dials_truncfix.io.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from dxtbx.model.experiment_list import ExperimentList

logger = logging.getLogger("dials.command_line.correct_truncation")

help_message = """
Correct diffraction images whose negative pixel values were truncated to 0,
by modelling the low counts of each resolution shell with a shifted lognormal
(or its limit, the normal, where read noise makes them symmetric) and giving
the zero-valued pixels values <= 0 that follow it (Hattne et al., 2016,
J. Appl. Cryst. 49, 1029-1034).

Input: an experiment list (e.g. imported.expt) or image files, read as
dials.import would read them. The shells come from the experiment's beam and
detector models and every mask it carries. Images of counting detectors
(Pilatus, Eiger, TimePix...) are written unchanged (see truncfix.detector).

Outputs:
  output.directory  one corrected image per input image:
      cbf (default): signed 32-bit full CBF (byte offset) with the image's
           models, so that dials.import of these files gives a sequence (or
           stills) whose negative values are valid pixels.
      smv: unsigned 16-bit ADSC SMV holding the corrected values plus a
           pedestal (1 minus the imageset's lowest value) recorded as
           IMAGE_PEDESTAL; values too high for 16 bits with it are stored as
           65535 (overloaded).
      on_read: no images; output.experiments names the original images as
           truncfix:// URLs with the settings and shell geometry recorded, so
           every DIALS program with the plugin installed reads them corrected.
  output.experiments (corrected.expt): the input models and masks pointing at
      the new images, readable by stock DIALS (no plugin needed); written
      last.
  output.json, output.report (HTML), output.log.

Nothing is lost: an input is never replaced, existing outputs only with
output.overwrite=True, all checked before any work; one run at a time per
output directory; images are staged and moved into place at the end, so an
interrupted run leaves no partial output. Images without any zero pixel are
written unchanged ("nothing to correct", exit status 0).

Examples:
  dials.correct_truncation imported.expt
  dials.correct_truncation imported.expt nproc=4 output.format=smv
  dials.correct_truncation imported.expt output.format=on_read
  dials.correct_truncation image_*.img phil/tvips_f416_rolling_shutter.phil
"""

phil_scope = iotbx.phil.parse(
    """
include scope dials_truncfix.phil.correction_phil_scope
mp {
  method = *none slurm sge
    .type = choice
    .help = "none: correct on this machine in mp.nproc processes. slurm, sge:"
            "as mp.njobs jobs of a Slurm or Grid Engine cluster, submitted"
            "from this machine through dask-jobqueue (pip install"
            "'dials-truncfix[cluster]'); the nodes need the plugin installed"
            "in this Python environment and a filesystem shared with this"
            "machine. Results do not depend on the method."
  njobs = 1
    .type = int(value_min=1, allow_none=False)
    .help = "The number of cluster jobs (mp.method=slurm or sge; also 1 job"
            "runs on the cluster)."
  nproc = Auto
    .type = int(value_min=1)
    .help = "The number of processes on this machine (mp.method=none); Auto:"
            "the processors available. A cluster job uses mp.cluster.cores"
            "instead. Results do not depend on it."
  cluster
    .help = "What each cluster job asks the scheduler for (mp.method=slurm or"
            "sge)."
  {
    cores = 1
      .type = int(value_min=1, allow_none=False)
      .help = "Cores per job: each job runs this many worker processes."
    memory = 4GB
      .type = str
      .help = "Memory per job (e.g. 4GB, 500MB): Slurm's --mem and the"
              "workers' memory limit (Grid Engine: the workers' limit only;"
              "ask for memory with mp.cluster.extra where the site needs it)."
    queue = None
      .type = str
      .help = "The Slurm partition or Grid Engine queue; None: the"
              "scheduler's default."
    walltime = "01:00:00"
      .type = str
      .help = "Wall-clock limit per job (HH:MM:SS)."
    parallel_environment = smp
      .type = str
      .help = "Grid Engine: the parallel environment for cores > 1."
    extra = None
      .type = strings
      .help = "More options for each job's script, one per word with no"
              "spaces inside (e.g. --account=xyz, --qos=short), as the"
              "scheduler's submit command takes them."
      .expert_level = 1
  }
}
output {
  directory = corrected
    .type = path
    .help = "Directory for the corrected images (created if needed; needed"
            "for cbf and smv)."
  format = *cbf smv on_read
    .type = choice
    .help = "cbf: signed 32-bit full CBF. smv: unsigned 16-bit SMV with a"
            "per-imageset pedestal recorded as IMAGE_PEDESTAL. on_read: write no"
            "images; output.experiments reads the original images through the"
            "plugin's correction on read, with this run's shell geometry fixed"
            "(the plugin must be installed wherever it is used)."
  experiments = corrected.expt
    .type = path
    .help = "Experiment list pointing at the corrected images, written last."
            "None: none."
  json = dials.correct_truncation.json
    .type = path
    .help = "Per image and shell: d range, valid pixels, zero fraction, fitted"
            "parameters, log-likelihood, r.m.s.d., convergence, pixels changed."
            "None: none."
  report = dials.correct_truncation.html
    .type = path
    .help = "HTML report (plotly, works offline). None: no report."
  report_images = 3
    .type = int(value_min=1, allow_none=False)
    .help = "Number of images per sweep whose histograms the report shows."
    .expert_level = 1
  log = dials.correct_truncation.log
    .type = path
    .help = "The log file. None: none."
  overwrite = False
    .type = bool
    .help = "Replace existing output files. Without it the program stops"
            "before doing anything if any output already exists. An input is"
            "never replaced."
}
""",
    process_includes=True,
)


def _atomic_text(path, text):
    atomic_write_bytes(path, [text.encode("utf-8")])


class _Progress:
    """A bar and a debug line every tenth; stops the run once interrupted."""

    def __init__(self, total, check_interrupted):
        self.total = total
        self.check_interrupted = check_interrupted
        self.done = 0
        self.step = max(1, total // 10)
        try:
            import tqdm

            self.bar = tqdm.tqdm(total=total, unit="image", disable=None, leave=False)
        except ImportError:  # pragma: no cover
            self.bar = None

    def __call__(self, _result):
        self.check_interrupted()
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        if self.done % self.step == 0 or self.done == self.total:
            logger.debug("Corrected %d of %d images", self.done, self.total)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _check_arguments(args):
    """One-line errors for missing files and files that are not experiment
    lists, before DIALS' importer turns them into tracebacks or help text."""
    for arg in args:
        if arg.startswith("-") or "=" in arg:
            continue
        if not os.path.exists(arg):
            raise Sorry(f"{arg}: no such file")
        if os.path.isdir(arg):
            raise Sorry(f"{arg}: is a directory, not an image or experiment list")
        if arg.endswith((".expt", ".json")):
            try:
                with open(arg, encoding="utf-8") as fh:
                    data = json.load(fh)
                if not isinstance(data, dict) or data.get("__id__") != "ExperimentList":
                    raise ValueError
            except (ValueError, UnicodeDecodeError):
                raise Sorry(f"{arg}: not an experiment list") from None


@show_mail_handle_errors()
def run(args: list[str] | None = None, phil: libtbx.phil.scope = phil_scope) -> None:
    """The command line: every error a one-line message (DIALS' Sorry), an
    interruption exit status 128 + signal with no experiment list."""
    from dials_truncfix.program.interruption import Interrupted, interruptible

    args = sys.argv[1:] if args is None else args
    _check_arguments(args)
    parser = ArgumentParser(
        usage="dials.correct_truncation imported.expt [options]",
        phil=phil,
        read_experiments=True,
        read_experiments_from_images=True,
        check_format=True,
        epilog=help_message,
    )
    try:
        params, options = parser.parse_args(args=args, show_diff_phil=False)
    except RuntimeError as e:  # a PHIL value out of range or of the wrong type
        raise Sorry(str(e)) from None
    experiments = flatten_experiments(params.input.experiments)
    if not experiments:
        parser.print_help()
        if not args:
            return
        raise Sorry("no images or experiment list were given (or none could be read)")
    input_files = [a for a in args if "=" not in a and os.path.isfile(a)]
    try:
        with (
            interruptible()
        ):  # the process-wide signal handling: the command line's alone
            correct(
                experiments, params, options, parser.diff_phil.as_str(), input_files
            )
    except Interrupted as e:
        print(
            f"dials.correct_truncation: interrupted (signal {e.code - 128}); no experiment list written",
            file=sys.stderr,
        )
        raise
    except Sorry:
        raise
    except (ValueError, RuntimeError, OSError) as e:
        raise Sorry(str(e)) from None


def correct(
    experiments: ExperimentList,
    params: libtbx.phil.scope_extract,
    options: argparse.Namespace,
    diff_phil: str = "",
    input_files: Sequence[str] = (),
) -> None:
    """Plan and check every output, then correct and write them, the
    experiment list last; ``input_files`` are the files named on the command
    line, which no output may replace.  The library entry point of the
    command line: it installs no signal handler and stops no process (the
    command line's ``run()`` does, with ``interruption.interruptible``)."""
    import dials.util.log
    from dials.util.version import dials_version

    from dials_truncfix.core.shells import ShellError
    from dials_truncfix.io import OutputFormatError
    from dials_truncfix.program import (
        cluster,
        interruption,
        outputs,
        planning,
        record,
        report,
        tasks,
    )
    from dials_truncfix.program import experiments as corrected
    from dials_truncfix.settings import Settings

    try:
        settings = Settings.from_phil(params.truncfix)
    except ValueError as e:
        raise Sorry(f"truncfix: {e}") from None
    if params.output.report:
        try:  # what the report needs, found before anything is written
            report.plotly_js_gzip()
        except report.ReportUnavailable as e:
            raise Sorry(str(e)) from None
    fmt = params.output.format
    if fmt != planning.ON_READ and not params.output.directory:
        raise Sorry(
            f"output.directory=None: output.format={fmt} writes images and needs a directory"
        )
    try:
        plans = planning.plan(experiments, settings, params.output.directory, fmt)
        images = [o for p in plans for o in p.outputs]
        named = {
            "output.experiments": params.output.experiments,
            "output.json": params.output.json,
            "output.report": params.output.report,
            "output.log": params.output.log,
        }
        outputs.check_output_paths(
            named,
            images,
            planning.input_files(plans, input_files, settings),
            params.output.overwrite,
        )
    except (planning.TruncationInputError, outputs.OutputError) as e:
        raise Sorry(str(e)) from None
    directories = {
        os.path.dirname(os.path.abspath(p)) for p in [*named.values(), *images] if p
    }
    interrupted = interruption.current()
    with outputs.run_lock(directories):
        dials.util.log.config(options.verbose, logfile=params.output.log)
        logger.info("%s, dials-truncfix %s", dials_version(), __version__)
        if diff_phil:
            logger.info("The following parameters have been modified:\n%s", diff_phil)
        n_images = sum(len(p.imageset) for p in plans)
        where = (
            os.path.abspath(params.output.directory)
            if images
            else params.output.experiments
        )
        logger.info(
            "Correcting %d image(s) in %d imageset(s) into %s (%s)",
            n_images,
            len(plans),
            where,
            fmt,
        )
        progress = _Progress(n_images, interrupted.check)
        # on_read writes no image; a cluster run still needs a staging
        # directory, for the files of its jobs
        staged = images or (
            [os.path.join(sorted(directories)[0], "cluster")]
            if cluster.is_cluster(params.mp) and directories
            else []
        )
        try:
            with (
                outputs.staging(staged)
                if staged
                else contextlib.nullcontext() as staging
            ):
                results = tasks.correct_sweeps(
                    plans,
                    settings,
                    fmt,
                    params.mp,
                    staging,
                    n_report_images=params.output.report_images,
                    progress=progress,
                )
                progress.close()
                _log_summary(results)
                interrupted.check()
                if images:
                    staging.commit(images)
                run_record = record.run_record(results, settings, fmt)
                if params.output.json:
                    _atomic_text(params.output.json, record.as_json(run_record))
                    logger.info("Wrote %s", params.output.json)
                if params.output.report:
                    _atomic_text(
                        params.output.report, report.html_report(results, run_record)
                    )
                    logger.info("Wrote %s", params.output.report)
                if params.output.experiments:
                    interrupted.check()
                    if fmt == planning.ON_READ:
                        written = corrected.on_read_experiments(
                            experiments, plans, settings
                        )
                    else:
                        written = corrected.corrected_experiments(
                            experiments, results, fmt
                        )
                    _atomic_text(params.output.experiments, written.as_json())
                    logger.info("Wrote %s", params.output.experiments)
        except (
            planning.TruncationInputError,
            ShellError,
            OutputFormatError,
            cluster.ClusterError,
        ) as e:
            raise Sorry(str(e)) from None
        finally:
            progress.close()


def _log_summary(results):
    """Per imageset what was done; what was left alone and why."""
    n_changed = 0
    for r in results:
        p = r.plan
        for s in r.images:
            if s["damaged"]:
                logger.warning(
                    "%s: %s are all zero (a file cut short, or a dead line?): left as they were",
                    s["file"],
                    s["damaged"],
                )
        changed = sum(s["n_changed"] for s in r.images)
        n_changed += changed
        failed = sum(
            1
            for s in r.images
            for sh in s["shells"]
            if sh["status"].startswith("fit failed")
        )
        logger.info(
            "Imageset %d (%s): %d images, %s%s",
            p.number,
            p.description,
            len(p.imageset),
            f"not corrected: {p.refused}"
            if p.refused
            else f"{changed} pixels changed, lowest value {r.lowest_value}"
            + (f", SMV pedestal {r.pedestal}" if r.pedestal else ""),
            f", {failed} shell fit(s) failed" if failed else "",
        )
    if n_changed == 0:
        logger.info(
            "Nothing to correct: no zero-valued pixel was given another value; images written unchanged"
        )


if __name__ == "__main__":
    run()
