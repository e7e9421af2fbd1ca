"""The compiled CPU kernels against the NumPy reference, over generated stacks.

Every option of docs/ARCHITECTURE.md's layer is drawn (depth 1..60, width 1..48, batch
1..8, every activation, both dtypes, residual on/off, norm none/pre/post).
float64 agrees to 1e-10 relative, float32 to 1e-4 where the problem allows
(see conftest.assert_matches_reference).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_matches_reference, assert_profile_matches_reference, references, stack_cases
from hypothesis import given
from hypothesis import strategies as st
from threadpoolctl import threadpool_limits

import vgcore as vg
from vgcore._activations import ACTIVATION_CODES, ACTIVATIONS, activation
from vgcore._ext import _kernels, _spectra
from vgcore.backends import _threads, cpu_stack


@given(stack_cases())
def test_forward_matches_reference(case):
    stack, x = case
    low, high = references(vg.forward, stack, x)
    result = vg.forward(stack, x, backend="cpu")
    assert result.dtype == stack.dtype
    assert_matches_reference(result, high, low, dtype=stack.dtype, relative_to="max")


@given(stack_cases())
def test_gradient_profile_matches_reference(case):
    stack, x = case
    g = vg._api.default_grad_output(stack, x.shape[0])
    assert_profile_matches_reference(vg.gradient_profile(stack, x, g, backend="cpu"), stack, x, g)


@given(stack_cases(max_depth=30), st.integers(1, 5), st.booleans())
def test_jvp_and_vjp_match_reference(case, k, shared):
    stack, x = case
    rng = np.random.default_rng(k)
    shape = (k, stack.width) if shared else (x.shape[0], k, stack.width)
    vectors = rng.standard_normal(shape).astype(stack.dtype)
    for function in (vg.jvp, vg.vjp):
        result = function(stack, x, vectors, backend="cpu")
        assert result.shape == (x.shape[0], k, stack.width)
        low, high = references(function, stack, x, vectors)
        assert_matches_reference(result, high, low, dtype=stack.dtype, relative_to="max")


@given(stack_cases(max_depth=20, max_width=24, max_batch=3))
def test_jacobian_matches_reference(case):
    stack, x = case
    low, high = references(vg.jacobian, stack, x)
    result = vg.jacobian(stack, x, backend="cpu")
    assert result.shape == (x.shape[0], stack.width, stack.width)
    assert_matches_reference(result, high, low, dtype=stack.dtype, relative_to="max")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_header_matches_numpy_twin(name, dtype):
    """csrc/vg_activations.h against vgcore._activations, over the whole range incl. extremes."""
    h = np.concatenate([
        np.linspace(-40, 40, 20001), [0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 88.0, -88.0, 700.0, -700.0],
        np.finfo(dtype).max * np.array([1.0, -1.0]),
    ]).astype(dtype)
    value, derivative = np.empty_like(h), np.empty_like(h)
    _kernels.activation_values(ACTIVATION_CODES[name], h, value, derivative)
    assert np.isfinite(value[np.isfinite(h) & (np.abs(h) < 1e4)]).all()
    assert not np.isnan(value).any() and not np.isnan(derivative).any()
    expected_value, expected_derivative = activation(name, h.astype(np.float64))
    ulps = 8 * np.finfo(dtype).eps
    tiny = np.finfo(dtype).tiny
    for got, want in ((value, expected_value), (derivative, expected_derivative)):
        # compare where the true value is representable in dtype (selu(fmax) overflows float32)
        finite = (np.abs(want) < np.finfo(dtype).max) & (np.abs(want) > tiny * 1e3)
        relative = np.abs(got[finite] - want[finite]) / np.abs(want[finite])
        # gelu and silu subtract nearly equal terms near their minima; 1e3 ulps there
        limit = ulps * (1e3 if name in ("gelu", "silu", "elu", "selu", "softplus") else 1)
        small = np.abs(want[finite]) < 1e-3
        assert np.all((relative <= limit) | small & (np.abs(got[finite] - want[finite]) <= ulps))


@given(stack_cases(max_depth=40, max_width=40, max_batch=8, dtypes=[np.float64]))
def test_results_do_not_depend_on_thread_count(case):
    stack, x = case
    g = vg._api.default_grad_output(stack, x.shape[0])
    tangents = np.random.default_rng(0).standard_normal((2, stack.width))
    results = []
    for threads in (1, 2):
        with threadpool_limits(limits=threads, user_api="openmp"):
            profile = vg.gradient_profile(stack, x, g, backend="cpu")
            results.append([vg.forward(stack, x), profile.log_grad_norm, profile.log_weight_grad_norm,
                            profile.saturation, profile.dead, vg.jvp(stack, x, tangents),
                            vg.vjp(stack, x, tangents), vg.jacobian(stack, x[:1])])
    for one, two in zip(*results, strict=True):
        np.testing.assert_array_equal(one, two)  # bitwise: the partition ignores the thread count


def test_thread_count_is_honoured():
    with threadpool_limits(limits=1, user_api="openmp"):
        assert _threads.n_threads() == 1
    if _kernels.has_openmp():
        with threadpool_limits(limits=2, user_api="openmp"):
            assert _threads.n_threads() == 2


@pytest.mark.parametrize("partitions", [1, 2, 3, 5])
@pytest.mark.parametrize("batch", [1, 2, 3, 7])
@pytest.mark.parametrize("k", [1, 2, 6])
def test_work_items_cover_every_vector_once(partitions, batch, k):
    """JVP / VJP work partition: every (sample, vector) row is handled exactly once."""
    stack = vg.Stack.random(3, 5, activation="linear", seed=1)
    x = vg.random_inputs(stack, batch, seed=2)
    vectors = np.random.default_rng(3).standard_normal((batch, k, 5))
    items = _kernels.work_items(batch, k, partitions)
    assert items >= min(partitions, batch * k)  # every partition gets work while there is enough
    for kernel, public in ((_kernels.jvp, vg.jvp), (_kernels.vjp, vg.vjp)):
        out = vectors.copy()
        kernel(stack.weights, stack.biases, x, 0, False, 0.0, 0, out, items, 2)
        np.testing.assert_allclose(out, public(stack, x, vectors, backend="numpy"), rtol=1e-12)


@given(st.lists(stack_cases(max_depth=12, max_width=16, max_batch=4), min_size=1, max_size=6))
def test_batched_profiles_equal_one_by_one(cases):
    """The sweep's chunk runner: stacks of mixed shapes, activations, residuals and norms."""
    stacks = [stack for stack, _ in cases]
    xs = [x for _, x in cases]
    gs = [vg._api.default_grad_output(stack, x.shape[0]) for stack, x in cases]
    batched = cpu_stack.gradient_profiles([s.bind(x) for s, x in zip(stacks, xs, strict=True)], gs)
    assert len(batched) == len(stacks)
    for stack, x, g, result in zip(stacks, xs, gs, batched, strict=True):
        single = cpu_stack.gradient_profile(stack.bind(x), g, None)
        for key in ("log_grad_norm", "log_weight_grad_norm", "saturation", "dead"):
            np.testing.assert_allclose(result[key], single[key], rtol=1e-12, atol=0)


@given(stack_cases(max_depth=40, max_width=24), st.one_of(st.integers(1, 45), st.just("auto")))
def test_segmented_profile_is_bitwise_the_full_profile(case, segment):
    """Recomputing each segment's forward pass gives the very same numbers as keeping them all."""
    stack, x = case
    full = vg.gradient_profile(stack, x, backend="cpu")
    segmented = vg.gradient_profile(stack, x, backend="cpu", segment=segment)
    for field in ("log_grad_norm", "log_weight_grad_norm", "saturation", "dead"):
        np.testing.assert_array_equal(getattr(segmented, field), getattr(full, field))


@pytest.mark.parametrize(("segment", "error"), [(0, ValueError), (-3, ValueError), ("half", ValueError),
                                                (2.5, TypeError), (True, TypeError)])
def test_bad_segment_is_refused(segment, error):
    stack = vg.Stack.random(4, 3, seed=0)
    with pytest.raises(error, match=r"^segment:"):
        vg.gradient_profile(stack, vg.random_inputs(stack, 2), segment=segment)


# ---------------------------------------------------------------------------
# Workspaces that cannot be allocated
# ---------------------------------------------------------------------------

def _arrays(result) -> list[np.ndarray]:
    if isinstance(result, np.ndarray):
        return [result]
    return [result.log_grad_norm, result.log_weight_grad_norm, result.saturation, result.dead]


# (the kernel the error names, parallel regions that still allocate, the public call): every
# parallel region of every kernel, reached through the public API
FAILING_REGIONS = [
    ("forward", 0, lambda s, x: vg.forward(s, x, backend="cpu")),
    ("gradient_profile", 0, lambda s, x: vg.gradient_profile(s, x, backend="cpu")),
    ("gradient_profile", 1, lambda s, x: vg.gradient_profile(s, x, backend="cpu")),  # weight norms
    ("gradient_profile_segmented", 0, lambda s, x: vg.gradient_profile(s, x, backend="cpu", segment=2)),
    ("gradient_profile_segmented", 1, lambda s, x: vg.gradient_profile(s, x, backend="cpu", segment=2)),
    ("gradient_profile_segmented", 2, lambda s, x: vg.gradient_profile(s, x, backend="cpu", segment=2)),
    ("gradient_profile_segmented", 4, lambda s, x: vg.gradient_profile(s, x, backend="cpu", segment=2)),
    ("jvp", 0, lambda s, x: vg.jvp(s, x, np.ones((2, s.width)), backend="cpu")),
    ("vjp", 0, lambda s, x: vg.vjp(s, x, np.ones((2, s.width)), backend="cpu")),
    ("vjp", 0, lambda s, x: vg.jacobian(s, x, backend="cpu")),
    ("vjp", 0, lambda s, x: vg.singular_values(s, x, backend="cpu")),
    ("lyapunov_log_growth", 0, lambda s, x: vg.lyapunov_exponents(s, x, 2, backend="cpu")),
]


@pytest.fixture
def fail_allocations():
    """fail_allocations(after): workspace allocations fail once ``after`` parallel regions have run
    (None: never); always switched off after the test."""
    def switch(after: int | None) -> None:
        for module in (_kernels, _spectra):
            module._fail_allocations_for_tests(after is not None, after or 0)

    yield switch
    switch(None)


@pytest.mark.parametrize(("kernel", "after", "call"), FAILING_REGIONS)
def test_failed_workspace_allocation_raises_memory_error(fail_allocations, kernel, after, call):
    """A thread's workspace that cannot be allocated raises MemoryError naming the kernel, never crashes."""
    stack = vg.Stack.random(5, 4, norm="pre", residual=0.5, seed=0)  # 3 segments of 2 layers
    x = vg.random_inputs(stack, 3, seed=1)
    expected = _arrays(call(stack, x))
    fail_allocations(after)
    message = rf"^{kernel}: could not allocate \d+ bytes of workspace per thread$"
    with pytest.raises(MemoryError, match=message):
        call(stack, x)
    fail_allocations(None)  # off again: the failed call left nothing behind
    for got, want in zip(_arrays(call(stack, x)), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_workspace_beyond_the_address_space_raises_memory_error(tmp_path):
    """A real malloc failure: a VJP whose per-thread workspace is far over the limit.

    The child caps its address space 2 GiB above what it uses, so malloc
    returns NULL for the ~2.5 L B / P values each of the P work items keeps
    (~80 GB with P = 256 partitions), while the call's own arrays (weights L,
    inputs and cotangents B values: 8 MB each) are small.
    """
    import subprocess
    import sys

    from conftest import child_environment

    if not sys.platform.startswith("linux"):
        pytest.skip("address-space limit read from /proc")
    script = """
import resource
import numpy as np
import vgcore as vg
depth = batch = 10**6
stack = vg.Stack.random(depth, 1, seed=0)
x = vg.random_inputs(stack, batch, seed=1)
small = vg.Stack.random(2, 1, seed=0)
vg.vjp(small, x[:4], np.ones((1, 1)), backend="cpu")  # threads and BLAS buffers in place
size = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (size + 2**31, resource.getrlimit(resource.RLIMIT_AS)[1]))
# past vg.vjp's own estimate of the memory it needs (which refuses this call naming x): the kernel's
# malloc is what is under test
import vgcore._validation
vgcore._validation.available_memory = lambda: 2**62
try:
    vg.vjp(stack, x, np.ones((1, 1)), backend="cpu")
except MemoryError as error:
    print("MemoryError:", error)
"""
    result = subprocess.run([sys.executable, "-c", script], env=child_environment(), cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("MemoryError: vjp: could not allocate"), result.stdout
