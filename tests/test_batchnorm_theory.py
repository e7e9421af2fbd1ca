"""vg.theory's batch-norm closed forms: against Monte Carlo of their own integrals and wide networks."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import vgcore as vg
from vgcore._activations import activation
from vgcore.theory.batchnorm import batchnorm_chi


def _sphere_chi(name: str, batch: int, samples: int, seed: int) -> float:
    """chi from the module's integral, by Monte Carlo over zhat uniform on the unit sphere of 1^perp.

    chi = B E[tr(D G D P)] / ((B - 3)(B - 1)(K_aa - K_ab)), P = G - zhat zhat^T,
    D = diag(phi'(sqrt(B) zhat)), K = E[phi(z) phi(z)^T]: the same expectations
    that the closed form evaluates with arc-cosine kernels and orthant
    probabilities, here sampled directly.
    """
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((samples, batch))
    g -= g.mean(axis=1, keepdims=True)
    zhat = g / np.linalg.norm(g, axis=1, keepdims=True)
    value, d = activation(name, math.sqrt(batch) * zhat)
    k_diff = np.mean(value[:, 0] ** 2) - np.mean(value[:, 0] * value[:, 1])
    d2 = d * d
    trace = (d2.sum(1) * (1 - 2 / batch) - (d2 * zhat**2).sum(1) + d.sum(1) ** 2 / batch**2
             + (zhat * d).sum(1) ** 2 / batch)
    return batch * trace.mean() / ((batch - 3) * (batch - 1) * k_diff)


@pytest.mark.parametrize("name", ["linear", "relu", "leaky_relu"])
@pytest.mark.parametrize("batch", [4, 5, 8, 32])
def test_closed_form_matches_monte_carlo_of_its_integral(name, batch):
    sampled = _sphere_chi(name, batch, 400_000, seed=batch)
    assert batchnorm_chi(name, batch) == pytest.approx(sampled, rel=1e-2)


def test_linear_is_the_papers_rate_and_relu_tends_to_pi_over_pi_minus_1():
    for batch in (4, 5, 10, 64, 1000):
        assert batchnorm_chi("linear", batch) == pytest.approx((batch - 2) / (batch - 3), rel=1e-12)
    assert batchnorm_chi("linear", math.inf) == 1.0
    assert batchnorm_chi("relu", math.inf) == pytest.approx(math.pi / (math.pi - 1), rel=1e-15)
    assert batchnorm_chi("relu", 10**7) == pytest.approx(math.pi / (math.pi - 1), rel=1e-5)
    # explosion grows as the batch shrinks
    values = [batchnorm_chi("relu", b) for b in (4, 8, 16, 64, 256)]
    assert all(a > b for a, b in itertools.pairwise(values))


def test_large_batch_limit_of_smooth_activations_is_a_gaussian_ratio():
    z = np.random.default_rng(0).standard_normal(2_000_000)
    value, derivative = activation("tanh", z)
    assert batchnorm_chi("tanh", math.inf) == pytest.approx(np.mean(derivative**2) / np.var(value), rel=3e-3)


def test_no_closed_form_is_nan():
    assert math.isnan(batchnorm_chi("relu", 3))
    assert math.isnan(batchnorm_chi("linear", 2))
    assert math.isnan(batchnorm_chi("tanh", 16))
    assert math.isnan(batchnorm_chi("elu", math.inf))


@pytest.mark.parametrize("batch, error", [(1, ValueError), (2.5, ValueError), (math.nan, ValueError),
                                          ("8", TypeError), (True, TypeError), (None, TypeError)])
def test_bad_batch_is_refused_naming_it(batch, error):
    with pytest.raises(error, match="batch"):
        batchnorm_chi("relu", batch)


def test_bad_activation_is_refused_naming_it():
    with pytest.raises(ValueError, match="activation"):
        batchnorm_chi("swish", 8)
    with pytest.raises(TypeError, match="activation"):
        batchnorm_chi(None, 8)


def _measured_chi(name: str, batch: int, width: int = 512, depth: int = 40, seed: int = 0) -> float:
    """Per-layer ratio of squared gradient norms of a wide BN stack, fitted over its middle layers.

    The compiled backend (held to the reference in test_batchnorm_backends.py), for speed.
    """
    stack = vg.Stack.random(depth, width, activation=name, sigma_w=math.sqrt(2.0), norm="batch", seed=seed)
    x = vg.random_inputs(stack, batch, seed=seed + 1)
    profile = vg.gradient_profile(stack, x, backend="cpu")
    mean_log = profile.log_grad_norm.mean(axis=0)
    layers = np.arange(depth // 5, depth - depth // 5 + 1)
    slope = np.polyfit(layers, mean_log[layers], 1)[0]
    return math.exp(-2.0 * slope)


@pytest.mark.parametrize("name", ["linear", "relu"])
@pytest.mark.parametrize("batch", [8, 16, 64])
def test_wide_networks_grow_gradients_at_the_theorys_rate(name, batch):
    """Width 512: within 3 % (measured 0.1-1.1 %; the theory is the infinite-width limit)."""
    assert _measured_chi(name, batch, seed=batch) == pytest.approx(batchnorm_chi(name, batch), rel=0.03)


def test_wide_tanh_network_at_a_large_batch_approaches_the_limit():
    """B = 128: 1.187 measured against the B = inf limit 1.180 (the finite-batch excess is O(1 / B))."""
    measured = _measured_chi("tanh", 128, seed=3)
    assert measured == pytest.approx(batchnorm_chi("tanh", math.inf), rel=0.02)
    assert measured > batchnorm_chi("tanh", math.inf)
