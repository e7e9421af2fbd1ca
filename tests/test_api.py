"""The public API's contract: validation, immutability, memory layouts, seeds, dispatch."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKENDS, CUDA

import vgcore as vg

WIDTH, BATCH = 5, 3


@pytest.fixture
def stack():
    return vg.Stack.random(4, WIDTH, activation="tanh", sigma_b=0.1, seed=0)


@pytest.fixture
def x(stack):
    return vg.random_inputs(stack, BATCH, seed=1)


def _calls(stack, x):
    """Every computation with valid arguments, as (name, callable taking **overrides)."""
    vectors = np.ones((2, WIDTH))

    def call(function, *args):
        def run(backend, **overrides):
            arguments = dict(zip(("stack", "x", "third"), args, strict=False))
            arguments.update(overrides)
            positional = [arguments["stack"], arguments["x"]]
            if "third" in arguments:
                positional.append(arguments["third"])
            return function(*positional, backend=backend)
        return run

    return {
        "forward": call(vg.forward, stack, x),
        "gradient_profile": call(vg.gradient_profile, stack, x, np.ones((BATCH, WIDTH))),
        "jvp": call(vg.jvp, stack, x, vectors),
        "vjp": call(vg.vjp, stack, x, vectors),
        "jacobian": call(vg.jacobian, stack, x),
    }


BAD_X = [
    (np.ones((BATCH, WIDTH + 1)), ValueError, "x"),
    (np.ones(WIDTH), ValueError, "x"),
    (np.ones((0, WIDTH)), ValueError, "x"),
    (np.ones((BATCH, WIDTH), dtype=np.int64), TypeError, "x"),
    (np.ones((BATCH, WIDTH), dtype=complex), TypeError, "x"),
    (np.full((BATCH, WIDTH), np.nan), ValueError, "x"),
    (np.full((BATCH, WIDTH), np.inf), ValueError, "x"),
    ("not an array", TypeError, "x"),
    (None, TypeError, "x"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["forward", "gradient_profile", "jvp", "vjp", "jacobian"])
@pytest.mark.parametrize(("bad", "error", "argument"), BAD_X)
def test_bad_x_is_refused_by_every_computation(stack, x, backend, name, bad, error, argument):
    with pytest.raises(error, match=rf"^{argument}:"):
        _calls(stack, x)[name](backend, x=bad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["gradient_profile", "jvp", "vjp"])
@pytest.mark.parametrize(("bad", "error"), [
    (np.ones((BATCH + 1, 2, WIDTH)), ValueError),
    (np.ones((BATCH, 2, WIDTH + 1)), ValueError),
    (np.ones((0, WIDTH)), ValueError),
    (np.full((BATCH, WIDTH), np.nan), ValueError),
    (np.ones((BATCH, WIDTH), dtype=np.int32), TypeError),
])
def test_bad_vectors_are_refused(stack, x, backend, name, bad, error):
    argument = {"gradient_profile": "grad_output", "jvp": "tangents", "vjp": "cotangents"}[name]
    if name == "gradient_profile" and bad.ndim == 3:
        bad = bad[:, 0]
    with pytest.raises(error, match=rf"^{argument}:"):
        _calls(stack, x)[name](backend, third=bad)


@pytest.mark.parametrize("name", ["forward", "gradient_profile", "jvp", "vjp", "jacobian"])
@pytest.mark.parametrize("backend", [1, "gpu", "NUMPY", None])
def test_bad_backend_is_refused(stack, x, name, backend):
    with pytest.raises((TypeError, ValueError), match=r"^backend:"):
        _calls(stack, x)[name](backend)


@pytest.mark.parametrize("name", ["forward", "gradient_profile", "jvp", "vjp", "jacobian"])
def test_non_stack_is_refused(x, name):
    function = getattr(vg, name)
    arguments = [np.eye(WIDTH)[None], x] + ([np.ones((1, WIDTH))] if name in ("jvp", "vjp") else [])
    with pytest.raises(TypeError, match=r"^stack:"):
        function(*arguments)


@pytest.mark.parametrize(("kwargs", "error", "argument"), [
    ({"weights": np.ones((2, 3, 4))}, ValueError, "weights"),
    ({"weights": np.ones((0, 3, 3))}, ValueError, "weights"),
    ({"weights": np.ones((2, 0, 0))}, ValueError, "weights"),
    ({"weights": np.ones((3, 3))}, ValueError, "weights"),
    ({"weights": np.ones((2, 3, 3), dtype=np.int64)}, TypeError, "weights"),
    ({"weights": np.full((2, 3, 3), np.inf)}, ValueError, "weights"),
    ({"biases": np.ones((2, 4))}, ValueError, "biases"),
    ({"biases": np.array([[np.nan] * 3] * 2)}, ValueError, "biases"),
    ({"activation": "swish"}, ValueError, "activation"),
    ({"activation": 3}, TypeError, "activation"),
    ({"residual": "yes"}, TypeError, "residual"),
    ({"residual": float("nan")}, ValueError, "residual"),
    ({"norm": "group"}, ValueError, "norm"),
])
def test_bad_stack_arguments(kwargs, error, argument):
    arguments = {"weights": np.ones((2, 3, 3)), "biases": None, "activation": "tanh"} | kwargs
    weights = arguments.pop("weights")
    with pytest.raises(error, match=rf"^{argument}:"):
        vg.Stack(weights, **arguments)


@pytest.mark.parametrize(("kwargs", "error", "argument"), [
    ({"depth": 0}, ValueError, "depth"),
    ({"depth": 2.5}, TypeError, "depth"),
    ({"depth": True}, TypeError, "depth"),
    ({"width": 0}, ValueError, "width"),
    ({"activation": "nope"}, ValueError, "activation"),
    ({"init": "zeros"}, ValueError, "init"),
    ({"sigma_w": -1.0}, ValueError, "sigma_w"),
    ({"sigma_w": "glorot"}, ValueError, "sigma_w"),
    ({"sigma_w": float("inf")}, ValueError, "sigma_w"),
    ({"sigma_b": -0.1}, ValueError, "sigma_b"),
    ({"dtype": "float16"}, ValueError, "dtype"),
    ({"dtype": "int64"}, ValueError, "dtype"),
    ({"seed": -1}, ValueError, "seed"),
    ({"device": "tpu"}, ValueError, "device"),
    ({"norm": "both"}, ValueError, "norm"),
])
def test_bad_random_arguments(kwargs, error, argument):
    arguments = {"depth": 2, "width": 3} | kwargs
    with pytest.raises(error, match=rf"^{argument}:"):
        vg.Stack.random(arguments.pop("depth"), arguments.pop("width"), **arguments)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_out_is_refused(stack, x, backend):
    good = np.empty((BATCH, WIDTH))
    read_only = np.empty((BATCH, WIDTH))
    read_only.flags.writeable = False
    bad_outs = [(np.empty((BATCH, WIDTH + 1)), ValueError), (np.empty((BATCH, WIDTH), np.float32), TypeError),
                (read_only, ValueError), (np.empty((WIDTH, BATCH)).T, ValueError), ([0.0], TypeError),
                (x, ValueError)]
    for bad, error in bad_outs:
        with pytest.raises(error, match=r"^out:"):
            vg.forward(stack, x, out=bad, backend=backend)
    assert vg.forward(stack, x, out=good, backend=backend) is good
    np.testing.assert_allclose(good, vg.forward(stack, x, backend="numpy"), rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_never_modified_and_read_only_inputs_work(backend):
    stack = vg.Stack.random(5, WIDTH, activation="gelu", norm="pre", residual=0.5, seed=2)
    weights = np.array(stack.weights)
    biases = np.array(stack.biases)
    weights.flags.writeable = False
    biases.flags.writeable = False
    stack = vg.Stack(weights, biases, activation="gelu", norm="pre", residual=0.5)
    x = vg.random_inputs(stack, BATCH, seed=3)
    g = np.random.default_rng(4).standard_normal((BATCH, WIDTH))
    t = np.random.default_rng(5).standard_normal((BATCH, 2, WIDTH))
    for array in (x, g, t):
        array.flags.writeable = False
    before = [a.copy() for a in (weights, biases, x, g, t)]
    vg.forward(stack, x, backend=backend)
    vg.gradient_profile(stack, x, g, backend=backend)
    vg.jvp(stack, x, t, backend=backend)
    vg.vjp(stack, x, t, backend=backend)
    vg.jacobian(stack, x, backend=backend)
    for original, array in zip(before, (weights, biases, x, g, t), strict=True):
        np.testing.assert_array_equal(original, array)
    assert not stack.weights.flags.writeable


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_give_the_same_results(backend):
    rng = np.random.default_rng(6)
    weights = rng.standard_normal((3, 2 * WIDTH, 2 * WIDTH))[:, ::2, ::2] / np.sqrt(WIDTH)  # strided
    x_fortran = np.asfortranarray(rng.standard_normal((BATCH, WIDTH)))
    x_strided = rng.standard_normal((BATCH, 2 * WIDTH))[:, ::2]
    strided = vg.Stack(weights, activation="silu")
    contiguous = vg.Stack(np.ascontiguousarray(weights), activation="silu")
    for x in (x_fortran, x_strided):
        np.testing.assert_array_equal(vg.forward(strided, x, backend=backend),
                                      vg.forward(contiguous, np.ascontiguousarray(x), backend=backend))
        np.testing.assert_array_equal(vg.gradient_profile(strided, x, backend=backend).log_grad_norm,
                                      vg.gradient_profile(contiguous, np.ascontiguousarray(x),
                                                          backend=backend).log_grad_norm)


def test_same_seed_same_weights_and_schemes():
    for init in ("gaussian", "orthogonal", "uniform"):
        one = vg.Stack.random(3, 6, init=init, sigma_w=1.3, sigma_b=0.2, seed=11)
        two = vg.Stack.random(3, 6, init=init, sigma_w=1.3, sigma_b=0.2, seed=11)
        other = vg.Stack.random(3, 6, init=init, sigma_w=1.3, sigma_b=0.2, seed=12)
        single = vg.Stack.random(3, 6, init=init, sigma_w=1.3, sigma_b=0.2, seed=11, dtype="float32")
        np.testing.assert_array_equal(one.weights, two.weights)
        np.testing.assert_array_equal(one.biases, two.biases)
        assert not np.array_equal(one.weights, other.weights)
        np.testing.assert_array_equal(single.weights, one.weights.astype(np.float32))
    assert vg.Stack.random(2, 3, sigma_w="he").sigma_w == pytest.approx(np.sqrt(2))
    assert vg.Stack.random(2, 3, sigma_w="xavier").sigma_w == 1.0
    assert vg.Stack.random(2, 3, sigma_w="lecun").sigma_w == 1.0
    fresh = vg.Stack.random(2, 3)
    assert vg.Stack.random(2, 3, seed=fresh.seed).weights.tolist() == fresh.weights.tolist()


def test_initialisations_have_the_documented_statistics():
    """Orthogonal: W W^T = sigma_w^2 I; gaussian and uniform: variance sigma_w^2 / n.

    With n = 400 and L = 4 there are 640000 entries, so the sample variance
    is within 1% of its mean with overwhelming probability (relative standard
    error sqrt(2 / 640000) = 0.18% for the Gaussian).
    """
    width, sigma_w = 400, 1.7
    orthogonal = vg.Stack.random(2, 30, init="orthogonal", sigma_w=sigma_w, seed=0).weights
    np.testing.assert_allclose(orthogonal @ orthogonal.transpose(0, 2, 1),
                               sigma_w**2 * np.broadcast_to(np.eye(30), (2, 30, 30)), atol=1e-12)
    for init in ("gaussian", "uniform"):
        weights = vg.Stack.random(4, width, init=init, sigma_w=sigma_w, seed=1).weights
        assert weights.var() == pytest.approx(sigma_w**2 / width, rel=0.01)
        assert abs(weights.mean()) < 5 * sigma_w / width / np.sqrt(4)
    uniform = vg.Stack.random(4, width, init="uniform", sigma_w=sigma_w, seed=1).weights
    assert np.abs(uniform).max() <= sigma_w * np.sqrt(3 / width)
    biases = vg.Stack.random(4, width, sigma_b=0.3, seed=2).biases
    assert biases.std() == pytest.approx(0.3, rel=0.05)


def test_default_grad_output_comes_from_the_seed():
    stack = vg.Stack.random(3, WIDTH, seed=21)
    x = vg.random_inputs(stack, BATCH, seed=0)
    one = vg.gradient_profile(stack, x)
    two = vg.gradient_profile(vg.Stack.random(3, WIDTH, seed=21), x, backend="numpy")
    np.testing.assert_allclose(one.log_grad_norm, two.log_grad_norm, rtol=1e-12)
    other = vg.gradient_profile(vg.Stack.random(3, WIDTH, seed=22), x)
    assert not np.allclose(one.log_grad_norm[:, -1], other.log_grad_norm[:, -1])


def test_profile_fields_and_theory():
    stack = vg.Stack.random(6, 16, activation="relu", sigma_w=np.sqrt(2), seed=3)
    profile = vg.gradient_profile(stack, vg.random_inputs(stack, 4, seed=1))
    assert profile.depth == 6 and profile.batch == 4
    assert profile.log_grad_norm.shape == (4, 7) and profile.log_weight_grad_norm.shape == (6,)
    np.testing.assert_allclose(profile.grad_norm, np.exp(profile.log_grad_norm.mean(axis=0)))
    assert profile.chi_theory == pytest.approx(1.0, rel=1e-9)  # relu at sigma_w^2 = 2
    assert profile.config["activation"] == "relu" and profile.config["seed"] == 3
    residual = vg.Stack.random(6, 16, activation="relu", residual=1.0, seed=3)
    assert np.isnan(vg.gradient_profile(residual, vg.random_inputs(residual, 2)).chi_theory)


def test_cuda_backend_runs_or_is_refused_with_its_reason(stack, x):
    """With a GPU the 'cuda' backend gives the CPU's result on host arrays; without one, a reason."""
    if CUDA:
        np.testing.assert_allclose(vg.forward(stack, x, backend="cuda"), vg.forward(stack, x), rtol=1e-12)
    else:
        with pytest.raises(ValueError, match=r"^backend: 'cuda' is not available here \(.+\)"):
            vg.forward(stack, x, backend="cuda")


def test_x_of_another_float_dtype_is_cast(stack, x):
    np.testing.assert_allclose(vg.forward(stack, x.astype(np.float32)),
                               vg.forward(stack, x.astype(np.float32).astype(np.float64)), rtol=0)
