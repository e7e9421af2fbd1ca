"""Benchmark runner: the canonical jobs of DESIGN.md on every backend, in one run.

``vgcore bench`` (and ``python -m vgcore._bench``) runs each canonical job on

- ``cpu``   the compiled kernels (vgcore's "cpu" backend);
- ``cuda``  the CuPy mirror, when CuPy imports and a GPU is present;
- ``numpy`` the plain NumPy reference (``backend="numpy"``), the ratios' base;
- ``torch`` the same computation written as a PyTorch user would, when
  PyTorch is installed: ``nn.Linear`` layers, autograd with ``retain_grad``
  on every layer's output for the per-layer gradient norms and the weight
  gradients' norms; ``torch.func.jacrev`` for the Jacobian;
  ``torch.set_num_threads`` set to vgcore's thread count;
- ``gemm``  plain NumPy matrix products of the job's GEMM shapes (a gradient
  profile is 3 GEMMs of (B, n) x (n, n) per layer: forward, backward and
  weight gradient; the Jacobian is one (n, n) x (n, n) per layer plus the
  forward), the machine's attainable rate for that work;
- ``vg.sweep`` on the sweep job, when ``vgcore.sweep`` exists.

Every backend runs once as warm-up, then the timed runs come in ABBA order
(all backends in turn, then in reverse), so that a drift in the load from
other processes falls on all of them alike; the number of repeats adapts to
the job's duration (``--budget``).
Times are medians.  Ratios are speed-ups, ``time(base) / time(row)``:
``vs_numpy`` > 1 means faster than the NumPy reference; ``gemm_fraction`` is
the row's flop rate over the GEMM rate (``time(gemm) / time(row)``).

Memory: the warm-up run of ``cpu`` and ``numpy`` on the gradient-profile
jobs runs under :mod:`tracemalloc` (NumPy reports its array allocations to
it), and the peak is compared to what the stored activations need,
``L * B * n`` values.  Workspaces that compiled code takes with C ``malloc``
are not traced; the peak resident-set growth (Linux, ``VmHWM`` after a
reset) is reported beside it as a cross-check.

JSON (``--json FILE``) holds one object with the keys

- ``schema`` (1), ``date`` (ISO 8601, UTC), ``quick`` (bool), ``machine``
  (``cpu``, ``cores``, ``threads``, ``platform``, ``python``, ``numpy``,
  ``scipy``, ``torch``, ``cupy``, ``vgcore``, ``blas``, ``load_average``),
  ``load_average_after`` (the machine's load averages before and after);
- ``jobs``: one object per job: ``job``, ``what``, ``depth``, ``width``,
  ``batch``, ``configs``, ``flops``, ``other_load`` (CPU time other
  processes took during the job, a fraction of all cores; null where
  /proc/stat is absent);
- ``results``: one object per job and backend: ``job``, ``backend``,
  ``median_s``, ``times_s``, ``repeats``, ``gflops``, ``vs_numpy``,
  ``vs_torch``, ``gemm_fraction`` (null where the base did not run),
  ``max_abs_diff`` (largest difference of its result from the NumPy
  reference's, null where either is absent), ``detail``;
- ``memory``: one object per job and backend: ``job``, ``backend``,
  ``activations_bytes``, ``peak_traced_bytes``, ``traced_ratio``,
  ``peak_rss_bytes``, ``rss_ratio`` (null where not measurable);
- ``notes``: strings (skipped backends and why).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Every job: tanh, sigma_w 1 (the sweep: 0.5 .. 2.5), sigma_b 0.05, float64.
ACTIVATION = "tanh"
SIGMA_W = 1.0
SIGMA_B = 0.05
DTYPE = "float64"
SWEEP_SIGMA_W = (0.5, 2.5)

BACKENDS = ("cpu", "numpy", "cuda")
#: Runners faster than this get one untimed run before each block of timed runs.
SETTLE_BELOW_S = 1.0
#: Other processes' share of the cores above which a job gets a note that the machine was busy.
BUSY_FRACTION = 0.05
#: Order of the rows of a job in the table.
SEGMENT_LABEL = "cpu seg=auto"
ROW_ORDER = ("cpu", SEGMENT_LABEL, "cuda", "vg.sweep", "numpy", "torch", "gemm")


@dataclass(frozen=True)
class Job:
    """One canonical job (DESIGN.md, "Canonical benchmark jobs")."""

    name: str
    kind: str  # "profile", "sweep" or "jacobian"
    depth: int
    width: int
    batch: int
    configs: int = 1

    @property
    def what(self) -> str:
        if self.kind == "jacobian":
            return "full Jacobian"
        if self.kind == "sweep":
            low, high = SWEEP_SIGMA_W
            return f"{self.configs} configs, sigma_w {low}..{high}"
        return "gradient_profile"

    def gemm_shapes(self) -> list[tuple[int, int, int]]:
        """The job's matrix products as (rows, n, count): ``count`` products (rows, n) x (n, n)."""
        n = self.width
        if self.kind == "jacobian":
            # forward of the batch, then the n cotangents e_i pulled back through every layer
            return [(self.batch, n, self.depth), (n, n, self.depth)]
        # forward, backward, weight gradient: three (B, n) x (n, n) products per layer
        return [(self.batch, n, 3 * self.depth * self.configs)]

    @property
    def flops(self) -> int:
        return sum(2 * rows * n * n * count for rows, n, count in self.gemm_shapes())

    def activations_bytes(self) -> int:
        """What the stored activations of one gradient profile need: L x B x n values."""
        return self.depth * self.batch * self.width * np.dtype(DTYPE).itemsize


JOBS = {
    "deep_narrow": Job("deep_narrow", "profile", 500, 32, 16),
    "medium": Job("medium", "profile", 100, 256, 64),
    "wide": Job("wide", "profile", 20, 2048, 512),
    "sweep100": Job("sweep100", "sweep", 100, 64, 16, configs=100),
    "jacobian": Job("jacobian", "jacobian", 100, 256, 1),
}

#: Tiny versions of the same jobs, for tests and a quick look (``--quick``).
QUICK_JOBS = {
    "deep_narrow": Job("deep_narrow", "profile", 20, 8, 4),
    "medium": Job("medium", "profile", 6, 16, 4),
    "wide": Job("wide", "profile", 3, 64, 16),
    "sweep100": Job("sweep100", "sweep", 5, 8, 4, configs=5),
    "jacobian": Job("jacobian", "jacobian", 5, 16, 1),
}


# ---------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    """An installed package's version, read from its metadata (without importing it) where possible."""
    if importlib.util.find_spec(module) is None:
        return None
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:  # e.g. cupy ships as cupy-cuda12x
        pass
    try:
        return str(importlib.import_module(module).__version__)
    except Exception as error:  # a broken install is reported, not fatal
        return f"unusable ({type(error).__name__})"


def _blas() -> str | None:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    found = [f"{info.get('internal_api')} {info.get('version')} ({info.get('num_threads')} threads)"
             for info in threadpool_info() if info.get("user_api") == "blas"]
    return ", ".join(found) or None


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: how busy the (possibly shared) machine was."""
    try:
        return [round(load, 2) for load in os.getloadavg()]
    except OSError:
        return None


class OtherLoad:
    """CPU time other processes take while a block of code runs, as a fraction of the machine.

    The machine's busy time (/proc/stat) minus this process's own CPU time
    (all its threads), over wall time x cores: 0 on a quiet machine, 1 when
    other processes could have had every core.  None where /proc/stat is absent.
    """

    def __enter__(self) -> OtherLoad:
        self.fraction: float | None = None
        self._start = self._sample()
        return self

    def __exit__(self, *exc_info) -> None:
        end = self._sample()
        if self._start is None or end is None:
            return
        (busy0, own0, wall0), (busy1, own1, wall1) = self._start, end
        capacity = (wall1 - wall0) * (os.cpu_count() or 1)
        if capacity > 0:
            self.fraction = min(1.0, max(0.0, ((busy1 - busy0) - (own1 - own0)) / capacity))

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as stat:
                fields = [int(value) for value in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal ...: busy is all but idle and iowait
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
        own = sum(os.times()[:2])
        return busy, own, time.monotonic()


def vgcore_threads() -> int:
    """Threads the compiled kernels use (OpenMP's maximum)."""
    from vgcore import _cpu

    return _cpu.n_threads()


def machine_info() -> dict:
    """CPU model, cores, threads and library versions, for the JSON and RESULTS.md."""
    import vgcore

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": vgcore_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": _version("scipy"),
        "torch": _version("torch"),
        "cupy": _version("cupy"),
        "vgcore": vgcore.__version__,
        "blas": _blas(),
        "load_average": _load_average(),
    }


#: PyTorch's thread count when the benchmark first imported it.
_TORCH_THREADS_AT_IMPORT: list[int] = []


@functools.cache
def torch_status() -> tuple[bool, str]:
    """(whether PyTorch imports here, why not); imports it on the first call."""
    try:
        import torch
    except ImportError:
        return False, "PyTorch is not installed"
    except Exception as error:  # a broken install is skipped, not fatal
        return False, f"PyTorch does not import ({type(error).__name__}: {error})"
    _TORCH_THREADS_AT_IMPORT.append(torch.get_num_threads())
    return True, ""


def torch_available() -> bool:
    return torch_status()[0]


def cuda_status() -> tuple[bool, str]:
    """(whether the "cuda" backend can run here, why not)."""
    if importlib.util.find_spec("cupy") is None:
        return False, "cupy is not installed"
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False, "no CUDA device"
    except Exception as error:
        return False, f"no usable CUDA device ({type(error).__name__}: {error})"
    if importlib.util.find_spec("vgcore._cuda") is None:
        return False, "vgcore was built without its CuPy backend (vgcore._cuda)"
    return True, ""


# ---------------------------------------------------------------------------
# The computations, one callable per backend
# ---------------------------------------------------------------------------

def make_stack(job: Job, *, sigma_w: float = SIGMA_W, seed: int = 0, device: str = "cpu"):
    import vgcore as vg

    return vg.Stack.random(job.depth, job.width, activation=ACTIVATION, sigma_w=sigma_w, sigma_b=SIGMA_B,
                           dtype=DTYPE, seed=seed, device=device)


@dataclass
class Problem:
    """The job's stacks and inputs, on the host (float64)."""

    job: Job
    stacks: list
    xs: list[np.ndarray]
    grad_outputs: list[np.ndarray]


def make_problem(job: Job) -> Problem:
    import vgcore as vg
    from vgcore._api import default_grad_output

    if job.kind == "sweep":
        sigma_ws = np.linspace(*SWEEP_SIGMA_W, job.configs)
        stacks = [make_stack(job, sigma_w=float(s), seed=i) for i, s in enumerate(sigma_ws)]
    else:
        stacks = [make_stack(job)]
    xs = [vg.random_inputs(stack, job.batch, seed=1000 + i) for i, stack in enumerate(stacks)]
    grad_outputs = [default_grad_output(stack, job.batch) for stack in stacks]
    return Problem(job, stacks, xs, grad_outputs)


def comparable(result: Any) -> np.ndarray | None:
    """A backend's result flattened for comparison with the reference's (outside the timed call).

    Profiles and the chunk runner's dicts give their log_grad_norm and
    log_weight_grad_norm; arrays (NumPy, CuPy, PyTorch) their values;
    sequences the concatenation of their items; anything else None.
    """
    if isinstance(result, dict) or hasattr(result, "log_weight_grad_norm"):
        get = result.get if isinstance(result, dict) else lambda name: getattr(result, name)
        return comparable([get("log_grad_norm"), get("log_weight_grad_norm")])
    if isinstance(result, (list, tuple)):
        parts = [comparable(item) for item in result]
        return None if any(part is None for part in parts) else np.concatenate(parts or [np.empty(0)])
    if hasattr(result, "detach"):  # a torch tensor
        return result.detach().cpu().numpy().ravel()
    if hasattr(result, "get") and hasattr(result, "__cuda_array_interface__"):  # a CuPy array
        return np.asarray(result.get()).ravel()
    if isinstance(result, np.ndarray):
        return result.ravel()
    return None


def segment_supported() -> bool:
    """Whether ``gradient_profile`` takes ``segment`` (recompute instead of keeping activations)."""
    import inspect

    import vgcore as vg

    return "segment" in inspect.signature(vg.gradient_profile).parameters


def vgcore_runner(problem: Problem, backend: str, **options: Any) -> Callable[[], Any]:
    """The job on a vgcore backend ("cpu" or "numpy") through the public API.

    ``options`` go to ``gradient_profile`` (``segment="auto"``: recompute).

    The sweep job on "cpu" calls the sweep's chunk runner
    (``vgcore._cpu.gradient_profiles``) on all configs at once; on "numpy"
    it calls the reference once per config.
    """
    import vgcore as vg

    job = problem.job
    if job.kind == "jacobian":
        stack, x = problem.stacks[0], problem.xs[0]
        return lambda: vg.jacobian(stack, x, backend=backend)
    if job.kind == "sweep" and backend == "cpu":
        from vgcore import _cpu

        return lambda: _cpu.gradient_profiles(problem.stacks, problem.xs, problem.grad_outputs)

    def profiles():
        return [vg.gradient_profile(stack, x, g, backend=backend, **options)
                for stack, x, g in zip(problem.stacks, problem.xs, problem.grad_outputs, strict=True)]

    return profiles


def cuda_runner(problem: Problem) -> Callable[[], Any]:
    """The job on the "cuda" backend: device copies of the same stacks; timed to completion."""
    import cupy

    import vgcore as vg

    job = problem.job
    stacks = [vg.Stack(cupy.asarray(s.weights), cupy.asarray(s.biases), activation=s.activation)
              for s in problem.stacks]
    xs = [cupy.asarray(x) for x in problem.xs]
    grad_outputs = [cupy.asarray(g) for g in problem.grad_outputs]

    def run():
        if job.kind == "jacobian":
            result = vg.jacobian(stacks[0], xs[0], backend="cuda")
        else:
            result = [vg.gradient_profile(stack, x, g, backend="cuda")
                      for stack, x, g in zip(stacks, xs, grad_outputs, strict=True)]
        cupy.cuda.Device().synchronize()
        return result

    return run


def sweep_runner(problem: Problem) -> Callable[[], Any] | None:
    """``vgcore.sweep`` on the sweep job's grid (its own seeds), or None where it does not exist yet."""
    import vgcore as vg

    sweep = getattr(vg, "sweep", None)
    if not callable(sweep):
        if importlib.util.find_spec("vgcore.sweep") is None:
            return None
        sweep = getattr(importlib.import_module("vgcore.sweep"), "sweep", None)
        if not callable(sweep):
            return None
    job = problem.job
    grid = {"depth": job.depth, "width": job.width, "activation": ACTIVATION, "sigma_b": SIGMA_B,
            "dtype": DTYPE, "sigma_w": [float(s) for s in np.linspace(*SWEEP_SIGMA_W, job.configs)]}
    return lambda: sweep(grid, batch=job.batch, seeds=1, backend="cpu", store=None, progress=False)


_TORCH_ACTIVATIONS = ("tanh", "relu", "sigmoid", "linear", "gelu", "silu", "elu", "selu", "erf")


def _torch_activation(name: str):
    import torch
    from torch.nn import functional

    table = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid, "linear": lambda h: h,
             "gelu": functional.gelu, "silu": functional.silu, "elu": functional.elu,
             "selu": functional.selu, "erf": torch.erf}
    if name not in table:
        raise ValueError(f"activation: the PyTorch comparison covers {_TORCH_ACTIVATIONS}, got {name!r}")
    return table[name]


def torch_model(stack):
    """An ``nn.ModuleList`` of ``nn.Linear`` layers holding the stack's weights (plain stacks only)."""
    import torch
    from torch import nn

    if stack.residual is not None or stack.norm is not None:
        raise ValueError("stack: the PyTorch comparison covers plain stacks (no residual, no norm)")
    layers = nn.ModuleList()
    with torch.no_grad():
        for weight, bias in zip(np.asarray(stack.weights), np.asarray(stack.biases), strict=True):
            layer = nn.Linear(stack.width, stack.width, dtype=torch.float64)
            layer.weight.copy_(torch.tensor(weight))
            layer.bias.copy_(torch.tensor(bias))
            layers.append(layer)
    return layers


def torch_gradient_profile(layers, x, grad_output, activation: str = ACTIVATION):
    """Per-layer log gradient norms (B, L+1) and log weight-gradient norms (L,), the PyTorch way.

    Forward through the layers keeping every output with ``retain_grad``,
    ``backward`` of ``sum(x_L * grad_output)``, then the norms of the
    retained gradients and of the weights' ``.grad``.  No renormalisation
    (float64 does not underflow at these depths) and no saturation / dead
    counts: this does less work than vgcore's profile.
    """
    import torch

    phi = _torch_activation(activation)
    for layer in layers:
        layer.weight.grad = layer.bias.grad = None
    h = x.detach().requires_grad_(True)
    outputs = [h]
    for layer in layers:
        h = phi(layer(h))
        h.retain_grad()
        outputs.append(h)
    (h * grad_output).sum().backward()
    log_grad_norm = torch.stack([o.grad.norm(dim=1) for o in outputs], dim=1).log()
    log_weight_grad_norm = torch.stack([layer.weight.grad.norm() for layer in layers]).log()
    return log_grad_norm, log_weight_grad_norm


def torch_runner(problem: Problem, threads: int) -> Callable[[], Any]:
    import torch

    torch.set_num_threads(threads)
    job = problem.job
    models = [torch_model(stack) for stack in problem.stacks]
    xs = [torch.from_numpy(x) for x in problem.xs]
    grad_outputs = [torch.from_numpy(g) for g in problem.grad_outputs]
    if job.kind == "jacobian":
        layers = models[0]
        layers.requires_grad_(False)  # only the input's Jacobian is wanted
        phi = _torch_activation(ACTIVATION)

        def forward(v):
            for layer in layers:
                v = phi(layer(v))
            return v

        jacobian_of = torch.func.jacrev(forward)
        return lambda: torch.stack([jacobian_of(x) for x in xs[0]])

    return lambda: [torch_gradient_profile(layers, x, g)
                    for layers, x, g in zip(models, xs, grad_outputs, strict=True)]


class GemmBaseline:
    """The job's matrix products as plain NumPy matmuls: the machine's rate for that work.

    Products of the same shape go through ``np.matmul`` in batches (one
    call for many small products, so Python's per-call cost does not
    count).  Two ways are tried and the faster kept (``mode``): one Python
    thread with BLAS on all threads ("blas"), or the products split over
    ``threads`` Python threads with BLAS held to one thread each ("split",
    better for small matrices, which BLAS runs on one thread anyway).
    """

    #: Values per batched operand, so that a batch stays within a few MiB.
    BATCH_VALUES = 1 << 19

    def __init__(self, job: Job, threads: int) -> None:
        self.threads = max(1, threads)
        self.shapes = job.gemm_shapes()
        rng = np.random.default_rng(0)
        # one set of operands per Python thread, so that "split" threads never share an output
        self.operands = []
        for _ in range(self.threads):
            per_thread = []
            for rows, n, _count in self.shapes:
                per_batch = max(1, self.BATCH_VALUES // (rows * n))
                a = rng.standard_normal((per_batch, rows, n))
                w = rng.standard_normal((n, n)) / math.sqrt(n)
                per_thread.append((a, w, np.empty_like(a)))
            self.operands.append(per_thread)
        self.mode = "blas"
        self.mode = self._choose_mode()

    def _products(self, operands, counts) -> None:
        for (a, w, out), count in zip(operands, counts, strict=True):
            per_batch = a.shape[0]
            for start in range(0, count, per_batch):
                size = min(per_batch, count - start)
                np.matmul(a[:size], w, out=out[:size])

    def _run(self, mode: str, fraction: float = 1.0) -> None:
        counts = [max(1, round(count * fraction)) for _, _, count in self.shapes]
        if mode == "blas" or self.threads == 1:
            self._products(self.operands[0], counts)
            return
        from threadpoolctl import threadpool_limits

        shares = [[count // self.threads + (t < count % self.threads) for count in counts]
                  for t in range(self.threads)]
        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(self._products, self.operands, shares))

    def _choose_mode(self) -> str:
        if self.threads == 1:
            return "blas"
        fraction = min(1.0, max(0.1, 2 * self.threads / max(count for _, _, count in self.shapes)))
        best = {}
        for mode in ("blas", "split", "blas", "split"):  # each twice, the first run warms up
            start = time.perf_counter()
            self._run(mode, fraction)
            best[mode] = time.perf_counter() - start
        return min(best, key=best.get)

    @property
    def detail(self) -> str:
        if self.mode == "blas":
            return "np.matmul, BLAS threads"
        return f"np.matmul split over {self.threads} threads, BLAS 1 thread each"

    def __call__(self) -> None:
        self._run(self.mode)


# ---------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------

def _timed(function: Callable[[], Any]) -> tuple[float, Any]:
    """One call with the garbage collector off (as timeit does): (seconds, result).

    No collection before the call: a full collection walks every object and
    leaves the caches cold (about 1 ms of a 3 ms job); the callers collect
    once per block of runs instead.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        result = function()
        elapsed = time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()
    return elapsed, result


def _read_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def measure_peak(function: Callable[[], Any]) -> tuple[float, Any, int, int | None]:
    """Run ``function`` once: (seconds, result, peak traced bytes, peak RSS growth in bytes or None).

    Peak traced bytes: tracemalloc's peak above what was traced before the
    call (NumPy arrays included).  Peak RSS growth: ``VmHWM`` after a reset
    minus ``VmRSS`` before the call, which also sees C ``malloc``.
    """
    gc.collect()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    traced_before = tracemalloc.get_traced_memory()[0]
    rss_before = _read_status_kib("VmRSS")
    rss_ok = rss_before is not None and _reset_peak_rss()
    try:
        elapsed, result = _timed(function)
        peak_traced = tracemalloc.get_traced_memory()[1] - traced_before
    finally:
        if not was_tracing:
            tracemalloc.stop()
    peak_rss = None
    if rss_ok:
        high_water = _read_status_kib("VmHWM")
        if high_water is not None:
            peak_rss = max(0, high_water - rss_before) * 1024
    return elapsed, result, peak_traced, peak_rss


def time_backends(runners: dict[str, Callable[[], Any]], *, budget_s: float, min_repeats: int,
                  max_repeats: int, repeats: int | None = None, memory_of: Sequence[str] = (),
                  log: Callable[[str], None] = lambda message: None):
    """Warm up every runner once, then time them in ABBA order; returns (times, results, memory).

    The timed runs come in two passes, the runners in order and then in
    reverse, each runner's runs back to back, so that a drift in the load of
    a shared machine falls on all runners alike, and a runner never starts
    with the threads of another still spinning (OpenMP and OpenBLAS workers
    busy-wait a while after their work: before each block of a short runner
    one untimed run absorbs that).

    ``times[label]`` lists the timed runs; ``results[label]`` is the warm-up's
    result; ``memory[label]`` is (peak traced, peak RSS growth) for the labels
    in ``memory_of``, whose warm-up runs under :func:`measure_peak`.  With
    ``repeats`` None the count is ``budget_s`` over the warm-up round's
    duration, clipped to [min_repeats, max_repeats].
    """
    results, memory, warm_up = {}, {}, {}
    for label, runner in runners.items():
        gc.collect()
        if label in memory_of:
            warm_up[label], results[label], *memory[label] = measure_peak(runner)
        else:
            warm_up[label], results[label] = _timed(runner)
    if repeats is None:
        round_s = max(sum(warm_up.values()), 1e-9)
        repeats = int(min(max_repeats, max(min_repeats, budget_s // round_s)))
    log(f"  warm-up round {sum(warm_up.values()):.3g} s, {repeats} timed runs each")
    labels = list(runners)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for order, count in ((labels, (repeats + 1) // 2), (labels[::-1], repeats // 2)):
        for label in order:
            gc.collect()
            if count and warm_up[label] < SETTLE_BELOW_S:
                _timed(runners[label])
            times[label] += [_timed(runners[label])[0] for _ in range(count)]
    return times, results, memory


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------

@dataclass
class Options:
    jobs: Sequence[str] = tuple(JOBS)
    backend: str = "all"
    quick: bool = False
    torch: bool = True
    gemm: bool = True
    memory: bool = True
    budget_s: float = 6.0
    min_repeats: int = 2
    max_repeats: int = 30
    repeats: int | None = None
    threads: int | None = None
    log: Callable[[str], None] = field(default=lambda message: None)


def _ratio(base: float | None, value: float | None) -> float | None:
    if base is None or value is None or value <= 0:
        return None
    return base / value


def _max_abs_diff(result, reference) -> float | None:
    if result is None or reference is None:
        return None
    result, reference = np.asarray(result, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if result.shape != reference.shape:
        return None
    return float(np.max(np.abs(result - reference))) if result.size else 0.0


def run_job(job: Job, options: Options, notes: list[str]) -> tuple[list[dict], list[dict]]:
    """Time one job on the selected backends; returns (result rows, memory rows)."""
    threads = vgcore_threads()
    problem = make_problem(job)
    runners: dict[str, Callable[[], Any]] = {}
    details: dict[str, str] = {}
    wanted = BACKENDS if options.backend == "all" else (options.backend,)
    if "cpu" in wanted:
        runners["cpu"] = vgcore_runner(problem, "cpu")
        details["cpu"] = f"{threads} OpenMP threads"
        if job.kind == "sweep":
            details["cpu"] += ", vgcore._cpu.gradient_profiles"
            sweep = sweep_runner(problem)
            if sweep is not None:
                runners["vg.sweep"] = sweep
                details["vg.sweep"] = "vgcore.sweep, cpu, with statistics and frame"
        if job.kind == "profile" and segment_supported():
            runners[SEGMENT_LABEL] = vgcore_runner(problem, "cpu", segment="auto")
            details[SEGMENT_LABEL] = "segment='auto': activations kept every S layers, recomputed"
    if "cuda" in wanted:
        available, why = cuda_status()
        if available:
            runners["cuda"] = cuda_runner(problem)
        elif f"cuda: skipped, {why}" not in notes:
            notes.append(f"cuda: skipped, {why}")
    if "numpy" in wanted:
        runners["numpy"] = vgcore_runner(problem, "numpy")
        details["numpy"] = "vgcore reference, backend='numpy'"
    if options.torch:
        available, why = torch_status()
        if available:
            runners["torch"] = torch_runner(problem, threads)
            details["torch"] = f"torch {'func.jacrev' if job.kind == 'jacobian' else 'autograd'}, " \
                               f"{threads} threads"
        elif f"torch: skipped, {why}" not in notes:
            notes.append(f"torch: skipped, {why}")
    if options.gemm:
        gemm = GemmBaseline(job, threads)
        runners["gemm"] = gemm
        details["gemm"] = gemm.detail
    memory_of = [label for label in ("cpu", SEGMENT_LABEL, "numpy")
                 if options.memory and job.kind != "jacobian" and label in runners]
    if memory_of:
        # first calls import modules and fill caches: keep that out of the traced warm-up
        small = make_problem(QUICK_JOBS[job.name])
        for label in memory_of:
            if label == SEGMENT_LABEL:
                vgcore_runner(small, "cpu", segment="auto")()
            else:
                vgcore_runner(small, label)()
    options.log(f"{job.name}: L {job.depth}, n {job.width}, B {job.batch}, {job.what}: "
                f"{', '.join(runners)}")
    times, results, memory = time_backends(
        runners, budget_s=options.budget_s, min_repeats=options.min_repeats,
        max_repeats=options.max_repeats, repeats=options.repeats, memory_of=memory_of, log=options.log)

    medians = {label: statistics.median(values) for label, values in times.items() if values}
    reference = comparable(results.get("numpy"))
    rows = []
    for label in sorted(runners, key=ROW_ORDER.index):
        median = medians.get(label)
        compare = label not in ("gemm", "vg.sweep")
        rows.append({
            "job": job.name,
            "backend": label,
            "median_s": median,
            "times_s": times[label],
            "repeats": len(times[label]),
            "gflops": None if median is None else job.flops / median / 1e9,
            "vs_numpy": _ratio(medians.get("numpy"), median),
            "vs_torch": _ratio(medians.get("torch"), median),
            "gemm_fraction": _ratio(medians.get("gemm"), median),
            "max_abs_diff": _max_abs_diff(comparable(results[label]), reference) if compare else None,
            "detail": details.get(label, ""),
        })
    stored = job.activations_bytes()
    memory_rows = [{
        "job": job.name,
        "backend": label,
        "activations_bytes": stored,
        "peak_traced_bytes": peak_traced,
        "traced_ratio": peak_traced / stored,
        "peak_rss_bytes": peak_rss,
        "rss_ratio": None if peak_rss is None else peak_rss / stored,
    } for label, (peak_traced, peak_rss) in memory.items()]
    return rows, memory_rows


def run(options: Options) -> dict:
    """All selected jobs; the JSON document described in the module docstring."""
    table = QUICK_JOBS if options.quick else JOBS
    notes: list[str] = []
    if options.backend not in (*BACKENDS, "all"):
        raise ValueError(f"backend: expected one of {(*BACKENDS, 'all')}, got {options.backend!r}")
    unknown = [name for name in options.jobs if name not in table]
    if unknown:
        raise ValueError(f"jobs: unknown job(s) {unknown}; expected some of {list(table)}")
    if options.backend == "cuda":
        available, why = cuda_status()
        if not available:
            notes.append(f"cuda: skipped, {why}")
    document = {
        "schema": 1,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": options.quick,
        "machine": machine_info(),
        "jobs": [],
        "results": [],
        "memory": [],
        "notes": notes,
    }
    if options.memory and sys.platform.startswith("linux") and not _reset_peak_rss():
        notes.append("memory: peak RSS not measurable here (/proc/self/clear_refs)")
    with _threads_limited(options.threads), _torch_threads_restored():
        document["machine"]["threads"] = vgcore_threads()
        for name in options.jobs:
            job = table[name]
            document["jobs"].append({"job": job.name, "what": job.what, "depth": job.depth,
                                     "width": job.width, "batch": job.batch, "configs": job.configs,
                                     "flops": job.flops})
            with OtherLoad() as other_load:
                rows, memory_rows = run_job(job, options, notes)
            document["jobs"][-1]["other_load"] = other_load.fraction
            document["results"] += rows
            document["memory"] += memory_rows
    document["load_average_after"] = _load_average()
    busy = [f"{job['job']} {job['other_load']:.0%}" for job in document["jobs"]
            if job["other_load"] is not None and job["other_load"] > BUSY_FRACTION]
    if busy:
        notes.append(f"machine busy: other processes took {', '.join(busy)} of the cores during these "
                     "jobs; multi-threaded rows (OpenMP, BLAS, PyTorch) slow down far more than "
                     "single-threaded ones under load: compare runs made on a quiet machine")
    return document


@contextlib.contextmanager
def _torch_threads_restored():
    """PyTorch's thread count as it was (the torch rows set it), for callers in the same process."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        torch = sys.modules.get("torch")
        if before is None and _TORCH_THREADS_AT_IMPORT:
            before = _TORCH_THREADS_AT_IMPORT[0]
        if torch is not None and before is not None:
            torch.set_num_threads(before)


def _threads_limited(threads: int | None):
    """Every thread pool (OpenMP: vgcore's kernels and PyTorch; BLAS) held to ``threads``."""
    if threads is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads)


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

def _format_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def _format_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3g}x"


def _format_bytes(size: float | None) -> str:
    if size is None:
        return "-"
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.3g} {unit}"
        size /= 1024
    return f"{size:.3g} GiB"


def _format_load(load: list[float] | None) -> str:
    return "-" if not load else "/".join(f"{value:.2f}" for value in load)


def _grid(header: list[str], lines: list[list[str]], markdown: bool) -> str:
    if markdown:
        rows = [header, ["---"] * len(header), *lines]
        return "\n".join("| " + " | ".join(row) + " |" for row in rows)
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in [header, *lines])


def format_results(document: dict, *, markdown: bool = False) -> str:
    """The timing table: job, backend, median, ratios, GEMM fraction, GFLOP/s, repeats."""
    header = ["job", "backend", "median", "vs numpy", "vs torch", "GEMM fraction", "GFLOP/s", "repeats"]
    lines = [[row["job"], row["backend"], _format_time(row["median_s"]), _format_ratio(row["vs_numpy"]),
              _format_ratio(row["vs_torch"]),
              "-" if row["gemm_fraction"] is None else f"{row['gemm_fraction']:.2f}",
              "-" if row["gflops"] is None else f"{row['gflops']:.3g}", str(row["repeats"])]
             for row in document["results"]]
    return _grid(header, lines, markdown)


def format_memory(document: dict, *, markdown: bool = False) -> str:
    """The memory table: peak of gradient_profile against the stored activations (L x B x n)."""
    header = ["job", "backend", "activations L*B*n", "peak (tracemalloc)", "ratio", "peak RSS growth",
              "RSS ratio"]
    lines = [[row["job"], row["backend"], _format_bytes(row["activations_bytes"]),
              _format_bytes(row["peak_traced_bytes"]), f"{row['traced_ratio']:.2f}",
              _format_bytes(row["peak_rss_bytes"]),
              "-" if row["rss_ratio"] is None else f"{row['rss_ratio']:.2f}"]
             for row in document["memory"]]
    return _grid(header, lines, markdown)


def format_report(document: dict, *, markdown: bool = False) -> str:
    machine = document["machine"]
    parts = [f"vgcore bench{' --quick' if document['quick'] else ''}: {document['date']}, "
             f"{machine['cpu']}, {machine['cores']} cores, vgcore {machine['threads']} threads; "
             f"numpy {machine['numpy']}, scipy {machine['scipy']}, torch {machine['torch'] or '-'}; "
             f"BLAS {machine['blas'] or '-'}; load average {_format_load(machine['load_average'])} "
             f"before, {_format_load(document.get('load_average_after'))} after",
             "", format_results(document, markdown=markdown)]
    loads = [f"{job['job']} {job['other_load']:.0%}" for job in document["jobs"]
             if job.get("other_load") is not None]
    if loads:
        parts += ["", f"Other processes' share of the cores during each job: {', '.join(loads)}."]
    if document["memory"]:
        parts += ["", "Peak memory of gradient_profile (warm-up run) against the stored activations:",
                  "", format_memory(document, markdown=markdown)]
    if document["notes"]:
        parts += ["", *(f"note: {note}" for note in document["notes"])]
    return "\n".join(parts)


def _job_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of jobs")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vgcore bench",
        description="Time the canonical jobs on vgcore's backends, the NumPy reference, PyTorch "
                    "(where installed) and plain GEMM; print a table of medians and ratios.")
    parser.add_argument("--jobs", type=_job_list, default=list(JOBS),
                        help=f"comma-separated jobs (default: all of {','.join(JOBS)})")
    parser.add_argument("--backend", choices=(*BACKENDS, "all"), default="all",
                        help="vgcore backend(s) to time; 'numpy' is the reference the ratios use "
                             "(default: all available)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few repeats (a smoke test)")
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="skip PyTorch")
    parser.add_argument("--no-gemm", dest="gemm", action="store_false", help="skip the GEMM baseline")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the peak-memory measurement")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="time for the timed rounds of one job (default 6; --quick 0.2)")
    parser.add_argument("--repeats", type=int, default=None, metavar="N",
                        help="timed runs per backend, instead of the budget's count")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="hold vgcore's OpenMP threads, BLAS and PyTorch to N threads (default: all)")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``vgcore bench``: run, print the table, write JSON; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    table = QUICK_JOBS if args.quick else JOBS
    unknown = [name for name in args.jobs if name not in table]
    if unknown:
        parser.error(f"--jobs: unknown job(s) {', '.join(unknown)}; expected some of {', '.join(table)}")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats: expected a count >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads: expected a count >= 1")
    budget = args.budget if args.budget is not None else (0.2 if args.quick else 6.0)

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    options = Options(jobs=args.jobs, backend=args.backend, quick=args.quick, torch=args.torch,
                      gemm=args.gemm, memory=args.memory, budget_s=budget,
                      min_repeats=1 if args.quick else 2, max_repeats=3 if args.quick else 30,
                      repeats=args.repeats, threads=args.threads, log=log)
    document = run(options)
    print(format_report(document, markdown=args.markdown))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(document, out, indent=1)
            out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
