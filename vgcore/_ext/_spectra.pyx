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
to one thread meanwhile.  A workspace that cannot be allocated raises
MemoryError after the parallel region.

The layer's forward and JVP steps are vgcore/_layers.pxd's, the very code
vgcore._kernels runs.
"""

from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.math cimport INFINITY, fabs, log
from libc.string cimport memcpy, memset

from vgcore._ext._layers cimport (
    NORM_PRE,
    Workspace,
    _block_start,
    _form_q,
    _forward_layer,
    _householder_qr,
    _jvp_layer,
    _measuring,
    _piece,
    _qr_workspace,
    _scale_rows,
    _workspace_allocate,
    _workspace_free,
)

# The tests' way to the MemoryError paths: parallel regions still to let through before every
# workspace allocation of this module fails; -1: never fail.
cdef Py_ssize_t _regions_before_failure = -1


def _fail_allocations_for_tests(bint fail, Py_ssize_t after=0):
    """For tests: make workspace allocations fail (True) or work again (False).

    With ``after`` = m the first m parallel regions of this module's kernels
    (counted across calls, in program order) still allocate, so that a
    kernel's later regions can be made to fail too.
    """
    global _regions_before_failure
    _regions_before_failure = after if fail else -1


cdef bint _refuse_workspaces():
    """Whether the next parallel region's workspace allocations are to fail (the test switch)."""
    global _regions_before_failure
    if _regions_before_failure < 0:
        return False
    if _regions_before_failure == 0:
        return True
    _regions_before_failure -= 1
    return False


# ---------------------------------------------------------------------------
# QR of a sample's tangents in place (LAPACK wrappers in _layers.pxd)
# ---------------------------------------------------------------------------

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

cdef void _lyapunov_pieces(Workspace *space, Py_ssize_t samples, Py_ssize_t n, Py_ssize_t k,
                           int lwork, floating **ping, floating **pong,
                           floating **derivative, floating **u_work, floating **mean_pre,
                           floating **inv_pre, floating **inv_post, floating **tangents,
                           floating **work, floating **work2, floating **tau,
                           floating **lapack_work, double **exps) noexcept nogil:
    """lyapunov_log_growth's workspace for blocks of up to ``samples`` samples.

    Two layer outputs in turn (ping, pong; a block starts from ping), a
    layer's phi'(h), LN(x) for pre-norm (samples, n) and LN statistics
    (samples,); the tangents (samples, k, n) and _jvp_layer's scratch work
    and work2 of their size; ?geqrf's tau (k,) and LAPACK's lwork values;
    the exponents of ping's and pong's rows, exps (2, samples).
    """
    cdef floating kind = 0
    ping[0] = _piece(space, samples * n, kind)
    pong[0] = _piece(space, samples * n, kind)
    derivative[0] = _piece(space, samples * n, kind)
    u_work[0] = _piece(space, samples * n, kind)
    mean_pre[0] = _piece(space, samples, kind)
    inv_pre[0] = _piece(space, samples, kind)
    inv_post[0] = _piece(space, samples, kind)
    tangents[0] = _piece(space, samples * k * n, kind)
    work[0] = _piece(space, samples * k * n, kind)
    work2[0] = _piece(space, samples * k * n, kind)
    tau[0] = _piece(space, k, kind)
    lapack_work[0] = _piece(space, lwork, kind)
    exps[0] = _piece(space, 2 * samples, <double> 0)


def lyapunov_log_growth(const floating[:, :, ::1] weights, const floating[:, ::1] biases,
                        const floating[:, ::1] x, int activation, bint has_residual, double residual,
                        int norm, double[:, ::1] log_growth, int[::1] status, Py_ssize_t n_blocks,
                        int n_threads):
    """log_growth (B, k) <- sum over layers of log|R_ii| of the renormalised tangents.

    Tangents start as e_1..e_k (k = log_growth.shape[1]).  status (n_blocks,)
    receives LAPACK's info per block (0: success); the caller checks it.
    Raises MemoryError when a thread's workspace cannot be allocated.
    """
    cdef Py_ssize_t depth = weights.shape[0], n = weights.shape[1], batch = x.shape[0]
    cdef Py_ssize_t k = log_growth.shape[1]
    cdef Py_ssize_t block, start, stop, samples, layer, s, i
    cdef Py_ssize_t max_samples = (batch + n_blocks - 1) // n_blocks
    cdef floating probe = 0
    cdef int lwork = _qr_workspace(probe, <int> n, <int> k)
    cdef int info
    cdef floating res = <floating> residual
    cdef floating *ping
    cdef floating *pong
    cdef floating *current
    cdef floating *following
    cdef floating *swap
    cdef floating *derivative
    cdef floating *u_work
    cdef floating *mean_pre
    cdef floating *inv_pre
    cdef floating *inv_post
    cdef floating *tangents
    cdef floating *work
    cdef floating *work2
    cdef floating *tau
    cdef floating *lapack_work
    cdef double *exps
    cdef double *exp_current
    cdef double *exp_following
    cdef double *exp_swap
    cdef bint refuse
    cdef int failed = 0
    cdef int *failure = &failed
    cdef Workspace space = _measuring()
    _lyapunov_pieces(&space, max_samples, n, k, lwork, &ping, &pong, &derivative, &u_work,
                     &mean_pre, &inv_pre, &inv_post, &tangents, &work, &work2, &tau, &lapack_work,
                     &exps)
    cdef size_t size = space.used
    refuse = _refuse_workspaces()
    with nogil, parallel(num_threads=max(1, min(<Py_ssize_t> n_threads, n_blocks))):
        # assigned in the region, so each thread has its own (Cython makes them private)
        ping = pong = derivative = u_work = mean_pre = inv_pre = inv_post = NULL
        tangents = work = work2 = tau = lapack_work = NULL
        exps = NULL
        space = _workspace_allocate(size, refuse)
        if space.base == NULL:
            failure[0] = 1
        else:
            _lyapunov_pieces(&space, max_samples, n, k, lwork, &ping, &pong, &derivative,
                             &u_work, &mean_pre, &inv_pre, &inv_post, &tangents, &work, &work2, &tau,
                             &lapack_work, &exps)
        for block in prange(n_blocks, schedule='static'):
            if space.base == NULL:
                continue
            start = _block_start(block, n_blocks, batch)
            stop = _block_start(block + 1, n_blocks, batch)
            samples = stop - start
            current = ping
            following = pong
            exp_current = exps
            exp_following = exps + max_samples
            memcpy(current, &x[start, 0], samples * n * sizeof(floating))
            memset(exp_current, 0, samples * sizeof(double))
            _scale_rows(samples, n, current, exp_current)
            memset(tangents, 0, samples * k * n * sizeof(floating))
            for s in range(samples):
                for i in range(k):
                    tangents[(s * k + i) * n + i] = 1
            memset(&log_growth[start, 0], 0, samples * k * sizeof(double))
            info = 0
            for layer in range(depth):
                _forward_layer(samples, n, activation, has_residual, res, norm,
                               &weights[layer, 0, 0], &biases[layer, 0], current, following,
                               derivative, u_work, mean_pre, inv_pre, inv_post, exp_current, exp_following)
                _jvp_layer(samples * k, n, k, has_residual, res, norm, &weights[layer, 0, 0],
                           u_work if norm == NORM_PRE else current, following, derivative, inv_pre,
                           inv_post, tangents, work, work2, exp_current, exp_following)
                info = _renormalise_tangents(samples, n, k, tangents, tau, lapack_work, lwork,
                                             &log_growth[start, 0])
                if info != 0:
                    break
                swap = current
                current = following
                following = swap
                exp_swap = exp_current
                exp_current = exp_following
                exp_following = exp_swap
            status[block] = info
        _workspace_free(&space)
    if failed:
        raise MemoryError(f"lyapunov_log_growth: could not allocate {size} bytes of workspace per thread")
