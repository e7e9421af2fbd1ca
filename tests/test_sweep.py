"""vg.sweep: rows equal individual gradient_profile + summary calls, grid handling, views, dask, progress."""

from __future__ import annotations

import io
import itertools
import math

import numpy as np
import pandas as pd
import pandas.testing as pdt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vgcore as vg
from vgcore import stats, theory
from vgcore.sweep import COLUMNS, GRID_KEYS, SweepResult, input_seed, load, sweep

SMALL = {"depth": [3, 5], "width": 6, "sigma_w": [0.8, 1.5], "sigma_b": [0.0, 0.25]}


def _individual(config: dict, seed: int, batch: int, backend: str) -> dict:
    """What the module docstring of vgcore.sweep says a row is, computed call by call."""
    stack = vg.Stack.random(config["depth"], config["width"], activation=config["activation"],
                            init=config["init"], sigma_w=config["sigma_w"], sigma_b=config["sigma_b"],
                            residual=config["residual"], norm=config["norm"], dtype=config["dtype"],
                            seed=seed)
    profile = vg.gradient_profile(stack, vg.random_inputs(stack, batch, seed=input_seed(seed)),
                                  backend=backend)
    return {"summary": stats.summary(profile), "log_grad_norm": profile.log_grad_norm.mean(axis=0),
            "sigma_w": stack.sigma_w}


#: How closely a row matches the individual call.  Rows of configs that share draws come from
#: products with the unit weights, scaled afterwards, which round differently from products with
#: the scaled weights.  A log norm's absolute error is its norm's relative error, and where a
#: gradient shrinks by cancellation (e^-16 over 4 relu layers of width 5) that reaches 2.5e-11
#: in float64 (observed), relative to the log norm about 1e-12; so logs are compared relative to
#: their size.  In float32 the two roundings of the weights differ by 6e-8 relative, which
#: ill-conditioned stacks amplify (a layer norm over 2 features: 2e-3 in a log norm, observed).
TOLERANCE = {"float64": {"rtol": 1e-11, "atol": 1e-11}, "float32": {"rtol": 1e-2, "atol": 1e-2}}


def _assert_rows_match_individual_calls(result: SweepResult, backend: str) -> None:
    configs = [dict(zip(GRID_KEYS, values, strict=True))
               for values in itertools.product(*(result.grid[k] for k in GRID_KEYS))]
    assert len(result.frame) == len(configs) * len(result.seeds)
    for position, row in enumerate(result.frame.itertuples(index=False)):
        config, seed = configs[position // len(result.seeds)], result.seeds[position % len(result.seeds)]
        expected = _individual(config, seed, result.batch, backend)
        assert row.seed == seed
        for key in ("depth", "width", "activation", "init", "dtype", "sigma_b", "cell", "forget_bias",
                    "sigma_u", "input_width"):
            assert getattr(row, key) == config[key]
        assert row.sigma_w == expected["sigma_w"]
        residual, norm = config["residual"], config["norm"]
        assert math.isnan(row.residual) if residual is None else row.residual == residual
        assert pd.isna(row.norm) if norm is None else row.norm == norm
        summary = expected["summary"]
        tolerance = TOLERANCE[config["dtype"]]
        assert isinstance(row.log_grad_norm, list) and len(row.log_grad_norm) == config["depth"] + 1
        np.testing.assert_allclose(row.log_grad_norm, expected["log_grad_norm"], **tolerance)
        # the statistics are smooth functions of the curve, except near-flat fits (chi ~ 1: r2 is
        # then a ratio of rounding-sized sums) and the threshold crossing of vanishing_depth;
        # chi and imbalance are exponentials of log differences: compared as logs
        with np.errstate(divide="ignore"):
            for key in ("chi", "imbalance"):
                np.testing.assert_allclose(np.log(getattr(row, key)), np.log(summary[key]), err_msg=key,
                                           **tolerance)
        np.testing.assert_allclose(row.log_global_norm, summary["log_global_norm"], **tolerance)
        if abs(summary["slope"]) > 1e-6:
            np.testing.assert_allclose(row.depth_scale, summary["depth_scale"], rtol=1e3 * tolerance["rtol"])
            np.testing.assert_allclose(row.r2, summary["r2"], atol=max(1e-6, tolerance["atol"]))
        np.testing.assert_allclose(row.chi_theory, summary["chi_theory"], rtol=1e-12, atol=0)
        if config["dtype"] == "float64":
            assert (pd.isna(row.vanishing_depth) if summary["vanishing_depth"] is None
                    else row.vanishing_depth == summary["vanishing_depth"])
        else:  # float32: a point within rounding of the threshold may fall on either side
            assert (pd.isna(row.vanishing_depth) if stats.vanishing_depth(row.log_grad_norm) is None
                    else row.vanishing_depth == stats.vanishing_depth(row.log_grad_norm))


# --------------------------------------------------------------------------
# Rows


@pytest.mark.parametrize("backend", ["cpu", "numpy"])
def test_rows_equal_individual_calls(backend):
    grid = {"depth": [4, 7], "width": [5, 8], "activation": ["tanh", "relu"], "sigma_w": [0.9, "he"],
            "sigma_b": 0.1, "residual": [None, 0.5], "norm": [None, "post"], "dtype": "float64"}
    result = sweep(grid, batch=3, seeds=[5, 2], backend=backend, progress=False, chunk_size=7)
    _assert_rows_match_individual_calls(result, backend)
    assert list(result.frame.columns) == list(COLUMNS)


@settings(max_examples=15)
@given(data=st.data())
def test_rows_equal_individual_calls_over_generated_grids(data):
    """Every grid key, init, norm and dtype; configs sharing draws and configs alone alike."""
    def some(strategy, min_size=1, max_size=2):
        return data.draw(st.lists(strategy, min_size=min_size, max_size=max_size, unique=True))

    grid = {
        "depth": some(st.integers(1, 8)),
        "width": some(st.integers(1, 7)),
        "activation": some(st.sampled_from(vg.ACTIVATIONS)),
        "init": some(st.sampled_from(["gaussian", "orthogonal", "uniform"]), max_size=3),
        "sigma_w": some(st.sampled_from([0.5, 1.0, 1.7, "critical", "lecun"]), min_size=0),
        "sigma_b": some(st.sampled_from([0.0, 0.3]), min_size=0),
        "residual": some(st.sampled_from([None, 0.4]), min_size=0),
        "norm": some(st.sampled_from([None, "pre", "post"]), min_size=0),
        "dtype": some(st.sampled_from(["float64", "float32"])),
        "cell": ["dense"],
        "forget_bias": some(st.sampled_from([0.0, 1.0]), max_size=1),
        "sigma_u": some(st.sampled_from([1.0, 0.5]), max_size=1),
        "input_width": some(st.sampled_from([0, 3]), max_size=1),
    }
    grid = {key: values for key, values in grid.items() if values}  # an empty draw: the default
    seeds = data.draw(st.integers(1, 2))
    chunk_size = data.draw(st.integers(1, 6))
    result = sweep(grid, batch=data.draw(st.integers(1, 4)), seeds=seeds, backend="cpu", progress=False,
                   chunk_size=chunk_size)
    _assert_rows_match_individual_calls(result, "cpu")


def test_frame_does_not_depend_on_chunking():
    frames = [sweep(SMALL, batch=4, seeds=2, progress=False, chunk_size=size).frame for size in (1, 3, None)]
    pdt.assert_frame_equal(frames[0], frames[1])
    pdt.assert_frame_equal(frames[0], frames[2])


def test_numpy_scalars_and_python_scalars_give_the_same_sweep():
    python = sweep({"depth": 4, "width": 6, "sigma_w": [0.75, 1.25], "sigma_b": 0.125, "dtype": "float32"},
                   batch=np.int64(3), seeds=[np.int32(1)], progress=False)
    numpy_ = sweep({"depth": np.int64(4), "width": np.uint8(6), "sigma_w": np.array([0.75, 1.25]),
                    "sigma_b": np.float32(0.125), "dtype": np.float32}, batch=3, seeds=[1], progress=False)
    pdt.assert_frame_equal(python.frame, numpy_.frame)
    assert python.grid == numpy_.grid
    assert type(python.grid["depth"][0]) is int and type(numpy_.grid["sigma_w"][0]) is float


def test_defaults_are_stack_random_defaults():
    result = sweep({"depth": 3, "width": 4}, progress=False)
    row = result.frame.iloc[0]
    assert (row["activation"], row["init"], row["sigma_w"], row["sigma_b"], row["dtype"]) == (
        "tanh", "gaussian", 1.0, 0.0, "float64")
    assert math.isnan(row.residual) and pd.isna(row.norm) and row.seed == 0
    assert len(result.frame) == 1 and result.batch == 32


def test_seeds_count_and_list():
    by_count = sweep(SMALL, seeds=3, batch=2, progress=False).frame
    assert by_count["seed"].tolist() == [0, 1, 2] * (len(by_count) // 3)
    by_list = sweep(SMALL, seeds=[2, 0], batch=2, progress=False).frame
    pdt.assert_frame_equal(by_list.iloc[0::2].reset_index(drop=True),
                           by_count[by_count.seed == 2].reset_index(drop=True))


def test_seed_fixes_weights_inputs_and_cotangent():
    first = sweep({"depth": 6, "width": 9, "sigma_w": 1.3}, seeds=[4, 4 + 1], batch=5, progress=False).frame
    again = sweep({"depth": 6, "width": 9, "sigma_w": 1.3}, seeds=[4], batch=5, progress=False).frame
    assert first.log_grad_norm[0] == again.log_grad_norm[0]
    assert first.log_grad_norm[0] != first.log_grad_norm[1]
    assert input_seed(4) != 4 and input_seed(4) == input_seed(np.int64(4)) and 0 <= input_seed(4) < 2**63


def test_chi_theory_where_theory_applies():
    frame = sweep({"depth": 3, "width": 4, "sigma_w": [0.8, 1.6], "sigma_b": 0.2, "residual": [None, 1.0],
                   "norm": [None, "pre"]}, batch=2, progress=False).frame
    plain = frame[frame.residual.isna() & frame.norm.isna()]
    np.testing.assert_allclose(plain.chi_theory, [theory.chi1("tanh", w, 0.2) for w in plain.sigma_w],
                               rtol=1e-12)
    assert frame[~(frame.residual.isna() & frame.norm.isna())].chi_theory.isna().all()


def test_measured_boundary_sits_on_theorys_critical_line():
    """The physics the phase diagram shows: measured chi crosses 1 where mean-field chi_1 does."""
    sigma_w = np.round(np.linspace(1.0, 2.0, 21), 10)
    frame = sweep({"depth": 40, "width": 96, "sigma_w": sigma_w, "sigma_b": 0.3}, batch=16, seeds=2,
                  progress=False).frame
    log_chi = frame.groupby("sigma_w").chi.apply(lambda c: np.log(c).mean())
    crossing = np.interp(0.0, log_chi.to_numpy(), log_chi.index.to_numpy())
    assert np.all(np.diff(log_chi.to_numpy()) > 0)
    assert crossing == pytest.approx(theory.critical_sigma_w("tanh", 0.3), abs=0.08)


# --------------------------------------------------------------------------
# Grid validation: ValueError naming the key, before any work


@pytest.mark.parametrize(("grid", "match"), [
    ({"depth": 3, "width": 4, "colour": 1}, "unknown key 'colour'"),
    ({"depth": [], "width": 4}, r"grid\['depth'\]: empty list"),
    ({"width": 4}, r"grid\['depth'\]: required"),
    ({"depth": 0, "width": 4}, r"grid\['depth'\]: must be >= 1"),
    ({"depth": 2.5, "width": 4}, r"grid\['depth'\]: expected an integer"),
    ({"depth": True, "width": 4}, r"grid\['depth'\]"),
    ({"depth": 3, "width": [4, 4]}, r"grid\['width'\]: value 4 appears twice"),
    ({"depth": 3, "width": 4, "activation": "swish"}, r"grid\['activation'\]: unknown activation"),
    ({"depth": 3, "width": 4, "init": "zeros"}, r"grid\['init'\]: unknown init"),
    ({"depth": 3, "width": 4, "sigma_w": -1.0}, r"grid\['sigma_w'\]: must be > 0"),
    ({"depth": 3, "width": 4, "sigma_w": "kaiming"}, r"grid\['sigma_w'\]: unknown scheme"),
    ({"depth": 3, "width": 4, "sigma_b": [0.1, float("nan")]}, r"grid\['sigma_b'\]: must be finite"),
    ({"depth": 3, "width": 4, "residual": "yes"}, r"grid\['residual'\]"),
    ({"depth": 3, "width": 4, "norm": "group"}, r"grid\['norm'\]"),
    ({"depth": 3, "width": 4, "dtype": "float16"}, r"grid\['dtype'\]"),
    ({"depth": np.ones((2, 2), int), "width": 4}, r"grid\['depth'\]: expected a value or a 1-D list"),
    ({"depth": 3, "width": 4, "sigma_b": {0.0, 0.1}}, r"grid\['sigma_b'\]: .*a set has no order"),
    ([("depth", 3)], "grid: expected a mapping"),
])
def test_bad_grid_is_refused_naming_the_key(grid, match, tmp_path):
    store = tmp_path / "never"
    with pytest.raises(ValueError, match=match):
        sweep(grid, store=store, progress=False)
    assert not store.exists(), "work started before the grid was checked"


@pytest.mark.parametrize(("options", "match"), [
    ({"seeds": 0}, "seeds: a count must be between 1"),
    ({"seeds": []}, "seeds: empty"),
    ({"seeds": [1, 1]}, "seeds: a seed appears twice"),
    ({"seeds": [-1]}, r"seeds: each seed must satisfy 0 <= seed < 2\*\*63"),
    ({"seeds": "3"}, "seeds: expected a count"),
    ({"batch": 0}, "batch: must be >= 1"),
    ({"backend": "tpu"}, "backend: unknown backend"),
    ({"chunk_size": 0}, "chunk_size: must be >= 1"),
    ({"client": 42}, "client: expected a dask.distributed Client"),
    ({"resume": "yes"}, "resume: expected True or False"),
])
def test_bad_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        sweep(SMALL, progress=False, **options)


# --------------------------------------------------------------------------
# Views


def test_to_xarray_is_the_grid_view():
    pytest.importorskip("xarray")
    grid = {"depth": [3, 12], "width": 4, "sigma_w": [0.5, "he"], "residual": [None, 0.5]}
    result = sweep(grid, seeds=[7, 1], batch=2, progress=False)
    view = result.to_xarray()
    assert view["chi"].dims == ("depth", "sigma_w", "residual", "seed")
    assert view["log_grad_norm"].dims == ("depth", "sigma_w", "residual", "seed", "layer")
    assert view["log_grad_norm"].shape == (2, 2, 2, 2, 13)
    assert list(view.sigma_w.values) == [0.5, "he"] and list(view.seed.values) == [7, 1]
    assert view.width.item() == 4 and view.attrs["batch"] == 2
    for row in result.frame.itertuples(index=False):
        position = {"depth": [3, 12].index(row.depth), "sigma_w": 0 if row.sigma_w == 0.5 else 1,
                    "residual": 0 if math.isnan(row.residual) else 1, "seed": [7, 1].index(row.seed)}
        cell = view.isel(position)
        assert cell.chi.item() == row.chi
        curve = cell.log_grad_norm.values
        assert list(curve[: row.depth + 1]) == row.log_grad_norm
        assert np.isnan(curve[row.depth + 1:]).all()
        vanishing = cell.vanishing_depth.item()
        assert math.isnan(vanishing) if pd.isna(row.vanishing_depth) else vanishing == row.vanishing_depth
    assert view.vanishing_depth.notnull().any() and view.vanishing_depth.isnull().any()


# --------------------------------------------------------------------------
# Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_in_a_terminal_and_not_otherwise(monkeypatch):
    pytest.importorskip("tqdm")
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    sweep(SMALL, batch=2, progress=True, chunk_size=4)
    assert "8/8" in terminal.getvalue() and "config" in terminal.getvalue()

    quiet = _Terminal()
    monkeypatch.setattr("sys.stderr", quiet)
    sweep(SMALL, batch=2, progress=False)
    assert quiet.getvalue() == ""

    pipe = io.StringIO()  # not a terminal: no bar by default
    monkeypatch.setattr("sys.stderr", pipe)
    sweep(SMALL, batch=2)
    assert pipe.getvalue() == ""


# --------------------------------------------------------------------------
# dask


@pytest.fixture(scope="module")
def dask_cluster():
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            yield cluster, client


def test_dask_cluster_gives_the_in_process_frame(dask_cluster, tmp_path):
    cluster, client = dask_cluster
    grid = {"depth": [4, 6], "width": [5, 7], "sigma_w": [0.7, 1.1, 1.9], "residual": [None, 0.3]}
    expected = sweep(grid, batch=3, seeds=2, progress=False).frame
    distributed = sweep(grid, batch=3, seeds=2, progress=False, client=client, chunk_size=5)
    pdt.assert_frame_equal(distributed.frame, expected)
    # by scheduler address, into a store written by this (the driver) process only
    stored = sweep(grid, batch=3, seeds=2, progress=False, client=cluster.scheduler_address,
                   store=tmp_path / "s")
    pdt.assert_frame_equal(stored.frame, expected)
    pdt.assert_frame_equal(load(tmp_path / "s").frame, expected)
