"""Maximum-likelihood fit of a shifted (three-parameter) lognormal, closed by
its normal limit, to a histogram of low pixel counts in which a count of 0
stands for "any value below 0.5" (Hattne et al., 2016, J. Appl. Cryst. 49,
1029-1034).

The paper's model is X = theta + exp(mu + sigma * Z), Z ~ N(0, 1).  Real
camera backgrounds dominated by read noise are near-Gaussian, and there the
maximum-likelihood lognormal runs off to its normal limit (theta -> -inf,
mu -> inf, sigma -> 0), which no optimiser reaches in (theta, mu, sigma).
So the fit works in the location-scale-shape form of the same family:

    X = location + scale * (exp(shape * Z) - 1) / shape,   shape >= 0,

the paper's lognormal for shape > 0 (sigma = shape, mu = log(scale / shape),
theta = location - scale / shape; location is the median) and the normal
N(location, scale^2) at shape = 0, an ordinary point of the parameter space
rather than a limit.  Its CDF is F(x) = Phi(z(x)) with
z(x) = log1p(shape * w) / shape, w = (x - location) / scale (z = w at
shape = 0).  The fit is the paper's lognormal where the data are skewed, the
normal where they are not (the shape at its bound 0: ``LognormalFit.model``
says which); either way it converges in a handful of Newton steps.

Two likelihoods are offered:

``paper``
    equation (4) of the paper: H(0) log F(0.5) + sum_{I=1}^{Imax} H(I) log f(I).
    The density stands in for the bin probability and the counts above Imax
    are ignored, which biases the fit when much of the mass lies above Imax.
``exact``
    H(0) log F(0.5) + sum_{I=1}^{Imax} H(I) log[F(I+0.5) - F(I-0.5)]
    + N_above log[1 - F(Imax+0.5)]: the multinomial likelihood of the
    binned, right-censored data.

The optimiser works on (location, log scale, shape) with analytic gradients
(and, for ``exact``, the analytic Hessian), with the bound shape >= 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special

LIKELIHOODS = ("exact", "paper")

#: the names of the two members of the family (LognormalFit.model)
LOGNORMAL = "lognormal"
NORMAL = "normal"

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)

#: what the objective returns (with a zero gradient) where the likelihood is
#: not finite: large enough to be rejected by any descent, finite so that the
#: optimisers' arithmetic stays defined; never a converged fit's value
NOT_FINITE = 1e300


@dataclass(frozen=True)
class Distribution:
    """A member of the family: X = location + scale * (exp(shape Z) - 1) / shape
    (the normal N(location, scale^2) at shape = 0)."""

    location: float
    scale: float
    shape: float

    @classmethod
    def from_lognormal(cls, theta: float, mu: float, sigma: float) -> Distribution:
        """The paper's X = theta + exp(mu + sigma Z) in this form."""
        return cls(theta + math.exp(mu), math.exp(mu) * sigma, sigma)

    @property
    def model(self) -> str:
        return NORMAL if self.shape == 0 else LOGNORMAL

    @property
    def theta(self) -> float:
        """The lognormal's shift, the lower end of the support (-inf: normal)."""
        return self.location - self.scale / self.shape if self.shape > 0 else -math.inf

    @property
    def mu(self) -> float:
        """The lognormal's mu (None for the normal)."""
        return math.log(self.scale / self.shape) if self.shape > 0 else None

    @property
    def sigma(self) -> float:
        """The lognormal's sigma (0 for the normal)."""
        return self.shape

    def z(self, x) -> np.ndarray:
        """The normal score of x: F(x) = Phi(z(x)); -inf below the support."""
        w = (np.asarray(x, dtype=float) - self.location) / self.scale
        if self.shape == 0:
            return w
        u = self.shape * w
        inside = u > -1
        # log1p only inside the support (no warnings to silence: faster)
        return np.where(
            inside, np.log1p(np.where(inside, u, 0.0)) / self.shape, -np.inf
        )

    def cdf(self, x) -> np.ndarray:
        return special.ndtr(self.z(x))

    def quantile(self, p: float) -> float:
        z = float(special.ndtri(p))
        if self.shape == 0:
            return self.location + self.scale * z
        return self.location + self.scale * math.expm1(self.shape * z) / self.shape

    def bin_probabilities(self, imax: int) -> np.ndarray:
        """Probabilities of the histogram bins 0..imax and of the censored bin
        (> imax + 0.5): bin 0 is (-inf, 0.5), bin I is [I - 0.5, I + 0.5)."""
        edges = np.concatenate(([-np.inf], np.arange(imax + 1) + 0.5, [np.inf]))
        return np.diff(self.cdf(edges))


@dataclass(frozen=True)
class LognormalFit:
    """Outcome of one fit; ``converged`` is False when the parameters must not
    be used."""

    location: float
    scale: float
    shape: float
    log_likelihood: float
    rmsd: float
    converged: bool
    n_iterations: int
    message: str = ""

    @property
    def distribution(self) -> Distribution:
        return Distribution(self.location, self.scale, self.shape)

    @property
    def model(self) -> str | None:
        """ "lognormal" (the paper's) or "normal" (its limit); None if not fitted."""
        return self.distribution.model if np.isfinite(self.shape) else None

    @property
    def theta(self) -> float:
        return self.distribution.theta if np.isfinite(self.shape) else math.nan

    @property
    def mu(self) -> float:
        return self.distribution.mu if np.isfinite(self.shape) else math.nan

    @property
    def sigma(self) -> float:
        return self.shape

    def as_dict(self) -> dict:
        """The record of the fit: the model, its location, scale and shape,
        and for the lognormal the paper's theta, mu and sigma (None for the
        normal)."""
        lognormal = self.model == LOGNORMAL
        return {
            "model": self.model,
            "location": self.location,
            "scale": self.scale,
            "shape": self.shape,
            "theta": self.theta if lognormal else None,
            "mu": self.mu if lognormal else None,
            "sigma": self.sigma if lognormal else None,
            "log_likelihood": self.log_likelihood,
            "rmsd": self.rmsd,
            "converged": self.converged,
            "n_iterations": self.n_iterations,
            "message": self.message,
        }


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


#: |shape * w| below which the derivatives of z in the shape are summed as
#: power series (their closed forms cancel there); SERIES_TERMS terms leave
#: a relative error below 0.1**24
SERIES_LIMIT = 0.1
SERIES_TERMS = 24
# z = sum_k (-1)^(k+1) shape^(k-1) w^k / k, so dz/dshape = w^2 A(u) and
# d2z/dshape2 = w^3 B(u), u = shape * w, with these coefficients of u^j
# (highest power first, for np.polyval)
_A = np.array([(-1) ** (j + 1) * (j + 1) / (j + 2) for j in range(SERIES_TERMS)])[::-1]
_B = np.array([(-1) ** j * (j + 2) * (j + 1) / (j + 3) for j in range(SERIES_TERMS)])[
    ::-1
]
#: the coefficients of A and B side by side, one (2, 1) column per power
_AB = np.stack((_A, _B), axis=1)[:, :, None]


def derivative_series(u):
    """(A(u), B(u)) by Horner's rule, both at once: the operations of
    np.polyval (hence its results), at half the cost of two calls."""
    series = np.zeros((2, len(u)))
    for coefficients in _AB:
        series *= u
        series += coefficients
    return series


def _z_and_derivatives(x, location, s, shape):
    """z at the points x (rows of a batch) and its first and second
    derivatives in (location, s = log scale, shape): z, [dz/dp] (rows, 3,
    points), {(i, j): d2z/dp_i dp_j}; z = -inf (and nan derivatives) below
    the support."""
    scale = np.exp(s)
    w = (x - location) / scale
    u = shape * w
    q = 1 + u
    positive = shape > 0
    z = np.where(
        positive, np.log1p(np.maximum(u, -1)) / np.where(positive, shape, 1), w
    )
    z = np.where(q > 0, z, -np.inf)
    small = np.abs(u) < SERIES_LIMIT
    u_safe = np.where(small, 1.0, u)
    log1p_u = np.log1p(np.maximum(u_safe, -1 + 1e-300))
    a = (u_safe / (1 + u_safe) - log1p_u) / u_safe**2
    b = (
        -((u_safe / (1 + u_safe)) ** 2) - 2 * u_safe / (1 + u_safe) + 2 * log1p_u
    ) / u_safe**3
    if small.any():  # the series only where they are used
        a[small], b[small] = derivative_series(u[small])
    q2 = q * q
    grad = np.stack((-1 / (scale * q), -w / q, w * w * a), axis=1)
    second = {
        (0, 0): -shape / (q2 * scale * scale),
        (0, 1): 1 / (scale * q2),
        (1, 1): w / q2,
        (0, 2): w / (scale * q2),
        (1, 2): w * w / q2,
        (2, 2): w**3 * b,
    }
    return z, grad, second


def _edges_kept(needed, n_edges):
    """The edges (or counts) the likelihood runs over: only the ``needed``
    ones when that drops at least half of the ``n_edges``, which makes a
    large Imax (histogram.max) cheap; else all."""
    return needed if 2 * len(needed) <= n_edges else np.arange(n_edges)


def _occupied_intervals(bin_counts):
    """(edge offsets, interval counts) of the exact likelihood: a run of empty
    bins adds nothing to the multinomial likelihood, so the edges inside it
    can go, the run becoming one empty interval.  Edge k is I = k + 0.5,
    the top of bin k."""
    occupied = bin_counts > 0
    kept = _edges_kept(
        np.flatnonzero(occupied[:-1] | occupied[1:]), len(bin_counts) - 1
    )
    cumulative = np.cumsum(bin_counts)
    interval_counts = np.diff(
        np.concatenate(([0.0], cumulative[kept], cumulative[-1:]))
    )
    return kept.astype(float), interval_counts


class ExactLikelihood:
    """Negative mean log-likelihood of the exact (binned, censored) model,
    with its gradient and Hessian in (location, log scale, shape), for a
    batch of histograms at once, one per row: an evaluation of ten regions
    costs about as much as one of a single region (numpy call overhead
    dominates these short sums).

    Rows with fewer edges are padded by repeating their last edge: the
    empty bins between equal edges add nothing (their terms are zeroed), and
    the censored bin keeps its count."""

    def __init__(self, histograms, n_aboves):
        # bins (-inf, 0.5), [0.5, 1.5), ..., [Imax - 0.5, Imax + 0.5), [Imax + 0.5, inf)
        rows = [
            _occupied_intervals(np.append(np.asarray(h, dtype=float), float(n)))
            for h, n in zip(histograms, n_aboves)
        ]
        n_edges = max(len(offsets) for offsets, _ in rows)
        self.edges = np.empty((len(rows), n_edges))
        self.bin_counts = np.zeros((len(rows), n_edges + 1))
        for row, (offsets, counts) in enumerate(rows):
            self.edges[row, : len(offsets)] = offsets + 0.5
            self.edges[row, len(offsets) :] = offsets[-1] + 0.5
            self.bin_counts[row, : len(offsets)] = counts[:-1]
            self.bin_counts[row, -1] = counts[-1]
        self.n_total = self.bin_counts.sum(axis=1)
        self.occupied = self.bin_counts > 0

    def __call__(self, p, rows):
        """(value, gradient, Hessian) at parameters ``p`` (one row of
        (location, log scale, shape) per entry of ``rows``); NOT_FINITE, a
        zero gradient and the identity where the likelihood or its
        derivatives are not finite (an edge below the support)."""
        with np.errstate(all="ignore"):
            value, grad, hessian = self._evaluate(p, rows)
        bad = ~(
            np.isfinite(value)
            & np.isfinite(grad).all(axis=1)
            & np.isfinite(hessian).all(axis=(1, 2))
        )
        n_total = self.n_total[rows]
        value, grad, hessian = (
            -value / n_total,
            -grad / n_total[:, None],
            -hessian / n_total[:, None, None],
        )
        value[bad], grad[bad], hessian[bad] = NOT_FINITE, 0.0, _IDENTITY
        return value, grad, hessian

    def _evaluate(self, p, rows):
        z, grad_z, second = _z_and_derivatives(
            self.edges[rows], p[:, 0:1], p[:, 1:2], p[:, 2:3]
        )
        counts, occupied = self.bin_counts[rows], self.occupied[rows]
        n = len(rows)
        log_p = _log_diff_ndtr(
            np.hstack((z, np.full((n, 1), np.inf))),
            np.hstack((np.full((n, 1), -np.inf), z)),
        )
        log_phi = _log_phi(z)
        # the terms of empty bins are zero (their ratios may not be finite);
        # edge e is the top of bin e and the bottom of bin e + 1
        below, above = occupied[:, :-1], occupied[:, 1:]
        r_top = np.exp(log_phi - log_p[:, :-1])
        r_bottom = -np.exp(log_phi - log_p[:, 1:])
        top_terms = np.where(below, counts[:, :-1] * r_top, 0.0)
        bottom_terms = np.where(above, counts[:, 1:] * r_bottom, 0.0)
        w = top_terms + bottom_terms  # d value / d z_e
        diag = np.where(below, top_terms * (-z - r_top), 0.0) + np.where(
            above, bottom_terms * (-z - r_bottom), 0.0
        )
        # bin e + 1 joins edges e and e + 1
        off = np.where(
            occupied[:, 1:-1], -counts[:, 1:-1] * r_bottom[:, :-1] * r_top[:, 1:], 0.0
        )
        h = np.einsum("rie,re,rje->rij", grad_z, diag, grad_z)
        cross = np.einsum("rie,re,rje->rij", grad_z[:, :, :-1], off, grad_z[:, :, 1:])
        h += cross + cross.transpose(0, 2, 1)
        for (i, j), d2z in second.items():  # sum_e w_e * second derivatives of z_e
            term = (w * d2z).sum(axis=1)
            h[:, i, j] += term
            if i != j:
                h[:, j, i] += term
        g = np.einsum("re,rie->ri", w, grad_z)
        value = np.where(occupied, counts * log_p, 0.0).sum(axis=1)
        return value, g, h


class Objective:
    """Negative mean log-likelihood of one histogram and its gradient in
    (location, log scale, shape)."""

    def __init__(self, histogram, n_above, likelihood):
        h = np.asarray(histogram, dtype=float)
        self.likelihood = likelihood
        if likelihood == "exact":
            self._batch = ExactLikelihood([h], [n_above])
            self.n_total = self._batch.n_total[0]
            # the bin edges (k + 0.5 for each offset k) and interval counts used
            self.offsets, self.bin_counts = (
                self._batch.edges[0] - 0.5,
                self._batch.bin_counts[0],
            )
        else:
            self.h0 = h[0]
            # the positive counts I (those that occur), and I - 0.5
            kept = _edges_kept(np.flatnonzero(h[1:] > 0), len(h) - 1)
            self.points = kept + 1.0
            self.offsets = kept + 0.5
            self.positive_counts = h[1:][kept]
            self.n_total = h.sum()

    def __call__(self, p):
        p = np.asarray(p, dtype=float)
        if self.likelihood == "exact":
            value, grad, _ = self._batch(p[None, :], [0])
            return value[0], grad[0]
        with np.errstate(all="ignore"):
            value, grad = self._paper(p)
        if not np.isfinite(value) or not np.all(np.isfinite(grad)):
            return NOT_FINITE, np.zeros(3)
        return -value / self.n_total, -grad / self.n_total

    def _paper(self, p):
        """H(0) log F(0.5) + sum H(I) log f(I), f = phi(z) dz/dx with
        dz/dx = 1 / (scale q), q = 1 + shape w; and its gradient."""
        location, s, shape = p[None, 0:1], p[None, 1:2], p[None, 2:3]
        x = np.concatenate(([0.5], self.points))[None, :]
        z, grad_z, _ = _z_and_derivatives(x, location, s, shape)
        z, grad_z = z[0], grad_z[0]
        scale = math.exp(p[1])
        w = (x[0] - p[0]) / scale
        q = 1 + p[2] * w
        log_f0 = special.log_ndtr(z[0])
        value = self.h0 * log_f0 if self.h0 else 0.0
        g = (
            self.h0 * math.exp(_log_phi(z[0]) - log_f0) * grad_z[:, 0]
            if self.h0
            else np.zeros(3)
        )
        hpos, zp, qp, wp = self.positive_counts, z[1:], q[1:], w[1:]
        value += np.dot(hpos, _log_phi(zp) - p[1] - np.log(qp))
        # d log f / dp = -z dz/dp - d log q / dp - (0, 1, 0)
        dlogq = np.stack((-p[2] / (scale * qp), -p[2] * wp / qp, wp / qp))
        g = (
            g
            + (-(zp * grad_z[:, 1:]) - dlogq) @ hpos
            - np.array([0.0, hpos.sum(), 0.0])
        )
        return value, g


def starting_values(histogram: np.ndarray, n_above: int) -> tuple:
    """Quantile-matching estimate of (location, scale, shape) from the observed
    part of the empirical distribution (counts >= 1), used to start the
    optimiser: a lognormal through three quantiles (the normal where they are
    not skewed to the right)."""
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
        return max(xs[-1], 1.0), max(xs[-1], 1.0), 0.5
    shape = min(max(math.log(d2 / d1) / delta, 0.0), 3.0)
    if shape == 0:
        scale = d1 / delta
        return xs[1] - scale * zs[1], scale, 0.0
    # through the lower two quantiles: x = location + scale (exp(shape z) - 1) / shape
    scale = shape * d1 / (math.exp(shape * zs[1]) - math.exp(shape * zs[0]))
    location = xs[0] - scale * math.expm1(shape * zs[0]) / shape
    # the support's lower end (location - scale / shape) below the lowest edge
    if location - scale / shape >= 0.5 - 1e-3 * max(scale / shape, 1.0):
        shape = (
            max(scale / (location - 0.5 + 1e-3 * max(scale, 1.0)), 0.0)
            if location > 0.5
            else 0.0
        )
    return location, scale, shape


def log_likelihood(
    histogram: np.ndarray,
    n_above: int,
    distribution: Distribution,
    likelihood: str = "exact",
) -> float:
    """The log-likelihood of ``distribution`` for a histogram."""
    objective = Objective(histogram, n_above, likelihood)
    d = distribution
    value, _ = objective((d.location, math.log(d.scale), d.shape))
    return -value * objective.n_total


def fit_lognormal(
    histogram: np.ndarray,
    n_above: int = 0,
    likelihood: str = "exact",
    max_iterations: int = 200,
) -> LognormalFit:
    """Fit the family to H(0..Imax) (and, for ``exact``, the number of
    counts above Imax) by maximum likelihood."""
    return fit_lognormals([(histogram, n_above)], likelihood, max_iterations)[0]


def fit_lognormals(
    problems: list, likelihood: str = "exact", max_iterations: int = 200
) -> list:
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
        location, scale, shape = starting_values(h, n_above)
        histograms.append(h)
        n_aboves.append(n_above)
        starts.append((location, math.log(scale), shape))
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
            results.append(
                optimize.minimize(
                    objective,
                    x0,
                    jac=True,
                    method="L-BFGS-B",
                    bounds=[(None, None), (None, None), (0.0, None)],
                    options={"gtol": 1e-7, "ftol": 1e-13, "maxiter": max_iterations},
                )
            )
            n_totals.append(objective.n_total)
    for k, h, n_above, result, n_total in zip(
        fitted, histograms, n_aboves, results, n_totals
    ):
        fits[k] = _fit_from(result, h, n_above, n_total)
    return fits


def _fit_from(result, h, n_above, n_total):
    """The LognormalFit of an optimiser's result."""
    location, s, shape = result.x
    scale = math.exp(s)
    # a start where the likelihood is not finite leaves the optimiser at
    # NOT_FINITE with a zero gradient, which it takes for convergence
    ll = -result.fun * n_total if result.fun < NOT_FINITE else -math.inf
    converged = bool(result.success)
    message = str(result.message) if np.isfinite(ll) else "log-likelihood not finite"
    if not (np.isfinite(ll) and np.isfinite([location, scale, shape]).all()):
        converged = False
    expected = Distribution(location, scale, shape).bin_probabilities(len(h) - 1)[
        :-1
    ] * (h.sum() + n_above)
    rmsd = float(np.sqrt(np.mean((h - expected) ** 2)))
    return LognormalFit(
        location=float(location),
        scale=float(scale),
        shape=float(shape),
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
#: the parameter with the bound >= 0 (the shape)
_SHAPE = 2


def _steps(hessian, damping, grad, fixed):
    """Damped Newton steps of rows (the shape held where ``fixed``) and
    whether each is a descent direction."""
    hessian = hessian.copy()
    grad = grad.copy()
    hessian[fixed, _SHAPE, :] = 0.0
    hessian[fixed, :, _SHAPE] = 0.0
    hessian[fixed, _SHAPE, _SHAPE] = 1.0
    grad[fixed, _SHAPE] = 0.0
    with np.errstate(all="ignore"):
        try:
            steps = -np.linalg.solve(
                hessian + damping[:, None, None] * _IDENTITY, grad[:, :, None]
            )[:, :, 0]
        except np.linalg.LinAlgError:  # a singular matrix: row by row
            steps = np.zeros_like(grad)
            for k in range(len(grad)):
                try:
                    steps[k] = -np.linalg.solve(
                        hessian[k] + damping[k] * _IDENTITY, grad[k]
                    )
                except np.linalg.LinAlgError:
                    steps[k] = np.nan
    good = np.isfinite(steps).all(axis=1) & (np.einsum("ri,ri->r", steps, grad) < 0)
    return steps, good


def _newton(objective, x, max_iterations, gtol=1e-9):
    """Damped Newton with backtracking for the exact likelihood, bounded to
    shape >= 0 (a row whose shape is at 0 and whose gradient pushes it
    lower holds it there: the normal), every row of ``x`` (a start per
    histogram of the ExactLikelihood) on its own course, evaluated together.
    A row stops as converged when its projected gradient vanishes or when
    the decrease a full step predicts (or a back-tracked step could still
    achieve) is below the objective's rounding: further steps can only
    shuffle the last bits.  Returns an OptimizeResult per row."""
    n = len(x)
    x = np.array(x, dtype=float)
    value, grad, hessian = objective(x, np.arange(n))
    damping = np.zeros(n)
    iterations = np.zeros(n, dtype=int)
    status = np.full(
        n, -1
    )  # -1 while running; then 0 converged, 2 stopped, 3 no descent direction
    messages = ["maximum number of iterations reached"] * n

    def stop(rows, code, message):
        status[rows] = code
        for row in rows:
            messages[row] = message

    def projected(rows):
        g = grad[rows].copy()
        g[(x[rows, _SHAPE] <= 0) & (g[:, _SHAPE] > 0), _SHAPE] = 0.0
        return g

    for _ in range(max_iterations):
        rows = np.flatnonzero(status < 0)
        stop(rows[np.abs(projected(rows)).max(axis=1) < gtol], 0, "converged")
        rows = np.flatnonzero(status < 0)
        if not len(rows):
            break
        iterations[rows] += 1
        rounding = ROUNDING_ULPS * np.spacing(np.abs(value[rows]))
        fixed = (x[rows, _SHAPE] <= 0) & (grad[rows, _SHAPE] > 0)
        step = np.zeros((len(rows), 3))
        searching = np.ones(len(rows), dtype=bool)
        while searching.any():
            k = np.flatnonzero(searching)
            trial, good = _steps(
                hessian[rows[k]], damping[rows[k]], grad[rows[k]], fixed[k]
            )
            # at the bound, a step that would take the shape below 0 holds it
            outward = (
                good & ~fixed[k] & (x[rows[k], _SHAPE] <= 0) & (trial[:, _SHAPE] < 0)
            )
            if outward.any():
                fixed[k[outward]] = True
                continue
            step[k[good]] = trial[good]
            searching[k[good]] = False
            retry = rows[k[~good]]
            damping[retry] = np.maximum(
                2 * damping[retry],
                1e-6
                * (
                    1
                    + np.abs(np.diagonal(hessian[retry], axis1=1, axis2=2)).max(axis=1)
                ),
            )
            hopeless = k[~good][damping[retry] > 1e12]
            stop(rows[hopeless], 3, "no descent direction")
            searching[hopeless] = False
        moving = status[rows] < 0
        slope = np.einsum("ri,ri->r", grad[rows], step)
        below = moving & (-0.5 * slope < rounding) & (damping[rows] == 0.0)
        stop(rows[below], 0, "converged (the next step is below rounding)")
        moving &= ~below
        rows, step, slope, rounding = (
            rows[moving],
            step[moving],
            slope[moving],
            rounding[moving],
        )
        if not len(rows):
            continue
        # the longest step that keeps the shape >= 0
        with np.errstate(divide="ignore", invalid="ignore"):
            t_max = np.where(
                step[:, _SHAPE] < 0,
                np.minimum(1.0, x[rows, _SHAPE] / -step[:, _SHAPE]),
                1.0,
            )
        t = t_max.copy()
        new_value, new_grad, new_hessian = objective(
            _moved(x[rows], t, t_max, step), rows
        )
        while True:
            back = (new_value > value[rows] + 1e-4 * t * slope) & (
                -t * slope >= rounding
            )
            if not back.any():
                break
            t[back] *= 0.5
            k = np.flatnonzero(back)
            new_value[k], new_grad[k], new_hessian[k] = objective(
                _moved(x[rows[k]], t[k], t_max[k], step[k]), rows[k]
            )
        failed = new_value > value[rows] + 1e-4 * t * slope
        for k in np.flatnonzero(failed):
            if np.max(np.abs(projected([rows[k]]))) < 1e-6:
                stop(
                    [rows[k]],
                    0,
                    "converged (no step changes the objective beyond rounding)",
                )
            else:
                stop([rows[k]], 2, "line search failed")
        k, accepted = np.flatnonzero(~failed), rows[~failed]
        x[accepted] = _moved(x[accepted], t[k], t_max[k], step[k])
        value[accepted], grad[accepted], hessian[accepted] = (
            new_value[k],
            new_grad[k],
            new_hessian[k],
        )
        damping[accepted] = np.where(
            t[k] == t_max[k], damping[accepted] / 10, damping[accepted]
        )
    status[status < 0] = 2
    return [
        optimize.OptimizeResult(
            x=x[r],
            fun=value[r],
            jac=grad[r],
            nit=int(iterations[r]),
            success=status[r] == 0,
            status=int(status[r]),
            message=messages[r],
        )
        for r in range(n)
    ]


def _moved(x, t, t_max, step):
    """x + t step, the shape exactly 0 where the step reaches the bound."""
    out = x + t[:, None] * step
    out[:, _SHAPE] = np.where(
        (t == t_max) & (t_max < 1.0), 0.0, np.maximum(out[:, _SHAPE], 0.0)
    )
    return out


def _failed(message):
    nan = float("nan")
    return LognormalFit(nan, nan, nan, nan, nan, False, 0, message)


def parameter_covariance(
    histogram: np.ndarray,
    n_above: int,
    fit: LognormalFit,
    likelihood: str = "exact",
    step: float = 1e-5,
) -> np.ndarray:
    """Asymptotic covariance of (location, scale, shape) from the observed
    information (finite-difference Hessian of the analytic gradient; one-sided
    in the shape at its bound)."""
    objective = Objective(histogram, n_above, likelihood)
    p = np.array([fit.location, math.log(fit.scale), fit.shape])
    hessian = np.empty((3, 3))
    for i in range(3):
        dp = np.zeros(3)
        dp[i] = step
        if i == _SHAPE and p[i] < step:
            hessian[:, i] = (objective(p + 2 * dp)[1] - objective(p + dp)[1]) / step
        else:
            hessian[:, i] = (objective(p + dp)[1] - objective(p - dp)[1]) / (2 * step)
    hessian = 0.5 * (hessian + hessian.T) * objective.n_total
    covariance = np.linalg.inv(hessian)
    # d(location, scale, shape) / d(location, log scale, shape)
    jacobian = np.diag([1.0, fit.scale, 1.0])
    return jacobian @ covariance @ jacobian.T


def standard_errors(
    histogram: np.ndarray, n_above: int, fit: LognormalFit, likelihood: str = "exact"
) -> np.ndarray:
    """Asymptotic standard errors of (location, scale, shape)."""
    return np.sqrt(np.diag(parameter_covariance(histogram, n_above, fit, likelihood)))
