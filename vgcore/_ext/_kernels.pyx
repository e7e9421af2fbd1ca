"""Compiled CPU kernels of vgcore: forward, backward and Jacobian products of deep stacks.

Conventions (the Python layer in vgcore._api guarantees them; nothing here
checks or raises):
- every array is C-contiguous and of one floating dtype (float32 or float64),
  except log-norm outputs, which are float64;
- weights are (L, n, n) in torch.nn.Linear's (out, in) layout, biases (L, n);
- ``norm`` is 0 (none), 1 (pre) or 2 (post); ``activation`` is a code of
  csrc/vg_activations.h; ``residual`` is used only when ``has_residual``.

Parallelism: the batch is cut into contiguous blocks of samples, and each
block runs through every layer on its own (a sample's forward and backward
passes never need another sample), so there is no synchronisation per layer;
OpenMP threads take blocks.  The callers choose the blocks from the problem
and the machine, never from the thread count, so results are bitwise the same
for any number of threads (BLAS may round a row differently for blocks of
different heights).  The callers hold BLAS to one thread meanwhile.
Reductions across samples (weight-gradient norms) run afterwards, in parallel
over layers, one layer per thread.

Row-major (B, n) blocks are handed to Fortran BLAS as their column-major
transposes (n, B), so ``H = U @ W.T`` is ``gemm('T', 'N')`` on (W, U) and
``G_u = G_h @ W`` is ``gemm('N', 'N')`` on (W, G_h).
"""

from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.math cimport INFINITY, exp, log, sqrt
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

from vgcore._ext._layers cimport (
    LAYER_NORM_EPS,
    NORM_BATCH,
    NORM_NONE,
    NORM_POST,
    VG_LEAKY_SLOPE,
    VG_N_ACTIVATIONS,
    VG_SELU_ALPHA,
    VG_SELU_SCALE,
    NORM_PRE,
    VG_SATURATION_THRESHOLD,
    _activation_block,
    _block_start,
    _forward_layer,
    _gemm,
    _gram_upper,
    _jvp_layer,
    _recompute_pre_norm,
    _vjp_layer,
)

import numpy as np


cdef extern from "vg_openmp.h" nogil:
    int vg_max_threads()
    int vg_num_procs()
    int vg_has_openmp()

def max_threads():
    """Threads an OpenMP region would use now (1 when built without OpenMP)."""
    return vg_max_threads()


def num_procs():
    """Processors OpenMP sees (1 when built without OpenMP)."""
    return vg_num_procs()


def has_openmp():
    """Whether the extension was compiled with OpenMP."""
    return bool(vg_has_openmp())


def compiled_constants():
    """The constants the kernels were compiled with (csrc headers), for tests against vgcore._activations."""
    return {
        "LEAKY_SLOPE": VG_LEAKY_SLOPE,
        "SELU_ALPHA": VG_SELU_ALPHA,
        "SELU_SCALE": VG_SELU_SCALE,
        "SATURATION_THRESHOLD": VG_SATURATION_THRESHOLD,
        "LAYER_NORM_EPS": LAYER_NORM_EPS,
        "NORM_CODES": {None: NORM_NONE, "pre": NORM_PRE, "post": NORM_POST, "batch": NORM_BATCH},
        "N_ACTIVATIONS": VG_N_ACTIVATIONS,
    }


def activation_values(int activation, floating[::1] h, floating[::1] value, floating[::1] derivative):
    """phi(h) into value and phi'(h) into derivative, straight from csrc/vg_activations.h (for tests)."""
    cdef Py_ssize_t n = h.shape[0]
    cdef floating zero = 0
    if n > 0:
        memcpy(&value[0], &h[0], n * sizeof(floating))
        _activation_block(activation, n, 1, &value[0], &zero, &derivative[0])


cdef inline void _renormalise_rows(Py_ssize_t rows, Py_ssize_t n, floating *g, double *log_scale,
                                   double *log_norm_out, Py_ssize_t out_stride) noexcept nogil:
    """Record log ||g_r|| + log_scale_r, then rescale g_r to unit norm and carry the factor.

    A zero row records -inf and stays zero.
    """
    cdef Py_ssize_t r, i
    cdef double total, norm_r
    cdef floating inv
    for r in range(rows):
        total = 0
        for i in range(n):
            total = total + <double> g[r * n + i] * g[r * n + i]
        norm_r = sqrt(total)
        if norm_r > 0:
            log_norm_out[r * out_stride] = log_scale[r] + log(norm_r)
            inv = <floating> (1.0 / norm_r)
            for i in range(n):
                g[r * n + i] = g[r * n + i] * inv
            log_scale[r] = log_scale[r] + log(norm_r)
        else:
            log_norm_out[r * out_stride] = -INFINITY


cdef inline void _count_derivatives(Py_ssize_t rows, Py_ssize_t n, const floating *derivative,
                                    long long *saturated, unsigned char *alive) noexcept nogil:
    """Adds the block's |phi'| < threshold count to saturated and flags units with phi' != 0.

    Branch-free, so the compiler vectorises it.
    """
    cdef Py_ssize_t r, i
    cdef floating d
    cdef floating threshold = <floating> VG_SATURATION_THRESHOLD
    cdef long long count = 0
    for r in range(rows):
        for i in range(n):
            d = derivative[r * n + i]
            count = count + ((d < threshold) & (d > -threshold))
            alive[i] = alive[i] | (d != 0)
    saturated[0] = saturated[0] + count


# ---------------------------------------------------------------------------
# Forward pass
# ---------------------------------------------------------------------------

def forward(const floating[:, :, ::1] weights, const floating[:, ::1] biases,
            const floating[:, ::1] x, int activation, bint has_residual, double residual, int norm,
            floating[:, ::1] out, Py_ssize_t n_blocks, int n_threads):
    """x_L of a stack for inputs x (B, n) into out (B, n), in n_blocks blocks of samples."""
    cdef Py_ssize_t depth = weights.shape[0], n = weights.shape[1], batch = x.shape[0]
    cdef Py_ssize_t block, start, stop, rows, layer, max_rows = (batch + n_blocks - 1) // n_blocks
    cdef floating *buffer = NULL
    cdef floating *ping
    cdef floating *pong
    cdef const floating *source
    cdef floating *target
    cdef floating res = <floating> residual
    with nogil, parallel(num_threads=max(1, min(<Py_ssize_t> n_threads, n_blocks))):
        # ping | pong | phi'(h) | LN(x) | mean, inv_pre, inv_post
        buffer = <floating *> malloc((4 * max_rows * n + 3 * max_rows) * sizeof(floating))
        for block in prange(n_blocks, schedule='static'):
            start = _block_start(block, n_blocks, batch)
            stop = _block_start(block + 1, n_blocks, batch)
            rows = stop - start
            ping = buffer
            pong = buffer + max_rows * n
            source = &x[start, 0]
            for layer in range(depth):
                target = &out[start, 0] if layer == depth - 1 else (ping if layer % 2 == 0 else pong)
                _forward_layer(rows, n, activation, has_residual, res, norm, &weights[layer, 0, 0],
                               &biases[layer, 0], source, target,
                               buffer + 2 * max_rows * n, buffer + 3 * max_rows * n,
                               buffer + 4 * max_rows * n, buffer + 4 * max_rows * n + max_rows,
                               buffer + 4 * max_rows * n + 2 * max_rows)
                source = target
        free(buffer)


# ---------------------------------------------------------------------------
# Gradient profile
# ---------------------------------------------------------------------------

cdef void _forward_layers(Py_ssize_t count, Py_ssize_t n, Py_ssize_t batch, Py_ssize_t start,
                          Py_ssize_t rows, int activation, bint has_residual, floating res, int norm,
                          const floating *weights, const floating *biases, floating *xs,
                          floating *derivatives, floating *mean_pre, floating *inv_pre,
                          floating *inv_post, long long *saturated, unsigned char *alive,
                          floating *u_work) noexcept nogil:
    """Forward of samples [start, start + rows) through ``count`` consecutive layers, keeping all.

    weights / biases point at the first layer's parameters; xs holds count+1
    planes (B, n) whose first already holds the input rows; derivatives
    count planes; mean_pre / inv_pre / inv_post count rows of B.  saturated
    (count,) and alive (count, n) accumulate this block's counts unless NULL.
    """
    cdef Py_ssize_t layer, plane = batch * n
    for layer in range(count):
        _forward_layer(rows, n, activation, has_residual, res, norm, weights + layer * n * n,
                       biases + layer * n, xs + layer * plane + start * n,
                       xs + (layer + 1) * plane + start * n, derivatives + layer * plane + start * n,
                       u_work, mean_pre + layer * batch + start, inv_pre + layer * batch + start,
                       inv_post + layer * batch + start)
        if saturated != NULL:
            _count_derivatives(rows, n, derivatives + layer * plane + start * n, saturated + layer,
                               alive + layer * n)


cdef void _backward_layers(Py_ssize_t count, Py_ssize_t first, Py_ssize_t depth, Py_ssize_t n,
                           Py_ssize_t batch, Py_ssize_t start, Py_ssize_t rows, bint has_residual,
                           floating res, int norm, const floating *weights, const floating *xs,
                           floating *derivatives, const floating *mean_pre, const floating *inv_pre,
                           const floating *inv_post, double *log_scale_h, double *log_grad_norm,
                           floating *g, double *log_scale, floating *work,
                           floating *u_work) noexcept nogil:
    """Renormalised backward of the rows through layers first+count .. first+1 (global numbering).

    The arrays are those of _forward_layers for the same layers.  g (rows, n)
    holds the unit-scaled cotangent at the output of the last layer, with log
    scales log_scale (rows,); on return, at the input of the first.  Each
    layer's log norms go to log_grad_norm (B, L+1) at global index, the
    cotangents at h overwrite derivatives and their log scales log_scale_h.
    """
    cdef Py_ssize_t layer, plane = batch * n
    for layer in range(count - 1, -1, -1):
        memcpy(log_scale_h + layer * batch + start, log_scale, rows * sizeof(double))
        # the cotangent at h overwrites phi'(h), which is read first, element by element
        _vjp_layer(rows, n, 1, has_residual, res, norm, weights + layer * n * n,
                   xs + layer * plane + start * n, xs + (layer + 1) * plane + start * n,
                   derivatives + layer * plane + start * n, mean_pre + layer * batch + start,
                   inv_pre + layer * batch + start, inv_post + layer * batch + start, g,
                   derivatives + layer * plane + start * n, work, u_work)
        _renormalise_rows(rows, n, g, log_scale, log_grad_norm + start * (depth + 1) + first + layer,
                          depth + 1)


cdef void _profile_block(Py_ssize_t depth, Py_ssize_t n, Py_ssize_t batch, Py_ssize_t start,
                         Py_ssize_t rows, int activation, bint has_residual, floating res, int norm,
                         const floating *weights, const floating *biases, const floating *x,
                         const floating *grad_output, floating *xs, floating *derivatives,
                         floating *mean_pre, floating *inv_pre, floating *inv_post, double *log_scale_h,
                         double *log_grad_norm, long long *saturated, unsigned char *alive,
                         floating *scratch, double *log_scale) noexcept nogil:
    """Forward and renormalised backward of samples [start, start + rows) through every layer.

    Layouts: weights (L, n, n), biases (L, n), x and grad_output (B, n), xs
    (L+1, B, n), derivatives (L, B, n) (phi'(h), then the unit-scaled
    cotangents at h), mean_pre / inv_pre / inv_post / log_scale_h (L, B),
    log_grad_norm (B, L+1); saturated (L,) and alive (L, n) accumulate this
    block's counts.  scratch holds 3 rows * n values, log_scale rows.
    """
    cdef floating *g = scratch
    memcpy(xs + start * n, x + start * n, rows * n * sizeof(floating))
    _forward_layers(depth, n, batch, start, rows, activation, has_residual, res, norm, weights, biases,
                    xs, derivatives, mean_pre, inv_pre, inv_post, saturated, alive,
                    scratch + 2 * rows * n)
    memcpy(g, grad_output + start * n, rows * n * sizeof(floating))
    memset(log_scale, 0, rows * sizeof(double))
    _renormalise_rows(rows, n, g, log_scale, log_grad_norm + start * (depth + 1) + depth, depth + 1)
    _backward_layers(depth, 0, depth, n, batch, start, rows, has_residual, res, norm, weights, xs,
                     derivatives, mean_pre, inv_pre, inv_post, log_scale_h, log_grad_norm, g, log_scale,
                     scratch + rows * n, scratch + 2 * rows * n)


cdef inline double _largest_row_norm(Py_ssize_t rows, Py_ssize_t n, const floating *a) noexcept nogil:
    cdef Py_ssize_t r, i
    cdef double total, largest = 0
    for r in range(rows):
        total = 0
        for i in range(n):
            total = total + <double> a[r * n + i] * a[r * n + i]
        if total > largest:
            largest = total
    return sqrt(largest)


cdef inline Py_ssize_t _weight_gradient_scratch(Py_ssize_t batch, Py_ssize_t n) noexcept nogil:
    """Values of scratch _weight_gradient_norm needs."""
    return 2 * batch * n + 2 * (batch * batch if batch < n else n * n)


cdef double _weight_gradient_norm(Py_ssize_t batch, Py_ssize_t n, int norm,
                                  const floating *cotangents_h, const floating *x_in,
                                  const floating *mean_pre, const floating *inv_pre,
                                  const double *log_scale_h, floating *scratch) noexcept nogil:
    """log ||sum_b exp(s_b) g_b u_b^T||_F of one layer.

    g_b (B, n) are the unit-scaled cotangents at h with log scales s_b, u_b
    the layer's linear inputs (recomputed from its input x_in for pre-norm).
    Samples are weighted by exp(s_b - max s), so the sum is exact whatever
    the spread of scales, and U is scaled to unit largest row so that its
    squares cannot underflow.  With fewer samples than features the squared
    norm comes from the two Gram matrices, ||G^T U||_F^2 = sum_ij (G G^T)_ij
    (U U^T)_ij, without forming the (n, n) gradient.
    """
    cdef bint use_gram = batch < n
    cdef Py_ssize_t b, i, j, square = batch * batch if use_gram else n * n
    cdef floating *g = scratch
    cdef floating *u = scratch + batch * n
    cdef floating *gram_g = u + batch * n
    cdef floating *gram_u = gram_g + square
    cdef double top = log_scale_h[0], total = 0, weight, u_scale
    for b in range(batch):
        if log_scale_h[b] > top:
            top = log_scale_h[b]
    for b in range(batch):
        weight = exp(log_scale_h[b] - top)
        for i in range(n):
            g[b * n + i] = <floating> (weight * cotangents_h[b * n + i])
    if norm == NORM_PRE:
        _recompute_pre_norm(batch, n, x_in, mean_pre, inv_pre, u)
    else:
        memcpy(u, x_in, batch * n * sizeof(floating))
    u_scale = _largest_row_norm(batch, n, u)
    if u_scale > 0:
        for i in range(batch * n):
            u[i] = <floating> (u[i] / u_scale)
    else:
        u_scale = 1
    if use_gram:
        _gram_upper(batch, n, g, gram_g)
        _gram_upper(batch, n, u, gram_u)
        for j in range(batch):
            for i in range(j):
                total = total + 2.0 * gram_g[j * batch + i] * gram_u[j * batch + i]
            total = total + <double> gram_g[j * batch + j] * gram_u[j * batch + j]
    else:
        # gradient^T (in, out) = U^T G, column-major
        _gemm(c'N', c'T', <int> n, <int> n, <int> batch, <floating> 1, u, <int> n, g, <int> n,
              <floating> 0, gram_g, <int> n)
        for i in range(n * n):
            total = total + <double> gram_g[i] * gram_g[i]
    if total > 0:
        return top + log(u_scale) + 0.5 * log(total)
    return -INFINITY


def gradient_profile(const floating[:, :, ::1] weights, const floating[:, ::1] biases,
                     const floating[:, ::1] x, const floating[:, ::1] grad_output, int activation,
                     bint has_residual, double residual, int norm,
                     floating[:, :, ::1] xs, floating[:, :, ::1] derivatives,
                     floating[:, ::1] mean_pre, floating[:, ::1] inv_pre, floating[:, ::1] inv_post,
                     double[:, ::1] log_scale_h, double[:, ::1] log_grad_norm,
                     double[::1] log_weight_grad_norm, long long[:, ::1] saturated,
                     unsigned char[:, :, ::1] alive, int n_threads):
    """Forward, renormalised backward and weight-gradient norms of one stack.

    Workspaces (allocated by the caller): xs (L+1, B, n) the layer outputs,
    derivatives (L, B, n) phi'(h) and then the unit-scaled cotangents at h,
    mean_pre / inv_pre / inv_post (L, B) LN statistics, log_scale_h (L, B)
    the log scale of those cotangents.  Outputs: log_grad_norm (B, L+1),
    log_weight_grad_norm (L,), and per block of samples the saturated counts
    saturated (blocks, L) and the alive flags alive (blocks, L, n) (zeroed by
    the caller), which the caller reduces into fractions.  The batch is cut
    into saturated.shape[0] blocks, which threads share out; then the
    weight-gradient norms run in parallel over layers.
    """
    cdef Py_ssize_t depth = weights.shape[0], n = weights.shape[1], batch = x.shape[0]
    cdef Py_ssize_t n_blocks = saturated.shape[0]
    cdef Py_ssize_t block, start, layer
    cdef Py_ssize_t max_rows = (batch + n_blocks - 1) // n_blocks
    cdef floating *buffer = NULL
    cdef double *log_scale = NULL
    cdef floating res = <floating> residual
    cdef Py_ssize_t plane = batch * n
    with nogil, parallel(num_threads=max(1, min(<Py_ssize_t> n_threads, n_blocks))):
        buffer = <floating *> malloc(3 * max_rows * n * sizeof(floating))
        log_scale = <double *> malloc(max_rows * sizeof(double))
        for block in prange(n_blocks, schedule='static'):
            start = _block_start(block, n_blocks, batch)
            _profile_block(depth, n, batch, start, _block_start(block + 1, n_blocks, batch) - start,
                           activation, has_residual, res, norm, &weights[0, 0, 0], &biases[0, 0],
                           &x[0, 0], &grad_output[0, 0], &xs[0, 0, 0], &derivatives[0, 0, 0],
                           &mean_pre[0, 0], &inv_pre[0, 0], &inv_post[0, 0], &log_scale_h[0, 0],
                           &log_grad_norm[0, 0], &saturated[block, 0], &alive[block, 0, 0],
                           buffer, log_scale)
        free(buffer)
        free(log_scale)
    with nogil, parallel(num_threads=max(1, min(<Py_ssize_t> n_threads, depth))):
        buffer = <floating *> malloc(_weight_gradient_scratch(batch, n) * sizeof(floating))
        for layer in prange(depth, schedule='dynamic'):
            log_weight_grad_norm[layer] = _weight_gradient_norm(
                batch, n, norm, &derivatives[layer, 0, 0], &xs[layer, 0, 0], &mean_pre[layer, 0],
                &inv_pre[layer, 0], &log_scale_h[layer, 0], buffer)
        free(buffer)


def gradient_profile_segmented(const floating[:, :, ::1] weights, const floating[:, ::1] biases,
                               const floating[:, ::1] x, const floating[:, ::1] grad_output,
                               int activation, bint has_residual, double residual, int norm,
                               Py_ssize_t segment, floating[:, :, ::1] checkpoints,
                               floating[:, :, ::1] xs, floating[:, :, ::1] derivatives,
                               floating[:, ::1] mean_pre, floating[:, ::1] inv_pre,
                               floating[:, ::1] inv_post, double[:, ::1] log_scale_h,
                               floating[:, ::1] g, double[::1] log_scale, double[:, ::1] log_grad_norm,
                               double[::1] log_weight_grad_norm, long long[:, ::1] saturated,
                               unsigned char[:, :, ::1] alive, int n_threads):
    """gradient_profile keeping activations only every ``segment`` layers.

    The forward pass stores x at layers 0, S, 2S, ... in checkpoints
    (ceil(L / S), B, n); the backward pass then runs segment by segment from
    the top, recomputing the segment's forward pass into the segment-sized
    workspaces xs (S+1, B, n), derivatives (S, B, n), mean_pre / inv_pre /
    inv_post / log_scale_h (S, B), and carrying the cotangent g (B, n) and
    its log scale (B,) from one segment to the next.  One extra forward pass
    for memory (L/S + 2S) B n instead of 2 L B n; the same operations as
    gradient_profile in the same order, so the results are bitwise equal.
    """
    cdef Py_ssize_t depth = weights.shape[0], n = weights.shape[1], batch = x.shape[0]
    cdef Py_ssize_t n_blocks = saturated.shape[0], n_segments = checkpoints.shape[0]
    cdef Py_ssize_t block, start, rows, seg, first, count, layer
    cdef Py_ssize_t max_rows = (batch + n_blocks - 1) // n_blocks
    cdef floating *buffer = NULL
    cdef floating res = <floating> residual
    cdef int threads = max(1, min(n_threads, n_blocks))

    with nogil, parallel(num_threads=threads):
        buffer = <floating *> malloc(3 * max_rows * n * sizeof(floating))
        for block in prange(n_blocks, schedule='static'):
            start = _block_start(block, n_blocks, batch)
            rows = _block_start(block + 1, n_blocks, batch) - start
            memcpy(&xs[0, start, 0], &x[start, 0], rows * n * sizeof(floating))
            for seg in range(n_segments):
                first = seg * segment
                count = min(segment, depth - first)
                memcpy(&checkpoints[seg, start, 0], &xs[0, start, 0], rows * n * sizeof(floating))
                _forward_layers(count, n, batch, start, rows, activation, has_residual, res, norm,
                                &weights[first, 0, 0], &biases[first, 0], &xs[0, 0, 0],
                                &derivatives[0, 0, 0], &mean_pre[0, 0], &inv_pre[0, 0], &inv_post[0, 0],
                                &saturated[block, first], &alive[block, first, 0], buffer)
                memcpy(&xs[0, start, 0], &xs[count, start, 0], rows * n * sizeof(floating))
            memcpy(&g[start, 0], &grad_output[start, 0], rows * n * sizeof(floating))
            memset(&log_scale[start], 0, rows * sizeof(double))
            _renormalise_rows(rows, n, &g[start, 0], &log_scale[start], &log_grad_norm[start, depth],
                              depth + 1)
        free(buffer)

    for seg in range(n_segments - 1, -1, -1):
        first = seg * segment
        count = min(segment, depth - first)
        with nogil, parallel(num_threads=threads):
            buffer = <floating *> malloc(3 * max_rows * n * sizeof(floating))
            for block in prange(n_blocks, schedule='static'):
                start = _block_start(block, n_blocks, batch)
                rows = _block_start(block + 1, n_blocks, batch) - start
                memcpy(&xs[0, start, 0], &checkpoints[seg, start, 0], rows * n * sizeof(floating))
                _forward_layers(count, n, batch, start, rows, activation, has_residual, res, norm,
                                &weights[first, 0, 0], &biases[first, 0], &xs[0, 0, 0],
                                &derivatives[0, 0, 0], &mean_pre[0, 0], &inv_pre[0, 0], &inv_post[0, 0],
                                <long long *> NULL, <unsigned char *> NULL, buffer)
                _backward_layers(count, first, depth, n, batch, start, rows, has_residual, res, norm,
                                 &weights[first, 0, 0], &xs[0, 0, 0], &derivatives[0, 0, 0],
                                 &mean_pre[0, 0], &inv_pre[0, 0], &inv_post[0, 0], &log_scale_h[0, 0],
                                 &log_grad_norm[0, 0], &g[start, 0], &log_scale[start], buffer,
                                 buffer + max_rows * n)
            free(buffer)
        with nogil, parallel(num_threads=max(1, min(<Py_ssize_t> n_threads, count))):
            buffer = <floating *> malloc(_weight_gradient_scratch(batch, n) * sizeof(floating))
            for layer in prange(count, schedule='dynamic'):
                log_weight_grad_norm[first + layer] = _weight_gradient_norm(
                    batch, n, norm, &derivatives[layer, 0, 0], &xs[layer, 0, 0], &mean_pre[layer, 0],
                    &inv_pre[layer, 0], &log_scale_h[layer, 0], buffer)
            free(buffer)


def gradient_profiles(const Py_ssize_t[::1] weight_addresses, const Py_ssize_t[::1] bias_addresses,
                      const floating[:, :, ::1] x, const floating[:, :, ::1] grad_output,
                      const int[::1] activations, const unsigned char[::1] has_residual,
                      const double[::1] residuals, const int[::1] norms, Py_ssize_t depth,
                      double[:, :, ::1] log_grad_norm, double[:, ::1] log_weight_grad_norm,
                      long long[:, ::1] saturated, unsigned char[:, :, ::1] alive, int n_threads):
    """Gradient profiles of C stacks of one shape, one stack per thread at a time.

    The sweep's chunk runner: no Python work per stack.  Stack c has weights
    (L, n, n) and biases (L, n) at the given addresses (C-contiguous, the
    dtype of x; the caller keeps them alive), inputs x[c] and cotangents
    grad_output[c] (B, n), its own activation, residual and norm.  Outputs:
    log_grad_norm (C, B, L+1), log_weight_grad_norm (C, L), saturated (C, L)
    counts and alive (C, L, n) flags (zeroed by the caller).
    """
    cdef Py_ssize_t n_stacks = x.shape[0], batch = x.shape[1], n = x.shape[2]
    cdef Py_ssize_t plane = batch * n, c, layer
    cdef Py_ssize_t values = ((2 * depth + 1) * plane + 3 * depth * batch + 3 * plane
                              + _weight_gradient_scratch(batch, n))
    cdef floating *buffer = NULL
    cdef double *scales = NULL
    cdef floating *xs
    cdef floating *derivatives
    cdef floating *stats
    cdef floating *scratch
    cdef const floating *weights
    with nogil, parallel(num_threads=max(1, min(<Py_ssize_t> n_threads, n_stacks))):
        buffer = <floating *> malloc(values * sizeof(floating))
        scales = <double *> malloc((depth * batch + batch) * sizeof(double))
        for c in prange(n_stacks, schedule='dynamic'):
            # buffer: xs (L+1, B, n) | derivatives (L, B, n) | mean, inv_pre, inv_post (L, B) | scratch
            xs = buffer
            derivatives = xs + (depth + 1) * plane
            stats = derivatives + depth * plane
            scratch = stats + 3 * depth * batch
            weights = <const floating *> <size_t> weight_addresses[c]
            _profile_block(depth, n, batch, 0, batch, activations[c], has_residual[c],
                           <floating> residuals[c], norms[c], weights,
                           <const floating *> <size_t> bias_addresses[c], &x[c, 0, 0],
                           &grad_output[c, 0, 0], xs, derivatives, stats, stats + depth * batch,
                           stats + 2 * depth * batch, scales, &log_grad_norm[c, 0, 0],
                           &saturated[c, 0], &alive[c, 0, 0], scratch, scales + depth * batch)
            for layer in range(depth):
                log_weight_grad_norm[c, layer] = _weight_gradient_norm(
                    batch, n, norms[c], derivatives + layer * plane, xs + layer * plane,
                    stats + layer * batch, stats + (depth + layer) * batch, scales + layer * batch,
                    scratch)
        free(buffer)
        free(scales)


# ---------------------------------------------------------------------------
# Jacobian products
# ---------------------------------------------------------------------------

cdef struct WorkItem:
    Py_ssize_t sample_start, sample_stop, vector_start, vector_stop


cdef inline WorkItem _work_item(Py_ssize_t item, Py_ssize_t batch, Py_ssize_t k,
                                Py_ssize_t n_items) noexcept nogil:
    """Work item -> (samples, vectors).

    With at least as many samples as items, an item is a block of samples with
    all their k vectors; otherwise it is one sample and a block of its vectors.
    Either way its vector rows are contiguous in a (B, k, n) array.
    """
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


def work_items(Py_ssize_t batch, Py_ssize_t k, int n_threads):
    """How many work items a JVP / VJP of B samples and k vectors is cut into."""
    if batch >= n_threads:
        return max(1, n_threads)
    return batch * min(k, max(1, n_threads // batch + (n_threads % batch > 0)))


def jvp(const floating[:, :, ::1] weights, const floating[:, ::1] biases, const floating[:, ::1] x,
        int activation, bint has_residual, double residual, int norm, floating[:, :, ::1] tangents,
        Py_ssize_t n_items, int n_threads):
    """In place: tangents (B, k, n) at the input -> J(x_b) tangents at the output."""
    cdef Py_ssize_t depth = weights.shape[0], n = weights.shape[1], batch = x.shape[0]
    cdef Py_ssize_t k = tangents.shape[1]
    cdef Py_ssize_t item, s0, s1, v0, v1, samples, rows, layer
    cdef WorkItem work
    cdef Py_ssize_t max_samples = 1 if batch < n_items else (batch + n_items - 1) // n_items
    cdef Py_ssize_t max_rows = max_samples * k
    cdef floating *buffer = NULL
    cdef floating *current
    cdef floating *following
    cdef floating *swap
    cdef floating res = <floating> residual
    cdef Py_ssize_t state = 4 * max_samples * n + 3 * max_samples
    with nogil, parallel(num_threads=max(1, min(<Py_ssize_t> n_threads, n_items))):
        buffer = <floating *> malloc((state + 2 * max_rows * n) * sizeof(floating))
        for item in prange(n_items, schedule='static'):
            work = _work_item(item, batch, k, n_items)
            s0 = work.sample_start
            s1 = work.sample_stop
            v0 = work.vector_start
            v1 = work.vector_stop
            samples = s1 - s0
            rows = samples * (v1 - v0)
            current = buffer
            following = buffer + max_samples * n
            memcpy(current, &x[s0, 0], samples * n * sizeof(floating))
            for layer in range(depth):
                # buffer: current | following | derivative | u | mean, inv_pre, inv_post
                _forward_layer(samples, n, activation, has_residual, res, norm,
                               &weights[layer, 0, 0], &biases[layer, 0], current, following,
                               buffer + 2 * max_samples * n, buffer + 3 * max_samples * n,
                               buffer + 4 * max_samples * n, buffer + 4 * max_samples * n + max_samples,
                               buffer + 4 * max_samples * n + 2 * max_samples)
                _jvp_layer(rows, n, v1 - v0, has_residual, res, norm, &weights[layer, 0, 0],
                           buffer + 3 * max_samples * n if norm == NORM_PRE else current, following,
                           buffer + 2 * max_samples * n,
                           buffer + 4 * max_samples * n + max_samples,
                           buffer + 4 * max_samples * n + 2 * max_samples,
                           &tangents[s0, v0, 0], buffer + state, buffer + state + max_rows * n)
                swap = current
                current = following
                following = swap
        free(buffer)


def vjp(const floating[:, :, ::1] weights, const floating[:, ::1] biases, const floating[:, ::1] x,
        int activation, bint has_residual, double residual, int norm, floating[:, :, ::1] cotangents,
        Py_ssize_t n_items, int n_threads):
    """In place: cotangents (B, k, n) at the output -> J(x_b)^T cotangents at the input."""
    cdef Py_ssize_t depth = weights.shape[0], n = weights.shape[1], batch = x.shape[0]
    cdef Py_ssize_t k = cotangents.shape[1]
    cdef Py_ssize_t item, s0, s1, v0, v1, samples, rows, layer
    cdef WorkItem work
    cdef Py_ssize_t max_samples = 1 if batch < n_items else (batch + n_items - 1) // n_items
    cdef Py_ssize_t max_rows = max_samples * k
    cdef Py_ssize_t plane = max_samples * n
    cdef floating *buffer = NULL
    cdef floating *stored_x
    cdef floating *stored_d
    cdef floating *stats
    cdef floating *scratch
    cdef floating res = <floating> residual
    # per item: x_0..x_L | phi'(h) per layer | mean, inv_pre, inv_post per layer | scratch
    cdef Py_ssize_t size = ((depth + 1) * plane + depth * plane + 3 * depth * max_samples
                            + 2 * max_rows * n + 2 * plane)
    with nogil, parallel(num_threads=max(1, min(<Py_ssize_t> n_threads, n_items))):
        buffer = <floating *> malloc(size * sizeof(floating))
        for item in prange(n_items, schedule='static'):
            work = _work_item(item, batch, k, n_items)
            s0 = work.sample_start
            s1 = work.sample_stop
            v0 = work.vector_start
            v1 = work.vector_stop
            samples = s1 - s0
            rows = samples * (v1 - v0)
            stored_x = buffer
            stored_d = stored_x + (depth + 1) * plane
            stats = stored_d + depth * plane
            scratch = stats + 3 * depth * max_samples
            memcpy(stored_x, &x[s0, 0], samples * n * sizeof(floating))
            for layer in range(depth):
                _forward_layer(samples, n, activation, has_residual, res, norm,
                               &weights[layer, 0, 0], &biases[layer, 0], stored_x + layer * plane,
                               stored_x + (layer + 1) * plane, stored_d + layer * plane, scratch,
                               stats + (3 * layer) * max_samples, stats + (3 * layer + 1) * max_samples,
                               stats + (3 * layer + 2) * max_samples)
            for layer in range(depth - 1, -1, -1):
                _vjp_layer(rows, n, v1 - v0, has_residual, res, norm, &weights[layer, 0, 0],
                           stored_x + layer * plane, stored_x + (layer + 1) * plane,
                           stored_d + layer * plane, stats + (3 * layer) * max_samples,
                           stats + (3 * layer + 1) * max_samples,
                           stats + (3 * layer + 2) * max_samples, &cotangents[s0, v0, 0],
                           scratch + 2 * plane, scratch + 2 * plane + max_rows * n, scratch)
        free(buffer)
