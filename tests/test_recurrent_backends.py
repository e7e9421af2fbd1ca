"""The compiled CPU backend of recurrent models against the NumPy reference (and the public API around it).

Every computation over generated cells, widths, steps, batches, inputs on and
off, float32 and float64: float64 to 1e-10, float32 to 1e-4 where the
problem is well conditioned (conftest.assert_matches_reference's rule).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import assert_matches_reference
from hypothesis import given, settings
from hypothesis import strategies as st
from recurrent_strategies import DTYPES, recast, recurrent_cases

import vgcore as vg
from vgcore._activations import NOT_SMOOTH_AT_ZERO
from vgcore._recurrent import Recurrent

COMPUTATIONS = ["forward", "gradient_profile", "jvp", "vjp", "jacobian", "singular_values",
                "lyapunov_exponents"]


def _cases():
    return recurrent_cases(max_width=8, max_steps=12, max_batch=5, max_input=4, dtypes=DTYPES)


def _compute(name, model, s0, steps, inputs, backend, *, vectors=None, k=None, warmup=0, segment=None):
    """One public computation as a flat float64 array."""
    call = {"steps": steps, "inputs": inputs, "backend": backend}
    if name == "gradient_profile":
        g = vg._api.default_grad_output(model, s0.shape[0])
        profile = vg.gradient_profile(model, s0, g, segment=segment, **call)
        return np.concatenate([profile.log_grad_norm.ravel(), profile.log_weight_grad_norm])
    if name in ("jvp", "vjp"):
        return getattr(vg, name)(model, s0, vectors, **call)
    if name == "lyapunov_exponents":
        return vg.lyapunov_exponents(model, s0, k, warmup=warmup, **call)
    return getattr(vg, name)(model, s0, **call)


def _references(name, model, s0, steps, inputs, **options):
    """(low, high): the reference in float32 and float64 for the same problem (conftest.references' rule)."""
    other = np.float64 if model.dtype == np.float32 else np.float32

    def cast(a):
        return None if a is None else np.asarray(a, other)

    vectors = options.pop("vectors", None)
    converted = _compute(name, recast(model, other), cast(s0), steps, cast(inputs), "numpy",
                         vectors=cast(vectors), **options)
    own = _compute(name, model, s0, steps, inputs, "numpy", vectors=vectors, **options)
    return (own, converted) if model.dtype == np.float32 else (converted, own)


@pytest.mark.parametrize("name", COMPUTATIONS)
@settings(max_examples=40)
@given(case=_cases(), data=st.data())
def test_compiled_equals_reference(name, case, data):
    model, s0, steps, inputs = case
    if name in ("singular_values", "lyapunov_exponents") and model.activation in NOT_SMOOTH_AT_ZERO:
        return  # a kink rounding can switch decides the spectrum; the profile and products still compared
    options = {}
    if name in ("jvp", "vjp"):
        leading = data.draw(st.sampled_from([(2,), (s0.shape[0], 3)]))
        options["vectors"] = np.random.default_rng(0).standard_normal((*leading, model.state_width))
    if name == "lyapunov_exponents":
        options["k"] = data.draw(st.integers(1, model.state_width))
        options["warmup"] = data.draw(st.integers(0, 3))
        if inputs is not None and options["warmup"]:
            shape = (s0.shape[0], options["warmup"], model.input_width)
            extra = np.random.default_rng(1).standard_normal(shape)
            inputs = np.concatenate([extra.astype(model.dtype), inputs], axis=1)
    before = [np.array(a, copy=True) for a in (s0, *model.parameters)]
    actual = _compute(name, model, s0, steps, inputs, "cpu", **options)
    low, high = _references(name, model, s0, steps, inputs, **options)
    logs = name in ("gradient_profile", "lyapunov_exponents")
    assert_matches_reference(actual, high, low, dtype=model.dtype, relative_to=None if logs else "max")
    for original, now in zip(before, (s0, *model.parameters), strict=True):
        np.testing.assert_array_equal(original, now)  # no input modified


@settings(max_examples=40)
@given(case=_cases())
def test_saturation_and_dead_match_the_reference(case):
    model, s0, steps, inputs = case
    compiled = vg.gradient_profile(model, s0, steps=steps, inputs=inputs, backend="cpu")
    reference = vg.gradient_profile(model, s0, steps=steps, inputs=inputs, backend="numpy")
    cells = s0.shape[0] * model.gates * model.hidden_width
    if model.dtype == np.float64:
        np.testing.assert_array_equal(compiled.saturation, reference.saturation)
        np.testing.assert_array_equal(compiled.dead, reference.dead)
    else:  # a derivative at the threshold may round either way
        assert np.abs(compiled.saturation - reference.saturation).max() <= 2.0 / cells + 0.02
    assert np.all(compiled.dead * cells <= compiled.saturation * cells + 1e-9)  # dead implies saturated


@settings(max_examples=25)
@given(case=_cases(), segment=st.integers(1, 5))
def test_segment_mode_is_bitwise_equal(case, segment):
    model, s0, steps, inputs = case
    kept = vg.gradient_profile(model, s0, steps=steps, inputs=inputs, backend="cpu")
    checkpointed = vg.gradient_profile(model, s0, steps=steps, inputs=inputs, backend="cpu", segment=segment)
    for field in ("log_grad_norm", "log_weight_grad_norm", "saturation", "dead"):
        np.testing.assert_array_equal(getattr(checkpointed, field), getattr(kept, field))


def test_results_do_not_depend_on_the_thread_count():
    from threadpoolctl import threadpool_limits

    model = Recurrent.random(16, cell="lstm", input_width=3, sigma_w=1.5, forget_bias=1.0, seed=0)
    rng = np.random.default_rng(1)
    s0 = rng.standard_normal((7, model.state_width))
    inputs = rng.standard_normal((7, 30, 3))
    runs = []
    for threads in (1, None):
        with threadpool_limits(limits=threads, user_api="openmp"):
            profile = vg.gradient_profile(model, s0, inputs=inputs, backend="cpu")
            runs.append((profile.log_grad_norm, profile.log_weight_grad_norm,
                         vg.lyapunov_exponents(model, s0, 4, inputs=inputs, backend="cpu"),
                         vg.jacobian(model, s0, inputs=inputs, backend="cpu")))
    for single, several in zip(*runs, strict=True):
        np.testing.assert_array_equal(single, several)


def test_log_norms_are_exact_at_100000_steps_on_cpu():
    """0.7 x orthogonal linear RNN, T = 1e5 (0.7^1e5 underflows): the closed form, in both memory modes."""
    steps, width = 100_000, 3
    q, _ = np.linalg.qr(np.random.default_rng(9).standard_normal((width, width)))
    model = Recurrent(0.7 * q, activation="linear")
    s0 = np.random.default_rng(10).standard_normal((2, width))
    g = np.random.default_rng(11).standard_normal((2, width))
    expected = np.log(np.linalg.norm(g, axis=1))[:, None] + (steps - np.arange(steps + 1)) * math.log(0.7)
    for segment in (None, 25_000):
        profile = vg.gradient_profile(model, s0, g, steps=steps, backend="cpu", segment=segment)
        assert np.all(np.isfinite(profile.log_grad_norm))
        # rtol 1e-11: a running float64 sum of 1e5 logs, each addition rounding by half an ulp of the total
        np.testing.assert_allclose(profile.log_grad_norm, expected, rtol=1e-11)
    exponents = vg.lyapunov_exponents(model, s0, steps=200, backend="cpu")
    np.testing.assert_allclose(exponents, math.log(0.7), rtol=0, atol=1e-13)


def test_lstm_with_constant_gates_decays_by_the_forget_gate_on_cpu():
    model = Recurrent.random(6, cell="lstm", sigma_w=0.0, forget_bias=1.5, seed=0)
    s0 = np.random.default_rng(1).standard_normal((4, 12))
    profile = vg.gradient_profile(model, s0, steps=50, backend="cpu")
    decay = vg.theory.gated_log_decay("lstm", 1.5)
    # log ||d loss / d s_t|| grows by -decay per step towards the output (t < T: the c part only)
    np.testing.assert_allclose(np.diff(profile.log_grad_norm[:, :50], axis=1), -decay, rtol=0, atol=1e-12)
    assert profile.chi_theory == pytest.approx(math.exp(2 * decay))
    summary = vg.stats.summary(profile)
    assert summary["chi_theory"] == profile.chi_theory
    assert summary["chi"] == pytest.approx(math.exp(2 * decay), rel=0.02)  # the last step passes o too


def test_profile_carries_the_rnn_theory_and_stats_read_it():
    model = Recurrent.random(64, sigma_w=0.8, seed=2)
    s0 = 0.5 * np.random.default_rng(3).standard_normal((8, 64))
    profile = vg.gradient_profile(model, s0, steps=200, backend="cpu")
    assert profile.depth == 200 and profile.log_grad_norm.shape == (8, 201)
    assert profile.chi_theory == pytest.approx(vg.theory.rnn_chi1("tanh", 0.8))
    assert profile.config["cell"] == "rnn"
    horizon = vg.stats.vanishing_depth(profile)
    assert horizon is not None and 5 < horizon < 200  # 0.8 per step: 1e-3 after about 31 steps
    assert vg.stats.chi(profile) < 1


def test_public_api_refuses_bad_recurrent_calls():
    model = Recurrent.random(4, cell="gru", input_width=2, seed=0)
    s0 = np.zeros((2, 4))
    inputs = np.zeros((2, 5, 2))
    with pytest.raises(TypeError, match=r"^steps"):
        vg.forward(Recurrent.random(4, seed=0), np.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"^steps"):
        vg.forward(model, s0, steps=0, inputs=inputs)
    with pytest.raises(ValueError, match=r"^inputs"):
        vg.gradient_profile(model, s0, steps=4, inputs=inputs)
    with pytest.raises(ValueError, match=r"^inputs"):
        vg.jacobian(model, s0, steps=5, inputs=np.zeros((2, 5, 3)))
    with pytest.raises(ValueError, match=r"^x"):
        vg.jvp(model, np.zeros((2, 5)), np.ones((1, 4)), inputs=inputs)
    with pytest.raises(ValueError, match=r"^grad_output"):
        vg.gradient_profile(model, s0, np.ones((2, 5)), inputs=inputs)
    with pytest.raises(ValueError, match=r"^k"):
        vg.lyapunov_exponents(model, s0, 5, inputs=inputs)
    with pytest.raises(ValueError, match=r"^inputs"):
        vg.lyapunov_exponents(model, s0, steps=5, inputs=inputs, warmup=2)  # needs T + warmup = 7
    with pytest.raises(ValueError, match=r"^segment"):
        vg.gradient_profile(model, s0, inputs=inputs, segment="half")


@pytest.mark.parametrize("k", [8, 48])
def test_lyapunov_spectrum_of_a_chaotic_rnn_matches_the_reference(k):
    """g = 2.5, width 48: the leading 8 directions (the kernel's CholeskyQR2 path, well conditioned) and
    the whole spectrum (steps whose tangents are ill conditioned fall back to Householder QR)."""
    model = Recurrent.random(48, sigma_w=2.5, sigma_b=0.1, seed=4)
    s0 = np.random.default_rng(5).standard_normal((2, 48))
    compiled = vg.lyapunov_exponents(model, s0, k, steps=60, warmup=10, backend="cpu")
    reference = vg.lyapunov_exponents(model, s0, k, steps=60, warmup=10, backend="numpy")
    np.testing.assert_allclose(compiled, reference, rtol=1e-9, atol=1e-11)
    if k == 48:  # the volume identity: the exponents sum to the mean log|det| of the step Jacobians
        from vgcore.reference import recurrent as recurrent_reference

        inputs_free = recurrent_reference.forward(model, s0, 10, None)  # the state after the warm-up
        jacobians = recurrent_reference.step_jacobians(model, inputs_free, 60, None)
        _, log_det = np.linalg.slogdet(jacobians)
        np.testing.assert_allclose(compiled.sum(axis=1), log_det.mean(axis=0), rtol=1e-9)


def test_random_inputs_of_a_recurrent_model_are_initial_states():
    lstm = Recurrent.random(5, cell="lstm", dtype="float32", seed=0)
    states = vg.random_inputs(lstm, 3, seed=1)
    assert states.shape == (3, 10) and states.dtype == np.float32
    expected = np.random.default_rng(1).standard_normal((3, 10)).astype(np.float32)
    np.testing.assert_array_equal(states, expected)
