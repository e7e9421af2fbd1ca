"""Depth sweeps: gradient profiles over a Cartesian grid of stacks (``vg.sweep``).

A sweep measures one gradient profile per config x seed and keeps its summary
statistics (``vgcore.stats.summary``) and mean log-norm curve, one row each,
in a pandas DataFrame; optionally in a resumable Parquet store
(:mod:`vgcore._store`), optionally on a dask cluster.

Rows and seeds
--------------
The grid's configs are the Cartesian product of its values, in the key order
of :data:`GRID_KEYS` (the last key varying fastest); every config is run
once per seed, seeds varying fastest.  Row ``r`` of a sweep with ``S`` seeds
is config ``r // S`` and seed ``seeds[r % S]``.

A row for config ``c`` and seed ``s`` is, up to rounding (see "Shared
draws")::

    stack = vg.Stack.random(c.depth, c.width, activation=c.activation, init=c.init,
                            sigma_w=c.sigma_w, sigma_b=c.sigma_b, residual=c.residual,
                            norm=c.norm, dtype=c.dtype, seed=s)
    x = vg.random_inputs(stack, batch, seed=input_seed(s))
    profile = vg.gradient_profile(stack, x)          # grad_output: the default, from seed s
    vg.stats.summary(profile)

so the seed fixes the weights, the inputs and the output cotangent.
:func:`input_seed` derives the inputs' seed from ``s`` through NumPy's
SeedSequence, so that inputs, weights and cotangent come from independent
streams.

Shared draws
------------
``Stack.random(seed=s)`` draws *unit* variates and scales them: Gaussian
weights are ``Z * sigma_w / sqrt(n)`` with ``Z`` standard normal (uniform and
orthogonal inits likewise scale a unit draw), biases ``sigma_b * z``, all from
one generator seeded with ``s``; inputs and cotangent depend on ``s`` alone.
So configs with the same seed, depth, width and init have the same ``Z``,
``z``, inputs and cotangent, and differ only in how they scale and use them
(sigma_w, sigma_b, activation, residual, norm).  What this means for a user:

- the configs of one seed are *correlated*: two sigma_w of one seed differ
  only by the scale of the same weights (common random numbers), so a phase
  diagram over sigma_w x sigma_b comes out smooth, and differences between
  neighbouring configs are measured far more precisely than either value;
- *independent* samples come from seeds: to average over weight draws or to
  estimate the spread of a statistic, use several seeds (``seeds=n``), never
  neighbouring configs of one seed.

A sweep draws the unit variates once per (seed, depth, width, init) and, on
the "cpu" backend, runs every config that shares them as one batched problem
(vgcore._ext._sweep: one product per layer for a tile of configs, each
config's scale, bias and activation applied in the kernel's epilogue).  A
product with ``Z`` then scaled rounds differently from one with the scaled
weights, so such rows equal the individual call above to rounding (about
1e-12 relative in float64 for stacks that are not chaotic; float32 to its
own precision), not bit for bit.  Configs that share no draws with another
config of the grid run in the multi-config runner on the stacks of
``Stack.random`` (:func:`vgcore.backends.cpu_stack.gradient_profiles`).  Which
configs are batched, and in tiles of how many, depends on the grid only, so a
sweep's frame is bitwise the same for any chunk size, any number of threads,
and with or without resuming from a store.

Chunks
------
Pending rows are ordered by shape (depth, width, dtype), then init and seed,
so that configs sharing draws sit together, and cut into chunks.  A chunk is
the unit of the store (one Parquet part) and of distribution (one dask task);
a sweep's working memory is that of one chunk (plus the rows it returns).
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vgcore import _validation as check
from vgcore._stack import INITS, SIGMA_W_SCHEMES

__all__ = ["GRID_KEYS", "STAT_COLUMNS", "SweepResult", "input_seed", "load", "sweep"]

_REQUIRED = object()


@dataclass(frozen=True)
class GridKey:
    """One grid key: its default, how a value is checked, and its column's Arrow type.

    ``canonical(value)`` returns the value as a plain JSON-able Python value or
    raises TypeError / ValueError (a message may start with ``"<key>: "``).
    ``arrow`` is "int64", "float64" (None stored as NaN) or "string" (None
    stored as missing).
    """

    name: str
    default: Any
    canonical: Callable[[Any], Any]
    arrow: str


def _init_value(value: Any) -> str:
    if not isinstance(value, str) or value not in INITS:
        raise ValueError(f"unknown init {value!r}; expected one of {INITS}")
    return value


def _sigma_w_value(value: Any) -> float | str:
    if isinstance(value, str):
        if value not in (*SIGMA_W_SCHEMES, "critical"):
            raise ValueError(f"unknown scheme {value!r}; expected a number or one of "
                             f"{(*SIGMA_W_SCHEMES, 'critical')}")
        return value
    return check.check_real(value, "sigma_w", positive=True)


#: Cells a sweep can run (docs/ARCHITECTURE.md, "Sweeps"): "dense" is the deep stack; recurrent cells
#: are listed in CELLS and become runnable when they appear here with a model builder.
CELLS = ("dense", "rnn", "lstm", "gru")
IMPLEMENTED_CELLS = ("dense", "rnn", "lstm", "gru")


def _cell_value(value: Any) -> str:
    if not isinstance(value, str) or value not in CELLS:
        raise ValueError(f"unknown cell {value!r}; expected one of {CELLS}")
    if value not in IMPLEMENTED_CELLS:
        raise ValueError(f"cell {value!r} is not implemented in sweeps yet (implemented: "
                         f"{', '.join(IMPLEMENTED_CELLS)})")
    return value


#: The grid keys, in the order of the Cartesian product (the last varies fastest).  A new key is
#: one more entry (appended, so that existing grids keep their row order) and, where it changes
#: the model, a line in :func:`_stack_and_inputs` / the model builders.
GRID_SPEC: tuple[GridKey, ...] = (
    GridKey("depth", _REQUIRED, lambda v: check.check_int(v, "depth"), "int64"),
    GridKey("width", _REQUIRED, lambda v: check.check_int(v, "width"), "int64"),
    GridKey("activation", "tanh", check.check_activation, "string"),
    GridKey("init", "gaussian", _init_value, "string"),
    GridKey("sigma_w", 1.0, _sigma_w_value, "float64"),
    GridKey("sigma_b", 0.0, lambda v: check.check_real(v, "sigma_b", minimum=0.0), "float64"),
    GridKey("residual", None, check.check_residual, "float64"),
    GridKey("norm", None, check.check_norm, "string"),
    GridKey("dtype", "float64", lambda v: check.check_dtype(v).name, "string"),
    # recurrent cells (docs/ARCHITECTURE.md "Sweeps"); a dense stack ignores the last three
    GridKey("cell", "dense", _cell_value, "string"),
    GridKey("forget_bias", 0.0, lambda v: check.check_real(v, "forget_bias"), "float64"),
    GridKey("sigma_u", 1.0, lambda v: check.check_real(v, "sigma_u", minimum=0.0), "float64"),
    GridKey("input_width", 0, lambda v: check.check_int(v, "input_width", minimum=0), "int64"),
)
_SPEC = {key.name: key for key in GRID_SPEC}

#: Grid keys in the order of the Cartesian product (the last varies fastest).
GRID_KEYS = tuple(key.name for key in GRID_SPEC)
#: Summary statistics kept per row (from vgcore.stats.summary).
STAT_COLUMNS = ("chi", "depth_scale", "vanishing_depth", "imbalance", "r2", "chi_theory",
                "log_global_norm")
#: Columns of SweepResult.frame, in order.
COLUMNS = (*GRID_KEYS, "seed", *STAT_COLUMNS, "log_grad_norm")
#: Defaults of keys missing from a grid: those of Stack.random (depth and width have none).
DEFAULTS = {key.name: key.default for key in GRID_SPEC if key.default is not _REQUIRED}
BACKENDS = ("auto", "cpu", "cuda", "numpy")

# Mixed with a row's seed to seed its inputs: "inpu".
_INPUT_STREAM = 0x696E7075
# Work (about flops) in one chunk by default: about a quarter second of a 2-core machine, so a
# kill loses little and the progress bar moves, while each compiled call holds many configs;
# and no less than _MIN_CHUNK_WORK when the sweep is cut into several chunks per worker.
_CHUNK_WORK = 2e10
_MIN_CHUNK_WORK = 2e9
_MAX_CHUNK = 4096
# Tiles of the shared-draw kernel: about this many rows (configs x batch) per product, and at
# most this much workspace per thread.
_TILE_ROWS = 128
_TILE_BYTES = 64 << 20
# Seconds to reach a dask scheduler given by address before the sweep is refused (naming client).
_CONNECT_SECONDS = 5.0


def input_seed(seed: int) -> int:
    """The seed of a sweep row's inputs, derived from the row's seed.

    ``SeedSequence([seed, 0x696E7075]).generate_state(1, uint64)[0] >> 1``:
    a 63-bit seed for :func:`vgcore.random_inputs`, independent of the
    weights' stream (``default_rng(seed)``) and the default cotangent's.
    """
    seed = check.check_int(seed, "seed", minimum=0)
    state = np.random.SeedSequence([seed, _INPUT_STREAM]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


# --------------------------------------------------------------------------
# The grid


def _grid_error(key: str, message: str) -> ValueError:
    return ValueError(f"grid[{key!r}]: {message}")


def _canonical_value(key: str, value: Any) -> Any:
    """One grid value as a plain JSON-able Python value, checked as Stack.random would."""
    if isinstance(value, np.generic):
        value = value.item()
    try:
        return _SPEC[key].canonical(value)
    except (TypeError, ValueError) as error:
        message = str(error)
        prefix = f"{key}: "
        raise _grid_error(key, message[len(prefix):] if message.startswith(prefix) else message) from None


def _values(key: str, value: Any) -> list:
    """A grid entry as a list of values (a scalar is a list of one)."""
    if isinstance(value, np.ndarray):
        if value.ndim > 1:
            raise _grid_error(key, f"expected a value or a 1-D list of values, got shape {value.shape}")
        value = value.tolist()
    elif isinstance(value, (set, frozenset)):  # no order: the rows' order would change from run to run
        raise _grid_error(key, "expected a value or a list of values, got a set (a set has no order)")
    elif isinstance(value, (range, tuple)) or (
            isinstance(value, Iterable) and not isinstance(value, (str, bytes, dict))):
        value = list(value)
    if isinstance(value, dict):
        raise _grid_error(key, "expected a value or a list of values, got a dict")
    return value if isinstance(value, list) else [value]


def normalize_grid(grid: Any) -> dict[str, list]:
    """``grid`` as {key: list of canonical values} over every key of :data:`GRID_KEYS`.

    Raises
    ------
    ValueError
        Not a mapping, an unknown or missing key, an empty list, a repeated
        value or a bad value; the message names the key.
    """
    if not hasattr(grid, "keys") or not hasattr(grid, "__getitem__"):
        raise ValueError(f"grid: expected a mapping of grid keys to values, got {type(grid).__name__}")
    unknown = [key for key in grid.keys() if key not in GRID_KEYS]
    if unknown:
        raise ValueError(f"grid: unknown key {unknown[0]!r}; expected keys among {GRID_KEYS}")
    canonical = {}
    for key in GRID_KEYS:
        if key not in grid:
            if key not in DEFAULTS:
                raise _grid_error(key, "required (Stack.random has no default for it)")
            canonical[key] = [DEFAULTS[key]]
            continue
        values = [_canonical_value(key, value) for value in _values(key, grid[key])]
        if not values:
            raise _grid_error(key, "empty list of values")
        seen = set()
        for value in values:
            if value in seen:
                raise _grid_error(key, f"value {value!r} appears twice")
            seen.add(value)
        canonical[key] = values
    return canonical


#: Most seeds one sweep takes: every seed is a row per config, and a count is expanded to a list.
MAX_SEEDS = 1_000_000
#: Seeds are NumPy generator seeds stored as int64: 0 <= seed < 2**63.
SEED_LIMIT = 2**63


def _check_seed(seed: Any) -> int:
    if isinstance(seed, np.generic):
        seed = seed.item()
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seeds: expected ints, got {type(seed).__name__} {seed!r}")
    seed = int(seed)
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seeds: each seed must satisfy 0 <= seed < 2**63, got {seed}")
    return seed


def normalize_seeds(seeds: Any) -> list[int]:
    """``seeds`` as a list of distinct ints in [0, 2**63) (a count n means 0..n-1).

    Raises
    ------
    ValueError
        Naming seeds: not a count or an ordered sequence of ints (a set has
        no order), a seed outside [0, 2**63), a repeated seed, or more than
        :data:`MAX_SEEDS` seeds; checked before anything is built.
    """
    if isinstance(seeds, (numbers.Integral, np.integer)) and not isinstance(seeds, (bool, np.bool_)):
        count = int(seeds)
        if not 1 <= count <= MAX_SEEDS:
            raise ValueError(f"seeds: a count must be between 1 and {MAX_SEEDS:,}, got {count}")
        return list(range(count))
    if isinstance(seeds, (set, frozenset)):
        raise ValueError("seeds: expected a count or a list of ints, got a set (a set has no order)")
    if isinstance(seeds, (str, bytes, dict)) or not isinstance(seeds, (Iterable, np.ndarray)):
        raise ValueError(f"seeds: expected a count or a list of ints, got {type(seeds).__name__}")
    if isinstance(seeds, np.ndarray):
        if seeds.size > MAX_SEEDS:
            raise ValueError(f"seeds: at most {MAX_SEEDS:,} seeds, got {seeds.size:,}")
        if seeds.dtype.kind not in "iu":
            raise ValueError(f"seeds: expected ints, got an array of {seeds.dtype}")
        items = seeds.ravel().tolist()
    else:
        items = list(itertools.islice(iter(seeds), MAX_SEEDS + 1))
        if len(items) > MAX_SEEDS:
            raise ValueError(f"seeds: at most {MAX_SEEDS:,} seeds")
    values = [_check_seed(seed) for seed in items]
    if not values:
        raise ValueError("seeds: empty list of seeds")
    if len(set(values)) != len(values):
        raise ValueError("seeds: a seed appears twice")
    return values


def _grid_shape(grid: dict[str, list]) -> tuple[int, ...]:
    return tuple(len(grid[key]) for key in GRID_KEYS)


def _configs(grid: dict[str, list]) -> list[dict]:
    return [dict(zip(GRID_KEYS, values, strict=True))
            for values in itertools.product(*(grid[key] for key in GRID_KEYS))]


def _n_configs(grid: dict[str, list]) -> int:
    return math.prod(_grid_shape(grid))


@dataclass(frozen=True)
class _Rows:
    """Rows of a sweep decoded into per-key value indices (arrays, no per-row Python objects)."""

    rows: np.ndarray                 # (R,) row numbers
    index: dict[str, np.ndarray]     # key -> (R,) index into grid[key]
    seed: np.ndarray                 # (R,) int64 seeds

    @classmethod
    def decode(cls, rows: np.ndarray, grid: dict[str, list], seeds: Sequence[int]) -> _Rows:
        rows = np.asarray(rows, dtype=np.int64)
        configs, positions = np.divmod(rows, len(seeds))
        unravelled = np.unravel_index(configs, _grid_shape(grid)) if rows.size else [
            np.zeros(0, np.int64) for _ in GRID_KEYS]
        index = {key: np.asarray(values, dtype=np.int64)
                 for key, values in zip(GRID_KEYS, unravelled, strict=True)}
        return cls(rows, index, np.asarray(seeds, dtype=np.int64)[positions])

    def config(self, grid: dict[str, list], position: int) -> dict:
        return {key: grid[key][int(self.index[key][position])] for key in GRID_KEYS}


# --------------------------------------------------------------------------
# Which configs share draws, and how they are batched (a function of the grid only)


def _shares_draws(config: dict) -> bool:
    """Whether a config can run in the shared-draw kernel: a dense stack without batch norm."""
    return config["cell"] == "dense" and config["norm"] in (None, "pre", "post")


def _shared_group_size(grid: dict[str, list]) -> int:
    """Configs of the grid that share each (seed, depth, width, init, dtype)'s draws.

    Every key other than depth, width, init and dtype is crossed with all of
    them, so the count is the same for every such group: the product of the
    other keys' counts over configs the kernel can run.
    """
    others = [key for key in GRID_KEYS if key not in ("depth", "width", "init", "dtype")]
    count = 0
    for values in itertools.product(*(grid[key] for key in others)):
        config = dict(zip(others, values, strict=True))
        count += _shares_draws(config)
    return count


def _tile_slots(depth: int, width: int, batch: int, dtype: str, group_size: int) -> int:
    """Configs per tile of the shared-draw kernel: from the grid and shapes only (never the chunk)."""
    from vgcore._ext import _sweep

    slots = max(1, min(group_size, _TILE_ROWS // batch))
    itemsize = np.dtype(dtype).itemsize
    while slots > 1 and _sweep.workspace_bytes(depth, width, batch, slots, itemsize) > _TILE_BYTES:
        slots -= 1
    return slots


# --------------------------------------------------------------------------
# Draws


def _unit_draws(seed: int, depth: int, width: int, init: str) -> tuple[np.ndarray, np.ndarray]:
    """(Z (L, n, n), z (L, n)) float64: the unit variates Stack.random(seed=seed) scales.

    Stack.random's weights are Z * :func:`_weight_scale` (gaussian), the
    uniform draw on [-a, a] (here on [-1, 1], the same generator calls) or
    sigma_w times the signed Q of a Gaussian matrix; its biases sigma_b * z,
    drawn next from the same generator.
    """
    rng = np.random.default_rng(seed)
    if init == "gaussian":
        unit = rng.standard_normal((depth, width, width))
    elif init == "uniform":
        unit = rng.uniform(-1.0, 1.0, size=(depth, width, width))
    else:
        q, r = np.linalg.qr(rng.standard_normal((depth, width, width)))
        signs = np.sign(np.diagonal(r, axis1=1, axis2=2))
        signs[signs == 0] = 1.0
        unit = q * signs[:, None, :]
    return unit, rng.standard_normal((depth, width))


def _weight_scale(init: str, sigma_w: float, width: int) -> float:
    """s with W = s * unit for the unit draw of :func:`_unit_draws` (Stack.random's scales)."""
    if init == "gaussian":
        return sigma_w / math.sqrt(width)
    if init == "uniform":
        return sigma_w * math.sqrt(3.0 / width)
    return sigma_w


def _seed_vectors(seed: int, batch: int, width: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, cotangent) (B, n) of a row with this seed: random_inputs and default_grad_output's draws."""
    from vgcore._api import _GRAD_OUTPUT_STREAM

    x = np.random.default_rng(input_seed(seed)).standard_normal((batch, width)).astype(dtype)
    g = np.random.default_rng([seed, _GRAD_OUTPUT_STREAM]).standard_normal((batch, width)).astype(dtype)
    return x, g


def _parallel_map(function: Callable, items: list) -> list:
    """``[function(item) for item in items]`` on the kernels' threads (NumPy's draws release the GIL)."""
    from vgcore.backends._threads import n_threads

    threads = min(n_threads(), len(items))
    if threads <= 1:
        return [function(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads, thread_name_prefix="vgcore-sweep") as pool:
        return list(pool.map(function, items))


@functools.lru_cache(maxsize=4096)
def _resolved_sigma_w(sigma_w: float | str, activation: str, sigma_b: float) -> float:
    from vgcore._stack import _resolve_sigma_w

    return float(_resolve_sigma_w(sigma_w, activation, sigma_b))


# --------------------------------------------------------------------------
# Running a chunk (runs in a dask worker as well: no closures, no driver state)


def _stack_and_inputs(config: dict, seed: int, batch: int, device: str = "cpu"):
    """(model, x, call keywords of model.bind) of one row: a Stack, or a recurrent cell over depth steps."""
    from vgcore._stack import Stack
    from vgcore._utils import random_inputs

    if config["cell"] != "dense":
        from vgcore._recurrent import sweep_model

        return sweep_model(config, seed, batch, input_seed(seed), device)

    stack = Stack.random(config["depth"], config["width"], activation=config["activation"],
                         init=config["init"], sigma_w=config["sigma_w"], sigma_b=config["sigma_b"],
                         residual=config["residual"], norm=config["norm"], dtype=config["dtype"],
                         seed=seed, device=device)
    return stack, random_inputs(stack, batch, seed=input_seed(seed)), {}


@dataclass
class _Profiles:
    """What a chunk keeps of each row's profile: mean log norms and weight-gradient log norms."""

    mean_log_norm: list      # per row: (L+1,) float64
    log_weight_grad_norm: list  # per row: (L,) float64


def _run_shared(positions: list[int], decoded: _Rows, grid: dict[str, list], batch: int,
                group_size: int, out: _Profiles) -> None:
    """Rows that share draws, through the shared-draw kernel, one call per (depth, width, dtype)."""
    from vgcore._activations import ACTIVATION_CODES, NORM_CODES
    from vgcore._ext import _sweep
    from vgcore.backends._threads import blas_held_to_one_thread, n_threads

    configs = {position: decoded.config(grid, position) for position in positions}
    seeds = {position: int(decoded.seed[position]) for position in positions}
    draw_keys = sorted({(seeds[p], configs[p]["depth"], configs[p]["width"], configs[p]["init"])
                        for p in positions})
    draws = dict(zip(draw_keys, _parallel_map(lambda key: _unit_draws(*key), draw_keys), strict=True))
    by_shape: dict[tuple, list[int]] = {}
    for position in positions:
        config = configs[position]
        by_shape.setdefault((config["depth"], config["width"], config["dtype"]), []).append(position)
    for (depth, width, dtype), members in by_shape.items():
        slots = _tile_slots(depth, width, batch, dtype, group_size)
        groups: dict[tuple[int, str], list[int]] = {}
        for local, position in enumerate(members):
            groups.setdefault((seeds[position], configs[position]["init"]), []).append(local)
        unit_weights, unit_biases, xs, gs, tile_groups, tiles = [], [], [], [], [], []
        for group, ((seed, init), locals_) in enumerate(groups.items()):
            unit, unit_bias = draws[(seed, depth, width, init)]
            unit_weights.append(unit.astype(dtype, copy=False))
            unit_biases.append(unit_bias)
            x, g = _seed_vectors(seed, batch, width, dtype)
            xs.append(x)
            gs.append(g)
            for start in range(0, len(locals_), slots):
                tile = np.full(slots, -1, dtype=np.intp)
                chunk = locals_[start:start + slots]
                tile[:len(chunk)] = chunk
                tiles.append(tile)
                tile_groups.append(group)
        member_configs = [configs[p] for p in members]
        sigma_w = [_resolved_sigma_w(c["sigma_w"], c["activation"], c["sigma_b"]) for c in member_configs]
        count = len(members)
        log_grad_norm = np.empty((count, batch, depth + 1))
        log_weight_grad_norm = np.empty((count, depth))
        left_range = np.zeros(count, dtype=np.uint8)
        with blas_held_to_one_thread():
            _sweep.shared_profiles(
                unit_weights, unit_biases, np.stack(xs), np.stack(gs), np.asarray(tile_groups, np.intp),
                np.stack(tiles),
                np.array([_weight_scale(c["init"], s, width) for c, s in zip(member_configs, sigma_w,
                                                                              strict=True)]),
                np.array([c["sigma_b"] for c in member_configs], dtype=np.float64),
                np.array([ACTIVATION_CODES[c["activation"]] for c in member_configs], dtype=np.intc),
                np.array([c["residual"] is not None for c in member_configs], dtype=np.uint8),
                np.array([0.0 if c["residual"] is None else c["residual"] for c in member_configs]),
                np.array([NORM_CODES[c["norm"]] for c in member_configs], dtype=np.intc),
                log_grad_norm, log_weight_grad_norm, left_range, n_threads(),
            )
        means = log_grad_norm.mean(axis=1)
        for local, position in enumerate(members):
            out.mean_log_norm[position] = means[local]
            out.log_weight_grad_norm[position] = log_weight_grad_norm[local]
        # configs whose activations left [2**-R, 2**R): the stack kernels carry them exactly
        # (the scaled forward pass, docs/ARCHITECTURE.md 1.4); this kernel does not
        if left_range.any():
            _run_models([members[local] for local in np.flatnonzero(left_range)], decoded, grid, batch,
                        "cpu", out)


def _run_models(positions: list[int], decoded: _Rows, grid: dict[str, list], batch: int, backend: str,
                out: _Profiles) -> None:
    """Rows through the backend's multi-model runner, on the stacks of Stack.random (drawn in parallel)."""
    from vgcore._api import default_grad_output
    from vgcore.backends import implementation

    device = "cuda" if backend == "cuda" else "cpu"
    tasks = [(decoded.config(grid, p), int(decoded.seed[p])) for p in positions]
    if device == "cpu":
        built = _parallel_map(lambda task: _stack_and_inputs(task[0], task[1], batch, device), tasks)
    else:
        built = [_stack_and_inputs(config, seed, batch, device) for config, seed in tasks]
    by_kind: dict[str, list[int]] = {}
    for local, (model, _, _) in enumerate(built):
        by_kind.setdefault(model.kind, []).append(local)
    for members in by_kind.values():
        models = [built[i][0] for i in members]
        problems = [model.bind(built[i][1], **built[i][2]) for model, i in zip(models, members, strict=True)]
        results = implementation(models[0], backend).gradient_profiles(
            problems, [default_grad_output(model, batch) for model in models])
        for local, result in zip(members, results, strict=True):
            log_grad_norm = _host(result["log_grad_norm"])
            out.mean_log_norm[positions[local]] = np.asarray(log_grad_norm, dtype=np.float64).mean(axis=0)
            out.log_weight_grad_norm[positions[local]] = np.asarray(
                _host(result["log_weight_grad_norm"]), dtype=np.float64)


def _host(array: Any) -> Any:
    get = getattr(array, "get", None)
    if callable(get) and hasattr(array, "__cuda_array_interface__"):
        return get()
    return array


def run_chunk(rows: Sequence[int], grid: dict[str, list], seeds: Sequence[int], batch: int,
              backend: str, group_size: int | None = None):
    """The rows ``rows`` of a sweep as a pyarrow Table (:func:`_arrow_schema`, ``_row`` first).

    On "cpu", rows whose configs share draws with other configs of the grid
    (``group_size`` >= 2, from :func:`_shared_group_size`) run in the
    shared-draw kernel; the others, and every row on "numpy" and "cuda", in
    the backend's ``gradient_profiles`` on the stacks of ``Stack.random``.
    """
    decoded = _Rows.decode(np.asarray(rows, dtype=np.int64), grid, seeds)
    count = decoded.rows.size
    if group_size is None:
        group_size = _shared_group_size(grid)
    profiles = _Profiles([None] * count, [None] * count)
    shared, single = [], []
    for position in range(count):
        batched = backend == "cpu" and group_size >= 2 and _shares_draws(decoded.config(grid, position))
        (shared if batched else single).append(position)
    if shared:
        _run_shared(shared, decoded, grid, batch, group_size, profiles)
    if single:
        _run_models(single, decoded, grid, batch, backend, profiles)
    return _table(decoded, grid, profiles, batch)


# --------------------------------------------------------------------------
# Statistics of many rows at once (vgcore.stats.summary's definitions)


def _summaries(mean_log_norm: np.ndarray, log_weight_grad_norm: np.ndarray) -> dict[str, np.ndarray]:
    """stats.summary's chi, depth_scale, vanishing_depth, imbalance, r2, log_global_norm for R rows.

    mean_log_norm (R, L+1), log_weight_grad_norm (R, L), one depth.  Rows
    stats.summary would refuse (NaN or +inf, a zero output gradient, values
    beyond its bound) get NaN statistics and vanishing depth -1 (none); rows
    with no vanishing depth get -2.  One least-squares fit for all rows:
    the same formulas as vgcore.stats over the finite points of each row.
    """
    from vgcore.stats import MAX_ABS_LOG_NORM

    rows, points = mean_log_norm.shape
    depth = points - 1
    m = mean_log_norm
    w = log_weight_grad_norm
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        finite = np.isfinite(m)
        valid = (~np.isnan(m).any(axis=1) & ~np.isposinf(m).any(axis=1) & finite[:, -1]
                 & (np.where(finite, np.abs(m), 0.0).max(axis=1) <= MAX_ABS_LOG_NORM)
                 & ~np.isnan(w).any(axis=1) & ~np.isposinf(w).any(axis=1)
                 & (np.where(np.isfinite(w), np.abs(w), 0.0).max(axis=1, initial=0.0) <= MAX_ABS_LOG_NORM))
        relative = np.where(valid[:, None], m - np.where(valid, m[:, -1], 0.0)[:, None], 0.0)
        mask = np.isfinite(relative)
        counts = mask.sum(axis=1)
        layers = np.arange(points, dtype=np.float64)
        safe_counts = np.maximum(counts, 1)
        centred_layers = np.where(mask, layers - (mask * layers).sum(axis=1)[:, None] / safe_counts[:, None],
                                  0.0)
        values = np.where(mask, relative, 0.0)
        denominator = (centred_layers * centred_layers).sum(axis=1)
        slope = (centred_layers * values).sum(axis=1) / np.where(denominator > 0, denominator, 1.0)
        centred_values = np.where(mask, values - values.sum(axis=1)[:, None] / safe_counts[:, None], 0.0)
        residuals = centred_values - slope[:, None] * centred_layers
        total = (centred_values * centred_values).sum(axis=1)
        r2 = np.where(total == 0.0, 1.0,
                      np.clip(1.0 - (residuals * residuals).sum(axis=1) / np.where(total == 0.0, 1.0, total),
                              0.0, 1.0))
        few = counts < 2
        slope = np.where(few, np.inf, slope)
        r2 = np.where(few, 1.0, r2)
        chi = np.exp(-2.0 * slope)
        depth_scale = np.where(slope == 0.0, np.inf, 1.0 / (2.0 * np.abs(slope)))

        below = relative[:, ::-1] < math.log(1e-3)
        vanishing = np.where(below.any(axis=1), below.argmax(axis=1), -2)

        k = max(1, depth // 4)
        first, last = relative[:, :k], relative[:, points - k:]
        first_zeros, last_zeros = np.isneginf(first).sum(axis=1), np.isneginf(last).sum(axis=1)
        first_sum = np.where(np.isfinite(first), first, 0.0).sum(axis=1)
        last_sum = np.where(np.isfinite(last), last, 0.0).sum(axis=1)
        imbalance = np.exp((last_sum - first_sum) / k)
        imbalance = np.where(first_zeros > last_zeros, np.inf,
                             np.where(first_zeros < last_zeros, 0.0, imbalance))

        top = w.max(axis=1)
        safe_top = np.where(np.isfinite(top), top, 0.0)
        global_norm = safe_top + 0.5 * np.log(np.exp(2.0 * (w - safe_top[:, None])).sum(axis=1))
        global_norm = np.where(top == -np.inf, -np.inf, global_norm)

    nan = np.full(rows, np.nan)
    return {
        "chi": np.where(valid, chi, nan), "depth_scale": np.where(valid, depth_scale, nan),
        "vanishing_depth": np.where(valid, vanishing, -1), "imbalance": np.where(valid, imbalance, nan),
        "r2": np.where(valid, r2, nan), "log_global_norm": np.where(valid, global_norm, nan),
    }


# --------------------------------------------------------------------------
# Tables and frames, column by column


def _arrow_type(name: str):
    import pyarrow as pa

    return {"int64": pa.int64(), "float64": pa.float64(), "string": pa.string()}[name]


def _arrow_schema():
    import pyarrow as pa

    fields = [("_row", pa.int64())]
    fields += [(key.name, _arrow_type(key.arrow)) for key in GRID_SPEC]
    fields += [("seed", pa.int64())]
    fields += [(name, pa.int64() if name == "vanishing_depth" else pa.float64()) for name in STAT_COLUMNS]
    fields += [("log_grad_norm", pa.list_(pa.float64()))]
    return pa.schema(fields)


# Arrays are built from buffers: pyarrow.array() imports pandas (about 0.3 s) to check its argument,
# which the command line never otherwise needs.


def _numeric_array(values: np.ndarray, missing: np.ndarray | None = None):
    """An int64 / float64 Arrow array over ``values`` (copied contiguous), None where ``missing``."""
    import pyarrow as pa

    values = np.ascontiguousarray(values)
    kind = pa.int64() if values.dtype.kind in "iu" else pa.float64()
    values = values.astype(np.int64 if values.dtype.kind in "iu" else np.float64, copy=False)
    validity = None
    if missing is not None and missing.any():
        validity = pa.py_buffer(np.packbits(~missing, bitorder="little"))
    return pa.Array.from_buffers(kind, len(values), [validity, pa.py_buffer(values)])


def _string_array(values: list):
    """An Arrow string array of Python strings (None: missing)."""
    import pyarrow as pa

    encoded = [b"" if v is None else v.encode() for v in values]
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum([len(v) for v in encoded], out=offsets[1:])
    missing = np.array([v is None for v in values], dtype=bool)
    validity = pa.py_buffer(np.packbits(~missing, bitorder="little")) if missing.any() else None
    return pa.Array.from_buffers(pa.string(), len(values),
                                 [validity, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))])


def _int64_column(table, name: str) -> np.ndarray:
    """An int64 column without nulls as a NumPy array (ChunkedArray.to_numpy imports pandas)."""
    parts = []
    for chunk in table.column(name).chunks:
        data = np.frombuffer(chunk.buffers()[1], dtype=np.int64)
        parts.append(data[chunk.offset:chunk.offset + len(chunk)])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _sorted_by_row(tables: list, schema):
    """The tables' rows in row order, as one table."""
    import pyarrow as pa

    if not tables:
        return schema.empty_table()
    table = pa.concat_tables(tables)
    order = np.argsort(_int64_column(table, "_row"), kind="stable")
    return table.take(_numeric_array(order))


def _key_column(key: GridKey, values: list, index: np.ndarray):
    """A grid key's column: its canonical values taken by index (None: NaN or missing)."""
    if key.arrow == "float64":
        table = np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)
        return _numeric_array(table[index])
    if key.arrow == "int64":
        return _numeric_array(np.asarray(values, dtype=np.int64)[index])
    return _string_array([values[i] for i in index.tolist()])


#: Keys that fix a row's resolved sigma_w and its chi_theory.
_THEORY_KEYS = ("sigma_w", "activation", "sigma_b", "residual", "norm", "cell", "sigma_u", "input_width",
                "forget_bias")


def _sigma_w_and_theory(unique: np.ndarray, grid: dict[str, list],
                        batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Resolved sigma_w and chi_theory (NaN where theory does not apply) per row of value indices.

    ``unique`` (U, len(_THEORY_KEYS)) holds distinct index combinations;
    mean-field theory runs once per distinct (activation, sigma_w, sigma_b)
    (:func:`vgcore.theory.grid.chi1_many`, vectorised per activation).
    """
    from vgcore.theory.grid import chi1_many

    sigma_w = np.empty(len(unique))
    applies = np.zeros(len(unique), dtype=bool)
    recurrent = {}
    batchnorm = {}
    for number, (i_w, i_act, i_b, i_res, i_norm, i_cell, i_u, i_m, i_f) in enumerate(unique.tolist()):
        activation, sigma_b = grid["activation"][i_act], grid["sigma_b"][i_b]
        sigma_w[number] = _resolved_sigma_w(grid["sigma_w"][i_w], activation, sigma_b)
        dense_plain = grid["residual"][i_res] is None and grid["cell"][i_cell] == "dense"
        applies[number] = dense_plain and grid["norm"][i_norm] is None
        if dense_plain and grid["norm"][i_norm] == "batch":  # Stack.chi_theory_at: at the batch size
            batchnorm[number] = activation
        if grid["cell"][i_cell] != "dense":  # recurrent cells: vgcore.theory.recurrent (time is depth)
            recurrent[number] = (grid["cell"][i_cell], activation, sigma_w[number], sigma_b,
                                 grid["sigma_u"][i_u], grid["input_width"][i_m], grid["forget_bias"][i_f])
    chi_theory = np.full(len(unique), np.nan)
    activations = np.array([grid["activation"][i] for i in unique[:, 1]], dtype=object)
    sigma_b = np.array([grid["sigma_b"][i] for i in unique[:, 2]], dtype=np.float64)
    # as Stack.chi_theory: NaN ("theory does not apply") outside the scales theory works with
    from vgcore.theory import SIGMA_B_MAX, SIGMA_W_RANGE

    applies &= (sigma_w >= SIGMA_W_RANGE[0]) & (sigma_w <= SIGMA_W_RANGE[1]) & (sigma_b <= SIGMA_B_MAX)
    for activation in np.unique(activations[applies]) if applies.any() else []:
        chosen = applies & (activations == activation)
        chi_theory[chosen] = chi1_many(str(activation), sigma_w[chosen], sigma_b[chosen])
    if batchnorm:
        from vgcore import theory

        for number, activation in batchnorm.items():
            chi_theory[number] = float(theory.batchnorm_chi(activation, batch))
    if recurrent:
        from vgcore.theory.recurrent import sweep_chi_theory

        for number, options in recurrent.items():
            chi_theory[number] = sweep_chi_theory(*options)
    return sigma_w, chi_theory


def _table(decoded: _Rows, grid: dict[str, list], profiles: _Profiles, batch: int):
    """The chunk's rows as an Arrow table, built column by column."""
    import pyarrow as pa

    count = decoded.rows.size
    columns: dict[str, Any] = {"_row": _numeric_array(decoded.rows)}
    for key in GRID_SPEC:
        if key.name != "sigma_w":  # below: a scheme name resolved to its number
            columns[key.name] = _key_column(key, grid[key.name], decoded.index[key.name])
    # sigma_w: a scheme name resolved to its number, per distinct (sigma_w, activation, sigma_b)
    combos = np.stack([decoded.index[k] for k in _THEORY_KEYS], axis=1) if count else np.zeros(
        (0, len(_THEORY_KEYS)), np.int64)
    unique, inverse = np.unique(combos, axis=0, return_inverse=True)
    sigma_w_unique, chi_theory_unique = _sigma_w_and_theory(unique, grid, batch)
    sigma_w = sigma_w_unique[inverse.reshape(-1)]
    chi_theory = chi_theory_unique[inverse.reshape(-1)]
    columns["sigma_w"] = _numeric_array(sigma_w)
    columns["seed"] = _numeric_array(decoded.seed)

    statistics = {name: np.full(count, np.nan) for name in STAT_COLUMNS}
    statistics["vanishing_depth"] = np.full(count, -1, dtype=np.int64)
    depths = np.asarray(grid["depth"], dtype=np.int64)[decoded.index["depth"]]
    offsets = np.zeros(count + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(depths + 1)
    curves = np.empty(int(offsets[-1]))
    for depth in np.unique(depths):
        chosen = np.flatnonzero(depths == depth)
        means = np.stack([profiles.mean_log_norm[i] for i in chosen])
        weights = np.stack([profiles.log_weight_grad_norm[i] for i in chosen])
        for name, values in _summaries(means, weights).items():
            statistics[name][chosen] = values
        curves[(offsets[chosen][:, None] + np.arange(depth + 1)).ravel()] = means.ravel()
    statistics["chi_theory"] = chi_theory
    for name in STAT_COLUMNS:
        if name == "vanishing_depth":
            values = statistics[name]
            columns[name] = _numeric_array(values, missing=values < 0)
        else:
            columns[name] = _numeric_array(statistics[name])
    columns["log_grad_norm"] = pa.Array.from_buffers(
        pa.list_(pa.float64()), count, [None, pa.py_buffer(offsets.astype(np.int32))],
        children=[_numeric_array(curves)])
    schema = _arrow_schema()
    return pa.Table.from_arrays([columns[name].cast(schema.field(name).type) for name in schema.names],
                                schema=schema)


def _to_frame(table):
    """The frame of a (``_row``-sorted) Arrow table: docs/ARCHITECTURE.md's columns and the row numbers."""
    import pandas as pd

    rows = table.column("_row").to_numpy()
    frame = table.drop_columns(["_row", "log_grad_norm"]).to_pandas()
    frame["vanishing_depth"] = frame["vanishing_depth"].astype(pd.Int64Dtype())
    frame["log_grad_norm"] = pd.Series(_curve_lists(table.column("log_grad_norm")), dtype=object)
    return frame[list(COLUMNS)], rows


def _curve_lists(column) -> list:
    """A list<float64> column as Python lists of floats, without a per-element Arrow conversion."""
    array = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if len(array) == 0:
        return []
    offsets = np.asarray(array.offsets.to_numpy(), dtype=np.int64)
    values = array.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
    offsets = offsets - offsets[0]
    lengths = np.diff(offsets)
    if (lengths == lengths[0]).all() and lengths[0] > 0:
        return values.reshape(len(lengths), int(lengths[0])).tolist()
    return [values[start:stop].tolist() for start, stop in itertools.pairwise(offsets.tolist())]


# --------------------------------------------------------------------------
# The result


class SweepResult:
    """The rows of a sweep.

    Attributes
    ----------
    frame : pandas.DataFrame
        One row per config x seed in row order (see the module docstring),
        columns :data:`COLUMNS`: the grid keys (``sigma_w`` resolved to a
        number where the grid names a scheme; ``residual`` NaN for none;
        ``norm`` missing for none), ``seed``, the statistics of
        ``vgcore.stats.summary`` (chi, depth_scale, vanishing_depth as a
        nullable integer, imbalance, r2, log_global_norm), ``chi_theory``
        (NaN where mean-field theory does not apply: residual or norm) and
        ``log_grad_norm``, the mean over samples of ``Profile.log_grad_norm``
        as a list of L + 1 floats.  Statistics are NaN (vanishing_depth
        missing) for a profile with no finite statistics (a forward pass
        that overflowed).  Built from ``table`` on first use (pandas is
        imported then).
    table : pyarrow.Table
        The same rows as an Arrow table (``_row`` first), as stored.
    grid : dict
        The grid with every key, each a list of canonical values.
    seeds : list of int
    batch : int
    store : str or None
        The store directory, if any.
    computed : int
        Rows computed by this call (the others came from the store).
    seconds : float
        Wall time of this call.
    rows : ndarray of int
        The row number (see the module docstring) of each row of ``frame``;
        ``arange(len(frame))`` for a complete sweep, fewer for a partial store.
    """

    def __init__(self, frame: Any, grid: dict[str, list], seeds: list[int], batch: int,
                 store: str | None = None, computed: int = 0, seconds: float = 0.0,
                 rows: np.ndarray | None = None, *, table: Any = None) -> None:
        if frame is None and table is None:
            raise ValueError("SweepResult: give a frame or a table")
        self._frame = frame
        self.table = table
        self.grid = grid
        self.seeds = seeds
        self.batch = batch
        self.store = store
        self.computed = computed
        self.seconds = seconds
        if rows is None:
            rows = np.arange(len(frame)) if table is None else _int64_column(table, "_row")
        self.rows = rows

    @property
    def frame(self):
        """The rows as a pandas DataFrame (see the class docstring)."""
        if self._frame is None:
            self._frame, _ = _to_frame(self.table)
        return self._frame

    def __len__(self) -> int:
        """Rows held (the grid's rows for a complete sweep)."""
        return len(self.rows)

    def __repr__(self) -> str:
        return (f"SweepResult({len(self)} rows of {_n_configs(self.grid) * len(self.seeds)}, "
                f"batch={self.batch}, store={self.store!r})")

    @property
    def complete(self) -> bool:
        """Whether every row of the grid is present."""
        return len(self) == _n_configs(self.grid) * len(self.seeds)

    def to_xarray(self):
        """The grid view: an xarray.Dataset over the grid's varying keys and ``seed``.

        Dimensions: every grid key with more than one value (in the order of
        :data:`GRID_KEYS`), then ``seed``; keys with one value are scalar
        coordinates.  Coordinates hold the grid's values as given (a scheme
        name for sigma_w stays a name; None for no residual / norm).  Data
        variables: the statistics (vanishing_depth as float, NaN for none)
        and ``log_grad_norm`` over an extra ``layer`` dimension (0 = input
        .. the largest depth; NaN beyond a config's depth).  Rows missing
        from a partial store are NaN.
        """
        import xarray as xr

        shape = [len(self.grid[key]) for key in GRID_KEYS] + [len(self.seeds)]
        dims = [key for key in GRID_KEYS if len(self.grid[key]) > 1] + ["seed"]
        view_shape = [len(self.grid[key]) for key in dims[:-1]] + [len(self.seeds)]
        total = int(np.prod(shape))
        coords: dict[str, Any] = {}
        for key in GRID_KEYS:
            values = self.grid[key]
            if len(values) > 1:
                coords[key] = (key, np.array(values, dtype=object if _needs_object(values) else None))
            else:
                coords[key] = values[0]
        coords["seed"] = ("seed", np.array(self.seeds, dtype=np.int64))
        data: dict[str, Any] = {}
        frame = self.frame
        for name in STAT_COLUMNS:
            full = np.full(total, np.nan)
            full[self.rows] = frame[name].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
            data[name] = (dims, full.reshape(view_shape))
        layers = max(self.grid["depth"]) + 1
        curves = np.full((total, layers), np.nan)
        for position, curve in zip(self.rows, frame["log_grad_norm"], strict=True):
            curves[position, :len(curve)] = curve
        data["log_grad_norm"] = ([*dims, "layer"], curves.reshape([*view_shape, layers]))
        coords["layer"] = ("layer", np.arange(layers))
        return xr.Dataset(data, coords=coords, attrs={"batch": self.batch})


def _needs_object(values: list) -> bool:
    return any(value is None for value in values) or len({type(value) for value in values}) > 1


# --------------------------------------------------------------------------
# Running a sweep


def _work(depth: int, width: int, batch: int) -> float:
    """About the flops of one gradient profile: forward, backward and weight-gradient GEMMs."""
    return 6.0 * depth * width ** 2 * batch


def _ordered_pending(pending: np.ndarray, grid: dict[str, list], seeds: list[int]) -> np.ndarray:
    """Pending rows ordered by shape (depth, width, dtype), then init and seed, then row (stable)."""
    if pending.size == 0:
        return pending
    decoded = _Rows.decode(pending, grid, seeds)
    order = np.lexsort((pending, decoded.seed, decoded.index["init"], decoded.index["dtype"],
                        decoded.index["width"], decoded.index["depth"]))
    return pending[order]


def _default_chunk_size(pending: np.ndarray, grid: dict[str, list], seeds: list[int], batch: int,
                        workers: int, slots: int) -> int:
    if pending.size == 0:
        return 1
    decoded = _Rows.decode(pending, grid, seeds)
    depths = np.asarray(grid["depth"], dtype=np.float64)[decoded.index["depth"]]
    widths = np.asarray(grid["width"], dtype=np.float64)[decoded.index["width"]]
    mean_work = float(np.mean(_work(depths, widths, batch)))
    largest = max(1, int(_CHUNK_WORK // max(mean_work, 1.0)))
    smallest = max(1, int(_MIN_CHUNK_WORK // max(mean_work, 1.0)))
    # at least ~8 chunks per worker where each still holds enough work, for the bar and for balance
    size = min(largest, max(smallest, math.ceil(pending.size / (8 * workers))), _MAX_CHUNK)
    if size > slots:  # whole tiles of the shared-draw kernel, so that no product carries empty slots
        size -= size % slots
    return max(1, size)


def _check_memory(grid: dict[str, list], batch: int) -> None:
    """ValueError naming depth, width and batch when the largest profile cannot have its memory.

    One profile needs its parameters (drawn in float64, then cast) and one
    thread's workspace of stored activations, (2 L + 1) B n values, per thread.
    """
    from vgcore.backends._threads import n_threads

    depth, width = float(max(grid["depth"])), float(max(grid["width"]))
    itemsize = max(np.dtype(dtype).itemsize for dtype in grid["dtype"])
    workspace = ((2 * depth + 1) * batch * width + 3 * depth * batch + 7 * batch * width + width) * itemsize
    nbytes = 2 * depth * width * (width + 1) * 8 + 4 * batch * width * 8 + n_threads() * workspace
    check.check_memory(nbytes, "grid['depth'], grid['width'], batch",
                       f"a profile of depth {depth}, width {width} and batch {batch}")


def _check_steps(grid: dict[str, list], batch: int) -> None:
    """ValueError naming the grid's depth (and width, batch) when a recurrent row would run more
    time steps or multiply-adds than one call may (vgcore._recurrent.MAX_STEPS, MAX_WORK): a
    recurrent row's depth is its steps T, refused here before any work rather than in a worker."""
    recurrent = [cell for cell in grid["cell"] if cell != "dense"]
    if not recurrent:
        return
    from vgcore._recurrent import CELLS, check_steps, check_work

    steps = max(grid["depth"])
    check_steps(steps, 0, steps_name="grid['depth']")
    cell = max(recurrent, key=CELLS.__getitem__)  # the most gate blocks: the most work a step
    check_work(steps, 0, batch, cell, max(grid["width"]), max(grid["input_width"]),
               steps_name="grid['depth'], grid['width'], batch")


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; a stripped install just shows no bar
        return None
    return tqdm(total=total, initial=initial, unit="config", desc="vgcore sweep", dynamic_ncols=True,
                smoothing=0.1)


def _check_backend(backend: Any) -> str:
    try:
        backend = check.check_backend(backend)
    except TypeError as error:
        raise ValueError(str(error)) from None
    if backend == "auto":
        return "cpu"
    if backend == "cuda":
        try:
            from vgcore.backends import cuda_stack  # noqa: F401
        except ImportError as error:
            raise ValueError(f"backend: 'cuda' is not available here ({error})") from None
    return backend


def _client(client: Any):
    """(Client, whether we created it) for a dask Client or a scheduler address."""
    if client is None:
        return None, False
    if isinstance(client, str):
        try:
            from dask.distributed import Client
        except ImportError as error:
            raise ValueError(f"client: dask.distributed is not installed ({error}); "
                             "pip install 'vgcore[dask]'") from None
        try:
            return Client(client, timeout=_CONNECT_SECONDS), True
        except (OSError, TimeoutError, ValueError, TypeError) as error:
            raise ValueError(f"client: cannot connect to the dask scheduler {client!r} within "
                             f"{_CONNECT_SECONDS:g} s ({' '.join(str(error).split())[:200]})") from None
    if not hasattr(client, "submit"):
        raise ValueError(f"client: expected a dask.distributed Client or a scheduler address, "
                         f"got {type(client).__name__}")
    return client, False


def sweep(grid: dict, *, batch: int = 32, seeds: int | Sequence[int] = 1, backend: str = "auto",
          store: str | os.PathLike | None = None, resume: bool = True, progress: bool = True,
          client: Any = None, chunk_size: int | None = None) -> SweepResult:
    """Gradient profiles of every config of a Cartesian grid, for several seeds.

    Configs of one seed share their random draws (see "Shared draws" in the
    module docstring): with the same depth, width and init their weights are
    scalings of the same unit draw, and their inputs and cotangent are the
    same.  So the rows of one seed are correlated across sigma_w, sigma_b,
    activation, residual and norm (phase diagrams come out smooth, and
    differences between configs are measured precisely); independent samples
    come from seeds.  On "cpu" the configs sharing draws run as one batched
    problem.

    Parameters
    ----------
    grid : mapping
        Any of :data:`GRID_KEYS` (depth, width, activation, init, sigma_w,
        sigma_b, residual, norm, dtype, cell, forget_bias, sigma_u,
        input_width), each to a value or a list of values (Python or NumPy
        scalars, lists, tuples, ranges, 1-D arrays).  depth and width are
        required; the other keys default to Stack.random's defaults (cell
        "dense", forget_bias 0, sigma_u 1, input_width 0; a dense stack
        ignores the last three).
    batch : int
        Samples per profile.
    seeds : int or sequence of int
        A count n (seeds 0..n-1) or distinct seeds >= 0.  A row's seed fixes
        its weights, inputs (:func:`input_seed`) and cotangent.
    backend : {"auto", "cpu", "numpy", "cuda"}
        "auto" is "cpu": the shared-draw kernel and the compiled multi-config
        runner.
    store : path, optional
        Directory of Parquet parts (see :mod:`vgcore._store`): each finished
        chunk is written atomically, so an interrupted sweep loses at most
        the chunks in flight.
    resume : bool
        With a store: skip the rows it already holds (the store must hold
        this same sweep: grid, seeds and batch).  False recomputes
        everything, replacing the store's rows.
    progress : bool
        A tqdm bar on stderr when stderr is a terminal; False: never.
    client : dask.distributed.Client or str, optional
        Run chunks as tasks on this cluster (a Client, or a scheduler
        address).  Results stream back as they finish and only this process
        writes the store.
    chunk_size : int, optional
        Rows per chunk; default about 2e10 flops of work per chunk (at least
        2e9 when cut into 8 chunks per worker), whole tiles of the
        shared-draw kernel, at most 4096 rows.  The frame does not depend on
        it.

    Returns
    -------
    SweepResult
        ``.frame`` holds every row of the grid, those of earlier runs into
        the store included, in row order.

    Raises
    ------
    ValueError
        Bad grid (naming the key; recurrent rows, whose depth is the steps
        T, beyond 1e8 steps or 1e16 multiply-adds a call, name depth, width
        and batch: vgcore._recurrent.MAX_STEPS, MAX_WORK), seeds, batch,
        backend, chunk_size or client, before any work; :class:`vgcore._store.StoreError` (a
        ValueError) for a store of another sweep or a damaged part.
    MemoryError
        A chunk's workspace could not be allocated.
    """
    started = time.perf_counter()
    grid = normalize_grid(grid)
    seeds = normalize_seeds(seeds)
    try:
        batch = check.check_int(batch, "batch")
        if chunk_size is not None:
            chunk_size = check.check_int(chunk_size, "chunk_size")
    except TypeError as error:
        raise ValueError(str(error)) from None
    backend = _check_backend(backend)
    if not isinstance(resume, (bool, np.bool_)):
        raise ValueError(f"resume: expected True or False, got {resume!r}")
    _check_steps(grid, batch)
    _check_memory(grid, batch)
    total = _n_configs(grid) * len(seeds)
    identity = {"grid": grid, "seeds": seeds, "batch": batch}
    schema = _arrow_schema()
    group_size = _shared_group_size(grid)

    opened = None
    tables = []
    if store is not None:
        from vgcore import __version__
        from vgcore._store import Store

        opened = Store.open(store, identity, rows=total, resume=bool(resume),
                            metadata={"vgcore_version": __version__, "columns": list(COLUMNS)})
    try:
        done = np.zeros(total, dtype=bool)
        # a fresh store (or none) has nothing to read: this call's chunks are the whole result
        fresh = opened is None or not opened.part_paths()
        if not fresh:
            finished = opened.read_table(schema, columns=["_row"])
            done[_int64_column(finished, "_row")] = True
        pending = _ordered_pending(np.flatnonzero(~done), grid, seeds)
        distributed, owned = _client(client)
        try:
            workers = 1
            if distributed is not None:
                workers = max(1, len(distributed.scheduler_info().get("workers", {})) or 1)
            slots = 1
            if backend == "cpu" and group_size >= 2 and pending.size:
                first = _Rows.decode(pending[:1], grid, seeds).config(grid, 0)
                slots = _tile_slots(first["depth"], first["width"], batch, first["dtype"], group_size)
            size = chunk_size or _default_chunk_size(pending, grid, seeds, batch, workers, slots)
            chunks = [pending[start:start + size] for start in range(0, pending.size, size)]
            bar = _progress_bar(bool(progress), total, total - pending.size)
            try:
                for table in _results(chunks, grid, seeds, batch, backend, group_size, distributed):
                    if opened is not None:
                        opened.write_part(table)
                    if fresh:
                        tables.append(table)
                    if bar is not None:
                        bar.update(table.num_rows)
            finally:
                if bar is not None:
                    bar.close()
        finally:
            if owned:
                distributed.close()
        if opened is not None and not fresh:
            table = opened.read_table(schema)  # earlier runs' rows too
        else:  # every row is in this call's chunks
            table = _sorted_by_row(tables, schema)
    finally:
        if opened is not None:
            opened.close()
    return SweepResult(None, grid, seeds, batch, store=None if store is None else os.fspath(store),
                       computed=int(pending.size), seconds=time.perf_counter() - started, table=table)


def _results(chunks: list[np.ndarray], grid: dict[str, list], seeds: list[int], batch: int, backend: str,
             group_size: int, client: Any) -> Iterator[Any]:
    """Each chunk's table as it finishes: in this process in order, or from the cluster as completed."""
    if client is None:
        for chunk in chunks:
            yield run_chunk(chunk, grid, seeds, batch, backend, group_size)
        return
    from dask.distributed import as_completed

    futures = [client.submit(run_chunk, chunk, grid, seeds, batch, backend, group_size, pure=False)
               for chunk in chunks]
    expected = {future.key: set(chunk.tolist()) for future, chunk in zip(futures, chunks, strict=True)}
    try:
        for future in as_completed(futures):
            table = future.result()
            if set(table.column("_row").to_pylist()) != expected[future.key]:
                raise RuntimeError("a dask worker returned rows of another chunk")
            future.release()
            yield table
    finally:
        for future in futures:
            future.cancel()


def load(store: str | os.PathLike) -> SweepResult:
    """The rows of a store (complete or not) as a SweepResult; nothing is written.

    Raises
    ------
    vgcore._store.StoreError
        Not a store, a damaged manifest, a truncated or foreign part.
    """
    from vgcore._store import Store

    opened = Store.read(store)
    identity = opened.identity
    table = opened.read_table(_arrow_schema())
    return SweepResult(None, identity["grid"], identity["seeds"], identity["batch"],
                       store=os.fspath(store), table=table)
