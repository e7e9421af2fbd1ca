"""Batch-normalised stacks (norm="batch") through the public API: compiled == reference, refusals, exactness.

The reference itself is held to finite differences and torch autograd in
tests/test_batchnorm_reference.py; here every other backend is held to it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from batchnorm_strategies import batchnorm_cases
from conftest import CUDA, assert_matches_reference, assert_profile_matches_reference, references
from hypothesis import given, settings
from hypothesis import strategies as st

import vgcore as vg

BACKENDS = ["cpu"] + (["cuda"] if CUDA else [])


def _on(backend, stack, *arrays):
    """The stack and arrays on the backend's device (host arrays back with _host)."""
    if backend != "cuda":
        return (stack, *arrays)
    import cupy

    moved = vg.Stack(cupy.asarray(stack.weights), cupy.asarray(stack.biases), activation=stack.activation,
                     residual=stack.residual, norm=stack.norm)
    return (moved, *(cupy.asarray(a) for a in arrays))


def _host(array):
    return array.get() if hasattr(array, "get") else np.asarray(array)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30)
@given(case=batchnorm_cases(max_depth=20), seed=st.integers(0, 2**16))
def test_forward_and_profile_equal_the_reference(backend, case, seed):
    stack, x = case
    g = np.random.default_rng(seed).standard_normal(x.shape).astype(stack.dtype)
    before = (x.copy(), g.copy(), np.array(stack.weights), np.array(stack.biases))
    model, x_dev, g_dev = _on(backend, stack, x, g)
    low, high = references(vg.forward, stack, x)
    assert_matches_reference(_host(vg.forward(model, x_dev, backend=backend)), high, low, dtype=stack.dtype,
                             relative_to="max")
    profile = vg.gradient_profile(model, x_dev, g_dev, backend=backend).to_numpy() \
        if backend == "cuda" else vg.gradient_profile(model, x_dev, g_dev, backend=backend)
    assert_profile_matches_reference(profile, stack, x, g)
    for original, now in zip(before, (x, g, stack.weights, stack.biases), strict=True):
        np.testing.assert_array_equal(original, now)  # no input modified


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("product", ["jvp", "vjp"])
@settings(max_examples=25)
@given(case=batchnorm_cases(max_depth=12), k=st.integers(1, 5), shared=st.booleans(),
       seed=st.integers(0, 2**16))
def test_batch_jacobian_products_equal_the_reference(backend, product, case, k, shared, seed):
    """The k-th batch vector is vectors[:, k, :]; (k, n) vectors are the same vector in every sample."""
    stack, x = case
    shape = (k, stack.width) if shared else (x.shape[0], k, stack.width)
    vectors = np.random.default_rng(seed).standard_normal(shape).astype(stack.dtype)
    model, x_dev, v_dev = _on(backend, stack, x, vectors)
    actual = _host(getattr(vg, product)(model, x_dev, v_dev, backend=backend))
    low, high = references(getattr(vg, product), stack, x, vectors)
    assert actual.shape == (x.shape[0], k, stack.width)
    assert_matches_reference(actual, high, low, dtype=stack.dtype, relative_to="max")


def test_results_do_not_depend_on_the_thread_count(monkeypatch):
    from threadpoolctl import threadpool_limits

    from vgcore.backends import cpu_batchnorm

    monkeypatch.setattr(cpu_batchnorm, "PARALLEL_LAYER_WORK", 0)  # small layers on every thread too

    stack = vg.Stack.random(12, 37, activation="tanh", norm="batch", residual=0.5, seed=3)
    x = vg.random_inputs(stack, 9, seed=4)
    tangents = np.random.default_rng(5).standard_normal((9, 7, 37))
    results = []
    for threads in (1, 2):
        with threadpool_limits(threads, user_api="openmp"):
            profile = vg.gradient_profile(stack, x, backend="cpu")
            results.append((profile.log_grad_norm, profile.log_weight_grad_norm, vg.forward(stack, x),
                            vg.jvp(stack, x, tangents), vg.vjp(stack, x, tangents)))
    for one, two in zip(*results, strict=True):
        np.testing.assert_array_equal(one, two)


def test_log_norms_exact_at_depth_and_at_any_scale_of_grad_output():
    """Linear BN at B = 4 doubles squared gradients per layer: 3000 layers overflow any float.

    The compiled log norms stay finite and equal the reference's (itself
    checked at this depth in test_batchnorm_reference.py); grad_output scaled
    by 1e-300 (squares underflow) shifts them by log(1e-300) exactly, since
    the kernel scales by the largest entry before squaring.
    """
    stack = vg.Stack.random(3000, 64, activation="linear", norm="batch", seed=6)
    x = vg.random_inputs(stack, 4, seed=7)
    g = np.random.default_rng(8).standard_normal(x.shape)
    profile = vg.gradient_profile(stack, x, g, backend="cpu")
    assert np.all(np.isfinite(profile.log_grad_norm)) and np.all(np.isfinite(profile.log_weight_grad_norm))
    assert profile.log_grad_norm[:, 0].min() - profile.log_grad_norm[:, -1].max() > 709.8  # > log(float max)
    reference = vg.gradient_profile(stack, x, g, backend="numpy")
    np.testing.assert_allclose(profile.log_grad_norm, reference.log_grad_norm, rtol=1e-10)
    np.testing.assert_allclose(profile.log_weight_grad_norm, reference.log_weight_grad_norm, rtol=1e-10)
    tiny = vg.gradient_profile(stack, x, 1e-300 * g, backend="cpu")
    np.testing.assert_allclose(tiny.log_grad_norm - profile.log_grad_norm, math.log(1e-300), rtol=1e-12)
    np.testing.assert_allclose(tiny.log_weight_grad_norm - profile.log_weight_grad_norm, math.log(1e-300),
                               rtol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_identical_samples_have_exactly_zero_weight_gradients(backend):
    """d loss / d W_l = g_v^T x_{l-1} and g_v sums to zero over the batch: with identical samples it is 0.

    (Before the weight gradient was formed from the batch-centred input, the
    compiled Gram-matrix route returned rounding noise as large as e^-1.3.)
    """
    stack = vg.Stack.random(4, 6, activation="tanh", norm="batch", residual=0.5, seed=0)
    profile = vg.gradient_profile(stack, np.ones((3, 6)), backend=backend)
    assert np.all(np.isfinite(profile.log_grad_norm))
    if backend == "cpu":  # the centred inputs are exactly zero
        assert np.all(profile.log_weight_grad_norm == -np.inf)
    else:  # NumPy's batch mean of equal values may round: what is left is rounding noise
        assert np.all(profile.log_weight_grad_norm < profile.log_grad_norm.max() - math.log(1e12))


def test_profiles_carry_the_theory_of_their_batch_size():
    """Profile.chi_theory is batchnorm_chi(activation, B); the stack's own (no B) the large-batch limit."""
    stack = vg.Stack.random(3, 8, activation="relu", norm="batch", seed=0)
    for batch in (4, 16):
        profile = vg.gradient_profile(stack, vg.random_inputs(stack, batch, seed=1), backend="cpu")
        assert profile.chi_theory == vg.theory.batchnorm_chi("relu", batch)
    assert stack.chi_theory == vg.theory.batchnorm_chi("relu", math.inf)
    with_residual = vg.Stack.random(3, 8, activation="relu", norm="batch", residual=1.0, seed=0)
    assert math.isnan(vg.gradient_profile(with_residual, vg.random_inputs(stack, 4, seed=1)).chi_theory)


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize("call", ["jacobian", "singular_values", "lyapunov_exponents"])
def test_per_sample_spectra_are_refused_naming_norm(backend, call):
    stack = vg.Stack.random(3, 4, activation="tanh", norm="batch", seed=0)
    with pytest.raises(ValueError, match=r"^norm: 'batch'"):
        getattr(vg, call)(stack, vg.random_inputs(stack, 3, seed=1), backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize("call", ["forward", "gradient_profile", "jvp", "vjp"])
def test_a_batch_of_one_is_refused_naming_x(backend, call):
    stack = vg.Stack.random(3, 4, activation="relu", norm="batch", seed=0)
    arguments = (np.ones((1, 2, 4)),) if call in ("jvp", "vjp") else ()
    with pytest.raises(ValueError, match=r"^x: "):
        getattr(vg, call)(stack, np.ones((1, 4)), *arguments, backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
@pytest.mark.parametrize(("argument", "value", "error"), [
    ("x", np.full((3, 4), np.nan), ValueError),
    ("x", np.ones((3, 5)), ValueError),
    ("x", np.ones((3, 4), np.int64), TypeError),
    ("grad_output", np.full((3, 4), np.inf), ValueError),
    ("grad_output", np.ones((2, 4)), ValueError),
    ("tangents", np.full((3, 2, 4), np.nan), ValueError),
    ("tangents", np.ones((2, 2, 4)), ValueError),
])
def test_bad_input_is_refused_naming_it(backend, argument, value, error):
    stack = vg.Stack.random(3, 4, activation="relu", norm="batch", seed=0)
    x = np.ones((3, 4)) if argument != "x" else value
    with pytest.raises(error, match=rf"^{argument}:"):
        if argument == "tangents":
            vg.jvp(stack, x, value, backend=backend)
        elif argument == "grad_output":
            vg.gradient_profile(stack, x, value, backend=backend)
        else:
            vg.gradient_profile(stack, x, backend=backend)


def test_random_stack_accepts_batch_norm_and_reports_it():
    stack = vg.Stack.random(4, 8, activation="relu", norm="batch", seed=0)
    assert stack.norm == "batch" and stack.kind == "batchnorm"
    assert stack.config()["norm"] == "batch"
    assert "norm='batch'" in repr(stack)


def test_sweeps_and_the_command_line_run_batch_norm(tmp_path):
    """A sweep row of a norm="batch" config is the call-by-call profile, with the theory of its batch size."""
    from vgcore.cli import main
    from vgcore.sweep import input_seed

    result = vg.sweep({"depth": 6, "width": 12, "activation": ["relu", "tanh"], "norm": "batch"}, batch=5,
                      seeds=1, backend="cpu", progress=False)
    for row in result.frame.itertuples():
        stack = vg.Stack.random(6, 12, activation=row.activation, norm="batch", seed=row.seed)
        x = vg.random_inputs(stack, 5, seed=input_seed(row.seed))
        profile = vg.gradient_profile(stack, x, backend="cpu")
        np.testing.assert_allclose(row.log_grad_norm, profile.log_grad_norm.mean(axis=0), rtol=1e-12)
        assert row.chi_theory == pytest.approx(vg.theory.batchnorm_chi(row.activation, 5), nan_ok=True)
    assert main(["sweep", "--depth", "4", "--width", "8", "--norm", "batch,none", "--batch", "4",
                 "--out", str(tmp_path / "store"), "--no-progress"]) == 0
