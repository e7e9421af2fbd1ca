"""The CuPy backend against the NumPy reference, through an ``xp`` fixture over NumPy and CuPy.

Each test runs on host arrays (backend "auto" runs the compiled CPU kernels)
and, where CuPy imports and a GPU is visible, on CuPy arrays (backend "auto"
runs vgcore.backends.cuda_stack); the cupy cases skip cleanly elsewhere.  Results must equal
the reference as the CPU kernels must (float64 1e-10, float32 1e-4 where the
problem allows: conftest.assert_matches_reference) and stay on the device of
the inputs.  Without a usable GPU, the tests that the "cuda" backend is
refused with its reason run instead.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
from conftest import (
    CUDA,
    assert_matches_reference,
    assert_profile_matches_reference,
    determined_directions,
    references,
    requires_cuda,
    stack_cases,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import vgcore as vg
from vgcore._activations import ACTIVATION_CODES, ACTIVATIONS, activation
from vgcore.reference import stack as stack_reference

# The host cases repeat what test_kernels checks at length; the device cases are the point.
EXAMPLES = 100 if CUDA else 15


@pytest.fixture(scope="module", params=["numpy", pytest.param("cupy", marks=requires_cuda)])
def xp(request):
    """The array namespace the stack and inputs live in."""
    if request.param == "numpy":
        return np
    import cupy

    return cupy


def on(xp, stack: vg.Stack) -> vg.Stack:
    """The same stack with its parameters in namespace xp."""
    return vg.Stack(xp.asarray(stack.weights), xp.asarray(stack.biases), activation=stack.activation,
                    residual=stack.residual, norm=stack.norm)


def host(array) -> np.ndarray:
    """A NumPy copy of a NumPy or CuPy array."""
    get = getattr(array, "get", None)
    return np.asarray(get() if callable(get) else array)


def assert_lives_in(xp, *arrays) -> None:
    for array in arrays:
        assert isinstance(array, xp.ndarray), f"{type(array).__module__}.{type(array).__name__}"


def cuda_module():
    return importlib.import_module("vgcore.backends.cuda_stack")


# ---------------------------------------------------------------------------
# Every computation against the reference
# ---------------------------------------------------------------------------

@settings(max_examples=EXAMPLES)
@given(case=stack_cases())
def test_forward_matches_reference(xp, case):
    stack, x = case
    low, high = references(vg.forward, stack, x)
    result = vg.forward(on(xp, stack), xp.asarray(x))
    assert_lives_in(xp, result)
    assert result.dtype == stack.dtype
    assert_matches_reference(host(result), high, low, dtype=stack.dtype, relative_to="max")


@settings(max_examples=EXAMPLES)
@given(case=stack_cases())
def test_gradient_profile_matches_reference(xp, case):
    stack, x = case
    g = vg._api.default_grad_output(stack, x.shape[0])
    profile = vg.gradient_profile(on(xp, stack), xp.asarray(x), xp.asarray(g))
    assert_lives_in(xp, profile.log_grad_norm, profile.log_weight_grad_norm, profile.saturation,
                    profile.dead)
    profile = profile.to_numpy()
    for field in ("log_grad_norm", "log_weight_grad_norm", "saturation", "dead"):
        assert getattr(profile, field).dtype == np.float64
    assert_profile_matches_reference(profile, stack, x, g)


@settings(max_examples=EXAMPLES)
@given(case=stack_cases(max_depth=30), k=st.integers(1, 5), shared=st.booleans())
def test_jvp_and_vjp_match_reference(xp, case, k, shared):
    stack, x = case
    shape = (k, stack.width) if shared else (x.shape[0], k, stack.width)
    vectors = np.random.default_rng(k).standard_normal(shape).astype(stack.dtype)
    device_stack, device_x = on(xp, stack), xp.asarray(x)
    for function in (vg.jvp, vg.vjp):
        result = function(device_stack, device_x, xp.asarray(vectors))
        assert_lives_in(xp, result)
        assert result.shape == (x.shape[0], k, stack.width)
        low, high = references(function, stack, x, vectors)
        assert_matches_reference(host(result), high, low, dtype=stack.dtype, relative_to="max")


@settings(max_examples=EXAMPLES)
@given(case=stack_cases(max_depth=20, max_width=24, max_batch=3))
def test_jacobian_matches_reference(xp, case):
    stack, x = case
    result = vg.jacobian(on(xp, stack), xp.asarray(x))
    assert_lives_in(xp, result)
    assert result.shape == (x.shape[0], stack.width, stack.width)
    low, high = references(vg.jacobian, stack, x)
    assert_matches_reference(host(result), high, low, dtype=stack.dtype, relative_to="max")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_is_written_in_place(xp, dtype):
    stack = vg.Stack.random(7, 12, activation="tanh", residual=0.5, norm="post", dtype=dtype, seed=3)
    device_stack = on(xp, stack)
    x = xp.asarray(vg.random_inputs(stack, 5, seed=4))
    vectors = xp.asarray(np.random.default_rng(5).standard_normal((5, 3, 12)).astype(dtype))
    calls = [
        (vg.forward, (), (5, 12)),
        (vg.jvp, (vectors,), (5, 3, 12)),
        (vg.vjp, (vectors,), (5, 3, 12)),
        (vg.jacobian, (), (5, 12, 12)),
    ]
    for function, extra, shape in calls:
        out = xp.full(shape, np.nan, dtype)
        assert function(device_stack, x, *extra, out=out) is out
        np.testing.assert_array_equal(host(out), host(function(device_stack, x, *extra)))


@settings(max_examples=max(5, EXAMPLES // 5))
@given(cases=st.lists(stack_cases(max_depth=12, max_width=16, max_batch=4), min_size=1, max_size=5))
def test_batched_profiles_equal_one_by_one(xp, cases):
    """The sweep's chunk runner, ``backend().gradient_profiles``, on the device's arrays."""
    stacks = [on(xp, stack) for stack, _ in cases]
    xs = [xp.asarray(x) for _, x in cases]
    gs = [xp.asarray(vg._api.default_grad_output(stack, x.shape[0])) for stack, x in cases]
    implementation = vg.backends.implementation(stacks[0], "auto")
    batched = implementation.gradient_profiles([s.bind(x) for s, x in zip(stacks, xs, strict=True)], gs)
    assert len(batched) == len(stacks)
    for stack, x, g, result in zip(stacks, xs, gs, batched, strict=True):
        single = implementation.gradient_profile(stack.bind(x), g, None)
        for key in ("log_grad_norm", "log_weight_grad_norm", "saturation", "dead"):
            assert_lives_in(xp, result[key])
            np.testing.assert_allclose(host(result[key]), host(single[key]), rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------
# Spectra: the CuPy backend's against vgcore.spectra's NumPy reference
# ---------------------------------------------------------------------------

@requires_cuda
@settings(max_examples=EXAMPLES // 2)
@given(case=stack_cases(max_depth=20, max_width=16, max_batch=3), k=st.integers(1, 16))
def test_spectra_match_reference(case, k):
    import cupy

    stack, x = case
    k = min(k, stack.width)
    device_stack, device_x = on(cupy, stack), cupy.asarray(x)
    values = vg.singular_values(device_stack, device_x)
    exponents = vg.lyapunov_exponents(device_stack, device_x, k)
    implementation = vg.backends.implementation(device_stack, "auto")  # vgcore.backends.cuda_stack
    growth = implementation.lyapunov_log_growth(device_stack.bind(device_x), k)
    assert_lives_in(cupy, values, exponents, growth)
    assert values.shape == (x.shape[0], stack.width) and exponents.shape == (x.shape[0], k)
    assert values.dtype == stack.dtype and exponents.dtype == growth.dtype == np.float64
    assert np.all(np.diff(host(values), axis=1) <= 0)
    np.testing.assert_array_equal(host(exponents), np.sort(host(growth) / stack.depth, axis=1)[:, ::-1])
    # the singular values of the device's Jacobian, within the SVD's rounding of it
    jacobians = host(vg.jacobian(device_stack, device_x)).astype(np.float64)
    expected = np.linalg.svd(jacobians, compute_uv=False)
    rounding = 10 * stack.width * np.finfo(stack.dtype).eps * expected.max(axis=1, keepdims=True)
    assert np.all(np.abs(host(values) - expected) <= rounding + np.finfo(stack.dtype).smallest_subnormal)
    # the log growth against vgcore.spectra's reference, on the directions the problem determines

    def log_growth(stack, x, *, backend):
        return vg.backends.implementation(stack, backend).lyapunov_log_growth(stack.bind(x), k)

    low, high = references(log_growth, stack, x)
    growth = host(growth)
    assert not np.isnan(growth).any()
    determined = determined_directions(stack, x, k, low, high)
    assert_matches_reference(growth[determined], high[determined], low[determined], dtype=stack.dtype)


# ---------------------------------------------------------------------------
# The device: weights, placement, DLPack, launches
# ---------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("init", ["gaussian", "orthogonal", "uniform"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_random_stack_on_the_gpu_has_the_cpu_weights(init, dtype):
    import cupy

    options = dict(activation="gelu", init=init, sigma_w=1.3, sigma_b=0.2, dtype=dtype, seed=11)
    cpu = vg.Stack.random(6, 9, **options)
    gpu = vg.Stack.random(6, 9, device="cuda", **options)
    assert gpu.device == "cuda" and cpu.device == "cpu"
    assert_lives_in(cupy, gpu.weights, gpu.biases)
    np.testing.assert_array_equal(host(gpu.weights), cpu.weights)
    np.testing.assert_array_equal(host(gpu.biases), cpu.biases)
    x = vg.random_inputs(gpu, 4, seed=2)
    assert_lives_in(cupy, x, vg._api.default_grad_output(gpu, 4))
    np.testing.assert_array_equal(host(x), vg.random_inputs(cpu, 4, seed=2))
    np.testing.assert_array_equal(host(vg._api.default_grad_output(gpu, 4)),
                                  vg._api.default_grad_output(cpu, 4))
    # the default grad_output follows the seed on both devices, so the profiles agree
    cpu_profile = vg.gradient_profile(cpu, vg.random_inputs(cpu, 4, seed=2))
    gpu_profile = vg.gradient_profile(gpu, x).to_numpy()
    rtol = 1e-10 if dtype == "float64" else 1e-4
    np.testing.assert_allclose(gpu_profile.log_grad_norm, cpu_profile.log_grad_norm, rtol=rtol, atol=rtol)


@requires_cuda
def test_results_stay_on_the_gpu():
    import cupy

    stack = vg.Stack.random(5, 8, activation="silu", norm="pre", seed=1, device="cuda")
    x = vg.random_inputs(stack, 3, seed=2)
    vectors = cupy.ones((2, 8))
    profile = vg.gradient_profile(stack, x)
    assert_lives_in(cupy, vg.forward(stack, x), vg.jvp(stack, x, vectors), vg.vjp(stack, x, vectors),
                    vg.jacobian(stack, x), profile.log_grad_norm, profile.log_weight_grad_norm,
                    profile.saturation, profile.dead, profile.grad_norm)
    assert_lives_in(cupy, vg.singular_values(stack, x), vg.lyapunov_exponents(stack, x, 3))


@requires_cuda
def test_cuda_backend_on_host_arrays_returns_host_arrays():
    """backend="cuda" on a host stack computes on the GPU and brings the results back."""
    stack = vg.Stack.random(6, 10, activation="tanh", residual=1.0, seed=4)
    x = vg.random_inputs(stack, 3, seed=5)
    on_gpu = vg.forward(stack, x, backend="cuda")
    assert isinstance(on_gpu, np.ndarray)
    np.testing.assert_allclose(on_gpu, vg.forward(stack, x, backend="cpu"), rtol=1e-10, atol=1e-12)
    out = np.empty_like(x)
    assert vg.forward(stack, x, out=out, backend="cuda") is out
    np.testing.assert_array_equal(out, on_gpu)
    profile = vg.gradient_profile(stack, x, backend="cuda")
    assert isinstance(profile.log_grad_norm, np.ndarray)
    np.testing.assert_allclose(profile.log_grad_norm, vg.gradient_profile(stack, x).log_grad_norm,
                               rtol=1e-10, atol=1e-10)


@requires_cuda
def test_dlpack_cuda_tensor_is_used_without_copying():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA here")
    generator = torch.Generator(device="cuda").manual_seed(0)
    weights = torch.randn(4, 6, 6, device="cuda", dtype=torch.float64, generator=generator) / 6**0.5
    biases = torch.randn(4, 6, device="cuda", dtype=torch.float64, generator=generator)
    x = torch.randn(3, 6, device="cuda", dtype=torch.float64, generator=generator)
    stack = vg.Stack(weights, biases, activation="tanh")
    assert stack.device == "cuda"
    assert stack.weights.data.ptr == weights.data_ptr()
    assert stack.biases.data.ptr == biases.data_ptr()
    result = vg.forward(stack, x)
    expected = stack_reference.forward(weights.cpu().numpy(), biases.cpu().numpy(), x.cpu().numpy(), "tanh",
                                       None, None)
    np.testing.assert_allclose(host(result), expected, rtol=1e-10, atol=1e-12)


def _launch_count(monkeypatch, function, depth: int, batch: int, k: int = 1) -> int:
    """Kernel launches plus cuBLAS products of one call of ``function`` on a device stack."""
    cuda = cuda_module()
    count = 0
    launch, matmul = cuda._launch, cuda._matmul

    def counted(original):
        def wrapper(*args, **kwargs):
            nonlocal count
            count += 1
            return original(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(cuda, "_launch", counted(launch))
    monkeypatch.setattr(cuda, "_matmul", counted(matmul))
    try:
        stack = vg.Stack.random(depth, 32, activation="tanh", residual=0.5, norm="pre", seed=0,
                                device="cuda")
        x = vg.random_inputs(stack, batch, seed=1)
        if function is vg.gradient_profile:
            function(stack, x)
        else:
            import cupy

            function(stack, x, cupy.ones((batch, k, 32)))
    finally:
        monkeypatch.setattr(cuda, "_launch", launch)
        monkeypatch.setattr(cuda, "_matmul", matmul)
    return count


@requires_cuda
@pytest.mark.parametrize("function", [vg.gradient_profile, vg.jvp, vg.vjp])
def test_launches_per_layer_do_not_depend_on_the_batch(monkeypatch, function):
    """Deep narrow stacks are launch-bound: one layer costs a fixed number of launches.

    Batches stay below the width (32): from B >= n on, the weight-gradient norm
    takes one product fewer (the gradient itself instead of two Gram matrices).
    """
    counts = {(depth, batch, k): _launch_count(monkeypatch, function, depth, batch, k)
              for depth in (4, 8) for batch in (1, 16) for k in (1, 5)
              if function is not vg.gradient_profile or k == 1}
    for (depth, _, _), count in counts.items():
        assert count == counts[depth, 1, 1]  # neither samples nor vectors add launches
    # forward: layer norm, product, epilogue; profile's backward: renormalisation, sample weights,
    # epilogue, product, layer-norm product, two Gram products, two reductions
    per_layer = (counts[8, 1, 1] - counts[4, 1, 1]) / 4
    assert per_layer == (12 if function is vg.gradient_profile else 6)


@requires_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_header_on_the_gpu_matches_numpy_twin(name, dtype):
    """csrc/vg_activations.h compiled for the device against vgcore._activations, extremes included."""
    import cupy

    cuda = cuda_module()
    h = np.concatenate([
        np.linspace(-40, 40, 20001), [0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 88.0, -88.0, 700.0, -700.0],
        np.finfo(dtype).max * np.array([1.0, -1.0]),
    ]).astype(dtype)
    values, derivatives = cupy.array(h), cupy.empty(h.size, dtype)  # computed in place
    # bias 0, no residual, no norm: the epilogue leaves phi(h) and phi'(h).  One entry per row (exponent
    # 0), written back as true values (out_exponent NULL): a row whose largest entry is beyond
    # 2**SCALE_RANGE is stored scaled by the row check, which would flush the small entries of a shared
    # row; a row of one entry is scaled and restored exactly
    exponents = cupy.zeros(h.size, np.int32)
    cuda._launch("vg_forward_epilogue", dtype, h.size, 32, np.int32(h.size), np.int32(1),
                 np.int32(ACTIVATION_CODES[name]), np.int32(0), np.dtype(dtype).type(0), np.int32(0),
                 cupy.zeros(1, dtype), values, exponents, values, derivatives, cuda._NULL, cuda._NULL)
    value, derivative = host(values), host(derivatives)
    assert not np.isnan(value).any() and not np.isnan(derivative).any()
    expected_value, expected_derivative = activation(name, h.astype(np.float64))
    ulps = 8 * np.finfo(dtype).eps
    tiny = np.finfo(dtype).tiny
    for got, want in ((value, expected_value), (derivative, expected_derivative)):
        finite = (np.abs(want) < np.finfo(dtype).max) & (np.abs(want) > tiny * 1e3)
        relative = np.abs(got[finite] - want[finite]) / np.abs(want[finite])
        limit = ulps * (1e3 if name in ("gelu", "silu", "elu", "selu", "softplus") else 1)
        small = np.abs(want[finite]) < 1e-3
        assert np.all((relative <= limit) | small & (np.abs(got[finite] - want[finite]) <= ulps))


# ---------------------------------------------------------------------------
# Rows below the floats (issue 17, defect 2): the scaled forward pass of vgcore.reference.stack
# ---------------------------------------------------------------------------

def _assert_every_computation_matches_reference(stack: vg.Stack, x: np.ndarray, k: int = 2) -> None:
    """forward, gradient profile, JVP, VJP and Lyapunov growth of the device stack against the reference."""
    import cupy

    device_stack, device_x = on(cupy, stack), cupy.asarray(x)
    low, high = references(vg.forward, stack, x)
    assert_matches_reference(host(vg.forward(device_stack, device_x)), high, low, dtype=stack.dtype,
                             relative_to="max")
    g = vg._api.default_grad_output(stack, x.shape[0])
    profile = vg.gradient_profile(device_stack, device_x, cupy.asarray(g)).to_numpy()
    assert_profile_matches_reference(profile, stack, x, g)
    vectors = np.random.default_rng(k).standard_normal((x.shape[0], k, stack.width)).astype(stack.dtype)
    for function in (vg.jvp, vg.vjp):
        low, high = references(function, stack, x, vectors)
        result = function(device_stack, device_x, cupy.asarray(vectors))
        assert_matches_reference(host(result), high, low, dtype=stack.dtype, relative_to="max")

    def log_growth(stack, x, *, backend):
        return vg.backends.implementation(stack, backend).lyapunov_log_growth(stack.bind(x), k)

    low, high = references(log_growth, stack, x)
    growth = host(log_growth(device_stack, device_x, backend="auto"))
    determined = determined_directions(stack, x, k, low, high)
    assert_matches_reference(growth[determined], high[determined], low[determined], dtype=stack.dtype)


@requires_cuda
def test_stack_whose_activations_fall_below_the_floats_matches_reference():
    """2000 tanh layers of width 4: the activations fall below 2**-100 after ~500 layers and go on as
    scaled rows; every log norm stays finite and equals the reference's."""
    import cupy

    stack = vg.Stack.random(2000, 4, activation="tanh", seed=0)
    x = vg.random_inputs(stack, 3, seed=1)
    profile = vg.gradient_profile(on(cupy, stack), cupy.asarray(x)).to_numpy()
    expected = vg.gradient_profile(stack, x, backend="numpy")
    assert np.isfinite(expected.log_weight_grad_norm).all()  # the reference carries the scales
    assert np.isfinite(profile.log_weight_grad_norm).all() and np.isfinite(profile.log_grad_norm).all()
    np.testing.assert_allclose(profile.log_weight_grad_norm, expected.log_weight_grad_norm, rtol=1e-10)
    np.testing.assert_allclose(profile.log_grad_norm, expected.log_grad_norm, rtol=1e-10, atol=1e-10)
    _assert_every_computation_matches_reference(stack, x)


@requires_cuda
def test_relu_stack_scaled_below_the_floats_is_homogeneous():
    """relu without biases is homogeneous: with weights c W, x_l scales by c**l (1e-12**30 = 1e-360 is
    below every float) and the gradients follow the closed forms
        log ||dL/dW_l|| (cW) = log ||dL/dW_l|| (W) + (L - 1) log c,
        log ||dL/dx_l|| (cW) = log ||dL/dx_l|| (W) + (L - l) log c."""
    import cupy

    depth, c = 30, 1e-12
    base = vg.Stack.random(depth, 16, activation="relu", seed=0)
    x = cupy.asarray(vg.random_inputs(base, 3, seed=1))
    zero_biases = cupy.zeros((depth, 16))
    plain = vg.gradient_profile(vg.Stack(cupy.asarray(base.weights), zero_biases, activation="relu"), x)
    scaled_stack = vg.Stack(cupy.asarray(base.weights * c), zero_biases, activation="relu")
    scaled = vg.gradient_profile(scaled_stack, x).to_numpy()
    plain = plain.to_numpy()
    assert np.isfinite(scaled.log_weight_grad_norm).all() and np.isfinite(scaled.log_grad_norm).all()
    closed_form = plain.log_weight_grad_norm + (depth - 1) * np.log(c)
    np.testing.assert_allclose(scaled.log_weight_grad_norm, closed_form, rtol=1e-10)
    layers = np.arange(depth + 1)
    np.testing.assert_allclose(scaled.log_grad_norm, plain.log_grad_norm + (depth - layers) * np.log(c),
                               rtol=1e-10, atol=1e-9)
    host_stack = vg.Stack(base.weights * c, np.zeros((depth, 16)), activation="relu")
    expected = vg.gradient_profile(host_stack, host(x), backend="numpy")
    np.testing.assert_allclose(scaled.log_weight_grad_norm, expected.log_weight_grad_norm, rtol=1e-10)


@requires_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("activation", "norm", "residual", "sigma_w"), [
    ("tanh", "pre", None, 1e-3),  # LN of scaled rows: the variance and the Jacobian carry 4**e
    ("gelu", "post", None, 1e-3),
    ("leaky_relu", None, None, 0.01),  # phi'(0-) and phi'(0+) by the sign of h
    ("tanh", "post", 0.5, 1e-3),  # residual sums on the larger exponent
    ("selu", "pre", None, 1e-3),
])
def test_small_weights_below_the_floats_match_reference(activation, norm, residual, sigma_w, dtype):
    stack = vg.Stack.random(40, 6, activation=activation, norm=norm, residual=residual, sigma_w=sigma_w,
                            dtype=dtype, seed=3)
    _assert_every_computation_matches_reference(stack, vg.random_inputs(stack, 3, seed=4))


@requires_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("activation", "sigma_b", "residual", "norm"), [
    ("tanh", 0.3, 0.5, None),  # a bias in range: the row meets it and is evaluated as true values
    ("sigmoid", 0.0, None, None),  # phi(0) != 0 swamps the linearisation: a true row again
    ("softplus", 0.0, 1.0, None),
    ("tanh", 0.0, 1.0, None),
    ("relu", 0.0, None, "post"),
    ("gelu", 0.2, None, "pre"),
])
def test_inputs_below_the_floats_match_reference(activation, sigma_b, residual, norm, dtype):
    """Rows of x below 2**-SCALE_RANGE go through the input check (vg_scale_rows) first.

    Width 8: at width 5 or 6 a relu post-norm row has a single active unit, whose gradient is 0 in
    exact arithmetic and rounding noise in any float code (ill-conditioned, not a scaled-row matter).
    """
    stack = vg.Stack.random(8, 8, activation=activation, sigma_b=sigma_b, residual=residual, norm=norm,
                            dtype=dtype, seed=5)
    x = vg.random_inputs(stack, 4, seed=6)
    x[1] *= 1e-200 if dtype == np.float64 else 1e-35
    x[2] = 0
    x[3] *= 1e-20 if dtype == np.float64 else 1e-12
    _assert_every_computation_matches_reference(stack, x)


# ---------------------------------------------------------------------------
# Rows beyond the floats (issue 17, defect 3): activations above 2**SCALE_RANGE
# ---------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize(("activation", "sigma_w", "dtype"), [
    ("softplus", 1e6, np.float32), ("gelu", 1e6, np.float32),
    ("softplus", 1e150, np.float64), ("gelu", 1e150, np.float64),
])
def test_exploding_activations_match_reference(activation, sigma_w, dtype):
    """The issue's cases: activations grow by sigma_w per layer, past 3e38 (float32) or 1.8e308.

    The rows beyond 2**R are carried scaled (their entries on phi's asymptote);
    every log norm is finite and equals the reference's, and the top Lyapunov
    exponent equals the reference's and that of the same weights in float64.
    """
    import cupy

    stack = vg.Stack.random(10, 8, activation=activation, sigma_w=sigma_w, dtype=dtype, seed=0)
    x = vg.random_inputs(stack, 2, seed=1)
    device_stack, device_x = on(cupy, stack), cupy.asarray(x)
    profile = vg.gradient_profile(device_stack, device_x).to_numpy()
    expected = vg.gradient_profile(stack, x, backend="numpy")
    tolerance = 1e-10 if dtype == np.float64 else 1e-5
    for field in ("log_grad_norm", "log_weight_grad_norm"):
        assert np.all(np.isfinite(getattr(profile, field))), field
        np.testing.assert_allclose(getattr(profile, field), getattr(expected, field), rtol=tolerance,
                                   err_msg=field)
    spectrum = host(vg.lyapunov_exponents(device_stack, device_x))
    assert not np.any(np.isnan(spectrum))
    np.testing.assert_allclose(spectrum[:, 0], vg.lyapunov_exponents(stack, x, backend="numpy")[:, 0],
                               rtol=tolerance)
    wide = vg.Stack(stack.weights.astype(np.float64), stack.biases.astype(np.float64), activation=activation)
    truth = vg.lyapunov_exponents(wide, x.astype(np.float64), backend="numpy")[:, 0]
    np.testing.assert_allclose(spectrum[:, 0], truth, rtol=tolerance)


@requires_cuda
# B < n: the weight-gradient norm from the Gram products; B >= n: from G^T U.  With B = 10 the inputs of
# seed 1 give a sample whose input cotangent cancels to 1e-15, rounding noise that no two codes share
@pytest.mark.parametrize(("batch", "seed"), [(2, 1), (10, 3)])
def test_post_norm_inputs_near_float32_max(batch, seed):
    """relu, norm="post", float32 inputs of 2**127 (1.7e38) against the same inputs at 2**20.

    LN makes each layer's output independent of its input's scale once eps is
    negligible, so the outputs are equal, the input's log gradient norm is
    107 ln 2 lower and the weight gradients are the same.  Layer 1's cotangent
    at h is 2**-107 smaller, near 2**-127: its Gram products underflow float32
    unless the weighted cotangents are rescaled (vg_rescale_weighted_cotangents).
    """
    import cupy

    stack = vg.Stack.random(5, 8, activation="relu", norm="post", dtype=np.float32, seed=0)
    device_stack = on(cupy, stack)
    x = vg.random_inputs(stack, batch, seed=seed)
    x = np.ldexp(x, min(0, 1 - int(np.frexp(np.abs(x).max())[1])))  # largest |x| below 2: 2**127 x is finite
    huge, moderate = cupy.asarray(np.ldexp(x, 127)), cupy.asarray(np.ldexp(x, 20))
    np.testing.assert_allclose(host(vg.forward(device_stack, huge)), host(vg.forward(device_stack, moderate)),
                               rtol=1e-5, atol=1e-5)
    g = cupy.asarray(vg.random_inputs(stack, batch, seed=seed + 1))
    high, low = (vg.gradient_profile(device_stack, inputs, g).to_numpy() for inputs in (huge, moderate))
    assert np.all(np.isfinite(high.log_weight_grad_norm)) and np.all(np.isfinite(high.log_grad_norm))
    np.testing.assert_allclose(high.log_grad_norm[:, 1:], low.log_grad_norm[:, 1:], rtol=1e-5)
    shift = 107 * math.log(2)
    np.testing.assert_allclose(high.log_grad_norm[:, 0], low.log_grad_norm[:, 0] - shift, rtol=1e-5)
    np.testing.assert_allclose(high.log_weight_grad_norm, low.log_weight_grad_norm, rtol=1e-5)
    expected = vg.gradient_profile(stack, np.ldexp(x, 127), host(g), backend="numpy")
    np.testing.assert_allclose(high.log_weight_grad_norm, expected.log_weight_grad_norm, rtol=1e-5)
    np.testing.assert_allclose(high.log_grad_norm, expected.log_grad_norm, rtol=1e-5)


@requires_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("activation", "sigma_b", "residual", "norm"), [
    ("tanh", 0.3, 0.5, None),  # entries on the asymptote, the residual on the larger exponent
    ("softplus", 0.0, 1.0, None),
    ("gelu", 0.2, None, "pre"),  # LN(x) of a row beyond the floats: true values, the true inv_std
    ("tanh", 0.0, 1.0, "pre"),  # u true values, x scaled: the residual adds on x's exponent
    ("relu", 0.0, None, "post"),  # LN(y) true values: the output row is in range again
    ("silu", 0.1, 0.5, "post"),
])
def test_inputs_beyond_the_floats_match_reference(activation, sigma_b, residual, norm, dtype):
    """Rows of x from 2**SCALE_RANGE on (2**100 float64, 2**30 float32) through every computation.

    The scales keep the true outputs finite, so forward can be compared too;
    in float64 they stay below 2**128, where the float32 probe of the problem
    (conftest.references) is finite as well.  Seed 6: with seed 5 a relu
    post-norm sample's cotangent cancels to e**-40 (rounding noise that no two
    codes share, on the CPU as well).
    """
    stack = vg.Stack.random(8, 8, activation=activation, sigma_b=sigma_b, residual=residual, norm=norm,
                            dtype=dtype, seed=6)
    x = vg.random_inputs(stack, 4, seed=6)
    x[1] = np.ldexp(x[1], 120 if dtype == np.float64 else 90)
    x[2] = np.ldexp(x[2], 105 if dtype == np.float64 else 40)
    _assert_every_computation_matches_reference(stack, x)


@requires_cuda
@pytest.mark.parametrize(("dtype", "power"), [
    (np.float64, -1000), (np.float64, -300), (np.float64, 300), (np.float64, 1000), (np.float64, 1023),
    (np.float32, -100), (np.float32, 100), (np.float32, 127),
])
@pytest.mark.parametrize(("activation", "residual"), [("relu", None), ("leaky_relu", 0.5), ("linear", None)])
def test_homogeneous_stacks_scale_exactly_at_any_input_scale(activation, residual, dtype, power):
    """Closed form: relu / leaky_relu / linear with bias 0 are positively homogeneous, x_l(c x) = c x_l(x).

    For inputs scaled by c = 2**power the derivatives, the cotangents and every
    Jacobian are unchanged and the weight gradients scale by c: log norms
    shift by log c, with the activations far below or beyond the floats.  The
    inputs' largest entry is below 1, so 2**power x is finite; at 2**1023
    (float64) and 2**127 (float32) the products of the first layers overflow
    unless their rows are carried scaled.
    """
    import cupy

    stack = vg.Stack.random(12, 8, activation=activation, sigma_b=0.0, residual=residual, dtype=dtype, seed=7)
    device_stack = on(cupy, stack)
    x = vg.random_inputs(stack, 3, seed=8)
    x = np.ldexp(x, -int(np.frexp(np.abs(x).max())[1]))  # largest |x| in [0.5, 1): exact
    unit_x, scaled_x = cupy.asarray(x), cupy.asarray(np.ldexp(x, power).astype(dtype))
    g = cupy.asarray(vg.random_inputs(stack, 3, seed=5))
    tolerance = 1e-10 if dtype == np.float64 else 2e-4
    unit = vg.gradient_profile(device_stack, unit_x, g).to_numpy()
    profile = vg.gradient_profile(device_stack, scaled_x, g).to_numpy()
    finite = np.isfinite(unit.log_weight_grad_norm)
    assert finite.any()
    np.testing.assert_array_equal(np.isfinite(profile.log_weight_grad_norm), finite)
    expected = unit.log_weight_grad_norm[finite] + power * math.log(2)
    assert np.all(np.abs(profile.log_weight_grad_norm[finite] - expected)
                  <= tolerance * np.maximum(1.0, np.abs(expected)))
    np.testing.assert_allclose(profile.log_grad_norm, unit.log_grad_norm, rtol=tolerance, atol=tolerance)
    np.testing.assert_array_equal(profile.dead, unit.dead)
    tangents = cupy.asarray(vg.random_inputs(stack, 3, seed=6))
    for product in (vg.jvp, vg.vjp):
        np.testing.assert_allclose(host(product(device_stack, scaled_x, tangents)),
                                   host(product(device_stack, unit_x, tangents)),
                                   rtol=tolerance, atol=tolerance)
    # forward returns true values: 2**power times the unit ones (rounded once where subnormal)
    expected_forward = np.ldexp(host(vg.forward(device_stack, unit_x)), power).astype(dtype)
    np.testing.assert_allclose(host(vg.forward(device_stack, scaled_x)), expected_forward, rtol=tolerance,
                               atol=2 * np.finfo(dtype).smallest_subnormal)


@requires_cuda
def test_post_norm_rows_beyond_2_512_are_scaled_before_layer_norm_squares_them():
    """relu + post-norm at sigma_w 1e160 (float64): y ~ 1e160 squared to inf in LN (was: a zero row
    and every log norm -inf).  The row check before LN (mirrors 428e4e0) gives the reference's
    profile; LN makes the outputs independent of the weights' scale c, so the input's gradient is
    that of the weights / 1e150 and each weight gradient is 1e150 times smaller."""
    import cupy

    x = np.random.default_rng(0).standard_normal((4, 8))
    huge = vg.Stack.random(3, 8, activation="relu", sigma_w=1e160, norm="post", seed=0)
    moderate = vg.Stack(huge.weights / 1e150, huge.biases, activation="relu", norm="post")
    high, low = (vg.gradient_profile(on(cupy, s), cupy.asarray(x)).to_numpy() for s in (huge, moderate))
    expected = vg.gradient_profile(huge, x, backend="numpy")
    for field in ("log_grad_norm", "log_weight_grad_norm"):
        assert np.all(np.isfinite(getattr(high, field))), field
        np.testing.assert_allclose(getattr(high, field), getattr(expected, field), rtol=1e-12, err_msg=field)
    np.testing.assert_allclose(high.log_grad_norm, low.log_grad_norm, rtol=1e-12)
    np.testing.assert_allclose(high.log_weight_grad_norm, low.log_weight_grad_norm - 150 * math.log(10),
                               rtol=1e-12)


@requires_cuda
def test_float32_layer_norm_of_constant_rows_beyond_the_floats():
    """A pre-norm residual float32 stack on constant rows of 1e36 (beyond 2**30: scaled) equals the
    same at 1e30: LN of a constant row is 0 whatever its scale (its factor is 0, not 0 * inf, and
    eps 4**-e is taken in double), and the true inv_std is 1 / sqrt(eps) (mirrors 428e4e0)."""
    import cupy

    pre = vg.Stack.random(3, 4, activation="relu", norm="pre", residual=1.0, dtype="float32", seed=0)
    device_stack = on(cupy, pre)
    inputs = {scale: cupy.asarray(np.full((2, 4), scale, np.float32)) for scale in (1e30, 1e36)}
    at = {scale: vg.gradient_profile(device_stack, x).to_numpy() for scale, x in inputs.items()}
    assert np.all(np.isfinite(at[1e36].log_grad_norm))
    np.testing.assert_allclose(at[1e36].log_grad_norm, at[1e30].log_grad_norm, rtol=1e-6)
    expected = vg.gradient_profile(pre, np.full((2, 4), 1e36, np.float32), backend="numpy")
    np.testing.assert_allclose(at[1e36].log_grad_norm, expected.log_grad_norm, rtol=1e-5)


# ---------------------------------------------------------------------------
# Without a GPU: a clear refusal
# ---------------------------------------------------------------------------

@pytest.mark.skipif(CUDA, reason="CuPy and a GPU are usable here")
def test_cuda_backend_is_refused_with_its_reason():
    with pytest.raises(ImportError, match="CuPy"):
        importlib.import_module("vgcore.backends.cuda_stack")
    stack = vg.Stack.random(3, 4, seed=0)
    x = vg.random_inputs(stack, 2, seed=1)
    with pytest.raises(ValueError, match=r"^backend: 'cuda' is not available here \(.*CuPy"):
        vg.forward(stack, x, backend="cuda")
    with pytest.raises(ValueError, match=r"^backend: 'cuda' is not available here"):
        vg.gradient_profile(stack, x, backend="cuda")
    with pytest.raises((ImportError, ValueError), match="CuPy"):
        vg.Stack.random(3, 4, seed=0, device="cuda")
