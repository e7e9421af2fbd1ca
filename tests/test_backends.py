"""The backend interface, walked: every computation of every registered (kind, backend) pair.

bottleneck's fast == slow loop over vgcore.backends: for each model kind in
the registry, each backend present here, and each computation of the
:class:`vgcore.backends.Backend` protocol, the result equals the NumPy
reference's over generated models; both raise the same errors on the same bad
input; no input is modified.  A new kind joins by adding its case strategy to
``KIND_CASES`` (the registry test fails until it does).
"""

from __future__ import annotations

import importlib
import inspect

import numpy as np
import pytest
from batchnorm_strategies import batchnorm_cases
from conftest import CUDA, assert_matches_reference, references, stack_cases
from hypothesis import given, settings
from hypothesis import strategies as st
from recurrent_strategies import recurrent_cases

import vgcore as vg
from vgcore.backends import COMPUTATIONS, IMPLEMENTATIONS, Backend

#: kind -> strategy of (model, x) for that kind, float32 and float64.
KIND_CASES = {
    "stack": stack_cases(max_depth=12, max_width=10, max_batch=4),
    # autonomous cells (inputs=None) here, run for RECURRENT_STEPS steps; inputs on and off, other
    # step counts: tests/test_recurrent_backends.py
    "recurrent": recurrent_cases(max_width=6, max_steps=1, max_batch=4, max_input=0,
                                 dtypes=(np.float32, np.float64)).map(lambda case: (case[0], case[1])),
    # more depths, widths and batches: tests/test_batchnorm_backends.py
    "batchnorm": batchnorm_cases(max_depth=12, max_width=10, max_batch=6),
}

#: Steps of a recurrent model's computations in this walk.
RECURRENT_STEPS = 6

#: kind -> one fixed (model, x) of that kind, for the error tests.
KIND_EXAMPLES = {
    "stack": lambda: (lambda s: (s, vg.random_inputs(s, 3, seed=1)))(
        vg.Stack.random(3, 4, activation="tanh", sigma_b=0.1, residual=0.5, norm="pre", seed=0)),
    "recurrent": lambda: (vg.Recurrent.random(4, cell="lstm", sigma_b=0.1, forget_bias=1.0, seed=0),
                          0.5 * np.random.default_rng(1).standard_normal((3, 8))),
    "batchnorm": lambda: (lambda s: (s, vg.random_inputs(s, 3, seed=1)))(
        vg.Stack.random(3, 4, activation="tanh", sigma_b=0.1, residual=0.5, norm="batch", seed=0)),
}

#: Computations a kind refuses (ValueError naming the option), on every backend alike.
KIND_REFUSALS = {"batchnorm": ("jacobian", "singular_values", "lyapunov_log_growth")}


def _present(backend: str) -> bool:
    return backend != "cuda" or CUDA


PAIRS = sorted((kind, backend) for kind, backend in IMPLEMENTATIONS if backend != "numpy")


def test_every_kind_has_a_reference_and_a_case_strategy():
    kinds = {kind for kind, _ in IMPLEMENTATIONS}
    assert kinds <= set(KIND_CASES) & set(KIND_EXAMPLES), \
        f"kinds without cases here: {kinds - (set(KIND_CASES) & set(KIND_EXAMPLES))}"
    for kind in kinds:
        assert (kind, "numpy") in IMPLEMENTATIONS, f"{kind} has no NumPy reference backend"


@pytest.mark.parametrize("kind, backend", sorted(IMPLEMENTATIONS))
def test_implementations_have_the_protocol_signatures(kind, backend):
    """Every module in the registry defines every computation, with the protocol's parameters."""
    if not _present(backend):
        pytest.skip("no CuPy / NVIDIA GPU here")
    module = importlib.import_module(IMPLEMENTATIONS[kind, backend])
    for name in COMPUTATIONS:
        function = getattr(module, name, None)
        assert callable(function), f"{module.__name__} lacks {name}"
        expected = [p for p in inspect.signature(getattr(Backend, name)).parameters if p != "self"]
        assert list(inspect.signature(function).parameters) == expected, f"{module.__name__}.{name}"


def _compute(name: str, model, x, vectors, backend: str):
    """One public computation of ``name`` (a protocol function) through the public API."""
    if model.kind == "recurrent":
        return _compute_recurrent(name, model, x, vectors, backend)
    if name == "forward":
        return vg.forward(model, x, backend=backend)
    if name in ("gradient_profile", "gradient_profiles"):
        profile = vg.gradient_profile(model, x, backend=backend)
        return np.concatenate([profile.log_grad_norm.ravel(), profile.log_weight_grad_norm,
                               profile.saturation, profile.dead])
    if name in ("jvp", "vjp"):
        return getattr(vg, name)(model, x, vectors, backend=backend)
    if name == "jacobian":
        return vg.jacobian(model, x, backend=backend)
    if name == "singular_values":
        return vg.singular_values(model, x, backend=backend)
    if name == "lyapunov_log_growth":
        return vg.lyapunov_exponents(model, x, k=1, backend=backend)
    raise AssertionError(f"no public call for {name}")


def _compute_recurrent(name: str, model, x, vectors, backend: str):
    """_compute for a recurrent model, autonomous, over RECURRENT_STEPS steps."""
    call = {"steps": RECURRENT_STEPS, "backend": backend}
    if name in ("gradient_profile", "gradient_profiles"):
        profile = vg.gradient_profile(model, x, **call)
        return np.concatenate([profile.log_grad_norm.ravel(), profile.log_weight_grad_norm,
                               profile.saturation, profile.dead])
    if name in ("jvp", "vjp"):
        return getattr(vg, name)(model, x, vectors, **call)
    if name == "lyapunov_log_growth":
        return vg.lyapunov_exponents(model, x, k=1, warmup=2, **call)
    return getattr(vg, name)(model, x, **call)


@pytest.mark.parametrize("kind, backend", PAIRS)
@pytest.mark.parametrize("name", [n for n in COMPUTATIONS if n != "gradient_profiles"])
@settings(max_examples=15)
@given(data=st.data())
def test_every_computation_equals_the_reference(kind, backend, name, data):
    if not _present(backend):
        pytest.skip("no CuPy / NVIDIA GPU here")
    model, x = data.draw(KIND_CASES[kind])
    if name in KIND_REFUSALS.get(kind, ()):
        with pytest.raises(ValueError, match=r"^norm: "):
            _compute(name, model, x, None, backend)
        return
    # Smooth activations keep the spectra determined; the kinked ones are covered by test_spectra.
    if name in ("singular_values", "lyapunov_log_growth") and model.activation in ("relu", "leaky_relu",
                                                                                  "selu", "elu"):
        return
    vectors = np.random.default_rng(0).standard_normal((2, model.state_width))
    before = (x.copy(), vectors.copy(), *(np.array(p, copy=True) for p in model.parameters))
    actual = _compute(name, model, x, vectors, backend)
    low, high = references(lambda m, *a, backend: _compute(name, m, *a, backend=backend), model, x, vectors)
    assert_matches_reference(actual, high, low, dtype=model.dtype,
                             relative_to=None if name in ("gradient_profile", "lyapunov_log_growth")
                             else "max")
    for original, now in zip(before, (x, vectors, *model.parameters), strict=True):
        np.testing.assert_array_equal(original, now)  # no input modified


def _error(call):
    try:
        call()
    except (TypeError, ValueError) as error:
        return type(error), str(error).split(":")[0]
    return None


BAD_INPUTS = {
    "x of the wrong width": lambda m, x, v: (x[:, :-1] if x.shape[1] > 1 else np.ones((1, 2)), v),
    "x with NaN": lambda m, x, v: (np.full_like(x, np.nan), v),
    "x of ints": lambda m, x, v: (np.ones(x.shape, np.int64), v),
    "vectors of the wrong width": lambda m, x, v: (x, np.ones((2, m.state_width + 1))),
    "vectors with inf": lambda m, x, v: (x, np.full_like(v, np.inf)),
}


@pytest.mark.parametrize("kind, backend", PAIRS)
@pytest.mark.parametrize("bad", sorted(BAD_INPUTS))
@pytest.mark.parametrize("name", ["forward", "gradient_profile", "jvp", "vjp", "jacobian", "singular_values",
                                  "lyapunov_log_growth"])
def test_backends_refuse_the_same_bad_input_alike(kind, backend, bad, name):
    if not _present(backend):
        pytest.skip("no CuPy / NVIDIA GPU here")
    model, x = KIND_EXAMPLES[kind]()
    vectors = np.ones((2, model.state_width))
    x, vectors = BAD_INPUTS[bad](model, x, vectors)
    if name not in ("jvp", "vjp") and bad.startswith("vectors"):
        return
    reference = _error(lambda: _compute(name, model, x, vectors, "numpy"))
    assert reference is not None, f"the reference accepted {bad}"
    assert _error(lambda: _compute(name, model, x, vectors, backend)) == reference


def test_unknown_kind_or_backend_is_refused_naming_backend():
    stack = vg.Stack.random(2, 3, seed=0)
    with pytest.raises(ValueError, match=r"^backend:"):
        vg.backends.implementation(stack, "tpu")

    class Elsewhere:
        kind, device = "no-such-kind", "cpu"

    with pytest.raises(ValueError, match=r"^backend: 'cpu' does not implement no-such-kind"):
        vg.backends.implementation(Elsewhere(), "cpu")


def test_a_stack_refuses_recurrent_keywords():
    stack = vg.Stack.random(2, 3, seed=0)
    x = vg.random_inputs(stack, 2, seed=1)
    for keyword in ("steps", "inputs"):
        with pytest.raises(TypeError, match=f"^{keyword}:"):
            vg.forward(stack, x, **{keyword: 3})
    with pytest.raises(TypeError, match=r"^warmup:"):
        vg.lyapunov_exponents(stack, x, warmup=2)
