"""HTML report of dials.correct_truncation, in the style of dials.report:
plotly graphs with plotly.js embedded, so that the file works offline."""

from __future__ import annotations

import html
import json

import numpy as np

from dials_truncfix.core.lognormal import cdf


def _plotly_js():
    try:
        from plotly.offline import get_plotlyjs

        return "<script>" + get_plotlyjs() + "</script>"
    except ImportError:  # pragma: no cover - plotly python package absent
        return '<script src="https://cdn.plot.ly/plotly-latest.min.js"></script>'


def region_name(shell, n_sectors):
    """'shell k' (from 1), with the sector where regions are sectors of shells."""
    return f"shell {shell['shell'] + 1}" + (f" sector {shell['sector'] + 1}" if n_sectors > 1 else "")


def _mid_inv_d2(shell):
    return 0.5 * (1 / shell["d_max"] ** 2 + 1 / shell["d_min"] ** 2) if shell["d_min"] > 0 else 0.0


def histogram_graphs(plan, n_sectors):
    graphs = {}
    for s in plan.corrections:
        if "histograms" not in s:
            continue
        data = []
        for shell, hist in zip(s["shells"], s["histograms"]):
            x = np.arange(len(hist))
            name = f"{region_name(shell, n_sectors)} ({shell['d_max']:.2f}-{shell['d_min']:.2f} A)"
            data.append({"type": "scatter", "mode": "markers", "x": x.tolist(), "y": hist,
                         "name": name, "legendgroup": name})
            fit = shell.get("fit")
            if fit and fit["converged"]:
                xs = np.arange(-10, len(hist))
                upper = cdf(xs + 0.5, fit["theta"], fit["mu"], fit["sigma"])
                lower = cdf(xs - 0.5, fit["theta"], fit["mu"], fit["sigma"])
                y = shell["n_valid"] * (upper - lower)
                data.append({"type": "scatter", "mode": "lines", "x": xs.tolist(), "y": y.tolist(),
                             "name": name + " fit", "legendgroup": name, "showlegend": False})
        graphs[f"hist_{plan.number}_{s['image']}"] = {
            "data": data,
            "layout": {"title": f"Sweep {plan.number}, image {s['image']}: low counts and fitted lognormals",
                       "xaxis": {"title": "pixel value"}, "yaxis": {"title": "pixels", "type": "log"}},
        }
    return graphs


def parameter_graphs(plan, n_sectors):
    graphs = {}
    for par in ("theta", "mu", "sigma"):
        by_res = []
        by_image = {}
        for s in plan.corrections:
            xs, ys = [], []
            for shell in s["shells"]:
                if shell.get("fit") and shell["fit"]["converged"]:
                    xs.append(_mid_inv_d2(shell))
                    ys.append(shell["fit"][par])
                    key = (shell["shell"], shell.get("sector", 0))
                    by_image.setdefault(key, (region_name(shell, n_sectors), [], []))
                    by_image[key][1].append(s["image"])
                    by_image[key][2].append(shell["fit"][par])
            if xs:
                by_res.append({"type": "scatter", "mode": "lines+markers", "x": xs, "y": ys,
                               "name": f"image {s['image']}"})
        graphs[f"{par}_res_{plan.number}"] = {
            "data": by_res,
            "layout": {"title": f"Sweep {plan.number}: {par} against resolution",
                       "xaxis": {"title": "1/d^2 (A^-2)"}, "yaxis": {"title": par}},
        }
        graphs[f"{par}_img_{plan.number}"] = {
            "data": [{"type": "scatter", "mode": "lines+markers", "x": v[1], "y": v[2],
                      "name": v[0]} for _, v in sorted(by_image.items())],
            "layout": {"title": f"Sweep {plan.number}: {par} against image number",
                       "xaxis": {"title": "image"}, "yaxis": {"title": par}},
        }
    images = [s["image"] for s in plan.corrections]
    graphs[f"fractions_{plan.number}"] = {
        "data": [
            {"type": "scatter", "mode": "lines+markers", "x": images,
             "y": [s["zero_fraction"] for s in plan.corrections], "name": "zero (before)"},
            {"type": "scatter", "mode": "lines+markers", "x": images,
             "y": [s["negative_fraction"] for s in plan.corrections], "name": "negative (after)"},
        ],
        "layout": {"title": f"Sweep {plan.number}: fraction of zero and negative pixels",
                   "xaxis": {"title": "image"}, "yaxis": {"title": "fraction of valid pixels"}},
    }
    return graphs


def summary_table(plans, record):
    rows = []
    for p in plans:
        c = p.corrections
        fits = [sh for s in c for sh in s["shells"] if sh.get("fit")]
        rows.append(
            "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
                p.number, p.description, p.refused or "corrected", len(c),
                sum(s["n_changed"] for s in c),
                "-" if p.lowest_value is None else p.lowest_value,
                f"{np.mean([s['zero_fraction'] for s in c]):.4f}" if c else "-",
                f"{sum(1 for f in fits if f['fit']['converged'])}/{len(fits)}",
            )) + "</tr>"
        )
    head = "".join(f"<th>{h}</th>" for h in (
        "sweep", "images", "status", "number", "pixels changed", "lowest value", "mean zero fraction",
        "converged fits"))
    params = html.escape(json.dumps(record["parameters"]))
    return (f"<p>Parameters: <code>{params}</code></p>"
            f"<table class='table'><tr>{head}</tr>{''.join(rows)}</table>")


def html_report(plans, record):
    graphs = {}
    for p in plans:
        graphs.update(parameter_graphs(p, record["parameters"]["n_sectors"]))
        graphs.update(histogram_graphs(p, record["parameters"]["n_sectors"]))
    divs = "\n".join(f'<div id="{k}" style="height:450px"></div>' for k in graphs)
    calls = "\n".join(
        f"Plotly.newPlot({json.dumps(k)}, {json.dumps(v['data'])}, {json.dumps(v['layout'])});"
        for k, v in graphs.items()
    )
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>dials.correct_truncation report</title>
{_plotly_js()}
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:0 1em;text-align:right}}</style>
</head><body>
<h1>dials.correct_truncation report</h1>
<h2>Summary</h2>
{summary_table(plans, record)}
<h2>Graphs</h2>
{divs}
<script>
{calls}
</script>
</body></html>
"""
