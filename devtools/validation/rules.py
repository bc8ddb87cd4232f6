"""The decision rules of the validation, on the statistics of one lane
({dataset: statistics dict} as :func:`devtools.validation.statistics.dataset_statistics`
returns them): whether truncation harms a row and how much of it a
correction removes (:func:`compare`), which assignment mode should be the
default (:func:`choose_assignment`), whether regions smaller than annuli
are worth keeping (:func:`sectors_verdict`), and whether a lane's dxtbx
masks the zero pixels (:func:`zeros_masked`).  Pure functions of the
numbers, so that they can be tested on small tables."""

from __future__ import annotations

import math

from devtools.validation.datasets import (
    ASSIGNMENTS,
    REFERENCES,
    SECTORS_ASSIGNMENT,
    default_assignment,
)


def k_ratio(r, i):
    """k_shell / k of truth-comparison shell ``i``."""
    return r["truth"]["shells"][i]["k_shell"] / r["truth"]["k"]


def shell_label(r, i):
    """'1.36-1.30 A': the d range of truth-comparison shell ``i``."""
    s = r["truth"]["shells"][i]
    return "%.2f-%.2f A" % (s["d_max"], s["d_min"])


#: The outer truth-comparison shells over which the bias removal is judged
#: (the truncation bias grows with resolution and is negligible below
#: ~1.8 A; with 8 shells to 1.3 A these are 1.64-1.30 A)
OUTER = 4


def metric_rows(results):
    """(label, {dataset: value}, spec) of the rows compared in the summary,
    for ``results`` = {dataset: statistics dict}."""
    rows = []
    names = list(results)
    get = lambda f: {n: f(results[n]) for n in names}  # noqa: E731
    rows.append(
        (
            "integrated observations",
            get(lambda r: r.get("integrated", {}).get("integrated_sum", float("nan"))),
            "d",
        )
    )
    for part, tag in (("overall", "overall"), ("highest_shell", "outer shell")):
        for key, label, spec in (
            ("n_obs", "merged observations", "d"),
            ("completeness", "completeness (%)", ".1f"),
            ("multiplicity", "multiplicity", ".2f"),
            ("r_merge", "Rmerge", ".3f"),
            ("cc_one_half", "CC1/2", ".3f"),
            ("i_over_sigma", "<I/sigI>", ".2f"),
        ):
            rows.append(
                ("%s, %s" % (label, tag), get(lambda r, p=part, k=key: r[p][k]), spec)
            )
    rows.append(
        ("CC(I, I_true), overall", get(lambda r: r["truth"]["cc_truth"]), ".4f")
    )
    first = results[names[0]]
    n = len(first["truth"]["shells"])
    for i in range(n):
        rows.append(
            (
                "k_shell/k, %s" % shell_label(first, i),
                get(lambda r, i=i: k_ratio(r, i)),
                ".3f",
            )
        )
    for i in range(n):
        rows.append(
            (
                "weak <z>, %s" % shell_label(first, i),
                get(lambda r, i=i: r["truth"]["shells"][i]["weak_mean_z"]),
                "+.3f",
            )
        )
    for i in range(n):
        rows.append(
            (
                "weak relative bias, %s" % shell_label(first, i),
                get(
                    lambda r, i=i: r["truth"]["shells"][i].get(
                        "weak_relative_bias", float("nan")
                    )
                ),
                "+.3f",
            )
        )
    for i in range(n):
        rows.append(
            (
                "weak rms(z), %s" % shell_label(first, i),
                get(lambda r, i=i: r["truth"]["shells"][i]["weak_rms_z"]),
                ".3f",
            )
        )
    for i in range(n):
        rows.append(
            (
                "CC(I, I_true), %s" % shell_label(first, i),
                get(lambda r, i=i: r["truth"]["shells"][i]["cc_truth"]),
                ".4f",
            )
        )
    return rows


#: A difference truncated - truth smaller than this fraction of the truth
#: value (or than ABS_TOLERANCE for values near 0) counts as "not harmed".
REL_TOLERANCE = 0.02
ABS_TOLERANCE = 0.02


def _tolerance(label, t):
    tol = max(REL_TOLERANCE * abs(t), ABS_TOLERANCE)
    if label.startswith(("integrated observations", "merged observations")) and t > 0:
        tol = max(tol, 2 * math.sqrt(t))
    return tol


def gap_removed(t, u, c):
    """1 - |corrected - truth| / |truncated - truth|: 1 where the correction
    undoes the truncation's effect, < 0 where it moves further away; nan
    where truncation changes nothing."""
    return 1 - abs(c - t) / abs(u - t) if u != t else float("nan")


def truncation_harms(t, u):
    """Whether truncation harms a value: |truncated - truth| beyond the
    tolerance (the rule of the bias rows; the comparison table also allows
    for counting noise, see _tolerance)."""
    return abs(u - t) > max(REL_TOLERANCE * abs(t), ABS_TOLERANCE)


def harmed_gap(t, u, c):
    """The gap removed where truncation harms the value, else nan."""
    return gap_removed(t, u, c) if truncation_harms(t, u) else float("nan")


def outer_gaps(lane_results, name, get):
    """harmed_gap of column ``name`` in each of the OUTER outermost
    truth-comparison shells, for the value ``get(statistics, shell)``."""
    T, U, C = lane_results["truth"], lane_results["truncated"], lane_results[name]
    n = len(T["truth"]["shells"])
    return [harmed_gap(get(T, i), get(U, i), get(C, i)) for i in range(n - OUTER, n)]


def compare(lane_results, corrected=None):
    """Rows of (label, spec, truth, truncated, harmed, {corrected: (value,
    gap_removed, verdict)}) of one lane's ``lane_results`` ({dataset:
    statistics dict}): gap_removed = 1 - |corrected - truth| / |truncated -
    truth| where the truncation harms the row (|truncated - truth| above the
    tolerance), else nan."""
    if corrected is None:
        corrected = [n for n in lane_results if n not in REFERENCES]
    out = []
    for label, values, spec in metric_rows(lane_results):
        t, u = values["truth"], values["truncated"]
        finite = math.isfinite(t) and math.isfinite(u)
        tol = _tolerance(label, t) if finite else float("nan")
        harmed = finite and abs(u - t) > tol
        cells = {}
        for name in corrected:
            c = values[name]
            if not (finite and math.isfinite(c)):
                cells[name] = (c, float("nan"), "n/a")
            elif harmed:
                gap = gap_removed(t, u, c)
                cells[name] = (
                    c,
                    gap,
                    "closer to truth" if gap > 0 else "further from truth",
                )
            else:
                cells[name] = (
                    c,
                    float("nan"),
                    "within tolerance" if abs(c - t) <= tol else "moves away",
                )
        out.append((label, spec, t, u, harmed, cells))
    return out


def bias_metrics():
    """(metric, value of shell i, its standard error) of the bias rows."""
    return (
        (
            "k_shell/k",
            k_ratio,
            lambda r, i: (
                r["truth"]["shells"][i].get("k_shell_se", float("nan"))
                / r["truth"]["k"]
            ),
        ),
        (
            "weak <z>",
            lambda r, i: r["truth"]["shells"][i]["weak_mean_z"],
            lambda r, i: r["truth"]["shells"][i].get("weak_mean_z_se", float("nan")),
        ),
    )


def bias_rows(lane_results, name):
    """The bias removal of column ``name``: [(metric, shell label, gap
    removed)] for k_shell/k and weak <z> in each of the OUTER outermost
    truth-comparison shells; gap removed is nan where the truncation does
    not harm the row (|truncated - truth| within tolerance)."""
    T = lane_results["truth"]
    n = len(T["truth"]["shells"])
    return [
        (metric, shell_label(T, i), gap)
        for metric, get, _ in bias_metrics()
        for i, gap in zip(range(n - OUTER, n), outer_gaps(lane_results, name, get))
    ]


#: a mode is eligible when its bias removal is nowhere worse than this
#: fraction of distribution's (for a positive gap g: at least 0.9 g; for a
#: non-positive g: at least g - 0.1 |g|)
ELIGIBLE_FRACTION = 0.9


def eligibility_threshold(gap):
    """The least gap removed a mode must reach where distribution removes ``gap``."""
    return gap - (1 - ELIGIBLE_FRACTION) * abs(gap)


def closer_rows(lane_results, a, b):
    """(rows where ``a`` is closer to the truth processing than ``b``, rows
    where ``b`` is, ties, rows compared) over every row of the comparison
    table."""
    n_a = n_b = n_tie = 0
    for label, values, spec in metric_rows(lane_results):
        t, va, vb = values["truth"], values[a], values[b]
        if not all(math.isfinite(v) for v in (t, va, vb)):
            continue
        da, db = abs(va - t), abs(vb - t)
        if da < db:
            n_a += 1
        elif db < da:
            n_b += 1
        else:
            n_tie += 1
    return n_a, n_b, n_tie, n_a + n_b + n_tie


def choose_assignment(lane_results, current=None):
    """The rule of the 'Which assignment' section, on one lane's results with
    a column per assignment mode: a mode is eligible when its bias removal
    (bias_rows) is on every row where the truncation harms at least
    ELIGIBLE_FRACTION of distribution's; the default is the eligible mode
    closer to the truth processing on more rows of the comparison table
    (a tie keeps ``current``, the present default).  Returns a dict."""
    current = current or default_assignment()
    reference = "distribution"
    bias = {m: bias_rows(lane_results, m) for m in ASSIGNMENTS}
    # per bias row: the two modes' values and the standard error of the
    # truth column's value (the modes share their images, so the noise of
    # their difference is smaller: 2 s.e. is a generous yardstick)
    T = lane_results["truth"]
    n = len(T["truth"]["shells"])
    noise = []
    for metric, get, se in bias_metrics():
        for i in range(n - OUTER, n):
            noise.append(
                abs(
                    get(lane_results["expectation"], i)
                    - get(lane_results["distribution"], i)
                )
                < 2 * se(T, i)
            )
    eligible, failures = {}, {}
    for m in ASSIGNMENTS:
        bad = [
            (metric, shell, g, gd, within)
            for (metric, shell, g), (_, _, gd), within in zip(
                bias[m], bias[reference], noise
            )
            if math.isfinite(gd)
            and not (math.isfinite(g) and g >= eligibility_threshold(gd))
        ]
        eligible[m] = not bad
        failures[m] = bad
    others = [m for m in ASSIGNMENTS if m != reference]
    counts = {}
    for m in others:
        counts[m] = closer_rows(lane_results, m, reference)
    # the two-mode case (distribution, expectation)
    challenger = others[0]
    n_c, n_r, n_tie, n_rows = counts[challenger]
    if not eligible[challenger] or n_c == n_r:
        choice = reference if not eligible[challenger] else current
    else:
        choice = challenger if n_c > n_r else reference
    models = {
        m: (lane_results[m].get("scaling_model") or {}).get("error_model")
        for m in ASSIGNMENTS
    }
    return {
        "error_models": models,
        "bias": bias,
        "eligible": eligible,
        "failures": failures,
        "challenger": challenger,
        "reference": reference,
        "counts": counts[challenger],
        "choice": choice,
        "current": current,
    }


#: the least gain in mean gap removed (a fraction) that counts as a bias
#: improvement of the sectors over whole shells
BIAS_MARGIN = 0.05

#: robustness is lost when more regions' fits fail (their zeros are left
#: unchanged), or when more than this fraction of the regions (and more than
#: with whole shells) must be pooled with a neighbour to be fitted
POOLED_TOLERANCE = 0.01


def sectors_verdict(lane_results, corrections):
    """The region experiment on one lane: the sectors column against the
    column of its own assignment mode (SECTORS_ASSIGNMENT), on measures that
    do not depend on the sigmas (the two columns may get different error
    models from dials.scale, which moves <z> and rms(z) without any change
    in the intensities):

    * bias: gap removed on k_shell/k and on the weak reflections' relative
      bias <I - k I_true> / <k I_true> in the OUTER outer shells; improved
      when the mean over the rows harmed by truncation is higher by more
      than BIAS_MARGIN;
    * accuracy: CC(I, I_true) in the outer shells; improved when higher in
      more than half of them;
    * robustness: more failed fits, or more than POOLED_TOLERANCE of the
      regions pooled (and more than with whole shells), lose it.

    Also reported: the rule's own bias rows (k_shell/k and weak <z>), the
    rows of the comparison table closer to the truth processing, and the
    error models.  ``corrections`` = {dataset: correction_summary}.
    Returns a dict."""
    own = SECTORS_ASSIGNMENT
    n = len(lane_results["truth"]["truth"]["shells"])
    outer = range(n - OUTER, n)

    def mean_pairs(a, b):
        pairs = [(x, y) for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
        if not pairs:
            return float("nan"), float("nan")
        return sum(p[0] for p in pairs) / len(pairs), sum(p[1] for p in pairs) / len(
            pairs
        )

    rel = lambda r, i: r["truth"]["shells"][i].get("weak_relative_bias", float("nan"))  # noqa: E731
    sigma_free = {
        name: outer_gaps(lane_results, name, k_ratio)
        + outer_gaps(lane_results, name, rel)
        for name in ("sectors", own)
    }
    mean_s, mean_o = mean_pairs(sigma_free["sectors"], sigma_free[own])
    rule = {
        name: [g for _, _, g in bias_rows(lane_results, name)]
        for name in ("sectors", own)
    }
    rule_s, rule_o = mean_pairs(rule["sectors"], rule[own])
    n_s, n_o, n_tie, n_rows = closer_rows(lane_results, "sectors", own)
    cc = {
        name: [lane_results[name]["truth"]["shells"][i]["cc_truth"] for i in outer]
        for name in ("truth", "truncated", own, "sectors")
    }
    cc_better = sum(1 for x, y in zip(cc["sectors"], cc[own]) if x > y)
    robust = {}
    for name in (own, "sectors"):
        c = corrections.get(name) or {}
        regions = c.get("regions", 0)
        robust[name] = {
            "regions": regions,
            "failed": c.get("failed", 0),
            "pooled": c.get("pooled", 0),
            "failed_fraction": c.get("failed", 0) / regions
            if regions
            else float("nan"),
            "pooled_fraction": c.get("pooled", 0) / regions
            if regions
            else float("nan"),
        }
    improves_bias = math.isfinite(mean_s) and mean_s > mean_o + BIAS_MARGIN
    improves_accuracy = 2 * cc_better > len(cc["sectors"])
    loses_robustness = robust["sectors"]["failed_fraction"] > robust[own][
        "failed_fraction"
    ] or (
        robust["sectors"]["pooled_fraction"]
        > max(robust[own]["pooled_fraction"], POOLED_TOLERANCE)
    )
    model = {
        name: lane_results[name].get("scaling_model") or {}
        for name in ("truth", own, "sectors")
    }
    return {
        "own": own,
        "sigma_free": sigma_free,
        "mean_gap": (mean_s, mean_o),
        "rule_gap": (rule_s, rule_o),
        "counts": (n_s, n_o, n_tie, n_rows),
        "cc_outer": cc,
        "cc_better": cc_better,
        "robust": robust,
        "improves_bias": improves_bias,
        "improves_accuracy": improves_accuracy,
        "loses_robustness": loses_robustness,
        "decay_spread": {name: m.get("decay_spread") for name, m in model.items()},
        "error_model": {name: m.get("error_model") for name, m in model.items()},
        "keep": improves_bias and improves_accuracy and not loses_robustness,
    }


def zeros_masked(truncated, lane_info):
    """Whether the lane's dxtbx masks the zero pixels of the truncated
    images (from the trusted range dials.import recorded and the lane's
    trusted-range semantics), or None if unknown."""
    if not truncated or not truncated.get("trusted_range"):
        return None
    low, high = truncated["trusted_range"]
    if lane_info.get("trusted_range_inclusive"):
        return not low <= 0 <= high
    return not low < 0 < high
