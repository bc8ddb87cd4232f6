"""Maximum-likelihood fit of a shifted (three-parameter) lognormal to a
histogram of low pixel counts in which a count of 0 stands for "any value
below 0.5" (Hattne et al., 2016, J. Appl. Cryst. 49, 1029-1034).

The model: X = theta + exp(mu + sigma * Z), Z ~ N(0, 1), so that
F(x) = Phi((ln(x - theta) - mu) / sigma) for x > theta and 0 otherwise.

Two likelihoods are offered:

``paper``
    equation (4) of the paper: H(0) log F(0.5) + sum_{I=1}^{Imax} H(I) log f(I).
    The density stands in for the bin probability and the counts above Imax
    are ignored, which biases the fit when much of the mass lies above Imax.
``exact``
    H(0) log F(0.5) + sum_{I=1}^{Imax} H(I) log[F(I+0.5) - F(I-0.5)]
    + N_above log[1 - F(Imax+0.5)]: the multinomial likelihood of the
    binned, right-censored data.

theta < 0.5 is enforced through theta = 0.5 - exp(a), sigma through
sigma = exp(s); the optimiser works on (a, mu, s) with analytic gradients.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import optimize, special

LIKELIHOODS = ("exact", "paper")

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)

#: what the objective returns (with a zero gradient) where the likelihood is
#: not finite: large enough to be rejected by any descent, finite so that the
#: optimisers' arithmetic stays defined; never a converged fit's value
NOT_FINITE = 1e300


@dataclass(frozen=True)
class LognormalFit:
    """Outcome of one fit; ``converged`` is False when the parameters must not
    be used."""

    theta: float
    mu: float
    sigma: float
    log_likelihood: float
    rmsd: float
    converged: bool
    n_iterations: int
    message: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def cdf(x, theta: float, mu: float, sigma: float) -> np.ndarray:
    """F(x) of the shifted lognormal, 0 for x <= theta."""
    x = np.asarray(x, dtype=float)
    out = np.zeros_like(x)
    above = x > theta
    out[above] = special.ndtr((np.log(x[above] - theta) - mu) / sigma)
    return out


def bin_probabilities(theta: float, mu: float, sigma: float, imax: int) -> np.ndarray:
    """Probabilities of the histogram bins 0..imax and of the censored bin
    (> imax + 0.5): bin 0 is (-inf, 0.5), bin I is [I - 0.5, I + 0.5)."""
    edges = np.concatenate(([-np.inf], np.arange(imax + 1) + 0.5, [np.inf]))
    return np.diff(cdf(edges, theta, mu, sigma))


def _log_diff_ndtr(z_hi, z_lo):
    """log(Phi(z_hi) - Phi(z_lo)) for z_hi > z_lo, accurate in both tails
    (called under np.errstate(all="ignore"): an empty bin gives -inf)."""
    upper_tail = z_lo > 0
    a = np.where(upper_tail, -z_lo, z_hi)
    b = np.where(upper_tail, -z_hi, z_lo)
    log_a = special.log_ndtr(a)
    log_b = special.log_ndtr(b)
    return log_a + np.log1p(-np.exp(log_b - log_a))


def _log_phi(z):
    return -0.5 * z * z - _LOG_SQRT_2PI


def _edges_kept(needed, n_edges):
    """The edges (or counts) the likelihood runs over: only the ``needed``
    ones when that drops at least half of the ``n_edges``, which makes a
    large Imax (histogram.max) cheap; else all, so that the usual fits stay
    the same to the bit (shorter sums round differently)."""
    return needed if 2 * len(needed) <= n_edges else np.arange(n_edges)


def _occupied_intervals(bin_counts):
    """(edge offsets, interval counts) of the exact likelihood: a run of empty
    bins adds nothing to the multinomial likelihood, so the edges inside it
    can go, the run becoming one empty interval.  Edge k is I = k + 0.5,
    the top of bin k, at x - theta = k + exp(a)."""
    occupied = bin_counts > 0
    kept = _edges_kept(np.flatnonzero(occupied[:-1] | occupied[1:]), len(bin_counts) - 1)
    cumulative = np.cumsum(bin_counts)
    interval_counts = np.diff(np.concatenate(([0.0], cumulative[kept], cumulative[-1:])))
    return kept.astype(float), interval_counts


class ExactLikelihood:
    """Negative mean log-likelihood of the exact (binned, censored) model,
    with its gradient and Hessian in (a, mu, s), for a batch of histograms
    at once, one per row: an evaluation of ten regions costs about as much as
    one of a single region (numpy call overhead dominates these short sums).

    Rows with fewer edges are padded by repeating their last edge: the
    empty bins between equal edges add nothing (their terms are zeroed), and
    the censored bin keeps its count."""

    def __init__(self, histograms, n_aboves):
        # bins (-inf, 0.5), [0.5, 1.5), ..., [Imax - 0.5, Imax + 0.5), [Imax + 0.5, inf)
        rows = [_occupied_intervals(np.append(np.asarray(h, dtype=float), float(n)))
                for h, n in zip(histograms, n_aboves)]
        n_edges = max(len(offsets) for offsets, _ in rows)
        self.offsets = np.empty((len(rows), n_edges))
        self.bin_counts = np.zeros((len(rows), n_edges + 1))
        for row, (offsets, counts) in enumerate(rows):
            self.offsets[row, : len(offsets)] = offsets
            self.offsets[row, len(offsets) :] = offsets[-1]
            self.bin_counts[row, : len(offsets)] = counts[:-1]
            self.bin_counts[row, -1] = counts[-1]
        self.n_total = self.bin_counts.sum(axis=1)
        self.occupied = self.bin_counts > 0

    def __call__(self, p, rows):
        """(value, gradient, Hessian) at parameters ``p`` (one row of (a, mu, s)
        per entry of ``rows``); NOT_FINITE, a zero gradient and the identity
        where the likelihood or its derivatives are not finite."""
        with np.errstate(all="ignore"):
            value, grad, hessian = self._evaluate(p, rows)
        bad = ~(np.isfinite(value) & np.isfinite(grad).all(axis=1) & np.isfinite(hessian).all(axis=(1, 2)))
        n_total = self.n_total[rows]
        value, grad, hessian = -value / n_total, -grad / n_total[:, None], -hessian / n_total[:, None, None]
        value[bad], grad[bad], hessian[bad] = NOT_FINITE, 0.0, _IDENTITY
        return value, grad, hessian

    def _evaluate(self, p, rows):
        a, mu, s = p[:, 0:1], p[:, 1:2], p[:, 2:3]
        sigma, t = np.exp(s), np.exp(a)
        y = self.offsets[rows] + t  # edge - theta, without cancellation
        z = (np.log(y) - mu) / sigma
        counts, occupied = self.bin_counts[rows], self.occupied[rows]
        n = len(rows)
        log_p = _log_diff_ndtr(np.hstack((z, np.full((n, 1), np.inf))), np.hstack((np.full((n, 1), -np.inf), z)))
        log_phi = _log_phi(z)
        # the terms of empty bins are zero (their ratios may not be finite);
        # edge e is the top of bin e and the bottom of bin e + 1
        below, above = occupied[:, :-1], occupied[:, 1:]
        r_top = np.exp(log_phi - log_p[:, :-1])
        r_bottom = -np.exp(log_phi - log_p[:, 1:])
        top_terms = np.where(below, counts[:, :-1] * r_top, 0.0)
        bottom_terms = np.where(above, counts[:, 1:] * r_bottom, 0.0)
        w = top_terms + bottom_terms
        diag = np.where(below, top_terms * (-z - r_top), 0.0) + np.where(above, bottom_terms * (-z - r_bottom), 0.0)
        # bin e + 1 joins edges e and e + 1
        off = np.where(occupied[:, 1:-1], -counts[:, 1:-1] * r_bottom[:, :-1] * r_top[:, 1:], 0.0)
        grad_z = np.empty((n, 3, y.shape[1]))  # dz/d(theta, mu, sigma) per edge
        grad_z[:, 0] = -1 / (sigma * y)
        grad_z[:, 1] = -1 / sigma
        grad_z[:, 2] = -z / sigma
        h = np.einsum("rie,re,rje->rij", grad_z, diag, grad_z)
        cross = np.einsum("rie,re,rje->rij", grad_z[:, :, :-1], off, grad_z[:, :, 1:])
        h += cross + cross.transpose(0, 2, 1)
        # sum_e w_e * second derivatives of z_e
        sigma, t = sigma[:, 0], t[:, 0]
        w_sum = w.sum(axis=1)
        h[:, 0, 0] += (w * grad_z[:, 0] / y).sum(axis=1)
        h[:, 0, 2] -= (w * grad_z[:, 0]).sum(axis=1) / sigma
        h[:, 1, 2] += w_sum / sigma**2
        h[:, 2, 2] -= 2 * (w * grad_z[:, 2]).sum(axis=1) / sigma
        h[:, 2, 0], h[:, 2, 1] = h[:, 0, 2], h[:, 1, 2]
        g = np.stack(((w * grad_z[:, 0]).sum(axis=1), -w_sum / sigma, (w * grad_z[:, 2]).sum(axis=1)), axis=1)
        # theta = 0.5 - exp(a): d theta/da = d2 theta/da2 = -t; sigma = exp(s)
        jac = np.stack((-t, np.ones_like(t), sigma), axis=1)
        h *= jac[:, :, None] * jac[:, None, :]
        h[:, 0, 0] -= g[:, 0] * t
        h[:, 2, 2] += g[:, 2] * sigma
        value = np.where(occupied, counts * log_p, 0.0).sum(axis=1)
        return value, g * jac, h


class Objective:
    """Negative mean log-likelihood of one histogram and its gradient in
    (a, mu, s), with theta = 0.5 - exp(a) and sigma = exp(s)."""

    def __init__(self, histogram, n_above, likelihood):
        h = np.asarray(histogram, dtype=float)
        self.likelihood = likelihood
        if likelihood == "exact":
            self._batch = ExactLikelihood([h], [n_above])
            self.offsets, self.bin_counts = self._batch.offsets[0], self._batch.bin_counts[0]
            self.n_total = self._batch.n_total[0]
        else:
            self.h0 = h[0]
            # the positive counts I (those that occur), minus 0.5
            kept = _edges_kept(np.flatnonzero(h[1:] > 0), len(h) - 1)
            self.offsets = kept + 0.5
            self.positive_counts = h[1:][kept]
            self.n_total = h.sum()

    def __call__(self, p):
        if self.likelihood == "exact":
            value, grad, _ = self._batch(np.asarray(p, dtype=float)[None, :], [0])
            return value[0], grad[0]
        with np.errstate(all="ignore"):
            try:
                value, grad = self._paper(*p)
            except (ValueError, OverflowError, ZeroDivisionError):
                return NOT_FINITE, np.zeros(3)
        if not np.isfinite(value) or not np.all(np.isfinite(grad)):
            return NOT_FINITE, np.zeros(3)
        return -value / self.n_total, -grad / self.n_total

    def _paper(self, a, mu, s):
        sigma = math.exp(s)
        h0, hpos = self.h0, self.positive_counts
        # H(0) log F(0.5)
        z0 = (a - mu) / sigma
        log_f0 = special.log_ndtr(z0)
        r0 = h0 * math.exp(_log_phi(z0) - log_f0) if h0 else 0.0
        g = r0 * np.array([-1 / (sigma * math.exp(a)), -1 / sigma, -z0 / sigma])
        value = h0 * log_f0
        # sum H(I) log f(I)
        y = self.offsets + math.exp(a)
        z = (np.log(y) - mu) / sigma
        value += np.dot(hpos, -np.log(y) - s + _log_phi(z))
        g += [
            np.dot(hpos, (1 + z / sigma) / y),
            np.dot(hpos, z) / sigma,
            np.dot(hpos, (z * z - 1) / sigma),
        ]
        return value, np.array([-g[0] * math.exp(a), g[1], g[2] * sigma])


def starting_values(histogram: np.ndarray, n_above: int) -> tuple:
    """Quantile-matching estimate of (theta, mu, sigma) from the observed part
    of the empirical distribution (counts >= 1), used to start the optimiser."""
    h = np.asarray(histogram, dtype=float)
    n = h.sum() + n_above
    cum = np.cumsum(h) / n  # G(I + 0.5)
    p_lo, p_hi = cum[0], cum[-1]
    span = p_hi - p_lo
    # three equally spaced normal scores inside the observed window
    z_lo = special.ndtri(p_lo + 0.05 * span)
    z_hi = special.ndtri(p_lo + 0.95 * span)
    zs = np.array([z_lo, 0.5 * (z_lo + z_hi), z_hi])
    ps = special.ndtr(zs)
    # invert the piecewise-linear empirical CDF at the bin edges I + 0.5
    edges = np.arange(len(h)) + 0.5
    xs = np.interp(ps, cum, edges)
    d1, d2 = xs[1] - xs[0], xs[2] - xs[1]
    delta = zs[1] - zs[0]
    if not (d1 > 0 and d2 > 0 and delta > 0):
        scale = max(xs[-1], 1.0)
        return 0.0, math.log(scale), 0.5
    sigma = min(max(math.log(d2 / d1) / delta, 0.05), 3.0)
    scale = d1 / (math.exp(sigma * zs[1]) - math.exp(sigma * zs[0]))
    mu = math.log(scale)
    theta = xs[0] - scale * math.exp(sigma * zs[0])
    theta = min(theta, 0.5 - 1e-3 * max(scale, 1.0))
    return theta, mu, sigma


def log_likelihood(histogram: np.ndarray, n_above: int, theta: float, mu: float, sigma: float,
                   likelihood: str = "exact") -> float:
    """The log-likelihood of (theta, mu, sigma) for a histogram."""
    objective = Objective(histogram, n_above, likelihood)
    value, _ = objective((math.log(0.5 - theta), mu, math.log(sigma)))
    return -value * objective.n_total


def fit_lognormal(histogram: np.ndarray, n_above: int = 0, likelihood: str = "exact",
                  max_iterations: int = 200) -> LognormalFit:
    """Fit theta, mu, sigma to H(0..Imax) (and, for ``exact``, the number of
    counts above Imax) by maximum likelihood."""
    return fit_lognormals([(histogram, n_above)], likelihood, max_iterations)[0]


def fit_lognormals(problems: list, likelihood: str = "exact", max_iterations: int = 200) -> list:
    """The LognormalFit of each (histogram, n_above) of ``problems``, as
    fit_lognormal gives it; the exact fits run together (ExactLikelihood)."""
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; use one of {LIKELIHOODS}")
    fits = [None] * len(problems)
    histograms, n_aboves, starts, fitted = [], [], [], []
    for k, (histogram, n_above) in enumerate(problems):
        h = np.asarray(histogram, dtype=float)
        if h.ndim != 1 or len(h) < 4:
            raise ValueError("histogram needs counts for at least I = 0..3")
        if h[1:].sum() < 10:
            fits[k] = _failed("fewer than 10 pixels with positive counts below Imax")
            continue
        theta0, mu0, sigma0 = starting_values(h, n_above)
        histograms.append(h)
        n_aboves.append(n_above)
        starts.append((math.log(0.5 - theta0), mu0, math.log(sigma0)))
        fitted.append(k)
    if not fitted:
        return fits
    if likelihood == "exact":
        objective = ExactLikelihood(histograms, n_aboves)
        results = _newton(objective, np.array(starts), max_iterations)
        n_totals = objective.n_total
    else:
        results, n_totals = [], []
        for h, n_above, x0 in zip(histograms, n_aboves, starts):
            objective = Objective(h, n_above, likelihood)
            results.append(optimize.minimize(
                objective, x0, jac=True, method="BFGS", options={"gtol": 1e-7, "maxiter": max_iterations}
            ))
            n_totals.append(objective.n_total)
    for k, h, n_above, result, n_total in zip(fitted, histograms, n_aboves, results, n_totals):
        fits[k] = _fit_from(result, h, n_above, n_total)
    return fits


def _fit_from(result, h, n_above, n_total):
    """The LognormalFit of an optimiser's result."""
    a, mu, s = result.x
    theta, sigma = 0.5 - math.exp(a), math.exp(s)
    # a start where the likelihood is not finite leaves the optimiser at
    # NOT_FINITE with a zero gradient, which it takes for convergence
    ll = -result.fun * n_total if result.fun < NOT_FINITE else -math.inf
    converged = bool(
        result.success or (result.status == 2 and np.max(np.abs(result.jac)) < 1e-5)
    )
    message = str(result.message) if np.isfinite(ll) else "log-likelihood not finite"
    if not (np.isfinite(ll) and np.isfinite([theta, mu, sigma]).all()):
        converged = False
    expected = bin_probabilities(theta, mu, sigma, len(h) - 1)[:-1] * (h.sum() + n_above)
    rmsd = float(np.sqrt(np.mean((h - expected) ** 2)))
    return LognormalFit(
        theta=float(theta),
        mu=float(mu),
        sigma=float(sigma),
        log_likelihood=float(ll),
        rmsd=rmsd,
        converged=converged,
        n_iterations=int(result.nit),
        message=message,
    )


#: a change of the objective (a mean negative log-likelihood) below this
#: many units in the last place of its value is rounding, not progress
ROUNDING_ULPS = 64

_IDENTITY = np.eye(3)


def _newton(objective, x, max_iterations, gtol=1e-9):
    """Damped Newton with backtracking for the exact likelihood, every row of
    ``x`` (a start per histogram of the ExactLikelihood) on its own course,
    evaluated together: a handful of iterations instead of BFGS's dozens of
    evaluations.  A row stops as converged when its gradient vanishes or when
    the decrease a full step predicts (or a back-tracked step could still
    achieve) is below the objective's rounding: further steps can only
    shuffle the last bits.  Returns an OptimizeResult per row."""
    n = len(x)
    x = np.array(x, dtype=float)
    value, grad, hessian = objective(x, np.arange(n))
    damping = np.zeros(n)
    iterations = np.zeros(n, dtype=int)
    status = np.full(n, -1)  # -1 while running; then 0 converged, 2 stopped, 3 no descent direction
    messages = ["maximum number of iterations reached"] * n

    def stop(rows, code, message):
        status[rows] = code
        for row in rows:
            messages[row] = message

    for _ in range(max_iterations):
        rows = np.flatnonzero(status < 0)
        stop(rows[np.abs(grad[rows]).max(axis=1) < gtol], 0, "converged")
        rows = np.flatnonzero(status < 0)
        if not len(rows):
            break
        iterations[rows] += 1
        rounding = ROUNDING_ULPS * np.spacing(np.abs(value[rows]))
        step = np.zeros((len(rows), 3))
        searching = np.ones(len(rows), dtype=bool)
        while searching.any():
            k = np.flatnonzero(searching)
            with np.errstate(all="ignore"):
                try:
                    trial = -np.linalg.solve(hessian[rows[k]] + damping[rows[k], None, None] * _IDENTITY,
                                             grad[rows[k]][:, :, None])[:, :, 0]
                    good = np.isfinite(trial).all(axis=1) & (np.einsum("ri,ri->r", trial, grad[rows[k]]) < 0)
                except np.linalg.LinAlgError:  # a singular matrix: retry row by row
                    trial, good = _solve_rows(hessian[rows[k]], damping[rows[k]], grad[rows[k]])
            step[k[good]] = trial[good]
            searching[k[good]] = False
            retry = rows[k[~good]]
            damping[retry] = np.maximum(2 * damping[retry], 1e-6 * (1 + np.abs(np.diagonal(hessian[retry], axis1=1,
                                                                                            axis2=2)).max(axis=1)))
            hopeless = k[~good][damping[retry] > 1e12]
            stop(rows[hopeless], 3, "no descent direction")
            searching[hopeless] = False
        moving = status[rows] < 0
        slope = np.einsum("ri,ri->r", grad[rows], step)
        below = moving & (-0.5 * slope < rounding) & (damping[rows] == 0.0)
        stop(rows[below], 0, "converged (the next step is below rounding)")
        moving &= ~below
        rows, step, slope, rounding = rows[moving], step[moving], slope[moving], rounding[moving]
        if not len(rows):
            continue
        t = np.ones(len(rows))
        new_value, new_grad, new_hessian = objective(x[rows] + step, rows)
        while True:
            back = (new_value > value[rows] + 1e-4 * t * slope) & (-t * slope >= rounding)
            if not back.any():
                break
            t[back] *= 0.5
            k = np.flatnonzero(back)
            new_value[k], new_grad[k], new_hessian[k] = objective(x[rows[k]] + t[k, None] * step[k], rows[k])
        failed = new_value > value[rows] + 1e-4 * t * slope
        for k in np.flatnonzero(failed):
            if np.max(np.abs(grad[rows[k]])) < 1e-6:
                stop([rows[k]], 0, "converged (no step changes the objective beyond rounding)")
            else:
                stop([rows[k]], 2, "line search failed")
        k, accepted = np.flatnonzero(~failed), rows[~failed]
        x[accepted] += t[k, None] * step[k]
        value[accepted], grad[accepted], hessian[accepted] = new_value[k], new_grad[k], new_hessian[k]
        damping[accepted] = np.where(t[k] == 1.0, damping[accepted] / 10, damping[accepted])
    status[status < 0] = 2
    return [
        optimize.OptimizeResult(x=x[r], fun=value[r], jac=grad[r], nit=int(iterations[r]), success=status[r] == 0,
                                status=int(status[r]), message=messages[r])
        for r in range(n)
    ]


def _solve_rows(hessians, dampings, grads):
    """(steps, whether each is a descent direction) one row at a time."""
    steps = np.zeros_like(grads)
    good = np.zeros(len(grads), dtype=bool)
    for k, (hessian, damping, grad) in enumerate(zip(hessians, dampings, grads)):
        try:
            steps[k] = -np.linalg.solve(hessian + damping * _IDENTITY, grad)
        except np.linalg.LinAlgError:
            continue
        good[k] = np.isfinite(steps[k]).all() and np.dot(steps[k], grad) < 0
    return steps, good


def _failed(message):
    nan = float("nan")
    return LognormalFit(nan, nan, nan, nan, nan, False, 0, message)


def parameter_covariance(histogram: np.ndarray, n_above: int, fit: LognormalFit, likelihood: str = "exact",
                         step: float = 1e-4) -> np.ndarray:
    """Asymptotic covariance of (theta, mu, sigma) from the observed
    information (finite-difference Hessian of the analytic gradient)."""
    objective = Objective(histogram, n_above, likelihood)
    p = np.array([math.log(0.5 - fit.theta), fit.mu, math.log(fit.sigma)])
    hessian = np.empty((3, 3))
    for i in range(3):
        dp = np.zeros(3)
        dp[i] = step
        hessian[:, i] = (objective(p + dp)[1] - objective(p - dp)[1]) / (2 * step)
    hessian = 0.5 * (hessian + hessian.T) * objective.n_total
    covariance = np.linalg.inv(hessian)
    # d(theta, mu, sigma) / d(a, mu, s)
    jacobian = np.diag([-(0.5 - fit.theta), 1.0, fit.sigma])
    return jacobian @ covariance @ jacobian.T


def standard_errors(histogram: np.ndarray, n_above: int, fit: LognormalFit, likelihood: str = "exact") -> np.ndarray:
    """Asymptotic standard errors of (theta, mu, sigma)."""
    return np.sqrt(np.diag(parameter_covariance(histogram, n_above, fit, likelihood)))
