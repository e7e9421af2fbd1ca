# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Compiled CPU kernels of batch-normalised stacks (norm="batch"): forward, gradient profile, JVP, VJP.

The layer (vgcore.reference.batchnorm is its plain twin):

    v = x @ W.T + b;   h = BN(v) over the batch, per feature;   f = phi(h);
    x' = x + residual * f  if has_residual  else f

BN couples the samples, so the batch cannot be cut into independent blocks of
samples as vgcore._ext._kernels does.  Instead each layer is cut into blocks
of features: a feature's batch statistics, its BN and its activation need only
its own column, so a thread computes its columns of ``v = x W^T`` (one gemm on
a slice of W's rows) and everything after it for those columns.  The backward
pass has two such phases per layer, with a join between them: BN's VJP per
feature (columns of the cotangent at v), then ``g_x = g_v W`` by column blocks
of g_x (one gemm on a slice of W's columns).  The blocks are chosen by the
caller from the machine, never from the thread count, so results are bitwise
the same for any number of threads; the caller holds BLAS to one thread.

Conventions (vgcore.backends.cpu_batchnorm guarantees them; nothing here
checks, raises or allocates): C-contiguous arrays of one floating dtype, except
float64 logs; weights (L, n, n) in (out, in) layout, biases (L, n); batches
(B, n) with B >= 2; workspaces allocated by the caller.  Sums over the batch
accumulate in double for both dtypes.

Row-major (B, n) arrays are handed to Fortran BLAS as their column-major
transposes (n, B): columns j0:j1 of ``x W^T`` are ``gemm('T', 'N')`` on
(W[j0:j1], x) with ldc n, and columns i0:i1 of ``g_v W`` are
``gemm('N', 'N')`` on (W[:, i0:i1], g_v).
"""

from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.math cimport INFINITY, fabs, log, sqrt
from libc.string cimport memcpy, memset

from vgcore._ext._layers cimport (
    LAYER_NORM_EPS,
    VG_SATURATION_THRESHOLD,
    _activation_block,
    _block_start,
    _gemm,
    _gram_upper,
)

import numpy as np

# BN's eps is layer norm's (1e-5, torch.nn.BatchNorm1d's default): one constant in csrc/vg_stack.h.
cdef double BATCH_NORM_EPS = LAYER_NORM_EPS


# ---------------------------------------------------------------------------
# One layer on a block of feature columns
# ---------------------------------------------------------------------------

cdef void _forward_columns(Py_ssize_t batch, Py_ssize_t n, Py_ssize_t j0, Py_ssize_t j1, int activation,
                           bint has_residual, floating residual, const floating *weight,
                           const floating *bias, const floating *x, floating *z, floating *out,
                           floating *derivative, floating *inv_std, double *sums,
                           const floating *zeros, long long *saturated,
                           unsigned char *alive) noexcept nogil:
    """Columns j0:j1 of one layer: z = BN(x W^T + b), out = x' and derivative = phi'(z).

    z, out and derivative are (B, n) planes of which only columns j0:j1 are
    written; inv_std (n,) likewise.  sums holds 2 (j1 - j0) doubles of
    scratch, zeros j1 - j0 zeros (the activation's bias).  saturated (one
    count for this block) and alive (n,) accumulate unless NULL.
    """
    cdef Py_ssize_t cols = j1 - j0, b, j
    cdef double *mean = sums
    cdef double *var = sums + cols
    cdef floating value, centred, d
    cdef floating threshold = <floating> VG_SATURATION_THRESHOLD
    cdef long long count = 0
    if cols <= 0:
        return
    _gemm(c'T', c'N', <int> cols, <int> batch, <int> n, <floating> 1, weight + j0 * n, <int> n, x,
          <int> n, <floating> 0, z + j0, <int> n)
    memset(sums, 0, 2 * cols * sizeof(double))
    for b in range(batch):
        for j in range(cols):
            value = z[b * n + j0 + j] + bias[j0 + j]
            z[b * n + j0 + j] = value
            mean[j] = mean[j] + value
    for j in range(cols):
        mean[j] = mean[j] / batch
    for b in range(batch):
        for j in range(cols):
            centred = z[b * n + j0 + j] - <floating> mean[j]
            var[j] = var[j] + <double> centred * centred
    for j in range(cols):
        inv_std[j0 + j] = <floating> (1.0 / sqrt(var[j] / batch + BATCH_NORM_EPS))
    for b in range(batch):
        for j in range(cols):
            value = (z[b * n + j0 + j] - <floating> mean[j]) * inv_std[j0 + j]
            z[b * n + j0 + j] = value
            out[b * n + j0 + j] = value
        _activation_block(activation, 1, cols, out + b * n + j0, zeros, derivative + b * n + j0)
        if has_residual:
            for j in range(cols):
                out[b * n + j0 + j] = x[b * n + j0 + j] + residual * out[b * n + j0 + j]
    if saturated != NULL:
        for b in range(batch):
            for j in range(cols):
                d = derivative[b * n + j0 + j]
                count = count + ((d < threshold) & (d > -threshold))
                alive[j0 + j] = alive[j0 + j] | (d != 0)
        saturated[0] = saturated[0] + count


cdef void _bn_product_columns(Py_ssize_t batch, Py_ssize_t n, Py_ssize_t j0, Py_ssize_t j1,
                              floating *g, const floating *z, const floating *inv_std,
                              double *sums) noexcept nogil:
    """In place on columns j0:j1 of g (B, n): g <- inv_std (g - mean_b g - z mean_b(g z)).

    BN's Jacobian over the batch, per feature; symmetric, so it serves JVP and VJP.
    """
    cdef Py_ssize_t cols = j1 - j0, b, j
    cdef double *mean_g = sums
    cdef double *mean_gz = sums + cols
    cdef floating value
    memset(sums, 0, 2 * cols * sizeof(double))
    for b in range(batch):
        for j in range(cols):
            value = g[b * n + j0 + j]
            mean_g[j] = mean_g[j] + value
            mean_gz[j] = mean_gz[j] + <double> value * z[b * n + j0 + j]
    for j in range(cols):
        mean_g[j] = mean_g[j] / batch
        mean_gz[j] = mean_gz[j] / batch
    for b in range(batch):
        for j in range(cols):
            g[b * n + j0 + j] = inv_std[j0 + j] * <floating> (
                g[b * n + j0 + j] - mean_g[j] - z[b * n + j0 + j] * mean_gz[j])


cdef void _cotangent_v_columns(Py_ssize_t batch, Py_ssize_t n, Py_ssize_t j0, Py_ssize_t j1,
                               floating scale, floating *g, floating *derivative, const floating *z,
                               const floating *inv_std, double *sums) noexcept nogil:
    """Backward phase 1 on columns j0:j1: derivative <- g_v = BN^T(scale * g * phi'(h)).

    Written over phi'(h) (read first, element by element); ``scale`` is the
    residual factor (or 1) times the pending renormalisation of g.
    """
    cdef Py_ssize_t cols = j1 - j0, b, j
    if cols <= 0:
        return
    for b in range(batch):
        for j in range(cols):
            derivative[b * n + j0 + j] = scale * g[b * n + j0 + j] * derivative[b * n + j0 + j]
    _bn_product_columns(batch, n, j0, j1, derivative, z, inv_std, sums)


cdef void _input_cotangent_columns(Py_ssize_t batch, Py_ssize_t n, Py_ssize_t i0, Py_ssize_t i1,
                                   bint has_residual, floating keep, const floating *weight,
                                   const floating *g_v, const floating *g, floating *g_in,
                                   double *squares) noexcept nogil:
    """Backward phase 2 on columns i0:i1: g_in = g_v W (+ keep * g), and per-sample sums of squares.

    squares (B,) receives this block's part of each sample's ||g_in||^2.
    """
    cdef Py_ssize_t cols = i1 - i0, b, i
    cdef double total
    cdef floating value
    if cols <= 0:
        memset(squares, 0, batch * sizeof(double))
        return
    _gemm(c'N', c'N', <int> cols, <int> batch, <int> n, <floating> 1, weight + i0, <int> n, g_v, <int> n,
          <floating> 0, g_in + i0, <int> n)
    for b in range(batch):
        total = 0
        for i in range(cols):
            value = g_in[b * n + i0 + i]
            if has_residual:
                value = value + keep * g[b * n + i0 + i]
                g_in[b * n + i0 + i] = value
            total = total + <double> value * value
        squares[b] = total


cdef double _weight_gradient_log_norm(Py_ssize_t batch, Py_ssize_t n, const floating *g_v,
                                      const floating *x, floating *scratch) noexcept nogil:
    """log ||g_v^T x||_F of one layer (g_v, x (B, n)); -inf when it is exactly 0.

    Every column of g_v sums to zero over the batch (BN's VJP removes the
    batch mean), so g_v^T x = g_v^T (x - mean_b x): x is centred first, which
    removes the part that would only cancel (samples that share most of
    their input, identical samples at the extreme, whose gradient is exactly
    zero), then scaled to unit largest row, so its squares cannot overflow.
    With fewer samples than features the squared norm comes from the two
    Gram matrices, ||g_v^T u||_F^2 = sum_ab (g_v g_v^T)_ab (u u^T)_ab, without
    forming the (n, n) gradient.  scratch: B n + 2 min(B, n)^2 + n values.
    """
    cdef bint use_gram = batch < n
    cdef Py_ssize_t a, b, i, square = batch * batch if use_gram else n * n
    cdef floating *u = scratch
    cdef floating *gram_g = u + batch * n
    cdef floating *gram_u = gram_g + square
    cdef floating *mean = gram_u + square
    cdef double largest = 0, row, total = 0
    for i in range(n):
        row = 0
        for b in range(batch):
            row = row + x[b * n + i]
        mean[i] = <floating> (row / batch)
    for b in range(batch):
        row = 0
        for i in range(n):
            u[b * n + i] = x[b * n + i] - mean[i]
            row = row + <double> u[b * n + i] * u[b * n + i]
        if row > largest:
            largest = row
    largest = sqrt(largest)
    if largest == 0:
        return -INFINITY
    for i in range(batch * n):
        u[i] = <floating> (u[i] / largest)
    if use_gram:
        _gram_upper(batch, n, g_v, gram_g)
        _gram_upper(batch, n, u, gram_u)
        for b in range(batch):
            for a in range(b):
                total = total + 2.0 * gram_g[b * batch + a] * gram_u[b * batch + a]
            total = total + <double> gram_g[b * batch + b] * gram_u[b * batch + b]
    else:
        # gradient^T (in, out) = u^T g_v, column-major
        _gemm(c'N', c'T', <int> n, <int> n, <int> batch, <floating> 1, u, <int> n, g_v, <int> n,
              <floating> 0, gram_g, <int> n)
        for i in range(n * n):
            total = total + <double> gram_g[i] * gram_g[i]
    if total > 0:
        return log(largest) + 0.5 * log(total)
    return -INFINITY


def weight_gradient_scratch(Py_ssize_t batch, Py_ssize_t n):
    """Values of scratch one thread's weight-gradient norm needs."""
    cdef Py_ssize_t square = batch * batch if batch < n else n * n
    return batch * n + 2 * square + n


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------

cdef void _forward_layer(Py_ssize_t batch, Py_ssize_t n, Py_ssize_t n_blocks, int n_threads, int activation,
                         bint has_residual, floating residual, const floating *weight,
                         const floating *bias, const floating *x, floating *z, floating *out,
                         floating *derivative, floating *inv_std, double *sums, const floating *zeros,
                         long long *saturated, unsigned char *alive) noexcept nogil:
    """One layer, its feature blocks in parallel; saturated (n_blocks,) per block unless NULL."""
    cdef Py_ssize_t block, j0
    for block in prange(n_blocks, schedule='static', num_threads=n_threads):
        j0 = _block_start(block, n_blocks, n)
        _forward_columns(batch, n, j0, _block_start(block + 1, n_blocks, n), activation, has_residual,
                         residual, weight, bias, x, z, out, derivative, inv_std, sums + 2 * j0, zeros,
                         saturated + block if saturated != NULL else <long long *> NULL, alive)


def forward(const floating[:, :, ::1] weights, const floating[:, ::1] biases, const floating[:, ::1] x,
            int activation, bint has_residual, double residual, floating[:, ::1] out,
            floating[:, :, ::1] planes, floating[::1] inv_std, double[::1] sums, const floating[::1] zeros,
            Py_ssize_t n_blocks, int n_threads):
    """x_L into out (B, n).  Workspaces: planes (4, B, n), inv_std (n,), sums (2 n,), zeros (n,) zeros."""
    cdef Py_ssize_t depth = weights.shape[0], n = weights.shape[1], batch = x.shape[0], layer
    cdef floating res = <floating> residual
    cdef const floating *source = &x[0, 0]
    cdef floating *target
    with nogil:
        for layer in range(depth):
            target = &out[0, 0] if layer == depth - 1 else &planes[2 + layer % 2, 0, 0]
            _forward_layer(batch, n, n_blocks, n_threads, activation, has_residual, res,
                           &weights[layer, 0, 0], &biases[layer, 0], source, &planes[0, 0, 0], target,
                           &planes[1, 0, 0], &inv_std[0], &sums[0], &zeros[0], NULL, NULL)
            source = target


def gradient_profile(const floating[:, :, ::1] weights, const floating[:, ::1] biases,
                     const floating[:, ::1] x, const floating[:, ::1] grad_output, int activation,
                     bint has_residual, double residual, floating[:, :, ::1] xs, floating[:, :, ::1] zs,
                     floating[:, :, ::1] derivatives, floating[:, ::1] inv_std, floating[:, :, ::1] cotangents,
                     double[::1] sums, double[:, ::1] squares, const floating[::1] zeros,
                     floating[:, ::1] scratch, double[:, ::1] log_grad_norm,
                     double[::1] log_weight_grad_norm, long long[:, ::1] saturated,
                     unsigned char[:, ::1] alive, Py_ssize_t n_blocks, int n_threads, int gradient_threads):
    """Forward, batch-renormalised backward and weight-gradient norms of one batch-normalised stack.

    Workspaces (allocated by the caller): xs (L+1, B, n) layer inputs,
    zs (L, B, n) BN outputs, derivatives (L, B, n) phi'(h) and then the
    cotangents at v, inv_std (L, n), cotangents (2, B, n), sums (2 n,),
    squares (n_blocks, B), zeros (n,) zeros, scratch (threads,
    weight_gradient_scratch(B, n)).  Outputs: log_grad_norm (B, L+1),
    log_weight_grad_norm (L,), saturated (L, n_blocks) counts and alive (L, n)
    flags (zeroed by the caller).  The layers run their feature blocks on
    n_threads threads (which meet once or twice per layer), the weight-gradient
    norms on gradient_threads (at most scratch.shape[0]), in parallel over layers.

    The batch cotangent is renormalised by one factor per layer, its
    Frobenius norm (the layer's backward map is linear in the whole batch
    cotangent, not sample by sample); the factor's log is carried in float64,
    so each sample's log norm is exact at any depth.  The cotangent is scaled
    lazily: the next layer's first phase multiplies by the pending factor.
    """
    cdef Py_ssize_t depth = weights.shape[0], n = weights.shape[1], batch = x.shape[0]
    cdef Py_ssize_t layer, block, b, i, j0, plane = batch * n
    cdef floating res = <floating> residual
    cdef floating branch = res if has_residual else <floating> 1
    cdef floating pending
    cdef double largest, total, log_scale
    cdef double *log_scales = NULL
    cdef floating *g = &cotangents[0, 0, 0]
    cdef floating *g_in = &cotangents[1, 0, 0]
    cdef floating *swap
    cdef int threads
    scales = np.empty(depth)
    cdef double[::1] layer_log_scale = scales
    with nogil:
        memcpy(&xs[0, 0, 0], &x[0, 0], plane * sizeof(floating))
        for layer in range(depth):
            _forward_layer(batch, n, n_blocks, n_threads, activation, has_residual, res,
                           &weights[layer, 0, 0], &biases[layer, 0], &xs[layer, 0, 0], &zs[layer, 0, 0],
                           &xs[layer + 1, 0, 0], &derivatives[layer, 0, 0], &inv_std[layer, 0], &sums[0],
                           &zeros[0], &saturated[layer, 0], &alive[layer, 0])

        # the output cotangent: scaled by its largest entry first, so that any finite, non-zero
        # scale of grad_output (1e-300 included) has exact squares
        memcpy(g, &grad_output[0, 0], plane * sizeof(floating))
        largest = 0
        for i in range(plane):
            if fabs(g[i]) > largest:
                largest = fabs(g[i])
        total = 0
        for b in range(batch):
            squares[0, b] = 0
            if largest > 0:
                for i in range(n):
                    squares[0, b] = squares[0, b] + (g[b * n + i] / largest) * (g[b * n + i] / largest)
            total = total + squares[0, b]
        if largest > 0:
            for b in range(batch):
                log_grad_norm[b, depth] = log(largest) + 0.5 * log(squares[0, b]) if squares[0, b] > 0 \
                    else -INFINITY
            log_scale = log(largest) + 0.5 * log(total)
            pending = <floating> ((1.0 / largest) / sqrt(total))
        else:
            for b in range(batch):
                log_grad_norm[b, depth] = -INFINITY
            log_scale = 0
            pending = 1

        for layer in range(depth - 1, -1, -1):
            layer_log_scale[layer] = log_scale
            for block in prange(n_blocks, schedule='static', num_threads=n_threads):
                j0 = _block_start(block, n_blocks, n)
                _cotangent_v_columns(batch, n, j0, _block_start(block + 1, n_blocks, n), pending * branch,
                                     g, &derivatives[layer, 0, 0], &zs[layer, 0, 0], &inv_std[layer, 0],
                                     &sums[2 * j0])
            for block in prange(n_blocks, schedule='static', num_threads=n_threads):
                j0 = _block_start(block, n_blocks, n)
                _input_cotangent_columns(batch, n, j0, _block_start(block + 1, n_blocks, n), has_residual,
                                         pending, &weights[layer, 0, 0], &derivatives[layer, 0, 0], g, g_in,
                                         &squares[block, 0])
            total = 0
            for b in range(batch):
                for block in range(1, n_blocks):
                    squares[0, b] = squares[0, b] + squares[block, b]
                total = total + squares[0, b]
                log_grad_norm[b, layer] = log_scale + 0.5 * log(squares[0, b]) if squares[0, b] > 0 \
                    else -INFINITY
            if total > 0:
                log_scale = log_scale + 0.5 * log(total)
                pending = <floating> (1.0 / sqrt(total))
            else:
                pending = 1
            swap = g
            g = g_in
            g_in = swap

        threads = <int> min(<Py_ssize_t> gradient_threads, depth)
        for layer in prange(depth, schedule='dynamic', num_threads=threads):
            log_weight_grad_norm[layer] = layer_log_scale[layer] + _weight_gradient_log_norm(
                batch, n, &derivatives[layer, 0, 0], &xs[layer, 0, 0],
                &scratch[threadid(), 0])


# ---------------------------------------------------------------------------
# Jacobian products of the batch map
# ---------------------------------------------------------------------------

def _forward_keeping(const floating[:, :, ::1] weights, const floating[:, ::1] biases,
                     const floating[:, ::1] x, int activation, bint has_residual, floating res,
                     floating[:, :, ::1] zs, floating[:, :, ::1] derivatives, floating[:, ::1] inv_std,
                     floating[:, :, ::1] planes, double[::1] sums, const floating[::1] zeros,
                     Py_ssize_t n_blocks, int n_threads):
    """Forward pass keeping each layer's BN output, phi' and inv_std (planes (2, B, n) ping-pong)."""
    cdef Py_ssize_t depth = weights.shape[0], n = weights.shape[1], batch = x.shape[0], layer
    cdef const floating *source = &x[0, 0]
    cdef floating *target
    with nogil:
        for layer in range(depth):
            target = &planes[layer % 2, 0, 0]
            _forward_layer(batch, n, n_blocks, n_threads, activation, has_residual, res,
                           &weights[layer, 0, 0], &biases[layer, 0], source, &zs[layer, 0, 0], target,
                           &derivatives[layer, 0, 0], &inv_std[layer, 0], &sums[0], &zeros[0], NULL, NULL)
            source = target


cdef void _gather(Py_ssize_t batch, Py_ssize_t k, Py_ssize_t n, Py_ssize_t v0, Py_ssize_t v1,
                  const floating *vectors, floating *local) noexcept nogil:
    """vectors[:, v0:v1, :] of (B, k, n) -> local (v1 - v0, B, n): one (B, n) batch vector after another."""
    cdef Py_ssize_t b, v
    for v in range(v0, v1):
        for b in range(batch):
            memcpy(local + ((v - v0) * batch + b) * n, vectors + (b * k + v) * n, n * sizeof(floating))


cdef void _scatter(Py_ssize_t batch, Py_ssize_t k, Py_ssize_t n, Py_ssize_t v0, Py_ssize_t v1,
                   const floating *local, floating *vectors) noexcept nogil:
    cdef Py_ssize_t b, v
    for v in range(v0, v1):
        for b in range(batch):
            memcpy(vectors + (b * k + v) * n, local + ((v - v0) * batch + b) * n, n * sizeof(floating))


def jacobian_products(const floating[:, :, ::1] weights, const floating[:, ::1] biases,
                      const floating[:, ::1] x, int activation, bint has_residual, double residual,
                      bint transpose, floating[:, :, ::1] vectors, floating[:, :, ::1] zs,
                      floating[:, :, ::1] derivatives, floating[:, ::1] inv_std, floating[:, :, ::1] planes,
                      double[::1] sums, const floating[::1] zeros, floating[:, ::1] local,
                      double[:, ::1] local_sums, Py_ssize_t n_blocks, int forward_threads, int n_threads):
    """In place on vectors (B, k, n): J T_j (transpose False) or J^T U_j (True) for T_j = vectors[:, j, :].

    J is the Jacobian of the whole batch map.  The forward pass runs once,
    keeping zs, derivatives (L, B, n) and inv_std (L, n) (planes (2, B, n),
    sums (2 n,) scratch); then the k batch vectors are cut into
    local.shape[0] items of consecutive vectors, each carried through every
    layer by one thread in local[item] (3 kmax B n values, kmax the largest
    item) with local_sums[item] (2 n,) scratch.
    """
    cdef Py_ssize_t depth = weights.shape[0], n = weights.shape[1], batch = x.shape[0]
    cdef Py_ssize_t k = vectors.shape[1], n_items = local.shape[0], item, v0, v1, q, count, layer, i
    cdef Py_ssize_t plane = batch * n, rows
    cdef floating res = <floating> residual
    cdef floating branch = res if has_residual else <floating> 1
    cdef floating *t
    cdef floating *work
    cdef floating *other
    cdef const floating *d
    _forward_keeping(weights, biases, x, activation, has_residual, res, zs, derivatives, inv_std, planes,
                     sums, zeros, n_blocks, forward_threads)
    with nogil:
        for item in prange(n_items, schedule='static', num_threads=n_threads):
            v0 = _block_start(item, n_items, k)
            v1 = _block_start(item + 1, n_items, k)
            count = v1 - v0
            rows = count * batch
            t = &local[item, 0]
            work = t + local.shape[1] // 3
            other = work + local.shape[1] // 3
            if count > 0:
                _gather(batch, k, n, v0, v1, &vectors[0, 0, 0], t)
                if not transpose:
                    for layer in range(depth):
                        # work = t W^T for every vector at once, then BN's product per batch vector
                        _gemm(c'T', c'N', <int> n, <int> rows, <int> n, <floating> 1, &weights[layer, 0, 0],
                              <int> n, t, <int> n, <floating> 0, work, <int> n)
                        for q in range(count):
                            _bn_product_columns(batch, n, 0, n, work + q * plane, &zs[layer, 0, 0],
                                                &inv_std[layer, 0], &local_sums[item, 0])
                        d = &derivatives[layer, 0, 0]
                        for q in range(count):
                            for i in range(plane):
                                if has_residual:
                                    t[q * plane + i] = t[q * plane + i] + res * (d[i] * work[q * plane + i])
                                else:
                                    t[q * plane + i] = d[i] * work[q * plane + i]
                else:
                    for layer in range(depth - 1, -1, -1):
                        d = &derivatives[layer, 0, 0]
                        for q in range(count):
                            for i in range(plane):
                                work[q * plane + i] = branch * t[q * plane + i] * d[i]
                            _bn_product_columns(batch, n, 0, n, work + q * plane, &zs[layer, 0, 0],
                                                &inv_std[layer, 0], &local_sums[item, 0])
                        _gemm(c'N', c'N', <int> n, <int> rows, <int> n, <floating> 1, &weights[layer, 0, 0],
                              <int> n, work, <int> n, <floating> 0, other, <int> n)
                        for i in range(rows * n):
                            if has_residual:
                                t[i] = t[i] + other[i]
                            else:
                                t[i] = other[i]
                _scatter(batch, k, n, v0, v1, t, &vectors[0, 0, 0])
