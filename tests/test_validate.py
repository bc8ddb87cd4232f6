"""The validation of issue 5 in small: a simulated sweep processed by DIALS as
truth, truncated and corrected images, checked against the known truth
(dials_truncfix.validate; the full-size table is `make validate`)."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

pytest.importorskip("dials")

from devtools import validate  # noqa: E402

#: Small enough to run in about 3 minutes on 2 cores, large enough to index
#: reliably (512 x 512 is too crowded for dials.index) and to have ~100
#: unique reflections in the highest-resolution shell.
SMALL = dict(image_size=1024, n_images=16, seed=1, nproc=2, d_min=1.3)
# (measured: 3 min 27 s for the whole test on 2 cores)

#: Number of outer truth-comparison shells (of validate.TRUTH_SHELLS) over
#: which the per-shell metrics are averaged: the truncation bias grows with
#: resolution and is negligible below ~1.8 A.
OUTER = 4

pytestmark = pytest.mark.skipif(shutil.which("dials.scale") is None, reason="DIALS programs not on PATH")


def _outer_mean(result, key):
    shells = result["truth"]["shells"][-OUTER:]
    return float(np.mean([s[key] for s in shells]))


def _scale_ratio(result):
    """Mean of k_shell / k over the outer shells: the intensity at high
    resolution relative to the overall scale fitted against the truth."""
    shells = result["truth"]["shells"][-OUTER:]
    return float(np.mean([s["k_shell"] / result["truth"]["k"] for s in shells]))


def check_direction(results):
    """The assertions of the CI test, separate so that they can be applied to
    any validation results ({dataset: validate.statistics dict})."""
    truth, trunc, corr = (results[n] for n in validate.DATASETS)

    # 1. Truncation biases high-resolution intensities low (background pixels
    # gain more than spot pixels when negatives become 0). Measured, mean
    # k_shell/k of the 4 outer shells: 1024x24 images 0.79 truncated, 0.94
    # truth, 0.96 corrected; 2048x90 0.85, 0.95, 0.94. A margin of 0.04 is far
    # from the shell-to-shell noise (~0.01).
    t, u, c = (_scale_ratio(r) for r in (truth, trunc, corr))
    assert t - u > 0.04, (t, u, c)
    # correction removes most of it (measured >80%); ask for half
    assert abs(c - t) < 0.5 * abs(u - t), (t, u, c)

    # 2. The weak reflections (true I below the shell median) are biased low
    # by truncation; corrected ones are closer to the truth processing.
    t, u, c = (_outer_mean(r, "weak_mean_z") for r in (truth, trunc, corr))
    assert u < t, (t, u, c)
    assert abs(c - t) < abs(u - t), (t, u, c)

    # (Not asserted: rms(z) of the weak reflections. Truncation lowers it in
    # the outermost shells, but dials.scale fits a different error model to
    # each version and the corrected rms(z) overshoots the truth processing
    # at full size: 0.93 against 0.74, truncated 0.58.)

    # (Not asserted: <I/sigI> of the highest-resolution merging shell.
    # Truncation lowers it and correction moves it towards the truth at
    # 1024x24 (truth/truncated/corrected 0.45/0.27/0.37) and 2048x90
    # (1.14/0.87/1.27), but at 1024x16 the corrected value overshoots
    # (0.40/0.34/0.74): the shell holds ~100 unique reflections and the
    # sigmas depend on the error model dials.scale fits to each version.)

    # Not asserted (see benchmarks/results/validation.md): Rmerge, CC1/2 and
    # CC with the truth of the outer shell, where truncated data look better
    # than the truth (clipped noise) and corrected data are not closer; the
    # numbers of observations, which truncation does not change in DIALS.


@pytest.mark.slow
def test_small_validation(tmp_path):
    start = time.time()
    results, info = validate.run_validation(str(tmp_path / "work"), **SMALL)
    elapsed = time.time() - start

    for name in validate.DATASETS:
        r = results[name]
        assert r["overall"]["n_obs"] > 10000, name
        assert r["truth"]["cc_truth"] > 0.99, name
        assert r["highest_shell"]["n_uniq"] > 30, name

    text = validate.report(results, info, "test")
    assert "| <I/sigI> |" in text and "What improves" in text
    (tmp_path / "validation.md").write_text(text)
    (tmp_path / "results.json").write_text(json.dumps(results))

    check_direction(results)
    # the budget of the issue is 5 minutes for the whole test on 2 cores
    print("small validation took %.0f s" % elapsed)
