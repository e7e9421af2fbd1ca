"""Mean-field chi_1 for many (sigma_w, sigma_b) of one activation at once (the sweeps' chi_theory).

:func:`vgcore.theory.chi1` solves one fixed point at a time (a bracketing
search and Brent's method over scalar quadratures, about 2 ms), which would
dominate a sweep of thousands of configs.  :func:`chi1_many` solves them all
together: the same variance map F(q) = sigma_w^2 (kappa q + phi2(q)) +
sigma_b^2, the same search for the fixed point reached from q0 = 1 (factors
of 16 up or down from 1, on F tabulated at those points), a guess interpolated
from F tabulated inside the bracket, then a safeguarded Newton iteration (dF/dq
from the same moments; geometric bisection where a step would leave the
bracket), every step vectorised over the pairs.

The moments use vgcore.theory's composite Gauss-Legendre rule with a panel
edge at the kink, at a scale of 2^-k no coarser than the scalar code's
min(1, 1 / sqrt(q)) (about 1e-16 relative either way), so that the q of one
scale share one rule.  Pairs whose answer needs one of theory's special
branches (q* = 0, q* = inf, F(1) = 1 exactly, a root the iteration does not
pin down, piecewise-linear activations with their closed forms) are handed
to :func:`vgcore.theory.chi1` itself.  The results agree with
:func:`vgcore.theory.chi1` to about 1e-13 relative (tests/test_sweep.py
holds them to 1e-12).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from vgcore import theory
from vgcore._activations import activation as activation_values

#: Newton stops when a step is below this fraction of q: a few ulps, where the rounding of F(q) - q
#: keeps quadratically converged steps (Brent's rtol in vgcore.theory is 4 eps).
_RTOL = 64.0 * np.finfo(float).eps
#: Rows of quadrature evaluated at once (a block's temporaries stay in cache).
_BLOCK_ROWS = 256
#: Where |dF/dq - 1| at the root is below this, the root is ill-conditioned: the scalar solver decides.
_CONDITION = 1e-3


@functools.lru_cache(maxsize=64)
def _rule(level: int) -> tuple[np.ndarray, np.ndarray]:
    """vgcore.theory's fine rule around the kink at scale 2^-level: nodes z and weights."""
    z, weights, _ = theory._gauss_rule(np.zeros(1), 2.0 ** -level)
    return z, weights


def _expect(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Row sums of values * weights: each row summed on its own (a matrix product's rounding would
    depend on how many rows it holds, so a pair's chi_1 on which pairs are solved with it)."""
    return (values * weights).sum(axis=1)


def _moments(name: str, q: np.ndarray, need_dphi2: bool = True,
             need_phi2: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(phi2, dphi2, slope) of vgcore.theory._moments for an array of q > 0, vectorised.

    The q of one rule scale are evaluated together, below and above q = 1
    (theory's _DIRECT_BELOW) separately, in blocks of rows that stay in cache;
    a moment not needed is left NaN.
    """
    s_plus, c_plus, s_minus, c_minus = theory._ASYMPTOTES[name]
    kappa = theory._kappa(name)
    root_q = np.sqrt(q)
    odd = s_plus * c_plus - s_minus * c_minus
    phi2 = np.full_like(q, np.nan)
    dphi2 = np.full_like(q, np.nan)
    slope = np.empty_like(q)
    # the scalar code's scale is min(1, 1/sqrt q); level k uses 2^-k <= that scale
    levels = np.maximum(0, np.ceil(np.log2(np.maximum(root_q, 1.0)) - 1e-12)).astype(int)
    direct_rows = q < theory._DIRECT_BELOW
    for level in np.unique(levels):
        z, weights = _rule(int(level))
        for direct in (True, False):
            rows = np.flatnonzero((levels == level) & (direct_rows == direct))
            for start in range(0, rows.size, _BLOCK_ROWS):
                chosen = rows[start:start + _BLOCK_ROWS]
                r = root_q[chosen]
                h = r[:, None] * z[None, :]
                value, derivative = activation_values(name, h)
                positive = h > 0
                slope_r = np.where(positive, s_plus, s_minus) if need_dphi2 or not direct else None
                if need_dphi2:
                    dphi2[chosen] = _expect(derivative * derivative - slope_r * slope_r, weights)
                if direct:
                    if need_phi2:
                        phi2[chosen] = _expect(value * value, weights) - kappa * q[chosen]
                    slope[chosen] = _expect(value * derivative * z, weights) / r - kappa
                    continue
                line = slope_r * h + np.where(positive, c_plus, c_minus)
                if need_phi2:
                    r2_excess = 2.0 * odd * r / theory._SQRT_2PI + 0.5 * (c_plus * c_plus + c_minus * c_minus)
                    phi2[chosen] = r2_excess + _expect((value - line) * (value + line), weights)
                slope[chosen] = (odd / (theory._SQRT_2PI * r)
                                 + _expect((value * derivative - line * slope_r) * z, weights) / r)
    return phi2, dphi2, slope


def _excess(name: str, q: np.ndarray, var_w: np.ndarray, var_b: np.ndarray, lead: np.ndarray):
    """F(q) - q and dF/dq - 1 (as vgcore.theory._excess), vectorised."""
    phi2, _, slope = _moments(name, q, need_dphi2=False)
    return lead * q + var_w * phi2 + var_b, lead + var_w * slope


#: Sub-points per factor-16 interval of the bracketing search, where F(q) - q is tabulated.
_SUBPOINTS = 16
#: Newton steps from the tabulated guess before a pair is left to the scalar solver.
_POLISH_STEPS = 10


@functools.lru_cache(maxsize=4096)
def _tabulated_phi2(name: str, interval: int) -> tuple[np.ndarray, np.ndarray]:
    """(q, phi2(q)) at 16^interval * 16^(i / _SUBPOINTS), i = 0 .. _SUBPOINTS (both ends included)."""
    q = theory._SEARCH_FACTOR ** (interval + np.arange(_SUBPOINTS + 1) / _SUBPOINTS)
    q[0], q[-1] = theory._SEARCH_FACTOR ** interval, theory._SEARCH_FACTOR ** (interval + 1)
    return q, _moments(name, q)[0]


@functools.lru_cache(maxsize=64)
def _phi2_at_powers(name: str, last: int) -> np.ndarray:
    """phi2(16^j) for j = -last .. last, the points of the bracketing search."""
    return _moments(name, theory._SEARCH_FACTOR ** np.arange(-last, last + 1).astype(np.float64))[0]


def chi1_many(activation: str, sigma_w: np.ndarray, sigma_b: np.ndarray) -> np.ndarray:
    """:func:`vgcore.theory.chi1` for every pair (sigma_w[i], sigma_b[i]) of one activation.

    Parameters
    ----------
    activation : str
        One of :data:`vgcore.ACTIVATIONS`.
    sigma_w, sigma_b : ndarray, shape (N,)
        Valid weight and bias scales (as vgcore.theory accepts them).

    Returns
    -------
    ndarray, shape (N,)
        chi_1 per pair.
    """
    sigma_w = np.asarray(sigma_w, dtype=np.float64)
    sigma_b = np.asarray(sigma_b, dtype=np.float64)
    result = np.full(sigma_w.shape, np.nan)
    if sigma_w.size == 0:
        return result
    name = activation
    if name in theory._HOMOGENEOUS:  # closed forms: the scalar code is already cheap
        return np.array([theory.chi1(name, float(w), float(b)) for w, b in zip(sigma_w, sigma_b,
                                                                               strict=True)])
    var_w, var_b = sigma_w * sigma_w, sigma_b * sigma_b
    kappa = theory._kappa(name)
    lead = var_w * kappa - 1.0
    lead = np.where(np.abs(lead) <= 8.0 * np.finfo(float).eps, 0.0, lead)
    # a zero bias with phi(0) = 0 makes q = 0 a fixed point (F(0) = 0): where F(1) < 1 theory returns
    # q* = 0 when it attracts (var_w phi'(0)^2 <= 1) or when the downward search finds no sign change
    zero_fixed = (var_b == 0.0) & (float(activation_values(name, np.zeros(1))[0][0]) == 0.0)
    scalar = np.zeros(sigma_w.shape, dtype=bool)
    at_zero_q = np.zeros(sigma_w.shape, dtype=bool)
    dphi2_zero = theory._moments(name, 0.0).dphi2

    # the search of vgcore.theory._find_fixed_point: from q0 = 1 by factors of 16, up where
    # F(1) > 1, down where F(1) < 1, to the first sign change of F(q) - q; F(q) - q at the powers
    # of 16 is lead q + var_w phi2(q) + var_b with phi2 tabulated once per activation
    last = math.floor(math.log(theory._Q_MAX) / math.log(theory._SEARCH_FACTOR))
    powers = np.arange(-last, last + 1)
    q_powers = theory._SEARCH_FACTOR ** powers.astype(np.float64)
    phi2_powers = _phi2_at_powers(name, last)
    excess = lead[:, None] * q_powers + var_w[:, None] * phi2_powers + var_b[:, None]
    at_one = excess[:, last]
    scalar |= at_one == 0.0
    up = at_one > 0.0
    above = np.arange(last + 1, 2 * last + 1)
    below = np.arange(last - 1, -1, -1)
    up_hits = excess[:, above] <= 0.0
    down_hits = excess[:, below] >= 0.0
    up_found, down_found = up_hits.any(axis=1), down_hits.any(axis=1)
    up_step = np.where(up_found, up_hits.argmax(axis=1), 0)
    down_step = np.where(down_found, down_hits.argmax(axis=1), 0)
    # the interval [16^j, 16^(j+1)] holding the sign change; none (q* = 0, inf) -> scalar code
    interval = np.where(up, above[up_step] - 1 - last, below[down_step] - last)
    attracting = var_w * (dphi2_zero + kappa) <= 1.0
    at_zero_q |= zero_fixed & ~up & (at_one < 0.0) & (attracting | ~down_found)
    scalar |= np.where(up, ~up_found, ~down_found) & ~at_zero_q
    # going up past 1e4, theory may stop at its divergence test instead: leave those to it
    scalar |= up & (lead > 0.0) & (q_powers[np.minimum(above[up_step], 2 * last)] > theory._Q_ASYMPTOTIC)

    active = np.flatnonzero(~scalar & ~at_zero_q)
    q = np.ones(sigma_w.shape)
    low = np.ones(sigma_w.shape)
    high = np.ones(sigma_w.shape)
    for j in np.unique(interval[active]):
        members = active[interval[active] == j]
        q_sub, phi2_sub = _tabulated_phi2(name, int(j))
        sub = lead[members, None] * q_sub + var_w[members, None] * phi2_sub + var_b[members, None]
        # first sub-point where F(q) - q stops being positive (it is positive at 16^j's side below)
        crossing = np.argmax(sub <= 0.0, axis=1)
        crossing = np.clip(crossing, 1, _SUBPOINTS)
        a, b = q_sub[crossing - 1], q_sub[crossing]
        ea, eb = sub[np.arange(members.size), crossing - 1], sub[np.arange(members.size), crossing]
        with np.errstate(divide="ignore", invalid="ignore"):
            guess = np.where(ea != eb, a + (b - a) * ea / (ea - eb), 0.5 * (a + b))
        low[members], high[members] = a, b
        q[members] = np.clip(guess, a, b)

    # safeguarded Newton on F(q) - q inside [low, high] (positive below the root, negative above)
    converged = np.zeros(sigma_w.shape, dtype=bool)
    for _ in range(_POLISH_STEPS):
        index = active[~converged[active]]
        if index.size == 0:
            break
        value, derivative = _excess(name, q[index], var_w[index], var_b[index], lead[index])
        q_i = q[index]
        low_i = np.where(value > 0.0, q_i, low[index])
        high_i = np.where(value < 0.0, q_i, high[index])
        with np.errstate(divide="ignore", invalid="ignore"):
            step = value / derivative
        new = q_i - step
        done = (value == 0.0) | (np.abs(step) <= _RTOL * q_i)
        outside = ~done & (~np.isfinite(new) | (new <= low_i) | (new >= high_i))
        new = np.where(outside, np.sqrt(low_i * high_i), new)
        q[index] = np.where(value == 0.0, q_i, new)
        low[index], high[index] = low_i, high_i
        converged[index] = done
    scalar[active[~converged[active]]] = True

    # q* = 0: chi_1 is the limit q -> 0+ (theory._solve with the moments at 0)
    zero = np.flatnonzero(at_zero_q & ~scalar)
    chi1_minus_1 = lead[zero] + var_w[zero] * dphi2_zero
    chi1 = var_w[zero] * (kappa + dphi2_zero)
    result[zero] = np.where((chi1_minus_1 < -0.5) & np.isfinite(chi1), chi1, 1.0 + chi1_minus_1)

    index = np.flatnonzero(~scalar & ~at_zero_q)
    if index.size:
        _, dphi2, slope = _moments(name, q[index], need_phi2=False)
        # an ill-conditioned root (dF/dq near 1): the scalar solver decides
        scalar[index[np.abs(lead[index] + var_w[index] * slope) < _CONDITION]] = True
        chi1_minus_1 = lead[index] + var_w[index] * dphi2
        chi1 = var_w[index] * (kappa + dphi2)
        direct = (chi1_minus_1 < -0.5) & np.isfinite(chi1)
        result[index] = np.where(direct, chi1, 1.0 + chi1_minus_1)
    for i in np.flatnonzero(scalar):
        result[i] = theory.chi1(name, float(sigma_w[i]), float(sigma_b[i]))
    return result


__all__ = ["chi1_many"]
