"""Singular values and Lyapunov exponents: compiled against the reference, exact identities,
and closed forms of random-matrix theory.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    BACKENDS,
    CUDA,
    assert_matches_reference,
    determined_directions,
    kinks_determined,
    layer_jacobians,
    references,
    stack_cases,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import digamma, polygamma
from threadpoolctl import threadpool_limits

import vgcore as vg
from vgcore.backends import implementation
from vgcore.spectra import lyapunov_exponents, singular_values

# Activations whose derivative vanishes only on a null set (no relu: dead units make J singular).
SMOOTH = [name for name in vg.ACTIVATIONS if name not in ("relu",)]


def _log_growth(k):
    """The unsorted sums of log|R_ii| over layers, with conftest.references' signature."""
    def function(stack, x, backend):
        return implementation(stack, backend).lyapunov_log_growth(stack.bind(x), k)
    return function


def perturbed(stack, x, seed=0):
    """The float64 problem with every weight, bias and input moved by a relative float32 eps."""
    rng = np.random.default_rng(seed)
    eps = np.finfo(np.float32).eps

    def move(array):
        array = np.asarray(array, np.float64)
        return array * (1 + eps * rng.uniform(-1, 1, array.shape))

    return (vg.Stack(move(stack.weights), move(stack.biases), activation=stack.activation,
                     residual=stack.residual, norm=stack.norm), move(x))


def growth_references(stack, x, k):
    """(low, high) for the unsorted log growth, as conftest.references, with a second probe.

    high is the float64 reference.  low is whichever lies farther from it of
    the float32 reference and the float64 reference of the problem perturbed
    by a relative float32 eps (perturbed): the rounding of the float32 run
    may happen to cancel where the problem amplifies errors (an untracked
    direction outgrowing a tracked one), the perturbation rarely does.
    """
    low, high = references(_log_growth(k), stack, x)
    moved = _log_growth(k)(*perturbed(stack, x), backend="numpy")
    with np.errstate(invalid="ignore"):
        take = np.abs(moved - high) > np.abs(low - high)
    return np.where(take, moved, low), high


# ---------------------------------------------------------------------------
# Compiled == reference
# ---------------------------------------------------------------------------

@settings(max_examples=40)
@given(stack_cases(max_depth=20, max_width=24, max_batch=3))
def test_singular_values_match_reference(case):
    """Everywhere within Weyl's bound |s_i(A) - s_i(B)| <= |A - B|_2 of the compiled and reference
    Jacobians (plus the SVDs' rounding); and against the reference within conftest's bounds where
    the kinks are determined, over the domain of test_kernels' Jacobian test (the compiled singular
    values are those of the compiled Jacobian, so they are as accurate as it is).
    """
    stack, x = case
    low, high = references(singular_values, stack, x)
    result = singular_values(stack, x, backend="cpu")
    assert result.shape == (x.shape[0], stack.width) and result.dtype == stack.dtype
    assert np.all(result[:, :-1] >= result[:, 1:])
    jacobians = [np.asarray(vg.jacobian(stack, x, backend=b), np.float64) for b in ("cpu", "numpy")]
    distance = np.linalg.norm(jacobians[0] - jacobians[1], ord=2, axis=(1, 2))
    own = np.asarray(singular_values(stack, x, backend="numpy"), np.float64)
    info = np.finfo(stack.dtype)  # relative rounding, and the absolute one of subnormal Jacobians
    rounding = 10 * stack.width * (info.eps * np.maximum(own, result).max(axis=1) + info.smallest_subnormal)
    assert np.all(np.abs(result - own).max(axis=1) <= distance + rounding)
    ok = kinks_determined(stack, x)
    assert_matches_reference(result[ok], high[ok], low[ok], dtype=stack.dtype, relative_to="max")


@settings(max_examples=60)
@given(stack_cases(max_depth=30, max_width=24, max_batch=4), st.integers(1, 24))
def test_lyapunov_growth_matches_reference(case, k):
    """The compiled kernel's per-direction log growth (before sorting) against the reference.

    Held to conftest.assert_matches_reference's bounds on the directions the
    problem determines (determined_directions); elsewhere the values are
    rounding noise, and only NaN is ruled out.
    """
    stack, x = case
    k = min(k, stack.width)
    low, high = growth_references(stack, x, k)
    result = _log_growth(k)(stack, x, backend="cpu")
    assert result.shape == (x.shape[0], k) and result.dtype == np.float64
    assert not np.isnan(result).any()
    determined = determined_directions(stack, x, k, low, high)
    assert_matches_reference(result[determined], high[determined], low[determined], dtype=stack.dtype)


@settings(max_examples=20)
@given(stack_cases(max_depth=10, max_width=12, max_batch=4), st.integers(1, 12), st.sampled_from(BACKENDS))
def test_exponents_are_the_sorted_mean_log_growth(case, k, backend):
    stack, x = case
    k = min(k, stack.width)
    result = lyapunov_exponents(stack, x, k, backend=backend)
    assert result.shape == (x.shape[0], k) and result.dtype == np.float64
    assert np.all(result[:, :-1] >= result[:, 1:])
    growth = _log_growth(k)(stack, x, backend=backend)
    np.testing.assert_array_equal(result, -np.sort(-growth / stack.depth, axis=1))


def test_default_k_is_the_width_and_k_directions_are_the_first_basis_vectors():
    stack = vg.Stack.random(6, 7, activation="tanh", sigma_w=1.3, sigma_b=0.1, seed=3)
    x = vg.random_inputs(stack, 3, seed=4)
    for backend in BACKENDS:
        assert lyapunov_exponents(stack, x, backend=backend).shape == (3, 7)
        # k = 1 follows e_1 alone: L lambda_1 = log |J e_1|
        top = lyapunov_exponents(stack, x, 1, backend=backend)[:, 0]
        column = vg.jacobian(stack, x, backend="numpy")[:, :, 0]
        np.testing.assert_allclose(top * stack.depth, np.log(np.linalg.norm(column, axis=1)), rtol=1e-12)


def test_a_dead_layer_gives_minus_infinity():
    """A relu layer whose every pre-activation is negative maps every direction to exactly 0."""
    stack = vg.Stack.random(5, 6, activation="relu", seed=5)
    biases = np.array(stack.biases)
    biases[2] = -100.0
    dead = vg.Stack(stack.weights, biases, activation="relu")
    x = vg.random_inputs(dead, 3, seed=6)
    for backend in BACKENDS:
        assert np.all(np.isneginf(lyapunov_exponents(dead, x, backend=backend)))
        np.testing.assert_array_equal(singular_values(dead, x, backend=backend), 0.0)


# ---------------------------------------------------------------------------
# Exact identities against independent computations
# ---------------------------------------------------------------------------

@settings(max_examples=30)
@given(stack_cases(max_depth=6, max_width=12, max_batch=3, dtypes=[np.float64], activations=SMOOTH),
       st.sampled_from(BACKENDS))
def test_exponents_sum_to_the_log_determinant(case, backend):
    """sum_i lambda_i = (1/L) log|det J| = (1/L) sum_l log|det J_l| for k = n.

    The QR steps factor J = Q_L R_L ... R_1, so |det J| = prod_l prod_i |R_ii|
    (the multiplicative ergodic theorem's volume identity, exact at any L);
    the right-hand sides come from LU (slogdet) of the whole and per-layer
    Jacobians.  No layer norm: its Jacobian is singular (the mean direction).
    """
    stack, x = case
    if stack.norm is not None:
        stack = vg.Stack(stack.weights, stack.biases, activation=stack.activation, residual=stack.residual)
    exponents = lyapunov_exponents(stack, x, backend=backend)
    sign, log_det = np.linalg.slogdet(vg.jacobian(stack, x, backend="numpy"))
    per_layer = np.linalg.slogdet(layer_jacobians(stack, x))[1].sum(axis=0)
    assert np.all(sign != 0)
    total = exponents.sum(axis=1) * stack.depth
    scale = 1.0 + np.abs(stack.depth * exponents).sum(axis=1)
    np.testing.assert_array_less(np.abs(total - log_det), 1e-9 * scale)
    np.testing.assert_array_less(np.abs(total - per_layer), 1e-9 * scale)


@settings(max_examples=30)
@given(stack_cases(max_depth=6, max_width=12, max_batch=3, dtypes=[np.float64], activations=SMOOTH),
       st.integers(1, 12), st.sampled_from(BACKENDS))
def test_k_exponents_give_the_k_volume_and_obey_the_singular_values(case, k, backend):
    """L sum_{i<=k} lambda_i = log vol_k(J e_1, ..., J e_k) <= sum_{i<=k} log s_i.

    The equality is the QR volume identity (J [e_1..e_k] = Q R with R the
    product of the layers' R factors), checked against a QR of the first k
    columns of the Jacobian; the inequality is Cauchy's interlacing theorem
    for the compression E_k^T J^T J E_k of J^T J.
    """
    stack, x = case
    k = min(k, stack.width)
    if stack.norm is not None:
        stack = vg.Stack(stack.weights, stack.biases, activation=stack.activation, residual=stack.residual)
    volume = stack.depth * lyapunov_exponents(stack, x, k, backend=backend).sum(axis=1)
    jacobian = vg.jacobian(stack, x, backend="numpy")
    r = np.linalg.qr(jacobian[:, :, :k])[1]
    log_volume = np.log(np.abs(np.diagonal(r, axis1=1, axis2=2))).sum(axis=1)
    scale = 1.0 + np.abs(log_volume)
    np.testing.assert_array_less(np.abs(volume - log_volume), 1e-9 * scale)
    top_k = np.log(singular_values(stack, x, backend=backend)[:, :k]).sum(axis=1)
    np.testing.assert_array_less(volume, top_k + 1e-9 * scale)


# ---------------------------------------------------------------------------
# Random-matrix theory
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_products_of_orthogonal_matrices_are_isometries(backend):
    """Linear stack, Haar-orthogonal W_l, sigma_w = 1: J = W_L ... W_1 is orthogonal.

    The orthogonal group is closed under products, so every singular value
    is 1 and every Lyapunov exponent 0 at any depth ("dynamical isometry",
    Saxe, McClelland & Ganguli 2014; Pennington, Schoenholz & Ganguli 2017).
    Rounding adds about L sqrt(n) eps = 1e-13 here; the bound is 1e-12.
    """
    stack = vg.Stack.random(200, 24, activation="linear", init="orthogonal", sigma_w=1.0, sigma_b=0.3,
                            seed=11)
    x = vg.random_inputs(stack, 2, seed=12)
    np.testing.assert_allclose(singular_values(stack, x, backend=backend), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(lyapunov_exponents(stack, x, backend=backend), 0.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(lyapunov_exponents(stack, x, 3, backend=backend), 0.0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exponents_stay_finite_where_the_jacobian_underflows(backend):
    """sigma_w = 0.5 times orthogonal W_l: every exponent is log 0.5, exactly, at depth 2000.

    J = 0.5^2000 O underflows to zero (its singular values come back 0), yet
    the QR renormalisation every layer keeps the exponents exact.
    """
    stack = vg.Stack.random(2000, 8, activation="linear", init="orthogonal", sigma_w=0.5, seed=13)
    x = vg.random_inputs(stack, 2, seed=14)
    np.testing.assert_array_equal(singular_values(stack, x, backend=backend), 0.0)
    np.testing.assert_allclose(lyapunov_exponents(stack, x, backend=backend), np.log(0.5), rtol=1e-12)
    tanh = vg.Stack.random(2000, 8, activation="tanh", sigma_w=0.5, sigma_b=0.05, seed=15)
    assert np.all(np.isfinite(lyapunov_exponents(tanh, x, backend=backend)))


def newman_spectrum(n: int, sigma: float) -> np.ndarray:
    """lambda_i = log sigma + (1/2) [log(2/n) + psi((n - i + 1)/2)], i = 1..n (Newman 1986).

    For W with i.i.d. N(0, 1) entries the exponents are (1/2)[log 2 + psi((n-i+1)/2)];
    entries N(0, sigma^2 / n) scale W by sigma / sqrt(n), adding log sigma - (1/2) log n.
    """
    i = np.arange(1, n + 1)
    return np.log(sigma) + 0.5 * (np.log(2.0 / n) + digamma((n - i + 1) / 2))


def newman_spread(n: int, depth: int) -> np.ndarray:
    """Exact standard deviation of one depth-L estimate of lambda_i for Gaussian products.

    By rotation invariance W_l Q is again Gaussian, and by Bartlett's
    decomposition R_ii^2 ~ (sigma^2 / n) chi^2_{n-i+1}, independent over i
    and l; Var log chi^2_nu = psi'(nu / 2), so the estimate's sd is
    (1/2) sqrt(psi'((n-i+1)/2) / L) ~ 1 / sqrt(2 L (n - i + 1)).
    """
    i = np.arange(1, n + 1)
    return 0.5 * np.sqrt(polygamma(1, (n - i + 1) / 2) / depth)


@pytest.mark.parametrize(("backend", "width", "depth", "seeds", "k"), [
    ("cpu", 16, 400, 20, None),
    ("cpu", 16, 400, 20, 5),
    ("numpy", 6, 150, 10, None),
])
def test_gaussian_products_have_newmans_lyapunov_spectrum(backend, width, depth, seeds, k):
    """Products of Gaussian matrices W ~ N(0, sigma^2/n): the spectrum of Newman (1986).

    C. M. Newman, "The distribution of Lyapunov exponents: exact results for
    random matrices", Commun. Math. Phys. 103, 121-126 (1986):
    lambda_i = log sigma + (1/2)[log(2/n) + psi((n-i+1)/2)] (newman_spectrum;
    the log(2/n) is the 1/sqrt(n) of the weights' scale).  A depth-L estimate
    is unbiased here (Bartlett's decomposition, newman_spread) with sd
    (1/2) sqrt(psi'((n-i+1)/2) / L) ~ 1/sqrt(2 L (n-i+1)).

    Tolerance: the mean over S seeds must lie within 5 measured standard
    errors (sd over the seeds / sqrt S) of the closed form, and the measured
    sd within a factor 2 of the exact one.  Measured (n 16, L 400, 20 seeds):
    sd 0.008-0.057 from the top to the bottom exponent (exact 0.009-0.056,
    ratios 0.72-1.3), largest |mean - lambda_i| 0.019 = 3.3 standard errors
    (the bottom exponents, 0.0028 = 1.6 for the top 5); NumPy reference (n 6,
    L 150, 10 seeds): 0.029 = 1.8 standard errors.
    """
    sigma = 1.3
    estimates = np.array([
        lyapunov_exponents(vg.Stack.random(depth, width, activation="linear", sigma_w=sigma, seed=seed),
                           np.zeros((1, width)), k, backend=backend)[0]
        for seed in range(seeds)
    ])
    count = estimates.shape[1]
    expected = newman_spectrum(width, sigma)[:count]
    spread = estimates.std(axis=0, ddof=1)
    exact_spread = newman_spread(width, depth)[:count]
    assert np.all((spread > exact_spread / 2) & (spread < exact_spread * 2))
    np.testing.assert_array_less(np.abs(estimates.mean(axis=0) - expected), 5 * spread / np.sqrt(seeds))


def wishart_product_moments(n: int, depth: int) -> tuple[float, float]:
    """(1/n) E tr[J^T J] and (1/n) E tr[(J^T J)^2] for J = W_L ... W_1, W_l ~ N(0, 1/n) (n x n).

    Exact at finite n by Wick's theorem: with S = W^T W and a fixed symmetric
    P, E[S P S] = (1 + 1/n) P + (tr P / n) I and E[(tr S P)^2] = (tr P)^2 +
    (2/n) tr P^2, so x_l = E tr P_l^2 and y_l = E (tr P_l)^2 of P_l = J_l J_l^T obey
    x_l = (1 + 1/n) x_{l-1} + y_{l-1} / n, y_l = y_{l-1} + 2 x_{l-1} / n from
    x_0 = n, y_0 = n^2 (checked against NumPy Monte Carlo at n = 2, 4, 8).
    The first moment is exactly 1: E[S] = I.
    """
    second, square_of_trace = float(n), float(n) ** 2
    for _ in range(depth):
        second, square_of_trace = ((1 + 1 / n) * second + square_of_trace / n,
                                   square_of_trace + 2 * second / n)
    return 1.0, second / n


@pytest.mark.parametrize(("width", "seeds"), [(16, 60), (128, 20)])
def test_gaussian_products_have_the_free_probability_moments(width, seeds):
    """Singular-value moments of J = W_L ... W_1, W_l ~ N(0, sigma^2/n).

    First moment: (1/n) E tr[J^T J] = sigma^(2L) exactly at any n (E W^T W =
    sigma^2 I, layer by layer).  Second: (1/n) E tr[(J^T J)^2] -> sigma^(4L)
    (L + 1) as n -> infinity: the moments of the squared singular values of
    a product of L free Ginibre matrices are the Fuss-Catalan numbers
    FC_L(m) = binom(mL + m, m) / (mL + 1), FC_L(2) = L + 1 (Banica, Belinschi,
    Capitaine & Collins 2011; Penson & Zyczkowski 2011).  At finite n the
    exact mean is wishart_product_moments (Wick), (L + 1) + O(L^2 / n):
    5.75 at n = 16 and 5.08 at n = 128 for L = 4; to first order the gap is
    L (L + 1) / (2 n).

    Tolerance: each mean over the seeds within 5 measured standard errors of
    its exact finite-n value, and the second moment within that plus the
    exact finite-size gap of the limit L + 1.  Measured (L 4, sigma 1.1):
    n 128, 20 seeds: first 0.993 +- 0.008, second 4.99 +- 0.09 (exact 5.08,
    limit 5); n 16, 60 seeds: first 0.953 +- 0.036, second 5.26 +- 0.46
    (exact 5.75); every mean within 1.3 standard errors of its exact value.
    """
    depth, sigma = 4, 1.1
    second_moments, first_moments = [], []
    for seed in range(seeds):
        stack = vg.Stack.random(depth, width, activation="linear", sigma_w=sigma, seed=seed)
        squares = singular_values(stack, np.zeros((1, width)), backend="cpu")[0] ** 2
        first_moments.append(squares.mean() / sigma ** (2 * depth))
        second_moments.append((squares ** 2).mean() / sigma ** (4 * depth))
    exact_first, exact_second = wishart_product_moments(width, depth)
    for moments, exact in ((first_moments, exact_first), (second_moments, exact_second)):
        standard_error = np.std(moments, ddof=1) / np.sqrt(seeds)
        assert abs(np.mean(moments) - exact) < 5 * standard_error
    finite_size_gap = exact_second - (depth + 1)
    standard_error = np.std(second_moments, ddof=1) / np.sqrt(seeds)
    assert abs(np.mean(second_moments) - (depth + 1)) < finite_size_gap + 5 * standard_error
    first_order = depth * (depth + 1) / (2 * width)  # the O(L^2 / n) approach to the limit
    assert first_order <= finite_size_gap <= 1.25 * first_order


# ---------------------------------------------------------------------------
# Contract: validation, immutability, threads
# ---------------------------------------------------------------------------

@pytest.fixture
def stack():
    return vg.Stack.random(4, 5, activation="tanh", sigma_b=0.1, seed=0)


@pytest.fixture
def x(stack):
    return vg.random_inputs(stack, 3, seed=1)


BAD_X = [
    (np.ones((3, 6)), ValueError),
    (np.ones(5), ValueError),
    (np.ones((0, 5)), ValueError),
    (np.ones((3, 5), dtype=np.int64), TypeError),
    (np.full((3, 5), np.nan), ValueError),
    (None, TypeError),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("function", [singular_values, lyapunov_exponents])
@pytest.mark.parametrize(("bad", "error"), BAD_X)
def test_bad_x_is_refused(stack, backend, function, bad, error):
    with pytest.raises(error, match=r"^x: "):
        function(stack, bad, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("k", "error"), [(0, ValueError), (-1, ValueError), (6, ValueError),
                                          (2.0, TypeError), (True, TypeError), ("2", TypeError)])
def test_bad_k_is_refused(stack, x, backend, k, error):
    with pytest.raises(error, match=r"^k: "):
        lyapunov_exponents(stack, x, k, backend=backend)


@pytest.mark.parametrize("function", [singular_values, lyapunov_exponents])
def test_bad_stack_and_backend_are_refused(stack, x, function):
    with pytest.raises(TypeError, match=r"^stack: "):
        function(np.ones((4, 5, 5)), x)
    for backend, error in ((1, TypeError), ("gpu", ValueError), ("NUMPY", ValueError), (None, TypeError)):
        with pytest.raises(error, match=r"^backend: "):
            function(stack, x, backend=backend)
    if not CUDA:
        with pytest.raises(ValueError, match=r"^backend: 'cuda'"):
            function(stack, x, backend="cuda")


def test_k_accepts_numpy_integers(stack, x):
    np.testing.assert_array_equal(lyapunov_exponents(stack, x, np.int64(2)), lyapunov_exponents(stack, x, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_never_modified(backend):
    weights = np.array(vg.Stack.random(5, 6, activation="gelu", seed=2).weights)
    biases = np.random.default_rng(3).standard_normal((5, 6))
    stack = vg.Stack(weights, biases, activation="gelu", norm="pre", residual=0.5)
    x = np.random.default_rng(4).standard_normal((3, 6))
    x32 = x.astype(np.float32)
    before = [a.copy() for a in (weights, biases, x, x32)]
    singular_values(stack, x, backend=backend)
    lyapunov_exponents(stack, x, 4, backend=backend)
    lyapunov_exponents(stack, x32, backend=backend)  # cast to the stack's dtype, on a copy
    for original, array in zip(before, (weights, biases, x, x32), strict=True):
        np.testing.assert_array_equal(original, array)


@settings(max_examples=15)
@given(stack_cases(max_depth=20, max_width=16, max_batch=8))
def test_results_do_not_depend_on_thread_count(case):
    stack, x = case
    results = []
    for threads in (1, 2):
        with threadpool_limits(limits=threads, user_api="openmp"):
            results.append((singular_values(stack, x, backend="cpu"),
                            lyapunov_exponents(stack, x, backend="cpu"),
                            lyapunov_exponents(stack, x, 1, backend="cpu")))
    for one, two in zip(*results, strict=True):
        np.testing.assert_array_equal(one, two)  # bitwise: the partition ignores the thread count
