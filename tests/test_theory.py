"""Tests of vgcore.theory: mean-field fixed points, chi_1, depth scales, edge of chaos.

The references here are independent of the module's quadrature: closed forms,
scipy.integrate.quad / dblquad of the Gaussian integrals, plain iteration of the
maps, finite differences, and a Monte-Carlo of a wide random network in NumPy.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate
from threadpoolctl import threadpool_limits

from vgcore import theory
from vgcore._activations import ACTIVATIONS, LEAKY_SLOPE, activation

#: Deterministic Hypothesis settings for this module (no example database,
#: no deadline: the scipy references take a few ms per example); the tests
#: using them run once per activation, so every activation is covered.
DETERMINISTIC = settings(derandomize=True, deadline=None, database=None, max_examples=15)

SQRT2 = math.sqrt(2.0)
SMOOTH_OR_KINKED = [name for name in ACTIVATIONS if name not in ("linear", "relu", "leaky_relu")]

sigma_ws = st.floats(min_value=0.1, max_value=4.0)
sigma_bs = st.floats(min_value=0.0, max_value=2.0)
log_qs = st.floats(min_value=-6.0, max_value=4.0)


# --------------------------------------------------------------------------- independent references


def phi(name: str, h: float) -> float:
    return float(activation(name, np.array([h]))[0][0])


def dphi(name: str, h: float) -> float:
    return float(activation(name, np.array([h]))[1][0])


def gaussian_expectation(function, q: float) -> float:
    """E[function(h)], h ~ N(0, q), by scipy.integrate.quad over h on pieces.

    The pieces break at the kink h = 0, at the activations' own scale (|h| = 1,
    4, 16) and at multiples of sqrt(q), and stop at 12 sqrt(q) (the Gaussian
    mass beyond is 2e-33), so each piece is smooth and quad converges.
    """
    root_q = math.sqrt(q)
    limit = 12.0 * root_q
    breaks = {0.0, limit, -limit}
    for point in (1.0, 4.0, 16.0, 2.0 * root_q, 4.0 * root_q, 8.0 * root_q):
        if point < limit:
            breaks.update((point, -point))
    breaks = sorted(breaks)

    def integrand(h: float) -> float:
        return function(h) * math.exp(-0.5 * h * h / q) / math.sqrt(2.0 * math.pi * q)

    total = 0.0
    for low, high in itertools.pairwise(breaks):
        total += integrate.quad(integrand, low, high, epsabs=0.0, epsrel=1e-13, limit=200)[0]
    return total


def pair_expectation(name: str, q: float, c: float, which: int) -> float:
    """E[f(u1) f(u2)], (u1, u2) ~ N(0, q [[1, c], [c, 1]]), f = phi (0) or phi' (1), by dblquad in z."""
    s = math.sqrt(1.0 - c * c)
    root_q = math.sqrt(q)

    def integrand(z2: float, z1: float) -> float:
        u = activation(name, np.array([root_q * z1, root_q * (c * z1 + s * z2)]))[which]
        return float(u[0] * u[1]) * math.exp(-0.5 * (z1 * z1 + z2 * z2)) / (2.0 * math.pi)

    total = 0.0
    # Split z1 at the kink of f(u1); z2 at the kink of f(u2), which moves with z1.
    for z1_low, z1_high in ((-9.0, 0.0), (0.0, 9.0)):
        for side in (-1.0, 1.0):
            kink = (lambda z1: -c * z1 / s) if s > 0 else (lambda z1: 0.0)
            low = (lambda z1, k=kink: -9.0) if side < 0 else kink
            high = kink if side < 0 else (lambda z1: 9.0)
            total += integrate.dblquad(integrand, z1_low, z1_high, low, high, epsabs=1e-13, epsrel=1e-11)[0]
    return total


# --------------------------------------------------------------------------- criticality


def test_tanh_without_bias_is_critical_at_sigma_w_one():
    assert theory.critical_sigma_w("tanh", 0.0) == pytest.approx(1.0, abs=1e-12)
    assert theory.chi1("tanh", 1.0, 0.0) == pytest.approx(1.0, abs=1e-12)
    assert theory.fixed_point("tanh", 1.0, 0.0) == 0.0
    # Criticality: the correlation depth scale diverges.
    assert theory.depth_scales("tanh", 1.0, 0.0)[1] == math.inf
    # Either side of it: ordered below (q* = 0, chi_1 = sigma_w**2), chaotic above.
    assert theory.chi1("tanh", 0.9, 0.0) == pytest.approx(0.81, rel=1e-14)
    assert theory.chi1("tanh", 1.1, 0.0) > 1.0


@pytest.mark.parametrize("sigma_b", [0.0, 0.05, 0.3, 1.0, 3.0])
def test_relu_is_critical_at_sigma_w_squared_two(sigma_b):
    assert theory.critical_sigma_w("relu", sigma_b) == pytest.approx(SQRT2, rel=1e-14)
    assert theory.chi1("relu", SQRT2, sigma_b) == pytest.approx(1.0, rel=1e-14)
    assert theory.chi1("relu", 1.4, sigma_b) < 1.0 < theory.chi1("relu", 1.43, sigma_b)


def test_bias_moves_the_tanh_edge_of_chaos_up():
    previous = 1.0
    for sigma_b in (0.05, 0.3, 1.0):
        critical = theory.critical_sigma_w("tanh", sigma_b)
        assert critical > previous
        previous = critical
    # Schoenholz et al. (2017), figure 1: sigma_b = 0.3 sits near sigma_w**2 = 1.95.
    assert theory.critical_sigma_w("tanh", 0.3) ** 2 == pytest.approx(1.95, abs=0.02)


# --------------------------------------------------------------------------- quadrature against quad


@pytest.mark.parametrize("name", ACTIVATIONS)
@DETERMINISTIC
@given(log_q=log_qs, sigma_w=sigma_ws, sigma_b=sigma_bs)
def test_q_map_matches_independent_integral(name, log_q, sigma_w, sigma_b):
    q = 10.0**log_q
    reference = sigma_w**2 * gaussian_expectation(lambda h: phi(name, h) ** 2, q) + sigma_b**2
    assert theory.q_map(name, q, sigma_w, sigma_b) == pytest.approx(reference, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("name", ACTIVATIONS)
@DETERMINISTIC
@given(sigma_w=sigma_ws, sigma_b=sigma_bs)
def test_chi1_matches_independent_integral(name, sigma_w, sigma_b):
    q_star = theory.fixed_point(name, sigma_w, sigma_b)
    value = theory.chi1(name, sigma_w, sigma_b)
    if q_star == math.inf:
        slope_plus, slope_minus = dphi(name, 1e6), dphi(name, -1e6)
        reference = sigma_w**2 * (slope_plus**2 + slope_minus**2) / 2
    elif q_star == 0.0:
        reference = sigma_w**2 * (dphi(name, 1e-300) ** 2 + dphi(name, -1e-300) ** 2) / 2
    else:
        reference = sigma_w**2 * gaussian_expectation(lambda h: dphi(name, h) ** 2, q_star)
    assert value == pytest.approx(reference, rel=1e-9)


@pytest.mark.parametrize("name", ACTIVATIONS)
@DETERMINISTIC
@given(sigma_w=sigma_ws, sigma_b=sigma_bs)
def test_fixed_point_is_fixed(name, sigma_w, sigma_b):
    q_star = theory.fixed_point(name, sigma_w, sigma_b)
    assert q_star >= 0.0
    if math.isfinite(q_star):
        assert theory.q_map(name, q_star, sigma_w, sigma_b) == pytest.approx(q_star, rel=1e-9, abs=1e-300)
    else:
        # No finite fixed point above 1: the map runs away, faster than q.
        for q in (1.0, 1e2, 1e4, 1e6):
            assert theory.q_map(name, q, sigma_w, sigma_b) > q


@pytest.mark.parametrize(
    ("name", "sigma_w", "sigma_b"),
    [("tanh", 1.5, 0.05), ("tanh", 0.8, 0.2), ("sigmoid", 2.0, 0.1), ("gelu", 1.2, 0.5), ("selu", 1.0, 0.1)],
)
def test_fixed_point_is_where_iteration_from_one_goes(name, sigma_w, sigma_b):
    q = 1.0
    for _ in range(300):
        q = theory.q_map(name, q, sigma_w, sigma_b)
    assert theory.fixed_point(name, sigma_w, sigma_b) == pytest.approx(q, rel=1e-9)


def test_fixed_point_picks_the_stable_nonzero_point_of_tanh_without_bias():
    # q = 0 is also fixed (and unstable) for sigma_w > 1.
    q_star = theory.fixed_point("tanh", 1.5, 0.0)
    assert q_star > 0.1
    assert theory.q_map("tanh", q_star, 1.5, 0.0) == pytest.approx(q_star, rel=1e-12)
    assert theory.fixed_point("tanh", 1.0001, 0.0) == pytest.approx(1e-4, rel=0.01)


# --------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("sigma_w", [0.3, 1.0, 1.4, SQRT2, 1.5, 3.0])
@pytest.mark.parametrize("sigma_b", [0.0, 0.1, 1.0])
def test_homogeneous_closed_forms(sigma_w, sigma_b):
    assert theory.chi1("relu", sigma_w, sigma_b) == pytest.approx(sigma_w**2 / 2, rel=1e-14)
    assert theory.chi1("leaky_relu", sigma_w, sigma_b) == pytest.approx(
        sigma_w**2 * (1 + LEAKY_SLOPE**2) / 2, rel=1e-14
    )
    assert theory.chi1("linear", sigma_w, sigma_b) == pytest.approx(sigma_w**2, rel=1e-14)
    if sigma_w < 1.4:
        assert theory.fixed_point("relu", sigma_w, sigma_b) == pytest.approx(
            sigma_b**2 / (1 - sigma_w**2 / 2), rel=1e-14, abs=0.0
        )
        xi = -1.0 / math.log(sigma_w**2 / 2)
        assert theory.depth_scales("relu", sigma_w, sigma_b) == pytest.approx((xi, xi), rel=1e-12)
    for q in (0.0, 0.5, 7.0):
        assert theory.q_map("relu", q, sigma_w, sigma_b) == pytest.approx(
            sigma_w**2 * q / 2 + sigma_b**2, rel=1e-14
        )


@pytest.mark.parametrize(
    ("name", "sigma_w", "sigma_b"),
    [
        ("relu", 1.5, 0.1),
        ("relu", SQRT2, 0.1),
        ("relu", 3.0, 0.0),
        ("leaky_relu", 1.5, 0.1),
        ("linear", 1.0, 0.1),
        ("linear", 1.2, 0.0),
        ("softplus", 2.0, 0.0),
        ("gelu", 2.5, 0.3),
        ("elu", 1.6, 0.0),
    ],
)
def test_runaway_variance_gives_infinite_fixed_point(name, sigma_w, sigma_b):
    assert theory.fixed_point(name, sigma_w, sigma_b) == math.inf
    # chi_1 is then the limit q -> inf: sigma_w**2 times the mean squared asymptotic slope.
    slope_plus, slope_minus = dphi(name, 1e6), dphi(name, -1e6)
    assert theory.chi1(name, sigma_w, sigma_b) == pytest.approx(
        sigma_w**2 * (slope_plus**2 + slope_minus**2) / 2, rel=1e-14
    )
    assert all(math.isnan(xi) for xi in theory.depth_scales(name, sigma_w, sigma_b))


def test_marginal_homogeneous_maps_stay_at_q0():
    # Every q is fixed; iterating from q0 = 1 stays at 1.
    assert theory.fixed_point("relu", SQRT2, 0.0) == 1.0
    assert theory.fixed_point("linear", 1.0, 0.0) == 1.0
    assert theory.depth_scales("relu", SQRT2, 0.0) == (math.inf, math.inf)


@pytest.mark.parametrize("name", ["tanh", "erf", "elu", "gelu", "silu", "selu"])
def test_zero_fixed_point_without_bias(name):
    # phi(0) = 0: below the critical point q* = 0 and chi_1 = sigma_w**2 phi'(0)**2.
    sigma_w = 0.5
    assert theory.fixed_point(name, sigma_w, 0.0) == 0.0
    slope_squared = (dphi(name, 1e-300) ** 2 + dphi(name, -1e-300) ** 2) / 2
    assert theory.chi1(name, sigma_w, 0.0) == pytest.approx(sigma_w**2 * slope_squared, rel=1e-14)
    xi = -1.0 / math.log(sigma_w**2 * slope_squared)
    assert theory.depth_scales(name, sigma_w, 0.0) == pytest.approx((xi, xi), rel=1e-12)


def test_sigmoid_slope_peaks_at_a_quarter_at_zero():
    h = np.linspace(-8.0, 8.0, 16001)
    slope = activation("sigmoid", h)[1]
    assert slope.max() == pytest.approx(0.25, abs=1e-15)
    assert h[np.argmax(slope)] == 0.0
    # Hence chi_1 <= sigma_w**2 / 16 and the edge of chaos lies beyond sigma_w = 4.
    for sigma_w in (1.0, 4.0, 8.0):
        assert theory.chi1("sigmoid", sigma_w, 0.1) < sigma_w**2 / 16
    assert theory.critical_sigma_w("sigmoid", 0.0) > 4.0
    # phi(0) = 1/2: the map sends q = 0 to sigma_w**2 / 4 + sigma_b**2.
    assert theory.q_map("sigmoid", 0.0, 2.0, 0.5) == pytest.approx(1.25, rel=1e-15)


def test_erf_edge_of_chaos_without_bias_is_root_pi_over_two():
    # erf'(0) = 2 / sqrt(pi).
    assert theory.critical_sigma_w("erf", 0.0) == pytest.approx(math.sqrt(math.pi) / 2, rel=1e-14)


# --------------------------------------------------------------------------- edge of chaos


# gelu and silu (phi'(0) = 1/2, relu-like far out) without or with little bias:
# the fixed point reached from q0 = 1 jumps from near 0 to infinity as sigma_w
# grows, and chi_1 jumps across 1 with it.
NO_CRITICAL_POINT = {(name, sigma_b) for name in ("gelu", "silu") for sigma_b in (0.0, 0.05, 0.3)}


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("sigma_b", [0.0, 0.05, 0.3, 1.0])
def test_critical_sigma_w_gives_chi1_one(name, sigma_b):
    if (name, sigma_b) in NO_CRITICAL_POINT:
        with pytest.raises(ValueError, match="sigma_b"):
            theory.critical_sigma_w(name, sigma_b)
        return
    sigma_w = theory.critical_sigma_w(name, sigma_b)
    assert theory.chi1(name, sigma_w, sigma_b) == pytest.approx(1.0, abs=1e-10)
    # A crossing, not a touch: ordered just below, not ordered just above.
    assert theory.chi1(name, sigma_w * (1 - 1e-3), sigma_b) < 1.0
    assert theory.chi1(name, sigma_w * (1 + 1e-3), sigma_b) > 1.0


# --------------------------------------------------------------------------- correlation map and depth scales


@pytest.mark.parametrize(
    ("name", "q", "c"),
    [("tanh", 0.8, 0.3), ("tanh", 4.0, 0.95), ("relu", 1.0, 0.5), ("leaky_relu", 2.0, -0.4),
     ("elu", 1.5, 0.7), ("selu", 0.5, 0.2), ("gelu", 3.0, 0.9), ("softplus", 1.0, 0.0),
     ("sigmoid", 6.0, 0.6), ("silu", 0.3, 0.99), ("erf", 2.0, 0.5)],
)  # fmt: skip
def test_c_map_matches_independent_double_integral(name, q, c):
    sigma_w, sigma_b = 1.3, 0.2
    reference = (sigma_w**2 * pair_expectation(name, q, c, 0) + sigma_b**2) / q
    assert theory.c_map(name, c, sigma_w, sigma_b, q=q) == pytest.approx(reference, rel=1e-8, abs=1e-10)


@pytest.mark.parametrize("name", ["tanh", "erf", "relu", "leaky_relu", "linear", "gelu"])
def test_c_map_ends(name):
    sigma_w, sigma_b, q = 1.2, 0.3, 2.5
    # C(1) = F(q) / q: identical inputs stay identical.
    assert theory.c_map(name, 1.0, sigma_w, sigma_b, q=q) == pytest.approx(
        theory.q_map(name, q, sigma_w, sigma_b) / q, rel=1e-13
    )
    # C(-1) pairs phi(u) with phi(-u); closed for odd phi and for relu (phi(u) phi(-u) = 0).
    if name in ("tanh", "erf", "linear"):
        expected = (2 * sigma_b**2 - theory.q_map(name, q, sigma_w, sigma_b)) / q
    elif name == "relu":
        expected = sigma_b**2 / q
    elif name == "leaky_relu":  # phi(u) phi(-u) = 0.01 * -u**2 on both sides
        expected = (sigma_w**2 * -LEAKY_SLOPE * q + sigma_b**2) / q
    else:
        expected = (
            sigma_w**2 * gaussian_expectation(lambda h: phi(name, h) * phi(name, -h), q) + sigma_b**2
        ) / q
    assert theory.c_map(name, -1.0, sigma_w, sigma_b, q=q) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    ("name", "sigma_w", "sigma_b"),
    [("tanh", 1.5, 0.05), ("tanh", 2.5, 0.3), ("tanh", 4.0, 0.0), ("erf", 1.5, 0.05), ("selu", 1.3, 1.0)],
)
def test_chaotic_correlation_fixed_point(name, sigma_w, sigma_b):
    assert theory.chi1(name, sigma_w, sigma_b) > 1.0
    xi_q, xi_c = theory.depth_scales(name, sigma_w, sigma_b)
    c_star, _ = theory._correlation_fixed_point(name, sigma_w, sigma_b)
    assert 0.0 <= c_star < 1.0
    assert theory.c_map(name, c_star, sigma_w, sigma_b) == pytest.approx(c_star, abs=1e-11)
    # xi_c = -1 / ln chi_c with chi_c the slope of the map at c*: a central difference.
    low, high = max(c_star - 1e-5, -1.0), c_star + 1e-5
    slope = (theory.c_map(name, high, sigma_w, sigma_b) - theory.c_map(name, low, sigma_w, sigma_b)) / (
        high - low
    )
    assert math.exp(-1.0 / xi_c) == pytest.approx(slope, rel=1e-6)
    # xi_q from the slope of the variance map at q*.
    q_star = theory.fixed_point(name, sigma_w, sigma_b)
    low, high = q_star * (1 - 1e-5), q_star * (1 + 1e-5)
    q_slope = (theory.q_map(name, high, sigma_w, sigma_b) - theory.q_map(name, low, sigma_w, sigma_b)) / (
        high - low
    )
    assert math.exp(-1.0 / xi_q) == pytest.approx(q_slope, rel=1e-6)
    assert 0.0 < xi_q < math.inf and 0.0 < xi_c < math.inf


def test_ordered_phase_correlation_scale_is_from_chi1():
    for name, sigma_w, sigma_b in (("tanh", 0.8, 0.05), ("sigmoid", 3.0, 0.5), ("softplus", 1.0, 0.0)):
        chi = theory.chi1(name, sigma_w, sigma_b)
        assert chi < 1.0
        assert theory.depth_scales(name, sigma_w, sigma_b)[1] == pytest.approx(
            -1.0 / math.log(chi), rel=1e-12
        )


# --------------------------------------------------------------------------- Monte-Carlo


def _network_chi(name: str, sigma_w: float, sigma_b: float, seed: int) -> tuple[float, float]:
    """Measured chi_1 and q of a wide random network, in plain NumPy.

    Returns the mean over layers and samples of ||dL/dx_{l-1}||^2 / ||dL/dx_l||^2
    (a random vector backpropagated from the top), and the mean squared
    pre-activation, over the measured layers.
    """
    width, burn_in, layers, batch = 1000, 2, 6, 16
    rng = np.random.default_rng(seed)

    def forward(h):
        if name == "tanh":
            value = np.tanh(h)
            return value, 1.0 - value * value
        return np.maximum(h, 0.0), (h > 0).astype(float)

    # Start at the fixed point, so the burn-in only removes the finite-width transient.
    root_q = math.sqrt(theory.fixed_point(name, sigma_w, sigma_b))
    x, _ = forward(root_q * rng.standard_normal((batch, width)))
    kept, variances = [], []
    for layer in range(burn_in + layers):
        weights = rng.standard_normal((width, width)) * (sigma_w / math.sqrt(width))
        h = x @ weights.T + sigma_b * rng.standard_normal(width)
        x, slope = forward(h)
        if layer >= burn_in:
            kept.append((weights, slope))
            variances.append(np.mean(h * h))
    grad = rng.standard_normal((batch, width))
    ratios = []
    for weights, slope in reversed(kept):
        new = (grad * slope) @ weights
        ratios.append(np.sum(new * new, axis=1) / np.sum(grad * grad, axis=1))
        grad = new
    return float(np.mean(ratios)), float(np.mean(variances))


@pytest.mark.parametrize(
    ("name", "sigma_w", "sigma_b", "q_tolerance"),
    [("tanh", 1.5, 0.1, 0.06), ("tanh", 0.9, 0.05, 0.1), ("relu", 1.3, 0.2, 0.25)],
)
def test_chi1_matches_wide_network(name, sigma_w, sigma_b, q_tolerance):
    """chi_1 and q* against a width-1000 random network: 6 measured layers, batch 16, mean of 2 seeds.

    Tolerances come from the spread of exactly this set-up over 30 seeds.
    chi_1: the mean of 2 seeds scattered around chi_1 with a relative standard
    deviation of 0.4% (tanh 0.9), 0.6% (tanh 1.5) and 1.3% (relu), its largest
    deviation in 15 disjoint pairs was 2.7%, and the 30-seed mean was within
    0.13% of chi_1 (no bias beyond the noise).  5% is about 4 standard
    deviations of the noisiest case, while an error in the theory (a missing
    factor, phi' taken at the wrong q, a wrong fixed point) moves chi_1 by far
    more.  q*: the measured layer variance scatters more (bias noise and, for
    relu, slow relaxation with xi_q = 6 layers): 2-seed standard deviations
    of 0.7% (tanh 1.5), 1.6% (tanh 0.9) and 4.9% (relu), so the q tolerances
    are about 4-5 of those.
    """
    with threadpool_limits(1):  # a 16 x 1000 product gains nothing from threads
        measured = [_network_chi(name, sigma_w, sigma_b, seed) for seed in (0, 1)]
    chi_mean = np.mean([chi for chi, _ in measured])
    q_mean = np.mean([q for _, q in measured])
    assert chi_mean == pytest.approx(theory.chi1(name, sigma_w, sigma_b), rel=0.05)
    assert q_mean == pytest.approx(theory.fixed_point(name, sigma_w, sigma_b), rel=q_tolerance)


# --------------------------------------------------------------------------- input validation


PUBLIC_CALLS = {
    "fixed_point": lambda a, w, b: theory.fixed_point(a, w, b),
    "chi1": lambda a, w, b: theory.chi1(a, w, b),
    "depth_scales": lambda a, w, b: theory.depth_scales(a, w, b),
    "q_map": lambda a, w, b: theory.q_map(a, 1.0, w, b),
    "c_map": lambda a, w, b: theory.c_map(a, 0.5, w, b),
}


@pytest.mark.parametrize("call", PUBLIC_CALLS.values(), ids=PUBLIC_CALLS.keys())
@pytest.mark.parametrize(
    ("activation_name", "sigma_w", "sigma_b", "error", "argument"),
    [
        ("swish", 1.0, 0.1, ValueError, "activation"),
        ("Tanh", 1.0, 0.1, ValueError, "activation"),
        (3, 1.0, 0.1, TypeError, "activation"),
        ("tanh", 0.0, 0.1, ValueError, "sigma_w"),
        ("tanh", -1.0, 0.1, ValueError, "sigma_w"),
        ("tanh", math.nan, 0.1, ValueError, "sigma_w"),
        ("tanh", math.inf, 0.1, ValueError, "sigma_w"),
        ("tanh", "1.0", 0.1, TypeError, "sigma_w"),
        ("tanh", None, 0.1, TypeError, "sigma_w"),
        ("tanh", 1.0, -0.1, ValueError, "sigma_b"),
        ("tanh", 1.0, math.nan, ValueError, "sigma_b"),
        ("tanh", 1.0, math.inf, ValueError, "sigma_b"),
        ("tanh", 1.0, [0.1], TypeError, "sigma_b"),
        ("tanh", True, 0.1, TypeError, "sigma_w"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, activation_name, sigma_w, sigma_b, error, argument):
    with pytest.raises(error, match=argument):
        call(activation_name, sigma_w, sigma_b)


@pytest.mark.parametrize(
    ("activation_name", "sigma_b", "error", "argument"),
    [("swish", 0.1, ValueError, "activation"), ("tanh", -1.0, ValueError, "sigma_b"),
     ("tanh", math.nan, ValueError, "sigma_b"), ("tanh", "0", TypeError, "sigma_b")],
)  # fmt: skip
def test_critical_sigma_w_bad_input(activation_name, sigma_b, error, argument):
    with pytest.raises(error, match=argument):
        theory.critical_sigma_w(activation_name, sigma_b)


def test_map_arguments_are_validated():
    with pytest.raises(ValueError, match="q"):
        theory.q_map("tanh", -1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="c"):
        theory.c_map("tanh", 1.5, 1.0, 0.0)
    with pytest.raises(ValueError, match="q"):
        theory.c_map("tanh", 0.5, 1.0, 0.0)  # q* = 0 here: no correlation to speak of
    with pytest.raises(ValueError, match="q"):
        theory.c_map("relu", 0.5, 2.0, 0.1)  # q* = inf


def test_numpy_scalars_are_accepted():
    assert theory.chi1("tanh", np.float32(1.5), np.float64(0.1)) == theory.chi1("tanh", 1.5, 0.1)
    assert theory.fixed_point("relu", np.int64(1), 0) == pytest.approx(0.0)
