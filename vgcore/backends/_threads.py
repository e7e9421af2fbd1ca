"""Threads of the compiled CPU backends: OpenMP for the kernels, BLAS held to one thread meanwhile.

Every ``cpu_<kind>`` module partitions its work with :func:`n_partitions` (fixed per
machine, so results are bitwise the same for any thread count) and runs its kernels
inside :func:`blas_held_to_one_thread` with :func:`n_threads` OpenMP threads.
"""

from __future__ import annotations

import functools

from vgcore._ext import _kernels


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


def blas_held_to_one_thread():
    """A context in which BLAS runs on one thread while the kernels run.

    With several OpenMP threads calling BLAS the two pools would
    oversubscribe the cores; with one, BLAS's own threads would make the
    rounding depend on the thread count.  The kernels parallelise themselves.
    """
    return _threadpool_controller().limit(limits=1, user_api="blas")
