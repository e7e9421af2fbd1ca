"""Gradient clipping: vg.stats.global_norm / clip_coefficient against PyTorch's clip_grad_norm_."""

from __future__ import annotations

import math

import numpy as np
import pytest

import vgcore as vg
from vgcore import stats

torch = pytest.importorskip("torch")


def torch_weight_grads(stack: vg.Stack, x: np.ndarray, grad_output: np.ndarray) -> list:
    """d loss / d W_l by torch autograd for the loss sum_b <x_L[b], g[b]> (tanh, optional residual/pre-LN)."""
    weights = [torch.tensor(w, dtype=torch.float64, requires_grad=True) for w in np.asarray(stack.weights)]
    biases = torch.tensor(np.asarray(stack.biases), dtype=torch.float64)
    h = torch.tensor(x, dtype=torch.float64)
    for index, weight in enumerate(weights):
        u = torch.nn.functional.layer_norm(h, h.shape[-1:], eps=1e-5) if stack.norm == "pre" else h
        f = torch.tanh(u @ weight.T + biases[index])
        h = h + stack.residual * f if stack.residual is not None else f
    (h * torch.tensor(grad_output, dtype=torch.float64)).sum().backward()
    return [w.grad for w in weights]


CASES = [
    dict(depth=6, width=8, sigma_w=1.0, residual=None, norm=None),
    dict(depth=12, width=16, sigma_w=3.0, residual=None, norm=None),  # growing towards the input
    dict(depth=8, width=8, sigma_w=1.0, residual=0.5, norm="pre"),
]


@pytest.mark.parametrize("case", CASES)
def test_global_norm_and_clip_coefficient_equal_torch_clip_grad_norm(case):
    stack = vg.Stack.random(
        case["depth"], case["width"], activation="tanh", sigma_w=case["sigma_w"], sigma_b=0.1,
        residual=case["residual"], norm=case["norm"], seed=3,
    )
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, case["width"]))
    grad_output = rng.standard_normal((5, case["width"]))
    profile = vg.gradient_profile(stack, x, grad_output, backend="numpy")

    grads = torch_weight_grads(stack, x, grad_output)
    total = float(torch.nn.utils.get_total_norm(grads))
    assert stats.global_norm(profile) == pytest.approx(math.log(total), abs=1e-10)
    assert stats.summary(profile)["log_global_norm"] == stats.global_norm(profile)

    for max_norm in (total / 7.0, total / 1.5, 2.0 * total):
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        returned = torch.nn.utils.clip_grad_norm_(params, max_norm)
        applied = float(params[0].grad.norm() / grads[0].norm())  # the factor torch multiplied by
        assert float(returned) == pytest.approx(total, rel=1e-12)
        # torch divides by total + 1e-6: a relative difference of 1e-6 / total
        assert stats.clip_coefficient(profile, max_norm) == pytest.approx(applied, rel=1e-6 / total + 1e-12)
    assert stats.clip_coefficient(profile, 2.0 * total) == 1.0


def test_global_norm_is_exact_in_log_space_where_plain_norms_overflow_or_underflow():
    for shift in (-2000.0, 0.0, 2000.0):
        log_norms = np.log([3.0, 4.0, 12.0]) + shift
        assert stats.global_norm(log_norms) == pytest.approx(math.log(13.0) + shift, abs=1e-12)
    assert stats.global_norm([-np.inf, math.log(2.0)]) == pytest.approx(math.log(2.0))
    assert stats.global_norm([-np.inf, -np.inf]) == -np.inf
    assert stats.clip_coefficient([-np.inf], 1.0) == 1.0
    # 1e300 and 1e300: total sqrt(2) * 1e300 overflows float64 as a plain norm, not in logs
    assert stats.clip_coefficient(np.log([1e300, 1e300]), 1e300) == pytest.approx(1 / math.sqrt(2.0))


def test_batches_give_one_value_per_profile_and_array_summary_has_nan():
    stacks = [vg.Stack.random(4, 6, activation="tanh", seed=seed) for seed in (1, 2)]
    x = np.random.default_rng(0).standard_normal((3, 6))
    g = np.random.default_rng(1).standard_normal((3, 6))
    profiles = [vg.gradient_profile(s, x, g, backend="numpy") for s in stacks]
    batch = stats.global_norm(profiles)
    assert batch.shape == (2,)
    np.testing.assert_array_equal(batch, [stats.global_norm(p) for p in profiles])
    np.testing.assert_array_equal(
        stats.clip_coefficient(profiles, 1e-3), [stats.clip_coefficient(p, 1e-3) for p in profiles]
    )
    assert math.isnan(stats.summary(np.array([0.0, -1.0, -2.0]))["log_global_norm"])


@pytest.mark.parametrize(
    ("call", "error", "name"),
    [
        (lambda: stats.global_norm("x"), TypeError, "profile"),
        (lambda: stats.global_norm([[1.0, 2.0]]), ValueError, "profile"),
        (lambda: stats.global_norm([]), ValueError, "profile"),
        (lambda: stats.global_norm([1.0, np.nan]), ValueError, "NaN"),
        (lambda: stats.global_norm([1.0, np.inf]), ValueError, "inf"),
        (lambda: stats.clip_coefficient([1.0], 0.0), ValueError, "max_norm"),
        (lambda: stats.clip_coefficient([1.0], math.inf), ValueError, "max_norm"),
        (lambda: stats.clip_coefficient([1.0], "1"), TypeError, "max_norm"),
        (lambda: stats.clip_coefficient([1.0], True), TypeError, "max_norm"),
    ],
)
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


def test_input_is_not_modified():
    log_norms = np.array([0.5, -1.0, 2.0])
    before = log_norms.copy()
    stats.global_norm(log_norms)
    stats.clip_coefficient(log_norms, 0.1)
    np.testing.assert_array_equal(log_norms, before)
