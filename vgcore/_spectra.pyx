# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Compiled Lyapunov spectra of deep stacks: k tangents pushed through every layer, QR after each.

For each sample b the k tangents start as the first k standard basis vectors
e_1..e_k.  Layer l maps them with its Jacobian J_l(x_{l-1}) (the same JVP as
vgcore._kernels), then a Householder QR, T = Q R, replaces them by the k
orthonormal columns of Q and adds log|R_ii| to log_growth[b, i].  Because Q
has unit columns after every layer, nothing underflows or overflows at any
depth; log_growth / L are the (unsorted) Lyapunov exponents.  A direction the
layer maps to exactly zero gives R_ii = 0 and log_growth = -inf.

Conventions as in vgcore._kernels (the Python layer in vgcore.spectra
guarantees them; nothing here checks or raises): C-contiguous arrays of one
floating dtype (float32 or float64) except log_growth (float64); weights
(L, n, n) in (out, in) layout; 1 <= k <= n.

Layout trick: a sample's k tangents are k contiguous rows of n values, a
row-major (k, n) block; that is exactly the column-major (n, k) matrix whose
columns are the tangents, which LAPACK's ?geqrf / ?orgqr factor in place with
lda = n, so no transpose is ever made.  R_ii then sits at row i, column i of
the block.

Parallelism: the batch is cut into n_blocks contiguous blocks of samples
(chosen by the caller from the machine, never from the thread count), each
block runs through every layer on its own, OpenMP threads take blocks, and
each thread mallocs its workspace inside the parallel region.  Results are
bitwise the same for any number of threads.  The caller holds BLAS / LAPACK
to one thread meanwhile.

The layer's forward and JVP steps below are copies of the inline pieces of
vgcore/_kernels.pyx (_forward_layer, _jvp_layer and their helpers), kept in
step by the tests that hold both extensions to the same NumPy reference; a
shared .pxd would let this module cimport them instead.
"""

from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.math cimport INFINITY, fabs, log, sqrt
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from scipy.linalg.cython_blas cimport dgemm, sgemm
from scipy.linalg.cython_lapack cimport dgeqrf, dorgqr, sgeqrf, sorgqr


cdef extern from "vg_activations.h" nogil:
    void vg_bias_activation_block_d(int kind, long rows, long n, double *h, const double *bias,
                                    double *derivative)
    void vg_bias_activation_block_f(int kind, long rows, long n, float *h, const float *bias,
                                    float *derivative)

cdef extern from "vg_stack.h" nogil:
    double LAYER_NORM_EPS "VG_LAYER_NORM_EPS"
    enum:
        NORM_NONE "VG_NORM_NONE"
        NORM_PRE "VG_NORM_PRE"
        NORM_POST "VG_NORM_POST"


# ---------------------------------------------------------------------------
# BLAS and the layer, copied from vgcore/_kernels.pyx (row-major conventions there)
# ---------------------------------------------------------------------------

cdef inline void _gemm(char transa, char transb, int m, int n, int k, floating alpha,
                       const floating *a, int lda, const floating *b, int ldb, floating beta,
                       floating *c, int ldc) noexcept nogil:
    if floating is double:
        dgemm(&transa, &transb, &m, &n, &k, &alpha, <double *> a, &lda, <double *> b, &ldb,
              &beta, c, &ldc)
    else:
        sgemm(&transa, &transb, &m, &n, &k, &alpha, <float *> a, &lda, <float *> b, &ldb,
              &beta, c, &ldc)


cdef inline void _rows_times_weight_t(Py_ssize_t rows, Py_ssize_t n, const floating *u,
                                      const floating *weight, floating *out) noexcept nogil:
    """out (rows, n) = u (rows, n) @ weight.T, weight (out, in)."""
    _gemm(c'T', c'N', <int> n, <int> rows, <int> n, <floating> 1, weight, <int> n, u, <int> n,
          <floating> 0, out, <int> n)


cdef inline void _activation_block(int kind, Py_ssize_t rows, Py_ssize_t n, floating *h,
                                   const floating *bias, floating *derivative) noexcept nogil:
    if floating is double:
        vg_bias_activation_block_d(kind, rows, n, h, bias, derivative)
    else:
        vg_bias_activation_block_f(kind, rows, n, h, bias, derivative)


cdef inline void _layer_norm_rows(Py_ssize_t rows, Py_ssize_t n, const floating *v, floating *out,
                                  floating *mean_out, floating *inv_std_out) noexcept nogil:
    """out[r] = (v[r] - mean) * inv_std; out may alias v; mean_out may be NULL."""
    cdef Py_ssize_t r, i
    cdef double total, centred, var
    cdef floating mean, inv_std
    for r in range(rows):
        total = 0
        for i in range(n):
            total = total + v[r * n + i]
        mean = <floating> (total / n)
        var = 0
        for i in range(n):
            centred = <double> (v[r * n + i] - mean)
            var = var + centred * centred
        inv_std = <floating> (1.0 / sqrt(var / n + LAYER_NORM_EPS))
        for i in range(n):
            out[r * n + i] = (v[r * n + i] - mean) * inv_std
        if mean_out != NULL:
            mean_out[r] = mean
        inv_std_out[r] = inv_std


cdef inline void _layer_norm_product(Py_ssize_t rows, Py_ssize_t n, Py_ssize_t per_sample,
                                     floating *g, const floating *normalised,
                                     const floating *inv_std) noexcept nogil:
    """In place, g[r] <- J_LN g[r]; row r belongs to sample r // per_sample."""
    cdef Py_ssize_t r, i, s
    cdef double g_mean, gx_mean
    for r in range(rows):
        s = r // per_sample
        g_mean = 0
        gx_mean = 0
        for i in range(n):
            g_mean = g_mean + g[r * n + i]
            gx_mean = gx_mean + <double> g[r * n + i] * normalised[s * n + i]
        g_mean = g_mean / n
        gx_mean = gx_mean / n
        for i in range(n):
            g[r * n + i] = inv_std[s] * <floating> (g[r * n + i] - g_mean - normalised[s * n + i] * gx_mean)


cdef void _forward_layer(Py_ssize_t rows, Py_ssize_t n, int activation, bint has_residual,
                         floating residual, int norm, const floating *weight, const floating *bias,
                         const floating *x, floating *out, floating *derivative, floating *u_work,
                         floating *mean_pre, floating *inv_pre, floating *inv_post) noexcept nogil:
    """x (rows, n) -> out (rows, n), keeping phi'(h), LN(x) in u_work (pre) and the LN statistics."""
    cdef const floating *u = x
    cdef Py_ssize_t i, size = rows * n
    if norm == NORM_PRE:
        _layer_norm_rows(rows, n, x, u_work, mean_pre, inv_pre)
        u = u_work
    _rows_times_weight_t(rows, n, u, weight, out)
    _activation_block(activation, rows, n, out, bias, derivative)
    if has_residual:
        for i in range(size):
            out[i] = x[i] + residual * out[i]
    if norm == NORM_POST:
        _layer_norm_rows(rows, n, out, out, <floating *> NULL, inv_post)


cdef void _jvp_layer(Py_ssize_t rows, Py_ssize_t n, Py_ssize_t per_sample, bint has_residual,
                     floating residual, int norm, const floating *weight, const floating *u,
                     const floating *out, const floating *derivative, const floating *inv_pre,
                     const floating *inv_post, floating *t, floating *work,
                     floating *work2) noexcept nogil:
    """Tangents t (rows, n) at the layer input -> at its output, in place (work, work2: scratch)."""
    cdef Py_ssize_t r, i, s
    cdef const floating *t_u = t
    if norm == NORM_PRE:
        memcpy(work, t, rows * n * sizeof(floating))
        _layer_norm_product(rows, n, per_sample, work, u, inv_pre)
        t_u = work
    _rows_times_weight_t(rows, n, t_u, weight, work2)
    for r in range(rows):
        s = r // per_sample
        for i in range(n):
            if has_residual:
                t[r * n + i] = t[r * n + i] + residual * (derivative[s * n + i] * work2[r * n + i])
            else:
                t[r * n + i] = derivative[s * n + i] * work2[r * n + i]
    if norm == NORM_POST:
        _layer_norm_product(rows, n, per_sample, t, out, inv_post)


cdef inline Py_ssize_t _block_start(Py_ssize_t block, Py_ssize_t n_blocks,
                                    Py_ssize_t total) noexcept nogil:
    """Start of block ``block`` in a contiguous, balanced partition of range(total)."""
    return (block * total) // n_blocks


# ---------------------------------------------------------------------------
# LAPACK: QR of a sample's tangents in place
# ---------------------------------------------------------------------------

cdef inline int _householder_qr(int n, int k, floating *a, floating *tau, floating *work,
                                int lwork) noexcept nogil:
    """a (n, k) column-major = Q R: R in the upper triangle, Householder vectors below (?geqrf)."""
    cdef int info = 0
    if floating is double:
        dgeqrf(&n, &k, a, &n, tau, work, &lwork, &info)
    else:
        sgeqrf(&n, &k, a, &n, tau, work, &lwork, &info)
    return info


cdef inline int _form_q(int n, int k, floating *a, floating *tau, floating *work,
                        int lwork) noexcept nogil:
    """Overwrite the factored a (n, k) with the k orthonormal columns of Q (?orgqr)."""
    cdef int info = 0
    if floating is double:
        dorgqr(&n, &k, &k, a, &n, tau, work, &lwork, &info)
    else:
        sorgqr(&n, &k, &k, a, &n, tau, work, &lwork, &info)
    return info


cdef int _qr_workspace(floating probe, int n, int k) noexcept nogil:
    """The larger of ?geqrf's and ?orgqr's optimal lwork for an (n, k) matrix (LAPACK's query).

    ``probe`` only selects the dtype.
    """
    cdef floating a = 0, tau = 0, geqrf_size = 0, orgqr_size = 0
    cdef int query = -1, info = 0
    if floating is double:
        dgeqrf(&n, &k, &a, &n, &tau, &geqrf_size, &query, &info)
        dorgqr(&n, &k, &k, &a, &n, &tau, &orgqr_size, &query, &info)
    else:
        sgeqrf(&n, &k, &a, &n, &tau, &geqrf_size, &query, &info)
        sorgqr(&n, &k, &k, &a, &n, &tau, &orgqr_size, &query, &info)
    return max(<int> geqrf_size, <int> orgqr_size, k, 1)


cdef int _renormalise_tangents(Py_ssize_t samples, Py_ssize_t n, Py_ssize_t k, floating *t,
                               floating *tau, floating *work, int lwork,
                               double *log_growth) noexcept nogil:
    """For each sample's (k, n) block of t: t <- Q, log_growth[s, i] += log|R_ii|.

    log_growth is (samples, k), row stride k.  Returns LAPACK's first nonzero
    info (an illegal argument; never expected), else 0.
    """
    cdef Py_ssize_t s, i
    cdef floating *block
    cdef int info
    for s in range(samples):
        block = t + s * k * n
        info = _householder_qr(<int> n, <int> k, block, tau, work, lwork)
        if info != 0:
            return info
        for i in range(k):
            # a zero diagonal (a direction mapped to exactly 0) records -inf; Q stays orthonormal
            if block[i * n + i] != 0:
                log_growth[s * k + i] = log_growth[s * k + i] + log(fabs(<double> block[i * n + i]))
            else:
                log_growth[s * k + i] = -INFINITY
        info = _form_q(<int> n, <int> k, block, tau, work, lwork)
        if info != 0:
            return info
    return 0


# ---------------------------------------------------------------------------
# Lyapunov log growth
# ---------------------------------------------------------------------------

def lyapunov_log_growth(const floating[:, :, ::1] weights, const floating[:, ::1] biases,
                        const floating[:, ::1] x, int activation, bint has_residual, double residual,
                        int norm, double[:, ::1] log_growth, int[::1] status, Py_ssize_t n_blocks,
                        int n_threads):
    """log_growth (B, k) <- sum over layers of log|R_ii| of the renormalised tangents.

    Tangents start as e_1..e_k (k = log_growth.shape[1]).  status (n_blocks,)
    receives LAPACK's info per block (0: success); the caller checks it.
    """
    cdef Py_ssize_t depth = weights.shape[0], n = weights.shape[1], batch = x.shape[0]
    cdef Py_ssize_t k = log_growth.shape[1]
    cdef Py_ssize_t block, start, stop, samples, layer, s, i
    cdef Py_ssize_t max_samples = (batch + n_blocks - 1) // n_blocks
    cdef Py_ssize_t plane = max_samples * n, tangent_plane = max_samples * k * n
    cdef floating probe = 0
    cdef int lwork = _qr_workspace(probe, <int> n, <int> k)
    cdef int info
    cdef floating res = <floating> residual
    cdef floating *buffer = NULL
    cdef floating *current
    cdef floating *following
    cdef floating *swap
    cdef floating *derivative
    cdef floating *u_work
    cdef floating *stats
    cdef floating *tangents
    cdef floating *scratch
    cdef floating *tau
    cdef floating *lapack_work
    # per thread: x, x' | phi'(h) | LN(x) | mean, inv_pre, inv_post | tangents | 2 JVP scratch | tau | LAPACK
    cdef Py_ssize_t size = 4 * plane + 3 * max_samples + 3 * tangent_plane + k + lwork
    with nogil, parallel(num_threads=max(1, min(<Py_ssize_t> n_threads, n_blocks))):
        buffer = <floating *> malloc(size * sizeof(floating))
        for block in prange(n_blocks, schedule='static'):
            start = _block_start(block, n_blocks, batch)
            stop = _block_start(block + 1, n_blocks, batch)
            samples = stop - start
            if buffer == NULL:
                status[block] = -1000  # out of memory: reported by the caller
                continue
            current = buffer
            following = current + plane
            derivative = following + plane
            u_work = derivative + plane
            stats = u_work + plane
            tangents = stats + 3 * max_samples
            scratch = tangents + tangent_plane
            tau = scratch + 2 * tangent_plane
            lapack_work = tau + k
            memcpy(current, &x[start, 0], samples * n * sizeof(floating))
            memset(tangents, 0, samples * k * n * sizeof(floating))
            for s in range(samples):
                for i in range(k):
                    tangents[(s * k + i) * n + i] = 1
            memset(&log_growth[start, 0], 0, samples * k * sizeof(double))
            info = 0
            for layer in range(depth):
                _forward_layer(samples, n, activation, has_residual, res, norm,
                               &weights[layer, 0, 0], &biases[layer, 0], current, following,
                               derivative, u_work, stats, stats + max_samples,
                               stats + 2 * max_samples)
                _jvp_layer(samples * k, n, k, has_residual, res, norm, &weights[layer, 0, 0],
                           u_work if norm == NORM_PRE else current, following, derivative,
                           stats + max_samples, stats + 2 * max_samples, tangents, scratch,
                           scratch + tangent_plane)
                info = _renormalise_tangents(samples, n, k, tangents, tau, lapack_work, lwork,
                                             &log_growth[start, 0])
                if info != 0:
                    break
                swap = current
                current = following
                following = swap
            status[block] = info
        free(buffer)
