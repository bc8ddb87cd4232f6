"""HTML report of dials.correct_truncation, made as DIALS makes its own:
DIALS' jinja2 report template (report_base.html, macros.html) with plotly
graphs, plotly.js (gzipped, a quarter of its size) and Bootstrap's CSS
embedded once so that the file works offline.  First what a user asks: how much of each shell was truncated, what
the correction did to its mean background, what was left alone and why."""

from __future__ import annotations

import base64
import functools
import gzip
import os
from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np
from jinja2 import ChoiceLoader, Environment, PackageLoader, select_autoescape

import dials

from dials_truncfix import __version__
from dials_truncfix.core.correction import CORRECTED, NO_ZEROS
from dials_truncfix.core.lognormal import LOGNORMAL, NORMAL, Distribution
from dials_truncfix.core.shells import region_label

if TYPE_CHECKING:
    from dials_truncfix.program.tasks import SweepResult

#: what the report embeds is rounded to this many significant digits
DIGITS = 4
#: fitted curves are drawn where they predict at least this many pixels (log axis)
CURVE_FLOOR = 0.1
#: a region's histogram and fitted curve share a colour (plotly's qualitative.Plotly)
COLOURS = (
    "#636EFA",
    "#EF553B",
    "#00CC96",
    "#AB63FA",
    "#FFA15A",
    "#19D3F3",
    "#FF6692",
    "#B6E880",
    "#FF97FF",
    "#FECB52",
)
#: plotly.js as DIALS ships it (current DIALS; not the Debian package of DIALS 3.12)
DIALS_PLOTLY_JS = os.path.join("static", "js", "plotly-latest.min.js")


class ReportUnavailable(RuntimeError):
    """No plotly.js to embed: the report cannot be made."""


#: statuses of images and regions that are not "left alone"
DONE = (CORRECTED, NO_ZEROS)


def _rounded(values) -> list:
    return [float(f"{v:.{DIGITS}g}") for v in values]


def region_name(shell: dict, n_sectors: int) -> str:
    """The region of a JSON shell record, named as the log names it."""
    return region_label(shell["shell"], shell["sector"], n_sectors)


def _image_ranges(images: list) -> str:
    """'1-3, 7' from sorted image numbers."""
    runs = []
    for i in images:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _mid_inv_d2(shell: dict) -> float:
    return (
        0.5 * (1 / shell["d_max"] ** 2 + 1 / shell["d_min"] ** 2)
        if shell["d_min"] > 0
        else 0.0
    )


def _d_range(shell: dict) -> str:
    return f"{shell['d_max']:.2f}-{shell['d_min']:.2f}"


def _graph(
    title: str, x_title: str, y_title: str, data: list, y_type: str = "linear"
) -> dict:
    return {
        "data": data,
        "layout": {
            "title": {"text": title},
            "xaxis": {"title": {"text": x_title}},
            "yaxis": {"title": {"text": y_title}, "type": y_type},
        },
    }


def _by_region(sweep: SweepResult) -> dict:
    """(shell, sector) -> [(image number, region dict)], in region order."""
    regions = defaultdict(list)
    for s in sweep.images:
        for shell in s["shells"]:
            regions[(shell["shell"], shell["sector"])].append((s["image"], shell))
    return dict(sorted(regions.items()))


def shell_rows(sweep: SweepResult, n_sectors: int) -> list:
    """Per region over the images: d range, zero fraction, mean pixel value
    before and after the correction, pixels changed, images corrected."""
    rows = [
        [
            "region",
            "d range (A)",
            "zero fraction (mean)",
            "zero fraction (max)",
            "mean before",
            "mean after",
            "change",
            "pixels changed",
            "images corrected",
        ]
    ]
    for per_image in _by_region(sweep).values():
        shells = [shell for _, shell in per_image]
        before = np.mean([s["mean_before"] for s in shells])
        after = np.mean([s["mean_after"] for s in shells])
        zero = [s["zero_fraction"] for s in shells]
        rows.append(
            [
                region_name(shells[0], n_sectors),
                _d_range(shells[0]),
                f"{np.mean(zero):.1%}",
                f"{max(zero):.1%}",
                f"{before:.2f}",
                f"{after:.2f}",
                f"{after - before:+.3g}",
                sum(s["n_changed"] for s in shells),
                f"{sum(s['status'] == CORRECTED for s in shells)}/{len(sweep.images)}",
            ]
        )
    return rows if len(rows) > 1 else []


def left_alone_rows(sweeps: list[SweepResult], n_sectors: int) -> list:
    """Imageset, images, region, why: every image or region that kept its
    zero pixels for a reason other than having none."""
    why = defaultdict(list)
    for sweep in sweeps:
        number = sweep.plan.number
        for s in sweep.images:
            if s["status"] not in DONE:
                why[(number, "whole image", s["status"])].append(s["image"])
            elif s["damaged"]:
                why[
                    (
                        number,
                        s["damaged"],
                        "all zero (a file cut short, or a dead line?)",
                    )
                ].append(s["image"])
            for shell in s["shells"]:
                if shell["status"] not in DONE:
                    why[
                        (number, region_name(shell, n_sectors), shell["status"])
                    ].append(s["image"])
    rows = [
        [number, _image_ranges(images), where, reason]
        for (number, where, reason), images in why.items()
    ]
    return [["imageset", "images", "pixels", "why"], *rows] if rows else []


#: the models of the fits, as the summary counts them
MODELS = (LOGNORMAL, NORMAL)


def summary_rows(sweeps: list[SweepResult]) -> list:
    rows = [
        [
            "imageset",
            "status",
            "images",
            "pixels changed",
            "lowest value",
            "mean zero fraction",
            "converged fits",
            "lognormal / normal",
        ]
    ]
    for sweep in sweeps:
        c = sweep.images
        fits = [sh["fit"] for s in c for sh in s["shells"] if sh.get("fit")]
        rows.append(
            [
                sweep.plan.number,
                sweep.plan.refused or "corrected",
                len(c),
                sum(s["n_changed"] for s in c),
                "-" if sweep.lowest_value is None else sweep.lowest_value,
                f"{np.mean([s['zero_fraction'] for s in c]):.1%}" if c else "-",
                f"{sum(1 for f in fits if f['converged'])}/{len(fits)}",
                " / ".join(
                    str(sum(1 for f in fits if f["converged"] and f.get("model") == m))
                    for m in MODELS
                ),
            ]
        )
    return rows


def parameter_rows(parameters: dict) -> list:
    return [
        ["parameter", "value"],
        *([name, value] for name, value in sorted(parameters.items())),
    ]


def shell_graphs(sweep: SweepResult, n_sectors: int) -> dict:
    """Zero fraction per region against image; change of the mean pixel value against resolution."""
    regions = _by_region(sweep)
    if not regions:
        return {}
    n = sweep.plan.number
    zero = [
        {
            "type": "scatter",
            "mode": "lines+markers",
            "name": region_name(per_image[0][1], n_sectors),
            "x": [image for image, _ in per_image],
            "y": _rounded(shell["zero_fraction"] for _, shell in per_image),
        }
        for per_image in regions.values()
    ]
    change = [
        {
            "type": "scatter",
            "mode": "lines+markers",
            "name": "after - before",
            "x": _rounded(
                _mid_inv_d2(per_image[0][1]) for per_image in regions.values()
            ),
            "y": _rounded(
                np.mean([s["mean_after"] - s["mean_before"] for _, s in per_image])
                for per_image in regions.values()
            ),
        }
    ]
    return {
        f"zero_fraction_{n}": _graph(
            "Truncated (zero) pixels per shell",
            "image",
            "fraction of valid pixels",
            zero,
        ),
        f"mean_change_{n}": _graph(
            "Change of the mean pixel value per shell",
            "1/d^2 (1/A^2)",
            "mean after - mean before",
            change,
        ),
    }


def histogram_graphs(sweep: SweepResult, n_sectors: int) -> dict:
    """Low-count histograms of the report images with the fitted curves (the
    expected pixels per value), as in Fig. 1 of Hattne et al. (2016)."""
    graphs = {}
    for s in sweep.images:
        if "histograms" not in s:
            continue
        data = []
        for k, (shell, hist) in enumerate(zip(s["shells"], s["histograms"])):
            name = f"{region_name(shell, n_sectors)} ({_d_range(shell)} A)"
            colour = COLOURS[k % len(COLOURS)]
            data.append(
                {
                    "type": "scatter",
                    "mode": "markers",
                    "x": list(range(len(hist))),
                    "y": hist,
                    "name": name,
                    "legendgroup": name,
                    "marker": {"color": colour},
                }
            )
            fit = shell.get("fit")
            if fit and fit["converged"]:
                distribution = Distribution(fit["location"], fit["scale"], fit["shape"])
                xs = np.arange(
                    max(int(np.floor(distribution.quantile(1e-9))), -10 * len(hist)),
                    len(hist),
                )
                y = shell["n_valid"] * (
                    distribution.cdf(xs + 0.5) - distribution.cdf(xs - 0.5)
                )
                drawn = y >= CURVE_FLOOR
                data.append(
                    {
                        "type": "scatter",
                        "mode": "lines",
                        "x": xs[drawn].tolist(),
                        "y": _rounded(y[drawn]),
                        "name": name + " fit",
                        "legendgroup": name,
                        "showlegend": False,
                        "line": {"color": colour},
                    }
                )
        graphs[f"histogram_{sweep.plan.number}_{s['image']}"] = _graph(
            f"Image {s['image']}: low counts (points) and fits (lines)",
            "pixel value",
            "pixels",
            data,
            "log",
        )
    return graphs


def parameter_graphs(sweep: SweepResult, n_sectors: int) -> dict:
    """Location, scale and shape of the converged fits (shape 0: the normal)
    against resolution (one line per image) and against image (one line per
    region)."""
    graphs = {}
    for par in ("location", "scale", "shape"):
        by_resolution = []
        for s in sweep.images:
            fitted = [
                shell
                for shell in s["shells"]
                if shell.get("fit") and shell["fit"]["converged"]
            ]
            if fitted:
                by_resolution.append(
                    {
                        "type": "scatter",
                        "mode": "lines+markers",
                        "name": f"image {s['image']}",
                        "x": _rounded(_mid_inv_d2(shell) for shell in fitted),
                        "y": _rounded(shell["fit"][par] for shell in fitted),
                    }
                )
        by_image = []
        for per_image in _by_region(sweep).values():
            fitted = [
                (image, shell)
                for image, shell in per_image
                if shell.get("fit") and shell["fit"]["converged"]
            ]
            if fitted:
                by_image.append(
                    {
                        "type": "scatter",
                        "mode": "lines+markers",
                        "name": region_name(fitted[0][1], n_sectors),
                        "x": [image for image, _ in fitted],
                        "y": _rounded(shell["fit"][par] for _, shell in fitted),
                    }
                )
        if by_resolution:
            graphs[f"{par}_resolution_{sweep.plan.number}"] = _graph(
                f"{par} against resolution", "1/d^2 (1/A^2)", par, by_resolution
            )
            graphs[f"{par}_image_{sweep.plan.number}"] = _graph(
                f"{par} against image", "image", par, by_image
            )
    return graphs


def image_graphs(sweep: SweepResult) -> dict:
    images = [s["image"] for s in sweep.images]
    data = [
        {
            "type": "scatter",
            "mode": "lines+markers",
            "x": images,
            "name": name,
            "y": _rounded(s[key] for s in sweep.images),
        }
        for name, key in (
            ("zero (before)", "zero_fraction"),
            ("negative (after)", "negative_fraction"),
        )
    ]
    return {
        f"fractions_{sweep.plan.number}": _graph(
            "Zero and negative pixels", "image", "fraction of valid pixels", data
        )
    }


def dials_plotly_js() -> str | None:
    """The path of the plotly.js DIALS ships, if it does."""
    path = os.path.join(
        os.path.dirname(os.path.abspath(dials.__file__)), DIALS_PLOTLY_JS
    )
    return path if os.path.isfile(path) else None


@functools.lru_cache(maxsize=1)
def plotly_js() -> tuple[str, str]:
    """(plotly.js, where it came from): the plotly package's where it is
    installed (DIALS 3.12 relies on it), else the copy DIALS ships.  The
    package comes first because DIALS' copy is an old plotly.js (1.x).
    :class:`ReportUnavailable` if there is neither."""
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:
        path = dials_plotly_js()
        if path is None:
            raise ReportUnavailable(
                "output.report: no plotly.js for the HTML report (neither the plotly package nor DIALS' "
                f"{DIALS_PLOTLY_JS} is installed): install plotly, or set output.report=None to skip the report"
            ) from None
        with open(path, encoding="utf-8") as fh:
            return fh.read(), path
    return get_plotlyjs(), "the plotly package"


@functools.lru_cache(maxsize=1)
def plotly_js_gzip() -> str:
    """:func:`plotly_js`, gzipped and base64 encoded (the same bytes in every
    run); raises :class:`ReportUnavailable` if there is none."""
    return base64.b64encode(
        gzip.compress(plotly_js()[0].encode("utf-8"), compresslevel=9, mtime=0)
    ).decode("ascii")


def _environment():
    """DIALS' templates and static files behind this package's template."""
    loader = ChoiceLoader(
        [
            PackageLoader("dials_truncfix", "templates"),
            PackageLoader("dials", "templates"),
            PackageLoader("dials", "static", encoding="utf-8"),
        ]
    )
    return Environment(loader=loader, autoescape=select_autoescape(["html"]))


def html_report(results: list[SweepResult], record: dict) -> str:
    """The report page of a run: ``results`` what each imageset's correction
    gave (with the histograms of the report images), ``record`` the run's
    JSON record."""
    n_sectors = record["parameters"]["n_sectors"]
    sweeps = []
    for sweep in results:
        p = sweep.plan
        histograms = histogram_graphs(sweep, n_sectors)
        sweeps.append(
            {
                "number": p.number,
                "description": p.description,
                "status": f"not corrected: {p.refused}"
                if p.refused
                else "no image had a zero pixel",
                "shell_rows": shell_rows(sweep, n_sectors),
                "shell_graphs": shell_graphs(sweep, n_sectors),
                "histogram_graphs": histograms,
                "wide": dict.fromkeys(histograms, "wide-plot"),
                "parameter_graphs": parameter_graphs(sweep, n_sectors),
                "image_graphs": image_graphs(sweep),
            }
        )
    n_images = sum(len(sweep.images) for sweep in results)
    n_changed = sum(s["n_changed"] for sweep in results for s in sweep.images)
    template = _environment().get_template("correct_truncation_report.html")
    return template.render(
        page_title="dials.correct_truncation report",
        version=__version__,
        overview=f"{n_images} image(s) in {len(results)} imageset(s), {n_changed} pixels given new values, "
        f"output format {record['parameters']['format']}",
        plotly_js_gzip=plotly_js_gzip(),
        sweeps=sweeps,
        left_alone_rows=left_alone_rows(results, n_sectors),
        summary_rows=summary_rows(results),
        parameter_rows=parameter_rows(record["parameters"]),
    )
