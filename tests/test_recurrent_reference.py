"""The recurrent NumPy reference itself: finite differences, torch autograd, closed forms, bad input.

The compiled and GPU paths are tested against this reference
(tests/test_recurrent_backends.py); this file is why it can be trusted.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from recurrent_strategies import kinked, pre_activations, recurrent_cases

import vgcore as vg
from vgcore._recurrent import Recurrent
from vgcore.reference import recurrent as reference

STEP = 1e-6


def _small_cases(**options):
    return recurrent_cases(**{"max_width": 4, "max_steps": 5, "max_batch": 2, "max_input": 3, **options})


def _away_from_kinks(model, s0, steps, inputs):
    if kinked(model):
        assume(np.abs(pre_activations(model, s0, steps, inputs)).min() > 1e-3)


def _tolerance(numeric):
    return {"rtol": 1e-5, "atol": 1e-6 * max(1.0, np.abs(numeric).max())}


# --------------------------------------------------------------------------- finite differences


@given(_small_cases())
def test_jacobian_matches_finite_differences(case):
    model, s0, steps, inputs = case
    _away_from_kinks(model, s0, steps, inputs)
    jacobian = reference.jacobian(model, s0, steps, inputs)
    assert jacobian.shape == (s0.shape[0], model.state_width, model.state_width)
    for j in range(model.state_width):
        step = np.zeros_like(s0)
        step[:, j] = STEP
        column = (reference.forward(model, s0 + step, steps, inputs)
                  - reference.forward(model, s0 - step, steps, inputs)) / (2 * STEP)
        np.testing.assert_allclose(jacobian[:, :, j], column, **_tolerance(column))


@given(_small_cases(), st.integers(0, 2**16))
def test_vjp_matches_finite_differences_and_is_the_adjoint_of_jvp(case, seed):
    model, s0, steps, inputs = case
    _away_from_kinks(model, s0, steps, inputs)
    rng = np.random.default_rng(seed)
    cotangent = rng.standard_normal((s0.shape[0], 2, model.state_width))
    tangent = rng.standard_normal((s0.shape[0], 2, model.state_width))
    result = reference.vjp(model, s0, steps, inputs, cotangent)
    for which in range(2):
        numeric = np.empty_like(s0)
        for i in range(model.state_width):
            step = np.zeros_like(s0)
            step[:, i] = STEP
            difference = (reference.forward(model, s0 + step, steps, inputs)
                          - reference.forward(model, s0 - step, steps, inputs))
            numeric[:, i] = np.sum(difference * cotangent[:, which], axis=1) / (2 * STEP)
        np.testing.assert_allclose(result[:, which], numeric, **_tolerance(numeric))
    # <J^T u, v> = <u, J v> to rounding, with no finite differences at all
    forward_product = np.sum(reference.jvp(model, s0, steps, inputs, tangent) * cotangent, axis=2)
    np.testing.assert_allclose(np.sum(result * tangent, axis=2), forward_product, rtol=1e-10, atol=1e-12)


@given(_small_cases(), st.integers(0, 2**16))
def test_gradient_profile_state_norms_match_finite_differences(case, seed):
    """log ||d loss / d s_t|| against central differences of the loss from step t on."""
    model, s0, steps, inputs = case
    _away_from_kinks(model, s0, steps, inputs)
    g = np.random.default_rng(seed).standard_normal(s0.shape)
    profile = reference.gradient_profile(model, s0, steps, inputs, g)
    states = [s0]
    for t in range(steps):
        states.append(reference.step_forward(model, states[-1], None if inputs is None else inputs[:, t])[0])

    def loss_from(t, state):
        tail = None if inputs is None else inputs[:, t:]
        return np.sum(reference.forward(model, state, steps - t, tail) * g, axis=1) if t < steps \
            else np.sum(state * g, axis=1)

    for t in range(steps + 1):
        gradient = np.empty_like(s0)
        for i in range(model.state_width):
            step = np.zeros_like(s0)
            step[:, i] = STEP
            gradient[:, i] = (loss_from(t, states[t] + step) - loss_from(t, states[t] - step)) / (2 * STEP)
        norms = np.linalg.norm(gradient, axis=1)
        assume(norms.min() > 1e-4)  # the log of a finite-difference zero says nothing
        np.testing.assert_allclose(profile["log_grad_norm"][:, t], np.log(norms), atol=1e-5)


# --------------------------------------------------------------------------- torch autograd

try:
    import torch
except ImportError:  # the torch comparisons are skipped; the rest runs
    torch = None
requires_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")


def _torch_module(cell: str, width: int, input_width: int, batch_first: bool, bias: bool, seed: int,
                  nonlinearity: str = "tanh"):
    torch.manual_seed(seed)
    if cell == "rnn":
        module = torch.nn.RNN(input_width, width, nonlinearity=nonlinearity, bias=bias,
                              batch_first=batch_first)
    else:
        module = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](input_width, width, bias=bias,
                                                                     batch_first=batch_first)
    with torch.no_grad():  # larger than torch's default init, so that gradients change through time
        for parameter in module.parameters():
            parameter.mul_(2.5)
    return module.double()


def _torch_state(model, s0):
    n = model.hidden_width
    h = torch.tensor(s0[:, :n]).unsqueeze(0)
    return (h, torch.tensor(s0[:, n:]).unsqueeze(0)) if model.cell == "lstm" else h


def _to_torch_inputs(inputs, batch_first):
    tensor = torch.tensor(inputs)
    return tensor if batch_first else tensor.transpose(0, 1).contiguous()


CONFIGS = [("rnn", "tanh"), ("rnn", "relu"), ("lstm", "tanh"), ("gru", "tanh")]


@requires_torch
@pytest.mark.parametrize("cell,nonlinearity", CONFIGS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_from_torch_forward_matches_torch(cell, nonlinearity, batch_first, bias):
    module = _torch_module(cell, 5, 3, batch_first, bias, seed=1, nonlinearity=nonlinearity)
    model = Recurrent.from_torch(module)
    assert (model.cell, model.activation, model.hidden_width, model.input_width) == (cell, nonlinearity, 5, 3)
    assert model.dtype == np.float64
    # without changing a number
    np.testing.assert_array_equal(model.weight_hh, module.weight_hh_l0.detach().numpy())
    np.testing.assert_array_equal(model.weight_ih, module.weight_ih_l0.detach().numpy())
    if bias:
        np.testing.assert_array_equal(model.bias_ih, module.bias_ih_l0.detach().numpy())
    else:
        assert not np.any(model.bias_hh) and not np.any(model.bias_ih)
    rng = np.random.default_rng(2)
    batch, steps = 3, 9
    inputs = rng.standard_normal((batch, steps, 3))
    s0 = 0.5 * rng.standard_normal((batch, model.state_width))
    with torch.no_grad():
        _, state = module(_to_torch_inputs(inputs, batch_first), _torch_state(model, s0))
    expected = torch.cat([state[0][0], state[1][0]], 1) if cell == "lstm" else state[0]
    np.testing.assert_allclose(reference.forward(model, s0, steps, inputs), expected.numpy(),
                               rtol=1e-12, atol=1e-13)


@requires_torch
@pytest.mark.parametrize("cell,nonlinearity", CONFIGS)
def test_gradient_profile_matches_torch_autograd(cell, nonlinearity):
    """Per-step state-gradient norms and per-step W_hh contributions, float64 to 1e-9.

    torch runs its own module one step at a time (functional_call with a
    separate copy of weight_hh per step, whose gradient is that step's
    contribution to d loss / d W_hh), retaining the gradient of every state.
    """
    from torch.func import functional_call

    module = _torch_module(cell, 6, 4, True, True, seed=3, nonlinearity=nonlinearity)
    model = Recurrent.from_torch(module)
    rng = np.random.default_rng(4)
    batch, steps, n = 3, 12, 6
    inputs = rng.standard_normal((batch, steps, 4))
    s0 = 0.5 * rng.standard_normal((batch, model.state_width))
    g = rng.standard_normal((batch, model.state_width))
    profile = reference.gradient_profile(model, s0, steps, inputs, g)

    parameters = dict(module.named_parameters())
    step_weights = [parameters["weight_hh_l0"].detach().clone().requires_grad_() for _ in range(steps)]
    s0_tensor = torch.tensor(s0, requires_grad=True)
    states = [s0_tensor]
    state = s0_tensor
    for t in range(steps):
        hx = (state[:, :n].unsqueeze(0).contiguous(), state[:, n:].unsqueeze(0).contiguous()) \
            if cell == "lstm" else state.unsqueeze(0).contiguous()
        _, out = functional_call(module, {**parameters, "weight_hh_l0": step_weights[t]},
                                 (torch.tensor(inputs[:, t:t + 1]), hx))
        state = torch.cat([out[0][0], out[1][0]], 1) if cell == "lstm" else out[0]
        state.retain_grad()
        states.append(state)
    torch.sum(state * torch.tensor(g)).backward()
    expected = np.stack([np.log(np.linalg.norm(s.grad.numpy(), axis=1)) for s in states], axis=1)
    np.testing.assert_allclose(profile["log_grad_norm"], expected, rtol=0, atol=1e-9)
    expected_weight = [np.log(np.linalg.norm(w.grad.numpy())) for w in step_weights]
    np.testing.assert_allclose(profile["log_weight_grad_norm"], expected_weight, rtol=0, atol=1e-9)
    # the gradients do change through time (the test would be weak otherwise)
    assert np.ptp(profile["log_grad_norm"]) > 0.5


@requires_torch
@pytest.mark.parametrize("cell,nonlinearity", CONFIGS)
def test_jacobian_matches_torch_autograd(cell, nonlinearity):
    from torch.autograd.functional import jacobian as torch_jacobian

    module = _torch_module(cell, 4, 2, True, True, seed=5, nonlinearity=nonlinearity)
    model = Recurrent.from_torch(module)
    rng = np.random.default_rng(6)
    steps, n = 6, 4
    inputs = rng.standard_normal((2, steps, 2))
    s0 = 0.5 * rng.standard_normal((2, model.state_width))

    def final_state(state, sample):
        hx = (state[:n].reshape(1, 1, n), state[n:].reshape(1, 1, n)) if cell == "lstm" \
            else state.reshape(1, 1, n)
        _, out = module(torch.tensor(inputs[sample:sample + 1]), hx)
        return torch.cat([out[0].reshape(-1), out[1].reshape(-1)]) if cell == "lstm" else out.reshape(-1)

    ours = reference.jacobian(model, s0, steps, inputs)
    for sample in range(2):
        expected = torch_jacobian(lambda s, b=sample: final_state(s, b), torch.tensor(s0[sample])).numpy()
        np.testing.assert_allclose(ours[sample], expected, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("forget_bias", [1.0, -0.5, 3.0])
def test_constant_gates_decay_the_kept_state_by_the_keep_gate(cell, forget_bias):
    """Zero recurrent and input weights: d loss / d s_t shrinks by exactly sigmoid(forget_bias) per step.

    For the lstm that is the cell-state gradient (the h part is 0 before the
    last step); for the gru the hidden state, kept by z = sigmoid(b_z).
    """
    steps = 40
    model = Recurrent.random(5, cell=cell, sigma_w=0.0, sigma_b=0.0, forget_bias=forget_bias, seed=0)
    assert not np.any(model.weight_hh)
    s0 = np.random.default_rng(1).standard_normal((3, model.state_width))
    g = np.random.default_rng(2).standard_normal((3, model.state_width))
    profile = reference.gradient_profile(model, s0, steps, None, g)
    decay = vg.theory.gated_log_decay(cell, forget_bias)
    assert decay == pytest.approx(math.log(1 / (1 + math.exp(-forget_bias))), rel=1e-15)
    last = steps - 1 if cell == "lstm" else steps  # the lstm's last step also passes the output gate
    expected = profile["log_grad_norm"][:, [last]] + (last - np.arange(last + 1)) * decay
    np.testing.assert_allclose(profile["log_grad_norm"][:, :last + 1], expected, rtol=0, atol=1e-12)
    assert model.chi_theory == pytest.approx(math.exp(2 * decay), rel=1e-14)
    # every Lyapunov direction of the kept state decays at the same rate (the lstm's h directions
    # are mapped to exactly 0: W_hh = 0)
    exponents = reference.lyapunov_log_growth(model, s0, steps, None, model.state_width) / steps
    top = np.sort(exponents, axis=1)[:, ::-1][:, :model.hidden_width]
    np.testing.assert_allclose(top, decay, rtol=1e-12)


def _orthogonal_linear_rnn(width, gain, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((width, width)))
    return Recurrent(gain * q, cell="rnn", activation="linear")


def test_orthogonal_linear_rnn_keeps_every_exponent_at_log_gain():
    gain, width = 0.8, 6
    model = _orthogonal_linear_rnn(width, gain, seed=7)
    s0 = np.random.default_rng(8).standard_normal((2, width))
    growth = reference.lyapunov_log_growth(model, s0, 50, None, width, warmup=5)
    np.testing.assert_allclose(growth / 50, math.log(gain), rtol=0, atol=1e-13)


def test_log_norms_are_exact_at_20000_steps():
    """0.7 x orthogonal linear RNN: log ||d loss / d s_t|| = log ||g|| + (T - t) ln 0.7 at T = 2e4,
    where 0.7^2e4 underflows; a one-sample step contribution g_hh h_{t-1}^T to d loss / d W_hh is
    rank one, log ||g|| + log ||s_0|| + (T - 1) ln 0.7 at every step.  (T = 1e5: the compiled
    backend's test, held to the same closed form.)"""
    steps, width = 20_000, 3
    model = _orthogonal_linear_rnn(width, 0.7, seed=9)
    s0 = np.random.default_rng(10).standard_normal((1, width))
    g = np.random.default_rng(11).standard_normal((1, width))
    profile = reference.gradient_profile(model, s0, steps, None, g)
    expected = np.log(np.linalg.norm(g)) + (steps - np.arange(steps + 1)) * math.log(0.7)
    assert np.all(np.isfinite(profile["log_grad_norm"]))
    assert np.exp(profile["log_grad_norm"][0, 0]) == 0.0  # the plain norm underflows
    # rtol 1e-11: the log scale is a running float64 sum of T terms of about -0.36 reaching
    # -7e3, and each addition rounds by up to half an ulp of the total
    np.testing.assert_allclose(profile["log_grad_norm"][0], expected, rtol=1e-11)
    expected_weight = np.log(np.linalg.norm(g)) + np.log(np.linalg.norm(s0)) + (steps - 1) * math.log(0.7)
    # while the forward state h_{t-1} = (0.7 Q)^(t-1) s_0 is representable (it underflows to 0
    # after about 2000 steps, and the contribution is then exactly 0 in floating point)
    np.testing.assert_allclose(profile["log_weight_grad_norm"][:1000], expected_weight, rtol=1e-11)


@given(_small_cases(max_steps=6))
def test_sum_of_all_exponents_is_the_mean_log_determinant(case):
    """k = N: the exponents sum to (1/T) sum_t log|det J_t| (volume growth), per sample."""
    model, s0, steps, inputs = case
    _away_from_kinks(model, s0, steps, inputs)
    jacobians = reference.step_jacobians(model, s0, steps, inputs)  # (T, B, N, N)
    _, log_det = np.linalg.slogdet(jacobians)
    assume(np.all(np.isfinite(log_det)) and np.all(log_det > -200))  # a singular step: nothing to compare
    growth = reference.lyapunov_log_growth(model, s0, steps, inputs, model.state_width)
    np.testing.assert_allclose(growth.sum(axis=1), log_det.sum(axis=0), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("gain", [2.0, 3.0])
def test_tanh_rnn_largest_exponent_matches_mean_field_in_the_chaotic_phase(gain):
    """Width 500, 400 counted steps after 100 of warm-up, two samples: within 4 % of (1/2) ln chi_1.

    Measured: g = 2 gives 0.1514 and 0.1519 against 0.1547; g = 3 gives 0.3081 and 0.3068 against 0.3102.
    """
    model = Recurrent.random(500, sigma_w=gain, seed=1)
    s0 = np.random.default_rng(2).standard_normal((2, 500))
    exponents = reference.lyapunov_log_growth(model, s0, 400, None, 1, warmup=100)[:, 0] / 400
    theory = vg.theory.rnn_lyapunov_exponent("tanh", gain)
    assert theory == pytest.approx(0.5 * math.log(vg.theory.chi1("tanh", gain, 0.0)))
    assert model.lyapunov_theory == pytest.approx(theory)
    np.testing.assert_allclose(exponents, theory, rtol=0.04)


def test_ordered_tanh_rnn_forgets_at_its_spectral_radius():
    """g = 0.5 < 1 without bias: the state decays to the fixed point 0, where the step Jacobian is
    W itself; the largest exponent is then ln of W's spectral radius (power iteration), which the
    circular law puts at ln g for large n (mean field's value; 0.528 rather than 0.5 at n = 300).
    Measured: -0.63813 against ln rho(W) = -0.63775."""
    model = Recurrent.random(300, sigma_w=0.5, seed=3)
    s0 = np.random.default_rng(4).standard_normal((1, 300))
    exponent = reference.lyapunov_log_growth(model, s0, 300, None, 1, warmup=200)[0, 0] / 300
    spectral_radius = np.abs(np.linalg.eigvals(np.asarray(model.weight_hh))).max()
    assert exponent == pytest.approx(math.log(spectral_radius), abs=0.005)
    assert vg.theory.rnn_lyapunov_exponent("tanh", 0.5) == pytest.approx(math.log(0.5), rel=1e-12)
    assert math.log(spectral_radius) == pytest.approx(math.log(0.5), abs=0.1)


def test_saturation_and_dead_units_closed_form():
    """A relu rnn whose first 2 of 5 units have bias -20: dead on every step and sample."""
    width, batch, steps = 5, 4, 3
    bias = np.zeros(width)
    bias[:2] = -20.0
    model = Recurrent(np.eye(width) * 0.5, bias_hh=bias, cell="rnn", activation="relu")
    s0 = np.random.default_rng(5).uniform(-1, 1, (batch, width))
    profile = reference.gradient_profile(model, s0, steps, None, np.ones((batch, width)))
    # units 2..4: relu'(0.5 h) is 0 where h <= 0; a unit whose s0 is <= 0 on every sample stays at 0
    always_off = np.all(s0[:, 2:] <= 0, axis=0).sum()
    np.testing.assert_array_equal(profile["dead"], (2 + always_off) / width)
    # the others: relu'(0.5 h) with h the previous state: zero where h <= 0 (first step: s0's sign)
    assert profile["saturation"][0] == pytest.approx((2 * batch + np.sum(s0[:, 2:] <= 0)) / (batch * width))


# --------------------------------------------------------------------------- construction


def test_random_layout_and_shared_draws():
    lstm = Recurrent.random(4, cell="lstm", input_width=3, sigma_w=1.5, sigma_u=0.5, sigma_b=0.0,
                            forget_bias=1.0, seed=12)
    assert lstm.weight_hh.shape == (16, 4) and lstm.weight_ih.shape == (16, 3)
    assert lstm.state_width == 8 and lstm.gates == 4
    forget = np.zeros(16, bool)
    forget[4:8] = True
    np.testing.assert_array_equal(lstm.bias_hh[forget], 1.0)
    np.testing.assert_array_equal(lstm.bias_hh[~forget], 0.0)
    # same seed, other gains: the same unit variates, scaled
    other = Recurrent.random(4, cell="lstm", input_width=3, sigma_w=3.0, sigma_u=1.0, seed=12)
    np.testing.assert_allclose(other.weight_hh, 2 * lstm.weight_hh, rtol=1e-15)
    np.testing.assert_allclose(other.weight_ih, 2 * lstm.weight_ih, rtol=1e-15)
    gru = Recurrent.random(3, cell="gru", forget_bias=2.0, seed=0)
    np.testing.assert_array_equal(gru.bias_hh[3:6], 2.0)  # the update gate z keeps the state
    orthogonal = Recurrent.random(8, cell="gru", init="orthogonal", sigma_w=0.5, seed=1)
    for block in np.asarray(orthogonal.weight_hh).reshape(3, 8, 8):
        np.testing.assert_allclose(block @ block.T, 0.25 * np.eye(8), atol=1e-14)
    # the bias of a pre-activation (the sum of the two) has variance sigma_b^2
    wide = Recurrent.random(3000, sigma_b=0.3, seed=2, sigma_w=0.0)
    assert np.std(wide.bias_hh + wide.bias_ih) == pytest.approx(0.3, rel=0.05)  # 4 standard errors
    np.testing.assert_allclose(Recurrent.random(3000, sigma_b=0.6, seed=2, sigma_w=0.0).bias_ih,
                               2 * wide.bias_ih, rtol=1e-15)


def test_config_and_theory_fields():
    rnn = Recurrent.random(8, sigma_w=2.0, sigma_b=0.1, seed=0)
    assert rnn.config()["cell"] == "rnn" and rnn.config()["sigma_w"] == 2.0
    assert rnn.chi_theory == pytest.approx(vg.theory.chi1("tanh", 2.0, 0.1))
    driven = Recurrent.random(8, input_width=4, sigma_w=2.0, sigma_b=0.3, sigma_u=0.4, seed=0)
    assert driven.chi_theory == pytest.approx(vg.theory.chi1("tanh", 2.0, 0.5))
    assert math.isnan(Recurrent.random(8, cell="lstm", seed=0).chi_theory)  # no closed form applies
    assert math.isnan(Recurrent(np.eye(3)).chi_theory)  # explicit weights: no theory


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,name,error", [
    ({"weight_hh": np.zeros((5, 3))}, "weight_hh", ValueError),
    ({"weight_hh": np.zeros((12, 3)), "cell": "lstm", "weight_ih": np.zeros((11, 2))}, "weight_ih",
     ValueError),
    ({"weight_hh": np.zeros((9, 3)), "cell": "gru", "bias_hh": np.zeros(8)}, "bias_hh", ValueError),
    ({"weight_hh": np.zeros((3, 3)), "bias_ih": np.zeros((3, 1))}, "bias_ih", ValueError),
    ({"weight_hh": np.zeros((3, 3)), "cell": "transformer"}, "cell", ValueError),
    ({"weight_hh": np.zeros((3, 3)), "cell": 3}, "cell", TypeError),
    ({"weight_hh": np.zeros((12, 3)), "cell": "lstm", "activation": "relu"}, "activation", ValueError),
    ({"weight_hh": np.zeros((3, 3)), "activation": "swish"}, "activation", ValueError),
    ({"weight_hh": np.zeros((3, 3), int)}, "weight_hh", TypeError),
    ({"weight_hh": np.full((3, 3), np.nan)}, "weight_hh", ValueError),
    ({"weight_hh": np.zeros((0, 0))}, "weight_hh", ValueError),
])
def test_constructor_refuses_bad_input(kwargs, name, error):
    kwargs = dict(kwargs)
    weight_hh = kwargs.pop("weight_hh")
    with pytest.raises(error, match=name):
        Recurrent(weight_hh, **kwargs)


@pytest.mark.parametrize("kwargs,name,error", [
    ({"width": 0}, "width", ValueError),
    ({"width": 4, "cell": "lstmm"}, "cell", ValueError),
    ({"width": 4, "input_width": -1}, "input_width", ValueError),
    ({"width": 4, "sigma_w": -1.0}, "sigma_w", ValueError),
    ({"width": 4, "sigma_u": float("nan")}, "sigma_u", ValueError),
    ({"width": 4, "forget_bias": 1.0}, "forget_bias", ValueError),  # the rnn has no gate
    ({"width": 4, "init": "xavier"}, "init", ValueError),
    ({"width": 4, "dtype": "float16"}, "dtype", ValueError),
    ({"width": 4, "seed": -1}, "seed", ValueError),
    ({"width": 4, "device": "tpu"}, "device", ValueError),
])
def test_random_refuses_bad_input(kwargs, name, error):
    with pytest.raises(error, match=name):
        Recurrent.random(**kwargs)


def test_bind_validates_state_steps_and_inputs():
    model = Recurrent.random(4, cell="lstm", input_width=3, seed=0)
    s0 = np.zeros((2, 8))
    inputs = np.zeros((2, 5, 3))
    problem = model.bind(s0, steps=5, inputs=inputs)
    assert (problem.depth, problem.warmup, problem.inputs.shape) == (5, 0, (2, 5, 3))
    assert model.bind(s0, inputs=inputs).depth == 5  # steps from the inputs
    assert model.bind(s0, inputs=inputs, warmup=2).depth == 3
    cases = [
        ({"x": np.zeros((2, 4)), "steps": 5, "inputs": inputs}, "x", ValueError),  # h only, no c
        ({"x": np.zeros((0, 8)), "steps": 5, "inputs": inputs}, "x", ValueError),
        ({"x": s0, "steps": 0, "inputs": inputs}, "steps", ValueError),
        ({"x": s0, "steps": 2.5, "inputs": inputs}, "steps", TypeError),
        ({"x": s0, "steps": 4, "inputs": inputs}, "inputs", ValueError),  # wrong T
        ({"x": s0, "steps": 5, "inputs": np.zeros((2, 5, 2))}, "inputs", ValueError),  # wrong m
        ({"x": s0, "steps": 5, "inputs": np.zeros((3, 5, 3))}, "inputs", ValueError),  # wrong B
        ({"x": s0, "steps": 5, "inputs": np.zeros((2, 5))}, "inputs", ValueError),
        ({"x": s0, "steps": 5}, "inputs", ValueError),  # required
        ({"x": s0, "steps": 3, "inputs": inputs, "warmup": -1}, "warmup", ValueError),
        ({"x": s0, "steps": 5, "inputs": inputs, "warmup": 1}, "inputs", ValueError),  # T + warmup
        ({"x": s0, "inputs": inputs, "warmup": 5}, "inputs", ValueError),
    ]
    for call, name, error in cases:
        call = dict(call)
        with pytest.raises(error, match=name):
            model.bind(call.pop("x"), **call)
    autonomous = Recurrent.random(4, seed=0)
    with pytest.raises(TypeError, match="steps"):
        autonomous.bind(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="inputs"):
        autonomous.bind(np.zeros((1, 4)), steps=2, inputs=np.zeros((1, 2, 1)))


def test_bind_does_not_modify_its_arguments():
    model = Recurrent.random(3, cell="gru", input_width=2, seed=0)
    s0 = np.ones((2, 3), np.float32)
    inputs = np.ones((2, 4, 2), np.float32)
    problem = model.bind(s0, steps=4, inputs=inputs)
    assert problem.x.dtype == np.float64 and problem.inputs.dtype == np.float64
    problem.x[...] = 5  # a converted copy, not the caller's array
    assert np.all(s0 == 1) and np.all(inputs == 1)


@requires_torch
def test_from_torch_refuses_what_it_cannot_load():
    with pytest.raises(ValueError, match="num_layers"):
        Recurrent.from_torch(torch.nn.LSTM(3, 4, num_layers=2))
    with pytest.raises(ValueError, match="bidirectional"):
        Recurrent.from_torch(torch.nn.GRU(3, 4, bidirectional=True))
    with pytest.raises(ValueError, match="proj_size"):
        Recurrent.from_torch(torch.nn.LSTM(3, 4, proj_size=2))
    with pytest.raises(TypeError, match="module"):
        Recurrent.from_torch(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="dtype"):
        Recurrent.from_torch(torch.nn.RNN(3, 4).half())
    model = Recurrent.from_torch(torch.nn.GRU(3, 4))  # float32 stays float32, exactly
    assert model.dtype == np.float32
