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


_PLUS_INF = np.array([np.inf])
_MINUS_INF = np.array([-np.inf])


def _zero_where(values, empty):
    """``values`` with the entries of empty bins set to 0 (in place);
    ``empty`` is None where no bin is empty (the usual case)."""
    if empty is not None:
        values[empty] = 0.0
    return values


def _where_any(mask):
    """``mask``, or None when it selects nothing (see _zero_where)."""
    return mask if mask.any() else None


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


class Objective:
    """Negative mean log-likelihood and its gradient in (a, mu, s), with
    theta = 0.5 - exp(a) and sigma = exp(s)."""

    def __init__(self, histogram, n_above, likelihood):
        h = np.asarray(histogram, dtype=float)
        self.likelihood = likelihood
        if likelihood == "exact":
            # bins (-inf, 0.5), [0.5, 1.5), ..., [Imax - 0.5, Imax + 0.5), [Imax + 0.5, inf)
            self.offsets, self.bin_counts = _occupied_intervals(np.append(h, float(n_above)))
            self._counts_by_edge()
        else:
            self.h0 = h[0]
            # the positive counts I (those that occur), minus 0.5
            kept = _edges_kept(np.flatnonzero(h[1:] > 0), len(h) - 1)
            self.offsets = kept + 0.5
            self.positive_counts = h[1:][kept]
        self.n_total = h.sum() + (n_above if likelihood == "exact" else 0)

    def _counts_by_edge(self):
        """What the evaluations need of the counts, which stay the same:
        the occupied and the empty bins, and the bins below, above and
        between the edges."""
        c = self.bin_counts
        self.occupied = c > 0
        empty = ~self.occupied
        self.empty = _where_any(empty)
        self.occupied_counts = c[self.occupied]
        self.count_below, self.count_above = c[:-1], c[1:]
        self.below_empty, self.above_empty = _where_any(empty[:-1]), _where_any(empty[1:])
        # bin e + 1 joins edges e and e + 1
        self.minus_count_between, self.between_empty = -c[1:-1], _where_any(empty[1:-1])

    def _log_bin_probabilities(self, z):
        """log P(bin) for the edges at standardised positions z."""
        return _log_diff_ndtr(np.concatenate((z, _PLUS_INF)), np.concatenate((_MINUS_INF, z)))

    def __call__(self, p):
        with np.errstate(all="ignore"):
            try:
                value, grad = (self._exact if self.likelihood == "exact" else self._paper)(*p)
            except (ValueError, OverflowError, ZeroDivisionError):
                return NOT_FINITE, np.zeros(3)
        if not np.isfinite(value) or not np.all(np.isfinite(grad)):
            return NOT_FINITE, np.zeros(3)
        return -value / self.n_total, -grad / self.n_total

    def _exact(self, a, mu, s):
        sigma = math.exp(s)
        y = self.offsets + math.exp(a)  # edge - theta, without cancellation
        z = (np.log(y) - mu) / sigma
        log_p = self._log_bin_probabilities(z)
        value = np.dot(self.occupied_counts, log_p[self.occupied])
        # d log-likelihood / d z_e: edge e is the top of bin e and the bottom of bin e + 1
        per_bin = _zero_where(self.bin_counts * np.exp(-log_p), self.empty)
        w = np.exp(_log_phi(z)) * (per_bin[:-1] - per_bin[1:])
        # dz/dtheta = -1/(sigma y), dz/dmu = -1/sigma, dz/dsigma = -z/sigma
        g_theta = -np.dot(w, 1 / y) / sigma
        g_mu = -w.sum() / sigma
        g_sigma = -np.dot(w, z) / sigma
        return value, np.array([-g_theta * math.exp(a), g_mu, g_sigma * sigma])

    def with_hessian(self, p):
        """(value, gradient, Hessian) of the objective (exact likelihood only),
        for Newton steps: the edges' second derivatives form a tridiagonal
        matrix in z, chained through z(theta, mu, sigma) and the
        reparametrisation."""
        try:
            with np.errstate(all="ignore"):
                return self._with_hessian(*p)
        except (ValueError, OverflowError, ZeroDivisionError):
            return NOT_FINITE, np.zeros(3), np.eye(3)

    def _with_hessian(self, a, mu, s):
        sigma, t = math.exp(s), math.exp(a)
        y = self.offsets + t
        z = (np.log(y) - mu) / sigma
        log_p = self._log_bin_probabilities(z)
        log_phi = _log_phi(z)
        r_top = np.exp(log_phi - log_p[:-1])  # edge e as the top of bin e
        r_bottom = -np.exp(log_phi - log_p[1:])  # and as the bottom of bin e + 1
        # the terms of empty bins are zero (their r may not be finite)
        w = _zero_where(self.count_below * r_top, self.below_empty) + _zero_where(
            self.count_above * r_bottom, self.above_empty
        )
        diag = _zero_where(self.count_below * (-z * r_top - r_top**2), self.below_empty) + _zero_where(
            self.count_above * (-z * r_bottom - r_bottom**2), self.above_empty
        )
        off = _zero_where(self.minus_count_between * r_bottom[:-1] * r_top[1:], self.between_empty)
        grad_z = np.empty((3, len(y)))  # dz/d(theta, mu, sigma) per edge
        grad_z[0] = -1 / (sigma * y)
        grad_z[1] = -1 / sigma
        grad_z[2] = -z / sigma
        h = (grad_z * diag) @ grad_z.T
        cross = (grad_z[:, :-1] * off) @ grad_z[:, 1:].T
        h += cross + cross.T
        # sum_e w_e * second derivatives of z_e
        h[0, 0] += np.dot(w, -1 / (sigma * y**2))
        h[0, 2] += np.dot(w, 1 / (sigma**2 * y))
        w_sum = w.sum()
        h[1, 2] += w_sum / sigma**2
        h[2, 2] += np.dot(w, 2 * z / sigma**2)
        h[2, 0], h[2, 1] = h[0, 2], h[1, 2]
        g = np.array([np.dot(w, grad_z[0]), -w_sum / sigma, -np.dot(w, z) / sigma])
        # theta = 0.5 - exp(a): d theta/da = d2 theta/da2 = -t; sigma = exp(s)
        jac = np.array([-t, 1.0, sigma])
        h = h * (jac[:, None] * jac)
        h[0, 0] += g[0] * -t
        h[2, 2] += g[2] * sigma
        value = np.dot(self.occupied_counts, log_p[self.occupied])
        grad = g * jac
        if not (math.isfinite(value) and np.isfinite(grad).all() and np.isfinite(h).all()):
            return NOT_FINITE, np.zeros(3), np.eye(3)
        return -value / self.n_total, -grad / self.n_total, -h / self.n_total

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
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; use one of {LIKELIHOODS}")
    h = np.asarray(histogram, dtype=float)
    if h.ndim != 1 or len(h) < 4:
        raise ValueError("histogram needs counts for at least I = 0..3")
    if h[1:].sum() < 10:
        return _failed("fewer than 10 pixels with positive counts below Imax")
    theta0, mu0, sigma0 = starting_values(h, n_above)
    objective = Objective(h, n_above, likelihood)
    x0 = np.array([math.log(0.5 - theta0), mu0, math.log(sigma0)])
    if likelihood == "exact":
        result = _newton(objective, x0, max_iterations)
    else:
        result = optimize.minimize(
            objective, x0, jac=True, method="BFGS", options={"gtol": 1e-7, "maxiter": max_iterations}
        )
    a, mu, s = result.x
    theta, sigma = 0.5 - math.exp(a), math.exp(s)
    # a start where the likelihood is not finite leaves the optimiser at
    # NOT_FINITE with a zero gradient, which it takes for convergence
    ll = -result.fun * objective.n_total if result.fun < NOT_FINITE else -math.inf
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
    """Damped Newton with backtracking for the exact likelihood: a handful of
    iterations instead of BFGS's dozens of evaluations.  It stops as
    converged when the gradient vanishes or when the decrease a full step
    predicts (or a back-tracked step could still achieve) is below the
    objective's rounding: further steps can only shuffle the last bits."""
    value, grad, hessian = objective.with_hessian(x)
    damping = 0.0
    message = "maximum number of iterations reached"
    success = False
    iteration = 0
    while iteration < max_iterations:
        if np.abs(grad).max() < gtol:
            success, message = True, "converged"
            break
        rounding = ROUNDING_ULPS * np.spacing(abs(value))
        iteration += 1
        while True:
            try:
                step = -np.linalg.solve(hessian + damping * _IDENTITY, grad)
                if np.isfinite(step).all() and np.dot(step, grad) < 0:
                    break
            except np.linalg.LinAlgError:
                pass
            damping = max(2 * damping, 1e-6 * (1 + np.abs(np.diag(hessian)).max()))
            if damping > 1e12:
                return optimize.OptimizeResult(
                    x=x, fun=value, jac=grad, nit=iteration, success=False, status=3,
                    message="no descent direction",
                )
        slope = np.dot(grad, step)
        if -0.5 * slope < rounding and damping == 0.0:
            success, message = True, "converged (the next step is below rounding)"
            break
        new_value, new_grad, new_hessian = objective.with_hessian(x + step)
        t = 1.0
        while new_value > value + 1e-4 * t * slope and -t * slope >= rounding:
            t *= 0.5
            new_value, new_grad = objective(x + t * step)
            new_hessian = None
        if new_value > value + 1e-4 * t * slope:
            message = "converged (no step changes the objective beyond rounding)"
            success = bool(np.max(np.abs(grad)) < 1e-6)
            if not success:
                message = "line search failed"
            break
        x = x + t * step
        value, grad = new_value, new_grad
        hessian = new_hessian if new_hessian is not None else objective.with_hessian(x)[2]
        damping = damping / 10 if t == 1.0 else damping
    return optimize.OptimizeResult(
        x=x, fun=value, jac=grad, nit=iteration, success=success,
        status=0 if success else 2, message=message,
    )


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
