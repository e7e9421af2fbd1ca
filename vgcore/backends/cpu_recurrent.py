"""The compiled CPU backend of recurrent models: workspaces and outputs around vgcore._ext._recurrent.

Implements :class:`vgcore.backends.Backend` for the "recurrent" kind.  Problems
arrive validated (C-contiguous, the model's dtype); while a kernel runs its
OpenMP threads over blocks of samples, BLAS is held to one thread
(vgcore.backends._threads).
"""

from __future__ import annotations

import numpy as np

from vgcore._activations import ACTIVATION_CODES
from vgcore._ext import _kernels, _recurrent
from vgcore._recurrent import CELL_CODES
from vgcore.backends._common import batched_singular_values
from vgcore.backends._threads import blas_held_to_one_thread, n_partitions, n_threads

_NO_INPUTS = {np.dtype(np.float32): np.zeros((1, 1, 1), np.float32),
              np.dtype(np.float64): np.zeros((1, 1, 1), np.float64)}


def _model_arguments(problem) -> tuple:
    """(cell, activation, weight_hh, weight_ih, bias_hh, bias_ih, s0, inputs, has_inputs) of a problem."""
    model = problem.model
    has_inputs = problem.inputs is not None
    inputs = problem.inputs if has_inputs else _NO_INPUTS[model.dtype]
    return (CELL_CODES[model.cell], ACTIVATION_CODES[model.activation], model.weight_hh, model.weight_ih,
            model.bias_hh, model.bias_ih, problem.x, inputs, has_inputs)


def _check_status(status: np.ndarray, what: str) -> None:
    if status.any():
        if (status == -1000).any():
            raise MemoryError(f"{what}: could not allocate a thread's workspace")
        raise RuntimeError(f"{what}: LAPACK reported info {status[status != 0][0]}")


def forward(problem, out: np.ndarray | None) -> np.ndarray:
    """s_T (B, N); see vgcore.forward."""
    x = problem.x
    if out is None:
        out = np.empty_like(x)
    blocks = min(n_partitions(), x.shape[0])
    status = np.zeros(blocks, np.intc)
    with blas_held_to_one_thread():
        _recurrent.forward(*_model_arguments(problem), problem.depth, out, status, blocks,
                           min(n_threads(), blocks))
    _check_status(status, "forward")
    return out


def profile_memory(model, batch: int, steps: int, segment: int | None) -> int:
    """Bytes of the workspaces :func:`gradient_profile` allocates (the arrays below, outputs included)."""
    kept = steps if segment is None else min(segment, steps)
    itemsize = model.dtype.itemsize
    width, columns = model.state_width, _recurrent.cache_columns(CELL_CODES[model.cell], model.hidden_width)
    checkpoints = 0 if kept == steps else -(-steps // kept) * batch * width
    values = (kept + 1) * batch * width + kept * batch * columns + checkpoints + batch * width
    blocks = min(n_partitions(), batch)
    logs = kept * batch + batch + batch * (steps + 1) + steps
    return values * itemsize + 8 * logs + blocks * steps * (8 + model.gates * model.hidden_width)


def gradient_profile(problem, grad_output: np.ndarray, segment: int | None) -> dict:
    """The compiled profile through time; ``segment`` S keeps states and caches only every S steps.

    Without a segment every step's state (N values per sample) and cache
    (2 G n + E: gates, their derivatives and the cell's extra values) are
    kept: T B (N + C) values.  With S the backward pass recomputes each
    segment's forward pass from checkpoints every S steps (one extra forward
    pass): (T/S + S) B N + S B C values, bitwise the same results.
    """
    model, x = problem.model, problem.x
    steps, batch, dtype = problem.depth, x.shape[0], model.dtype
    width, gn = model.state_width, model.gates * model.hidden_width
    columns = _recurrent.cache_columns(CELL_CODES[model.cell], model.hidden_width)
    kept = steps if segment is None else min(segment, steps)
    blocks = min(n_partitions(), batch)
    n_segments = -(-steps // kept)
    checkpoints = np.empty((n_segments if n_segments > 1 else 1, batch if n_segments > 1 else 1,
                            width if n_segments > 1 else 1), dtype)
    states = np.empty((kept + 1, batch, width), dtype)
    caches = np.empty((kept, batch, columns), dtype)
    log_scale_hh = np.empty((kept, batch))
    log_grad_norm = np.empty((batch, steps + 1))
    log_weight_grad_norm = np.empty(steps)
    saturated = np.zeros((blocks, steps), np.int64)
    alive = np.zeros((blocks, steps, gn), np.uint8)
    status = np.zeros(blocks, np.intc)
    with blas_held_to_one_thread():
        _recurrent.gradient_profile(
            *_model_arguments(problem), grad_output, steps, kept, checkpoints, states, caches,
            log_scale_hh, np.empty((batch, width), dtype), np.empty(batch), log_grad_norm,
            log_weight_grad_norm, saturated, alive, status, n_threads(),
        )
    _check_status(status, "gradient_profile")
    if np.isnan(log_weight_grad_norm).any():
        raise MemoryError("gradient_profile: could not allocate a thread's workspace")
    return {
        "log_grad_norm": log_grad_norm,
        "log_weight_grad_norm": log_weight_grad_norm,
        "saturation": saturated.sum(axis=0) / (batch * gn),
        "dead": (alive.max(axis=0) == 0).mean(axis=1),
    }


def gradient_profiles(problems, grad_outputs) -> list[dict]:
    """One :func:`gradient_profile` after another (each runs its samples in parallel)."""
    if len(problems) != len(grad_outputs):
        raise ValueError("problems and grad_outputs must have the same length")
    return [gradient_profile(problem, g, None) for problem, g in zip(problems, grad_outputs, strict=True)]


def _jacobian_product(kernel, problem, vectors: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """Runs a JVP / VJP kernel, in place on ``out`` after copying (and broadcasting) ``vectors``."""
    model, x = problem.model, problem.x
    batch, k = x.shape[0], vectors.shape[-2]
    if out is None:
        out = np.empty((batch, k, model.state_width), model.dtype)
    np.copyto(out, vectors)
    items = _kernels.work_items(batch, k, n_partitions())
    status = np.zeros(items, np.intc)
    with blas_held_to_one_thread():
        kernel(*_model_arguments(problem), problem.depth, out, status, items, n_threads())
    _check_status(status, kernel.__name__)
    return out


def jvp(problem, tangents: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """(d s_T / d s_0) v, (B, k, N); see vgcore.jvp."""
    return _jacobian_product(_recurrent.jvp, problem, tangents, out)


def vjp(problem, cotangents: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """(d s_T / d s_0)^T u, (B, k, N); see vgcore.vjp."""
    return _jacobian_product(_recurrent.vjp, problem, cotangents, out)


def jacobian(problem, out: np.ndarray | None) -> np.ndarray:
    """d s_T / d s_0 per sample, (B, N, N); see vgcore.jacobian."""
    # Row i of J is J^T e_i: the VJP of the identity gives J in (out, in) layout directly.
    identity = np.eye(problem.model.state_width, dtype=problem.model.dtype)
    return _jacobian_product(_recurrent.vjp, problem, identity, out)


def singular_values(problem) -> np.ndarray:
    """The compiled Jacobian, then LAPACK's SVD per sample, (B, N) descending."""
    return batched_singular_values(jacobian(problem, None))


def lyapunov_log_growth(problem, k: int) -> np.ndarray:
    """Unsorted sums over the counted steps of log|R_ii|, (B, k) float64; OpenMP over samples."""
    x = problem.x
    batch = x.shape[0]
    blocks = min(n_partitions(), batch)
    log_growth = np.empty((batch, k))
    status = np.zeros(blocks, np.intc)
    # BLAS stays on one thread even with fewer samples than cores: threaded BLAS would make the
    # rounding depend on the thread count, and on a busy machine its spinning threads cost far more
    # than they gain (measured: 10-27 ms per step against 1.8 ms single-threaded, n 512, k 32).
    with blas_held_to_one_thread():
        _recurrent.lyapunov_log_growth(*_model_arguments(problem), problem.depth, problem.warmup,
                                       log_growth, status, blocks, min(n_threads(), blocks))
    _check_status(status, "lyapunov_exponents")
    return log_growth
