"""Issue 17: exact where promised, hostile input refused (one regression test per defect).

Defects 6 (command line) and 7 (store checksums, full disk) have their tests in
tests/test_cli.py and tests/test_store.py; the fuzz test is tests/test_fuzz.py.
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from conftest import BACKENDS, stack_cases
from hypothesis import given, settings
from hypothesis import strategies as st

import vgcore as vg
from vgcore import _validation as check
from vgcore import cli, theory
from vgcore.sweep import normalize_seeds, sweep

# --------------------------------------------------------------------------
# Defect 1: log norms exact for any finite, non-zero scale of grad_output


@pytest.mark.parametrize("backend", BACKENDS)
def test_defect1_log_norms_of_a_scaled_cotangent(backend):
    stack = vg.Stack.random(3, 4, seed=0)
    x = vg.random_inputs(stack, 1, seed=1)
    g = vg.random_inputs(stack, 1, seed=2)
    unit = vg.gradient_profile(stack, x, g, backend=backend)
    for scale in (1e-170, 1e160, 1e-300, 1e300):
        profile = vg.gradient_profile(stack, x, g * scale, backend=backend)
        expected = unit.log_grad_norm + math.log(scale)
        assert np.all(np.isfinite(profile.log_grad_norm)), (scale, profile.log_grad_norm)
        np.testing.assert_allclose(profile.log_grad_norm, expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(profile.log_weight_grad_norm, unit.log_weight_grad_norm + math.log(scale),
                                   rtol=1e-12, atol=1e-12)
    # the figure: about -390.7 per layer for 1e-170
    tiny = vg.gradient_profile(stack, x, g * 1e-170, backend=backend).log_grad_norm
    assert np.all(np.abs(tiny + 390.6) < 0.5)


#: float64 spans 1e-300 .. 1e300; a float32 cotangent only what float32 holds (with its n entries).
SCALE_EXPONENTS = {np.float64: (-300, 300), np.float32: (-30, 30)}


@settings(max_examples=40)
@given(case=stack_cases(max_depth=12, max_width=8, max_batch=3), data=st.data())
def test_scaled_cotangent_property_log_norms_shift_by_log_scale(case, data):
    """Property: profile(g * c) = log(c) + profile(g), every backend, both dtypes, c in 1e-300..1e300."""
    stack, x = case
    dtype = stack.dtype.type
    low, high = SCALE_EXPONENTS[dtype]
    exponent = data.draw(st.floats(low, high), label="log10 scale")
    scale = 10.0 ** exponent
    g = vg.random_inputs(stack, x.shape[0], seed=3).astype(np.float64)
    scaled = (g * scale).astype(dtype)
    # the cotangent as the backends see it: its own rounding is part of the input
    unit_g = (scaled.astype(np.float64) / scale).astype(dtype) if dtype == np.float64 else None
    tolerance = 1e-10 if dtype == np.float64 else 2e-5
    for backend in BACKENDS:
        reference_g = g.astype(dtype) if unit_g is None else unit_g
        unit = vg.gradient_profile(stack, x, reference_g, backend=backend)
        profile = vg.gradient_profile(stack, x, scaled, backend=backend)
        for field in ("log_grad_norm", "log_weight_grad_norm"):
            expected = getattr(unit, field) + math.log(scale)
            actual = getattr(profile, field)
            finite = np.isfinite(getattr(unit, field))
            np.testing.assert_array_equal(np.isfinite(actual), finite, err_msg=f"{backend} {field}")
            assert np.all(np.abs(actual[finite] - expected[finite])
                          <= tolerance * np.maximum(1.0, np.abs(expected[finite]))), (backend, field)


# --------------------------------------------------------------------------
# Defect 4: out= aliasing the caller's array through a conversion


def test_defect4_out_aliasing_converted_input():
    stack = vg.Stack(0.5 * np.eye(3)[None], activation="tanh")
    buf = np.arange(9.0).reshape(3, 3)
    before = buf.copy()
    with pytest.raises(ValueError, match=r"^out: overlaps"):
        vg.forward(stack, buf.T, out=buf)  # buf.T is converted to a contiguous copy
    with pytest.raises(ValueError, match=r"^out: overlaps"):
        vg.forward(stack, buf[::-1], out=buf)  # a reversed view: also copied
    np.testing.assert_array_equal(buf, before)
    # jvp / vjp: the tangents given as a view of out
    out = np.zeros((3, 1, 3))
    with pytest.raises(ValueError, match=r"^out: overlaps"):
        vg.jvp(stack, np.ones((3, 3)), out[:, :, ::-1], out=out)
    with pytest.raises(ValueError, match=r"^out: overlaps"):
        vg.vjp(stack, np.ones((3, 3)), out.transpose(0, 1, 2)[::-1], out=out)
    # jacobian: x is a strided view of out
    jac = np.zeros((3, 3, 3))
    with pytest.raises(ValueError, match=r"^out: overlaps"):
        vg.jacobian(stack, jac[:, :, 0], out=jac)
    # float32 input to a float64 stack: converted by a cast, yet still the caller's memory
    raw = np.zeros(18)
    with pytest.raises(ValueError, match=r"^out: overlaps"):
        vg.forward(stack, raw.view(np.float32)[:9].reshape(3, 3), out=raw[:9].reshape(3, 3))
    # a separate out still works
    separate = np.empty((3, 3))
    assert vg.forward(stack, buf.T, out=separate) is separate


# --------------------------------------------------------------------------
# Defect 5: seeds bounded and validated before any work


def test_defect5_seeds_out_of_range_or_unbounded_refused_before_work(tmp_path):
    store = tmp_path / "s"
    for seeds, message in [([2**63], r"seeds: each seed must satisfy 0 <= seed < 2\*\*63"),
                           ([-1], r"seeds: each seed must satisfy"),
                           (10**9, r"seeds: a count must be between 1 and 1,000,000"),
                           (2**63, r"seeds: a count"),
                           ({1, 2}, r"seeds: .*a set has no order"),
                           ([1.0], r"seeds: expected ints"),
                           ([True], r"seeds: expected ints"),
                           ((i for i in range(10**12)), r"seeds: at most 1,000,000 seeds")]:
        with pytest.raises(ValueError, match=message):
            sweep({"depth": 2, "width": 2}, seeds=seeds, store=store, progress=False, backend="numpy")
        assert not store.exists(), "the refused sweep created its store"
    assert normalize_seeds(np.array([2**63 - 1], np.uint64)) == [2**63 - 1]
    result = sweep({"depth": 2, "width": 2}, seeds=[2**63 - 1], batch=2, progress=False, backend="numpy")
    assert result.frame["seed"].tolist() == [2**63 - 1]


# --------------------------------------------------------------------------
# Defect 5, continued: a recurrent model's steps and warmup bounded before any work
# (steps=10**12 or warmup=10**12 ran for ever in kernels that do not see Ctrl-C)

_TIME_CALLS = {
    "forward": lambda model, x, **kw: vg.forward(model, x, **kw),
    "gradient_profile": lambda model, x, **kw: vg.gradient_profile(model, x, **kw),
    "jvp": lambda model, x, **kw: vg.jvp(model, x, np.eye(model.state_width)[:1], **kw),
    "vjp": lambda model, x, **kw: vg.vjp(model, x, np.eye(model.state_width)[:1], **kw),
    "jacobian": lambda model, x, **kw: vg.jacobian(model, x, **kw),
    "singular_values": lambda model, x, **kw: vg.singular_values(model, x, **kw),
    "lyapunov_exponents": lambda model, x, **kw: vg.lyapunov_exponents(model, x, **kw),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("function", sorted(_TIME_CALLS))
def test_defect5_unbounded_recurrent_steps_and_warmup_refused_before_work(function, backend):
    from vgcore._recurrent import MAX_STEPS

    assert MAX_STEPS == 10**8
    model = vg.Recurrent.random(3, cell="lstm", seed=0)
    x = np.random.default_rng(1).standard_normal((2, model.state_width))
    call = _TIME_CALLS[function]
    for steps in (10**12, 2**63, MAX_STEPS + 1):
        with pytest.raises(ValueError, match=rf"^steps: {steps:,} time steps is above the 100,000,000 one "
                                             r"call may run \(vgcore._recurrent.MAX_STEPS"):
            call(model, x, steps=steps, backend=backend)
    if function == "lyapunov_exponents":
        for warmup in (10**12, MAX_STEPS - 9):
            with pytest.raises(ValueError, match=rf"^warmup: steps \+ warmup = 10 \+ {warmup:,} time steps "
                                                 r"is above the 100,000,000"):
                call(model, x, steps=10, warmup=warmup, backend=backend)
        with pytest.raises(ValueError, match=r"^steps: 1,000,000,000,000 time steps \(\+ 5 warm-up\)"):
            call(model, x, steps=10**12, warmup=5, backend=backend)
        assert np.all(np.isfinite(call(model, x, steps=10, warmup=10, backend=backend)))


def test_defect5_recurrent_steps_and_warmup_bounds_by_work_and_their_edges(tmp_path, capsys):
    from vgcore._recurrent import MAX_STEPS, MAX_WORK, step_work

    assert MAX_WORK == 10**16
    # the edges themselves are accepted (bind does no work)
    small = vg.Recurrent.random(2, seed=0)
    assert small.bind(np.zeros((1, 2)), steps=MAX_STEPS).depth == MAX_STEPS
    assert small.bind(np.zeros((1, 2)), steps=MAX_STEPS - 7, warmup=7).warmup == 7
    # T comes from the inputs: they are named (a broadcast view: refused before any copy)
    driven = vg.Recurrent.random(2, input_width=1, seed=0)
    long_inputs = np.broadcast_to(np.zeros((1, 1, 1)), (1, MAX_STEPS + 1, 1))
    with pytest.raises(ValueError, match=r"^inputs: 100,000,001 time steps is above the 100,000,000"):
        driven.bind(np.zeros((1, 2)), inputs=long_inputs)
    # (steps + warmup) B G n (n + m) multiply-adds above 1e16: steps named, or warmup where steps
    # alone is within the bound
    model = vg.Recurrent.random(512, seed=0)
    x = np.zeros((800, 512))
    assert step_work(MAX_STEPS, 800, "rnn", 512, 0) > MAX_WORK >= step_work(10**7, 800, "rnn", 512, 0)
    with pytest.raises(ValueError, match=r"^steps: 100,000,000 time steps of 800 samples through the rnn "
                                         r"cell of width 512 is about 2.1e16 multiply-adds, above the 1e16 "
                                         r"one call may run \(vgcore._recurrent.MAX_WORK.*split the batch$"):
        vg.forward(model, x, steps=MAX_STEPS)
    with pytest.raises(ValueError, match=r"^warmup: steps \+ warmup = 10,000,000 \+ 90,000,000 time steps of "
                                         r"800 samples .*use fewer warm-up steps or split the batch$"):
        vg.lyapunov_exponents(model, x, 1, steps=10**7, warmup=9 * 10**7)
    assert model.bind(x[:200], steps=MAX_STEPS).batch == 200  # a quarter of the batch is within it
    # a sweep's recurrent rows (depth is T) are refused before any work, naming the grid's depth;
    # the command line gives one line and status 2
    store = tmp_path / "s"
    with pytest.raises(ValueError, match=r"^grid\['depth'\]: 1,000,000,000,000 time steps is above the "
                                         r"100,000,000"):
        sweep({"depth": 10**12, "width": 2, "cell": ["dense", "rnn"]}, store=store, progress=False)
    with pytest.raises(ValueError, match=r"^grid\['depth'\], grid\['width'\], batch: 100,000,000 time "
                                         r"steps of 64 samples through the lstm cell of width 1024 is about "
                                         r"2.7e16"):
        sweep({"depth": 10**8, "width": [4, 1024], "cell": ["gru", "lstm"]}, batch=64, store=store,
              progress=False)
    assert not store.exists(), "the refused sweep created its store"
    for argv, flags in [(["--depth", "1000000000000", "--width", "2", "--cell", "rnn"], "--depth"),
                        (["--depth", "100000000", "--width", "1024", "--cell", "lstm", "--batch", "64"],
                         "--depth/--width/--batch")]:
        assert cli.main(["sweep", *argv, "--backend", "numpy", "--no-progress"]) == 2
        captured = capsys.readouterr()
        assert captured.err.count("\n") == 1 and captured.out == "", captured
        assert captured.err.startswith(f"vgcore sweep: error: argument {flags}: grid['depth']"), captured.err
    # a recurrent sweep within the bounds runs
    result = sweep({"depth": 3, "width": 2, "cell": "rnn"}, batch=2, seeds=1, progress=False, backend="numpy")
    assert len(result) == 1


# --------------------------------------------------------------------------
# Defect 8: errors name their argument; no inf from finite arguments; memory


def test_defect8_errors_name_their_argument():
    stack = vg.Stack.random(3, 4, init="uniform", sigma_w=1e308, seed=0)  # was OverflowError
    assert np.all(np.isfinite(stack.weights))
    with pytest.raises(ValueError, match=r"^sigma_w: .*beyond the largest float64"):
        vg.Stack.random(50, 1, sigma_w=1.7e308, seed=0)
    with pytest.raises(ValueError, match=r"^sigma_w: .*beyond the largest float32"):
        vg.Stack.random(3, 4, sigma_w=1e39, dtype="float32", seed=0)
    with pytest.raises(ValueError, match=r"^sigma_b: .*beyond the largest float32"):
        vg.Stack.random(3, 4, sigma_b=1e39, dtype="float32", seed=0)
    with pytest.raises(ValueError, match=r"^depth, width: .*needs about .* of memory"):
        vg.Stack.random(10**6, 10**4)
    with pytest.raises(ValueError, match=r"^batch: .*needs about .* of memory"):
        vg.random_inputs(stack, 10**14)
    with pytest.raises(ValueError, match=r"^scale: .*beyond the largest float64"):
        vg.random_inputs(stack, 50, scale=1.7e308, seed=0)
    with pytest.raises(ValueError, match=r"^sigma_w: mean-field theory needs"):
        theory.chi1("sigmoid", 1e308, 0)
    with pytest.raises(ValueError, match=r"^sigma_b: mean-field theory needs"):
        theory.fixed_point("tanh", 1.0, 1e200)
    with pytest.raises(ValueError, match=r"^sigma_w: mean-field theory needs"):
        theory.depth_scales("tanh", 1e-200, 0)
    # a stack outside theory's range still works; its chi_theory is NaN ("theory does not apply")
    assert math.isnan(vg.Stack.random(2, 4, sigma_w=1e200, seed=0).chi_theory)


def test_defect8_computations_beyond_memory_are_refused_naming_x(monkeypatch):
    """A profile, VJP or Jacobian whose workspaces cannot fit is refused before any work (was
    NumPy's bare MemoryError, "Unable to allocate 191. GiB ..."), and the message says what fits."""
    monkeypatch.setattr(check, "available_memory", lambda: 2**24)  # 16 MiB
    stack = vg.Stack.random(100, 16, seed=0)
    x = vg.random_inputs(stack, 2000, seed=1)
    with pytest.raises(ValueError, match=r"^x: the gradient profile of 2,000 samples through 100 layers .*"
                                         r"segment='auto' keeps about 21.* needs about 49.3 MiB"):
        vg.gradient_profile(stack, x)
    assert np.all(np.isfinite(vg.gradient_profile(stack, x, segment="auto").log_grad_norm))
    with pytest.raises(ValueError, match=r"^x: the vjp of 4 vectors for each of 2,000 samples"):
        vg.vjp(stack, x, np.zeros((2000, 4, 16)))
    wide = vg.Stack.random(2, 256, seed=0)
    with pytest.raises(ValueError, match=r"^x: the Jacobians of 100 samples of width 256"):
        vg.jacobian(wide, vg.random_inputs(wide, 100, seed=1))
    with pytest.raises(ValueError, match=r"^x: the singular values of the Jacobians of 100 samples"):
        vg.singular_values(wide, vg.random_inputs(wide, 100, seed=1))


@pytest.mark.parametrize("sigma_w", [1e-100, 1e-143, 1e-150])
def test_fixed_points_far_below_1e_64_converge_to_the_closed_form(sigma_w):
    """Campaign finding (2026-11-30): fixed_point / c_map("sigmoid", sigma_w=1e-143) raised SciPy's
    RuntimeError "Failed to converge after 2000 iterations", and sigma_w=1e-150 gave q* off by 2x.
    Near q = 0 the map is F(q) = sigma_b^2 + sigma_w^2 (phi(0)^2 + phi'(0)^2 q) + O(q^2), so
    q* = (sigma_b^2 + sigma_w^2 phi(0)^2) / (1 - sigma_w^2 phi'(0)^2) to relative O(q*)."""
    np.testing.assert_allclose(theory.fixed_point("sigmoid", sigma_w, 0.0), sigma_w**2 / 4, rtol=1e-12)
    assert math.isfinite(theory.c_map("sigmoid", 1e-186, sigma_w, 0.0))
    np.testing.assert_allclose(theory.fixed_point("tanh", 0.5, sigma_w * 1e-6),
                               (sigma_w * 1e-6) ** 2 / (1 - 0.25), rtol=1e-12)
    slope = 4 / math.pi  # erf'(0)^2
    np.testing.assert_allclose(theory.fixed_point("erf", 0.5, sigma_w * 1e-6),
                               (sigma_w * 1e-6) ** 2 / (1 - 0.25 * slope), rtol=1e-12)


def test_sweep_rows_outside_theory_range_have_nan_chi_theory():
    """Campaign finding (2026-11-30): a sweep with sigma_w=1e250 raised theory's "sigma_w: ..." error,
    which names no argument of sweep; as Stack.chi_theory, theory just does not apply there."""
    result = sweep({"depth": [1], "width": [2], "sigma_w": [1e250, 1.0]}, batch=3, progress=False,
                   backend="numpy")
    frame = result.frame.set_index("sigma_w")
    assert math.isnan(frame.loc[1e250, "chi_theory"])
    assert frame.loc[1.0, "chi_theory"] == pytest.approx(theory.chi1("tanh", 1.0, 0.0))


def test_defect8_theory_exact_for_tiny_sigma_w():
    # was "math domain error": chi_1 - 1 rounds to -1, so log1p(-1) = -inf
    xi_q, xi_c = theory.depth_scales("leaky_relu", 1e-8, 0)
    slope = 1e-16 * (1 + 0.01**2) / 2  # homogeneous: F'(q) = chi_1 = sigma_w^2 (1 + a^2) / 2
    assert xi_q == pytest.approx(-1 / math.log(slope), rel=1e-12)
    assert xi_c == pytest.approx(-1 / math.log(slope), rel=1e-12)
    assert theory.chi1("leaky_relu", 1e-8, 0) == pytest.approx(slope, rel=1e-12)
    assert theory.chi1("relu", 1e-150, 0) == pytest.approx(0.5e-300, rel=1e-12)
    # tanh, tiny sigma_w: q* = 0, chi_1 = sigma_w^2 tanh'(0)^2
    assert theory.chi1("tanh", 1e-100, 0) == pytest.approx(1e-200, rel=1e-12)
    # a fixed point far below Brent's bracket (was RuntimeError: failed to converge)
    assert theory.fixed_point("sigmoid", 1e-140, 0) == pytest.approx(1e-280 * 0.2933, rel=1e-2)


def test_defect8_stack_random_peak_memory_is_the_weights_plus_a_block(monkeypatch):
    import vgcore._stack as stack_module

    # a 512 KiB block against 8 MiB of weights (the default: 8 MiB blocks, weights up to 100s of GiB)
    monkeypatch.setattr(stack_module, "_DRAW_BLOCK_VALUES", 2**16)
    depth, width = 64, 128
    weights_bytes = depth * width * width * 8
    for init in ("gaussian", "uniform", "orthogonal"):
        tracemalloc.start()
        try:
            stack = vg.Stack.random(depth, width, init=init, seed=0)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert stack.weights.nbytes == weights_bytes
        assert peak < 1.25 * weights_bytes, (init, peak / weights_bytes)


def test_defect8_blockwise_draw_gives_the_whole_array_draw():
    """The block-wise draw is the old single (L, n, n) draw, value for value."""
    import vgcore._stack as stack_module

    for init in ("gaussian", "uniform", "orthogonal"):
        for dtype in ("float32", "float64"):
            rng = np.random.default_rng(11)
            if init == "gaussian":
                expected = rng.standard_normal((9, 5, 5)) * (1.3 / math.sqrt(5))
            elif init == "uniform":
                bound = 1.3 * math.sqrt(3 / 5)
                expected = rng.uniform(-bound, bound, size=(9, 5, 5))
            else:
                q, r = np.linalg.qr(rng.standard_normal((9, 5, 5)))
                signs = np.sign(np.diagonal(r, axis1=1, axis2=2))
                expected = 1.3 * q * signs[:, None, :]
            biases = 0.2 * rng.standard_normal((9, 5))
            original = stack_module._DRAW_BLOCK_VALUES
            stack_module._DRAW_BLOCK_VALUES = 50  # two layers per block: several blocks
            try:
                stack = vg.Stack.random(9, 5, init=init, sigma_w=1.3, sigma_b=0.2, dtype=dtype, seed=11)
            finally:
                stack_module._DRAW_BLOCK_VALUES = original
            np.testing.assert_array_equal(stack.weights, expected.astype(dtype))
            np.testing.assert_array_equal(stack.biases, biases.astype(dtype))


# --------------------------------------------------------------------------
# Defect 9: the smaller ones


def test_defect9_float16_and_big_endian_arrays_are_cast():
    weights = np.full((2, 3, 3), 0.5, dtype=">f8")
    biases = np.full((2, 3), 0.25, dtype=np.float16)
    stack = vg.Stack(weights, biases, activation="tanh")
    assert stack.weights.dtype == np.float64 and stack.biases.dtype == np.float64
    np.testing.assert_array_equal(stack.biases, 0.25)
    x = np.ones((2, 3), dtype=">f4")
    np.testing.assert_array_equal(vg.forward(stack, x), vg.forward(stack, np.ones((2, 3))))
    with pytest.raises(ValueError, match=r"^biases: values overflow float32"):
        vg.Stack(np.ones((1, 2, 2), np.float32), np.full((1, 2), 1e300), activation="tanh")


@pytest.mark.parametrize("backend", BACKENDS)
def test_defect9_singular_values_of_an_overflowed_jacobian_name_x(backend):
    stack = vg.Stack.random(40, 4, activation="linear", sigma_w=1e10, seed=0)
    x = vg.random_inputs(stack, 2, seed=1)
    with np.errstate(all="ignore"), pytest.raises(ValueError, match=r"^x: the Jacobian .* beyond float64"):
        vg.singular_values(stack, x, backend=backend)
    assert np.all(np.isfinite(vg.lyapunov_exponents(stack, x, backend=backend)))


def test_defect9_plot_where_given_twice_is_refused(tmp_path, capsys):
    store = tmp_path / "s"
    sweep({"depth": [2, 3], "width": 2}, batch=2, store=store, progress=False, backend="numpy")
    code = cli.main(["plot", str(store), "--kind", "flow", "-o", str(tmp_path / "x.png"),
                     "--where", "depth=2", "--where", "depth=3"])
    assert code == 2
    assert "argument --where: 'depth' is given twice" in capsys.readouterr().err


# --------------------------------------------------------------------------
# Defect 2: weight-gradient norms carried in log space


def _linear_orthogonal(depth: int, sigma: float):
    stack = vg.Stack.random(depth, 4, activation="linear", init="orthogonal", sigma_w=sigma, seed=0)
    x, g = vg.random_inputs(stack, 1, seed=1), vg.random_inputs(stack, 1, seed=2)
    # x_l = sigma^l Q_l..Q_1 x_0 and the cotangent at layer l's output has norm sigma^(L-l) |g|, so
    # |dL/dW_l|_F = |g_l| |x_(l-1)| = sigma^(L-1) |g| |x_0| for every layer (one sample: a rank-one gradient)
    weight = (depth - 1) * math.log(sigma) + math.log(np.linalg.norm(g)) + math.log(np.linalg.norm(x))
    grad = (depth - np.arange(depth + 1)) * math.log(sigma) + math.log(np.linalg.norm(g))
    return stack, x, g, weight, grad


def test_defect2_weight_gradient_norms_exact_at_depth_1e5():
    """Layer inputs fall to 1e-218 (squares far below the floats): every norm finite and exact."""
    stack, x, g, weight, grad = _linear_orthogonal(100_000, 0.995)
    profile = vg.gradient_profile(stack, x, g, backend="cpu")
    assert np.all(np.isfinite(profile.log_weight_grad_norm))
    np.testing.assert_allclose(profile.log_weight_grad_norm, weight, rtol=1e-10)
    np.testing.assert_allclose(profile.log_grad_norm[0], grad, rtol=1e-10, atol=1e-9)


def test_defect2_reference_and_cpu_agree_with_the_closed_form_in_log_space():
    stack, x, g, weight, grad = _linear_orthogonal(10_000, 0.95)  # inputs down to 1e-223
    for backend in BACKENDS:
        profile = vg.gradient_profile(stack, x, g, backend=backend)
        np.testing.assert_allclose(profile.log_weight_grad_norm, weight, rtol=1e-10)
        np.testing.assert_allclose(profile.log_grad_norm[0], grad, rtol=1e-10, atol=1e-9)
    # the example: tiny weights, inputs below 1e-154 after ~20 layers (was 19 of 40 layers -inf)
    small = vg.Stack.random(40, 4, sigma_w=1e-8, seed=0)
    inputs = vg.random_inputs(small, 3, seed=1)
    cpu, reference = (vg.gradient_profile(small, inputs, backend=b) for b in ("cpu", "numpy"))
    assert np.all(np.isfinite(cpu.log_weight_grad_norm))
    np.testing.assert_allclose(cpu.log_weight_grad_norm, reference.log_weight_grad_norm, rtol=1e-10)


def test_defect2_weight_gradient_norms_finite_when_the_forward_pass_underflows():
    """The issue's example: tanh, width 4, depth 1e5, whose activations fall as e^(-0.135 l).

    They pass 2**-1074 after ~5,500 layers; the scaled forward pass keeps them
    (was: 94,535 of 100,000 weight-gradient norms -inf).
    """
    stack = vg.Stack.random(100_000, 4, activation="tanh", seed=0)
    x = vg.random_inputs(stack, 1, seed=1)
    profile = vg.gradient_profile(stack, x, backend="cpu")
    assert np.all(np.isfinite(profile.log_weight_grad_norm))
    assert np.all(np.isfinite(profile.log_grad_norm))
    # deep in the stack the layers are linear (tanh(h) = h below 2**-100): the weight gradient
    # |g_h,l| |x_(l-1)| falls with x, the cotangent grows back: the norms stay near a constant
    deep = profile.log_weight_grad_norm[10_000:]
    assert np.ptp(deep) < 10, np.ptp(deep)


@pytest.mark.parametrize("activation", ["tanh", "leaky_relu", "gelu", "relu", "sigmoid"])
def test_defect2_underflowing_forward_cpu_equals_the_reference(activation):
    """Below 2**-100 after a few hundred layers: both backends, every quantity, finite where true."""
    stack = vg.Stack.random(1500, 4, activation=activation, sigma_w=0.8, seed=0)
    x = vg.random_inputs(stack, 3, seed=1)
    cpu, reference = (vg.gradient_profile(stack, x, backend=b) for b in BACKENDS)
    segmented = vg.gradient_profile(stack, x, backend="cpu", segment="auto")
    for field in ("log_grad_norm", "log_weight_grad_norm", "saturation", "dead"):
        np.testing.assert_allclose(getattr(cpu, field), getattr(reference, field), rtol=1e-10, atol=1e-10)
        np.testing.assert_array_equal(getattr(segmented, field), getattr(cpu, field))
    if activation in ("tanh", "leaky_relu", "gelu"):  # no unit of theirs is ever exactly 0
        assert np.all(np.isfinite(cpu.log_weight_grad_norm)) and np.all(np.isfinite(cpu.log_grad_norm))


def _homogeneous_case(draw, dtype):
    """A positively homogeneous stack (bias 0, no norm; residual or not) and its inputs."""
    depth, width, batch = draw(st.integers(1, 40)), draw(st.integers(1, 8)), draw(st.integers(1, 4))
    stack = vg.Stack.random(depth, width, activation=draw(st.sampled_from(["relu", "leaky_relu", "linear"])),
                            init=draw(st.sampled_from(["gaussian", "orthogonal"])),
                            sigma_w=draw(st.floats(0.05, 1.5)), sigma_b=0.0,
                            residual=draw(st.sampled_from([None, 1.0, 0.5])), dtype=dtype,
                            seed=draw(st.integers(0, 2**31)))
    return stack, vg.random_inputs(stack, batch, seed=draw(st.integers(0, 2**31)))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_defect2_homogeneous_stacks_scale_exactly_at_any_input_scale(data):
    """Closed form: relu / leaky_relu / linear with bias 0 are positively homogeneous, x_l(c x) = c x_l(x).

    So for inputs scaled by c the derivatives, the cotangents and every Jacobian
    are unchanged and the weight gradients scale by c: log norms shift by log c,
    whatever c (1e-301 .. 1e301 in float64, where the activations fall far below
    or rise far beyond the floats; 1e-30 .. 1e30 in float32), on every backend.
    """
    dtype = data.draw(st.sampled_from([np.float64, np.float32]), label="dtype")
    stack, x = _homogeneous_case(data.draw, dtype)
    # c a power of two, so c x is exact: 2**+-1000 (1e+-301) in float64, 2**+-100 (1e+-30) in float32
    limit = 1000 if dtype == np.float64 else 100
    power = data.draw(st.integers(-limit, limit), label="log2 c")
    scale = 2.0 ** power
    unit_x, scaled_x = x, np.ldexp(x, power).astype(dtype)
    g = vg.random_inputs(stack, x.shape[0], seed=5)
    tolerance = 1e-10 if dtype == np.float64 else 2e-4
    for backend in BACKENDS:
        unit = vg.gradient_profile(stack, unit_x, g, backend=backend)
        profile = vg.gradient_profile(stack, scaled_x, g, backend=backend)
        finite = np.isfinite(unit.log_weight_grad_norm)
        np.testing.assert_array_equal(np.isfinite(profile.log_weight_grad_norm), finite, err_msg=backend)
        expected = unit.log_weight_grad_norm[finite] + math.log(scale)
        assert np.all(np.abs(profile.log_weight_grad_norm[finite] - expected)
                      <= tolerance * np.maximum(1.0, np.abs(expected))), backend
        np.testing.assert_allclose(profile.log_grad_norm, unit.log_grad_norm, rtol=tolerance, atol=tolerance)
        np.testing.assert_array_equal(profile.dead, unit.dead)
        tangents = vg.random_inputs(stack, x.shape[0], seed=6)
        for product in (vg.jvp, vg.vjp):
            np.testing.assert_allclose(product(stack, scaled_x, tangents, backend=backend),
                                       product(stack, unit_x, tangents, backend=backend),
                                       rtol=tolerance, atol=tolerance)


@st.composite
def tiny_input_cases(draw):
    """(stack, x) over every option of the layer, for inputs far below the floats.

    Biases are 0 (the rows stay below the floats: the scaled path) or at least
    0.05 (they swamp the inputs); a bias between, at the inputs' rounding
    level, makes a problem no two codes need agree on.
    """
    depth, width, batch = draw(st.integers(1, 12)), draw(st.integers(1, 8)), draw(st.integers(1, 3))
    stack = vg.Stack.random(
        depth, width, activation=draw(st.sampled_from(vg.ACTIVATIONS)),
        init=draw(st.sampled_from(["gaussian", "orthogonal", "uniform"])), sigma_w=draw(st.floats(0.3, 1.6)),
        sigma_b=draw(st.one_of(st.just(0.0), st.floats(0.05, 0.5))),
        residual=draw(st.sampled_from([None, 1.0, 0.5])), norm=draw(st.sampled_from([None, "pre", "post"])),
        seed=draw(st.integers(0, 2**31)))
    return stack, vg.random_inputs(stack, batch, seed=draw(st.integers(0, 2**31)))


@settings(max_examples=25, deadline=None)
@given(case=tiny_input_cases(), data=st.data())
def test_defect2_tiny_inputs_cpu_equals_the_reference(case, data):
    """Inputs far below the floats, every option of the layer (norms, residuals, biases, activations)."""
    stack, x = case
    scale = 10.0 ** data.draw(st.floats(-300, -40), label="log10 scale")
    tiny = x * scale
    g = vg.random_inputs(stack, x.shape[0], seed=3)
    cpu, reference = (vg.gradient_profile(stack, tiny, g, backend=b) for b in BACKENDS)
    for field in ("log_grad_norm", "log_weight_grad_norm", "saturation", "dead"):
        expected, actual = getattr(reference, field), getattr(cpu, field)
        np.testing.assert_array_equal(np.isfinite(actual), np.isfinite(expected), err_msg=field)
        finite = np.isfinite(expected)
        assert np.all(np.abs(actual[finite] - expected[finite])
                      <= 1e-9 * np.maximum(1.0, np.abs(expected[finite]))), field
    np.testing.assert_allclose(vg.forward(stack, tiny, backend="cpu"),
                               vg.forward(stack, tiny, backend="numpy"), rtol=1e-9, atol=0)
    np.testing.assert_allclose(vg.jvp(stack, tiny, g, backend="cpu"),
                               vg.jvp(stack, tiny, g, backend="numpy"), rtol=1e-8, atol=1e-12)


def test_defect2_tanh_below_the_floats_is_the_linear_stack():
    """Closed form: below 2**-100 tanh(h) = h to double precision, so a tanh stack with bias 0 and
    inputs at 1e-200 has the linear stack's profile, which homogeneity relates to unit inputs."""
    weights = vg.Stack.random(50, 6, activation="tanh", seed=2).weights
    tanh = vg.Stack(weights, np.zeros((50, 6)), activation="tanh")
    linear = vg.Stack(weights, np.zeros((50, 6)), activation="linear")
    x = vg.random_inputs(tanh, 2, seed=1)
    g = vg.random_inputs(tanh, 2, seed=4)
    for backend in BACKENDS:
        deep = vg.gradient_profile(tanh, x * 1e-200, g, backend=backend)
        unit = vg.gradient_profile(linear, x, g, backend=backend)
        np.testing.assert_allclose(deep.log_weight_grad_norm, unit.log_weight_grad_norm + math.log(1e-200),
                                   rtol=1e-12)
        np.testing.assert_allclose(deep.log_grad_norm, unit.log_grad_norm, rtol=1e-12, atol=1e-12)



# --------------------------------------------------------------------------
# Defect 3: no NaN from finite inputs; activations beyond the floats are carried, not overflowed


@pytest.mark.parametrize("activation,sigma_w,dtype", [
    ("softplus", 1e6, np.float32), ("gelu", 1e6, np.float32),
    ("softplus", 1e150, np.float64), ("gelu", 1e150, np.float64)])
def test_defect3_profiles_and_spectra_of_exploding_activations_are_finite(activation, sigma_w, dtype):
    """The issue's cases: activations grow by sigma_w per layer, past 3e38 (float32) or 1.8e308.

    Was: a NaN Lyapunov spectrum beside a profile of -inf.  Now every log norm
    is finite and the backends agree; a float32 stack agrees with the same
    weights in float64 (its top exponent), so the values are the true ones.
    """
    stack = vg.Stack.random(10, 8, activation=activation, sigma_w=sigma_w, dtype=dtype, seed=0)
    x = vg.random_inputs(stack, 2, seed=1)
    profiles = [vg.gradient_profile(stack, x, backend=b) for b in BACKENDS]
    for profile in profiles:
        assert np.all(np.isfinite(profile.log_grad_norm))
        assert np.all(np.isfinite(profile.log_weight_grad_norm))
    tolerance = 1e-10 if dtype == np.float64 else 1e-5
    for field in ("log_grad_norm", "log_weight_grad_norm"):
        np.testing.assert_allclose(getattr(profiles[0], field), getattr(profiles[1], field), rtol=tolerance)
    wide = vg.Stack(stack.weights.astype(np.float64), stack.biases.astype(np.float64), activation=activation)
    truth = vg.lyapunov_exponents(wide, x.astype(np.float64), backend="numpy")[:, 0]
    for backend in BACKENDS:
        spectrum = vg.lyapunov_exponents(stack, x, backend=backend)
        assert not np.any(np.isnan(spectrum))
        np.testing.assert_allclose(spectrum[:, 0], truth, rtol=tolerance)


@pytest.mark.parametrize("backend", BACKENDS)
def test_defect3_post_norm_inputs_near_float32_max(backend):
    """relu, norm="post", float32 inputs of 2**127 (1.7e38): was NaN from forward.

    LN makes each layer's output independent of its input's scale once eps is
    negligible, so the outputs equal those for inputs of 2**20, the input's
    log gradient norm is 107 ln 2 lower and the weight gradients are the same.
    """
    stack = vg.Stack.random(5, 8, activation="relu", norm="post", dtype=np.float32, seed=0)
    x = vg.random_inputs(stack, 2, seed=1)
    huge, moderate = np.ldexp(x, 127), np.ldexp(x, 20)
    np.testing.assert_allclose(vg.forward(stack, huge, backend=backend),
                               vg.forward(stack, moderate, backend=backend), rtol=1e-5, atol=1e-5)
    g = vg.random_inputs(stack, 2, seed=2)
    high, low = (vg.gradient_profile(stack, inputs, g, backend=backend) for inputs in (huge, moderate))
    np.testing.assert_allclose(high.log_grad_norm[:, 1:], low.log_grad_norm[:, 1:], rtol=1e-5)
    shift = 107 * math.log(2)
    np.testing.assert_allclose(high.log_grad_norm[:, 0], low.log_grad_norm[:, 0] - shift, rtol=1e-5)
    # layer 1's weight gradient: its input 2**107 times larger, its cotangent at h 2**107 times smaller
    np.testing.assert_allclose(high.log_weight_grad_norm, low.log_weight_grad_norm, rtol=1e-5)



# --------------------------------------------------------------------------
# Review findings on the scaled forward pass (2026-11-30)


@pytest.mark.parametrize("backend", BACKENDS)
def test_post_norm_rows_beyond_2_512_are_scaled_before_layer_norm_squares_them(backend):
    """relu + post-norm at sigma_w 1e160: y ~ 1e160 squared to inf in LN (was: a zero row and every
    log norm -inf, silently). LN makes the layers' outputs independent of the weights' scale c, so
    the input's gradient is that of sigma_w 1e10 and each weight gradient is 1e150 times smaller."""
    x = np.random.default_rng(0).standard_normal((4, 8))
    huge = vg.Stack.random(3, 8, activation="relu", sigma_w=1e160, norm="post", seed=0)
    moderate = vg.Stack(huge.weights / 1e150, huge.biases, activation="relu", norm="post")
    high, low = (vg.gradient_profile(s, x, backend=backend) for s in (huge, moderate))
    np.testing.assert_allclose(high.log_grad_norm, low.log_grad_norm, rtol=1e-12)
    np.testing.assert_allclose(high.log_weight_grad_norm, low.log_weight_grad_norm - 150 * math.log(10),
                               rtol=1e-12)
    frame = sweep({"depth": 3, "width": 8, "sigma_w": [1e160, 1e10], "activation": "relu", "norm": "post"},
                  batch=4, progress=False, backend=backend).frame
    np.testing.assert_allclose(frame.chi[0], frame.chi[1], rtol=1e-12)


def test_float32_layer_norm_beyond_the_floats_agrees_across_backends():
    """The reference's LN of scaled rows works in float64 as the kernels do (its float32 variance
    overflowed beyond 2**64, and eps 4**-e underflowed to 0: a constant row gave 0 * inf)."""
    post = vg.Stack.random(3, 8, activation="relu", sigma_w=1e20, norm="post", dtype="float32", seed=0)
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    cpu, reference = (vg.gradient_profile(post, x, backend=b) for b in BACKENDS)
    assert np.all(np.isfinite(cpu.log_grad_norm))
    np.testing.assert_allclose(cpu.log_grad_norm, reference.log_grad_norm, rtol=1e-5)
    pre = vg.Stack.random(3, 4, activation="relu", norm="pre", residual=1.0, dtype="float32", seed=0)
    for backend in BACKENDS:
        at = {scale: vg.gradient_profile(pre, np.full((2, 4), scale, np.float32), backend=backend)
              for scale in (1e30, 1e36)}  # constant rows: LN gives 0 whatever their scale
        np.testing.assert_allclose(at[1e36].log_grad_norm, at[1e30].log_grad_norm, rtol=1e-6)


def test_exponents_beyond_2_1024_in_a_deep_linear_stack_are_exact():
    """Width 1, weights 1e300, 300,000 layers: x_l = 1e300**l (exponents to 3e8, beyond any float),
    and dL/dW_l = g_l x_(l-1) = 1e300**(L-1) for every layer; forward's true value is inf."""
    depth = 300_000
    stack = vg.Stack(np.full((depth, 1, 1), 1e300), np.zeros((depth, 1)), activation="linear")
    x = np.ones((1, 1))
    profile = vg.gradient_profile(stack, x, np.ones((1, 1)), backend="cpu")
    # (the log scales add 3e5 float64 terms of 690: their rounding is ~1e-11 of the sum)
    np.testing.assert_allclose(profile.log_weight_grad_norm, (depth - 1) * math.log(1e300), rtol=1e-10)
    assert vg.forward(stack, x, backend="cpu")[0, 0] == np.inf


@pytest.mark.parametrize("activation,slope", [("gelu", 0.25), ("elu", 1.0), ("silu", 0.25), ("tanh", 1.0)])
def test_subnormal_fixed_points_use_the_full_slope_at_zero(activation, slope):
    """Below the normal floats q* = sigma_b^2 / (1 - sigma_w^2 phi'(0)^2) (phi(0) = 0); the review
    found the activations with a non-zero asymptote slope off by 12-25% (kappa was dropped)."""
    sigma_w, sigma_b = 0.5, 1e-155
    np.testing.assert_allclose(theory.fixed_point(activation, sigma_w, sigma_b),
                               sigma_b**2 / (1 - sigma_w**2 * slope), rtol=1e-10)
    np.testing.assert_allclose(theory.fixed_point(activation, sigma_w, 1e-150),
                               1e-300 / (1 - sigma_w**2 * slope), rtol=1e-12)
