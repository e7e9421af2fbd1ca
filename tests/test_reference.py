"""The NumPy reference itself, against central finite differences and closed forms.

The compiled and GPU paths are tested against the reference; this file is
why the reference can be trusted.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import stack_cases
from hypothesis import assume, given
from hypothesis import strategies as st

import vgcore as vg
from vgcore._activations import ACTIVATIONS, NOT_SMOOTH_AT_ZERO, activation
from vgcore.reference import stack as stack_reference

STEP = 1e-6


def _small_cases():
    return stack_cases(max_depth=4, max_width=6, max_batch=3, dtypes=[np.float64])


def _pre_activations(stack, x):
    """Every layer's h (L, B, n), to keep finite differences away from kinks."""
    hs = []
    for weight, bias in zip(stack.weights, stack.biases, strict=True):
        u = stack_reference.layer_norm(x)[0] if stack.norm == "pre" else x
        hs.append(u @ weight.T + bias)
        x, _ = stack_reference.layer_forward(weight, bias, x, stack.activation, stack.residual, stack.norm)
    return np.stack(hs)


def _away_from_kinks(stack, x):
    if stack.activation in NOT_SMOOTH_AT_ZERO:
        assume(np.abs(_pre_activations(stack, x)).min() > 1e-3)


def _run(stack, x):
    return vg.forward(stack, x, backend="numpy")


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_derivative_matches_finite_differences(name):
    h = np.linspace(-6, 6, 1201)
    h = h[np.abs(h) > 1e-3]  # kinks
    numeric = (activation(name, h + STEP)[0] - activation(name, h - STEP)[0]) / (2 * STEP)
    np.testing.assert_allclose(activation(name, h)[1], numeric, rtol=1e-6, atol=1e-8)


def test_activation_closed_forms():
    """The seeds' closed forms and the definitions of docs/ARCHITECTURE.md."""
    h = np.linspace(-5, 5, 10001)
    sigmoid_derivative = activation("sigmoid", h)[1]
    assert sigmoid_derivative.max() == pytest.approx(0.25, abs=1e-15)  # sigmoid' peaks at 0.25 at 0
    assert h[np.argmax(sigmoid_derivative)] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(activation("tanh", h)[0], np.tanh(h), rtol=1e-15)
    np.testing.assert_allclose(activation("softplus", h)[0], np.log1p(np.exp(h)), rtol=1e-14)
    np.testing.assert_allclose(activation("silu", h)[0], h / (1 + np.exp(-h)), rtol=1e-14, atol=1e-300)
    np.testing.assert_allclose(activation("leaky_relu", -h[h > 0])[0], -0.01 * h[h > 0])
    # exact softplus far out: log(1 + e^h) = h + log1p(e^-h), no switch to the identity
    assert activation("softplus", np.array([40.0]))[0][0] == 40.0 + np.exp(-40.0)
    assert activation("softplus", np.array([-800.0]))[0][0] == 0.0
    # selu's constants make the derivative's left limit scale * alpha
    left_limit = activation("selu", np.array([-1e-12]))[1][0]
    assert left_limit == pytest.approx(1.0507009873554805 * 1.6732632423543772)
    # tanh' keeps full relative precision in the tails (sech^2 h ~ 4 e^{-2h})
    assert activation("tanh", np.array([30.0]))[1][0] == pytest.approx(4 * np.exp(-60.0), rel=1e-13)


@given(_small_cases(), st.integers(0, 2**16))
def test_jvp_matches_finite_differences(case, seed):
    stack, x = case
    _away_from_kinks(stack, x)
    tangent = np.random.default_rng(seed).standard_normal((1, stack.width))
    numeric = (_run(stack, x + STEP * tangent) - _run(stack, x - STEP * tangent)) / (2 * STEP)
    result = vg.jvp(stack, x, tangent, backend="numpy")[:, 0]
    np.testing.assert_allclose(result, numeric, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(numeric).max()))


@given(_small_cases(), st.integers(0, 2**16))
def test_vjp_matches_finite_differences_and_is_the_adjoint(case, seed):
    stack, x = case
    _away_from_kinks(stack, x)
    rng = np.random.default_rng(seed)
    cotangent, tangent = rng.standard_normal((2, 1, stack.width))
    result = vg.vjp(stack, x, cotangent, backend="numpy")[:, 0]
    # d/dx_i of sum_b <f(x_b), u>, coordinate by coordinate
    numeric = np.empty_like(x)
    for i in range(stack.width):
        step = np.zeros_like(x)
        step[:, i] = STEP
        numeric[:, i] = ((_run(stack, x + step) - _run(stack, x - step)) @ cotangent[0]) / (2 * STEP)
    np.testing.assert_allclose(result, numeric, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(numeric).max()))
    # <J^T u, v> = <u, J v> exactly (up to rounding), with no finite differences at all
    forward_product = vg.jvp(stack, x, tangent, backend="numpy")[:, 0] @ cotangent[0]
    np.testing.assert_allclose(result @ tangent[0], forward_product, rtol=1e-10, atol=1e-12)


@given(_small_cases())
def test_jacobian_matches_finite_differences(case):
    stack, x = case
    _away_from_kinks(stack, x)
    jacobian = vg.jacobian(stack, x, backend="numpy")
    for j in range(stack.width):
        step = np.zeros_like(x)
        step[:, j] = STEP
        column = (_run(stack, x + step) - _run(stack, x - step)) / (2 * STEP)
        np.testing.assert_allclose(jacobian[:, :, j], column, rtol=1e-5,
                                   atol=1e-6 * max(1.0, np.abs(column).max()))


def _loss_from_layer(stack, layer, x_layer, g, weights=None):
    """sum_b <x_L[b], g[b]> as a function of x_layer (the output of layer ``layer``)."""
    weights = stack.weights if weights is None else weights
    out = x_layer
    for w, b in zip(weights[layer:], stack.biases[layer:], strict=True):
        out, _ = stack_reference.layer_forward(w, b, out, stack.activation, stack.residual, stack.norm)
    return float(np.sum(out * g))


@given(_small_cases(), st.integers(0, 2**16))
def test_gradient_profile_matches_finite_differences(case, seed):
    """log_grad_norm and log_weight_grad_norm against finite differences of the loss."""
    stack, x = case
    _away_from_kinks(stack, x)
    g = np.random.default_rng(seed).standard_normal(x.shape)
    profile = vg.gradient_profile(stack, x, g, backend="numpy")
    xs = [x]
    for w, b in zip(stack.weights, stack.biases, strict=True):
        xs.append(stack_reference.layer_forward(w, b, xs[-1], stack.activation, stack.residual,
                                                stack.norm)[0])
    for layer in range(stack.depth + 1):
        gradient = np.empty_like(x)
        for index in np.ndindex(*x.shape):
            step = np.zeros_like(x)
            step[index] = STEP
            gradient[index] = (_loss_from_layer(stack, layer, xs[layer] + step, g)
                               - _loss_from_layer(stack, layer, xs[layer] - step, g)) / (2 * STEP)
        norms = np.linalg.norm(gradient, axis=1)
        assume(norms.min() > 1e-4)  # a log of a finite-difference zero says nothing
        np.testing.assert_allclose(profile.log_grad_norm[:, layer], np.log(norms), atol=1e-5)
    for layer in range(stack.depth):
        weight_gradient = np.empty((stack.width, stack.width))
        for index in np.ndindex(stack.width, stack.width):
            plus, minus = stack.weights.copy(), stack.weights.copy()
            plus[layer][index] += STEP
            minus[layer][index] -= STEP
            weight_gradient[index] = (_loss_from_layer(stack, 0, x, g, plus)
                                      - _loss_from_layer(stack, 0, x, g, minus)) / (2 * STEP)
        frobenius = np.linalg.norm(weight_gradient)
        assume(frobenius > 1e-4)
        assert profile.log_weight_grad_norm[layer] == pytest.approx(np.log(frobenius), abs=1e-5)


def _scaled_orthogonal_stack(depth: int, width: int, scale: float, seed: int) -> vg.Stack:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((depth, width, width)))
    return vg.Stack(scale * q, activation="linear")


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_linear_orthogonal_stack_closed_form(backend):
    """0.7 x orthogonal layers: log ||dL/dx_l|| = log ||g|| + (L - l) ln 0.7 exactly.

    With one sample, dL/dW_l = g_l x_{l-1}^T is rank one, so
    log ||dL/dW_l||_F = log ||g|| + log ||x_0|| + (L - 1) ln 0.7 for every layer.
    """
    depth, width = 20, 8
    stack = _scaled_orthogonal_stack(depth, width, 0.7, seed=3)
    x = np.random.default_rng(4).standard_normal((1, width))
    g = np.random.default_rng(5).standard_normal((1, width))
    profile = vg.gradient_profile(stack, x, g, backend=backend)
    layers = np.arange(depth + 1)
    expected = np.log(np.linalg.norm(g)) + (depth - layers) * np.log(0.7)
    np.testing.assert_allclose(profile.log_grad_norm[0], expected, rtol=0, atol=1e-12)
    # the seeds' figure: 20 layers scaling by 0.7 leave 0.7^20 = 7.98e-4 of the gradient
    ratio = np.exp(profile.log_grad_norm[0, 0] - profile.log_grad_norm[0, -1])
    assert ratio == pytest.approx(7.979e-4, rel=1e-3)
    expected_weight = np.log(np.linalg.norm(g)) + np.log(np.linalg.norm(x)) + (depth - 1) * np.log(0.7)
    np.testing.assert_allclose(profile.log_weight_grad_norm, expected_weight, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_log_norm_is_exact_at_depth_20000(backend):
    """At depth 20000 the plain norm 0.7^20000 underflows to 0; the log norm stays exact."""
    depth, width = 20000, 4
    q, _ = np.linalg.qr(np.random.default_rng(6).standard_normal((width, width)))
    stack = vg.Stack(np.broadcast_to(0.7 * q, (depth, width, width)), activation="linear")
    x = np.random.default_rng(7).standard_normal((2, width))
    g = np.random.default_rng(8).standard_normal((2, width))
    profile = vg.gradient_profile(stack, x, g, backend=backend)
    expected = np.log(np.linalg.norm(g, axis=1)) + depth * np.log(0.7)
    assert np.all(np.isfinite(profile.log_grad_norm))
    assert np.all(np.exp(profile.log_grad_norm[:, 0]) == 0.0)  # the plain norm underflows
    np.testing.assert_allclose(profile.log_grad_norm[:, 0], expected, rtol=1e-12)


def test_saturation_and_dead_units_closed_form():
    """Biases push chosen units deep into tanh's tails / relu's flat side."""
    width, batch = 8, 5
    x = np.random.default_rng(9).uniform(-1, 1, (batch, width))
    bias = np.zeros((1, width))
    bias[0, :3] = 20.0  # tanh'(20 +- 1) ~ 4e-36 < 1e-3: saturated on every sample
    eye = np.eye(width)[None]
    profile = vg.gradient_profile(vg.Stack(eye, bias, activation="tanh"), x, backend="numpy")
    assert profile.saturation[0] == pytest.approx(3 / width)
    assert profile.dead[0] == 0.0  # tiny but not zero
    bias[0, :3] = -20.0  # relu'(-20 +- 1) == 0 on every sample: dead
    profile = vg.gradient_profile(vg.Stack(eye, bias, activation="relu"), x, backend="numpy")
    assert profile.dead[0] == pytest.approx(3 / width)
    # the others are relu'(x) with x uniform in (-1, 1): zero exactly where x <= 0
    assert profile.saturation[0] == pytest.approx((3 * batch + np.sum(x[:, 3:] <= 0)) / (batch * width))


def test_layer_norm_matches_definition():
    v = np.random.default_rng(10).standard_normal((3, 7))
    normalised, inv_std = stack_reference.layer_norm(v)
    expected = (v - v.mean(1, keepdims=True)) / np.sqrt(v.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(normalised, expected, rtol=1e-14)
    np.testing.assert_allclose(inv_std[:, 0], 1 / np.sqrt(v.var(1) + 1e-5), rtol=1e-14)
