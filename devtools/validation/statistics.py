"""The statistics of one processed dataset: merging statistics as in Table 1
of Hattne et al. (2016), and what only a simulation can show, the
comparison of the merged intensities with the true ones per resolution
shell.  The results are plain JSON-serialisable dicts (statistics.json)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

import iotbx.merging_statistics
import iotbx.mtz

from devtools.validation.lanes import StepError

#: Number of shells of the merging statistics (as in the dials.scale summary)
MERGING_SHELLS = 20
#: Number of shells of the truth comparison
TRUTH_SHELLS = 8


def _truth_array(truth_mtz):
    """The true merged intensities of the simulation."""
    for array in iotbx.mtz.object(truth_mtz).as_miller_arrays():
        if array.is_xray_intensity_array() or array.info().label_string().startswith(
            "I"
        ):
            array = array.customized_copy(
                sigmas=None
            ).set_observation_type_xray_intensity()
            return array.map_to_asu().merge_equivalents().array()
    raise ValueError("no intensity array in %s" % truth_mtz)


def _unmerged_intensities(scaled_mtz, symmetry):
    """Unmerged scaled intensities of a dials.export MTZ, with the known
    crystal symmetry."""
    arrays = iotbx.mtz.object(scaled_mtz).as_miller_arrays(merge_equivalents=False)
    for array in arrays:
        labels = array.info().labels
        if labels and labels[0] == "I" and array.sigmas() is not None:
            array = array.customized_copy(
                crystal_symmetry=symmetry
            ).set_observation_type_xray_intensity()
            return array.map_to_asu()
    raise ValueError("no unmerged I/SIGI in %s" % scaled_mtz)


_COUNT_INTEGRATED = """
import json, sys
from dials.array_family import flex
table = flex.reflection_table.from_file(sys.argv[1])
print(json.dumps({
    "integrated_sum": int(table.get_flags(table.flags.integrated_sum).count(True)),
    "integrated_prf": int(table.get_flags(table.flags.integrated_prf).count(True)),
    "bad_foreground": int(table.get_flags(table.flags.foreground_includes_bad_pixels).count(True)),
}))
"""


def count_integrated(integrated_refl, python=None, env=None):
    """Numbers of reflections with the integrated_sum and integrated_prf
    flags and with masked pixels in their foreground, read by ``python`` (the interpreter of the DIALS that wrote the
    file: DIALS 3.12 cannot read the reflection files of current DIALS) or
    by this interpreter."""
    if python is None:
        python = sys.executable
    result = subprocess.run(
        [python, "-c", _COUNT_INTEGRATED, integrated_refl],
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode:
        raise StepError(
            "%s cannot read %s:\n%s" % (python, integrated_refl, result.stderr[-2000:])
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def scaling_model(scaled_expt):
    """What dials.scale refined that the comparison depends on: the spread
    (max - min) of the decay component's parameters (a relative B per
    rotation interval; an ill-determined decay tilts intensities against
    resolution) and the error model parameters (a, b), from the JSON of
    ``scaled_expt`` (readable whichever DIALS wrote it)."""
    with open(scaled_expt) as fh:
        model = (json.load(fh).get("scaling_model") or [{}])[0]
    decay = model.get("decay", {}).get("parameters")
    return {
        "decay_spread": float(max(decay) - min(decay)) if decay else None,
        "error_model": model.get("configuration_parameters", {}).get(
            "error_model_parameters"
        ),
    }


def _shell_stats(bin_stats):
    """The merging statistics of one shell (or overall) as plain numbers."""
    if not bin_stats.n_obs:  # an empty shell: no statistic
        nan = float("nan")
        return {
            "d_max": bin_stats.d_max,
            "d_min": bin_stats.d_min,
            "n_obs": 0,
            "n_uniq": 0,
            "completeness": 0.0,
            "multiplicity": nan,
            "r_merge": nan,
            "cc_one_half": nan,
            "i_over_sigma": nan,
            "mean_i": nan,
        }
    return {
        "d_max": bin_stats.d_max,
        "d_min": bin_stats.d_min,
        "n_obs": int(bin_stats.n_obs),
        "n_uniq": int(bin_stats.n_uniq),
        "completeness": 100.0 * bin_stats.completeness,
        "multiplicity": bin_stats.mean_redundancy,
        "r_merge": bin_stats.r_merge,
        "cc_one_half": bin_stats.cc_one_half,
        "i_over_sigma": bin_stats.i_over_sigma_mean,
        "mean_i": bin_stats.i_mean,
    }


def _pearson(x, y):
    """Pearson's r, nan where it is undefined (fewer than 3 points, no spread)."""
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def dataset_statistics(
    scaled_expt,
    scaled_refl,
    truth_mtz,
    d_min,
    d_max=None,
    scaled_mtz=None,
    integrated_refl=None,
    integrated=None,
):
    """Merging statistics and comparison with the truth of one dataset.

    ``scaled_mtz`` (dials.export of scaled_expt/refl) defaults to scaled.mtz
    next to scaled_refl; ``integrated`` (count_integrated of the dataset)
    defaults to counting ``integrated_refl`` (default: next to scaled_refl)
    here.  Returns a JSON-serialisable dict."""
    truth = _truth_array(truth_mtz)
    symmetry = truth.crystal_symmetry()
    if d_max is None:
        d_max = truth.d_max_min()[0]
    truth = truth.resolution_filter(d_max=d_max, d_min=d_min)
    if scaled_mtz is None:
        scaled_mtz = os.path.join(os.path.dirname(scaled_refl), "scaled.mtz")
    unmerged = _unmerged_intensities(scaled_mtz, symmetry).resolution_filter(
        d_max=d_max, d_min=d_min
    )

    merging = iotbx.merging_statistics.dataset_statistics(
        i_obs=unmerged,
        d_min=d_min,
        d_max=d_max,
        n_bins=MERGING_SHELLS,
        anomalous=False,
        sigma_filtering=None,
        eliminate_sys_absent=False,
        use_internal_variance=False,
        assert_is_not_unique_set_under_symmetry=False,
        # the same shells for every dataset, also one whose data stop short
        # of d_min (empty shells)
        extend_d_max_min=True,
        log=open(os.devnull, "w"),
    )
    out = {
        "overall": _shell_stats(merging.overall),
        "highest_shell": _shell_stats(merging.bins[-1]),
        "d_max": d_max,
        "d_min": d_min,
    }
    out["scaling_model"] = scaling_model(scaled_expt)
    if integrated is not None:
        out["integrated"] = integrated
    else:
        if integrated_refl is None:
            integrated_refl = os.path.join(
                os.path.dirname(scaled_refl), "integrated.refl"
            )
        if os.path.exists(integrated_refl):
            out["integrated"] = count_integrated(integrated_refl)

    # truth comparison
    merged = unmerged.merge_equivalents(use_internal_variance=False).array()
    merged = merged.select(merged.sigmas() > 0)
    obs, true = merged.common_sets(truth)
    i_obs = np.array(obs.data())
    s_obs = np.array(obs.sigmas())
    i_true = np.array(true.data())
    k = float(np.dot(i_obs, i_true) / np.dot(i_true, i_true))
    z = (i_obs - k * i_true) / s_obs

    # shells of equal reciprocal volume on the complete truth set
    truth.setup_binner(n_bins=TRUTH_SHELLS, d_max=d_max, d_min=d_min)
    binner = truth.binner()
    true_bins = np.array(binner.bin_indices())
    obs.use_binning(binner)
    obs_bins = np.array(obs.binner().bin_indices())
    truth_data = np.array(truth.data())
    shells = []
    weak_all = np.zeros(len(i_obs), dtype=bool)
    for i_bin in binner.range_used():
        d_lo, d_hi = binner.bin_d_range(i_bin)
        in_truth = true_bins == i_bin
        median = (
            float(np.median(truth_data[in_truth])) if in_truth.any() else float("nan")
        )
        sel = obs_bins == i_bin
        weak = sel & (i_true < median)
        weak_all |= weak
        shells.append(
            {
                "d_max": d_lo,
                "d_min": d_hi,
                "n_truth": int(in_truth.sum()),
                "n_matched": int(sel.sum()),
                "n_weak": int(weak.sum()),
                "cc_truth": _pearson(i_obs[sel], i_true[sel]),
                "k_shell": float(
                    np.dot(i_obs[sel], i_true[sel]) / np.dot(i_true[sel], i_true[sel])
                )
                if sel.any()
                else float("nan"),
                # standard errors from the sigmas: of k_shell (least squares),
                # and of <z> from the scatter of z
                "k_shell_se": float(
                    np.sqrt(np.dot(i_true[sel] ** 2, s_obs[sel] ** 2))
                    / np.dot(i_true[sel], i_true[sel])
                )
                if sel.any()
                else float("nan"),
                "weak_mean_z_se": float(np.std(z[weak]) / np.sqrt(weak.sum()))
                if weak.sum() > 1
                else float("nan"),
                # the bias of the weak reflections without their sigmas (which
                # depend on the error model dials.scale fits to each dataset):
                # <I - k I_true> / <k I_true>
                "weak_relative_bias": float(
                    np.mean(i_obs[weak] - k * i_true[weak]) / np.mean(k * i_true[weak])
                )
                if weak.any()
                else float("nan"),
                "weak_mean_z": float(np.mean(z[weak])) if weak.any() else float("nan"),
                "weak_rms_z": float(np.sqrt(np.mean(z[weak] ** 2)))
                if weak.any()
                else float("nan"),
                "weak_mean_i_over_sigma": float(np.mean(i_obs[weak] / s_obs[weak]))
                if weak.any()
                else float("nan"),
                "weak_fraction_negative": float(np.mean(i_obs[weak] < 0))
                if weak.any()
                else float("nan"),
            }
        )
    out["truth"] = {
        "n_matched": int(len(i_obs)),
        "n_truth": int(truth.size()),
        "k": k,
        "cc_truth": _pearson(i_obs, i_true),
        "cc_truth_log": None,
        "weak_mean_z": float(np.mean(z[weak_all])),
        "weak_rms_z": float(np.sqrt(np.mean(z[weak_all] ** 2))),
        "shells": shells,
    }
    return out
