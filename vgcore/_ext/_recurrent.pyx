# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Compiled CPU kernels of recurrent models: forward, gradients through time, Jacobian products, spectra.

The cell's math (gates, their derivatives, the step's VJP and JVP per hidden
unit) is csrc/vg_gates.h, shared with the GPU; this module runs it over
blocks of samples with the two matrix products of a step through BLAS
(scipy.linalg.cython_blas, row-major blocks handed over as their
column-major transposes):

    pre_h (rows, G n) = h (rows, n) @ W_hh.T      gemm('T', 'N') on (W_hh, h)
    pre_x (rows, G n) = u (rows, m) @ W_ih.T      gemm('T', 'N') on (W_ih, u)
    g_h  (rows, n)   += g_hh (rows, G n) @ W_hh   gemm('N', 'N') on (W_hh, g_hh)

Conventions (vgcore.backends.cpu_recurrent guarantees them; nothing here
checks or raises): C-contiguous arrays of one floating dtype except the
float64 logs; parameters in torch's layout, weight_hh (G n, n), weight_ih
(G n, m), biases (G n,); states (B, N) with N = n or 2 n (lstm [h | c]);
inputs (B, T_total, m) when has_inputs (else any placeholder), step t of a
call reading inputs[:, input_offset + t]; per-step caches (B, C) with
C = 2 G n + E, laid out as in vg_gates.h.

Parallelism: the batch is cut into contiguous blocks of samples chosen by
the caller from the machine (never the thread count); each block runs
through every step on its own, so there is no synchronisation per step, and
results are bitwise the same for any number of threads.  The caller holds
BLAS to one thread meanwhile.  Weight-gradient norms, which sum over
samples, run afterwards in parallel over steps.
"""

from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.math cimport INFINITY, exp, fabs, log
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from scipy.linalg.cython_blas cimport dsyrk, dtrsm
from scipy.linalg.cython_lapack cimport dpotrf

from vgcore._ext._layers cimport (
    _block_start,
    _form_q,
    _gemm,
    _gram_upper,
    _householder_qr,
    _log_norm_of_outer_sum,
    _qr_workspace,
    _renormalise_rows,
)


cdef extern from "vg_gates.h" nogil:
    int vg_cell_gates(int cell)
    int vg_cell_extra(int cell)
    void vg_cell_forward_block_d(int cell, int activation, long rows, long n, const double *pre_h,
                                 const double *bias_hh, const double *pre_x, const double *bias_ih,
                                 const double *state_prev, double *state_out, double *cache)
    void vg_cell_forward_block_f(int cell, int activation, long rows, long n, const float *pre_h,
                                 const float *bias_hh, const float *pre_x, const float *bias_ih,
                                 const float *state_prev, float *state_out, float *cache)
    void vg_cell_backward_block_d(int cell, long rows, long n, long per_sample, const double *g,
                                  const double *cache, const double *state_prev, double *g_hh,
                                  long g_hh_stride, double *g_prev)
    void vg_cell_backward_block_f(int cell, long rows, long n, long per_sample, const float *g,
                                  const float *cache, const float *state_prev, float *g_hh,
                                  long g_hh_stride, float *g_prev)
    void vg_cell_jvp_block_d(int cell, long rows, long n, long per_sample, const double *t_a,
                             const double *t_prev, const double *cache, const double *state_prev,
                             double *t_out)
    void vg_cell_jvp_block_f(int cell, long rows, long n, long per_sample, const float *t_a,
                             const float *t_prev, const float *cache, const float *state_prev,
                             float *t_out)
    void vg_cell_count_saturated_d(int cell, long rows, long n, const double *cache,
                                   long long *saturated, unsigned char *alive)
    void vg_cell_count_saturated_f(int cell, long rows, long n, const float *cache,
                                   long long *saturated, unsigned char *alive)


cdef struct Cell:
    int cell            # VG_CELL_RNN / LSTM / GRU
    int activation      # the rnn's phi (vg_activations.h code)
    Py_ssize_t n        # hidden width
    Py_ssize_t m        # input width (0: no inputs)
    Py_ssize_t gn       # G n
    Py_ssize_t width    # state width N
    Py_ssize_t columns  # cache columns C


cdef Cell _cell(int cell, int activation, Py_ssize_t n, Py_ssize_t m) noexcept nogil:
    cdef Cell c
    c.cell = cell
    c.activation = activation
    c.n = n
    c.m = m
    c.gn = vg_cell_gates(cell) * n
    c.width = 2 * n if cell == 1 else n
    c.columns = 2 * c.gn + vg_cell_extra(cell) * n
    return c


def cache_columns(int cell, Py_ssize_t n):
    """Columns C of one sample's per-step cache: 2 G n + E (vg_gates.h)."""
    return _cell(cell, 0, n, 0).columns


# ---------------------------------------------------------------------------
# One step on a block of rows
# ---------------------------------------------------------------------------

cdef inline void _step_forward(Cell c, Py_ssize_t rows, const floating *w_hh, const floating *w_ih,
                               const floating *b_hh, const floating *b_ih, const floating *u,
                               Py_ssize_t u_stride, const floating *state_prev, floating *state_out,
                               floating *cache, floating *pre_h, floating *pre_x) noexcept nogil:
    """state_prev (rows, N) -> state_out (rows, N) and the step's cache (rows, C).

    u (rows, m) with row stride u_stride, or NULL without inputs; pre_h and
    pre_x are (rows, G n) scratch.
    """
    cdef const floating *x_part = NULL
    _gemm(c'T', c'N', <int> c.gn, <int> rows, <int> c.n, <floating> 1, w_hh, <int> c.n, state_prev,
          <int> c.width, <floating> 0, pre_h, <int> c.gn)
    if u != NULL and c.m > 0:
        _gemm(c'T', c'N', <int> c.gn, <int> rows, <int> c.m, <floating> 1, w_ih, <int> c.m, u,
              <int> u_stride, <floating> 0, pre_x, <int> c.gn)
        x_part = pre_x
    if floating is double:
        vg_cell_forward_block_d(c.cell, c.activation, rows, c.n, pre_h, b_hh, x_part, b_ih, state_prev,
                                state_out, cache)
    else:
        vg_cell_forward_block_f(c.cell, c.activation, rows, c.n, pre_h, b_hh, x_part, b_ih, state_prev,
                                state_out, cache)


cdef inline void _step_backward(Cell c, Py_ssize_t rows, Py_ssize_t per_sample, const floating *w_hh,
                                const floating *cache, const floating *state_prev, floating *g,
                                floating *g_hh, Py_ssize_t g_hh_stride) noexcept nogil:
    """In place: cotangents g (rows, N) at s_t -> at s_{t-1}; g_hh (rows, G n; row stride given) the
    cotangents at W_hh h + b_hh.  Row r belongs to sample r // per_sample of the cache."""
    if floating is double:
        vg_cell_backward_block_d(c.cell, rows, c.n, per_sample, g, cache, state_prev, g_hh, g_hh_stride, g)
    else:
        vg_cell_backward_block_f(c.cell, rows, c.n, per_sample, g, cache, state_prev, g_hh, g_hh_stride, g)
    _gemm(c'N', c'N', <int> c.n, <int> rows, <int> c.gn, <floating> 1, w_hh, <int> c.n, g_hh,
          <int> g_hh_stride, <floating> 1, g, <int> c.width)


cdef inline void _step_jvp(Cell c, Py_ssize_t rows, Py_ssize_t per_sample, const floating *w_hh,
                           const floating *cache, const floating *state_prev, floating *t,
                           floating *t_a) noexcept nogil:
    """In place: tangents t (rows, N) at s_{t-1} -> at s_t; t_a (rows, G n) scratch."""
    _gemm(c'T', c'N', <int> c.gn, <int> rows, <int> c.n, <floating> 1, w_hh, <int> c.n, t, <int> c.width,
          <floating> 0, t_a, <int> c.gn)
    if floating is double:
        vg_cell_jvp_block_d(c.cell, rows, c.n, per_sample, t_a, t, cache, state_prev, t)
    else:
        vg_cell_jvp_block_f(c.cell, rows, c.n, per_sample, t_a, t, cache, state_prev, t)


cdef inline void _forward_block(Cell c, Py_ssize_t rows, const floating *pre_h, const floating *b_hh,
                                const floating *pre_x, const floating *b_ih, const floating *state_prev,
                                floating *state_out, floating *cache) noexcept nogil:
    """The cell's elementwise forward over rows whose products pre_h (and pre_x, or NULL) are done."""
    if floating is double:
        vg_cell_forward_block_d(c.cell, c.activation, rows, c.n, pre_h, b_hh, pre_x, b_ih, state_prev,
                                state_out, cache)
    else:
        vg_cell_forward_block_f(c.cell, c.activation, rows, c.n, pre_h, b_hh, pre_x, b_ih, state_prev,
                                state_out, cache)


cdef inline void _jvp_block(Cell c, Py_ssize_t rows, Py_ssize_t per_sample, const floating *t_a,
                            const floating *cache, const floating *state_prev, floating *t) noexcept nogil:
    """In place, the cell's elementwise JVP of tangents t whose product t_a = t_h W_hh^T is done."""
    if floating is double:
        vg_cell_jvp_block_d(c.cell, rows, c.n, per_sample, t_a, t, cache, state_prev, t)
    else:
        vg_cell_jvp_block_f(c.cell, rows, c.n, per_sample, t_a, t, cache, state_prev, t)


cdef inline void _count_saturated(Cell c, Py_ssize_t rows, const floating *cache, long long *saturated,
                                  unsigned char *alive) noexcept nogil:
    if floating is double:
        vg_cell_count_saturated_d(c.cell, rows, c.n, cache, saturated, alive)
    else:
        vg_cell_count_saturated_f(c.cell, rows, c.n, cache, saturated, alive)


cdef inline const floating *_inputs_at(const floating[:, :, ::1] inputs, bint has_inputs,
                                       Py_ssize_t sample, Py_ssize_t step) noexcept nogil:
    if not has_inputs:
        return NULL
    return &inputs[sample, step, 0]


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------

def forward(int cell, int activation, const floating[:, ::1] weight_hh, const floating[:, ::1] weight_ih,
            const floating[::1] bias_hh, const floating[::1] bias_ih, const floating[:, ::1] x,
            const floating[:, :, ::1] inputs, bint has_inputs, Py_ssize_t steps, floating[:, ::1] out,
            int[::1] status, Py_ssize_t n_blocks, int n_threads):
    """s_T (B, N) into out from s_0 = x, in n_blocks blocks of samples; status[block] -1000: no memory."""
    cdef Py_ssize_t batch = x.shape[0], block, start, rows, t
    cdef Py_ssize_t max_rows = (batch + n_blocks - 1) // n_blocks
    cdef Cell c = _cell(cell, activation, weight_hh.shape[1], weight_ih.shape[1])
    cdef Py_ssize_t u_stride = inputs.shape[1] * inputs.shape[2]
    cdef floating *buffer = NULL
    cdef floating *current
    cdef floating *following
    cdef floating *swap
    with nogil, parallel(num_threads=max(1, min(<Py_ssize_t> n_threads, n_blocks))):
        # current | following | cache | pre_h | pre_x
        buffer = <floating *> malloc(max_rows * (2 * c.width + c.columns + 2 * c.gn) * sizeof(floating))
        for block in prange(n_blocks, schedule='static'):
            start = _block_start(block, n_blocks, batch)
            rows = _block_start(block + 1, n_blocks, batch) - start
            if buffer == NULL:
                status[block] = -1000
                continue
            current = buffer
            following = buffer + max_rows * c.width
            memcpy(current, &x[start, 0], rows * c.width * sizeof(floating))
            for t in range(steps):
                _step_forward(c, rows, &weight_hh[0, 0], &weight_ih[0, 0], &bias_hh[0], &bias_ih[0],
                              _inputs_at(inputs, has_inputs, start, t), u_stride, current, following,
                              buffer + 2 * max_rows * c.width,
                              buffer + max_rows * (2 * c.width + c.columns),
                              buffer + max_rows * (2 * c.width + c.columns + c.gn))
                swap = current
                current = following
                following = swap
            memcpy(&out[start, 0], current, rows * c.width * sizeof(floating))
        free(buffer)


# ---------------------------------------------------------------------------
# Gradient profile through time
# ---------------------------------------------------------------------------

def weight_gradient_scratch(Py_ssize_t batch, Py_ssize_t gn, Py_ssize_t n):
    """Values of scratch one _weight_gradient_norm call needs."""
    return _weight_gradient_scratch(batch, gn, n)


cdef inline Py_ssize_t _weight_gradient_scratch(Py_ssize_t batch, Py_ssize_t gn,
                                                Py_ssize_t n) noexcept nogil:
    return batch * (gn + n) + (2 * batch * batch if batch < n else gn * n)


cdef double _weight_gradient_norm(Py_ssize_t batch, Py_ssize_t gn, Py_ssize_t n,
                                  const floating *g_hh, Py_ssize_t g_stride, const floating *h,
                                  Py_ssize_t h_stride, const double *log_scale,
                                  floating *scratch) noexcept nogil:
    """log ||sum_b exp(s_b) g_b h_b^T||_F of one step: g_b (G n) the unit-scaled cotangents at
    W_hh h + b_hh (rows g_stride apart) with log scales s_b, h_b (n) the step's input hidden state.

    Samples are weighted by exp(s_b - max s), so the sum is exact whatever the
    spread of scales; the norm of the weighted sum comes from
    _layers._log_norm_of_outer_sum (H scaled so its squares cannot underflow;
    Gram matrices when B < n).
    """
    cdef Py_ssize_t b, i
    cdef floating *g = scratch
    cdef floating *u = scratch + batch * gn
    cdef double top = log_scale[0], weight
    for b in range(batch):
        if log_scale[b] > top:
            top = log_scale[b]
    for b in range(batch):
        weight = exp(log_scale[b] - top)
        for i in range(gn):
            g[b * gn + i] = <floating> (weight * g_hh[b * g_stride + i])
        memcpy(u + b * n, h + b * h_stride, n * sizeof(floating))
    return top + _log_norm_of_outer_sum(batch, gn, n, g, u, u + batch * n)


cdef void _forward_steps(Cell c, Py_ssize_t count, Py_ssize_t first, Py_ssize_t batch, Py_ssize_t start,
                         Py_ssize_t rows, const floating *w_hh, const floating *w_ih,
                         const floating *b_hh, const floating *b_ih, const floating[:, :, ::1] inputs,
                         bint has_inputs, floating *states, floating *caches, long long *saturated,
                         unsigned char *alive, floating *scratch) noexcept nogil:
    """Rows [start, start + rows) through steps first .. first + count - 1 (0-based), keeping all.

    states holds count + 1 planes (B, N) whose first already holds the rows'
    state; caches count planes (B, C).  saturated (count,) and alive
    (count, G n) accumulate the block's counts unless NULL.  scratch: 2 rows G n.
    """
    cdef Py_ssize_t t, plane = batch * c.width, cache_plane = batch * c.columns
    cdef Py_ssize_t u_stride = inputs.shape[1] * inputs.shape[2]
    for t in range(count):
        _step_forward(c, rows, w_hh, w_ih, b_hh, b_ih, _inputs_at(inputs, has_inputs, start, first + t),
                      u_stride, states + t * plane + start * c.width,
                      states + (t + 1) * plane + start * c.width,
                      caches + t * cache_plane + start * c.columns, scratch, scratch + rows * c.gn)
        if saturated != NULL:
            _count_saturated(c, rows, caches + t * cache_plane + start * c.columns, saturated + t,
                             alive + t * c.gn)


def gradient_profile(int cell, int activation, const floating[:, ::1] weight_hh,
                     const floating[:, ::1] weight_ih, const floating[::1] bias_hh,
                     const floating[::1] bias_ih, const floating[:, ::1] x,
                     const floating[:, :, ::1] inputs, bint has_inputs,
                     const floating[:, ::1] grad_output, Py_ssize_t steps, Py_ssize_t segment,
                     floating[:, :, ::1] checkpoints, floating[:, :, ::1] states,
                     floating[:, :, ::1] caches, double[:, ::1] log_scale_hh, floating[:, ::1] g,
                     double[::1] log_scale, double[:, ::1] log_grad_norm,
                     double[::1] log_weight_grad_norm, long long[:, ::1] saturated,
                     unsigned char[:, :, ::1] alive, int[::1] status, int n_threads):
    """Forward, renormalised backward through time and per-step weight-gradient norms.

    segment S (1 <= S <= T): with S = T every step's state and cache is
    kept, states (T+1, B, N) and caches (T, B, C); with S < T the forward
    pass keeps only the states at steps 0, S, 2S, ... in checkpoints
    (ceil(T/S), B, N) and the backward pass recomputes each segment's states
    and caches into segment-sized states (S+1, B, N) and caches (S, B, C),
    one extra forward pass for memory (T/S + S) B N + S B C instead of
    T B (N + C).  The same operations in the same order either way, so the
    results are bitwise equal.  The caches' derivative sections are
    overwritten by the unit-scaled cotangents at W_hh h + b_hh, whose log
    scales go to log_scale_hh (S, B).  g (B, N) and log_scale (B,) carry the
    cotangent between segments.  Outputs: log_grad_norm (B, T+1),
    log_weight_grad_norm (T,), and per block of samples (saturated.shape[0]
    blocks) saturated (blocks, T) counts and alive (blocks, T, G n) flags
    (zeroed by the caller).  status[block] -1000: a workspace could not be had.
    """
    cdef Cell c = _cell(cell, activation, weight_hh.shape[1], weight_ih.shape[1])
    cdef Py_ssize_t batch = x.shape[0], n_blocks = saturated.shape[0]
    cdef Py_ssize_t n_segments = (steps + segment - 1) // segment
    cdef Py_ssize_t block, start, rows, seg, first, count, t, step, scratch_size
    cdef Py_ssize_t max_rows = (batch + n_blocks - 1) // n_blocks
    cdef bint kept = n_segments == 1
    cdef floating *buffer = NULL
    cdef floating *cache_t
    cdef int threads = max(1, min(n_threads, n_blocks))
    cdef const floating *w_hh = &weight_hh[0, 0]
    cdef const floating *w_ih = &weight_ih[0, 0]
    cdef const floating *b_hh = &bias_hh[0]
    cdef const floating *b_ih = &bias_ih[0]

    with nogil, parallel(num_threads=threads):
        buffer = <floating *> malloc(2 * max_rows * c.gn * sizeof(floating))
        for block in prange(n_blocks, schedule='static'):
            start = _block_start(block, n_blocks, batch)
            rows = _block_start(block + 1, n_blocks, batch) - start
            if buffer == NULL:
                status[block] = -1000
                continue
            memcpy(&states[0, start, 0], &x[start, 0], rows * c.width * sizeof(floating))
            for seg in range(n_segments):
                first = seg * segment
                count = min(segment, steps - first)
                if not kept:
                    memcpy(&checkpoints[seg, start, 0], &states[0, start, 0],
                           rows * c.width * sizeof(floating))
                _forward_steps(c, count, first, batch, start, rows, w_hh, w_ih, b_hh, b_ih, inputs,
                               has_inputs, &states[0, 0, 0], &caches[0, 0, 0], &saturated[block, first],
                               &alive[block, first, 0], buffer)
                if not kept:
                    memcpy(&states[0, start, 0], &states[count, start, 0],
                           rows * c.width * sizeof(floating))
            memcpy(&g[start, 0], &grad_output[start, 0], rows * c.width * sizeof(floating))
            memset(&log_scale[start], 0, rows * sizeof(double))
            _renormalise_rows(rows, c.width, &g[start, 0], &log_scale[start], &log_grad_norm[start, steps],
                              steps + 1)
        free(buffer)
    for block in range(n_blocks):
        if status[block] != 0:
            return

    # One parallel region for the whole backward pass (a region per segment costs a fork and join
    # each, milliseconds on a busy machine): per segment, the blocks' backward steps, then (after
    # the loop's barrier) the weight-gradient norms of the segment's steps, which sum over samples.
    scratch_size = max(2 * max_rows * c.gn, _weight_gradient_scratch(batch, c.gn, c.n))
    with nogil, parallel(num_threads=max(threads, min(n_threads, segment))):
        buffer = <floating *> malloc(scratch_size * sizeof(floating))
        for seg in range(n_segments - 1, -1, -1):
            first = seg * segment
            count = min(segment, steps - first)
            for block in prange(n_blocks, schedule='static'):
                start = _block_start(block, n_blocks, batch)
                rows = _block_start(block + 1, n_blocks, batch) - start
                if buffer == NULL:
                    status[block] = -1000
                    continue
                if not kept:
                    memcpy(&states[0, start, 0], &checkpoints[seg, start, 0],
                           rows * c.width * sizeof(floating))
                    _forward_steps(c, count, first, batch, start, rows, w_hh, w_ih, b_hh, b_ih, inputs,
                                   has_inputs, &states[0, 0, 0], &caches[0, 0, 0], <long long *> NULL,
                                   <unsigned char *> NULL, buffer)
                for t in range(count - 1, -1, -1):
                    memcpy(&log_scale_hh[t, start], &log_scale[start], rows * sizeof(double))
                    cache_t = &caches[t, start, 0]
                    # the cotangents at W_hh h + b_hh overwrite the derivatives, read first unit by unit
                    _step_backward(c, rows, 1, w_hh, cache_t, &states[t, start, 0], &g[start, 0],
                                   cache_t + c.gn, c.columns)
                    _renormalise_rows(rows, c.width, &g[start, 0], &log_scale[start],
                                      &log_grad_norm[start, first + t], steps + 1)
            for step in prange(count, schedule='dynamic'):
                if buffer == NULL:
                    log_weight_grad_norm[first + step] = INFINITY - INFINITY  # NaN: reported by the caller
                    continue
                log_weight_grad_norm[first + step] = _weight_gradient_norm(
                    batch, c.gn, c.n, &caches[step, 0, c.gn], c.columns, &states[step, 0, 0], c.width,
                    &log_scale_hh[step, 0], buffer)
        free(buffer)


# ---------------------------------------------------------------------------
# Jacobian products
# ---------------------------------------------------------------------------

cdef struct WorkItem:
    Py_ssize_t sample_start, sample_stop, vector_start, vector_stop


cdef inline WorkItem _work_item(Py_ssize_t item, Py_ssize_t batch, Py_ssize_t k,
                                Py_ssize_t n_items) noexcept nogil:
    """Work item -> (samples, vectors), as vgcore._ext._kernels cuts a JVP / VJP."""
    cdef WorkItem w
    cdef Py_ssize_t per_sample
    if batch >= n_items:
        w.sample_start = _block_start(item, n_items, batch)
        w.sample_stop = _block_start(item + 1, n_items, batch)
        w.vector_start = 0
        w.vector_stop = k
    else:
        per_sample = n_items // batch
        w.sample_start = item // per_sample
        w.sample_stop = w.sample_start + 1
        w.vector_start = _block_start(item % per_sample, per_sample, k)
        w.vector_stop = _block_start(item % per_sample + 1, per_sample, k)
    return w


def jvp(int cell, int activation, const floating[:, ::1] weight_hh, const floating[:, ::1] weight_ih,
        const floating[::1] bias_hh, const floating[::1] bias_ih, const floating[:, ::1] x,
        const floating[:, :, ::1] inputs, bint has_inputs, Py_ssize_t steps,
        floating[:, :, ::1] tangents, int[::1] status, Py_ssize_t n_items, int n_threads):
    """In place: tangents (B, k, N) at s_0 -> (d s_T / d s_0) tangents at s_T."""
    cdef Cell c = _cell(cell, activation, weight_hh.shape[1], weight_ih.shape[1])
    cdef Py_ssize_t batch = x.shape[0], k = tangents.shape[1]
    cdef Py_ssize_t item, s0, s1, v0, v1, samples, rows, t
    cdef WorkItem work
    cdef Py_ssize_t max_samples = 1 if batch < n_items else (batch + n_items - 1) // n_items
    cdef Py_ssize_t max_rows = max_samples * k
    cdef Py_ssize_t u_stride = inputs.shape[1] * inputs.shape[2]
    cdef floating *buffer = NULL
    cdef floating *current
    cdef floating *following
    cdef floating *swap
    cdef floating *cache
    cdef floating *scratch
    # current | following | cache | pre_h, pre_x (samples, G n) | t_a (rows, G n)
    cdef Py_ssize_t size = max_samples * (2 * c.width + c.columns + 2 * c.gn) + max_rows * c.gn
    with nogil, parallel(num_threads=max(1, min(<Py_ssize_t> n_threads, n_items))):
        buffer = <floating *> malloc(size * sizeof(floating))
        for item in prange(n_items, schedule='static'):
            if buffer == NULL:
                status[item] = -1000
                continue
            work = _work_item(item, batch, k, n_items)
            s0 = work.sample_start
            s1 = work.sample_stop
            v0 = work.vector_start
            v1 = work.vector_stop
            samples = s1 - s0
            rows = samples * (v1 - v0)
            current = buffer
            following = current + max_samples * c.width
            cache = following + max_samples * c.width
            scratch = cache + max_samples * c.columns
            memcpy(current, &x[s0, 0], samples * c.width * sizeof(floating))
            for t in range(steps):
                _step_forward(c, samples, &weight_hh[0, 0], &weight_ih[0, 0], &bias_hh[0], &bias_ih[0],
                              _inputs_at(inputs, has_inputs, s0, t), u_stride, current, following,
                              cache, scratch, scratch + max_samples * c.gn)
                _step_jvp(c, rows, v1 - v0, &weight_hh[0, 0], cache, current, &tangents[s0, v0, 0],
                          scratch + 2 * max_samples * c.gn)
                swap = current
                current = following
                following = swap
        free(buffer)


def vjp(int cell, int activation, const floating[:, ::1] weight_hh, const floating[:, ::1] weight_ih,
        const floating[::1] bias_hh, const floating[::1] bias_ih, const floating[:, ::1] x,
        const floating[:, :, ::1] inputs, bint has_inputs, Py_ssize_t steps,
        floating[:, :, ::1] cotangents, int[::1] status, Py_ssize_t n_items, int n_threads):
    """In place: cotangents (B, k, N) at s_T -> (d s_T / d s_0)^T cotangents at s_0.

    Each work item keeps its samples' states and caches of every step,
    T (N + C) values per sample.
    """
    cdef Cell c = _cell(cell, activation, weight_hh.shape[1], weight_ih.shape[1])
    cdef Py_ssize_t batch = x.shape[0], k = cotangents.shape[1]
    cdef Py_ssize_t item, s0, s1, v0, v1, samples, rows, t
    cdef WorkItem work
    cdef Py_ssize_t max_samples = 1 if batch < n_items else (batch + n_items - 1) // n_items
    cdef Py_ssize_t max_rows = max_samples * k
    cdef Py_ssize_t plane = max_samples * c.width, cache_plane = max_samples * c.columns
    cdef Py_ssize_t u_stride = inputs.shape[1] * inputs.shape[2]
    cdef floating *buffer = NULL
    cdef floating *states
    cdef floating *caches
    cdef floating *scratch
    # states (T+1) | caches (T) | pre_h, pre_x (samples, G n) | g_hh (rows, G n)
    cdef Py_ssize_t size = (steps + 1) * plane + steps * cache_plane + 2 * max_samples * c.gn \
        + max_rows * c.gn
    with nogil, parallel(num_threads=max(1, min(<Py_ssize_t> n_threads, n_items))):
        buffer = <floating *> malloc(size * sizeof(floating))
        for item in prange(n_items, schedule='static'):
            if buffer == NULL:
                status[item] = -1000
                continue
            work = _work_item(item, batch, k, n_items)
            s0 = work.sample_start
            s1 = work.sample_stop
            v0 = work.vector_start
            v1 = work.vector_stop
            samples = s1 - s0
            rows = samples * (v1 - v0)
            states = buffer
            caches = states + (steps + 1) * plane
            scratch = caches + steps * cache_plane
            memcpy(states, &x[s0, 0], samples * c.width * sizeof(floating))
            for t in range(steps):
                _step_forward(c, samples, &weight_hh[0, 0], &weight_ih[0, 0], &bias_hh[0], &bias_ih[0],
                              _inputs_at(inputs, has_inputs, s0, t), u_stride, states + t * plane,
                              states + (t + 1) * plane, caches + t * cache_plane, scratch,
                              scratch + max_samples * c.gn)
            for t in range(steps - 1, -1, -1):
                _step_backward(c, rows, v1 - v0, &weight_hh[0, 0], caches + t * cache_plane,
                               states + t * plane, &cotangents[s0, v0, 0],
                               scratch + 2 * max_samples * c.gn, c.gn)
        free(buffer)


# ---------------------------------------------------------------------------
# Lyapunov log growth
# ---------------------------------------------------------------------------

#: CholeskyQR2 is used where the first pass's diagonal spread max R_ii / min R_ii stays below this
#: (a lower bound of the condition number; above, Householder), and kept only when the second
#: pass's R is within this of the identity (else the step is redone by Householder).
cdef double CHOLESKY_SPREAD = 1e3
cdef double CHOLESKY_SECOND_PASS = 1e-8


cdef inline int _cholesky_pass(int n, int k, double *a, double *gram) noexcept nogil:
    """a (n, k) column-major <- a R^{-1} with R^T R = a^T a (Cholesky); R's upper triangle in gram.

    Returns LAPACK's info (> 0: a^T a is not numerically positive definite).
    """
    cdef char upper = c'U', trans = c'T', right = c'R', no = c'N'
    cdef double one = 1, zero = 0
    cdef int info = 0
    dsyrk(&upper, &trans, &k, &n, &one, a, &n, &zero, gram, &k)
    dpotrf(&upper, &k, gram, &k, &info)
    if info != 0:
        return info
    dtrsm(&right, &upper, &no, &no, &n, &k, &one, gram, &k, a, &n)
    return 0


cdef int _cholesky_qr2(int n, int k, double *a, double *saved, double *gram, double *log_r,
                       ) noexcept nogil:
    """Q of a (n, k) column-major in place by CholeskyQR2 and log|R_ii| into log_r; 1 where it
    declines (a restored from ``saved`` for Householder), else 0.

    Two Cholesky passes: R = R2 R1, so log R_ii = log R1_ii + log R2_ii.  Level-3 BLAS (syrk,
    trsm) where Householder QR of a thin matrix is level 2; used only where the matrix is well
    conditioned (CHOLESKY_SPREAD), which a Lyapunov step's leading directions are.
    """
    cdef Py_ssize_t i
    cdef double largest = 0, smallest = INFINITY, value
    memcpy(saved, a, n * k * sizeof(double))
    if _cholesky_pass(n, k, a, gram) != 0:
        memcpy(a, saved, n * k * sizeof(double))
        return 1
    for i in range(k):
        value = gram[i * k + i]
        log_r[i] = log(value)
        largest = value if value > largest else largest
        smallest = value if value < smallest else smallest
    if not smallest * CHOLESKY_SPREAD > largest:
        memcpy(a, saved, n * k * sizeof(double))
        return 1
    if _cholesky_pass(n, k, a, gram) != 0:
        memcpy(a, saved, n * k * sizeof(double))
        return 1
    for i in range(k):
        value = gram[i * k + i]
        if fabs(value - 1.0) > CHOLESKY_SECOND_PASS:
            memcpy(a, saved, n * k * sizeof(double))
            return 1
        log_r[i] = log_r[i] + log(value)
    return 0


def lyapunov_log_growth(int cell, int activation, const floating[:, ::1] weight_hh,
                        const floating[:, ::1] weight_ih, const floating[::1] bias_hh,
                        const floating[::1] bias_ih, const floating[:, ::1] x,
                        const floating[:, :, ::1] inputs, bint has_inputs, Py_ssize_t steps,
                        Py_ssize_t warmup, double[:, ::1] log_growth, int[::1] status,
                        Py_ssize_t n_blocks, int n_threads):
    """log_growth (B, k) <- sum over the counted steps of log|R_ii| of the renormalised tangents.

    The k = log_growth.shape[1] tangents of each sample start as e_1..e_k and
    are mapped by every one of the warmup + T steps (inputs[:, t] at step t),
    then replaced by the Q of their Householder QR; log|R_ii| is added from
    step ``warmup`` on.  A sample's k tangents are a row-major (k, N) block,
    i.e. the column-major (N, k) matrix LAPACK factors in place.
    status[block]: LAPACK's info, or -1000 when a workspace could not be had.
    """
    cdef Cell c = _cell(cell, activation, weight_hh.shape[1], weight_ih.shape[1])
    cdef Py_ssize_t batch = x.shape[0], k = log_growth.shape[1]
    cdef Py_ssize_t block, start, samples, t, s, i
    cdef Py_ssize_t max_samples = (batch + n_blocks - 1) // n_blocks
    cdef Py_ssize_t tangent_plane = max_samples * k * c.width
    cdef Py_ssize_t u_stride = inputs.shape[1] * inputs.shape[2]
    cdef floating probe = 0
    cdef int lwork = _qr_workspace(probe, <int> c.width, <int> k)
    cdef int info
    cdef floating *buffer = NULL
    cdef floating *current
    cdef floating *following
    cdef floating *cache
    cdef floating *scratch
    cdef floating *tangents
    cdef floating *tau
    cdef floating *lapack_work
    cdef floating *tangent_block
    cdef floating *saved
    cdef floating *gram
    cdef double *log_r = NULL
    cdef int declined
    # current | following | cache | pre_h, pre_x | tangents | t_a (k rows per sample) | tau | LAPACK
    # | saved tangents (N k) | Gram (k k)
    cdef Py_ssize_t rows
    cdef floating *products
    cdef const floating *x_part
    # current and tangents (contiguous: one product W_hh [h | t] per step serves the state and
    # every tangent, streaming W_hh once) | following | cache | products (rows, G n) | pre_x
    # | tau | LAPACK | saved tangents (N k) | Gram (k k)
    cdef Py_ssize_t size = (max_samples * c.width + tangent_plane + max_samples * (c.width + c.columns)
                            + (max_samples + max_samples * k) * c.gn + max_samples * c.gn + k + lwork
                            + c.width * k + k * k)
    with nogil, parallel(num_threads=max(1, min(<Py_ssize_t> n_threads, n_blocks))):
        buffer = <floating *> malloc(size * sizeof(floating))
        log_r = <double *> malloc(k * sizeof(double))
        for block in prange(n_blocks, schedule='static'):
            start = _block_start(block, n_blocks, batch)
            samples = _block_start(block + 1, n_blocks, batch) - start
            if buffer == NULL or log_r == NULL:
                status[block] = -1000
                continue
            rows = samples * (1 + k)
            current = buffer
            tangents = current + samples * c.width
            following = buffer + max_samples * c.width + tangent_plane
            cache = following + max_samples * c.width
            products = cache + max_samples * c.columns
            scratch = products + (max_samples + max_samples * k) * c.gn  # pre_x
            tau = scratch + max_samples * c.gn
            lapack_work = tau + k
            saved = lapack_work + lwork
            gram = saved + c.width * k
            memcpy(current, &x[start, 0], samples * c.width * sizeof(floating))
            memset(tangents, 0, samples * k * c.width * sizeof(floating))
            for s in range(samples):
                for i in range(k):
                    tangents[(s * k + i) * c.width + i] = 1
            memset(&log_growth[start, 0], 0, samples * k * sizeof(double))
            info = 0
            for t in range(warmup + steps):
                _gemm(c'T', c'N', <int> c.gn, <int> rows, <int> c.n, <floating> 1, &weight_hh[0, 0],
                      <int> c.n, current, <int> c.width, <floating> 0, products, <int> c.gn)
                x_part = NULL
                if has_inputs and c.m > 0:
                    _gemm(c'T', c'N', <int> c.gn, <int> samples, <int> c.m, <floating> 1, &weight_ih[0, 0],
                          <int> c.m, _inputs_at(inputs, has_inputs, start, t), <int> u_stride,
                          <floating> 0, scratch, <int> c.gn)
                    x_part = scratch
                _forward_block(c, samples, products, &bias_hh[0], x_part, &bias_ih[0], current, following,
                               cache)
                _jvp_block(c, samples * k, k, products + samples * c.gn, cache, current, tangents)
                memcpy(current, following, samples * c.width * sizeof(floating))
                for s in range(samples):
                    tangent_block = tangents + s * k * c.width
                    declined = 1
                    if floating is double:
                        declined = _cholesky_qr2(<int> c.width, <int> k, tangent_block, saved, gram, log_r)
                    if not declined:
                        if t >= warmup:
                            for i in range(k):
                                log_growth[start + s, i] = log_growth[start + s, i] + log_r[i]
                        continue
                    info = _householder_qr(<int> c.width, <int> k, tangent_block, tau, lapack_work, lwork)
                    if info != 0:
                        break
                    if t >= warmup:
                        for i in range(k):
                            # an exactly zero diagonal (a direction mapped to 0) records -inf
                            if tangent_block[i * c.width + i] != 0:
                                log_growth[start + s, i] = log_growth[start + s, i] + log(
                                    fabs(<double> tangent_block[i * c.width + i]))
                            else:
                                log_growth[start + s, i] = -INFINITY
                    info = _form_q(<int> c.width, <int> k, tangent_block, tau, lapack_work, lwork)
                    if info != 0:
                        break
                if info != 0:
                    break
            status[block] = info
        free(buffer)
        free(log_r)
