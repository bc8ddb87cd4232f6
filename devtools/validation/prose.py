"""The generated prose of the report: what improves and what does not per
lane, and the sections on the assignment rule and on azimuthal sectors.
Written from the numbers, so that a re-run regenerates them consistently."""

from __future__ import annotations

import math

from devtools.validation.datasets import (
    N_SECTORS,
    SECTORS_ASSIGNMENT,
    default_assignment,
)
from devtools.validation.rules import (
    BIAS_MARGIN,
    ELIGIBLE_FRACTION,
    OUTER,
    POOLED_TOLERANCE,
    REL_TOLERANCE,
    eligibility_threshold,
    gap_removed,
    harmed_gap,
    k_ratio,
    shell_label,
    truncation_harms,
)
from devtools.validation.tables import format_percent, format_value


def gap_list(gaps):
    """Gaps removed as percentages; n.h. where truncation does not harm the row."""
    return ", ".join(
        "n.h." if not math.isfinite(g) else "%.0f%%" % (100 * g) for g in gaps
    )


def discussion(T, U, C, mode="distribution", lane_label="this DIALS"):
    """The 'What improves and what does not' paragraphs for one lane, from
    the truth (T), truncated (U) and corrected (C, assignment ``mode``)
    statistics, written from the numbers (so that a re-run regenerates them
    consistently)."""
    paras = []
    shells = T["truth"]["shells"]
    n = len(shells)
    last = shells[-1]
    outer = range(n - OUTER, n)

    # 1. intensity deficit per shell; weak reflections
    harmed = [i for i in range(n) if truncation_harms(k_ratio(T, i), k_ratio(U, i))]
    z = lambda r, i: r["truth"]["shells"][i]["weak_mean_z"]  # noqa: E731
    z_gaps = [harmed_gap(z(T, i), z(U, i), z(C, i)) for i in outer]
    if harmed:
        gaps = [
            100 * gap_removed(k_ratio(T, i), k_ratio(U, i), k_ratio(C, i))
            for i in harmed
        ]
        low = sum(k_ratio(U, i) < k_ratio(T, i) for i in harmed)
        direction = (
            "lower"
            if 2 * low > len(harmed)
            else "higher"
            if 2 * low < len(harmed)
            else "both ways"
        )
        text = (
            "**Intensities.** Truncation biases the merged intensities %s at high resolution: relative to the "
            "overall scale, the per-shell scale k_shell/k of the truncated data departs from the truth processing "
            "by more than %d%% in %d of %d shells (from %.2f A on; lower in %d of them), and is %.3f against %.3f "
            "in the outermost shell (%.2f-%.2f A; standard error of the truth value %.3f). With the %s "
            "correction it is %.3f there; in the affected shells the correction removes %s of the difference."
            % (
                direction,
                100 * REL_TOLERANCE,
                len(harmed),
                n,
                shells[harmed[0]]["d_max"],
                low,
                k_ratio(U, n - 1),
                k_ratio(T, n - 1),
                last["d_max"],
                last["d_min"],
                last.get("k_shell_se", float("nan")) / T["truth"]["k"],
                mode,
                k_ratio(C, n - 1),
                "%.0f%%" % gaps[0]
                if len(gaps) == 1
                else "%.0f%% to %.0f%%" % (min(gaps), max(gaps)),
            )
        )
        if direction == "lower":
            text += (
                " (Replacing negative pixels by 0 raises the background pixels more than the spot pixels, so the "
                "background subtracted from each spot is too large.)"
            )
    else:
        text = (
            "**Intensities.** Truncation changes the per-shell scale k_shell/k by no more than %d%% in any shell "
            "(outermost shell: truth %.3f, truncated %.3f, %s %.3f)."
            % (
                100 * REL_TOLERANCE,
                k_ratio(T, n - 1),
                k_ratio(U, n - 1),
                mode,
                k_ratio(C, n - 1),
            )
        )
    text += (
        " The weak reflections (true I below the shell median): their mean normalised error <z> in the "
        "outermost shell is %+.3f truncated (truth %+.3f, %s %+.3f); in the %d outer shells (%.2f-%.2f A) "
        "the correction removes %s of the truncation's shift of <z> (n.h.: shift within tolerance)."
        % (
            z(U, n - 1),
            z(T, n - 1),
            mode,
            z(C, n - 1),
            OUTER,
            shells[n - OUTER]["d_max"],
            last["d_min"],
            gap_list(z_gaps),
        )
    )
    paras.append(text)

    # 2. outer-shell I/sigI and rms(z)
    t, u, c = (r["highest_shell"]["i_over_sigma"] for r in (T, U, C))
    zt, zu, zc = (r["truth"]["shells"][-1]["weak_rms_z"] for r in (T, U, C))
    ot, ou, oc = (r["overall"]["i_over_sigma"] for r in (T, U, C))
    if u < t:
        paper = (
            "Here truncation lowers <I/sigI>, unlike Table 1 of Hattne et al., where in weaker data (overall "
            "<I/sigI> 2.2, against %.1f here) truncation inflated it and correction halved it: here the loss of "
            "intensity outweighs any shrinking of the sigmas." % ot
        )
    else:
        paper = (
            "Here truncation raises <I/sigI>, as in Table 1 of Hattne et al. (overall <I/sigI> 2.2 there, %.1f "
            "here): it shrinks the sigmas more than it lowers the intensities." % ot
        )
    cc_same = abs(U["truth"]["cc_truth"] - T["truth"]["cc_truth"]) <= 0.002
    paras.append(
        "**Outer-shell <I/sigI>; error model.** In the highest-resolution shell <I/sigI> is %.2f for the "
        "truth, %.2f truncated and %.2f corrected (%s). %s rms(z) of the weak reflections in the outermost "
        "shell is %.2f truncated against %.2f for the truth (%s) and %.2f corrected (%s). Caution: dials.scale "
        "refines an error model for each dataset (mostly determined by the strong low-resolution reflections), "
        "so all sigmas -- and with them <I/sigI> and rms(z) -- also depend on how that model fits each version; "
        "overall <I/sigI> is %.1f / %.1f / %.1f (truth / truncated / corrected)%s."
        % (
            t,
            u,
            c,
            "%s of the difference removed" % format_percent(gap_removed(t, u, c))
            if u != t
            else "no difference to remove",
            paper,
            zu,
            zt,
            "truncated weak intensities scatter less about the truth, relative to their sigmas, than in the truth "
            "processing: the paper's 'artificially homogeneous' intensities"
            if zu < zt
            else "truncated weak intensities scatter more about the truth, relative to their sigmas, than in the "
            "truth processing",
            zc,
            "closer to the truth processing than truncated"
            if abs(zc - zt) < abs(zu - zt)
            else "further from the truth processing than truncated: corrected sigmas too small relative to the "
            "scatter, or the scatter too large",
            ot,
            ou,
            oc,
            ", a difference that comes from the error models, not from the low-resolution intensities, whose "
            "overall CC with the truth is the same within 0.002"
            if abs(ou - ot) > REL_TOLERANCE * ot and cc_same
            else "",
        )
    )

    # 3. precision indicators of the outer shell
    rm = [r["highest_shell"]["r_merge"] for r in (T, U, C)]
    cc = [r["highest_shell"]["cc_one_half"] for r in (T, U, C)]
    ct = [r["truth"]["shells"][-1]["cc_truth"] for r in (T, U, C)]
    trunc_better = (
        rm[1] <= rm[0] * (1 + REL_TOLERANCE) and cc[1] > cc[0] and ct[1] > ct[0]
    )
    better = [
        name
        for name, v, low in (
            ("Rmerge", rm, True),
            ("CC1/2", cc, False),
            ("CC(I, I_true)", ct, False),
        )
        if (v[1] < v[0] if low else v[1] > v[0])
    ]
    worse = [
        name for name in ("Rmerge", "CC1/2", "CC(I, I_true)") if name not in better
    ]
    corr_closer = sum(abs(v[2] - v[0]) < abs(v[1] - v[0]) for v in (rm, cc, ct))
    if mode == "distribution":
        why = (
            " The distribution mode gives every zero-valued pixel (including the pixels whose true value was "
            "exactly 0) an independent random draw from the fitted distribution, which adds pixel noise of its "
            "own; the information in the negative pixel values is lost, and the correction restores their "
            "distribution, not the values."
        )
    else:
        why = (
            " The expectation mode draws nothing: the zero-valued pixels of a region get the region's "
            "conditional mean (as two neighbouring integers), so it adds no noise of its own but does not "
            "restore the spread of the lost values either; the values themselves are lost."
        )
    paras.append(
        "**Rmerge, CC1/2, CC with the truth.** In the highest-resolution shell the truncated data look %s: "
        "Rmerge %.3f (truth %.3f), CC1/2 %.3f (%.3f), and in the outermost "
        "truth-comparison shell CC(I, I_true) %.4f (%.4f)%s. Corrected (%s): Rmerge %.3f, CC1/2 %.3f, "
        "CC(I, I_true) %.4f -- closer to the truth processing than truncated on %d of these 3.%s"
        % (
            "better than the truth data by all three precision measures"
            if not worse
            else "worse than the truth data by all three precision measures"
            if not better
            else "better than the truth data by %s, worse by %s"
            % (" and ".join(better), " and ".join(worse)),
            rm[1],
            rm[0],
            cc[1],
            cc[0],
            ct[1],
            ct[0],
            ": clipping the negative noise to zero removes part of the pixel noise, so truncated intensities are "
            "biased but less noisy"
            if trunc_better
            else "",
            mode,
            rm[2],
            cc[2],
            ct[2],
            corr_closer,
            why,
        )
    )

    # 4. counts
    ni = [r.get("integrated", {}).get("integrated_sum", 0) for r in (T, U, C)]
    m = [r["overall"]["n_obs"] for r in (T, U, C)]
    comp = [r["overall"]["completeness"] for r in (T, U, C)]
    same = abs(ni[1] - ni[0]) <= 2 * math.sqrt(max(ni[0], 1)) and abs(
        m[1] - m[0]
    ) <= 2 * math.sqrt(max(m[0], 1))
    paras.append(
        "**Observations, completeness, multiplicity.** DIALS (%s) integrated %d / %d / %d reflections and merged "
        "%d / %d / %d observations (truth / truncated / corrected; completeness %.1f / %.1f / %.1f%%). %s "
        "Overall Rmerge, CC1/2 and CC with the truth are dominated by the strong low-resolution reflections and "
        "differ from the truth processing by at most %.3f, %.4f and %.4f."
        % (
            lane_label,
            ni[0],
            ni[1],
            ni[2],
            m[0],
            m[1],
            m[2],
            comp[0],
            comp[1],
            comp[2],
            "Truncation does not cost observations here (within 2 sqrt(N)): the paper's 2.5-fold gain in merged "
            "observations came from MOSFLM rejecting spots of the truncated images for their background "
            "gradient, which dials.integrate does not do."
            if same
            else "Truncation changes these counts beyond 2 sqrt(N).",
            max(abs(r["overall"]["r_merge"] - T["overall"]["r_merge"]) for r in (U, C)),
            max(
                abs(r["overall"]["cc_one_half"] - T["overall"]["cc_one_half"])
                for r in (U, C)
            ),
            max(abs(r["truth"]["cc_truth"] - T["truth"]["cc_truth"]) for r in (U, C)),
        )
    )
    return "\n\n".join(paras)


def masked_discussion(T, U, C, lane_label, trusted_range=None):
    """The paragraph on current DIALS, whose truncated baseline has every
    zero pixel masked, and the correction on read (C)."""
    n = len(T["truth"]["shells"])
    shells = T["truth"]["shells"]
    counts = [r.get("integrated", {}) for r in (T, U, C)]
    ns = [c.get("integrated_sum", 0) for c in counts]
    npf = [c.get("integrated_prf", 0) for c in counts]
    bad = [c.get("bad_foreground", 0) for c in counts]
    m = [r["overall"]["n_obs"] for r in (T, U, C)]
    hs = [r["highest_shell"]["n_uniq"] for r in (T, U, C)]
    matched = [r["truth"]["shells"][i]["n_matched"] for r in (U,) for i in range(n)]
    # the truth-comparison shells the truncated column has (enough) data in
    with_data = [
        i for i in range(1, n) if matched[i] >= 100 and math.isfinite(k_ratio(U, i))
    ]
    empty = [i for i in range(n) if matched[i] == 0]
    z = lambda r, i: r["truth"]["shells"][i]["weak_mean_z"]  # noqa: E731
    text = (
        "**%s: the zero pixels masked.** Current dxtbx reads the trusted range of these SMV files as %s "
        "inclusive, so in the truncated column every zero pixel is masked (what current users of such data get "
        "today); the correction on read gives those pixels values and lowers the trusted-range minimum. "
        "dials.integrate found masked pixels in the foreground of %d reflections (truth %d, on read %d) and "
        "summation-integrated %d (truth %d, on read %d); profile fitting gave %d (%d, %d). dials.scale merged "
        "%d observations (truth %d, on read %d); the highest-resolution shell holds %d unique reflections "
        "(truth %d, on read %d)."
        % (
            lane_label,
            "%g..%g" % tuple(trusted_range) if trusted_range else "excluding 0",
            bad[1],
            bad[0],
            bad[2],
            ns[1],
            ns[0],
            ns[2],
            npf[1],
            npf[0],
            npf[2],
            m[1],
            m[0],
            m[2],
            hs[1],
            hs[0],
            hs[2],
        )
    )
    if empty:
        text += (
            " The truncated column has no reflection in the truth-comparison shells beyond %.2f A."
            % shells[empty[0]]["d_max"]
        )
    if with_data:
        text += (
            " Where it has data (at least 100 matched reflections; shells %s), k_shell/k is %s truncated against "
            "%s for the truth and %s on read (gap removed %s; n.h.: within tolerance); weak <z> %s against %s and %s (gap removed %s)."
            % (
                ", ".join(shell_label(T, i).replace(" A", "") for i in with_data)
                + " A",
                " / ".join("%.3f" % k_ratio(U, i) for i in with_data),
                " / ".join("%.3f" % k_ratio(T, i) for i in with_data),
                " / ".join("%.3f" % k_ratio(C, i) for i in with_data),
                gap_list(
                    [
                        harmed_gap(k_ratio(T, i), k_ratio(U, i), k_ratio(C, i))
                        for i in with_data
                    ]
                ),
                " / ".join("%+.3f" % z(U, i) for i in with_data),
                " / ".join("%+.3f" % z(T, i) for i in with_data),
                " / ".join("%+.3f" % z(C, i) for i in with_data),
                gap_list([harmed_gap(z(T, i), z(U, i), z(C, i)) for i in with_data]),
            )
        )
    outer = range(n - OUTER, n)
    text += (
        " In the %d outer shells the on-read column has k_shell/k %s (truth %s) and weak <z> %s (truth %s)."
        % (
            OUTER,
            " / ".join("%.3f" % k_ratio(C, i) for i in outer),
            " / ".join("%.3f" % k_ratio(T, i) for i in outer),
            " / ".join("%+.3f" % z(C, i) for i in outer),
            " / ".join("%+.3f" % z(T, i) for i in outer),
        )
    )
    return text


def assignment_section(decisions, labels):
    """'Which assignment': the rule, its figures and outcome per crystal.
    ``decisions`` = {crystal: choose_assignment(...)}."""
    lines = [
        "## Which assignment",
        "",
        "Rule: a mode is *eligible* when its bias removal -- the gap removed (as above) on k_shell/k "
        "and on weak <z> in each of the %d outer truth-comparison shells, %d rows -- is on every row where "
        "truncation harms it at least %d%% of distribution's (for a non-positive gap g of distribution: at "
        "least g - %d%% |g|); the default is the eligible mode that is closer to the truth processing on more "
        "rows of the comparison table (all %s rows, counted; exact ties count for neither; equal counts keep "
        "the present default, `truncfix.assignment = %s`). Columns of %s."
        % (
            OUTER,
            2 * OUTER,
            round(100 * ELIGIBLE_FRACTION),
            round(100 * (1 - ELIGIBLE_FRACTION)),
            next(iter(decisions.values()))["counts"][3] if decisions else 0,
            next(iter(decisions.values()))["current"]
            if decisions
            else default_assignment(),
            labels,
        ),
        "",
    ]
    outcomes = {}
    for crystal, d in decisions.items():
        ref, ch = d["reference"], d["challenger"]
        lines += [
            "**%s crystal.** Bias removal (k_shell/k in the %d outer shells; weak <z> in the same shells):"
            % (crystal.capitalize(), OUTER),
            "",
            "| mode | k_shell/k | weak <z> | eligible |",
            "|---|---|---|---|",
        ]
        for mode in (ref, ch):
            rows = d["bias"][mode]
            lines.append(
                "| %s | %s | %s | %s |"
                % (
                    mode,
                    gap_list([g for metric, _, g in rows if metric == "k_shell/k"]),
                    gap_list([g for metric, _, g in rows if metric == "weak <z>"]),
                    "yes"
                    if d["eligible"][mode]
                    else "no (%s)"
                    % "; ".join(
                        "%s %s: %s < %s%s"
                        % (
                            metric,
                            shell,
                            format_percent(g),
                            format_percent(eligibility_threshold(gd)),
                            " *" if within else "",
                        )
                        for metric, shell, g, gd, within in d["failures"][mode]
                    ),
                )
            )
        noisy = [f for f in d["failures"][ch] if f[4]]
        if d["failures"][ch]:
            lines += [
                "",
                "%d of the %d failing rows (marked *) differ between the two modes by less than 2 standard errors "
                "of the truth column's value in that shell (a generous yardstick: the modes share their images)%s."
                % (
                    len(noisy),
                    len(d["failures"][ch]),
                    "; without them %s would be eligible, and the row count below would decide"
                    % ch
                    if len(noisy) == len(d["failures"][ch])
                    else "",
                ),
            ]
        a_ref, a_ch = (d["error_models"].get(m) for m in (ref, ch))
        if a_ref and a_ch and abs(a_ch[0] - a_ref[0]) > 0.05 * a_ref[0]:
            lines += [
                "",
                "Note: dials.scale fitted different error models to the two columns (a = %.3f for %s, %.3f for "
                "%s), so their weak <z> and rms(z) differ partly through the sigmas; compare the sigma-free "
                "rows (k_shell/k, weak relative bias, CC)."
                % (a_ref[0], ref, a_ch[0], ch),
            ]
        n_c, n_r, n_tie, n_rows = d["counts"]
        if not d["eligible"][ch]:
            why = "%s is not eligible, so %s stays" % (ch, ref)
        elif n_c == n_r:
            why = "equal counts: the present default %s stays" % d["current"]
        else:
            why = "%s is closer on more rows" % (ch if n_c > n_r else ref)
        lines += [
            "",
            "Closer to the truth processing: %s on %d rows, %s on %d rows, %d ties (of %d rows). Outcome: **%s** (%s)."
            % (ch, n_c, ref, n_r, n_tie, n_rows, d["choice"], why),
            "",
        ]
        outcomes[crystal] = d["choice"]
    if outcomes:
        choices = set(outcomes.values())
        current = next(iter(decisions.values()))["current"]
        if len(choices) == 1:
            choice = choices.pop()
            lines.append(
                "%s crystals give **%s**%s."
                % (
                    "Both" if len(outcomes) == 2 else "All %d" % len(outcomes),
                    choice,
                    ": the present default is confirmed"
                    if choice == current
                    else " -- the rule says the default should change from %s to %s"
                    % (current, choice),
                )
                if len(outcomes) > 1
                else "Outcome: **%s**%s."
                % (
                    choice,
                    " (the present default)"
                    if choice == current
                    else " (the present default is %s)" % current,
                )
            )
        else:
            lines.append(
                "The crystals disagree (%s): the evidence does not single out one mode for every dataset; "
                "the present default, %s, stays until it does."
                % (", ".join("%s: %s" % kv for kv in outcomes.items()), current)
            )
        lines.append("")
    return "\n".join(lines)


def sectors_section(verdicts, labels):
    """'Regions smaller than annuli': {crystal: sectors_verdict(...)}."""
    lines = [
        "## Regions smaller than annuli",
        "",
        "The sectors column (`truncfix.n_sectors=%d`: each of the 10 resolution shells split into %d azimuthal "
        "sectors of equal angle, each fitted and assigned on its own) against the column of its own mode "
        "(`truncfix.assignment=%s`, whole shells), both %s. The two columns can get different error models "
        "from dials.scale, which moves <z> and rms(z) without any change in the intensities, so the verdict "
        "uses measures that do not depend on the sigmas. Bias: gap removed on k_shell/k and on the weak "
        "reflections' relative bias <I - k I_true>/<k I_true> in the %d outer shells (mean over the rows "
        "truncation harms); improved when higher by more than %d points. Accuracy: CC(I, I_true) in the outer "
        "shells; improved when higher in more than half of them. Robustness, from "
        "`dials.correct_truncation.json`: regions with zero pixels whose fit failed (zeros left unchanged) or "
        "was pooled with a neighbouring region; lost when more fits fail, or when more than %d%% of the regions "
        "(and more than with whole shells) are pooled. Also shown: the gap removed on the rows of the "
        "assignment rule (k_shell/k and weak <z>), the rows of the comparison table closer to the truth "
        "processing, and the error models."
        % (
            N_SECTORS,
            N_SECTORS,
            SECTORS_ASSIGNMENT,
            labels,
            OUTER,
            round(100 * BIAS_MARGIN),
            round(100 * POOLED_TOLERANCE),
        ),
        "",
    ]
    keeps = {}
    for crystal, v in verdicts.items():
        own = v["own"]
        ms, mo = v["mean_gap"]
        rs_, ro_ = v["rule_gap"]
        n_s, n_o, n_tie, n_rows = v["counts"]
        rs, ro = v["robust"]["sectors"], v["robust"][own]
        cc = v["cc_outer"]
        em = v["error_model"]
        fmt_em = lambda e: "%.3f, %.4f" % tuple(e[:2]) if e else "n/a"  # noqa: E731
        lines += [
            "**%s crystal.**" % crystal.capitalize(),
            "",
            "| | %s | sectors |" % own,
            "|---|---|---|",
            "| gap removed, k_shell/k (outer shells) | %s | %s |"
            % (
                gap_list(v["sigma_free"][own][:OUTER]),
                gap_list(v["sigma_free"]["sectors"][:OUTER]),
            ),
            "| gap removed, weak relative bias (outer shells) | %s | %s |"
            % (
                gap_list(v["sigma_free"][own][OUTER:]),
                gap_list(v["sigma_free"]["sectors"][OUTER:]),
            ),
            "| **mean of these (bias)** | %s | %s |"
            % (format_percent(mo), format_percent(ms)),
            "| mean gap removed on the rule's rows (k_shell/k, weak <z>) | %s | %s |"
            % (format_percent(ro_), format_percent(rs_)),
            "| **CC(I, I_true), outer shells (accuracy; truth: %s)** | %s | %s |"
            % (
                " / ".join("%.4f" % x for x in cc["truth"]),
                " / ".join("%.4f" % x for x in cc[own]),
                " / ".join("%.4f" % x for x in cc["sectors"]),
            ),
            "| rows of the comparison table closer to the truth processing | %d | %d (%d ties, %d rows) |"
            % (n_o, n_s, n_tie, n_rows),
            "| regions with zeros (all images) | %d | %d |"
            % (ro["regions"], rs["regions"]),
            "| **failed fits** | %d (%s) | %d (%s) |"
            % (
                ro["failed"],
                format_value(100 * ro["failed_fraction"], ".2f") + "%",
                rs["failed"],
                format_value(100 * rs["failed_fraction"], ".2f") + "%",
            ),
            "| **pooled fits** | %d (%s) | %d (%s) |"
            % (
                ro["pooled"],
                format_value(100 * ro["pooled_fraction"], ".2f") + "%",
                rs["pooled"],
                format_value(100 * rs["pooled_fraction"], ".2f") + "%",
            ),
            "| dials.scale error model a, b (truth: %s) | %s | %s |"
            % (fmt_em(em["truth"]), fmt_em(em[own]), fmt_em(em["sectors"])),
            "| dials.scale decay parameters, max - min (truth: %s) | %s | %s |"
            % tuple(
                format_value(v["decay_spread"][n], ".2f")
                for n in ("truth", own, "sectors")
            ),
            "",
            "Sectors %s the bias, %s the accuracy (CC higher in %d of %d outer shells) and %s robustness: %s."
            % (
                "improve" if v["improves_bias"] else "do not improve",
                "improve" if v["improves_accuracy"] else "do not improve",
                v["cc_better"],
                len(cc["sectors"]),
                "lose" if v["loses_robustness"] else "do not lose",
                "keep them" if v["keep"] else "not worth keeping on this evidence",
            ),
            "",
        ]
        if (
            math.isfinite(rs_)
            and math.isfinite(ro_)
            and rs_ > ro_ + BIAS_MARGIN
            and not v["improves_bias"]
        ):
            lines += [
                "On the assignment rule's rows the sectors look better (%s against %s), but the gain is in weak "
                "<z> alone and the sigma-free relative bias does not show it: it comes from the sigmas (error "
                "model a = %s for the sectors, %s for whole shells), not from the intensities."
                % (
                    format_percent(rs_),
                    format_percent(ro_),
                    fmt_em(em["sectors"]).split(",")[0],
                    fmt_em(em[own]).split(",")[0],
                ),
                "",
            ]
        spreads = v["decay_spread"]
        if all(
            spreads.get(k) is not None for k in ("truth", own, "sectors")
        ) and spreads["sectors"] > 3 * max(spreads["truth"], spreads[own]):
            lines += [
                "Caution: dials.scale's decay component came out %.1f times as spread for the sectors column as "
                "for its own mode's (%.2f against %.2f; truth %.2f): a relative B that varies that much across "
                "the sweep tilts the merged intensities against resolution, so the k_shell/k rows of this column "
                "reflect the scaling model as much as the pixels."
                % (
                    spreads["sectors"] / max(spreads[own], 1e-9),
                    spreads["sectors"],
                    spreads[own],
                    spreads["truth"],
                ),
                "",
            ]
        keeps[crystal] = v["keep"]
    if keeps:
        if all(keeps.values()):
            lines.append(
                "Verdict: regions smaller than annuli help on every crystal here; keep `n_sectors` and consider it beyond the experiment."
            )
        elif not any(keeps.values()):
            lines.append(
                "Verdict: on these simulated sweeps (a background that depends on resolution only, as in the "
                "paper) regions smaller than annuli bring no gain that would justify them; keep "
                "`truncfix.n_sectors` experimental at 1 unless real data with an azimuthally varying background "
                "show otherwise."
            )
        else:
            lines.append(
                "Verdict: mixed (%s); no case for making sectors more than an experiment."
                % ", ".join(
                    "%s: %s" % (c, "keep" if k else "no gain") for c, k in keeps.items()
                )
            )
        lines.append("")
    return "\n".join(lines)
