"""Small pieces every backend module of one kind or another needs: written once here.

- :func:`into`, :func:`per_sample`: the NumPy reference backends' handling of ``out`` and of
  vectors shared by every sample;
- :func:`batched_singular_values`: the compiled backends' SVD of per-sample Jacobians, spread
  over the kernels' threads.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from vgcore.backends._threads import blas_held_to_one_thread, n_threads


def into(out: np.ndarray | None, result: np.ndarray) -> np.ndarray:
    """``result``, written into ``out`` when the caller gave one."""
    if out is None:
        return result
    out[...] = result
    return out


def per_sample(problem, vectors: np.ndarray) -> np.ndarray:
    """Vectors (B, k, n) as they are, or (k, n) shared by every sample broadcast to (B, k, n)."""
    return np.broadcast_to(vectors, (problem.batch, *vectors.shape[-2:]))


def batched_singular_values(jacobians: np.ndarray) -> np.ndarray:
    """Singular values of each (n, n) matrix of ``jacobians`` (B, n, n), (B, n) descending.

    Samples are spread over the kernels' threads in contiguous chunks; each
    matrix is factored by one single-threaded LAPACK call whatever the
    chunking (NumPy releases the GIL there), so the result is bitwise the same
    for any number of threads.
    """
    batch, width = jacobians.shape[0], jacobians.shape[-1]
    out = np.empty((batch, width), jacobians.dtype)
    chunks = max(1, min(n_threads(), batch))
    bounds = [(c * batch // chunks, (c + 1) * batch // chunks) for c in range(chunks)]

    def run(bound):
        start, stop = bound
        out[start:stop] = np.linalg.svd(jacobians[start:stop], compute_uv=False)

    with blas_held_to_one_thread():
        if chunks == 1:
            run(bounds[0])
        else:
            with ThreadPoolExecutor(chunks) as pool:
                list(pool.map(run, bounds))
    return out
