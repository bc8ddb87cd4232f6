"""The markdown tables of the report: merging statistics and the comparison
with the true intensities per dataset, and the 'gap removed' table of one
lane (its figures from :func:`devtools.validation.rules.compare`)."""

from __future__ import annotations

import math

from devtools.validation.datasets import REFERENCES
from devtools.validation.rules import ABS_TOLERANCE, REL_TOLERANCE, compare


def format_value(value, spec):
    """``value`` formatted by ``spec``; n/a for a missing or non-finite value."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def format_percent(gap):
    """A fraction as a whole percentage (n/a when missing)."""
    return format_value(100 * gap, ".0f") + (
        "%" if gap is not None and math.isfinite(gap) else ""
    )


#: (label, statistic, format) of the merging table
TABLE1_ROWS = [
    ("Resolution (A)", None, None),
    ("Integrated observations (integrated_sum)", "integrated", "d"),
    ("Profile-fitted (integrated_prf)", "integrated_prf", "d"),
    ("Reflections with masked foreground pixels", "bad_foreground", "d"),
    ("Merged observations", "n_obs", "d"),
    ("Unique reflections", "n_uniq", "d"),
    ("Completeness (%)", "completeness", ".1f"),
    ("Multiplicity", "multiplicity", ".2f"),
    ("Rmerge", "r_merge", ".3f"),
    ("CC1/2", "cc_one_half", ".3f"),
    ("<I/sigI>", "i_over_sigma", ".2f"),
    ("dials.scale error model a, b", "error_model", None),
    ("dials.scale decay parameters, max - min", "decay_spread", ".2f"),
]

#: (label, statistic, format) of the per-shell truth comparison
TRUTH_ROWS = [
    ("n matched / n true", None, None),
    ("CC(I_merged, I_true)", "cc_truth", ".4f"),
    ("k_shell / k", "k_shell", ".3f"),
    ("weak: <z>", "weak_mean_z", "+.3f"),
    ("weak: <I - k I_true> / <k I_true>", "weak_relative_bias", "+.3f"),
    ("weak: rms(z)", "weak_rms_z", ".3f"),
    ("weak: <I/sigI>", "weak_mean_i_over_sigma", "+.3f"),
    ("weak: fraction I < 0", "weak_fraction_negative", ".3f"),
]


def table(columns, level="###"):
    """Markdown tables of ``columns``, a list of (label, statistics dict) or
    a {label: statistics dict}: merging statistics and the comparison with
    the true intensities, one column each."""
    if isinstance(columns, dict):
        columns = list(columns.items())
    names = [label for label, _ in columns]
    stats = [r for _, r in columns]
    lines = []
    head = "| | " + " | ".join(names) + " |"
    rule = "|---|" + "---|" * len(names)

    lines += ["%s Merging statistics (Table 1 of Hattne et al. 2016)" % level, ""]
    lines += [
        "Overall, with the highest-resolution shell in parentheses.",
        "",
        head,
        rule,
    ]
    for label, key, spec in TABLE1_ROWS:
        cells = []
        for r in stats:
            o, h = r["overall"], r["highest_shell"]
            if key is None:
                cells.append(
                    "%.2f-%.2f (%.2f-%.2f)"
                    % (o["d_max"], o["d_min"], h["d_max"], h["d_min"])
                )
            elif key in ("integrated", "integrated_prf", "bad_foreground"):
                name = "integrated_sum" if key == "integrated" else key
                cells.append(str(r.get("integrated", {}).get(name, "n/a")))
            elif key == "error_model":
                em = r.get("scaling_model", {}).get("error_model")
                cells.append("%.3f, %.4f" % tuple(em[:2]) if em else "n/a")
            elif key == "decay_spread":
                cells.append(
                    format_value(r.get("scaling_model", {}).get("decay_spread"), spec)
                )
            else:
                cells.append(
                    "%s (%s)" % (format_value(o[key], spec), format_value(h[key], spec))
                )
        lines.append("| %s | %s |" % (label, " | ".join(cells)))
    lines.append("")

    lines += ["%s Comparison with the true intensities" % level, ""]
    lines += ["Overall:", "", head, rule]
    overall_rows = [
        (
            "matched merged reflections",
            lambda t: "%d / %d" % (t["n_matched"], t["n_truth"]),
        ),
        ("scale k (I_obs ~ k I_true)", lambda t: format_value(t["k"], ".4f")),
        ("CC(I_merged, I_true)", lambda t: format_value(t["cc_truth"], ".4f")),
        (
            "weak: <z> = <(I - k I_true)/sigma>",
            lambda t: format_value(t["weak_mean_z"], "+.3f"),
        ),
        ("weak: rms(z)", lambda t: format_value(t["weak_rms_z"], ".3f")),
    ]
    for label, get in overall_rows:
        lines.append(
            "| %s | %s |" % (label, " | ".join(get(r["truth"]) for r in stats))
        )
    lines.append("")

    shells = stats[0]["truth"]["shells"]
    lines += [
        "Per resolution shell (%d shells of equal reciprocal volume):" % len(shells),
        "",
    ]
    lines += [
        "| shell (A) | metric | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for i, s in enumerate(shells):
        label = "%.2f-%.2f" % (s["d_max"], s["d_min"])
        for j, (metric, key, spec) in enumerate(TRUTH_ROWS):
            cells = []
            for r in stats:
                t = r["truth"]
                sh = t["shells"][i]
                if key is None:
                    cells.append(
                        "%d / %d (weak %d)"
                        % (sh["n_matched"], sh["n_truth"], sh["n_weak"])
                    )
                elif key == "k_shell":
                    cells.append(format_value(sh["k_shell"] / t["k"], spec))
                else:
                    cells.append(format_value(sh[key], spec))
            lines.append(
                "| %s | %s | %s |"
                % (label if j == 0 else "", metric, " | ".join(cells))
            )
    lines.append("")
    return "\n".join(lines)


def comparison_table(lane_results, labels=None, title=None, level="###"):
    """The 'gap removed' table of one lane: every corrected column against
    the truth and truncated columns of that lane."""
    labels = labels or {n: n for n in lane_results}
    corrected = [n for n in lane_results if n not in REFERENCES]
    lines = [
        "%s %s"
        % (
            level,
            title
            or "Is the corrected data closer to the truth processing than the truncated data?",
        ),
        "",
        "Each corrected cell: the value and, in parentheses, the gap removed = 1 - |corrected - truth| / "
        "|truncated - truth| (100%% = truncation effect fully undone, < 0 = further from the truth than "
        "truncated). Rows where |truncated - truth| is at most %d%% of the truth value (or %.2f; for "
        "observation counts 2 sqrt(N)) are not harmed by truncation (column 'harmed': no); there a corrected "
        "value is marked only if it moves beyond that tolerance. Differences of a few per cent in the outer "
        "shells (a few hundred unique reflections) are within noise."
        % (100 * REL_TOLERANCE, ABS_TOLERANCE),
        "",
        "| metric | %s | %s | harmed | %s |"
        % (
            labels["truth"],
            labels["truncated"],
            " | ".join(labels[n] for n in corrected),
        ),
        "|---|---|---|---|" + "---|" * len(corrected),
    ]
    for label, spec, t, u, harmed, cells in compare(lane_results, corrected):
        shown = []
        for n in corrected:
            c, gap, verdict = cells[n]
            if harmed:
                shown.append("%s (%s)" % (format_value(c, spec), format_percent(gap)))
            elif verdict == "moves away":
                shown.append("%s (moves away)" % format_value(c, spec))
            else:
                shown.append(format_value(c, spec))
        lines.append(
            "| %s | %s | %s | %s | %s |"
            % (
                label,
                format_value(t, spec),
                format_value(u, spec),
                "yes" if harmed else "no",
                " | ".join(shown),
            )
        )
    lines.append("")
    return "\n".join(lines)
