"""The canonical jobs of docs/ARCHITECTURE.md ("Canonical benchmark jobs") and how vgcore runs each.

Every job is tanh, sigma_w 1, sigma_b 0.05, float64 unless its row of the
table says otherwise (sweep100: sigma_w 0.5 .. 2.5; rnn_lyapunov: g = 2;
lstm: forget_bias 1; batchnorm: relu, sigma_w sqrt 2, norm="batch").

A job whose vgcore feature is missing here (``vg.Recurrent``, a stack with
``norm="batch"``) is not run: :func:`missing_feature` says why, and the run
prints that reason.  A backend that cannot run a job (no implementation of
that model kind registered for it) is found by :func:`backend_refusal`, which
runs the job's tiny version once and reports the error.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Every job's defaults (docs/ARCHITECTURE.md): tanh, sigma_w 1, sigma_b 0.05, float64.
ACTIVATION = "tanh"
SIGMA_W = 1.0
SIGMA_B = 0.05
DTYPE = "float64"
#: The sweep job's sigma_w range (configs evenly spaced, ends included).
SWEEP_SIGMA_W = (0.5, 2.5)

#: Job kinds: what is computed.
KINDS = ("profile", "sweep", "jacobian", "lyapunov")
#: Model kinds: a dense stack, or a recurrent cell unrolled over time (depth = steps T).
MODELS = ("stack", "lstm", "rnn")
#: Gate blocks of each model's weight matrix (torch's layout): the GEMMs per layer or step scale with it.
GATES = {"stack": 1, "rnn": 1, "lstm": 4}


@dataclass(frozen=True)
class Job:
    """One canonical job (docs/ARCHITECTURE.md, "Canonical benchmark jobs").

    ``depth`` is the number of layers L of a stack or of counted time steps T
    of a recurrent model; ``width`` is n (the hidden width of a recurrent
    cell); ``warmup`` steps of a Lyapunov job advance the state uncounted.
    """

    name: str
    kind: str  # one of KINDS
    depth: int
    width: int
    batch: int
    configs: int = 1
    model: str = "stack"  # one of MODELS
    activation: str = ACTIVATION
    sigma_w: float = SIGMA_W
    norm: str | None = None
    forget_bias: float = 0.0
    warmup: int = 0
    exponents: int = 0  # k Lyapunov exponents

    @property
    def what(self) -> str:
        if self.kind == "jacobian":
            return "full Jacobian"
        if self.kind == "sweep":
            low, high = SWEEP_SIGMA_W
            return f"{self.configs} configs, sigma_w {low}..{high}"
        if self.kind == "lyapunov":
            return (f"{self.exponents} Lyapunov exponents of a {self.activation} {self.model.upper()}, "
                    f"g = {self.sigma_w:g}, {self.warmup} warm-up steps")
        if self.model == "lstm":
            return f"gradient_profile through time of an LSTM, forget_bias {self.forget_bias:g}"
        if self.norm is not None:
            return f"gradient_profile, norm={self.norm!r}, {self.activation}, sigma_w {self.sigma_w:.4g}"
        return "gradient_profile"

    @property
    def recurrent(self) -> bool:
        return self.model != "stack"

    @property
    def state_width(self) -> int:
        """Columns of the state the job's inputs and gradients have: 2 n for an LSTM ([h | c]), else n."""
        return 2 * self.width if self.model == "lstm" else self.width

    @property
    def steps(self) -> int:
        """Steps a recurrent model is unrolled, warm-up included (layers of a stack)."""
        return self.depth + self.warmup

    def gemm_shapes(self) -> list[tuple[int, int, int]]:
        """The job's matrix products as (rows, n, count): ``count`` products (rows, n) x (n, n).

        A gradient profile does three per layer and gate block: forward,
        backward, weight gradient.  The Jacobian: the batch's forward, then
        the n cotangents e_i pulled back through every layer.  Lyapunov
        exponents: the forward of the batch and the k tangents mapped by
        every step, warm-up included (the QR factorisations are not GEMMs and
        are not counted).
        """
        n, gates = self.width, GATES[self.model]
        if self.kind == "jacobian":
            return [(self.batch, n, self.depth), (n, n, self.depth)]
        if self.kind == "lyapunov":
            return [(self.batch, n, gates * self.steps), (self.exponents, n, gates * self.steps)]
        return [(self.batch, n, 3 * gates * self.depth * self.configs)]

    @property
    def flops(self) -> int:
        """Nominal flops of the job's matrix products, 2 rows n^2 per (rows, n) x (n, n) product."""
        return sum(2 * rows * n * n * count for rows, n, count in self.gemm_shapes())

    def activations_bytes(self) -> int:
        """What the stored activations of one gradient profile need: L x B x (state width) values."""
        return self.depth * self.batch * self.state_width * np.dtype(DTYPE).itemsize


JOBS = {
    "deep_narrow": Job("deep_narrow", "profile", 500, 32, 16),
    "medium": Job("medium", "profile", 100, 256, 64),
    "wide": Job("wide", "profile", 20, 2048, 512),
    "sweep100": Job("sweep100", "sweep", 100, 64, 16, configs=100),
    "jacobian": Job("jacobian", "jacobian", 100, 256, 1),
    "lstm": Job("lstm", "profile", 1000, 256, 32, model="lstm", forget_bias=1.0),
    "rnn_lyapunov": Job("rnn_lyapunov", "lyapunov", 2000, 512, 1, model="rnn", sigma_w=2.0, warmup=500,
                        exponents=32),
    "batchnorm": Job("batchnorm", "profile", 100, 256, 64, activation="relu", sigma_w=math.sqrt(2.0),
                     norm="batch"),
}

#: Tiny versions of the same jobs, for tests and a quick look (``--quick``).
QUICK_JOBS = {
    "deep_narrow": Job("deep_narrow", "profile", 20, 8, 4),
    "medium": Job("medium", "profile", 6, 16, 4),
    "wide": Job("wide", "profile", 3, 64, 16),
    "sweep100": Job("sweep100", "sweep", 5, 8, 4, configs=5),
    "jacobian": Job("jacobian", "jacobian", 5, 16, 1),
    "lstm": Job("lstm", "profile", 12, 8, 4, model="lstm", forget_bias=1.0),
    "rnn_lyapunov": Job("rnn_lyapunov", "lyapunov", 20, 16, 1, model="rnn", sigma_w=2.0, warmup=5,
                        exponents=4),
    "batchnorm": Job("batchnorm", "profile", 6, 16, 4, activation="relu", sigma_w=math.sqrt(2.0),
                     norm="batch"),
}


# ---------------------------------------------------------------------------
# Models and inputs
# ---------------------------------------------------------------------------

def missing_feature(job: Job) -> str | None:
    """Why vgcore here cannot build the job's model (a feature not yet landed), or None."""
    import vgcore as vg

    if job.recurrent and not hasattr(vg, "Recurrent"):
        return "vgcore has no recurrent models here (vg.Recurrent)"
    if job.norm is not None:
        try:
            vg.Stack.random(2, 2, activation=job.activation, norm=job.norm, seed=0)
        except (ValueError, TypeError) as error:
            return f"Stack.random refuses norm={job.norm!r} ({' '.join(str(error).split())})"
    return None


def make_model(job: Job, *, sigma_w: float | None = None, seed: int = 0, device: str = "cpu"):
    """The job's model (a Stack or a Recurrent) drawn from ``seed``."""
    import vgcore as vg

    sigma_w = job.sigma_w if sigma_w is None else sigma_w
    if job.recurrent:
        return vg.Recurrent.random(job.width, cell=job.model, activation=job.activation, sigma_w=sigma_w,
                                   sigma_b=SIGMA_B, forget_bias=job.forget_bias, dtype=DTYPE, seed=seed,
                                   device=device)
    return vg.Stack.random(job.depth, job.width, activation=job.activation, sigma_w=sigma_w, sigma_b=SIGMA_B,
                           norm=job.norm, dtype=DTYPE, seed=seed, device=device)


def sweep_sigma_ws(job: Job) -> list[float]:
    """The sweep job's sigma_w values, evenly spaced over SWEEP_SIGMA_W."""
    return [float(s) for s in np.linspace(*SWEEP_SIGMA_W, job.configs)]


@dataclass
class Problem:
    """The job's models and inputs, on the host (float64).

    ``models`` holds one model per config (one for every job but the sweep),
    ``xs`` their inputs x_0 (or initial states s_0), ``grad_outputs`` the
    cotangents of the gradient profiles (the default of gradient_profile).
    """

    job: Job
    models: list
    xs: list[np.ndarray]
    grad_outputs: list[np.ndarray]

    def call_options(self) -> dict:
        """Keywords every vgcore computation of the job takes besides the model and input."""
        return {"steps": self.job.depth} if self.job.recurrent else {}


def _grad_output(model, batch: int) -> np.ndarray:
    try:
        from vgcore._api import default_grad_output
    except ImportError:  # the same draw in spirit: standard normal from the model's seed
        seed = 0 if model.seed is None else model.seed
        return np.random.default_rng([seed, 1]).standard_normal((batch, model.state_width))
    return np.asarray(default_grad_output(model, batch))


def make_problem(job: Job) -> Problem:
    """The job's models, inputs (seeds 1000 + config) and cotangents, in float64 on the host."""
    if job.kind == "sweep":
        models = [make_model(job, sigma_w=s, seed=i) for i, s in enumerate(sweep_sigma_ws(job))]
    else:
        models = [make_model(job)]
    xs = [np.random.default_rng(1000 + i).standard_normal((job.batch, job.state_width))
          for i in range(len(models))]
    grad_outputs = [_grad_output(model, job.batch) for model in models]
    return Problem(job, models, xs, grad_outputs)


# ---------------------------------------------------------------------------
# The job on vgcore's backends
# ---------------------------------------------------------------------------

def segment_supported() -> bool:
    """Whether ``gradient_profile`` takes ``segment`` (recompute instead of keeping activations)."""
    import inspect

    import vgcore as vg

    return "segment" in inspect.signature(vg.gradient_profile).parameters


def chunk_runner(problem: Problem, backend: str = "cpu") -> Callable[[], Any]:
    """All configs in one ``gradient_profiles`` call of the backend's implementation (what vg.sweep runs)."""
    from vgcore.backends import implementation

    models, xs, grad_outputs = problem.models, problem.xs, problem.grad_outputs
    module = implementation(models[0], backend)
    problems = [model.bind(x) for model, x in zip(models, xs, strict=True)]
    return lambda: module.gradient_profiles(problems, grad_outputs)


def vgcore_runner(problem: Problem, backend: str, **options: Any) -> Callable[[], Any]:
    """The job on a vgcore backend ("cpu" or "numpy") through the public API.

    ``options`` go to ``gradient_profile`` (``segment="auto"``: recompute).
    The sweep job on "cpu" calls the sweep's chunk runner on all configs at
    once; on "numpy" it calls the reference once per config.
    """
    import vgcore as vg

    job = problem.job
    call = problem.call_options()
    if job.kind == "jacobian":
        model, x = problem.models[0], problem.xs[0]
        return lambda: vg.jacobian(model, x, backend=backend, **call)
    if job.kind == "lyapunov":
        model, x = problem.models[0], problem.xs[0]
        return lambda: vg.lyapunov_exponents(model, x, job.exponents, backend=backend, warmup=job.warmup,
                                             **call)
    if job.kind == "sweep" and backend == "cpu":
        return chunk_runner(problem, backend)

    def profiles():
        return [vg.gradient_profile(model, x, g, backend=backend, **call, **options)
                for model, x, g in zip(problem.models, problem.xs, problem.grad_outputs, strict=True)]

    return profiles


def cuda_runner(problem: Problem) -> Callable[[], Any]:
    """The job on the "cuda" backend: the same models drawn on the device (same seeds), synchronised."""
    import cupy

    import vgcore as vg

    job = problem.job
    call = problem.call_options()
    if job.kind == "sweep":
        models = [make_model(job, sigma_w=s, seed=i, device="cuda")
                  for i, s in enumerate(sweep_sigma_ws(job))]
    else:
        models = [make_model(job, device="cuda")]
    xs = [cupy.asarray(x) for x in problem.xs]
    grad_outputs = [cupy.asarray(g) for g in problem.grad_outputs]

    def run():
        if job.kind == "jacobian":
            result = vg.jacobian(models[0], xs[0], backend="cuda", **call)
        elif job.kind == "lyapunov":
            result = vg.lyapunov_exponents(models[0], xs[0], job.exponents, backend="cuda", warmup=job.warmup,
                                           **call)
        else:
            result = [vg.gradient_profile(model, x, g, backend="cuda", **call)
                      for model, x, g in zip(models, xs, grad_outputs, strict=True)]
        cupy.cuda.Device().synchronize()
        return result

    return run


def sweep_runner(problem: Problem) -> Callable[[], Any] | None:
    """``vgcore.sweep`` end to end on the sweep job's grid (its own seeds), or None where it is absent."""
    import vgcore as vg

    sweep = getattr(vg, "sweep", None)
    if not callable(sweep):
        if importlib.util.find_spec("vgcore.sweep") is None:
            return None
        sweep = getattr(importlib.import_module("vgcore.sweep"), "sweep", None)
        if not callable(sweep):
            return None
    job = problem.job
    grid = {"depth": job.depth, "width": job.width, "activation": job.activation, "sigma_b": SIGMA_B,
            "dtype": DTYPE, "sigma_w": sweep_sigma_ws(job)}
    return lambda: sweep(grid, batch=job.batch, seeds=1, backend="cpu", store=None, progress=False)


def backend_refusal(job: Job, backend: str, **options: Any) -> str | None:
    """Why the vgcore ``backend`` cannot run ``job`` here, or None: its tiny version is run once to find out.

    A backend without an implementation for the job's model kind raises
    ValueError (naming the backend) or TypeError; that message is the reason.
    """
    tiny = QUICK_JOBS.get(job.name, job)
    try:
        vgcore_runner(make_problem(tiny), backend, **options)()
    except (ValueError, TypeError, NotImplementedError, ImportError) as error:
        return " ".join(f"{type(error).__name__}: {error}".split())
    return None
