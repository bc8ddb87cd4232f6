"""dials.correct_truncation: write corrected copies of diffraction images
whose negative pixel counts were truncated to zero (Hattne et al., 2016)."""

from __future__ import annotations

import json
import logging
import os
import sys

import iotbx.phil
from dials.util import Sorry, show_mail_handle_errors
from dials.util.options import ArgumentParser, flatten_experiments

from dials_truncfix import __version__

logger = logging.getLogger("dials.command_line.correct_truncation")

help_message = """
Correct diffraction images whose negative pixel values were truncated to 0,
by modelling the low counts of each resolution shell with a shifted lognormal
and giving the zero-valued pixels values <= 0 drawn from it (Hattne et al.,
2016, J. Appl. Cryst. 49, 1029-1034).

Input: an experiment list (e.g. imported.expt) or image files, read as
dials.import would read them. Every imageset (sweep) is corrected with its
own offset. The inputs are never modified.

Outputs:
  output.directory  one corrected image per input image:
      cbf (default): signed 32-bit full CBF (byte offset); trusted range and
           rotation scan in the header, so dials.import of these files gives
           a sweep whose negative values are valid pixels.
      smv: unsigned 16-bit ADSC SMV with the sweep's offset (minus the most
           negative corrected value) added and recorded as IMAGE_PEDESTAL;
           values above 65535-offset are clipped to 65535 (overloaded).
      on_read: no images; corrected.expt names the original images as
           truncfix:// URLs with the parameters recorded, so every DIALS
           program with the plugin installed reads them corrected.
  output.experiments (corrected.expt): the input models pointing at the new
      images, readable by stock DIALS (no plugin needed); written last, so a
      run that stops early leaves no corrected.expt.
  output.json, output.report (HTML), output.log.

Existing outputs are never overwritten unless output.overwrite=True; an
output path equal to an input image is always refused. Images without any
zero pixel are written unchanged, and a run with no zero pixel anywhere
reports "nothing to correct" and still writes all outputs (exit status 0).

Examples:
  dials.correct_truncation imported.expt
  dials.correct_truncation imported.expt nproc=4 output.format=smv
  dials.correct_truncation image_*.img phil/tvips_f416_rolling_shutter.phil
"""

phil_scope = iotbx.phil.parse(
    """
include scope dials_truncfix.phil.correction_phil_scope
mp {
  method = *none drmaa sge lsf pbs
    .type = choice
    .help = "The cluster method to use (as for dials.find_spots)"
    .expert_level = 1
  njobs = 1
    .type = int(value_min=1)
    .help = "The number of cluster jobs to use"
    .expert_level = 1
  nproc = 1
    .type = int(value_min=1)
    .help = "The number of processes to use (per cluster job). Results do"
            "not depend on it."
}
output {
  directory = corrected
    .type = path
    .help = "Directory for the corrected images (created if needed)."
  format = *cbf smv on_read
    .type = choice
    .help = "cbf: signed 32-bit full CBF. smv: unsigned 16-bit SMV with the"
            "sweep-wide offset recorded as IMAGE_PEDESTAL. on_read: write no"
            "images; output.experiments reads the original images through the"
            "plugin's correction on read (the plugin must be installed wherever"
            "it is used; a user mask must be given as truncfix.mask)."
  experiments = corrected.expt
    .type = path
    .help = "Experiment list pointing at the corrected images."
  json = dials.correct_truncation.json
    .type = path
    .help = "Per image and shell: d range, valid pixels, zero fraction, fitted"
            "parameters, log-likelihood, r.m.s.d., convergence, pixels changed."
  report = dials.correct_truncation.html
    .type = path
    .help = "HTML report (plotly, works offline). None: no report."
  report_images = 3
    .type = int(value_min=1)
    .help = "Number of images per sweep whose histograms the report shows."
    .expert_level = 1
  log = dials.correct_truncation.log
    .type = path
  overwrite = False
    .type = bool
    .help = "Replace existing output files. Without it the program stops"
            "before doing anything if any output already exists."
}
""",
    process_includes=True,
)


def _atomic_text(path, text):
    from dials_truncfix.io.atomic import atomic_write_bytes

    atomic_write_bytes(path, [text.encode("utf-8")])


class _Progress:
    def __init__(self, total):
        self.total = total
        self.done = 0
        self.step = max(1, total // 10)
        try:
            import tqdm

            self.bar = tqdm.tqdm(total=total, unit="image", disable=None, leave=False)
        except ImportError:  # pragma: no cover
            self.bar = None

    def __call__(self, _result):
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
        if arg.endswith((".expt", ".json")):
            try:
                with open(arg, encoding="utf-8") as fh:
                    data = json.load(fh)
                if not isinstance(data, dict) or data.get("__id__") != "ExperimentList":
                    raise ValueError
            except (ValueError, UnicodeDecodeError):
                raise Sorry(f"{arg}: not an experiment list") from None


@show_mail_handle_errors()
def run(args=None, phil=phil_scope):
    import dials.util.log
    from dials.util.version import dials_version

    from dials_truncfix.settings import ENVIRONMENT_VARIABLE

    # images are read raw: the correction on read must not claim them
    plugin_setting = os.environ.pop(ENVIRONMENT_VARIABLE, None)

    _check_arguments(sys.argv[1:] if args is None else args)
    parser = ArgumentParser(
        usage="dials.correct_truncation imported.expt [options]",
        phil=phil,
        read_experiments=True,
        read_experiments_from_images=True,
        check_format=True,
        epilog=help_message,
    )
    params, options = parser.parse_args(args=args, show_diff_phil=False)
    dials.util.log.config(options.verbose, logfile=params.output.log)
    logger.info("%s, dials-truncfix %s", dials_version(), __version__)
    if plugin_setting:
        logger.info("%s=%s ignored: the raw images are read", ENVIRONMENT_VARIABLE, plugin_setting)
    diff = parser.diff_phil.as_str()
    if diff:
        logger.info("The following parameters have been modified:\n%s", diff)

    experiments = flatten_experiments(params.input.experiments)
    if not experiments:
        parser.print_help()
        if args is None and len(sys.argv) <= 1 or args == []:
            return
        raise Sorry("no images or experiment list were given (or none could be read)")

    try:
        correct(experiments, params)
    except Sorry:
        raise
    except (ValueError, RuntimeError, OSError) as e:
        raise Sorry(str(e)) from None


def correct(experiments, params):
    from dials_truncfix.core.shells import ShellError
    from dials_truncfix.io import OutputFormatError
    from dials_truncfix.program import experiments as corrected
    from dials_truncfix.program import planning, tasks
    from dials_truncfix.settings import Settings

    settings = Settings.from_phil(params.truncfix)
    cparams = settings.parameters
    fmt = params.output.format
    plans = planning.plan(experiments, params.output.directory, fmt)
    others = [params.output.experiments, params.output.json, params.output.report]
    try:
        planning.check_outputs(plans, others, params.output.overwrite)
    except planning.TruncationInputError as e:
        raise Sorry(str(e)) from None
    n_images = sum(len(p.imageset) for p in plans)
    logger.info(
        "Correcting %d image(s) in %d sweep(s) into %s (%s)",
        n_images, len(plans), os.path.abspath(params.output.directory), fmt,
    )
    progress = _Progress(n_images)
    try:
        tasks.correct_sweeps(
            experiments, plans, cparams, params.truncfix.mask, fmt, params.mp,
            n_report_images=params.output.report_images, progress=progress,
        )
    except (planning.TruncationInputError, ShellError, OutputFormatError) as e:
        raise Sorry(str(e)) from None
    finally:
        progress.close()

    n_changed = 0
    for p in plans:
        changed = sum(s["n_changed"] for s in p.corrections)
        n_changed += changed
        failed = sum(
            1 for s in p.corrections for sh in s["shells"] if sh["status"].startswith("fit failed")
        )
        logger.info(
            "Sweep %d (%s): %d images, %d pixels changed, lowest value %s, offset %d%s",
            p.number, p.imageset.get_template() if hasattr(p.imageset, "get_template") else p.imageset.get_path(0),
            len(p.imageset), changed,
            min([s["min_value"] for s in p.corrections if s["min_value"] is not None], default="none"),
            p.offset, f", {failed} shell fit(s) failed" if failed else "",
        )
    if n_changed == 0:
        logger.info("Nothing to correct: no zero-valued pixel was given another value; images written unchanged")

    record = {
        "program": "dials.correct_truncation",
        "parameters": {
            "n_shells": cparams.n_shells, "likelihood": cparams.likelihood, "seed": cparams.seed,
            "histogram_max": cparams.histogram_max, "histogram_quantile": cparams.histogram_quantile,
            "min_pixels_per_shell": cparams.min_pixels_per_shell, "format": fmt,
        },
        "sweeps": [
            {
                "sweep": p.number,
                "offset": p.offset,
                "images": [{k: v for k, v in s.items() if k != "histograms"} for s in p.corrections],
            }
            for p in plans
        ],
    }
    if params.output.json:
        _atomic_text(params.output.json, json.dumps(record, indent=1, sort_keys=True))
        logger.info("Wrote %s", params.output.json)
    if params.output.report:
        from dials_truncfix.program.report import html_report

        _atomic_text(params.output.report, html_report(plans, record))
        logger.info("Wrote %s", params.output.report)

    result = corrected.corrected_experiments(experiments, plans, fmt, settings.to_record())
    _atomic_text(params.output.experiments, result.as_json())
    logger.info("Wrote %s", params.output.experiments)


if __name__ == "__main__":
    run()
