"""The numerical core: shells, fit, assignment, offset (no DIALS involved)."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from devtools.synthetic import (
    draw_true_values,
    falling_parameters,
    radial_inv_d2,
    truncate,
)
from dials_truncfix.core import correction, shells
from dials_truncfix.core.assignment import TABLE_SIZE, slot_ends, value_distribution
from dials_truncfix.core.correction import correct_image
from dials_truncfix.core.lognormal import (
    Distribution,
    fit_lognormal,
    parameter_covariance,
    standard_errors,
)
from dials_truncfix.core.parameters import CorrectionParameters
from dials_truncfix.core.shells import INVALID, ShellError, build_shell_map

N_SHELLS = 6


def _parameters(fit):
    """(location, scale, shape) of a fit, the parameters it is fitted in."""
    return np.array([fit.location, fit.scale, fit.shape])


def _lognormal(theta, mu, sigma):
    """(location, scale, shape) of the paper's lognormal (theta, mu, sigma)."""
    d = Distribution.from_lognormal(theta, mu, sigma)
    return np.array([d.location, d.scale, d.shape])


@pytest.fixture(scope="module")
def scene():
    """A 1024x1024 truncated image with per-shell known truth and a beam-stop
    shadow; about 10^6 pixels of which ~3.5 x 10^5 are truncated."""
    shape = (1024, 1024)
    inv_d2 = radial_inv_d2(shape, centre=(530.0, 490.0))
    valid = np.ones(shape, dtype=bool)
    valid[480:500, :530] = False  # beam-stop arm
    shell_map = build_shell_map([inv_d2], [valid], N_SHELLS)
    truth = falling_parameters(N_SHELLS)
    rng = np.random.default_rng(20161029)
    true_values = draw_true_values(shell_map.labels.reshape(shape), truth, rng)
    image = truncate(true_values)
    image[~valid] = 0  # masked pixels hold junk zeros that must stay
    return {
        "shape": shape,
        "shell_map": shell_map,
        "truth": truth,
        "true": true_values,
        "image": image,
        "valid": valid,
    }


def _sampled_histogram(image, shell_map, region, imax):
    """(H(0..imax), pixels above) of the region's pixels the fit saw: the
    map's fixed subsample of every s-th pixel."""
    stride = shell_map.histogram_sample()[0]
    observed = (
        np.asarray(image)
        .ravel()[::stride][shell_map.labels[::stride] == region]
        .astype(int)
    )
    hist = np.bincount(np.minimum(observed, imax + 1), minlength=imax + 2)
    return hist[:-1], hist[-1]


def _fit_histogram(values, quantile=0.99):
    counts = np.clip(np.rint(values), 0, None).astype(int)
    imax = int(np.quantile(counts, quantile))
    h = np.bincount(np.minimum(counts, imax + 1), minlength=imax + 2)
    return h[:-1], int(h[-1])


@pytest.mark.parametrize(
    "theta, mu, sigma",
    [(-20.0, 3.2, 0.35), (-8.0, 1.8, 0.55), (-3.0, 1.0, 0.8), (-0.2, 0.5, 1.0)],
)
def test_exact_fit_recovers_truth_within_standard_errors(theta, mu, sigma):
    """n = 2 x 10^5 draws: the ML estimate lies within 4.5 asymptotic standard
    errors (from the observed information at this n) of the truth."""
    rng = np.random.default_rng(7)
    values = theta + np.exp(mu + sigma * rng.standard_normal(200_000))
    hist, n_above = _fit_histogram(values)
    fit = fit_lognormal(hist, n_above, "exact")
    assert fit.converged
    assert fit.model == "lognormal"
    se = standard_errors(hist, n_above, fit)
    z = (_parameters(fit) - _lognormal(theta, mu, sigma)) / se
    assert np.all(np.abs(z) < 4.5), (z, se)
    # the paper's parameters, as the fit reports them
    assert np.allclose(
        [fit.theta, fit.mu, fit.sigma], [theta, mu, sigma], rtol=0.2, atol=0.2
    )
    # and the fitted histogram matches the observed one to within counting noise
    expected = fit.distribution.bin_probabilities(len(hist) - 1)[:-1] * 200_000
    assert fit.rmsd < 3 * np.sqrt(expected.max())


def test_paper_versus_exact_bias_on_the_same_data():
    """Equation (4) ignores the mass above Imax: over 8 repeats its bias in
    the scale and the shape is many standard errors, the exact likelihood's
    is not."""
    theta, mu, sigma = -12.0, 2.6, 0.45
    rng = np.random.default_rng(11)
    estimates = {"exact": [], "paper": []}
    for _ in range(8):
        values = theta + np.exp(mu + sigma * rng.standard_normal(100_000))
        hist, n_above = _fit_histogram(values, quantile=0.99)
        for likelihood in estimates:
            fit = fit_lognormal(hist, n_above, likelihood)
            assert fit.converged
            estimates[likelihood].append(_parameters(fit))
    se = standard_errors(hist, n_above, fit_lognormal(hist, n_above, "exact"))
    bias = {
        k: np.mean(v, axis=0) - _lognormal(theta, mu, sigma)
        for k, v in estimates.items()
    }
    print(
        "bias (location, scale, shape): exact",
        bias["exact"],
        "paper",
        bias["paper"],
        "se of one fit",
        se,
    )
    # the mean of 8 fits has standard error se / sqrt(8)
    assert np.all(np.abs(bias["exact"]) < 4 * se / np.sqrt(8))
    assert np.all(np.abs(bias["paper"][1:]) > 10 * se[1:] / np.sqrt(8))
    assert np.all(np.abs(bias["paper"]) > np.abs(bias["exact"]))


def test_shells_have_equal_counts_and_increasing_resolution(scene):
    shell_map = scene["shell_map"]
    assert shell_map.n_shells == N_SHELLS
    assert (
        shell_map.n_valid.max() - shell_map.n_valid.min()
        <= 0.01 * shell_map.n_valid.mean()
    )
    assert np.all(shell_map.d_min[:-1] >= shell_map.d_max[1:])
    assert np.all(shell_map.labels.reshape(scene["shape"])[~scene["valid"]] == INVALID)


def test_shell_parameters_recovered_on_an_image(scene):
    params = CorrectionParameters(n_shells=N_SHELLS)
    result = correct_image([scene["image"]], scene["shell_map"], params, "scene")
    truth = scene["truth"]
    assert result.status == correction.CORRECTED
    for shell in result.shells:
        fit = shell.fit
        assert fit.converged
        # standard errors from the very histogram the fit used
        se = standard_errors(
            *_sampled_histogram(
                scene["image"], scene["shell_map"], shell.shell, shell.imax
            ),
            fit,
        )
        true = _lognormal(
            truth.theta[shell.shell], truth.mu[shell.shell], truth.sigma[shell.shell]
        )
        z = (_parameters(fit) - true) / se
        assert np.all(np.abs(z) < 4.5), (shell.shell, z)


def test_positive_and_masked_pixels_bit_identical(scene):
    params = CorrectionParameters(n_shells=N_SHELLS)
    image = scene["image"]
    before = image.copy()
    out = correct_image([image], scene["shell_map"], params, "scene").data[0]
    assert np.array_equal(image, before), "input modified"
    positive = image > 0
    assert np.array_equal(out[positive], image[positive])
    assert np.array_equal(out[~scene["valid"]], image[~scene["valid"]])
    assert out.max() == image.max() and np.all(out[image == 0] <= 0)


def test_assigned_values_are_draws_from_the_fitted_distribution(scene):
    """Per shell, the counts of each value given to the zero pixels against
    n_zero P(v) / F(0.5) of the fit (in steps of 1/65536): a chi-square
    goodness of fit over all shells (bins of fewer than 5 expected pixels
    pooled into the tail); and what each shell reports matches its pixels."""
    params = CorrectionParameters(n_shells=N_SHELLS)
    result = correct_image([scene["image"]], scene["shell_map"], params, "scene")
    out = result.data[0].ravel()
    labels = scene["shell_map"].labels
    image = scene["image"].ravel()
    chi2, dof = 0.0, 0
    for shell in result.shells:
        former_zero = (labels == shell.shell) & (image == 0)
        assert former_zero.sum() == shell.n_zero
        given = out[former_zero]
        assert (
            shell.n_changed == np.count_nonzero(given)
            and shell.min_value == given.min()
        )
        fit = shell.fit
        values, p, _ = value_distribution(
            "distribution", shell.n_zero, fit.distribution
        )
        p = np.diff(slot_ends(p), prepend=0) / TABLE_SIZE
        assert np.all(np.isin(given, values[p > 0]))
        observed = np.array([(given == v).sum() for v in values])
        expected = shell.n_zero * p
        keep = np.flatnonzero(expected >= 5)
        tail = slice(keep[-1] + 1, None)
        o = np.append(observed[keep], observed[tail].sum())
        e = np.append(expected[keep], expected[tail].sum())
        o, e = (o, e) if e[-1] > 0 else (o[:-1], e[:-1])
        chi2 += float(((o - e) ** 2 / e).sum())
        dof += len(o) - 1
    p_value = stats.chi2.sf(chi2, dof)
    print(f"chi2 {chi2:.1f} on {dof} d.o.f., p {p_value:.3f}")
    assert p_value > 0.001


def test_lookup_draws_are_uniform_over_the_slots_and_positions():
    """The 16-bit draws: each value's frequency matches its slots' share
    within multinomial noise, and the value does not depend on the position
    (chi-square test of independence between position block and value)."""
    from dials_truncfix.core.assignment import image_rng, uniform_slots

    probabilities = np.array([0.1, 0.25, 0.3, 0.2, 0.1, 0.045, 0.005])
    ends = slot_ends(probabilities)
    assert ends[-1] == TABLE_SIZE and np.all(
        np.abs(ends / TABLE_SIZE - np.cumsum(probabilities)) <= 0.5 / TABLE_SIZE
    )
    slots = uniform_slots(image_rng(0, "draws"), 300_001)
    assert slots.dtype == np.uint16 and len(slots) == 300_001
    value = np.searchsorted(ends, slots, side="right")
    counts = np.bincount(value, minlength=len(probabilities))
    _, p = stats.chisquare(counts, len(slots) * np.diff(ends, prepend=0) / TABLE_SIZE)
    assert p > 0.001
    table = np.array(
        [
            np.bincount(block, minlength=len(probabilities))
            for block in np.array_split(value, 20)
        ]
    )
    _, p, _, _ = stats.chi2_contingency(table)
    assert p > 0.001
    assert np.array_equal(slots, uniform_slots(image_rng(0, "draws"), 300_001))
    assert not np.array_equal(slots, uniform_slots(image_rng(1, "draws"), 300_001))


def _conditional_bin_probabilities(edges, location, scale, shape):
    """P(value in each bin | value < 0.5) for bins given by descending edges."""
    d = Distribution(location, scale, shape)
    upper = d.cdf(edges[:-1])
    lower = d.cdf(edges[1:])
    return (upper - lower) / d.cdf([0.5])[0]


def test_assigned_values_follow_the_true_truncated_values(scene):
    """Goodness of fit, on > 10^5 pixels, of the values given to the former
    zero pixels against the true (rounded) values of the same pixels.

    Per shell, D = assigned - true counts in bins of the value.  Given the
    number of zeros, the true counts are multinomial and independent of the
    fit, whose parameter error enters through the delta method, and the
    assigned counts are multinomial given the fit (independent draws), so
    Cov(D) = 2 n (diag p - p p') + J Cov(fit) J' and D' Cov(D)^-1 D summed
    over shells is chi-square distributed.  The
    linearisation breaks down when most of a shell is truncated and the
    support edge theta is extrapolated far below the observed counts: shells
    more than 70% truncated (here the two outermost, 73%) are left out."""
    params = CorrectionParameters(n_shells=N_SHELLS)
    result = correct_image([scene["image"]], scene["shell_map"], params, "scene")
    labels = scene["shell_map"].labels.reshape(scene["shape"])
    truth = scene["truth"]
    chi2_total, dof_total, n_pixels, n_shells_tested = 0.0, 0, 0, 0
    for shell in result.shells:
        former_zero = (labels == shell.shell) & (scene["image"] == 0)
        assigned = result.data[0][former_zero]
        true = np.rint(scene["true"][former_zero]).astype(int)
        n = int(former_zero.sum())
        fit = shell.fit
        sigma_fit = parameter_covariance(
            *_sampled_histogram(
                scene["image"], scene["shell_map"], shell.shell, shell.imax
            ),
            fit,
        )
        if shell.zero_fraction > 0.7:
            print(
                f"shell {shell.shell}: {shell.zero_fraction:.0%} truncated, not tested"
            )
            continue
        n_pixels += n
        n_shells_tested += 1
        t = _lognormal(
            truth.theta[shell.shell], truth.mu[shell.shell], truth.sigma[shell.shell]
        )
        # bins v = 0, -1, ... while the expected true count is >= 20; the last takes the tail
        v_lo = 0
        while (
            n
            * _conditional_bin_probabilities(np.array([v_lo - 0.5, v_lo - 1.5]), *t)[0]
            >= 20
        ):
            v_lo -= 1
        edges = np.concatenate((np.arange(0.5, v_lo - 0.5, -1.0), [-np.inf]))
        p_true = _conditional_bin_probabilities(edges, *t)
        count = lambda x: np.histogram(-x, -edges)[0]  # noqa: E731  (edges descend)
        d = (count(assigned) - count(true)).astype(float)
        jac = np.empty((len(p_true), 3))
        for k in range(3):
            step = np.zeros(3)
            step[k] = 1e-5
            p = _parameters(fit)
            jac[:, k] = (
                n
                * (
                    _conditional_bin_probabilities(edges, *(p + step))
                    - _conditional_bin_probabilities(edges, *(p - step))
                )
                / 2e-5
            )
        cov = (
            2 * n * (np.diag(p_true) - np.outer(p_true, p_true))
            + jac @ sigma_fit @ jac.T
        )
        # the counts sum to n on both sides: drop one bin
        chi2 = float(d[:-1] @ np.linalg.solve(cov[:-1, :-1], d[:-1]))
        chi2_total += chi2
        dof_total += len(d) - 1
    p_value = stats.chi2.sf(chi2_total, dof_total)
    print(
        f"{n_pixels} pixels, {dof_total} d.o.f., chi2 {chi2_total:.1f}, p {p_value:.3f}"
    )
    assert n_pixels >= 100_000 and n_shells_tested >= N_SHELLS - 2
    assert p_value > 0.001


@pytest.mark.parametrize("mode", ["distribution", "expectation"])
def test_same_result_in_another_process_and_any_order(scene, tmp_path, mode):
    """The pixels depend on the image, the settings, the seed and the image's
    identity only: another process correcting the images in the other order
    gives the same bytes; another seed gives other draws from the same fits."""
    params = CorrectionParameters(n_shells=N_SHELLS, seed=42, assignment=mode)
    first = correct_image([scene["image"]], scene["shell_map"], params, "img_0001")
    other = correct_image(
        [scene["image"][::-1].copy()], scene["shell_map"], params, "img_0002"
    )
    again = correct_image([scene["image"]], scene["shell_map"], params, "img_0001")
    assert np.array_equal(first.data[0], again.data[0])
    np.save(tmp_path / "image.npy", scene["image"])
    np.save(
        tmp_path / "inv_d2.npy", radial_inv_d2(scene["shape"], centre=(530.0, 490.0))
    )
    np.save(tmp_path / "valid.npy", scene["valid"])
    code = f"""
import hashlib, numpy as np
from dials_truncfix.core.shells import build_shell_map
from dials_truncfix.core.correction import correct_image
from dials_truncfix.core.parameters import CorrectionParameters
d = {str(tmp_path)!r}
sm = build_shell_map([np.load(d + '/inv_d2.npy')], [np.load(d + '/valid.npy')], {N_SHELLS})
params = CorrectionParameters(n_shells={N_SHELLS}, seed=42, assignment={mode!r})
image = np.load(d + '/image.npy')
second = correct_image([image[::-1].copy()], sm, params, 'img_0002')
first = correct_image([image], sm, params, 'img_0001')
print(hashlib.sha256(first.data[0].tobytes()).hexdigest(), hashlib.sha256(second.data[0].tobytes()).hexdigest())
"""
    digests = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.split()
    assert digests == [
        hashlib.sha256(r.data[0].tobytes()).hexdigest() for r in (first, other)
    ]
    # another seed: other draws, the same positive pixels and the same fits
    moved = correct_image(
        [scene["image"]],
        scene["shell_map"],
        CorrectionParameters(n_shells=N_SHELLS, seed=43, assignment=mode),
        "img_0001",
    )
    assert not np.array_equal(moved.data[0], first.data[0])
    positive = scene["image"] > 0
    assert np.array_equal(moved.data[0][positive], first.data[0][positive])
    assert [s.fit for s in moved.shells] == [s.fit for s in first.shells]
    assert other.status == correction.CORRECTED


def test_damaged_rows_and_columns_are_left_alone(scene):
    """A file cut short (its last rows read as 0) and a dead column: those
    pixels are neither fitted nor changed; the rest is corrected as if they
    were masked."""
    params = CorrectionParameters(n_shells=N_SHELLS)
    image = scene["image"].copy()
    image[900:] = 0
    image[:, 17] = 0
    result = correct_image([image], scene["shell_map"], params, "cut")
    assert (
        result.status == correction.CORRECTED
        and result.damaged == "rows 900-1023 and columns 17"
    )
    out = result.data[0]
    assert (out[900:] == 0).all() and (out[:, 17] == 0).all()
    assert (out[:900] < 0).sum() > 100000
    lost = np.zeros(scene["shape"], bool)
    lost[900:] = lost[:, 17] = True
    labels = scene["shell_map"].labels
    expected = np.bincount(labels[(labels >= 0) & ~lost.ravel()], minlength=N_SHELLS)
    assert [s.n_valid for s in result.shells] == expected.tolist()
    blank = correct_image(
        [np.zeros(scene["shape"], np.uint16)], scene["shell_map"], params, "blank"
    )
    assert blank.status == correction.BLANK and blank.n_changed == 0
    intact = correct_image([scene["image"]], scene["shell_map"], params, "intact")
    assert intact.damaged == ""


def _rounded_conditional_mean(d):
    """E[round(X) | X < 0.5] summed over every integer down to the support's
    end (12 standard deviations below the location for a normal)."""
    v = np.arange(0, np.floor(max(d.theta, d.location - 12 * d.scale)) - 1, -1)
    p = d.cdf(v + 0.5) - d.cdf(v - 0.5)
    return float(np.dot(v, p) / d.cdf([0.5])[0])


@pytest.mark.parametrize(
    "n_zero, distribution",
    [
        (1, Distribution.from_lognormal(-3.0, 1.0, 0.8)),
        (7, Distribution.from_lognormal(-0.2, 0.5, 1.0)),
        (10_000, Distribution.from_lognormal(-20.0, 3.2, 0.35)),
        (123_457, Distribution.from_lognormal(-8.0, 1.8, 0.55)),
        (500, Distribution.from_lognormal(0.4, -3.0, 0.3)),
        (10_000, Distribution(-1.5, 1.65, 0.0)),
        (50_000, Distribution(2.5, 1.6, 0.0)),
    ],
)
def test_expectation_draws_two_neighbouring_values_with_mean_m(n_zero, distribution):
    values, probabilities, mean = value_distribution(
        "expectation", n_zero, distribution
    )
    # m is the conditional mean of the rounded values below 0.5 (the tail
    # the assignment lumps together holds < 0.01 expected pixels)
    assert mean == pytest.approx(
        _rounded_conditional_mean(distribution), abs=0.05 / n_zero + 1e-9
    )
    assert values.tolist() == [math.floor(mean) + 1, math.floor(mean)] and np.all(
        values[1:] <= 0
    )
    assert np.all(probabilities >= 0) and probabilities.sum() == pytest.approx(
        1, abs=1e-15
    )
    assert np.dot(values, probabilities) == pytest.approx(mean, abs=1e-12)
    # in steps of 1/65536 the expectation moves by at most half a step
    steps = np.diff(slot_ends(probabilities), prepend=0) / TABLE_SIZE
    assert abs(np.dot(values, steps) - mean) <= 0.5 / TABLE_SIZE
    # the same m as the distribution mode's values, and the same probabilities
    d_values, d_probabilities, d_mean = value_distribution(
        "distribution", n_zero, distribution
    )
    assert d_mean == mean and d_probabilities.sum() == pytest.approx(1)


def _within_binomial_noise(given, mean, n_sd=4.5):
    """|sum - n m| within n_sd standard deviations of independent draws of
    floor(m) + 1 with probability f = m - floor(m), plus the slot rounding."""
    n, f = given.size, mean - math.floor(mean)
    return (
        abs(given.sum() - n * mean)
        <= n_sd * math.sqrt(n * f * (1 - f)) + n * 0.5 / TABLE_SIZE + 1e-9
    )


@pytest.fixture(scope="module")
def by_mode(scene):
    """The scene corrected in both assignment modes."""
    return {
        mode: correct_image(
            [scene["image"]],
            scene["shell_map"],
            CorrectionParameters(n_shells=N_SHELLS, assignment=mode),
            "scene",
        )
        for mode in ("distribution", "expectation")
    }


def test_expectation_mode_on_an_image(scene, by_mode):
    result = by_mode["expectation"]
    labels = scene["shell_map"].labels.reshape(scene["shape"])
    image = scene["image"]
    out = result.data[0]
    positive = image > 0
    assert np.array_equal(out[positive], image[positive])
    assert np.array_equal(out[~scene["valid"]], image[~scene["valid"]])
    for shell in result.shells:
        given = out[(labels == shell.shell) & (image == 0)].astype(np.int64)
        assert (
            shell.assignment == "expectation"
            and shell.as_dict()["conditional_mean"] == shell.conditional_mean
        )
        assert (
            shell.conditional_mean
            == by_mode["distribution"].shells[shell.shell].conditional_mean
        )
        assert np.all(given <= 0) and np.ptp(given) == 1
        assert set(np.unique(given)) <= {
            math.floor(shell.conditional_mean),
            math.floor(shell.conditional_mean) + 1,
        }
        assert _within_binomial_noise(given, shell.conditional_mean)
        assert shell.min_value == given.min() and shell.n_changed == np.count_nonzero(
            given
        )


def test_expectation_mode_is_deterministic_and_keyed(scene, by_mode):
    params = CorrectionParameters(n_shells=N_SHELLS, assignment="expectation")
    again = correct_image([scene["image"]], scene["shell_map"], params, "scene")
    other = correct_image([scene["image"]], scene["shell_map"], params, "another image")
    first = by_mode["expectation"].data[0]
    assert np.array_equal(again.data[0], first)
    assert not np.array_equal(other.data[0], first)
    zero = scene["image"] == 0
    assert np.array_equal(other.data[0][~zero], first[~zero])


def test_given_values_match_the_true_values_on_average_and_expectation_has_less_error(
    scene, by_mode
):
    """Per shell, the mean of the values given to the zero pixels against the
    mean of their true (rounded) values: their difference has the variance
    of the true values' mean (s^2 / n), plus that of the given values' mean
    (independent draws given the fit: their variance / n), plus that of the
    fitted m (delta method through the fit's covariance), and must lie
    within 4 standard deviations.  The expectation mode gives each pixel
    the conditional mean (to within a draw between its two neighbouring
    integers), so its mean squared error is about the true values'
    variance, while the distribution mode's independent draws double it."""
    labels = scene["shell_map"].labels.reshape(scene["shape"])
    image = scene["image"]
    for shell in by_mode["expectation"].shells:
        zero = (labels == shell.shell) & (image == 0)
        true = np.rint(scene["true"][zero])
        n = true.size
        fit = shell.fit
        covariance = parameter_covariance(
            *_sampled_histogram(image, scene["shell_map"], shell.shell, shell.imax), fit
        )
        p = _parameters(fit)
        gradient = np.empty(3)
        for k in range(3):
            step = np.zeros(3)
            step[k] = 1e-5
            up = value_distribution("expectation", n, Distribution(*(p + step)))[2]
            down = value_distribution("expectation", n, Distribution(*(p - step)))[2]
            gradient[k] = (up - down) / 2e-5
        mse = {}
        for mode, result in by_mode.items():
            given = result.data[0][zero].astype(float)
            sd = np.sqrt(
                true.var() / n + given.var() / n + gradient @ covariance @ gradient
            )
            z = (given.mean() - true.mean()) / sd
            print(
                f"shell {shell.shell} {mode}: mean given {given.mean():.3f} true {true.mean():.3f} z {z:.2f}"
            )
            assert abs(z) < 4, (shell.shell, mode, z)
            mse[mode] = np.mean((given - true) ** 2)
        print(f"shell {shell.shell}: mse {mse}, true variance {true.var():.2f}")
        assert mse["expectation"] < 0.75 * mse["distribution"]


# --- azimuthal sectors -----------------------------------------------------------


def _centred_detector(size):
    """1/d^2 and azimuth (radians) of a square detector with the beam at its centre."""
    inv_d2 = radial_inv_d2((size, size), centre=(size / 2, size / 2))
    slow, fast = np.mgrid[0:size, 0:size] + 0.5 - size / 2
    return inv_d2, np.arctan2(slow, fast)


@pytest.mark.parametrize("n_sectors", [4, 6])
def test_sectors_of_equal_angle_have_equal_area(n_sectors):
    """Inside a circular mask every shell is a full annulus: its sectors hold
    equal numbers of pixels up to the pixels cut by their edges, and each
    pixel's azimuth lies in its sector's range."""
    size = 400
    inv_d2, azimuth = _centred_detector(size)
    slow, fast = np.mgrid[0:size, 0:size] + 0.5 - size / 2
    valid = np.hypot(slow, fast) < 190
    shell_map = build_shell_map(
        [inv_d2],
        [valid],
        5,
        min_pixels_per_shell=100,
        azimuth=[azimuth],
        n_sectors=n_sectors,
    )
    assert shell_map.n_shells == 5 and shell_map.n_regions == 5 * n_sectors
    assert np.array_equal(shell_map.shell, np.repeat(np.arange(5), n_sectors))
    assert np.array_equal(shell_map.sector, np.tile(np.arange(n_sectors), 5))
    counts = shell_map.n_valid.reshape(5, n_sectors)
    # the edges cut about one pixel per unit of their length (shell width ~ 38 pixels)
    assert np.all(np.abs(counts - counts.mean(axis=1, keepdims=True)) <= 60), counts
    labels = shell_map.labels.reshape(size, size)
    turns = np.mod(azimuth, 2 * np.pi) / (2 * np.pi) * n_sectors
    assert np.all(shell_map.sector[labels[valid]] == np.floor(turns[valid]))
    assert np.all(labels[~valid] == INVALID)
    # the shells themselves are those of the map without sectors
    annuli = build_shell_map([inv_d2], [valid], 5, min_pixels_per_shell=100)
    assert np.array_equal(
        shell_map.shell[labels[valid]], annuli.labels.reshape(size, size)[valid]
    )


def test_one_sector_is_the_map_without_sectors(scene):
    inv_d2 = radial_inv_d2(scene["shape"], centre=(530.0, 490.0))
    with_azimuth = build_shell_map(
        [inv_d2],
        [scene["valid"]],
        N_SHELLS,
        azimuth=[np.zeros(scene["shape"])],
        n_sectors=1,
    )
    assert np.array_equal(with_azimuth.labels, scene["shell_map"].labels)
    assert np.array_equal(with_azimuth.n_valid, scene["shell_map"].n_valid)
    with pytest.raises(ValueError, match="azimuth"):
        build_shell_map([inv_d2], [scene["valid"]], N_SHELLS, n_sectors=2)
    with pytest.raises(ValueError, match="n_sectors=3"):
        correct_image(
            [scene["image"]],
            scene["shell_map"],
            CorrectionParameters(n_shells=N_SHELLS, n_sectors=3),
            "x",
        )


N_SECTORS = 4
#: theta of each sector relative to its shell's falling parameters: the
#: background is brighter on one side of the beam than on the other
SECTOR_THETA_SHIFT = np.array([-4.0, 0.0, 4.0, 0.0])


@pytest.fixture(scope="module")
def sector_scene():
    """A 1024x1024 image (beam at the centre, 4 shells x 4 sectors) whose
    background varies with azimuth: each region has its own truth."""
    size, n_shells = 1024, 4
    inv_d2, azimuth = _centred_detector(size)
    valid = np.ones((size, size), dtype=bool)
    valid[500:524, :500] = False  # beam-stop arm
    shell_map = build_shell_map(
        [inv_d2], [valid], n_shells, azimuth=[azimuth], n_sectors=N_SECTORS
    )
    shells = falling_parameters(n_shells)
    truth = type(shells)(
        theta=np.add.outer(shells.theta, SECTOR_THETA_SHIFT).ravel(),
        mu=np.repeat(shells.mu, N_SECTORS),
        sigma=np.repeat(shells.sigma, N_SECTORS),
    )
    true = draw_true_values(
        shell_map.labels.reshape(size, size), truth, np.random.default_rng(4)
    )
    image = truncate(true)
    image[~valid] = 0
    annuli = build_shell_map([inv_d2], [valid], n_shells)
    return {
        "shell_map": shell_map,
        "annuli": annuli,
        "truth": truth,
        "image": image,
        "valid": valid,
        "n_shells": n_shells,
    }


def _z_scores(image, shell_map, region, fit, imax, truth_parameters):
    """(fit - truth) / standard error, from the histogram the fit used."""
    se = standard_errors(*_sampled_histogram(image, shell_map, region, imax), fit)
    return (_parameters(fit) - truth_parameters) / se


def _truncated_fraction(location, scale, shape):
    return float(Distribution(location, scale, shape).cdf([0.5])[0])


def test_sector_fits_recover_each_sectors_truth_where_the_annulus_fit_cannot(
    sector_scene, monkeypatch
):
    """Each region's fit lies within 4.5 standard errors of its own truth, and
    the fraction F(0.5) below 0.5 it implies within 4 binomial standard
    errors of the true one; the fit of the whole annulus, given every pixel
    (not the usual subsample) so that it is as precise as it can be, misses
    the darkest or the brightest sector's truth by more than 4.5 standard
    errors and their truncated fractions by more than 0.1."""
    sc = sector_scene
    params = CorrectionParameters(n_shells=sc["n_shells"], n_sectors=N_SECTORS)
    result = correct_image([sc["image"]], sc["shell_map"], params, "sectors")
    truth = sc["truth"]
    true_parameters = np.array(
        [_lognormal(*t) for t in zip(truth.theta, truth.mu, truth.sigma)]
    )
    true_fraction = np.array([_truncated_fraction(*t) for t in true_parameters])
    assert len(result.shells) == sc["n_shells"] * N_SECTORS
    for region, r in enumerate(result.shells):
        assert (r.shell, r.sector) == (region // N_SECTORS, region % N_SECTORS)
        assert r.as_dict()["sector"] == r.sector and r.fitted_regions == (
            (r.shell, r.sector),
        )
        assert r.fit.converged
        z = _z_scores(
            sc["image"], sc["shell_map"], region, r.fit, r.imax, true_parameters[region]
        )
        assert np.all(np.abs(z) < 4.5), (region, z)
        p = true_fraction[region]
        fraction = _truncated_fraction(*_parameters(r.fit))
        assert abs(fraction - p) < 4 * np.sqrt(p * (1 - p) / r.n_valid), (
            region,
            fraction,
            p,
        )
    annuli = dataclasses.replace(sc["annuli"], _sample=None)
    monkeypatch.setattr(shells, "MIN_SAMPLED_PIXELS", int(annuli.n_valid.max()) + 1)
    annulus = correct_image(
        [sc["image"]], annuli, CorrectionParameters(n_shells=sc["n_shells"]), "sectors"
    )
    assert annuli.histogram_sample()[0] == 1
    for shell in annulus.shells:
        darkest, brightest = shell.shell * N_SECTORS + np.array([0, 2])
        worst = max(
            np.abs(
                _z_scores(
                    sc["image"],
                    annuli,
                    shell.shell,
                    shell.fit,
                    shell.imax,
                    true_parameters[k],
                )
            ).max()
            for k in (darkest, brightest)
        )
        assert worst > 4.5, (shell.shell, worst)
        fraction = _truncated_fraction(*_parameters(shell.fit))
        assert (
            min(true_fraction[darkest] - fraction, fraction - true_fraction[brightest])
            > 0.1
        )


def test_sector_correction_keeps_positive_and_masked_pixels(sector_scene):
    sc = sector_scene
    for mode in ("distribution", "expectation"):
        params = CorrectionParameters(
            n_shells=sc["n_shells"], n_sectors=N_SECTORS, assignment=mode
        )
        out = correct_image([sc["image"]], sc["shell_map"], params, "sectors").data[0]
        positive = sc["image"] > 0
        assert np.array_equal(out[positive], sc["image"][positive])
        assert np.array_equal(out[~sc["valid"]], sc["image"][~sc["valid"]])
        assert np.all(out[sc["image"] == 0] <= 0) and np.count_nonzero(out < 0) > 0


def _forced_fit_failures(monkeypatch, failing):
    """Make the fits correct_image asks for fail where ``failing(call,
    position)`` says so (call: the how-manieth request, 0-based; position:
    the histogram's place in it).  Returns the pixel counts of the
    histograms of each request."""
    requests = []
    real = correction.fit_lognormals

    def flaky(problems, likelihood):
        requests.append([int(np.sum(hist) + n_above) for hist, n_above in problems])
        fits = real(problems, likelihood)
        return [
            dataclasses.replace(fit, converged=False, message="forced")
            if failing(len(requests) - 1, k)
            else fit
            for k, fit in enumerate(fits)
        ]

    monkeypatch.setattr(correction, "fit_lognormals", flaky)
    return requests


def test_failed_sector_fit_merges_with_the_neighbouring_sector_first(
    sector_scene, monkeypatch
):
    # region (0, 0) fails, alone (in the first request, of every region) and pooled with sector 3
    requests = _forced_fit_failures(
        monkeypatch, lambda call, k: (call, k) in ((0, 0), (1, 0))
    )
    sc = sector_scene
    params = CorrectionParameters(n_shells=sc["n_shells"], n_sectors=N_SECTORS)
    result = correct_image([sc["image"]], sc["shell_map"], params, "merge")
    n_valid = sc["shell_map"].n_valid
    assert requests[0][0] == n_valid[0] and len(requests[0]) == len(n_valid)
    assert requests[1:3] == [[n_valid[0] + n_valid[3]], [n_valid[0] + n_valid[1]]]
    assert result.shells[0].fitted_regions == ((0, 0), (0, 1))
    assert result.shells[0].status == correction.CORRECTED


# --- bad and unusual input ----------------------------------------------------


def test_no_zero_pixels_returns_the_input_untouched(scene):
    image = scene["image"] + 1
    result = correct_image(
        [image], scene["shell_map"], CorrectionParameters(n_shells=N_SHELLS), "x"
    )
    assert result.status == correction.NO_ZEROS
    assert result.data[0] is image


def test_float_and_signed_images_pass_through(scene):
    shell_map = scene["shell_map"]
    params = CorrectionParameters(n_shells=N_SHELLS)
    fractional = scene["image"].astype(float) + 0.25
    r = correct_image([fractional], shell_map, params, "f")
    assert r.status == correction.NOT_TRUNCATED_FLOAT and r.data[0] is fractional
    signed = scene["image"].astype(np.int32) - 3
    r = correct_image([signed], shell_map, params, "s")
    assert r.status == correction.NOT_TRUNCATED_NEGATIVE and r.data[0] is signed
    # integer-valued floats (as MRC stacks are read) are corrected, staying float
    r = correct_image([scene["image"].astype(float)], shell_map, params, "i")
    assert r.status == correction.CORRECTED and r.data[0].dtype == np.float64
    ints = correct_image([scene["image"]], shell_map, params, "i")
    assert np.array_equal(r.data[0], ints.data[0])


def test_all_zero_image_is_left_unchanged_with_a_notice(scene, caplog):
    image = np.zeros(scene["shape"], np.uint16)
    with caplog.at_level("INFO"):
        result = correct_image(
            [image], scene["shell_map"], CorrectionParameters(n_shells=N_SHELLS), "zero"
        )
    assert np.array_equal(result.data[0], image)
    assert result.status == correction.BLANK and "blank or damaged" in caplog.text


def test_a_shell_of_zeros_is_fitted_with_its_neighbour_and_left_alone(scene):
    """Fits need positive counts: a shell whose pixels are all zero (in an
    image that is not blank, without a whole zero line) is fitted together
    with the next shell in; that fit expects positive counts next to zero
    where the shell has none, so its zeros are not truncation and stay 0,
    while the other shells are corrected."""
    image = scene["image"].copy()
    outer = (scene["shell_map"].labels == N_SHELLS - 1).reshape(scene["shape"])
    image[outer] = 0
    result = correct_image(
        [image], scene["shell_map"], CorrectionParameters(n_shells=N_SHELLS), "outer"
    )
    assert result.damaged == ""
    assert result.shells[-1].fitted_regions == ((N_SHELLS - 2, 0), (N_SHELLS - 1, 0))
    assert result.shells[-1].status.startswith(
        "not truncation: gap of empty bins above 0 (no positive counts"
    )
    assert not result.data[0][outer].any()
    assert all(s.status == correction.CORRECTED for s in result.shells[:-1] if s.n_zero)
    assert (result.data[0][~outer] < 0).sum() > 0.5 * (image[~outer] == 0).sum()


def test_all_pixels_masked_is_an_error():
    with pytest.raises(ShellError, match="valid pixels"):
        build_shell_map([np.ones((50, 50))], [np.zeros((50, 50), bool)], 10)


def test_too_few_pixels_for_the_shells_gives_fewer_shells(caplog):
    shell_map = build_shell_map(
        [np.arange(5000.0)], [np.ones(5000, bool)], 10, min_pixels_per_shell=1000
    )
    assert shell_map.n_shells == 5
    assert "instead of 10" in caplog.text


def test_ties_never_leave_an_empty_shell():
    inv_d2 = np.repeat([1.0, 2.0, 3.0], 2000)
    shell_map = build_shell_map(
        [inv_d2], [np.ones_like(inv_d2, bool)], 10, min_pixels_per_shell=10
    )
    assert shell_map.n_shells == 3
    assert np.all(shell_map.n_valid == 2000)


def test_shell_fit_failure_merges_with_neighbour(scene, monkeypatch):
    requests = _forced_fit_failures(
        monkeypatch, lambda call, k: (call, k) == (0, 0)
    )  # the first shell's own fit
    result = correct_image(
        [scene["image"]],
        scene["shell_map"],
        CorrectionParameters(n_shells=N_SHELLS),
        "m",
    )
    assert result.shells[0].fitted_regions == ((0, 0), (1, 0))
    assert result.shells[0].status == correction.CORRECTED
    assert requests[1] == [requests[0][0] + requests[0][1]]


def test_multi_panel_images(scene):
    """Two panels share one shell map; each keeps its shape."""
    inv = radial_inv_d2((200, 300), centre=(150.0, -20.0))
    inv2 = radial_inv_d2((200, 300), centre=(150.0, 220.0))
    shell_map = build_shell_map(
        [inv, inv2], [np.ones((200, 300), bool)] * 2, 4, min_pixels_per_shell=100
    )
    truth = falling_parameters(4)
    rng = np.random.default_rng(3)
    labels = shell_map.labels
    true = draw_true_values(labels, truth, rng)
    panels = [
        truncate(true[:60000]).reshape(200, 300),
        truncate(true[60000:]).reshape(200, 300),
    ]
    result = correct_image(panels, shell_map, CorrectionParameters(n_shells=4), "mp")
    assert [d.shape for d in result.data] == [(200, 300), (200, 300)]
    for before, after in zip(panels, result.data):
        assert np.array_equal(after[before > 0], before[before > 0])
        assert np.all(after[before == 0] <= 0)
    assert result.n_changed > 0


def test_negative_values_in_masked_pixels_do_not_stop_the_correction(scene):
    """Detector gaps flagged with -1 (as in Pilatus CBFs) are masked: the
    image is still truncated data and the flags stay as they are."""
    image = scene["image"].astype(np.int32)
    image[~scene["valid"]] = -1
    result = correct_image(
        [image], scene["shell_map"], CorrectionParameters(n_shells=N_SHELLS), "gaps"
    )
    assert result.status == correction.CORRECTED
    assert np.all(result.data[0][~scene["valid"]] == -1)


def test_newton_steps_out_of_range_fail_gracefully():
    """Found by hypothesis: a huge Newton step overflowed exp(); the fit must
    back-track (or report failure), never raise."""
    from dials_truncfix.core.lognormal import ExactLikelihood

    hist = np.array([1, 3, 1, 0, 0, 0, 0, 0, 0, 700])
    objective = ExactLikelihood([hist[:-1]], [hist[-1]])
    value, grad, hessian = objective(np.array([[800.0, -800.0, 0.0]]), [0])
    assert (
        value[0] == 1e300 and not grad.any() and np.array_equal(hessian[0], np.eye(3))
    )
    fit = fit_lognormal(hist[:-1], hist[-1], "exact")
    assert isinstance(fit.converged, bool)


# --- reference output of this algorithm ---------------------------------------

#: sha256 of the corrected pixels (little-endian int32, panels in order) of the
#: images made by _reference_case with default parameters apart from those
#: shown, for correction algorithm 3 (dials_truncfix.core.ALGORITHM; numpy
#: 1.24.2, scipy 1.10.1).  A change of the pixels needs a new algorithm
#: version (and new hashes).
REFERENCE_SHA256 = {
    "scene": "7aa4423581eef1c8dda8832500cd7452593d508d49738f7a5d329dd61e2cc090",
    "scene_expectation": "4fb61fe03529a2642c72a950b618e92e8681fac7e6fffd128e8c0a1a94166379",
    "heavier": "9b2ce92139960e106a343530b768c53bf8a9ea22f182c7128c65979fbebd1a5e",
    "heavier_expectation": "8c5a9dd946034d84b808eb2c34ecf7764d7365815bea1017dc4a567b76d07e5c",
    "light": "f6e74e1c67b57446584c1687e0439fbad9010a8e38f843316be79cd19bcf4775",
    "two_panels": "b171acca8203c437b0e9ad6b3f035b9daa58c8b633981791f6e51a2252644e7b",
    "float_seed_42": "049692e37ae2e261b28ff08664811312162dbfd66ae2c304d811f0215b380c2b",
    "paper_likelihood": "fd4e3e78368aeee216df318eb780410837c19735e08f7861980225eb90207715",
}


def _reference_case(name):
    """(panels, shell map, parameters) of a deterministic synthetic image."""
    shape, centre, n_shells, shift = (1024, 1024), (530.0, 490.0), N_SHELLS, 0.0
    if name == "two_panels":
        inv_d2 = [
            radial_inv_d2((200, 300), centre=(150.0, -20.0)),
            radial_inv_d2((200, 300), centre=(150.0, 220.0)),
        ]
        shell_map = build_shell_map(
            inv_d2, [np.ones((200, 300), bool)] * 2, 4, min_pixels_per_shell=100
        )
        true = draw_true_values(
            shell_map.labels, falling_parameters(4), np.random.default_rng(3)
        )
        panels = [
            truncate(true[:60000]).reshape(200, 300),
            truncate(true[60000:]).reshape(200, 300),
        ]
        return (
            panels,
            shell_map,
            CorrectionParameters(n_shells=4, min_pixels_per_shell=100),
        )
    if name.startswith("heavier"):  # ~74% zeros
        n_shells, shift = 10, -3.0
    if name == "light":  # ~15% zeros
        n_shells, shift = 10, 6.0
    valid = np.ones(shape, dtype=bool)
    valid[480:500, :530] = False
    shell_map = build_shell_map(
        [radial_inv_d2(shape, centre=centre)], [valid], n_shells
    )
    truth = falling_parameters(n_shells)
    truth = type(truth)(truth.theta + shift, truth.mu, truth.sigma)
    true = draw_true_values(
        shell_map.labels.reshape(shape), truth, np.random.default_rng(20161029)
    )
    image = truncate(true)
    image[~valid] = 0
    if name == "paper_likelihood":
        return (
            [image],
            shell_map,
            CorrectionParameters(n_shells=n_shells, likelihood="paper"),
        )
    if name == "float_seed_42":
        return (
            [image.astype(float)],
            shell_map,
            CorrectionParameters(n_shells=n_shells, seed=42),
        )
    if name.endswith("_expectation"):
        return (
            [image],
            shell_map,
            CorrectionParameters(n_shells=n_shells, assignment="expectation"),
        )
    return [image], shell_map, CorrectionParameters(n_shells=n_shells)


def _output_sha256(panels):
    return hashlib.sha256(
        b"".join(np.asarray(p, dtype="<i4").tobytes() for p in panels)
    ).hexdigest()


@pytest.mark.parametrize("name", sorted(REFERENCE_SHA256))
def test_output_is_bit_identical_to_the_reference_of_this_algorithm(name):
    panels, shell_map, params = _reference_case(name)
    result = correct_image(panels, shell_map, params, f"reference-{name}")
    assert result.status == correction.CORRECTED
    assert _output_sha256(result.data) == REFERENCE_SHA256[name]


@pytest.mark.parametrize("likelihood", ["exact", "paper"])
def test_a_fit_from_a_start_where_the_likelihood_is_not_finite_is_not_converged(
    monkeypatch, likelihood
):
    """Found by a hostile tester: at such a start the objective returns
    NOT_FINITE with a zero gradient, which the optimiser took for
    convergence at iteration 0.  A start with scale = 1e-300 far above the
    counts puts every bin edge infinitely many standard deviations below the
    median: the log-likelihood is -inf (or undefined) for both likelihoods."""
    from dials_truncfix.core import lognormal

    rng = np.random.default_rng(7)
    hist, n_above = _fit_histogram(-3 + np.exp(1 + 0.8 * rng.standard_normal(20_000)))
    assert fit_lognormal(hist, n_above, likelihood).converged
    start = (1e6, 1e-300, 0.0)
    objective = lognormal.Objective(hist, n_above, likelihood)
    value, grad = objective(np.array([start[0], math.log(start[1]), start[2]]))
    assert value == lognormal.NOT_FINITE and not grad.any()
    monkeypatch.setattr(lognormal, "starting_values", lambda h, n: start)
    fit = fit_lognormal(hist, n_above, likelihood)
    assert not fit.converged
    assert (
        fit.log_likelihood == -math.inf and fit.message == "log-likelihood not finite"
    )


def test_more_regions_than_int16_labels_hold():
    """Found by a hostile tester: n_shells=32769 with min_pixels_per_shell=1
    overflowed the int16 labels into a baffling bincount error (and the
    dense per-shell histograms would have taken 17 GB).  Random 1/d^2 has no
    ties, so every one of the 32769 shells is made."""
    import tracemalloc

    shape = (200, 200)
    inv_d2 = np.random.default_rng(5).random(shape)
    shell_map = build_shell_map(
        [inv_d2], [np.ones(shape, bool)], 32769, min_pixels_per_shell=1
    )
    assert shell_map.n_regions == 32769 and shell_map.labels.max() == 32768
    assert np.array_equal(np.bincount(shell_map.labels), shell_map.n_valid)
    assert np.all(np.diff(shell_map.labels[np.argsort(inv_d2, axis=None)]) >= 0)
    image = truncate(
        -3 + np.exp(1 + 0.8 * np.random.default_rng(6).standard_normal(shape))
    )
    params = CorrectionParameters(n_shells=32769, min_pixels_per_shell=1)
    tracemalloc.start()
    try:
        result = correct_image([image], shell_map, params, "many shells")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100e6, peak
    assert len(result.shells) == 32769 and np.array_equal(
        result.data[0], image
    )  # 1-2 pixels: no fit
    with pytest.raises(ValueError, match="n_sectors=1000"):
        build_shell_map(
            [inv_d2[:20, :20]],
            [np.ones((20, 20), bool)],
            3,
            1,
            azimuth=[inv_d2[:20, :20]],
            n_sectors=1000,
        )


def _sparse_histogram(imax=20_000):
    """A background histogram with bright pixels strewn up to Imax: most of
    the bins below a large Imax are empty."""
    rng = np.random.default_rng(3)
    values = np.concatenate(
        [
            -8 + np.exp(1.8 + 0.55 * rng.standard_normal(30_000)),
            rng.exponential(3000, 300),
        ]
    )
    counts = np.clip(np.rint(values), 0, None).astype(int)
    h = np.bincount(np.minimum(counts, imax + 1), minlength=imax + 2)
    return h[:-1], int(h[-1])


def test_a_large_imax_fits_on_the_occupied_bins_alone(monkeypatch):
    """Found by a hostile tester: histogram.max=60000 took ~49 s a 512x512
    image, every evaluation running over all bin edges.  Empty bins add
    nothing to the likelihood: the objective keeps only the edges around
    occupied bins (when that drops most).  Its log-likelihood equals the
    textbook sums over all bins, and the exact fit equals the fit over
    every edge."""
    from dials_truncfix.core import lognormal

    hist, n_above = _sparse_histogram()
    occupied = np.count_nonzero(hist) + (n_above > 0)
    compressed = lognormal.Objective(hist, n_above, "exact")
    assert len(compressed.offsets) <= 2 * occupied < len(hist) / 10
    rng = np.random.default_rng(0)
    counts = np.append(hist, n_above)
    edges = np.concatenate(([-np.inf], np.arange(len(hist)) + 0.5, [np.inf]))
    positive = np.flatnonzero(hist[1:]) + 1
    for theta, mu, sigma in zip(
        rng.uniform(-20, 0.4, 5), rng.uniform(1, 3, 5), rng.uniform(0.5, 3, 5)
    ):
        model = stats.lognorm(sigma, loc=theta, scale=np.exp(mu))
        # bin probabilities from the side of the median where they do not cancel
        p = np.where(
            edges[:-1] > model.median(),
            -np.diff(model.sf(edges)),
            np.diff(model.cdf(edges)),
        )
        exact = np.dot(counts[counts > 0], np.log(p[counts > 0]))
        paper = hist[0] * model.logcdf(0.5) + np.dot(
            hist[positive], model.logpdf(positive)
        )
        d = Distribution.from_lognormal(theta, mu, sigma)
        assert lognormal.log_likelihood(hist, n_above, d, "exact") == pytest.approx(
            exact, rel=1e-9
        )
        assert lognormal.log_likelihood(hist, n_above, d, "paper") == pytest.approx(
            paper, rel=1e-9
        )
    # a few empty bins are kept, so that the usual fits do not change by rounding
    few_empty = np.array([900, 500, 0, 0, 0, 300, 200, 100])
    usual = lognormal.Objective(few_empty, 50, "exact")
    assert np.array_equal(usual.offsets, np.arange(8)) and np.array_equal(
        usual.bin_counts, np.append(few_empty, 50)
    )
    assert np.array_equal(
        lognormal.Objective(few_empty, 50, "paper").offsets, np.arange(7) + 0.5
    )
    fit = fit_lognormal(hist, n_above, "exact")
    monkeypatch.setattr(
        lognormal,
        "_occupied_intervals",
        lambda b: (np.arange(len(b) - 1, dtype=float), b),
    )
    every_edge = fit_lognormal(hist, n_above, "exact")
    assert fit.converged and every_edge.converged
    assert np.allclose(_parameters(fit), _parameters(every_edge), rtol=1e-6)
    assert fit.log_likelihood == pytest.approx(every_edge.log_likelihood, rel=1e-12)


def test_fits_run_together_equal_the_fits_one_by_one():
    """fit_lognormals pads the shorter histograms of a batch: each fit is the
    one it gets alone, whatever the others (here a sparse one with a large
    Imax, a heavily truncated one and one that cannot be fitted)."""
    from dials_truncfix.core import lognormal

    rng = np.random.default_rng(11)
    problems = [
        _fit_histogram(theta + np.exp(mu + sigma * rng.standard_normal(30_000)))
        for theta, mu, sigma in ((-3, 1.0, 0.8), (-12, 2.6, 0.4), (-1, 0.5, 1.2))
    ]
    problems += [_sparse_histogram(), (np.array([50, 2, 1, 0, 0]), 3)]
    together = lognormal.fit_lognormals(problems)
    for problem, fit in zip(problems, together):
        alone = fit_lognormal(*problem)
        assert fit.converged == alone.converged and fit.message == alone.message
        if alone.converged:
            assert np.allclose(_parameters(fit), _parameters(alone), rtol=1e-9)
            assert fit.log_likelihood == pytest.approx(alone.log_likelihood, rel=1e-12)
    assert sum(f.converged for f in together) == 4


# --- the block-by-block pass over an image -------------------------------------


def test_scan_image_matches_whole_image_search_across_blocks():
    """scan_image works block by block (histogram.HISTOGRAM_BLOCK sampled
    pixels at a time): zeros, their regions, negatives (in one block only),
    the copy into the output and the sampled histograms must be those of
    whole-image operations, block edges included."""
    from dials_truncfix.core.histogram import (
        HISTOGRAM_BLOCK,
        RegionHistograms,
        SampleCounter,
    )

    rng = np.random.default_rng(11)
    n_regions, stride = 7, 3
    size = 3 * stride * HISTOGRAM_BLOCK + 12345  # three full blocks and a bit
    labels = rng.integers(0, n_regions, size).astype(np.int8)
    labels[rng.random(size) < 0.05] = INVALID
    flat = rng.poisson(1.5, size).astype(np.int32)
    edge = stride * HISTOGRAM_BLOCK  # zeros on both sides of a block edge
    flat[edge - 3 : edge + 3] = 0
    masked = np.flatnonzero(labels == INVALID)
    second = masked[(masked > edge) & (masked < 2 * edge)][:50]
    flat[second] = -7  # negative masked pixels in the second block only
    base, n_sampled = shells.sample_keys(labels, stride, n_regions)

    out = np.empty_like(flat)
    counter = SampleCounter(n_regions, stride, base)
    zeros, negative = correction.scan_image(flat, labels, out, counter)

    assert len(zeros.blocks) == 4 and len(zeros) == np.count_nonzero(flat == 0)
    assert np.array_equal(np.concatenate(zeros.blocks), np.flatnonzero(flat == 0))
    assert np.array_equal(zeros.positions, np.flatnonzero(flat == 0))
    assert np.array_equal(zeros.regions, labels[zeros.positions])
    assert np.array_equal(negative, np.sort(second))
    assert np.array_equal(out, flat)
    whole = RegionHistograms(flat, labels, stride, base, n_sampled, True)
    scanned = RegionHistograms(flat, labels, stride, base, n_sampled, True, counter)
    bins = shells.histogram_bins(n_regions)
    sampled = np.clip(flat[::stride], 0, bins - 1)
    for r in range(n_regions):
        expected = np.bincount(sampled[labels[::stride] == r], minlength=bins)
        assert np.array_equal(whole.capped[r], expected)
        assert np.array_equal(scanned.capped[r], expected)


@pytest.mark.parametrize(
    "n_regions, dtype",
    [(10, np.int8), (128, np.int8), (129, np.int16), (300, np.int16)],
)
def test_labels_are_the_narrowest_type_and_zeros_are_counted_per_region(
    n_regions, dtype
):
    """int8 labels up to 128 regions (their lookup and count is what every
    image pays for its zeros), int16 beyond; the zero pixels per region
    counted alike by every counting path."""
    shape = (40, 40)
    inv_d2 = np.random.default_rng(5).random(shape)
    shell_map = build_shell_map(
        [inv_d2], [np.ones(shape, bool)], n_regions, min_pixels_per_shell=1
    )
    assert shell_map.n_regions == n_regions and shell_map.labels.dtype == dtype
    rng = np.random.default_rng(n_regions)
    regions = rng.integers(-1, n_regions, 50_000).astype(dtype)
    expected = np.array([np.count_nonzero(regions == r) for r in range(n_regions)])
    assert np.array_equal(correction.zeros_per_region(regions, n_regions), expected)
    wide = regions.astype(np.int32)
    assert np.array_equal(correction.zeros_per_region(wide, n_regions), expected)


@pytest.mark.parametrize("n_values", [3, 200])
def test_fill_slots_gives_each_value_its_run_of_slots(n_values):
    """A region's lookup table, filled run by run (few values) or by
    np.repeat (many): value i in slots ends[i - 1] .. ends[i] - 1, values
    whose probability rounds to no slot absent."""
    from dials_truncfix.core.assignment import SLICED_RUNS, fill_slots

    assert (n_values > SLICED_RUNS) == (n_values == 200)
    rng = np.random.default_rng(n_values)
    probabilities = rng.random(n_values) ** 4
    probabilities /= probabilities.sum()
    values = -np.arange(n_values)
    ends = slot_ends(probabilities)
    row = np.full(TABLE_SIZE, 99, dtype=np.int16)
    fill_slots(row, values, ends)
    expected = values[np.searchsorted(ends, np.arange(TABLE_SIZE), side="right")]
    assert np.array_equal(row, expected)


def test_series_of_the_shape_derivatives_are_those_of_polyval():
    """derivative_series evaluates both power series at once with
    np.polyval's own operations: bit for bit the numbers of np.polyval (the
    fit depends on them)."""
    from dials_truncfix.core.lognormal import SERIES_TERMS, derivative_series

    terms = range(SERIES_TERMS)
    a_coefficients = [(-1) ** (j + 1) * (j + 1) / (j + 2) for j in terms][::-1]
    b_coefficients = [(-1) ** j * (j + 2) * (j + 1) / (j + 3) for j in terms][::-1]
    u = np.random.default_rng(2).uniform(-0.1, 0.1, 1000)
    a, b = derivative_series(u)
    assert np.array_equal(a, np.polyval(a_coefficients, u))
    assert np.array_equal(b, np.polyval(b_coefficients, u))


def test_float_image_with_nan_and_inf_in_masked_pixels_is_corrected():
    """Found while speeding up the histograms: a float image whose masked
    pixels hold nan or inf (a detector gap so flagged) failed with a
    baffling bincount error.  Masked pixels count nowhere: the image is
    corrected, the masked pixels keep their values, positive ones too."""
    shape = (300, 300)
    valid = np.ones(shape, bool)
    valid[:6] = False
    shell_map = build_shell_map(
        [radial_inv_d2(shape, centre=(150.0, 150.0))], [valid], 3, 100
    )
    rng = np.random.default_rng(1)
    image = truncate(-2 + np.exp(1 + 0.8 * rng.standard_normal(shape))).astype(float)
    image[:2], image[2:4], image[4:6] = np.nan, np.inf, -np.inf
    params = CorrectionParameters(n_shells=3, min_pixels_per_shell=100)
    result = correct_image([image], shell_map, params, "nan-masked")
    out = result.data[0]
    assert result.status == correction.CORRECTED and result.n_changed > 0
    assert np.isnan(out[:2]).all() and np.array_equal(out[2:6], image[2:6])
    positive = image > 0
    assert np.array_equal(out[positive], image[positive])
    assert (out[valid & (image == 0)] <= 0).all()
