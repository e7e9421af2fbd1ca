"""Spectra of the input-output Jacobian: singular values and Lyapunov exponents.

Backends as in vgcore._api: "cpu" (compiled: vgcore._spectra, and the
Jacobian of vgcore._kernels), "numpy" (the plain reference,
vgcore._reference_spectra), "cuda" (the CuPy mirror, vgcore._cuda), "auto"
("cuda" for a stack on the GPU, else "cpu").  Results come back on the
device of the inputs.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from vgcore import _api, _reference_spectra
from vgcore import _validation as check
from vgcore._stack import Stack

__all__ = ["lyapunov_exponents", "singular_values"]


def _resolve(backend: Any, stack: Stack) -> str:
    """"cpu", "numpy" or "cuda" for ``backend`` and this stack; ValueError naming backend if unavailable."""
    resolved = _api._resolve(check.check_backend(backend), stack)
    if resolved == "cuda":
        _api._backend(resolved, stack)  # ValueError when CuPy or a GPU is missing
    return resolved


def _check_k(k: Any, width: int) -> int:
    if k is None:
        return width
    k = check.check_int(k, "k")
    if k > width:
        raise ValueError(f"k: must be <= the stack's width {width}, got {k}")
    return k


def _options(stack: Stack) -> tuple:
    return stack.activation, stack.residual, stack.norm


def singular_values(stack: Stack, x: Any, *, backend: str = "auto"):
    """Singular values of each sample's input-output Jacobian d x_L / d x_0.

    Parameters
    ----------
    stack : Stack
    x : array, shape (B, n)
        Inputs x_0; any real floating dtype, cast to the stack's dtype.
    backend : {"auto", "cpu", "cuda", "numpy"}
        "cpu": the compiled Jacobian (:func:`vgcore.jacobian`), then LAPACK's
        divide-and-conquer SVD (``numpy.linalg.svd``) per sample, samples
        spread over the kernels' threads with BLAS held to one thread each.

    Returns
    -------
    ndarray, shape (B, n), the stack's dtype (CuPy for a stack on the GPU)
        Descending.  They are the singular values of the product of the
        layers' Jacobians, so at depth they underflow or overflow like it
        (use :func:`lyapunov_exponents` for log rates that stay finite).

    Raises
    ------
    TypeError, ValueError
        Naming the offending argument, before any work.
    """
    stack = _api._check_stack(stack)
    backend = _resolve(backend, stack)
    x = _api._check_batch(stack, x)
    if backend == "cuda":
        return _api._backend(backend, stack).singular_values(stack, x)
    if backend == "numpy":
        return _reference_spectra.singular_values(stack.weights, stack.biases, x, *_options(stack))
    from vgcore import _cpu

    jacobians = _cpu.jacobian(stack, x, None)
    return _batched_singular_values(jacobians, _cpu.n_threads())


def _batched_singular_values(jacobians: np.ndarray, threads: int) -> np.ndarray:
    """numpy.linalg.svd per matrix, in contiguous chunks of samples on ``threads`` threads.

    Each matrix is factored by one single-threaded LAPACK call whatever the
    chunking (numpy releases the GIL there), so the result is bitwise the
    same for any number of threads.
    """
    from vgcore import _cpu

    batch, width = jacobians.shape[0], jacobians.shape[-1]
    out = np.empty((batch, width), jacobians.dtype)
    chunks = max(1, min(threads, batch))
    bounds = [(c * batch // chunks, (c + 1) * batch // chunks) for c in range(chunks)]

    def run(bound):
        start, stop = bound
        out[start:stop] = np.linalg.svd(jacobians[start:stop], compute_uv=False)

    with _cpu._blas_held_to_one_thread():
        if chunks == 1:
            run(bounds[0])
        else:
            with ThreadPoolExecutor(chunks) as pool:
                list(pool.map(run, bounds))
    return out


def lyapunov_exponents(stack: Stack, x: Any, k: int | None = None, *, backend: str = "auto"):
    """Lyapunov exponents of the stack at each input: per-layer mean log growth rates of k directions.

    The k tangents of each sample start as the first k standard basis
    vectors e_1..e_k of the input space.  Every layer maps them with its
    Jacobian J_l(x_{l-1}) (the forward-mode JVP), then a QR factorisation
    T = Q R replaces them by the orthonormal columns of Q; exponent i is
    (1/L) sum_l log|R_ii| of layer l (Benettin's algorithm).  Renormalising
    every layer keeps the result finite and exact at any depth, where the
    Jacobian itself underflows or overflows.

    Identities: with k = n, the exponents sum to (1/L) log|det J| =
    (1/L) sum_l log|det J_l|; for any k, L times their sum is the log of the
    k-volume |det R| of J [e_1..e_k].  Where a layer maps a direction to
    zero (dead relu units, a layer norm's null space, k above the Jacobian's
    rank) QR measures rounding, so those exponents are of the size of
    log(eps) / L and not reproducible bit for bit across backends; they are
    -inf only where the product is exactly zero (e.g. a layer whose every
    relu unit is dead).

    Parameters
    ----------
    stack : Stack
    x : array, shape (B, n)
        Inputs x_0; any real floating dtype, cast to the stack's dtype.
    k : int, optional
        Number of directions, 1 <= k <= n; default n (the whole spectrum).
    backend : {"auto", "cpu", "cuda", "numpy"}
        "cpu": compiled (vgcore._spectra), nogil, LAPACK ?geqrf / ?orgqr per
        sample and layer, OpenMP over blocks of samples; bitwise the same
        results for any number of threads.

    Returns
    -------
    ndarray, shape (B, k), float64 (CuPy for a stack on the GPU)
        Sorted descending.  Logs are accumulated in float64 for both dtypes;
        a float32 stack's Jacobian products and QR run in float32.

    Raises
    ------
    TypeError, ValueError
        Naming the offending argument, before any work.
    """
    stack = _api._check_stack(stack)
    backend = _resolve(backend, stack)
    x = _api._check_batch(stack, x)
    k = _check_k(k, stack.width)
    if backend == "cuda":
        return _api._backend(backend, stack).lyapunov_exponents(stack, x, k)
    rates = _log_growth(stack, x, k, backend) / stack.depth
    return np.ascontiguousarray(np.sort(rates, axis=1)[:, ::-1])


def _log_growth(stack: Stack, x: np.ndarray, k: int, backend: str) -> np.ndarray:
    """Unsorted sums over layers of log|R_ii|, (B, k) float64, on "cpu" or "numpy" (validated inputs)."""
    if backend == "numpy":
        return _reference_spectra.lyapunov_log_growth(stack.weights, stack.biases, x, k, *_options(stack))
    from vgcore import _cpu, _spectra

    batch = x.shape[0]
    blocks = min(_cpu.n_partitions(), batch)
    log_growth = np.empty((batch, k))
    status = np.zeros(blocks, np.intc)
    with _cpu._blas_held_to_one_thread():
        _spectra.lyapunov_log_growth(stack.weights, stack.biases, x, *_cpu._layer_options(stack),
                                     log_growth, status, blocks, min(_cpu.n_threads(), blocks))
    if status.any():
        if (status == -1000).any():
            raise MemoryError("lyapunov_exponents: could not allocate a thread's workspace")
        raise RuntimeError(f"lyapunov_exponents: LAPACK reported info {status[status != 0][0]}")
    return log_growth
