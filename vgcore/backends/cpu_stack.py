"""The compiled CPU backend of dense stacks: allocates outputs and workspaces, then calls vgcore._ext.

Implements :class:`vgcore.backends.Backend` for the "stack" kind.  Problems
arrive validated (C-contiguous, the stack's dtype); while a kernel runs its
OpenMP threads, BLAS is held to one thread (vgcore.backends._threads).
"""

from __future__ import annotations

import numpy as np

from vgcore._activations import ACTIVATION_CODES, NORM_CODES
from vgcore._ext import _kernels, _spectra
from vgcore.backends._common import batched_singular_values
from vgcore.backends._threads import blas_held_to_one_thread, n_partitions, n_threads


def _layer_options(stack) -> tuple[int, bool, float, int]:
    residual = stack.residual
    return (ACTIVATION_CODES[stack.activation], residual is not None,
            0.0 if residual is None else float(residual), NORM_CODES[stack.norm])


def forward(problem, out: np.ndarray | None) -> np.ndarray:
    """x_L (B, n); see vgcore.forward."""
    stack, x = problem.model, problem.x
    if out is None:
        out = np.empty_like(x)
    blocks = min(n_partitions(), x.shape[0])
    threads = min(n_threads(), blocks)
    with blas_held_to_one_thread():
        _kernels.forward(stack.weights, stack.biases, x, *_layer_options(stack), out, blocks, threads)
    return out


def gradient_profile(problem, grad_output: np.ndarray, segment: int | None) -> dict:
    """The compiled gradient profile; ``segment`` S keeps activations only every S layers.

    With S the forward pass is recomputed segment by segment during the
    backward pass (one extra forward pass): memory (L/S + 2S) B n values
    instead of 2 L B n, results bitwise the same.
    """
    stack, x = problem.model, problem.x
    depth, width, batch, dtype = stack.depth, stack.width, x.shape[0], stack.dtype
    threads = n_threads()
    blocks = min(n_partitions(), batch)
    kept = depth if segment is None else min(segment, depth)
    xs = np.empty((kept + 1, batch, width), dtype)
    derivatives = np.empty((kept, batch, width), dtype)
    mean_pre, inv_pre, inv_post = (np.empty((kept, batch), dtype) for _ in range(3))
    log_scale_h = np.empty((kept, batch))
    x_exp = np.empty((kept + 1, batch))  # exponents of the scaled rows of xs (_layers._scale_rows)
    log_grad_norm = np.empty((batch, depth + 1))
    log_weight_grad_norm = np.empty(depth)
    saturated = np.zeros((blocks, depth), np.int64)
    alive = np.zeros((blocks, depth, width), np.uint8)
    options = _layer_options(stack)
    with blas_held_to_one_thread():
        if segment is None:
            _kernels.gradient_profile(
                stack.weights, stack.biases, x, grad_output, *options, xs, derivatives, mean_pre,
                inv_pre, inv_post, log_scale_h, x_exp, log_grad_norm, log_weight_grad_norm, saturated,
                alive, threads,
            )
        else:
            checkpoints = np.empty((-(-depth // kept), batch, width), dtype)
            checkpoint_exp = np.empty(checkpoints.shape[:2])
            _kernels.gradient_profile_segmented(
                stack.weights, stack.biases, x, grad_output, *options, kept, checkpoints, xs,
                derivatives, mean_pre, inv_pre, inv_post, log_scale_h, checkpoint_exp, x_exp,
                np.empty((batch, width), dtype),
                np.empty(batch), log_grad_norm, log_weight_grad_norm, saturated, alive, threads,
            )
    return {
        "log_grad_norm": log_grad_norm,
        "log_weight_grad_norm": log_weight_grad_norm,
        "saturation": saturated.sum(axis=0) / (batch * width),
        "dead": (alive.max(axis=0) == 0).mean(axis=1),
    }


def _jacobian_product(kernel, problem, vectors: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """Runs a JVP / VJP kernel, in place on ``out`` after copying (and broadcasting) ``vectors``."""
    stack, x = problem.model, problem.x
    batch, k = x.shape[0], vectors.shape[-2]
    if out is None:
        out = np.empty((batch, k, stack.width), stack.dtype)
    np.copyto(out, vectors)
    threads = n_threads()
    items = _kernels.work_items(batch, k, n_partitions())
    with blas_held_to_one_thread():
        kernel(stack.weights, stack.biases, x, *_layer_options(stack), out, items, threads)
    return out


def jvp(problem, tangents: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """J(x_b) v, (B, k, n); see vgcore.jvp."""
    return _jacobian_product(_kernels.jvp, problem, tangents, out)


def vjp(problem, cotangents: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """J(x_b)^T u, (B, k, n); see vgcore.vjp."""
    return _jacobian_product(_kernels.vjp, problem, cotangents, out)


def jacobian(problem, out: np.ndarray | None) -> np.ndarray:
    """d x_L / d x_0 per sample, (B, n, n); see vgcore.jacobian."""
    # Row i of J is J^T e_i: the VJP of the identity gives J in (out, in) layout directly.
    identity = np.eye(problem.model.width, dtype=problem.model.dtype)
    return _jacobian_product(_kernels.vjp, problem, identity, out)


def singular_values(problem) -> np.ndarray:
    """The compiled Jacobian, then LAPACK's divide-and-conquer SVD per sample, (B, n) descending."""
    return batched_singular_values(jacobian(problem, None))


def lyapunov_log_growth(problem, k: int) -> np.ndarray:
    """Unsorted sums over layers of log|R_ii|, (B, k) float64: vgcore._ext._spectra, OpenMP over samples."""
    stack, x = problem.model, problem.x
    batch = x.shape[0]
    blocks = min(n_partitions(), batch)
    log_growth = np.empty((batch, k))
    status = np.zeros(blocks, np.intc)
    with blas_held_to_one_thread():
        _spectra.lyapunov_log_growth(stack.weights, stack.biases, x, *_layer_options(stack),
                                     log_growth, status, blocks, min(n_threads(), blocks))
    if status.any():
        raise RuntimeError(f"lyapunov_exponents: LAPACK reported info {status[status != 0][0]}")
    return log_growth


def gradient_profiles(problems, grad_outputs) -> list[dict]:
    """Gradient profiles of many stacks at once (the sweep's chunk runner).

    Stacks of one shape (depth, width, batch, dtype) run in one compiled call,
    in parallel over stacks with no Python work per stack; activations,
    residuals and norms may differ within a call.

    Parameters
    ----------
    problems : sequence of Problem
        Validated problems on host stacks.
    grad_outputs : sequence of ndarray, each (B_i, n_i)
        Cotangents in each stack's dtype.

    Returns
    -------
    list of dict
        One :func:`gradient_profile` result per stack, in order.
    """
    if len(problems) != len(grad_outputs):
        raise ValueError("problems and grad_outputs must have the same length")
    stacks = [problem.model for problem in problems]
    xs = [problem.x for problem in problems]
    groups: dict[tuple, list[int]] = {}
    for index, (stack, x) in enumerate(zip(stacks, xs, strict=True)):
        groups.setdefault((stack.depth, stack.width, x.shape[0], stack.dtype), []).append(index)
    results: list[dict | None] = [None] * len(stacks)
    for (depth, width, batch, dtype), members in groups.items():
        chunk = [stacks[i] for i in members]
        x = np.ascontiguousarray(np.stack([xs[i] for i in members]), dtype=dtype)
        g = np.ascontiguousarray(np.stack([grad_outputs[i] for i in members]), dtype=dtype)
        options = [_layer_options(stack) for stack in chunk]
        log_grad_norm = np.empty((len(chunk), batch, depth + 1))
        log_weight_grad_norm = np.empty((len(chunk), depth))
        saturated = np.zeros((len(chunk), depth), np.int64)
        alive = np.zeros((len(chunk), depth, width), np.uint8)
        with blas_held_to_one_thread():
            _kernels.gradient_profiles(
                [stack.weights for stack in chunk], [stack.biases for stack in chunk],
                x, g,
                np.array([o[0] for o in options], np.intc),
                np.array([o[1] for o in options], np.uint8),
                np.array([o[2] for o in options], np.float64),
                np.array([o[3] for o in options], np.intc),
                depth, log_grad_norm, log_weight_grad_norm, saturated, alive, n_threads(),
            )
        for position, index in enumerate(members):
            results[index] = {
                "log_grad_norm": log_grad_norm[position],
                "log_weight_grad_norm": log_weight_grad_norm[position],
                "saturation": saturated[position] / (batch * width),
                "dead": (alive[position] == 0).mean(axis=1),
            }
    return results
