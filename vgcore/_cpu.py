"""The compiled CPU backend: allocates outputs and workspaces, then calls vgcore._kernels.

Inputs arrive validated and C-contiguous in the stack's dtype (vgcore._api).
While a kernel runs its OpenMP threads, BLAS is held to one thread so the two
thread pools never oversubscribe the cores.
"""

from __future__ import annotations

import functools

import numpy as np

from vgcore import _kernels
from vgcore._activations import ACTIVATION_CODES

NORM_CODES = {None: 0, "pre": 1, "post": 2}


def n_threads() -> int:
    """Threads the kernels use: OpenMP's current maximum (honours OMP_NUM_THREADS and threadpoolctl)."""
    return max(1, int(_kernels.max_threads()))


@functools.cache
def n_partitions() -> int:
    """Blocks the work is cut into: the machine's processor count, never the thread count.

    Fixed per machine, so that results are bitwise the same for any number of
    threads (BLAS may round a row differently within blocks of other heights).
    """
    return max(1, int(_kernels.num_procs()))


@functools.cache
def _threadpool_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _blas_held_to_one_thread():
    """BLAS limited to one thread while the kernels run.

    With several OpenMP threads calling BLAS the two pools would
    oversubscribe the cores; with one, BLAS's own threads would make the
    rounding depend on the thread count.  The kernels parallelise themselves.
    """
    return _threadpool_controller().limit(limits=1, user_api="blas")


def _layer_options(stack) -> tuple[int, bool, float, int]:
    residual = stack.residual
    return (ACTIVATION_CODES[stack.activation], residual is not None,
            0.0 if residual is None else float(residual), NORM_CODES[stack.norm])


def forward(stack, x: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        out = np.empty_like(x)
    blocks = min(n_partitions(), x.shape[0])
    threads = min(n_threads(), blocks)
    with _blas_held_to_one_thread():
        _kernels.forward(stack.weights, stack.biases, x, *_layer_options(stack), out, blocks, threads)
    return out


def gradient_profile(stack, x: np.ndarray, grad_output: np.ndarray, segment: int | None = None) -> dict:
    """The compiled gradient profile; ``segment`` S keeps activations only every S layers.

    With S the forward pass is recomputed segment by segment during the
    backward pass (one extra forward pass): memory (L/S + 2S) B n values
    instead of 2 L B n, results bitwise the same.
    """
    depth, width, batch, dtype = stack.depth, stack.width, x.shape[0], stack.dtype
    threads = n_threads()
    blocks = min(n_partitions(), batch)
    kept = depth if segment is None else min(segment, depth)
    xs = np.empty((kept + 1, batch, width), dtype)
    derivatives = np.empty((kept, batch, width), dtype)
    mean_pre, inv_pre, inv_post = (np.empty((kept, batch), dtype) for _ in range(3))
    log_scale_h = np.empty((kept, batch))
    log_grad_norm = np.empty((batch, depth + 1))
    log_weight_grad_norm = np.empty(depth)
    saturated = np.zeros((blocks, depth), np.int64)
    alive = np.zeros((blocks, depth, width), np.uint8)
    options = _layer_options(stack)
    with _blas_held_to_one_thread():
        if segment is None:
            _kernels.gradient_profile(
                stack.weights, stack.biases, x, grad_output, *options, xs, derivatives, mean_pre,
                inv_pre, inv_post, log_scale_h, log_grad_norm, log_weight_grad_norm, saturated, alive,
                threads,
            )
        else:
            checkpoints = np.empty((-(-depth // kept), batch, width), dtype)
            _kernels.gradient_profile_segmented(
                stack.weights, stack.biases, x, grad_output, *options, kept, checkpoints, xs,
                derivatives, mean_pre, inv_pre, inv_post, log_scale_h, np.empty((batch, width), dtype),
                np.empty(batch), log_grad_norm, log_weight_grad_norm, saturated, alive, threads,
            )
    return {
        "log_grad_norm": log_grad_norm,
        "log_weight_grad_norm": log_weight_grad_norm,
        "saturation": saturated.sum(axis=0) / (batch * width),
        "dead": (alive.max(axis=0) == 0).mean(axis=1),
    }


def _jacobian_product(kernel, stack, x: np.ndarray, vectors: np.ndarray,
                      out: np.ndarray | None) -> np.ndarray:
    """Runs a JVP / VJP kernel, in place on ``out`` after copying (and broadcasting) ``vectors``."""
    batch, k = x.shape[0], vectors.shape[-2]
    if out is None:
        out = np.empty((batch, k, stack.width), stack.dtype)
    np.copyto(out, vectors)
    threads = n_threads()
    items = _kernels.work_items(batch, k, n_partitions())
    with _blas_held_to_one_thread():
        kernel(stack.weights, stack.biases, x, *_layer_options(stack), out, items, threads)
    return out


def jvp(stack, x, tangents, out):
    return _jacobian_product(_kernels.jvp, stack, x, tangents, out)


def vjp(stack, x, cotangents, out):
    return _jacobian_product(_kernels.vjp, stack, x, cotangents, out)


def jacobian(stack, x, out):
    # Row i of J is J^T e_i: the VJP of the identity gives J in (out, in) layout directly.
    identity = np.eye(stack.width, dtype=stack.dtype)
    return _jacobian_product(_kernels.vjp, stack, x, identity, out)


def gradient_profiles(stacks, xs, grad_outputs) -> list[dict]:
    """Gradient profiles of many stacks at once (the sweep's chunk runner).

    Stacks of one shape (depth, width, batch, dtype) run in one compiled call,
    in parallel over stacks with no Python work per stack; activations,
    residuals and norms may differ within a call.

    Parameters
    ----------
    stacks : sequence of Stack
        Validated host stacks.
    xs, grad_outputs : sequence of ndarray, each (B_i, n_i)
        Inputs and cotangents in each stack's dtype.

    Returns
    -------
    list of dict
        One :func:`gradient_profile` result per stack, in order.
    """
    if not (len(stacks) == len(xs) == len(grad_outputs)):
        raise ValueError("stacks, xs and grad_outputs must have the same length")
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
        with _blas_held_to_one_thread():
            _kernels.gradient_profiles(
                np.array([stack.weights.ctypes.data for stack in chunk], np.intp),
                np.array([stack.biases.ctypes.data for stack in chunk], np.intp),
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
