"""The batch-norm reference (vgcore.reference.batchnorm) against finite differences and torch autograd.

The compiled and GPU batch-norm paths are tested against this reference; this
file is why it can be trusted.  Samples are coupled through the batch
statistics, so every derivative here is of the whole batch map
F: (B, n) -> (B, n), perturbing one entry of the batch at a time.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vgcore._activations import ACTIVATIONS, NOT_SMOOTH_AT_ZERO
from vgcore.reference import batchnorm as ref

STEP = 1e-6


@st.composite
def problems(draw, max_depth: int = 4, max_width: int = 6, max_batch: int = 5):
    """(weights, biases, x, activation, residual) in float64, small enough for finite differences."""
    depth = draw(st.integers(1, max_depth))
    width = draw(st.integers(1, max_width))
    batch = draw(st.integers(2, max_batch))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    sigma_w = draw(st.floats(0.3, 2.0))
    weights = rng.standard_normal((depth, width, width)) * (sigma_w / math.sqrt(width))
    biases = draw(st.floats(0.0, 0.5)) * rng.standard_normal((depth, width))
    x = rng.standard_normal((batch, width))
    return weights, biases, x, draw(st.sampled_from(ACTIVATIONS)), draw(st.sampled_from([None, 1.0, 0.5]))


def _normalised(problem):
    """Every layer's BN output h (L, B, n)."""
    weights, biases, x, activation, residual = problem
    _, caches = ref.forward_with_caches(weights, biases, x, activation, residual)
    return np.stack([cache.normalised for cache in caches])


def _well_posed(problem):
    """Keep finite differences away from kinks and from features BN cannot normalise.

    A feature whose batch variance is comparable to eps (width-1 stacks with
    B = 2 and tiny inputs, say) has a Jacobian of size 1 / sqrt(eps) whose
    finite differences need a smaller step than the rest.
    """
    weights, biases, x, activation, residual = problem
    h = _normalised(problem)
    if activation in NOT_SMOOTH_AT_ZERO:
        assume(np.abs(h).min() > 1e-3)
    _, caches = ref.forward_with_caches(weights, biases, x, activation, residual)
    assume(max(float(cache.inv_std.max()) for cache in caches) < 30.0)


def _run(problem, x):
    weights, biases, _, activation, residual = problem
    return ref.forward(weights, biases, x, activation, residual)


@given(problems(), st.integers(0, 2**16))
def test_jvp_matches_finite_differences_of_the_batch_map(problem, seed):
    _well_posed(problem)
    weights, biases, x, activation, residual = problem
    tangent = np.random.default_rng(seed).standard_normal(x.shape)  # one tangent of the whole batch
    numeric = (_run(problem, x + STEP * tangent) - _run(problem, x - STEP * tangent)) / (2 * STEP)
    result = ref.jvp(weights, biases, x, tangent[:, None, :], activation, residual)[:, 0]
    np.testing.assert_allclose(result, numeric, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(numeric).max()))


@given(problems(), st.integers(0, 2**16))
def test_vjp_is_the_adjoint_and_the_batch_jacobian_matches_finite_differences(problem, seed):
    _well_posed(problem)
    weights, biases, x, activation, residual = problem
    batch, width = x.shape
    rng = np.random.default_rng(seed)
    cotangents, tangents = rng.standard_normal((2, batch, 3, width))
    jacobian = ref.batch_jacobian(weights, biases, x, activation, residual)  # (B, n, B, n)
    for c, j in np.ndindex(batch, width):
        step = np.zeros_like(x)
        step[c, j] = STEP
        column = (_run(problem, x + step) - _run(problem, x - step)) / (2 * STEP)
        np.testing.assert_allclose(jacobian[:, :, c, j], column, rtol=1e-5,
                                   atol=1e-6 * max(1.0, np.abs(column).max()))
    flat = jacobian.reshape(batch * width, batch * width)
    # the k-th tangent / cotangent of the batch is vectors[:, k, :]
    pulled = ref.vjp(weights, biases, x, cotangents, activation, residual)
    pushed = ref.jvp(weights, biases, x, tangents, activation, residual)
    for k in range(3):
        np.testing.assert_allclose(pulled[:, k].ravel(), flat.T @ cotangents[:, k].ravel(), rtol=1e-10,
                                   atol=1e-12 * max(1.0, np.abs(flat).max()))
        np.testing.assert_allclose(pushed[:, k].ravel(), flat @ tangents[:, k].ravel(), rtol=1e-10,
                                   atol=1e-12 * max(1.0, np.abs(flat).max()))


def _loss(problem, g, x_layer, layer, weights=None):
    """sum_b <x_L[b], g[b]> as a function of x_layer, the output of layer ``layer``."""
    stack_weights, biases, _, activation, residual = problem
    weights = stack_weights if weights is None else weights
    return float(np.sum(ref.forward(weights[layer:], biases[layer:], x_layer, activation, residual) * g))


@given(problems(max_depth=3, max_width=4, max_batch=4), st.integers(0, 2**16))
def test_gradient_profile_matches_finite_differences(problem, seed):
    _well_posed(problem)
    weights, biases, x, activation, residual = problem
    g = np.random.default_rng(seed).standard_normal(x.shape)
    profile = ref.gradient_profile(weights, biases, x, g, activation, residual)
    xs = [x]
    for layer in range(len(weights)):
        xs.append(ref.forward(weights[layer:layer + 1], biases[layer:layer + 1], xs[-1], activation,
                              residual))
    for layer in range(len(weights) + 1):
        gradient = np.empty_like(x)
        for index in np.ndindex(*x.shape):
            step = np.zeros_like(x)
            step[index] = STEP
            gradient[index] = (_loss(problem, g, xs[layer] + step, layer)
                               - _loss(problem, g, xs[layer] - step, layer)) / (2 * STEP)
        norms = np.linalg.norm(gradient, axis=1)
        assume(norms.min() > 1e-4)
        np.testing.assert_allclose(profile["log_grad_norm"][:, layer], np.log(norms), atol=1e-5)
    for layer in range(len(weights)):
        weight_gradient = np.empty(weights.shape[1:])
        for index in np.ndindex(*weights.shape[1:]):
            plus, minus = weights.copy(), weights.copy()
            plus[layer][index] += STEP
            minus[layer][index] -= STEP
            weight_gradient[index] = (_loss(problem, g, x, 0, plus)
                                      - _loss(problem, g, x, 0, minus)) / (2 * STEP)
        frobenius = np.linalg.norm(weight_gradient)
        assume(frobenius > 1e-4)
        assert profile["log_weight_grad_norm"][layer] == pytest.approx(np.log(frobenius), abs=1e-5)


# --------------------------------------------------------------------------- torch autograd

torch = pytest.importorskip("torch")

_TORCH_ACTIVATIONS = {
    "linear": lambda h: h, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu,
    "leaky_relu": lambda h: torch.nn.functional.leaky_relu(h, 0.01), "elu": torch.nn.functional.elu,
    "selu": torch.selu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu,
    "softplus": lambda h: torch.log1p(torch.exp(-h.abs())) + torch.relu(h), "erf": torch.erf,
}


def _torch_stack(weights, biases, activation, residual):
    """The same stack as torch modules: Linear + nn.BatchNorm1d(affine=False) in training mode."""
    width = weights.shape[1]
    phi = _TORCH_ACTIVATIONS[activation]
    linears = []
    for weight, bias in zip(weights, biases, strict=True):
        linear = torch.nn.Linear(width, width, dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(weight))
            linear.bias.copy_(torch.from_numpy(bias))
        linears.append(linear)
    norm = torch.nn.BatchNorm1d(width, affine=False, track_running_stats=False, dtype=torch.float64)
    norm.train()

    def run(x, keep=None):
        for linear in linears:
            f = phi(norm(linear(x)))
            x = x + residual * f if residual is not None else f
            if keep is not None:
                x.retain_grad()
                keep.append(x)
        return x

    return linears, run


def _determined(log_norms):
    """(B, L+1) mask of the log gradient norms that float64 fixes to 1e-9.

    Where BN cancels a gradient (B = 2, where each feature normalises to +-1
    whatever its input, or width 1) the result is eps-sized and its relative
    rounding error is eps64 over the shrinkage; such layers, the layers below
    them and samples far below their layer's largest norm are left out once the
    shrinkage passes 1e6.
    """
    top = log_norms.max(axis=0)
    shrink = np.maximum(0.0, top[1:] - top[:-1])  # shrinkage of the step into layer l
    cumulative = np.append(np.cumsum(shrink[::-1])[::-1], 0.0)
    limit = math.log(1e6)
    return (cumulative[None, :] < limit) & (log_norms > top[None, :] - limit)


@settings(max_examples=30)
@given(problems(max_depth=6, max_width=8, max_batch=16), st.integers(0, 2**16))
def test_reference_matches_torch_batchnorm1d_autograd(problem, seed):
    """Forward, per-sample log gradient norms, weight-gradient norms, jvp and vjp, to 1e-9."""
    weights, biases, x, activation, residual = problem
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(x.shape)
    linears, run = _torch_stack(weights, biases, activation, residual)
    x_torch = torch.tensor(x, requires_grad=True)
    kept = [x_torch]
    out = run(x_torch, kept)
    (out * torch.from_numpy(g)).sum().backward()
    np.testing.assert_allclose(ref.forward(weights, biases, x, activation, residual), out.detach().numpy(),
                               rtol=1e-9, atol=1e-9)
    profile = ref.gradient_profile(weights, biases, x, g, activation, residual)
    with np.errstate(divide="ignore"):
        expected = np.log(np.stack([np.linalg.norm(t.grad.numpy(), axis=1) for t in kept], axis=1))
        expected_weight = np.log([np.linalg.norm(linear.weight.grad.numpy()) for linear in linears])
    determined = _determined(expected)
    np.testing.assert_allclose(profile["log_grad_norm"][determined], expected[determined], rtol=0, atol=1e-9)
    # BN makes each row of W scale invariant (d loss / d W_j is orthogonal to W_j): at width 1 and
    # at B = 2 the weight gradient is eps-sized by structure; keep layers where it is not a
    # cancellation of the natural size ||d loss / d x_l|| ||x_{l-1}|| max inv_std.
    _, caches = ref.forward_with_caches(weights, biases, x, activation, residual)
    natural = np.array([np.linalg.norm(kept[layer + 1].grad.numpy()) * np.linalg.norm(cache.x)
                        * cache.inv_std.max() for layer, cache in enumerate(caches)])
    with np.errstate(divide="ignore"):
        layers = determined[:, :-1].any(axis=0) & (expected_weight > np.log(natural) - math.log(1e6))
    np.testing.assert_allclose(profile["log_weight_grad_norm"][layers], expected_weight[layers], rtol=0,
                               atol=1e-9)
    vectors = rng.standard_normal((x.shape[0], 2, x.shape[1]))
    for k in range(2):
        _, pushed = torch.func.jvp(run, (torch.tensor(x),), (torch.from_numpy(vectors[:, k].copy()),))
        _, pull = torch.func.vjp(run, torch.tensor(x))
        (pulled,) = pull(torch.from_numpy(vectors[:, k].copy()))
        for mine, theirs in ((ref.jvp(weights, biases, x, vectors, activation, residual)[:, k], pushed),
                             (ref.vjp(weights, biases, x, vectors, activation, residual)[:, k], pulled)):
            theirs = theirs.detach().numpy()
            np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-9 * max(1.0, np.abs(theirs).max()))


# --------------------------------------------------------------------------- closed forms, exactness at depth


def test_batch_norm_matches_definition():
    v = np.random.default_rng(10).standard_normal((5, 3))
    normalised, inv_std = ref.batch_norm(v)
    expected = (v - v.mean(0)) / np.sqrt(v.var(0) + 1e-5)
    np.testing.assert_allclose(normalised, expected, rtol=1e-14)
    np.testing.assert_allclose(inv_std, 1 / np.sqrt(v.var(0) + 1e-5), rtol=1e-14)


def test_batch_of_two_normalises_to_signs():
    """B = 2: each feature becomes +-sqrt(var / (var + eps)); a batch-constant tangent is killed."""
    rng = np.random.default_rng(11)
    weights, x = rng.standard_normal((1, 4, 4)), rng.standard_normal((2, 4))
    out = ref.forward(weights, np.zeros((1, 4)), x, "linear", None)
    v = x @ weights[0].T
    half_gap = np.abs(v[0] - v[1]) / 2
    np.testing.assert_allclose(np.abs(out), np.broadcast_to(half_gap / np.sqrt(half_gap**2 + 1e-5), (2, 4)),
                               rtol=1e-13)
    shared = np.broadcast_to(rng.standard_normal(4), (2, 1, 4)).copy()
    assert np.abs(ref.jvp(weights, np.zeros((1, 4)), x, shared, "tanh", None)).max() < 1e-15


def test_log_norms_exact_at_depth_with_batch_wide_renormalisation():
    """Linear BN at B = 4 grows gradients ~2x per layer: 3000 layers overflow any float.

    The log norms stay finite; a grad_output scaled by 1e-150 shifts every log
    norm by log(1e-150) exactly (the backward is linear in the batch
    cotangent); and the per-sample log norms of the top layers equal the ones
    of the plain, unrenormalised torch-checked computation.
    """
    depth, width, batch = 3000, 64, 4
    rng = np.random.default_rng(12)
    weights = rng.standard_normal((depth, width, width)) / math.sqrt(width)
    biases = np.zeros((depth, width))
    x, g = rng.standard_normal((2, batch, width))
    profile = ref.gradient_profile(weights, biases, x, g, "linear", None)
    logs = profile["log_grad_norm"]
    assert np.all(np.isfinite(logs)) and np.all(np.isfinite(profile["log_weight_grad_norm"]))
    assert logs[:, 0].min() - logs[:, -1].max() > math.log(np.finfo(np.float64).max)  # plain norms overflow
    tiny = ref.gradient_profile(weights, biases, x, 1e-150 * g, "linear", None)
    np.testing.assert_allclose(tiny["log_grad_norm"] - logs, math.log(1e-150), rtol=1e-13)
    np.testing.assert_allclose(tiny["log_weight_grad_norm"] - profile["log_weight_grad_norm"],
                               math.log(1e-150), rtol=1e-13)
    # the top 20 layers without any renormalisation
    top = 20
    _, caches = ref.forward_with_caches(weights, biases, x, "linear", None)
    plain = g
    for layer in range(depth, depth - top, -1):
        np.testing.assert_allclose(logs[:, layer], np.log(np.linalg.norm(plain, axis=1)), rtol=0, atol=1e-11)
        plain, _ = ref.layer_vjp(weights[layer - 1], caches[layer - 1], plain, None)


def test_saturation_and_dead_units():
    """BN output of a feature over B = 2 is +-1 (eps aside): relu kills one sample per feature."""
    width, batch = 6, 2
    rng = np.random.default_rng(13)
    x = rng.standard_normal((batch, width))
    profile = ref.gradient_profile(np.eye(width)[None], np.zeros((1, width)), x, rng.standard_normal(x.shape),
                                   "relu", None)
    assert profile["saturation"][0] == 0.5  # relu'(h) = 0 on exactly one sample of each feature
    assert profile["dead"][0] == 0.0
    # a feature constant over the batch normalises to 0 on every sample: relu'(0) = 0, dead
    x[:, :2] = 1.5
    profile = ref.gradient_profile(np.eye(width)[None], np.zeros((1, width)), x, rng.standard_normal(x.shape),
                                   "relu", None)
    assert profile["dead"][0] == pytest.approx(2 / width)
    assert profile["saturation"][0] == pytest.approx((2 * batch + (width - 2)) / (batch * width))
