"""Benchmark runner: the canonical jobs of docs/ARCHITECTURE.md on every backend and peer, in one run.

``vgcore bench`` (and ``python -m vgcore.bench``) runs each canonical job
(:mod:`vgcore.bench.jobs`) on

- ``cpu``   the compiled kernels (vgcore's "cpu" backend); for the sweep job
  the backend's ``gradient_profiles`` on all configs at once (the chunk
  runner ``vg.sweep`` uses); ``cpu seg=auto`` the same with
  ``segment="auto"`` (activations kept every few layers, recomputed);
- ``cuda``  the CuPy mirror, when CuPy imports and a GPU is present;
- ``vg.sweep`` on the sweep job: ``vgcore.sweep`` end to end;
- the peers of :mod:`vgcore.bench.peers`: ``numpy`` (vgcore's NumPy
  reference, the ratios' base), ``numpy loop`` (the sweep job as a plain
  NumPy loop over pre-drawn weights), ``torch`` and ``jax`` where they
  import, and ``gemm`` (the job's matrix products as plain ``np.matmul``:
  the machine's attainable rate for that work, measured in the same run).

A job whose vgcore feature is missing (a recurrent model, a batch-norm
stack), a backend that cannot run a job, and a peer that is absent or has no
version of a job are skipped with the reason in ``notes``, printed under the
table.  Timing (:mod:`vgcore.bench.timing`): one warm-up run each, then the
timed runs in ABBA order, as many as the budget (``--budget``) allows, at
least 2 (1 for a row whose warm-up alone took over twice the budget, such as
the plain reference on the long recurrent jobs); times are medians.  Ratios
(:mod:`vgcore.bench.report`) are speed-ups, ``time(base) / time(row)``.

JSON (``--json FILE``) holds one object with the keys

- ``schema`` (1; keys are only added within it), ``date`` (ISO 8601, UTC),
  ``quick`` (bool), ``machine`` (``cpu``, ``cores``, ``threads``,
  ``platform``, ``python``, ``numpy``, ``scipy``, ``torch``, ``jax``,
  ``cupy``, ``vgcore``, ``blas``, ``load_average``), ``load_average_after``
  (the machine's load averages before and after);
- ``jobs``: one object per job: ``job``, ``what``, ``depth``, ``width``,
  ``batch``, ``configs``, ``flops`` (nominal flops of its matrix products),
  ``other_load`` (CPU time other processes took during the job, a fraction
  of all cores; null where /proc/stat is absent), ``skipped`` (why the job
  did not run, or null);
- ``results``: one object per job and row: ``job``, ``backend`` (the row
  label), ``median_s``, ``times_s``, ``repeats``, ``gflops``, ``vs_numpy``,
  ``vs_torch``, ``gemm_fraction`` (null where the base did not run),
  ``max_abs_diff`` (largest difference of its result from the NumPy
  reference's over the ``compared`` fields, null where there are none),
  ``compared`` (those fields: ``log_grad_norm``, ``log_weight_grad_norm``,
  or ``value`` for a Jacobian or Lyapunov exponents), ``detail``;
- ``comparisons``: head-to-head ratios beside the table's columns (the
  sweep job: ``vg.sweep`` and ``cpu`` against ``numpy loop`` and ``jax``):
  ``job``, ``row``, ``base``, ``ratio`` = median(base) / median(row);
- ``memory``: one object per job and backend: ``job``, ``backend``,
  ``activations_bytes``, ``peak_traced_bytes``, ``traced_ratio``,
  ``peak_rss_bytes``, ``rss_ratio`` (null where not measurable);
- ``notes``: strings (skipped jobs, rows and peers, and why; a busy machine).
"""

from vgcore.bench.jobs import JOBS, QUICK_JOBS, Job, make_problem
from vgcore.bench.peers import jax_available, jax_status, torch_available, torch_status
from vgcore.bench.report import ROW_ORDER, SEGMENT_LABEL, format_report
from vgcore.bench.runner import BACKENDS, Options, build_parser, cuda_status, main, run, run_job

__all__ = [
    "BACKENDS",
    "JOBS",
    "QUICK_JOBS",
    "ROW_ORDER",
    "SEGMENT_LABEL",
    "Job",
    "Options",
    "build_parser",
    "cuda_status",
    "format_report",
    "jax_available",
    "jax_status",
    "main",
    "make_problem",
    "run",
    "run_job",
    "torch_available",
    "torch_status",
]
