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

A row for config ``c`` and seed ``s`` is exactly::

    stack = vg.Stack.random(c.depth, c.width, activation=c.activation, init=c.init,
                            sigma_w=c.sigma_w, sigma_b=c.sigma_b, residual=c.residual,
                            norm=c.norm, dtype=c.dtype, seed=s)
    x = vg.random_inputs(stack, batch, seed=input_seed(s))
    profile = vg.gradient_profile(stack, x)          # grad_output: the default, from seed s
    vg.stats.summary(profile)

so the seed fixes the weights, the inputs and the output cotangent, and the
configs of one seed share their random draws (common random numbers: two
sigma_w of one seed differ only by the scale of the same Gaussian weights),
which keeps phase diagrams smooth.  :func:`input_seed` derives the inputs'
seed from ``s`` through NumPy's SeedSequence, so that inputs, weights and
cotangent come from independent streams.

Chunks
------
Pending rows are ordered by shape (depth, width, dtype) and cut into chunks;
on the "cpu" backend each chunk runs in one call of the compiled multi-config
runner (:func:`vgcore.backends.cpu_stack.gradient_profiles`), across all cores.  A chunk is
also the unit of the store (one Parquet part) and of distribution (one dask
task).
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vgcore import _validation as check
from vgcore._stack import INITS, SIGMA_W_SCHEMES

__all__ = ["GRID_KEYS", "STAT_COLUMNS", "SweepResult", "input_seed", "load", "sweep"]

#: Grid keys in the order of the Cartesian product (the last varies fastest).
GRID_KEYS = ("depth", "width", "activation", "init", "sigma_w", "sigma_b", "residual", "norm", "dtype")
#: Summary statistics kept per row (from vgcore.stats.summary).
STAT_COLUMNS = ("chi", "depth_scale", "vanishing_depth", "imbalance", "r2", "chi_theory")
#: Columns of SweepResult.frame, in order.
COLUMNS = (*GRID_KEYS, "seed", *STAT_COLUMNS, "log_grad_norm")
#: Defaults of keys missing from a grid: those of Stack.random (depth and width have none).
DEFAULTS = {"activation": "tanh", "init": "gaussian", "sigma_w": 1.0, "sigma_b": 0.0,
            "residual": None, "norm": None, "dtype": "float64"}
BACKENDS = ("auto", "cpu", "cuda", "numpy")

# Mixed with a row's seed to seed its inputs: "inpu".
_INPUT_STREAM = 0x696E7075
# Work (about flops) in one chunk by default: ~1 s of a 2-core machine, so a kill loses little
# and the progress bar moves, while each compiled call still holds many configs.
_CHUNK_WORK = 2e9
_MAX_CHUNK = 512
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
        if key in ("depth", "width"):
            return check.check_int(value, key)
        if key == "activation":
            return check.check_activation(value)
        if key == "init":
            if not isinstance(value, str) or value not in INITS:
                raise ValueError(f"unknown init {value!r}; expected one of {INITS}")
            return value
        if key == "sigma_w":
            if isinstance(value, str):
                if value not in (*SIGMA_W_SCHEMES, "critical"):
                    raise ValueError(f"unknown scheme {value!r}; expected a number or one of "
                                     f"{(*SIGMA_W_SCHEMES, 'critical')}")
                return value
            return check.check_real(value, key, positive=True)
        if key == "sigma_b":
            return check.check_real(value, key, minimum=0.0)
        if key == "residual":
            return check.check_residual(value)
        if key == "norm":
            return check.check_norm(value)
        if key == "dtype":
            return check.check_dtype(value).name
    except (TypeError, ValueError) as error:
        message = str(error)
        prefix = f"{key}: "
        raise _grid_error(key, message[len(prefix):] if message.startswith(prefix) else message) from None
    raise AssertionError(key)  # pragma: no cover - keys are checked first


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


#: Most rows one sweep takes (configs x seeds): each is a task held in memory, and a row of the store.
MAX_ROWS = 10_000_000


def _check_size(grid: dict[str, list], seeds: list[int], batch: int) -> None:
    """Refuse, before any work, a sweep with too many rows or a config whose arrays cannot fit.

    Raises
    ------
    ValueError
        Naming seeds / grid (rows) or grid['depth'], grid['width'], batch (memory).
    """
    configs = math.prod(len(values) for values in grid.values())
    if configs * len(seeds) > MAX_ROWS:
        raise ValueError(f"grid, seeds: {configs:,} configs x {len(seeds):,} seeds is "
                         f"{configs * len(seeds):,} rows; at most {MAX_ROWS:,} per sweep")
    # the largest config: its parameters, inputs, and about three values per unit, layer and sample
    depth, width = max(grid["depth"]), max(grid["width"])
    check.check_memory(8 * depth * width * (width + 1) + 8 * (3 * depth + 2) * batch * width,
                       "grid['depth'], grid['width'], batch",
                       f"a {depth}-layer, {width}-wide config with batch {batch}")


def _configs(grid: dict[str, list]) -> list[dict]:
    return [dict(zip(GRID_KEYS, values, strict=True))
            for values in itertools.product(*(grid[key] for key in GRID_KEYS))]


# --------------------------------------------------------------------------
# Running a chunk (runs in a dask worker as well: no closures, no driver state)


def _stack_and_inputs(config: dict, seed: int, batch: int, device: str = "cpu"):
    from vgcore._stack import Stack
    from vgcore._utils import random_inputs

    stack = Stack.random(config["depth"], config["width"], activation=config["activation"],
                         init=config["init"], sigma_w=config["sigma_w"], sigma_b=config["sigma_b"],
                         residual=config["residual"], norm=config["norm"], dtype=config["dtype"],
                         seed=seed, device=device)
    return stack, random_inputs(stack, batch, seed=input_seed(seed))


def _row_values(row: int, config: dict, stack, profile) -> dict:
    """One row of the frame (plus ``_row``) from a host Profile."""
    from vgcore import stats

    mean_log_norm = np.asarray(profile.log_grad_norm, dtype=np.float64).mean(axis=0)
    try:
        summary = stats.summary(profile)
    except ValueError:  # non-finite profile (the forward pass overflowed): no statistics
        summary = {key: math.nan for key in STAT_COLUMNS}
        summary["vanishing_depth"] = None
        summary["chi_theory"] = stack.chi_theory
    values = {"_row": row, **config}
    values["sigma_w"] = stack.sigma_w  # a scheme name ("he", "critical") resolved to its number
    values["seed"] = stack.seed
    values.update({key: summary[key] for key in STAT_COLUMNS})
    values["log_grad_norm"] = mean_log_norm.tolist()
    return values


def _build(tasks: Sequence[tuple[int, dict, int]], batch: int, device: str) -> list[tuple]:
    """(stack, inputs) per task, drawn on the kernels' threads.

    Drawing the weights is most of a chunk's Python-side work (an (L, n, n)
    normal draw per config) and NumPy's generators release the GIL while
    filling arrays, so the draws run on as many threads as the kernels use;
    each stack still comes from its own seed, so the result is the same.
    """
    from vgcore.backends._threads import n_threads

    threads = min(n_threads(), len(tasks)) if device == "cpu" else 1
    if threads <= 1:
        return [_stack_and_inputs(config, seed, batch, device) for _, config, seed in tasks]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads, thread_name_prefix="vgcore-sweep") as pool:
        return list(pool.map(lambda task: _stack_and_inputs(task[1], task[2], batch, device), tasks))


def run_chunk(tasks: Sequence[tuple[int, dict, int]], batch: int, backend: str) -> list[dict]:
    """Rows for ``tasks`` = [(row, config, seed), ...]: build models, profile them, summarise.

    The models of each kind go to one ``gradient_profiles`` call of the
    backend's implementation (vgcore.backends): on "cpu" that is the compiled
    multi-config runner, in parallel over configs.
    """
    from vgcore._api import default_grad_output
    from vgcore._profile import Profile
    from vgcore.backends import implementation

    device = "cuda" if backend == "cuda" else "cpu"
    built = _build(tasks, batch, device)
    profiles: list[Profile | None] = [None] * len(built)
    by_kind: dict[str, list[int]] = {}
    for index, (model, _) in enumerate(built):
        by_kind.setdefault(model.kind, []).append(index)
    for members in by_kind.values():
        models = [built[i][0] for i in members]
        problems = [model.bind(built[i][1]) for model, i in zip(models, members, strict=True)]
        results = implementation(models[0], backend).gradient_profiles(
            problems, [default_grad_output(model, batch) for model in models])
        for index, model, result in zip(members, models, results, strict=True):
            profiles[index] = Profile(chi_theory=model.chi_theory, config=model.config(), **result).to_numpy()
    return [_row_values(row, config, stack, profile)
            for (row, config, _), (stack, _), profile in zip(tasks, built, profiles, strict=True)]


def _arrow_schema():
    import pyarrow as pa

    return pa.schema([
        ("_row", pa.int64()),
        ("depth", pa.int64()), ("width", pa.int64()), ("activation", pa.string()), ("init", pa.string()),
        ("sigma_w", pa.float64()), ("sigma_b", pa.float64()), ("residual", pa.float64()),
        ("norm", pa.string()), ("dtype", pa.string()), ("seed", pa.int64()),
        ("chi", pa.float64()), ("depth_scale", pa.float64()), ("vanishing_depth", pa.int64()),
        ("imbalance", pa.float64()), ("r2", pa.float64()), ("chi_theory", pa.float64()),
        ("log_grad_norm", pa.list_(pa.float64())),
    ])


def _to_table(rows: list[dict]):
    import pyarrow as pa

    schema = _arrow_schema()
    return pa.Table.from_pydict({name: [row[name] for row in rows] for name in schema.names}, schema=schema)


def _to_frame(table):
    """The frame of a (``_row``-sorted) Arrow table: DESIGN.md's columns and the row numbers."""
    import pandas as pd

    rows = table.column("_row").to_numpy()
    frame = table.drop_columns(["_row", "log_grad_norm"]).to_pandas()
    frame["vanishing_depth"] = frame["vanishing_depth"].astype(pd.Int64Dtype())
    frame["log_grad_norm"] = pd.Series(table.column("log_grad_norm").to_pylist(), dtype=object)
    return frame[list(COLUMNS)], rows


# --------------------------------------------------------------------------
# The result


@dataclass
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
        nullable integer, imbalance, r2), ``chi_theory`` (NaN where
        mean-field theory does not apply: residual or norm) and
        ``log_grad_norm``, the mean over samples of ``Profile.log_grad_norm``
        as a list of L + 1 floats.  Statistics are NaN (vanishing_depth
        missing) for a profile with no finite statistics (a forward pass
        that overflowed).
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

    frame: Any
    grid: dict[str, list]
    seeds: list[int]
    batch: int
    store: str | None = None
    computed: int = 0
    seconds: float = 0.0
    rows: np.ndarray = field(default=None, repr=False)  # row number of each frame row

    def __post_init__(self) -> None:
        if self.rows is None:
            self.rows = np.arange(len(self.frame))

    @property
    def complete(self) -> bool:
        """Whether every row of the grid is present."""
        return len(self.frame) == len(_configs(self.grid)) * len(self.seeds)

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
        for name in STAT_COLUMNS:
            full = np.full(total, np.nan)
            full[self.rows] = self.frame[name].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
            data[name] = (dims, full.reshape(view_shape))
        layers = max(self.grid["depth"]) + 1
        curves = np.full((total, layers), np.nan)
        for position, curve in zip(self.rows, self.frame["log_grad_norm"], strict=True):
            curves[position, :len(curve)] = curve
        data["log_grad_norm"] = ([*dims, "layer"], curves.reshape([*view_shape, layers]))
        coords["layer"] = ("layer", np.arange(layers))
        return xr.Dataset(data, coords=coords, attrs={"batch": self.batch})


def _needs_object(values: list) -> bool:
    return any(value is None for value in values) or len({type(value) for value in values}) > 1


# --------------------------------------------------------------------------
# Running a sweep


def _work(config: dict, batch: int) -> float:
    """About the flops of one gradient profile: forward, backward and weight-gradient GEMMs."""
    return 6.0 * config["depth"] * config["width"] ** 2 * batch


def _default_chunk_size(pending: list[tuple[int, dict, int]], batch: int, workers: int) -> int:
    if not pending:
        return 1
    mean_work = sum(_work(config, batch) for _, config, _ in pending) / len(pending)
    size = int(_CHUNK_WORK // max(mean_work, 1.0))
    # at least ~8 chunks per worker where the sweep is big enough, for the bar and for balance
    size = min(size, math.ceil(len(pending) / (8 * workers)), _MAX_CHUNK)
    return max(1, size)


def _chunks(pending: list[tuple[int, dict, int]], size: int) -> Iterator[list]:
    """Pending tasks ordered by shape (stable: row order within a shape), cut into chunks."""
    ordered = sorted(pending, key=lambda task: (task[1]["depth"], task[1]["width"], task[1]["dtype"]))
    for start in range(0, len(ordered), size):
        yield ordered[start:start + size]


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

    Parameters
    ----------
    grid : mapping
        Any of depth, width, activation, init, sigma_w, sigma_b, residual,
        norm, dtype, each to a value or a list of values (Python or NumPy
        scalars, lists, tuples, ranges, 1-D arrays).  depth and width are
        required; the other keys default to Stack.random's defaults.
    batch : int
        Samples per profile.
    seeds : int or sequence of int
        A count n (seeds 0..n-1) or distinct seeds >= 0.  A row's seed fixes
        its weights, inputs (:func:`input_seed`) and cotangent.
    backend : {"auto", "cpu", "numpy", "cuda"}
        "auto" is "cpu": chunks run in the compiled multi-config runner.
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
        Rows per chunk; default about 2e9 flops of work per chunk, at least 8
        chunks per worker, at most 512 rows.

    Returns
    -------
    SweepResult
        ``.frame`` holds every row of the grid, those of earlier runs into
        the store included, in row order.

    Raises
    ------
    ValueError
        Bad grid (naming the key), seeds, batch, backend, chunk_size or
        client, before any work; :class:`vgcore._store.StoreError` (a
        ValueError) for a store of another sweep or a damaged part.
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
    _check_size(grid, seeds, batch)
    configs = _configs(grid)
    total = len(configs) * len(seeds)
    identity = {"grid": grid, "seeds": seeds, "batch": batch}
    tasks = [(index * len(seeds) + position, config, seed)
             for index, config in enumerate(configs) for position, seed in enumerate(seeds)]
    schema = _arrow_schema()

    opened = None
    tables = []
    if store is not None:
        from vgcore import __version__
        from vgcore._store import Store

        opened = Store.open(store, identity, rows=total, resume=bool(resume),
                            metadata={"vgcore_version": __version__, "columns": list(COLUMNS)})
    try:
        done = np.zeros(total, dtype=bool)
        if opened is not None:
            finished = opened.read_table(schema, columns=["_row"])
            done[finished.column("_row").to_numpy()] = True
        pending = [task for task in tasks if not done[task[0]]]
        distributed, owned = _client(client)
        try:
            workers = 1
            if distributed is not None:
                workers = max(1, len(distributed.scheduler_info().get("workers", {})) or 1)
            size = chunk_size or _default_chunk_size(pending, batch, workers)
            chunks = list(_chunks(pending, size))
            bar = _progress_bar(bool(progress), total, total - len(pending))
            try:
                for rows in _results(chunks, batch, backend, distributed):
                    table = _to_table(rows)
                    if opened is not None:
                        opened.write_part(table)
                    else:
                        tables.append(table)
                    if bar is not None:
                        bar.update(len(rows))
            finally:
                if bar is not None:
                    bar.close()
        finally:
            if owned:
                distributed.close()
        if opened is not None:
            table = opened.read_table(schema)
        else:
            import pyarrow as pa

            table = pa.concat_tables(tables).sort_by("_row") if tables else schema.empty_table()
    finally:
        if opened is not None:
            opened.close()
    frame, rows = _to_frame(table)
    return SweepResult(frame, grid, seeds, batch, store=None if store is None else os.fspath(store),
                       computed=len(pending), seconds=time.perf_counter() - started, rows=rows)


def _results(chunks: list[list], batch: int, backend: str, client: Any) -> Iterator[list[dict]]:
    """Rows of each chunk as it finishes: in this process in order, or from the cluster as completed."""
    if client is None:
        for chunk in chunks:
            yield run_chunk(chunk, batch, backend)
        return
    from dask.distributed import as_completed

    futures = [client.submit(run_chunk, chunk, batch, backend, pure=False) for chunk in chunks]
    expected = {future.key: {row for row, _, _ in chunk}
                for future, chunk in zip(futures, chunks, strict=True)}
    try:
        for future in as_completed(futures):
            rows = future.result()
            if {values["_row"] for values in rows} != expected[future.key]:
                raise RuntimeError("a dask worker returned rows of another chunk")
            future.release()
            yield rows
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
    frame, rows = _to_frame(opened.read_table(_arrow_schema()))
    return SweepResult(frame, identity["grid"], identity["seeds"], identity["batch"],
                       store=os.fspath(store), rows=rows)
