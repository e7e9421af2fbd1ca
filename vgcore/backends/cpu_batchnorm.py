"""The compiled CPU backend of batch-normalised stacks (kind "batchnorm"): vgcore._ext._batchnorm.

Implements :class:`vgcore.backends.Backend`.  BN couples the samples, so the
kernels cut each layer into blocks of features (n_partitions of them, fixed
per machine: results are bitwise the same for any thread count) instead of
blocks of samples; jvp / vjp cut the k batch vectors into items.  Every
workspace is allocated here, so the kernels never allocate; BLAS is held to
one thread while they run.  jacobian, singular_values and lyapunov_log_growth
refuse with a ValueError naming norm (vgcore.backends._batchnorm_common).
"""

from __future__ import annotations

import numpy as np

from vgcore._activations import ACTIVATION_CODES
from vgcore._ext import _batchnorm
from vgcore.backends._batchnorm_common import jacobian as jacobian  # refused for a coupled batch
from vgcore.backends._batchnorm_common import lyapunov_log_growth as lyapunov_log_growth
from vgcore.backends._batchnorm_common import singular_values as singular_values
from vgcore.backends._threads import blas_held_to_one_thread, n_partitions, n_threads


def _layer_options(stack) -> tuple[int, bool, float]:
    residual = stack.residual
    return (ACTIVATION_CODES[stack.activation], residual is not None,
            0.0 if residual is None else float(residual))


#: Multiply-adds of one layer's product (B n^2) below which the layers run on one thread.  Threads
#: that split a layer by features meet two or three times per layer; where the cores are shared
#: with other work each meeting can wait a scheduler time slice (milliseconds), far more than a
#: small layer's product.  Measured on 2 cores under load (load average 11-15, min of 5 runs, one
#: thread against two): L 1600 n 64 B 4: 0.09 s against 55 s; L 100 n 256 B 64 (the batchnorm
#: bench job): 0.2-0.25 s against 1.3-9 s; L 30 n 512 B 256: 0.97 s against 3.3 s.  On idle cores
#: two threads pay off once the product dominates the meetings; this threshold (B 64, n 512)
#: keeps the small and medium problems on one thread.
PARALLEL_LAYER_WORK = 1 << 24


def _feature_blocks(width: int) -> int:
    """Blocks of features a layer is cut into: fixed per machine, whatever the thread count."""
    return max(1, min(n_partitions(), width))


def _layer_threads(batch: int, width: int, blocks: int) -> int:
    """Threads for the per-layer (synchronising) phases: 1 for small layers (PARALLEL_LAYER_WORK)."""
    if batch * width * width < PARALLEL_LAYER_WORK:
        return 1
    return max(1, min(n_threads(), blocks))


def forward(problem, out: np.ndarray | None) -> np.ndarray:
    """x_L (B, n); see vgcore.forward."""
    stack, x = problem.model, problem.x
    batch, width, dtype = x.shape[0], stack.width, stack.dtype
    if out is None:
        out = np.empty_like(x)
    blocks = _feature_blocks(width)
    with blas_held_to_one_thread():
        _batchnorm.forward(stack.weights, stack.biases, x, *_layer_options(stack), out,
                           np.empty((4, batch, width), dtype), np.empty(width, dtype), np.empty(2 * width),
                           np.zeros(width, dtype), blocks, _layer_threads(batch, width, blocks))
    return out


def gradient_profile(problem, grad_output: np.ndarray, segment: int | None) -> dict:
    """The compiled profile; it keeps every layer (``segment`` is ignored: BN's backward needs them all)."""
    stack, x = problem.model, problem.x
    depth, width, batch, dtype = stack.depth, stack.width, x.shape[0], stack.dtype
    blocks = _feature_blocks(width)
    threads = n_threads()
    log_grad_norm = np.empty((batch, depth + 1))
    log_weight_grad_norm = np.empty(depth)
    saturated = np.zeros((depth, blocks), np.int64)
    alive = np.zeros((depth, width), np.uint8)
    with blas_held_to_one_thread():
        _batchnorm.gradient_profile(
            stack.weights, stack.biases, x, grad_output, *_layer_options(stack),
            np.empty((depth + 1, batch, width), dtype), np.empty((depth, batch, width), dtype),
            np.empty((depth, batch, width), dtype), np.empty((depth, width), dtype),
            np.empty((2, batch, width), dtype), np.empty(2 * width), np.empty((blocks, batch)),
            np.zeros(width, dtype),
            np.empty((max(1, min(threads, depth)), _batchnorm.weight_gradient_scratch(batch, width)), dtype),
            log_grad_norm, log_weight_grad_norm, saturated, alive, blocks,
            _layer_threads(batch, width, blocks), max(1, min(threads, depth)),
        )
    return {
        "log_grad_norm": log_grad_norm,
        "log_weight_grad_norm": log_weight_grad_norm,
        "saturation": saturated.sum(axis=1) / (batch * width),
        "dead": (alive == 0).mean(axis=1),
    }


def gradient_profiles(problems, grad_outputs) -> list[dict]:
    """One :func:`gradient_profile` after another (each already runs on every thread)."""
    if len(problems) != len(grad_outputs):
        raise ValueError("problems and grad_outputs must have the same length")
    return [gradient_profile(problem, g, None) for problem, g in zip(problems, grad_outputs, strict=True)]


def _jacobian_product(problem, vectors: np.ndarray, out: np.ndarray | None, transpose: bool) -> np.ndarray:
    stack, x = problem.model, problem.x
    depth, width, batch, dtype = stack.depth, stack.width, x.shape[0], stack.dtype
    k = vectors.shape[-2]
    if out is None:
        out = np.empty((batch, k, width), dtype)
    np.copyto(out, vectors)
    blocks = _feature_blocks(width)
    items = max(1, min(n_partitions(), k))
    largest_item = -(-k // items)
    threads = n_threads()
    with blas_held_to_one_thread():
        _batchnorm.jacobian_products(
            stack.weights, stack.biases, x, *_layer_options(stack), transpose, out,
            np.empty((depth, batch, width), dtype), np.empty((depth, batch, width), dtype),
            np.empty((depth, width), dtype), np.empty((2, batch, width), dtype), np.empty(2 * width),
            np.zeros(width, dtype), np.empty((items, 3 * largest_item * batch * width), dtype),
            np.empty((items, 2 * width)), blocks, _layer_threads(batch, width, blocks), min(threads, items),
        )
    return out


def jvp(problem, tangents: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """J T_j for batch tangents T_j = tangents[:, j, :], (B, k, n)."""
    return _jacobian_product(problem, tangents, out, transpose=False)


def vjp(problem, cotangents: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """J^T U_j for batch cotangents U_j = cotangents[:, j, :], (B, k, n)."""
    return _jacobian_product(problem, cotangents, out, transpose=True)
