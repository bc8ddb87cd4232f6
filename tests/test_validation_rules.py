"""The decision rules of the validation (devtools.validation.rules) on small
hand-made tables: four truth-comparison shells (all of them outer shells)
and a value per row chosen to hit one branch of a rule each, ties and
missing values included.  No DIALS needed."""

from __future__ import annotations

import math

import pytest

from devtools.validation.rules import (
    OUTER,
    choose_assignment,
    closer_rows,
    compare,
    gap_removed,
    harmed_gap,
    sectors_verdict,
    truncation_harms,
    zeros_masked,
)

NAN = float("nan")
SHELLS = ((1.64, 1.52), (1.52, 1.43), (1.43, 1.36), (1.36, 1.30))
assert len(SHELLS) == OUTER  # every shell of these tables is an outer shell


def column(
    k_shell=(1.0,) * 4,
    z=(0.0,) * 4,
    rel=(0.0,) * 4,
    cc=(0.9,) * 4,
    integrated=10000,
    r_merge=0.1,
    error_model=(1.0, 0.02),
):
    """A statistics dict as dataset_statistics returns it, with the values the
    rules read; overall scale k = 1, so k_shell/k = k_shell."""

    def merging():
        return {
            "n_obs": 20000,
            "completeness": 95.0,
            "multiplicity": 5.0,
            "r_merge": r_merge,
            "cc_one_half": 0.9,
            "i_over_sigma": 2.0,
        }

    return {
        "integrated": {"integrated_sum": integrated},
        "overall": merging(),
        "highest_shell": merging(),
        "scaling_model": {"error_model": list(error_model), "decay_spread": 0.1},
        "truth": {
            "k": 1.0,
            "cc_truth": 0.99,
            "shells": [
                {
                    "d_max": d_max,
                    "d_min": d_min,
                    "k_shell": k,
                    "k_shell_se": 0.01,
                    "weak_mean_z": zi,
                    "weak_mean_z_se": 0.01,
                    "weak_relative_bias": ri,
                    "weak_rms_z": 1.0,
                    "cc_truth": ci,
                }
                for (d_max, d_min), k, zi, ri, ci in zip(SHELLS, k_shell, z, rel, cc)
            ],
        },
    }


def row(rows, label):
    (found,) = [r for r in rows if r[0] == label]
    return found


# ---------------------------------------------------------------------------
# gap removed and the tolerance


def test_gap_removed_is_one_when_undone_zero_when_unchanged_negative_when_further():
    assert gap_removed(1.0, 0.5, 1.0) == 1.0
    assert gap_removed(1.0, 0.5, 0.5) == 0.0
    assert gap_removed(1.0, 0.5, 0.75) == 0.5
    assert gap_removed(1.0, 0.5, 0.25) == -0.5
    assert (
        gap_removed(1.0, 0.5, 1.25) == 0.5
    )  # overshooting by as much as the gap halves it too
    assert math.isnan(gap_removed(1.0, 1.0, 0.9))  # nothing to remove


def test_truncation_harms_beyond_two_per_cent_or_two_hundredths():
    assert truncation_harms(10.0, 10.3)  # 3% of 10
    assert not truncation_harms(10.0, 10.1)  # 1%
    assert truncation_harms(-10.0, -10.3)  # relative to |truth|
    assert not truncation_harms(-10.0, -10.1)
    assert not truncation_harms(0.0, 0.015)  # near 0 the absolute tolerance
    assert truncation_harms(0.0, -0.03)
    assert math.isnan(harmed_gap(10.0, 10.1, 10.0))
    assert harmed_gap(10.0, 10.4, 10.1) == pytest.approx(0.75)


# ---------------------------------------------------------------------------
# compare: the 'gap removed' table


def lane_for_compare(
    corrected_k_outer,
    truncated_k_outer=0.8,
    truncated_integrated=10000,
    corrected_integrated=10000,
    truth_integrated=10000,
):
    t = column(integrated=truth_integrated)
    u = column(
        k_shell=(1.0, 1.0, 1.01, truncated_k_outer), integrated=truncated_integrated
    )
    c = column(
        k_shell=(1.0, 1.0, 1.015, corrected_k_outer), integrated=corrected_integrated
    )
    return {"truth": t, "truncated": u, "distribution": c}


def test_compare_harmed_row_gives_the_gap_and_its_direction():
    rows = compare(lane_for_compare(corrected_k_outer=0.9))
    label, spec, t, u, harmed, cells = row(rows, "k_shell/k, 1.36-1.30 A")
    assert (t, u, harmed) == (1.0, 0.8, True)
    value, gap, verdict = cells["distribution"]
    assert value == 0.9 and gap == pytest.approx(0.5) and verdict == "closer to truth"

    _, _, _, _, _, cells = row(
        compare(lane_for_compare(corrected_k_outer=0.7)), "k_shell/k, 1.36-1.30 A"
    )
    assert (
        cells["distribution"][1] == pytest.approx(-0.5)
        and cells["distribution"][2] == "further from truth"
    )


def test_compare_a_correction_that_changes_nothing_is_not_closer():
    _, _, _, _, harmed, cells = row(
        compare(lane_for_compare(corrected_k_outer=0.8)), "k_shell/k, 1.36-1.30 A"
    )
    assert (
        harmed
        and cells["distribution"][1] == 0.0
        and cells["distribution"][2] == "further from truth"
    )


def test_compare_unharmed_row_flags_only_a_move_beyond_the_tolerance():
    rows = compare(lane_for_compare(corrected_k_outer=0.9))
    _, _, t, u, harmed, cells = row(
        rows, "k_shell/k, 1.43-1.36 A"
    )  # truncated 1.01, corrected 1.015
    assert not harmed
    assert (
        math.isnan(cells["distribution"][1])
        and cells["distribution"][2] == "within tolerance"
    )

    lane = lane_for_compare(corrected_k_outer=0.9)
    lane["distribution"]["truth"]["shells"][2]["k_shell"] = 1.05
    _, _, _, _, harmed, cells = row(compare(lane), "k_shell/k, 1.43-1.36 A")
    assert not harmed and cells["distribution"][2] == "moves away"


def test_compare_observation_counts_allow_for_counting_noise():
    # 2 sqrt(1000) = 63 observations (2% would be 20): 50 more is noise, 70 more is harm
    counts = {"truth_integrated": 1000, "corrected_integrated": 1000}
    rows = compare(
        lane_for_compare(
            0.9, truncated_integrated=1050, **dict(counts, corrected_integrated=1070)
        )
    )
    _, _, _, _, harmed, cells = row(rows, "integrated observations")
    assert not harmed and cells["distribution"][2] == "moves away"
    _, _, _, _, harmed, cells = row(
        compare(lane_for_compare(0.9, truncated_integrated=1070, **counts)),
        "integrated observations",
    )
    assert harmed and cells["distribution"][1] == 1.0


def test_compare_missing_values_give_no_verdict():
    lane = lane_for_compare(corrected_k_outer=NAN)
    _, _, _, _, harmed, cells = row(compare(lane), "k_shell/k, 1.36-1.30 A")
    assert (
        harmed
        and cells["distribution"][2] == "n/a"
        and math.isnan(cells["distribution"][1])
    )

    lane = lane_for_compare(corrected_k_outer=0.9, truncated_k_outer=NAN)
    _, _, _, _, harmed, cells = row(compare(lane), "k_shell/k, 1.36-1.30 A")
    assert not harmed and cells["distribution"][2] == "n/a"


# ---------------------------------------------------------------------------
# closer_rows


def test_closer_rows_counts_each_side_ties_and_skips_missing_values():
    truth = column(k_shell=(1.0, 1.0, 1.0, 1.0))
    a = column(k_shell=(0.9, 0.9, 1.0, NAN), r_merge=0.1)
    b = column(k_shell=(0.8, 0.95, 1.0, 0.5), r_merge=0.12)
    n_a, n_b, n_tie, n_rows = closer_rows({"truth": truth, "a": a, "b": b}, "a", "b")
    # a closer: shell 1 and the two Rmerge rows; b closer: shell 2; shell 4 skipped
    assert (n_a, n_b) == (3, 1)
    assert n_rows == n_a + n_b + n_tie
    all_rows = len(compare({"truth": truth, "truncated": truth, "a": a}))
    assert n_rows == all_rows - 1


# ---------------------------------------------------------------------------
# choose_assignment


def assignment_lane(
    expectation_k=(0.75,) * 4,
    expectation_z=(-0.25,) * 4,
    expectation_r_merge=0.1,
    distribution_k=(0.75,) * 4,
    truncated_k=(0.5,) * 4,
):
    """Truncation halves k_shell/k and shifts weak <z> by -0.5 in every
    shell; distribution removes half of both (gap 0.5)."""
    return {
        "truth": column(),
        "truncated": column(k_shell=truncated_k, z=(-0.5,) * 4),
        "distribution": column(k_shell=distribution_k, z=(-0.25,) * 4),
        "expectation": column(
            k_shell=expectation_k, z=expectation_z, r_merge=expectation_r_merge
        ),
    }


@pytest.mark.parametrize("current", ["distribution", "expectation"])
def test_choose_assignment_equal_counts_keep_the_present_default(current):
    d = choose_assignment(assignment_lane(), current)
    assert d["eligible"] == {"distribution": True, "expectation": True}
    assert d["counts"][0] == d["counts"][1]
    assert d["choice"] == current


def test_choose_assignment_an_eligible_mode_closer_on_more_rows_wins():
    # the only difference: expectation's Rmerge is the truth's (0.1) ...
    lane = assignment_lane()
    lane["distribution"]["overall"]["r_merge"] = 0.12
    d = choose_assignment(lane, "distribution")
    assert d["counts"][:2] == (1, 0) and d["choice"] == "expectation"
    # ... or further from it than distribution's
    d = choose_assignment(assignment_lane(expectation_r_merge=0.13), "expectation")
    assert d["counts"][:2] == (0, 2) and d["choice"] == "distribution"


def test_choose_assignment_ineligible_challenger_loses_whatever_the_counts():
    # expectation removes only 44% of the k_shell/k gap in the outermost
    # shell (distribution 50%: the threshold is 45%), and is closer
    # everywhere else
    lane = assignment_lane(
        expectation_k=(1.0, 1.0, 1.0, 0.72), expectation_z=(0.0,) * 4
    )
    d = choose_assignment(lane, "expectation")
    assert d["eligible"] == {"distribution": True, "expectation": False}
    assert d["counts"][0] > d["counts"][1]
    assert d["choice"] == "distribution"
    ((metric, shell, g, gd, within),) = d["failures"]["expectation"]
    assert (metric, shell) == ("k_shell/k", "1.36-1.30 A")
    assert g == pytest.approx(0.44) and gd == pytest.approx(0.5)
    assert (
        not within
    )  # 0.03 apart: more than 2 standard errors (0.01) of the truth value


def test_choose_assignment_threshold_just_below_distribution():
    lane = assignment_lane(expectation_k=(0.75, 0.75, 0.75, 0.73))  # gap 0.46 >= 0.45
    assert choose_assignment(lane, "distribution")["eligible"]["expectation"]


def test_choose_assignment_threshold_when_distribution_makes_it_worse():
    # distribution overshoots: gap -0.5, threshold -0.55 (not 0.9 x -0.5)
    lane = assignment_lane(
        distribution_k=(1.75,) * 4, expectation_k=(1.75, 1.75, 1.75, 1.77)
    )  # gap -0.54
    assert choose_assignment(lane, "distribution")["eligible"]["expectation"]
    lane = assignment_lane(
        distribution_k=(1.75,) * 4, expectation_k=(1.75, 1.75, 1.75, 1.78)
    )  # gap -0.56
    assert not choose_assignment(lane, "distribution")["eligible"]["expectation"]


def test_choose_assignment_missing_value_makes_a_mode_ineligible_only_where_truncation_harms():
    lane = assignment_lane(expectation_k=(0.75, 0.75, 0.75, NAN))
    assert not choose_assignment(lane, "distribution")["eligible"]["expectation"]
    # where truncation does not harm the row, the row does not count
    lane = assignment_lane(
        truncated_k=(0.5, 0.5, 0.5, 0.99),
        distribution_k=(0.75, 0.75, 0.75, 1.0),
        expectation_k=(0.75, 0.75, 0.75, NAN),
    )
    d = choose_assignment(lane, "distribution")
    assert d["eligible"]["expectation"] and d["failures"]["expectation"] == []


# ---------------------------------------------------------------------------
# sectors_verdict


def sectors_lane(sectors_gap=0.6, sectors_cc=(0.95, 0.95, 0.95, 0.85)):
    """Truncation halves k_shell/k and the weak relative bias is -0.5;
    expectation (whole shells) removes half of both, the sectors
    ``sectors_gap``; CC with the truth 0.9 for expectation."""
    k = 0.5 + 0.5 * sectors_gap
    return {
        "truth": column(),
        "truncated": column(k_shell=(0.5,) * 4, rel=(-0.5,) * 4),
        "expectation": column(k_shell=(0.75,) * 4, rel=(-0.25,) * 4),
        "sectors": column(k_shell=(k,) * 4, rel=(k - 1,) * 4, cc=sectors_cc),
    }


def corrections(
    failed=0, pooled=40, regions=8000, own_failed=0, own_pooled=5, own_regions=1000
):
    return {
        "expectation": {
            "regions": own_regions,
            "failed": own_failed,
            "pooled": own_pooled,
        },
        "sectors": {"regions": regions, "failed": failed, "pooled": pooled},
    }


def test_sectors_kept_when_bias_accuracy_and_robustness_all_favour_them():
    v = sectors_verdict(sectors_lane(), corrections())
    assert v["mean_gap"] == pytest.approx((0.6, 0.5))
    assert v["improves_bias"] and v["improves_accuracy"] and not v["loses_robustness"]
    assert v["keep"]


def test_sectors_bias_gain_within_the_margin_does_not_count():
    v = sectors_verdict(sectors_lane(sectors_gap=0.54), corrections())
    assert not v["improves_bias"] and not v["keep"]


def test_sectors_accuracy_needs_more_than_half_of_the_outer_shells():
    v = sectors_verdict(
        sectors_lane(sectors_cc=(0.95, 0.95, 0.9, 0.85)), corrections()
    )  # 2 higher, 1 tie
    assert v["cc_better"] == 2 and not v["improves_accuracy"] and not v["keep"]


def test_sectors_lose_robustness_with_more_failed_fits():
    v = sectors_verdict(sectors_lane(), corrections(failed=1))
    assert v["loses_robustness"] and not v["keep"]


def test_sectors_lose_robustness_when_pooling_exceeds_one_per_cent_and_whole_shells():
    # 0.9% pooled, more than whole shells' 0.5% but within 1%
    assert not sectors_verdict(sectors_lane(), corrections(pooled=72))[
        "loses_robustness"
    ]
    # 1.25%
    assert sectors_verdict(sectors_lane(), corrections(pooled=100))["loses_robustness"]
    # 1.25%, but whole shells pool 2%
    assert not sectors_verdict(sectors_lane(), corrections(pooled=100, own_pooled=20))[
        "loses_robustness"
    ]


def test_sectors_without_correction_records_do_not_lose_robustness():
    v = sectors_verdict(sectors_lane(), {})
    assert math.isnan(v["robust"]["sectors"]["failed_fraction"])
    assert not v["loses_robustness"] and v["keep"]


def test_sectors_bias_is_unknown_when_no_row_is_harmed():
    lane = sectors_lane()
    lane["truncated"] = column()
    v = sectors_verdict(lane, corrections())
    assert all(math.isnan(x) for x in v["mean_gap"])
    assert not v["improves_bias"] and not v["keep"]


# ---------------------------------------------------------------------------
# zeros_masked


@pytest.mark.parametrize(
    "trusted_range, inclusive, masked",
    [
        ((-1, 65535), False, False),  # dxtbx 3.11: exclusive, 0 valid
        ((0, 65535), False, True),
        ((1, 65534), True, True),  # current dxtbx: inclusive, 0 masked
        ((0, 65535), True, False),
    ],
)
def test_zeros_masked_follows_the_trusted_range_semantics(
    trusted_range, inclusive, masked
):
    assert (
        zeros_masked(
            {"trusted_range": list(trusted_range)},
            {"trusted_range_inclusive": inclusive},
        )
        is masked
    )


def test_zeros_masked_unknown_without_a_trusted_range():
    assert zeros_masked(None, {}) is None
    assert (
        zeros_masked({"trusted_range": None}, {"trusted_range_inclusive": True}) is None
    )
