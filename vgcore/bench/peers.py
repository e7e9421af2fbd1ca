"""What vgcore is measured against: the NumPy reference, a plain NumPy loop, PyTorch, JAX and plain GEMM.

- ``numpy``: vgcore's NumPy reference (``backend="numpy"``), the ratios' base;
- ``numpy loop`` (the sweep job): the per-layer gradient norms written as a
  plain NumPy forward and backward loop over the configs' weights, drawn
  before the timing: what a user without vgcore would write;
- ``torch``: the same computation written as a PyTorch user would, when
  PyTorch imports: ``nn.Linear`` layers (with ``nn.BatchNorm1d`` for the
  batch-norm job), autograd with ``retain_grad`` on every layer's output for
  the per-layer gradient norms and the weights' ``.grad`` norms;
  ``torch.func.jacrev`` for the Jacobian; an ``nn.LSTMCell`` loop for the
  LSTM; QR iteration for the RNN's Lyapunov exponents;
  ``torch.set_num_threads`` set to vgcore's thread count;
- ``jax``: ``jax.jit`` of the profile (``jax.grad`` of the loss with zero
  perturbations added to every layer's output: their gradients are the
  per-layer gradients), ``jax.vmap``-ed over the sweep's configs; float64
  (``jax.enable_x64``); ``jax.jacrev`` for the Jacobian;
- ``gemm``: plain NumPy matrix products of the job's GEMM shapes, the
  machine's attainable rate for that work, measured in the same run.

A peer that does not cover a job raises :class:`NoPeer` with the reason,
which the run prints.  Peers (the reference aside) do less than vgcore: no
per-layer renormalisation (float64 does not underflow at these depths) and
no saturation or dead-unit counts.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from vgcore.bench.jobs import Job, Problem, vgcore_runner

#: The fields of a gradient profile that every peer's result is compared on (where it has them).
PROFILE_FIELDS = ("log_grad_norm", "log_weight_grad_norm")
#: The field name of results that are one array (Jacobians, Lyapunov exponents).
VALUE = "value"


class NoPeer(Exception):
    """A peer does not cover a job; the message says why."""


# ---------------------------------------------------------------------------
# Comparing results
# ---------------------------------------------------------------------------

def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor
        return array.detach().cpu().numpy()
    if hasattr(array, "get") and hasattr(array, "__cuda_array_interface__"):  # a CuPy array
        return np.asarray(array.get())
    return np.asarray(array)


def comparable(result: Any) -> dict[str, np.ndarray] | None:
    """A runner's result as flat float64 arrays by field, for comparison with the reference's.

    Profiles and the chunk runner's dicts give their :data:`PROFILE_FIELDS`;
    a sequence (one result per config) the concatenation of its items'
    fields, in order; an array (NumPy, CuPy, PyTorch, JAX) its values under
    :data:`VALUE`; anything else (``None``, a sweep's frame) None.
    """
    if isinstance(result, dict) or hasattr(result, "log_weight_grad_norm"):
        get = result.get if isinstance(result, dict) else functools.partial(getattr, result)
        fields = {name: get(name) for name in PROFILE_FIELDS}
        return {name: _to_numpy(value).astype(np.float64).ravel() for name, value in fields.items()
                if value is not None}
    if isinstance(result, (list, tuple)):
        parts = [comparable(item) for item in result]
        if not parts or any(part is None for part in parts):
            return None
        names = [name for name in parts[0] if all(name in part for part in parts)]
        return {name: np.concatenate([part[name] for part in parts]) for name in names}
    if hasattr(result, "shape") and hasattr(result, "dtype"):
        return {VALUE: _to_numpy(result).astype(np.float64).ravel()}
    return None


Fields = dict[str, np.ndarray]


def max_abs_diff(result: Fields | None, reference: Fields | None) -> float | None:
    """Largest difference over the fields both have (None where they share none or shapes differ).

    Entries that are infinite in both with the same sign (a log of an exact
    zero) count as equal.
    """
    if result is None or reference is None:
        return None
    shared = [name for name in reference if name in result]
    if not shared or any(result[name].shape != reference[name].shape for name in shared):
        return None
    largest = 0.0
    for name in shared:
        a, b = result[name], reference[name]
        same = a == b  # equal infinities have an undefined difference
        if not same.all():
            largest = max(largest, float(np.max(np.abs(a[~same] - b[~same]))))
    return largest


def compared_fields(result: Fields | None, reference: Fields | None) -> list[str]:
    """The fields :func:`max_abs_diff` compares."""
    if result is None or reference is None:
        return []
    return [name for name in reference if name in result]


# ---------------------------------------------------------------------------
# NumPy: the reference and a plain loop
# ---------------------------------------------------------------------------

def reference_runner(problem: Problem) -> Callable[[], Any]:
    """vgcore's NumPy reference (``backend="numpy"``), one call per config."""
    return vgcore_runner(problem, "numpy")


def numpy_loop_profile(weights: np.ndarray, biases: np.ndarray, x: np.ndarray, grad_output: np.ndarray
                       ) -> dict[str, np.ndarray]:
    """Log gradient norms (B, L+1) and log weight-gradient norms (L,) of a tanh stack, a plain NumPy loop.

    Forward keeping every layer's output, then backward: the cotangent at
    h_l is g_l (1 - x_l^2), the weight gradient its product with x_{l-1},
    g_{l-1} its product with W_l.  No renormalisation.
    """
    outputs = [x]
    for weight, bias in zip(weights, biases, strict=True):
        x = np.tanh(x @ weight.T + bias)
        outputs.append(x)
    g = grad_output
    grad_norms = [np.linalg.norm(g, axis=1)]
    weight_grad_norms = []
    for layer in range(len(weights) - 1, -1, -1):
        y = outputs[layer + 1]
        g_h = g * (1.0 - y * y)
        weight_grad_norms.append(np.linalg.norm(g_h.T @ outputs[layer]))
        g = g_h @ weights[layer]
        grad_norms.append(np.linalg.norm(g, axis=1))
    with np.errstate(divide="ignore"):
        return {"log_grad_norm": np.log(np.stack(grad_norms[::-1], axis=1)),
                "log_weight_grad_norm": np.log(np.array(weight_grad_norms[::-1]))}


def numpy_loop_runner(problem: Problem) -> Callable[[], Any]:
    """The plain NumPy loop over every config's weights (drawn before the timing)."""
    job = problem.job
    plain_tanh = not job.recurrent and job.norm is None and job.activation == "tanh"
    if not plain_tanh or job.kind not in ("profile", "sweep"):
        raise NoPeer("the plain NumPy loop covers tanh stacks without norm")
    parameters = [(np.asarray(model.weights), np.asarray(model.biases)) for model in problem.models]
    return lambda: [numpy_loop_profile(w, b, x, g)
                    for (w, b), x, g in zip(parameters, problem.xs, problem.grad_outputs, strict=True)]


# ---------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------

#: PyTorch's thread count when the benchmark first imported it.
TORCH_THREADS_AT_IMPORT: list[int] = []


@functools.cache
def torch_status() -> tuple[bool, str]:
    """(whether PyTorch imports here, why not); imports it on the first call."""
    try:
        import torch
    except ImportError:
        return False, "PyTorch is not installed"
    except Exception as error:  # a broken install is skipped, not fatal
        return False, f"PyTorch does not import ({type(error).__name__}: {error})"
    TORCH_THREADS_AT_IMPORT.append(torch.get_num_threads())
    return True, ""


def torch_available() -> bool:
    return torch_status()[0]


_TORCH_ACTIVATIONS = ("tanh", "relu", "sigmoid", "linear", "gelu", "silu", "elu", "selu", "erf")


def _torch_activation(name: str):
    import torch
    from torch.nn import functional

    table = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid, "linear": lambda h: h,
             "gelu": functional.gelu, "silu": functional.silu, "elu": functional.elu,
             "selu": functional.selu, "erf": torch.erf}
    if name not in table:
        raise NoPeer(f"the PyTorch comparison covers the activations {_TORCH_ACTIVATIONS}, not {name!r}")
    return table[name]


def torch_model(stack):
    """An ``nn.ModuleList`` of ``nn.Linear`` layers holding the stack's weights.

    With ``norm="batch"`` each layer is an ``nn.Sequential`` of the Linear and
    ``nn.BatchNorm1d(n, affine=False, track_running_stats=False)`` (training
    mode: batch statistics, biased variance, eps 1e-5), docs/ARCHITECTURE.md's BN.
    """
    import torch
    from torch import nn

    if stack.residual is not None or stack.norm not in (None, "batch"):
        raise NoPeer("the PyTorch comparison covers stacks without residual and with norm None or 'batch'")
    layers = nn.ModuleList()
    with torch.no_grad():
        for weight, bias in zip(np.asarray(stack.weights), np.asarray(stack.biases), strict=True):
            linear = nn.Linear(stack.width, stack.width, dtype=torch.float64)
            linear.weight.copy_(torch.tensor(weight))
            linear.bias.copy_(torch.tensor(bias))
            if stack.norm == "batch":
                normalise = nn.BatchNorm1d(stack.width, eps=1e-5, affine=False, track_running_stats=False,
                                           dtype=torch.float64)
                layers.append(nn.Sequential(linear, normalise))
            else:
                layers.append(linear)
    return layers


def _linear_of(layer):
    return layer[0] if hasattr(layer, "__getitem__") else layer


def torch_gradient_profile(layers, x, grad_output, activation: str) -> dict:
    """Per-layer log gradient norms (B, L+1) and log weight-gradient norms (L,), the PyTorch way.

    Forward through the layers keeping every output with ``retain_grad``,
    ``backward`` of ``sum(x_L * grad_output)``, then the norms of the
    retained gradients and of the weights' ``.grad``.
    """
    import torch

    phi = _torch_activation(activation)
    for layer in layers:
        _linear_of(layer).weight.grad = _linear_of(layer).bias.grad = None
    h = x.detach().requires_grad_(True)
    outputs = [h]
    for layer in layers:
        h = phi(layer(h))
        h.retain_grad()
        outputs.append(h)
    (h * grad_output).sum().backward()
    log_grad_norm = torch.stack([o.grad.norm(dim=1) for o in outputs], dim=1).log()
    log_weight_grad_norm = torch.stack([_linear_of(layer).weight.grad.norm() for layer in layers]).log()
    return {"log_grad_norm": log_grad_norm, "log_weight_grad_norm": log_weight_grad_norm}


def torch_lstm_cell(model):
    """An ``nn.LSTMCell`` holding an LSTM model's parameters (torch's layout and gate order i, f, g, o)."""
    import torch
    from torch import nn

    width = int(model.width)
    inputs = int(model.input_width)
    cell = nn.LSTMCell(inputs, width, dtype=torch.float64)
    with torch.no_grad():
        for name in ("weight_hh", "weight_ih", "bias_hh", "bias_ih"):
            getattr(cell, name).copy_(torch.tensor(np.asarray(getattr(model, name))))
    cell.requires_grad_(False)  # only the state gradients are measured
    return cell


def torch_lstm_profile(cell, s0, grad_output, steps: int) -> dict:
    """Log norms (B, T+1) of d loss / d s_t, s_t = [h_t | c_t], for loss <s_T, g>: an LSTMCell loop.

    Every step's (h, c) is cloned and the clones carry ``retain_grad`` and
    feed the next step: their gradients are the state gradients of the
    dynamics s_t -> s_{t+1}.  (The cell's own c output would also collect the
    gradient through h_t = o tanh(c_t) of the same step.)  Per-step weight
    gradients are hidden inside LSTMCell: not measured.
    """
    import torch

    width = s0.shape[1] // 2
    batch = s0.shape[0]
    no_input = torch.zeros((batch, cell.input_size), dtype=s0.dtype)
    h = s0[:, :width].detach().clone().requires_grad_(True)
    c = s0[:, width:].detach().clone().requires_grad_(True)
    states = [(h, c)]
    for _ in range(steps):
        h, c = cell(no_input, (h, c))
        h, c = h.clone(), c.clone()
        h.retain_grad()
        c.retain_grad()
        states.append((h, c))
    (torch.cat([h, c], dim=1) * grad_output).sum().backward()
    norms = [torch.cat([h.grad, c.grad], dim=1).norm(dim=1) for h, c in states]
    return {"log_grad_norm": torch.stack(norms, dim=1).log()}


def torch_rnn_lyapunov(weight_hh, bias, s0, k: int, steps: int, warmup: int):
    """Lyapunov exponents (B, k), descending, of h' = tanh(W_hh h + b) by QR iteration in PyTorch.

    The k tangents of each sample start as e_1..e_k; every step maps them with
    the step's Jacobian diag(1 - h'^2) W_hh and re-orthonormalises them by QR;
    the counted steps (after ``warmup``) add log|R_ii|, averaged per step.
    """
    import torch

    batch, width = s0.shape
    tangents = torch.eye(width, k, dtype=s0.dtype).expand(batch, width, k)
    log_growth = torch.zeros((batch, k), dtype=s0.dtype)
    h = s0
    with torch.no_grad():
        for step in range(warmup + steps):
            h = torch.tanh(h @ weight_hh.T + bias)
            mapped = (1.0 - h * h).unsqueeze(2) * (weight_hh @ tangents)
            tangents, r = torch.linalg.qr(mapped)
            if step >= warmup:
                log_growth += torch.diagonal(r, dim1=1, dim2=2).abs().log()
    return torch.sort(log_growth / steps, dim=1, descending=True).values


def torch_runner(problem: Problem, threads: int) -> tuple[Callable[[], Any], str]:
    """The job in PyTorch: (runner, detail).  Raises NoPeer where there is no PyTorch version of it."""
    import torch

    torch.set_num_threads(threads)
    job = problem.job
    xs = [torch.from_numpy(x) for x in problem.xs]
    grad_outputs = [torch.from_numpy(g) for g in problem.grad_outputs]
    if job.model == "lstm" and job.kind == "profile":
        cell = torch_lstm_cell(problem.models[0])
        return (lambda: torch_lstm_profile(cell, xs[0], grad_outputs[0], job.depth),
                f"nn.LSTMCell loop, retain_grad on every state, {threads} threads; log_grad_norm only")
    if job.model == "rnn" and job.kind == "lyapunov":
        if job.activation != "tanh":
            raise NoPeer("the PyTorch Lyapunov peer covers tanh RNNs")
        model = problem.models[0]
        weight_hh = torch.tensor(np.asarray(model.weight_hh))  # a copy: the model's arrays are read-only
        bias = torch.tensor(np.asarray(model.bias_hh) + np.asarray(model.bias_ih))
        return (lambda: torch_rnn_lyapunov(weight_hh, bias, xs[0], job.exponents, job.depth, job.warmup),
                f"QR iteration (torch.linalg.qr every step), {threads} threads")
    if job.recurrent:
        raise NoPeer(f"no PyTorch version of a {job.kind} job on a {job.model}")
    models = [torch_model(stack) for stack in problem.models]
    if job.kind == "jacobian":
        layers = models[0]
        layers.requires_grad_(False)  # only the input's Jacobian is wanted
        phi = _torch_activation(job.activation)

        def forward(v):
            for layer in layers:
                v = phi(layer(v))
            return v

        jacobian_of = torch.func.jacrev(forward)
        return lambda: torch.stack([jacobian_of(x) for x in xs[0]]), f"torch func.jacrev, {threads} threads"
    if job.kind == "lyapunov":
        raise NoPeer("no PyTorch version of Lyapunov exponents of a stack")
    return (lambda: [torch_gradient_profile(layers, x, g, job.activation)
                     for layers, x, g in zip(models, xs, grad_outputs, strict=True)],
            f"torch autograd, {threads} threads")


# ---------------------------------------------------------------------------
# JAX
# ---------------------------------------------------------------------------

#: JAX's CPU backend runs on XLA's own thread pool, sized at start-up: --threads does not hold it.
XLA_THREADS = "XLA's own CPU threads"


@functools.cache
def jax_status() -> tuple[bool, str]:
    """(whether JAX imports here, why not); imports it on the first call."""
    if importlib.util.find_spec("jax") is None:
        return False, "JAX is not installed (pip install jax)"
    try:
        import jax  # noqa: F401
    except Exception as error:  # a broken install is skipped, not fatal
        return False, f"JAX does not import ({type(error).__name__}: {error})"
    return True, ""


def jax_available() -> bool:
    return jax_status()[0]


def _jax_activation(name: str):
    import jax
    import jax.numpy as jnp

    table = {"tanh": jnp.tanh, "relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid, "linear": lambda h: h,
             "gelu": functools.partial(jax.nn.gelu, approximate=False), "silu": jax.nn.silu,
             "elu": jax.nn.elu, "selu": jax.nn.selu, "erf": jax.scipy.special.erf}
    if name not in table:
        raise NoPeer(f"the JAX comparison covers the activations {sorted(table)}, not {name!r}")
    return table[name]


def jax_profile_function(activation: str, norm: str | None):
    """``profile(weights (L, n, n), biases (L, n), x (B, n), g (B, n)) -> (log norms (B, L+1), (L,))``.

    The loss sum(x_L * g) gets a zero perturbation added to every layer's
    output; ``jax.grad`` with respect to the perturbations gives d loss / d x_l,
    with respect to the weights the weight gradients.  Layers go through
    ``lax.scan``.
    """
    import jax
    import jax.numpy as jnp

    phi = _jax_activation(activation)
    if norm not in (None, "batch"):
        raise NoPeer(f"the JAX comparison covers norm None or 'batch', not {norm!r}")

    def layer(x, parameters):
        weight, bias, perturbation = parameters
        h = x @ weight.T + bias
        if norm == "batch":  # over the batch, per feature, biased variance (docs/ARCHITECTURE.md)
            h = (h - h.mean(axis=0)) / jnp.sqrt(h.var(axis=0) + 1e-5)
        return phi(h) + perturbation, None

    def loss(weights, perturbations, x, biases, grad_output):
        output, _ = jax.lax.scan(layer, x, (weights, biases, perturbations))
        return jnp.sum(output * grad_output)

    def profile(weights, biases, x, grad_output):
        perturbations = jnp.zeros((weights.shape[0], *x.shape), dtype=x.dtype)
        weight_grads, layer_grads, input_grad = jax.grad(loss, argnums=(0, 1, 2))(
            weights, perturbations, x, biases, grad_output)
        grad_norms = jnp.concatenate([jnp.linalg.norm(input_grad, axis=-1)[None],
                                      jnp.linalg.norm(layer_grads, axis=-1)])  # (L+1, B)
        return jnp.log(grad_norms.T), jnp.log(jnp.sqrt(jnp.sum(weight_grads ** 2, axis=(1, 2))))

    return profile


def jax_runner(problem: Problem) -> tuple[Callable[[], Any], str]:
    """The job in JAX (float64): (runner, detail).  Raises NoPeer where there is no JAX version of it.

    Call it, and the runner, inside ``jax.enable_x64(True)``.
    """
    import jax
    import jax.numpy as jnp

    job = problem.job
    if job.recurrent:
        raise NoPeer(f"no JAX version of a {job.kind} job on a {job.model}")
    if job.kind == "lyapunov":
        raise NoPeer("no JAX version of Lyapunov exponents of a stack")
    if any(stack.residual is not None for stack in problem.models):
        raise NoPeer("the JAX comparison covers stacks without residual")

    def stacked(arrays):
        return jnp.asarray(np.stack(arrays))

    if job.kind == "jacobian":
        stack = problem.models[0]
        weights, biases = jnp.asarray(np.asarray(stack.weights)), jnp.asarray(np.asarray(stack.biases))
        phi = _jax_activation(job.activation)
        if job.norm is not None:
            raise NoPeer("the JAX Jacobian covers stacks without norm")

        def forward(v):
            output, _ = jax.lax.scan(lambda h, p: (phi(p[0] @ h + p[1]), None), v, (weights, biases))
            return output

        jacobians = jax.jit(jax.vmap(jax.jacrev(forward)))
        x = jnp.asarray(problem.xs[0])
        return lambda: jacobians(x).block_until_ready(), f"jax.jit(vmap(jacrev)), float64, {XLA_THREADS}"
    profile = jax_profile_function(job.activation, job.norm)
    weights = stacked([np.asarray(stack.weights) for stack in problem.models])
    biases = stacked([np.asarray(stack.biases) for stack in problem.models])
    xs, grad_outputs = stacked(problem.xs), stacked(problem.grad_outputs)
    profiles = jax.jit(jax.vmap(profile))  # one config for the single-profile jobs

    def run():
        result = jax.block_until_ready(profiles(weights, biases, xs, grad_outputs))
        log_grad_norm, log_weight_grad_norm = result
        return {"log_grad_norm": log_grad_norm, "log_weight_grad_norm": log_weight_grad_norm}

    return run, f"jax.jit(vmap(profile)) over {len(problem.models)} config(s), float64, {XLA_THREADS}"


# ---------------------------------------------------------------------------
# GEMM
# ---------------------------------------------------------------------------

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
