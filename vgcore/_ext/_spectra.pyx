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

The layer's forward and JVP steps are vgcore/_layers.pxd's, the very code
vgcore._kernels runs.
"""

from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.math cimport INFINITY, fabs, log, sqrt
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from scipy.linalg.cython_lapack cimport dgeqrf, dorgqr, sgeqrf, sorgqr

from vgcore._ext._layers cimport NORM_PRE, _block_start, _forward_layer, _jvp_layer


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
