"""The sweep engine: shared draws, the shared-draw kernel, vectorised statistics and theory, determinism."""

from __future__ import annotations

import math

import numpy as np
import pandas.testing as pdt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from threadpoolctl import threadpool_limits

import vgcore as vg
from vgcore import stats, theory
from vgcore._api import default_grad_output
from vgcore._ext import _sweep
from vgcore.sweep import (
    _seed_vectors,
    _summaries,
    _unit_draws,
    _weight_scale,
    input_seed,
    sweep,
)
from vgcore.theory.grid import chi1_many

# --------------------------------------------------------------------------
# Shared draws are Stack.random's draws


@pytest.mark.parametrize("init", ["gaussian", "uniform", "orthogonal"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_unit_draws_scaled_are_stack_random(init, dtype):
    depth, width, seed = 3, 5, 11
    unit, unit_bias = _unit_draws(seed, depth, width, init)
    for sigma_w, sigma_b in [(0.7, 0.0), (1.9, 0.35)]:
        stack = vg.Stack.random(depth, width, init=init, sigma_w=sigma_w, sigma_b=sigma_b, dtype=dtype,
                                seed=seed)
        scaled = _weight_scale(init, sigma_w, width) * unit
        # uniform: -a + 2a U against a (2U - 1), equal to a rounding of the largest entry
        np.testing.assert_allclose(stack.weights, scaled.astype(dtype), rtol=4 * np.finfo(dtype).eps,
                                   atol=4 * np.finfo(dtype).eps * np.abs(scaled).max())
        if init == "gaussian":  # the same product: bit for bit
            np.testing.assert_array_equal(stack.weights, scaled.astype(dtype))
        np.testing.assert_array_equal(stack.biases, (sigma_b * unit_bias).astype(dtype))
        x, g = _seed_vectors(seed, 4, width, dtype)
        np.testing.assert_array_equal(x, vg.random_inputs(stack, 4, seed=input_seed(seed)))
        np.testing.assert_array_equal(g, default_grad_output(stack, 4))


def test_configs_of_one_seed_share_their_draws():
    """What the docstring tells users: one seed's configs see the same weights up to scale."""
    a = vg.Stack.random(4, 6, sigma_w=0.5, sigma_b=0.1, seed=3)
    b = vg.Stack.random(4, 6, sigma_w=2.0, sigma_b=0.4, seed=3)
    np.testing.assert_allclose(b.weights, 4.0 * a.weights, rtol=1e-15)
    np.testing.assert_allclose(b.biases, 4.0 * a.biases, rtol=1e-15)
    c = vg.Stack.random(4, 6, sigma_w=0.5, sigma_b=0.1, seed=4)
    assert not np.allclose(c.weights, a.weights)


# --------------------------------------------------------------------------
# The shared-draw kernel against the multi-config runner


GRID = {"depth": [3, 6], "width": [5, 9], "activation": ["tanh", "relu", "gelu"],
        "init": ["gaussian", "orthogonal"], "sigma_w": [0.8, 1.3], "sigma_b": [0.0, 0.2],
        "residual": [None, 0.5], "norm": [None, "pre", "post"]}


def _one_config_at_a_time(grid: dict, seeds, batch: int):
    """The same rows, each config swept alone: nothing shares draws, so the multi-config runner runs them."""
    import itertools

    import pandas as pd

    keys = list(grid)
    lists = [grid[k] if isinstance(grid[k], list) else [grid[k]] for k in keys]
    frames = []
    for values in itertools.product(*lists):
        config = dict(zip(keys, values, strict=True))
        frames.append(sweep(config, batch=batch, seeds=seeds, progress=False).frame)
    return pd.concat(frames, ignore_index=True)


def test_shared_draw_groups_and_runner_groups_give_the_same_rows():
    """The same rows to rounding: 1e-11, or ten times the change a 1e-15 relative change of the
    weights makes where a config is ill-conditioned (relu + post-norm without bias: 1e8 x)."""
    grid = {key: values for key, values in GRID.items() if key not in ("depth", "width")}
    grid.update(depth=4, width=7)
    batched = sweep(grid, batch=3, seeds=[1, 8], progress=False).frame
    alone = _one_config_at_a_time(grid, [1, 8], 3)
    nudged = _one_config_at_a_time(dict(grid, sigma_w=[w * (1 + 1e-15) for w in grid["sigma_w"]]), [1, 8], 3)
    assert len(batched) == len(alone) == 3 * 2 * 2 * 2 * 2 * 3 * 2

    def close(got, want, twin):
        with np.errstate(invalid="ignore"):
            sensitivity = np.nan_to_num(np.abs(np.asarray(twin) - np.asarray(want)), nan=0.0)
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11 + 10 * sensitivity.max())

    with np.errstate(divide="ignore"):
        for column in ("chi", "imbalance"):
            for i in range(len(batched)):
                close(np.log(batched[column][i]), np.log(alone[column][i]), np.log(nudged[column][i]))
    for i in range(len(batched)):
        close(batched.log_grad_norm[i], alone.log_grad_norm[i], nudged.log_grad_norm[i])
        close(batched.log_global_norm[i], alone.log_global_norm[i], nudged.log_global_norm[i])
    pdt.assert_series_equal(batched.chi_theory, alone.chi_theory, rtol=1e-12)
    assert (batched.vanishing_depth == alone.vanishing_depth).mean() > 0.95


def test_configs_whose_activations_leave_the_floats_are_the_stack_kernels_rows():
    """Issue 17: at depth 700 and sigma_w 0.3 the activations fall below 2**-100 (relu: 0.21**l).

    The shared-draw kernel does not carry scaled rows; it flags such configs and
    the stack kernels, which do, compute them: the rows equal those of one config
    at a time (was, for relu at depth 1500 and width 16: chi = 0 and vanishing at
    layer 1, where h underflowed to 0 and relu'(0) = 0, against the true chi 0.04).
    """
    grid = {"depth": 700, "width": 8, "sigma_w": [0.3, 1.0], "activation": ["tanh", "leaky_relu"]}
    order = ["activation", "sigma_w"]
    batched = sweep(grid, batch=3, seeds=[1], progress=False).frame.sort_values(order, ignore_index=True)
    alone = _one_config_at_a_time(grid, [1], 3).sort_values(order, ignore_index=True)
    for column in ("chi", "depth_scale", "vanishing_depth", "log_global_norm"):
        np.testing.assert_allclose(batched[column], alone[column], rtol=1e-11)
    for got, want in zip(batched.log_grad_norm, alone.log_grad_norm, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-11)
    assert np.all(np.isfinite(batched.log_global_norm)) and np.all(batched.chi > 0)


def test_frame_is_bitwise_the_same_for_any_threads_and_chunk_size():
    grid = dict(GRID, dtype=["float64", "float32"])
    grid["depth"], grid["activation"] = [2, 5], ["tanh", "silu"]
    frames = []
    for threads, chunk_size in [(1, None), (2, None), (2, 1), (1, 7), (2, 50)]:
        with threadpool_limits(threads, user_api="openmp"):
            frames.append(sweep(grid, batch=4, seeds=2, progress=False, chunk_size=chunk_size).frame)
    for frame in frames[1:]:
        pdt.assert_frame_equal(frame, frames[0], check_exact=True)


def test_resumed_store_gives_the_bitwise_frame(tmp_path):
    """Rows computed in another chunking (a resumed store) are the rows of an uninterrupted run."""
    grid = {"depth": 4, "width": 6, "sigma_w": [0.9, 1.1, 1.6], "sigma_b": [0.0, 0.3], "norm": [None, "post"]}
    reference = sweep(grid, batch=3, seeds=2, progress=False).frame
    store = tmp_path / "s"
    first = sweep(dict(grid, sigma_w=[0.9, 1.1, 1.6]), batch=3, seeds=2, progress=False, store=store,
                  chunk_size=5)
    pdt.assert_frame_equal(first.frame, reference, check_exact=True)
    parts = sorted(store.glob("part-*.parquet"))
    for part in parts[1::2]:  # lose every other chunk, then resume with another chunk size
        part.unlink()
    resumed = sweep(grid, batch=3, seeds=2, progress=False, store=store, chunk_size=3)
    assert 0 < resumed.computed < len(reference)
    pdt.assert_frame_equal(resumed.frame, reference, check_exact=True)


def test_kernel_workspace_failure_is_a_memory_error():
    grid = {"depth": 3, "width": 4, "sigma_w": [0.5, 1.5]}
    expected = sweep(grid, batch=2, progress=False).frame
    _sweep._fail_allocations_for_tests(True)
    try:
        with pytest.raises(MemoryError, match=r"^shared_profiles: could not allocate \d+ bytes"):
            sweep(grid, batch=2, progress=False)
    finally:
        _sweep._fail_allocations_for_tests(False)
    pdt.assert_frame_equal(sweep(grid, batch=2, progress=False).frame, expected, check_exact=True)


def test_kernel_refuses_inconsistent_arrays():
    unit = np.zeros((2, 3, 3))
    bias = np.zeros((2, 3))
    x = np.zeros((1, 2, 3))
    args = dict(tile_groups=np.zeros(1, np.intp), tiles=np.array([[0, 5]], np.intp),
                weight_scales=np.ones(1), bias_scales=np.zeros(1), activations=np.zeros(1, np.intc),
                has_residual=np.zeros(1, np.uint8), residuals=np.zeros(1), norms=np.zeros(1, np.intc),
                log_grad_norm=np.empty((1, 2, 3)), log_weight_grad_norm=np.empty((1, 2)),
                left_range=np.zeros(1, np.uint8), n_threads=1)
    with pytest.raises(ValueError, match="tile 0 names config 5"):
        _sweep.shared_profiles([unit], [bias], x, x, *args.values())
    args["tiles"] = np.array([[0, -1]], np.intp)
    with pytest.raises(ValueError, match="group 0 has unit weights"):
        _sweep.shared_profiles([np.zeros((2, 4, 4))], [bias], x, x, *args.values())


# --------------------------------------------------------------------------
# Grid keys of recurrent cells


def test_bad_cells_and_recurrent_keys_are_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"grid\['cell'\]: unknown cell 'transformer'"):
        sweep({"depth": 3, "width": 4, "cell": "transformer"}, progress=False)
    with pytest.raises(ValueError, match=r"grid\['input_width'\]: must be >= 0"):
        sweep({"depth": 3, "width": 4, "input_width": -1}, progress=False)


def test_dense_rows_ignore_the_recurrent_keys():
    plain = sweep({"depth": 3, "width": 4, "sigma_w": [0.9, 1.4]}, batch=2, progress=False).frame
    keyed = sweep({"depth": 3, "width": 4, "sigma_w": [0.9, 1.4], "forget_bias": [0.0, 1.0]}, batch=2,
                  progress=False).frame
    assert keyed.forget_bias.tolist() == [0.0, 1.0, 0.0, 1.0]
    for column in ("chi", "imbalance", "log_global_norm"):
        np.testing.assert_array_equal(keyed[column].to_numpy()[::2], plain[column].to_numpy())


# --------------------------------------------------------------------------
# Statistics of many rows at once


_LOG_NORMS = st.one_of(st.floats(-60, 60), st.just(-math.inf))


@settings(max_examples=60)
@given(data=st.data())
def test_vectorised_statistics_equal_stats_summary(data):
    depth = data.draw(st.integers(1, 12))
    rows = data.draw(st.integers(1, 5))
    curves = np.array([data.draw(st.lists(_LOG_NORMS, min_size=depth + 1, max_size=depth + 1))
                       for _ in range(rows)])
    weights = np.array([data.draw(st.lists(_LOG_NORMS, min_size=depth, max_size=depth)) for _ in range(rows)])
    if data.draw(st.booleans()):
        curves[0, data.draw(st.integers(0, depth))] = data.draw(st.sampled_from([math.nan, math.inf]))
    got = _summaries(curves, weights)
    for row in range(rows):
        try:
            expected = stats.summary(curves[row])
            expected["log_global_norm"] = stats.global_norm(weights[row])
        except ValueError:  # a curve stats refuses: NaN statistics, no vanishing depth
            assert all(math.isnan(got[key][row]) for key in ("chi", "depth_scale", "imbalance", "r2"))
            assert got["vanishing_depth"][row] < 0
            continue
        for key in ("chi", "depth_scale", "imbalance", "r2", "log_global_norm"):
            np.testing.assert_allclose(got[key][row], expected[key], rtol=1e-12, atol=1e-12, err_msg=key)
        vanishing = got["vanishing_depth"][row]
        want = expected["vanishing_depth"]
        assert (vanishing < 0) if want is None else vanishing == want


# --------------------------------------------------------------------------
# Mean-field theory for many configs


@pytest.mark.parametrize("activation", vg.ACTIVATIONS)
def test_chi1_many_equals_theory_chi1(activation):
    sigma_w, sigma_b = np.meshgrid([0.3, 0.9, 1.0, 1.2, 1.41421356237, 2.0, 3.3], [0.0, 0.05, 0.3, 1.0])
    sigma_w, sigma_b = sigma_w.ravel(), sigma_b.ravel()
    expected = [theory.chi1(activation, float(w), float(b)) for w, b in zip(sigma_w, sigma_b, strict=True)]
    np.testing.assert_allclose(chi1_many(activation, sigma_w, sigma_b), expected, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------
# The kernel's vectorised tanh against the csrc header's


def test_vectorised_tanh_equals_the_header_tanh():
    from vgcore._activations import ACTIVATION_CODES
    from vgcore._ext import _kernels

    rng = np.random.default_rng(5)
    h = np.concatenate([rng.uniform(-1, 1, 4000) * scale for scale in (1e-300, 1e-8, 0.7, 3.0, 30.0, 380.0)]
                       + [np.array([0.0, -0.0, 0.625, -0.625, np.nextafter(0.625, 0), 354.0, 372.0, 1e300])])
    value, derivative = np.empty_like(h), np.empty_like(h)
    _sweep.tanh_values(h, value, derivative)
    want_value, want_derivative = np.empty_like(h), np.empty_like(h)
    _kernels.activation_values(ACTIVATION_CODES["tanh"], h, want_value, want_derivative)
    np.testing.assert_allclose(value, want_value, rtol=4.5e-16, atol=0)  # 2 ulps
    normal = want_derivative > np.finfo(float).tiny
    np.testing.assert_allclose(derivative[normal], want_derivative[normal], rtol=4e-15, atol=0)
    # subnormal derivatives (|h| > 354): a few of their ulps, and zero where the header's is zero
    np.testing.assert_allclose(derivative[~normal], want_derivative[~normal], rtol=1e-12,
                               atol=8 * np.finfo(float).smallest_subnormal)
