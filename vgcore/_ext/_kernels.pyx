"""Compiled CPU kernels of vgcore: forward, backward and Jacobian products of deep stacks.

Conventions (the Python layer in vgcore._api guarantees them; nothing here
checks them):
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

Workspaces: each thread mallocs one workspace inside the parallel region and
carves it into named pieces with the kernel's layout function (``_*_pieces``,
see vgcore/_ext/_layers.pxd), measured once before the region.  When a
thread's allocation fails, the threads skip their work and the kernel raises
MemoryError after the region; nothing else here raises.

Row-major (B, n) blocks are handed to Fortran BLAS as their column-major
transposes (n, B), so ``H = U @ W.T`` is ``gemm('T', 'N')`` on (W, U) and
``G_u = G_h @ W`` is ``gemm('N', 'N')`` on (W, G_h).
"""

from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.math cimport INFINITY, M_LN2, exp
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
    VG_SCALE_RANGE_D,
    VG_SCALE_RANGE_F,
    Workspace,
    _activation_block,
    _block_start,
    _forward_layer,
    _gemm,
    _gram_upper,
    _jvp_layer,
    _log_norm_of_outer_sum,
    _measuring,
    _piece,
    _recompute_pre_norm,
    _renormalise_rows,
    _scale_rows,
    _true_rows,
    _vjp_layer,
    _workspace_allocate,
    _workspace_free,
)


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


cdef object _workspace_error(str kernel, size_t size):
    return MemoryError(f"{kernel}: could not allocate {size} bytes of workspace per thread")


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
        "SCALE_RANGE": {"float64": VG_SCALE_RANGE_D, "float32": VG_SCALE_RANGE_F},
    }


def activation_values(int activation, floating[::1] h, floating[::1] value, floating[::1] derivative):
    """phi(h) into value and phi'(h) into derivative, straight from csrc/vg_activations.h (for tests)."""
    cdef Py_ssize_t n = h.shape[0]
    cdef floating zero = 0
    if n > 0:
        memcpy(&value[0], &h[0], n * sizeof(floating))
        _activation_block(activation, n, 1, &value[0], &zero, &derivative[0])


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

cdef void _forward_pieces(Workspace *space, Py_ssize_t rows, Py_ssize_t n, floating **ping,
                          floating **pong, floating **derivative, floating **u_work,
                          floating **mean_pre, floating **inv_pre, floating **inv_post,
                          double **exps) noexcept nogil:
    """forward's workspace for blocks of up to ``rows`` samples.

    Two layer outputs in turn (ping, pong), and one layer's phi'(h), LN(x)
    for pre-norm and LN statistics, all (rows, n) or (rows,); the exponents
    of ping's and pong's rows, exps (2, rows).
    """
    cdef floating kind = 0
    ping[0] = _piece(space, rows * n, kind)
    pong[0] = _piece(space, rows * n, kind)
    derivative[0] = _piece(space, rows * n, kind)
    u_work[0] = _piece(space, rows * n, kind)
    mean_pre[0] = _piece(space, rows, kind)
    inv_pre[0] = _piece(space, rows, kind)
    inv_post[0] = _piece(space, rows, kind)
    exps[0] = _piece(space, 2 * rows, <double> 0)


def forward(const floating[:, :, ::1] weights, const floating[:, ::1] biases,
            const floating[:, ::1] x, int activation, bint has_residual, double residual, int norm,
            floating[:, ::1] out, Py_ssize_t n_blocks, int n_threads):
    """x_L of a stack for inputs x (B, n) into out (B, n), in n_blocks blocks of samples.

    Raises MemoryError when a thread's workspace cannot be allocated (out is then incomplete).
    """
    cdef Py_ssize_t depth = weights.shape[0], n = weights.shape[1], batch = x.shape[0]
    cdef Py_ssize_t block, start, stop, rows, layer, max_rows = (batch + n_blocks - 1) // n_blocks
    cdef floating *ping
    cdef floating *pong
    cdef floating *derivative
    cdef floating *u_work
    cdef floating *mean_pre
    cdef floating *inv_pre
    cdef floating *inv_post
    cdef double *exps
    cdef const floating *source
    cdef floating *target
    cdef floating res = <floating> residual
    cdef bint refuse
    cdef int failed = 0
    cdef int *failure = &failed
    cdef Workspace space = _measuring()
    _forward_pieces(&space, max_rows, n, &ping, &pong, &derivative, &u_work, &mean_pre, &inv_pre,
                    &inv_post, &exps)
    cdef size_t size = space.used
    refuse = _refuse_workspaces()
    with nogil, parallel(num_threads=max(1, min(<Py_ssize_t> n_threads, n_blocks))):
        # assigned in the region, so each thread has its own (Cython makes them private)
        ping = pong = derivative = u_work = mean_pre = inv_pre = inv_post = NULL
        exps = NULL
        space = _workspace_allocate(size, refuse)
        if space.base == NULL:
            failure[0] = 1
        else:
            _forward_pieces(&space, max_rows, n, &ping, &pong, &derivative, &u_work, &mean_pre,
                            &inv_pre, &inv_post, &exps)
        for block in prange(n_blocks, schedule='static'):
            if space.base == NULL:
                continue
            start = _block_start(block, n_blocks, batch)
            stop = _block_start(block + 1, n_blocks, batch)
            rows = stop - start
            # the inputs, scaled where below the floats, start from pong (layer 0 writes ping)
            memcpy(pong, &x[start, 0], rows * n * sizeof(floating))
            memset(exps + max_rows, 0, rows * sizeof(double))
            _scale_rows(rows, n, pong, exps + max_rows)
            source = pong
            for layer in range(depth):
                target = &out[start, 0] if layer == depth - 1 else (ping if layer % 2 == 0 else pong)
                _forward_layer(rows, n, activation, has_residual, res, norm, &weights[layer, 0, 0],
                               &biases[layer, 0], source, target, derivative, u_work, mean_pre,
                               inv_pre, inv_post, exps + (max_rows if layer % 2 == 0 else 0),
                               exps + (0 if layer % 2 == 0 else max_rows))
                source = target
            _true_rows(rows, n, &out[start, 0], exps + (0 if (depth - 1) % 2 == 0 else max_rows))
        _workspace_free(&space)
    if failed:
        raise _workspace_error("forward", size)


# ---------------------------------------------------------------------------
# Gradient profile
# ---------------------------------------------------------------------------

cdef void _forward_layers(Py_ssize_t count, Py_ssize_t n, Py_ssize_t batch, Py_ssize_t start,
                          Py_ssize_t rows, int activation, bint has_residual, floating res, int norm,
                          const floating *weights, const floating *biases, floating *xs,
                          floating *derivatives, floating *mean_pre, floating *inv_pre,
                          floating *inv_post, long long *saturated, unsigned char *alive,
                          floating *u_work, double *x_exps) noexcept nogil:
    """Forward of samples [start, start + rows) through ``count`` consecutive layers, keeping all.

    weights / biases point at the first layer's parameters; xs holds count+1
    planes (B, n) whose first already holds the input rows, with their
    exponents in x_exps (count+1, B) (_scale_rows); derivatives count planes;
    mean_pre / inv_pre / inv_post count rows of B.  saturated (count,) and
    alive (count, n) accumulate this block's counts unless NULL.
    """
    cdef Py_ssize_t layer, plane = batch * n
    for layer in range(count):
        _forward_layer(rows, n, activation, has_residual, res, norm, weights + layer * n * n,
                       biases + layer * n, xs + layer * plane + start * n,
                       xs + (layer + 1) * plane + start * n, derivatives + layer * plane + start * n,
                       u_work, mean_pre + layer * batch + start, inv_pre + layer * batch + start,
                       inv_post + layer * batch + start, x_exps + layer * batch + start,
                       x_exps + (layer + 1) * batch + start)
        if saturated != NULL:
            _count_derivatives(rows, n, derivatives + layer * plane + start * n, saturated + layer,
                               alive + layer * n)


cdef void _backward_layers(Py_ssize_t count, Py_ssize_t first, Py_ssize_t depth, Py_ssize_t n,
                           Py_ssize_t batch, Py_ssize_t start, Py_ssize_t rows, bint has_residual,
                           floating res, int norm, const floating *weights, const floating *xs,
                           floating *derivatives, const floating *mean_pre, const floating *inv_pre,
                           const floating *inv_post, double *log_scale_h, double *log_grad_norm,
                           floating *g, double *log_scale, floating *work,
                           floating *u_work, const double *x_exps) noexcept nogil:
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
                   derivatives + layer * plane + start * n, work, u_work, x_exps + layer * batch + start,
                   x_exps + (layer + 1) * batch + start)
        _renormalise_rows(rows, n, g, log_scale, log_grad_norm + start * (depth + 1) + first + layer,
                          depth + 1)


cdef void _profile_block(Py_ssize_t depth, Py_ssize_t n, Py_ssize_t batch, Py_ssize_t start,
                         Py_ssize_t rows, int activation, bint has_residual, floating res, int norm,
                         const floating *weights, const floating *biases, const floating *x,
                         const floating *grad_output, floating *xs, floating *derivatives,
                         floating *mean_pre, floating *inv_pre, floating *inv_post, double *log_scale_h,
                         double *log_grad_norm, long long *saturated, unsigned char *alive,
                         floating *g, floating *work, floating *u_work,
                         double *log_scale, double *x_exps) noexcept nogil:
    """Forward and renormalised backward of samples [start, start + rows) through every layer.

    Layouts: weights (L, n, n), biases (L, n), x and grad_output (B, n), xs
    (L+1, B, n), derivatives (L, B, n) (phi'(h), then the unit-scaled
    cotangents at h), mean_pre / inv_pre / inv_post / log_scale_h (L, B),
    log_grad_norm (B, L+1); saturated (L,) and alive (L, n) accumulate this
    block's counts.  Scratch (_profile_pieces): the cotangent g, work and
    u_work (rows, n), and g's log scales log_scale (rows,).  x_exps (L+1, B):
    the exponents of the rows of xs (_scale_rows).
    """
    memcpy(xs + start * n, x + start * n, rows * n * sizeof(floating))
    memset(x_exps + start, 0, rows * sizeof(double))
    _scale_rows(rows, n, xs + start * n, x_exps + start)
    _forward_layers(depth, n, batch, start, rows, activation, has_residual, res, norm, weights, biases,
                    xs, derivatives, mean_pre, inv_pre, inv_post, saturated, alive, u_work, x_exps)
    memcpy(g, grad_output + start * n, rows * n * sizeof(floating))
    memset(log_scale, 0, rows * sizeof(double))
    _renormalise_rows(rows, n, g, log_scale, log_grad_norm + start * (depth + 1) + depth, depth + 1)
    _backward_layers(depth, 0, depth, n, batch, start, rows, has_residual, res, norm, weights, xs,
                     derivatives, mean_pre, inv_pre, inv_post, log_scale_h, log_grad_norm, g, log_scale,
                     work, u_work, x_exps)


cdef void _profile_pieces(Workspace *space, Py_ssize_t rows, Py_ssize_t n, floating **g,
                          floating **work, floating **u_work, double **log_scale) noexcept nogil:
    """_profile_block's scratch for blocks of up to ``rows`` samples."""
    cdef floating kind = 0
    g[0] = _piece(space, rows * n, kind)
    work[0] = _piece(space, rows * n, kind)
    u_work[0] = _piece(space, rows * n, kind)
    log_scale[0] = _piece(space, rows, <double> 0)


cdef void _weight_gradient_pieces(Workspace *space, Py_ssize_t batch, Py_ssize_t n,
                                  floating **scratch) noexcept nogil:
    """The weight-gradient norms' workspace: _weight_gradient_norm's scratch for one layer."""
    cdef floating kind = 0
    scratch[0] = _piece(space, _weight_gradient_scratch(batch, n), kind)


cdef inline Py_ssize_t _weight_gradient_scratch(Py_ssize_t batch, Py_ssize_t n) noexcept nogil:
    """Values of scratch _weight_gradient_norm needs."""
    return 2 * batch * n + 2 * (batch * batch if batch < n else n * n)


cdef inline double _linear_input_exponent(int norm, double x_exp) noexcept nogil:
    """The exponent of a layer's linear input u given its input's: LN(x) beyond the floats is true values."""
    return 0 if norm == NORM_PRE and x_exp > 0 else x_exp


cdef double _weight_gradient_norm(Py_ssize_t batch, Py_ssize_t n, int norm,
                                  const floating *cotangents_h, const floating *x_in,
                                  const floating *mean_pre, const floating *inv_pre,
                                  const double *log_scale_h, const double *u_exp,
                                  floating *scratch) noexcept nogil:
    """log ||sum_b exp(s_b) g_b u_b^T||_F of one layer.

    g_b (B, n) are the unit-scaled cotangents at h with log scales s_b, u_b
    the layer's linear inputs (recomputed from its input x_in for pre-norm),
    scaled rows: s_b gains e_b log 2, e_b the exponent of u_b
    (_linear_input_exponent of x_in's exponent u_exp).
    Samples are weighted by exp(s_b - max s), so the sum is exact whatever
    the spread of scales; the norm of the weighted sum comes from
    _layers._log_norm_of_outer_sum (U scaled so its squares cannot underflow;
    Gram matrices when B < n).
    """
    cdef Py_ssize_t b, i
    cdef floating *g = scratch
    cdef floating *u = scratch + batch * n
    cdef double top = -INFINITY, weight
    for b in range(batch):
        if log_scale_h[b] + _linear_input_exponent(norm, u_exp[b]) * M_LN2 > top:
            top = log_scale_h[b] + _linear_input_exponent(norm, u_exp[b]) * M_LN2
    for b in range(batch):
        weight = exp(log_scale_h[b] + _linear_input_exponent(norm, u_exp[b]) * M_LN2 - top)
        for i in range(n):
            g[b * n + i] = <floating> (weight * cotangents_h[b * n + i])
    if norm == NORM_PRE:
        _recompute_pre_norm(batch, n, x_in, mean_pre, inv_pre, u, u_exp)
    else:
        memcpy(u, x_in, batch * n * sizeof(floating))
    return top + _log_norm_of_outer_sum(batch, n, n, g, u, u + batch * n)


def gradient_profile(const floating[:, :, ::1] weights, const floating[:, ::1] biases,
                     const floating[:, ::1] x, const floating[:, ::1] grad_output, int activation,
                     bint has_residual, double residual, int norm,
                     floating[:, :, ::1] xs, floating[:, :, ::1] derivatives,
                     floating[:, ::1] mean_pre, floating[:, ::1] inv_pre, floating[:, ::1] inv_post,
                     double[:, ::1] log_scale_h, double[:, ::1] x_exp, double[:, ::1] log_grad_norm,
                     double[::1] log_weight_grad_norm, long long[:, ::1] saturated,
                     unsigned char[:, :, ::1] alive, int n_threads):
    """Forward, renormalised backward and weight-gradient norms of one stack.

    Workspaces (allocated by the caller): xs (L+1, B, n) the layer outputs,
    derivatives (L, B, n) phi'(h) and then the unit-scaled cotangents at h,
    mean_pre / inv_pre / inv_post (L, B) LN statistics, log_scale_h (L, B)
    the log scale of those cotangents, x_exp (L+1, B) the exponents of the
    rows of xs (the scaled forward pass, _layers._scale_rows).  Outputs: log_grad_norm (B, L+1),
    log_weight_grad_norm (L,), and per block of samples the saturated counts
    saturated (blocks, L) and the alive flags alive (blocks, L, n) (zeroed by
    the caller), which the caller reduces into fractions.  The batch is cut
    into saturated.shape[0] blocks, which threads share out; then the
    weight-gradient norms run in parallel over layers.  Raises MemoryError
    when a thread's workspace cannot be allocated.
    """
    cdef Py_ssize_t depth = weights.shape[0], n = weights.shape[1], batch = x.shape[0]
    cdef Py_ssize_t n_blocks = saturated.shape[0]
    cdef Py_ssize_t block, start
    cdef Py_ssize_t max_rows = (batch + n_blocks - 1) // n_blocks
    cdef floating *g
    cdef floating *work
    cdef floating *u_work
    cdef double *log_scale
    cdef floating res = <floating> residual
    cdef bint refuse
    cdef int failed = 0
    cdef int *failure = &failed
    cdef Workspace space = _measuring()
    _profile_pieces(&space, max_rows, n, &g, &work, &u_work, &log_scale)
    cdef size_t size = space.used
    refuse = _refuse_workspaces()
    with nogil, parallel(num_threads=max(1, min(<Py_ssize_t> n_threads, n_blocks))):
        # assigned in the region, so each thread has its own (Cython makes them private)
        g = work = u_work = NULL
        log_scale = NULL
        space = _workspace_allocate(size, refuse)
        if space.base == NULL:
            failure[0] = 1
        else:
            _profile_pieces(&space, max_rows, n, &g, &work, &u_work, &log_scale)
        for block in prange(n_blocks, schedule='static'):
            if space.base == NULL:
                continue
            start = _block_start(block, n_blocks, batch)
            _profile_block(depth, n, batch, start, _block_start(block + 1, n_blocks, batch) - start,
                           activation, has_residual, res, norm, &weights[0, 0, 0], &biases[0, 0],
                           &x[0, 0], &grad_output[0, 0], &xs[0, 0, 0], &derivatives[0, 0, 0],
                           &mean_pre[0, 0], &inv_pre[0, 0], &inv_post[0, 0], &log_scale_h[0, 0],
                           &log_grad_norm[0, 0], &saturated[block, 0], &alive[block, 0, 0],
                           g, work, u_work, log_scale, &x_exp[0, 0])
        _workspace_free(&space)
    if failed:
        raise _workspace_error("gradient_profile", size)
    _weight_gradient_norms(depth, batch, n, norm, &derivatives[0, 0, 0], &xs[0, 0, 0], &mean_pre[0, 0],
                           &inv_pre[0, 0], &log_scale_h[0, 0], &x_exp[0, 0], &log_weight_grad_norm[0],
                           n_threads, "gradient_profile")


cdef int _weight_gradient_norms(Py_ssize_t count, Py_ssize_t batch, Py_ssize_t n, int norm,
                                const floating *derivatives, const floating *xs,
                                const floating *mean_pre, const floating *inv_pre,
                                const double *log_scale_h, const double *x_exps, double *out,
                                int n_threads, str kernel) except -1:
    """out[l] <- _weight_gradient_norm of layer l, for ``count`` layers, in parallel over layers.

    The arrays are gradient_profile's workspaces from the first of the
    layers on: derivatives (holding the cotangents at h) and xs (count, B, n),
    mean_pre, inv_pre, log_scale_h and x_exps (count, B).  Raises MemoryError naming
    ``kernel`` when a thread's scratch cannot be allocated.
    """
    cdef Py_ssize_t layer, plane = batch * n
    cdef floating *scratch
    cdef bint refuse
    cdef int failed = 0
    cdef int *failure = &failed
    cdef Workspace space = _measuring()
    _weight_gradient_pieces(&space, batch, n, &scratch)
    cdef size_t size = space.used
    refuse = _refuse_workspaces()
    with nogil, parallel(num_threads=max(1, min(<Py_ssize_t> n_threads, count))):
        scratch = NULL  # assigned in the region, so each thread has its own
        space = _workspace_allocate(size, refuse)
        if space.base == NULL:
            failure[0] = 1
        else:
            _weight_gradient_pieces(&space, batch, n, &scratch)
        for layer in prange(count, schedule='dynamic'):
            if space.base == NULL:
                continue
            out[layer] = _weight_gradient_norm(batch, n, norm, derivatives + layer * plane,
                                               xs + layer * plane, mean_pre + layer * batch,
                                               inv_pre + layer * batch, log_scale_h + layer * batch,
                                               x_exps + layer * batch, scratch)
        _workspace_free(&space)
    if failed:
        raise _workspace_error(kernel, size)
    return 0


cdef void _segment_pieces(Workspace *space, Py_ssize_t rows, Py_ssize_t n, floating **work,
                          floating **u_work) noexcept nogil:
    """gradient_profile_segmented's scratch for blocks of up to ``rows`` samples: two (rows, n) blocks."""
    cdef floating kind = 0
    work[0] = _piece(space, rows * n, kind)
    u_work[0] = _piece(space, rows * n, kind)


def gradient_profile_segmented(const floating[:, :, ::1] weights, const floating[:, ::1] biases,
                               const floating[:, ::1] x, const floating[:, ::1] grad_output,
                               int activation, bint has_residual, double residual, int norm,
                               Py_ssize_t segment, floating[:, :, ::1] checkpoints,
                               floating[:, :, ::1] xs, floating[:, :, ::1] derivatives,
                               floating[:, ::1] mean_pre, floating[:, ::1] inv_pre,
                               floating[:, ::1] inv_post, double[:, ::1] log_scale_h,
                               double[:, ::1] checkpoint_exp, double[:, ::1] x_exp,
                               floating[:, ::1] g, double[::1] log_scale, double[:, ::1] log_grad_norm,
                               double[::1] log_weight_grad_norm, long long[:, ::1] saturated,
                               unsigned char[:, :, ::1] alive, int n_threads):
    """gradient_profile keeping activations only every ``segment`` layers.

    The forward pass stores x at layers 0, S, 2S, ... in checkpoints
    (ceil(L / S), B, n); the backward pass then runs segment by segment from
    the top, recomputing the segment's forward pass into the segment-sized
    workspaces xs (S+1, B, n), derivatives (S, B, n), mean_pre / inv_pre /
    inv_post / log_scale_h (S, B), and carrying the cotangent g (B, n) and
    its log scale (B,) from one segment to the next.  The exponents of the
    scaled rows (_layers._scale_rows) go with them: checkpoint_exp
    (ceil(L / S), B) and x_exp (S+1, B).  One extra forward pass
    for memory (L/S + 2S) B n instead of 2 L B n; the same operations as
    gradient_profile in the same order, so the results are bitwise equal.
    Raises MemoryError when a thread's workspace cannot be allocated.
    """
    cdef Py_ssize_t depth = weights.shape[0], n = weights.shape[1], batch = x.shape[0]
    cdef Py_ssize_t n_blocks = saturated.shape[0], n_segments = checkpoints.shape[0]
    cdef Py_ssize_t block, start, rows, seg, first, count
    cdef Py_ssize_t max_rows = (batch + n_blocks - 1) // n_blocks
    cdef floating *work
    cdef floating *u_work
    cdef floating res = <floating> residual
    cdef int threads = max(1, min(n_threads, n_blocks))
    cdef bint refuse
    cdef int failed = 0
    cdef int *failure = &failed
    cdef Workspace space = _measuring()
    _segment_pieces(&space, max_rows, n, &work, &u_work)
    cdef size_t size = space.used

    refuse = _refuse_workspaces()
    with nogil, parallel(num_threads=threads):
        work = u_work = NULL  # assigned in the region, so each thread has its own
        space = _workspace_allocate(size, refuse)
        if space.base == NULL:
            failure[0] = 1
        else:
            _segment_pieces(&space, max_rows, n, &work, &u_work)
        for block in prange(n_blocks, schedule='static'):
            if space.base == NULL:
                continue
            start = _block_start(block, n_blocks, batch)
            rows = _block_start(block + 1, n_blocks, batch) - start
            memcpy(&xs[0, start, 0], &x[start, 0], rows * n * sizeof(floating))
            memset(&x_exp[0, start], 0, rows * sizeof(double))
            _scale_rows(rows, n, &xs[0, start, 0], &x_exp[0, start])
            for seg in range(n_segments):
                first = seg * segment
                count = min(segment, depth - first)
                memcpy(&checkpoints[seg, start, 0], &xs[0, start, 0], rows * n * sizeof(floating))
                memcpy(&checkpoint_exp[seg, start], &x_exp[0, start], rows * sizeof(double))
                _forward_layers(count, n, batch, start, rows, activation, has_residual, res, norm,
                                &weights[first, 0, 0], &biases[first, 0], &xs[0, 0, 0],
                                &derivatives[0, 0, 0], &mean_pre[0, 0], &inv_pre[0, 0], &inv_post[0, 0],
                                &saturated[block, first], &alive[block, first, 0], u_work, &x_exp[0, 0])
                memcpy(&xs[0, start, 0], &xs[count, start, 0], rows * n * sizeof(floating))
                memcpy(&x_exp[0, start], &x_exp[count, start], rows * sizeof(double))
            memcpy(&g[start, 0], &grad_output[start, 0], rows * n * sizeof(floating))
            memset(&log_scale[start], 0, rows * sizeof(double))
            _renormalise_rows(rows, n, &g[start, 0], &log_scale[start], &log_grad_norm[start, depth],
                              depth + 1)
        _workspace_free(&space)
    if failed:
        raise _workspace_error("gradient_profile_segmented", size)

    for seg in range(n_segments - 1, -1, -1):
        first = seg * segment
        count = min(segment, depth - first)
        refuse = _refuse_workspaces()
        with nogil, parallel(num_threads=threads):
            work = u_work = NULL  # assigned in the region, so each thread has its own
            space = _workspace_allocate(size, refuse)
            if space.base == NULL:
                failure[0] = 1
            else:
                _segment_pieces(&space, max_rows, n, &work, &u_work)
            for block in prange(n_blocks, schedule='static'):
                if space.base == NULL:
                    continue
                start = _block_start(block, n_blocks, batch)
                rows = _block_start(block + 1, n_blocks, batch) - start
                memcpy(&xs[0, start, 0], &checkpoints[seg, start, 0], rows * n * sizeof(floating))
                memcpy(&x_exp[0, start], &checkpoint_exp[seg, start], rows * sizeof(double))
                _forward_layers(count, n, batch, start, rows, activation, has_residual, res, norm,
                                &weights[first, 0, 0], &biases[first, 0], &xs[0, 0, 0],
                                &derivatives[0, 0, 0], &mean_pre[0, 0], &inv_pre[0, 0], &inv_post[0, 0],
                                <long long *> NULL, <unsigned char *> NULL, u_work, &x_exp[0, 0])
                _backward_layers(count, first, depth, n, batch, start, rows, has_residual, res, norm,
                                 &weights[first, 0, 0], &xs[0, 0, 0], &derivatives[0, 0, 0],
                                 &mean_pre[0, 0], &inv_pre[0, 0], &inv_post[0, 0], &log_scale_h[0, 0],
                                 &log_grad_norm[0, 0], &g[start, 0], &log_scale[start], work, u_work,
                                 &x_exp[0, 0])
            _workspace_free(&space)
        if failed:
            raise _workspace_error("gradient_profile_segmented", size)
        _weight_gradient_norms(count, batch, n, norm, &derivatives[0, 0, 0], &xs[0, 0, 0],
                               &mean_pre[0, 0], &inv_pre[0, 0], &log_scale_h[0, 0], &x_exp[0, 0],
                               &log_weight_grad_norm[first], n_threads, "gradient_profile_segmented")


def gradient_profiles(list weights, list biases,
                      const floating[:, :, ::1] x, const floating[:, :, ::1] grad_output,
                      const int[::1] activations, const unsigned char[::1] has_residual,
                      const double[::1] residuals, const int[::1] norms, Py_ssize_t depth,
                      double[:, :, ::1] log_grad_norm, double[:, ::1] log_weight_grad_norm,
                      long long[:, ::1] saturated, unsigned char[:, :, ::1] alive, int n_threads):
    """Gradient profiles of C stacks of one shape, one stack per thread at a time.

    The sweep's chunk runner: no Python work per stack.  Stack c has weights
    weights[c] (L, n, n) and biases biases[c] (L, n): C-contiguous arrays of
    the dtype of x, whose buffers this call holds (through typed views) until
    it returns; inputs x[c] and cotangents grad_output[c] (B, n), its own
    activation, residual and norm.  Outputs: log_grad_norm (C, B, L+1),
    log_weight_grad_norm (C, L), saturated (C, L) counts and alive (C, L, n)
    flags (zeroed by the caller).

    Raises
    ------
    ValueError
        A weight or bias array of another shape or dtype than the call's (a
        caller's bug: nothing is computed).
    MemoryError
        A thread's workspace could not be allocated (nothing is computed).
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
    cdef const floating[:, :, ::1] weight_view
    cdef const floating[:, ::1] bias_view
    cdef const floating **weight_pointers = NULL
    cdef const floating **bias_pointers = NULL
    cdef int failed = 0
    cdef int *failure = &failed
    cdef bint refuse
    cdef Workspace space = _measuring()
    _piece(&space, values, <floating> 0)
    _piece(&space, depth * batch + batch + (depth + 1) * batch, <double> 0)
    cdef size_t size = space.used
    if len(weights) != n_stacks or len(biases) != n_stacks:
        raise ValueError(f"gradient_profiles: {n_stacks} inputs but {len(weights)} weight and "
                         f"{len(biases)} bias arrays")
    if n_stacks == 0:
        return
    # typed views check each array's dtype, layout and shape; the list keeps them (and so the
    # buffers) alive while the kernel reads through the pointers
    views = []
    weight_pointers = <const floating **> malloc(n_stacks * sizeof(floating *))
    bias_pointers = <const floating **> malloc(n_stacks * sizeof(floating *))
    try:
        if weight_pointers == NULL or bias_pointers == NULL:
            raise MemoryError("gradient_profiles: could not allocate the table of stacks")
        for c in range(n_stacks):
            weight_view = weights[c]
            bias_view = biases[c]
            if (weight_view.shape[0] != depth or weight_view.shape[1] != n or weight_view.shape[2] != n
                    or bias_view.shape[0] != depth or bias_view.shape[1] != n):
                raise ValueError(f"gradient_profiles: stack {c} has weights {tuple(weight_view.shape)[:3]} "
                                 f"and biases {tuple(bias_view.shape)[:2]}, expected ({depth}, {n}, {n}) "
                                 f"and ({depth}, {n})")
            views.append((weight_view, bias_view))
            weight_pointers[c] = &weight_view[0, 0, 0]
            bias_pointers[c] = &bias_view[0, 0]
        refuse = _refuse_workspaces()
        with nogil, parallel(num_threads=max(1, min(<Py_ssize_t> n_threads, n_stacks))):
            # assigned in the region, so each thread has its own (Cython makes them private)
            buffer = NULL
            scales = NULL
            space = _workspace_allocate(size, refuse)
            if space.base == NULL:
                failure[0] = 1
            else:
                buffer = _piece(&space, values, <floating> 0)
                scales = _piece(&space, depth * batch + batch + (depth + 1) * batch, <double> 0)
            for c in prange(n_stacks, schedule='dynamic'):
                if space.base == NULL:
                    continue
                # buffer: xs (L+1, B, n) | derivatives (L, B, n) | mean, inv_pre, inv_post (L, B) | scratch
                # scales: log_scale_h (L, B) | log_scale (B,) | exponents of xs (L+1, B)
                xs = buffer
                derivatives = xs + (depth + 1) * plane
                stats = derivatives + depth * plane
                scratch = stats + 3 * depth * batch
                _profile_block(depth, n, batch, 0, batch, activations[c], has_residual[c],
                               <floating> residuals[c], norms[c], weight_pointers[c], bias_pointers[c],
                               &x[c, 0, 0], &grad_output[c, 0, 0], xs, derivatives, stats,
                               stats + depth * batch, stats + 2 * depth * batch, scales,
                               &log_grad_norm[c, 0, 0], &saturated[c, 0], &alive[c, 0, 0], scratch,
                               scratch + batch * n, scratch + 2 * batch * n, scales + depth * batch,
                               scales + (depth + 1) * batch)
                for layer in range(depth):
                    log_weight_grad_norm[c, layer] = _weight_gradient_norm(
                        batch, n, norms[c], derivatives + layer * plane, xs + layer * plane,
                        stats + layer * batch, stats + (depth + layer) * batch, scales + layer * batch,
                        scales + (depth + 1 + layer) * batch, scratch)
            _workspace_free(&space)
    finally:
        free(weight_pointers)
        free(bias_pointers)
    if failed:
        raise _workspace_error("gradient_profiles", size)


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


def work_items(Py_ssize_t batch, Py_ssize_t k, Py_ssize_t n_partitions):
    """How many work items a JVP / VJP of ``batch`` samples and k vectors is cut into.

    n_partitions is how many parts the caller wants at least
    (vgcore.backends._threads.n_partitions: fixed per machine, never the
    thread count, so that results do not depend on it).  With at least that
    many samples, that many items, blocks of samples; with fewer, each
    sample's k vectors are cut into ceil(n_partitions / batch) blocks (at
    most k), so that the items still number about n_partitions.
    """
    if batch >= n_partitions:
        return max(1, n_partitions)
    return batch * min(k, max(1, n_partitions // batch + (n_partitions % batch > 0)))


cdef void _jvp_pieces(Workspace *space, Py_ssize_t samples, Py_ssize_t rows, Py_ssize_t n,
                      floating **ping, floating **pong, floating **derivative,
                      floating **u_work, floating **mean_pre, floating **inv_pre, floating **inv_post,
                      floating **work, floating **work2, double **exps) noexcept nogil:
    """jvp's workspace for items of up to ``samples`` samples and ``rows`` tangents.

    Two layer outputs in turn (ping, pong; an item starts from ping), and a
    layer's phi'(h), LN(x) for pre-norm (samples, n) and LN statistics
    (samples,); _jvp_layer's scratch work and work2 (rows, n); the exponents
    of ping's and pong's rows, exps (2, samples).
    """
    cdef floating kind = 0
    ping[0] = _piece(space, samples * n, kind)
    pong[0] = _piece(space, samples * n, kind)
    derivative[0] = _piece(space, samples * n, kind)
    u_work[0] = _piece(space, samples * n, kind)
    mean_pre[0] = _piece(space, samples, kind)
    inv_pre[0] = _piece(space, samples, kind)
    inv_post[0] = _piece(space, samples, kind)
    work[0] = _piece(space, rows * n, kind)
    work2[0] = _piece(space, rows * n, kind)
    exps[0] = _piece(space, 2 * samples, <double> 0)


def jvp(const floating[:, :, ::1] weights, const floating[:, ::1] biases, const floating[:, ::1] x,
        int activation, bint has_residual, double residual, int norm, floating[:, :, ::1] tangents,
        Py_ssize_t n_items, int n_threads):
    """In place: tangents (B, k, n) at the input -> J(x_b) tangents at the output.

    Raises MemoryError when a thread's workspace cannot be allocated (tangents are then incomplete).
    """
    cdef Py_ssize_t depth = weights.shape[0], n = weights.shape[1], batch = x.shape[0]
    cdef Py_ssize_t k = tangents.shape[1]
    cdef Py_ssize_t item, s0, s1, v0, v1, samples, rows, layer
    cdef WorkItem span
    cdef Py_ssize_t max_samples = 1 if batch < n_items else (batch + n_items - 1) // n_items
    cdef Py_ssize_t max_rows = max_samples * k
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
    cdef floating *work
    cdef floating *work2
    cdef double *exps
    cdef double *exp_current
    cdef double *exp_following
    cdef double *exp_swap
    cdef floating res = <floating> residual
    cdef bint refuse
    cdef int failed = 0
    cdef int *failure = &failed
    cdef Workspace space = _measuring()
    _jvp_pieces(&space, max_samples, max_rows, n, &ping, &pong, &derivative, &u_work,
                &mean_pre, &inv_pre, &inv_post, &work, &work2, &exps)
    cdef size_t size = space.used
    refuse = _refuse_workspaces()
    with nogil, parallel(num_threads=max(1, min(<Py_ssize_t> n_threads, n_items))):
        # assigned in the region, so each thread has its own (Cython makes them private)
        ping = pong = derivative = u_work = mean_pre = inv_pre = inv_post = work = work2 = NULL
        exps = NULL
        space = _workspace_allocate(size, refuse)
        if space.base == NULL:
            failure[0] = 1
        else:
            _jvp_pieces(&space, max_samples, max_rows, n, &ping, &pong, &derivative, &u_work,
                        &mean_pre, &inv_pre, &inv_post, &work, &work2, &exps)
        for item in prange(n_items, schedule='static'):
            if space.base == NULL:
                continue
            span = _work_item(item, batch, k, n_items)
            s0 = span.sample_start
            s1 = span.sample_stop
            v0 = span.vector_start
            v1 = span.vector_stop
            samples = s1 - s0
            rows = samples * (v1 - v0)
            current = ping
            following = pong
            exp_current = exps
            exp_following = exps + max_samples
            memcpy(current, &x[s0, 0], samples * n * sizeof(floating))
            memset(exp_current, 0, samples * sizeof(double))
            _scale_rows(samples, n, current, exp_current)
            for layer in range(depth):
                _forward_layer(samples, n, activation, has_residual, res, norm,
                               &weights[layer, 0, 0], &biases[layer, 0], current, following,
                               derivative, u_work, mean_pre, inv_pre, inv_post, exp_current,
                               exp_following)
                _jvp_layer(rows, n, v1 - v0, has_residual, res, norm, &weights[layer, 0, 0],
                           u_work if norm == NORM_PRE else current, following, derivative, inv_pre,
                           inv_post, &tangents[s0, v0, 0], work, work2, exp_current, exp_following)
                swap = current
                current = following
                following = swap
                exp_swap = exp_current
                exp_current = exp_following
                exp_following = exp_swap
        _workspace_free(&space)
    if failed:
        raise _workspace_error("jvp", size)


cdef void _vjp_pieces(Workspace *space, Py_ssize_t depth, Py_ssize_t samples, Py_ssize_t rows,
                      Py_ssize_t n, floating **xs, floating **derivatives, floating **mean_pre,
                      floating **inv_pre, floating **inv_post, floating **u_work, floating **g_h,
                      floating **work, double **exps) noexcept nogil:
    """vjp's workspace for items of up to ``samples`` samples and ``rows`` cotangents.

    What the backward pass reads of the forward pass: xs (L+1, samples, n)
    the layer outputs, derivatives (L, samples, n) phi'(h), mean_pre /
    inv_pre / inv_post (L, samples) LN statistics; _vjp_layer's scratch
    u_work (samples, n), g_h and work (rows, n); the exponents of the rows of
    xs, exps (L+1, samples).
    """
    cdef floating kind = 0
    xs[0] = _piece(space, (depth + 1) * samples * n, kind)
    derivatives[0] = _piece(space, depth * samples * n, kind)
    mean_pre[0] = _piece(space, depth * samples, kind)
    inv_pre[0] = _piece(space, depth * samples, kind)
    inv_post[0] = _piece(space, depth * samples, kind)
    u_work[0] = _piece(space, samples * n, kind)
    g_h[0] = _piece(space, rows * n, kind)
    work[0] = _piece(space, rows * n, kind)
    exps[0] = _piece(space, (depth + 1) * samples, <double> 0)


def vjp(const floating[:, :, ::1] weights, const floating[:, ::1] biases, const floating[:, ::1] x,
        int activation, bint has_residual, double residual, int norm, floating[:, :, ::1] cotangents,
        Py_ssize_t n_items, int n_threads):
    """In place: cotangents (B, k, n) at the output -> J(x_b)^T cotangents at the input.

    Raises MemoryError when a thread's workspace cannot be allocated (cotangents are then incomplete).
    """
    cdef Py_ssize_t depth = weights.shape[0], n = weights.shape[1], batch = x.shape[0]
    cdef Py_ssize_t k = cotangents.shape[1]
    cdef Py_ssize_t item, s0, s1, v0, v1, samples, rows, layer
    cdef WorkItem span
    cdef Py_ssize_t max_samples = 1 if batch < n_items else (batch + n_items - 1) // n_items
    cdef Py_ssize_t max_rows = max_samples * k
    cdef Py_ssize_t plane = max_samples * n
    cdef floating *xs
    cdef floating *derivatives
    cdef floating *mean_pre
    cdef floating *inv_pre
    cdef floating *inv_post
    cdef floating *u_work
    cdef floating *g_h
    cdef floating *work
    cdef double *exps
    cdef floating res = <floating> residual
    cdef bint refuse
    cdef int failed = 0
    cdef int *failure = &failed
    cdef Workspace space = _measuring()
    _vjp_pieces(&space, depth, max_samples, max_rows, n, &xs, &derivatives, &mean_pre, &inv_pre,
                &inv_post, &u_work, &g_h, &work, &exps)
    cdef size_t size = space.used
    refuse = _refuse_workspaces()
    with nogil, parallel(num_threads=max(1, min(<Py_ssize_t> n_threads, n_items))):
        # assigned in the region, so each thread has its own (Cython makes them private)
        xs = derivatives = mean_pre = inv_pre = inv_post = u_work = g_h = work = NULL
        exps = NULL
        space = _workspace_allocate(size, refuse)
        if space.base == NULL:
            failure[0] = 1
        else:
            _vjp_pieces(&space, depth, max_samples, max_rows, n, &xs, &derivatives, &mean_pre,
                        &inv_pre, &inv_post, &u_work, &g_h, &work, &exps)
        for item in prange(n_items, schedule='static'):
            if space.base == NULL:
                continue
            span = _work_item(item, batch, k, n_items)
            s0 = span.sample_start
            s1 = span.sample_stop
            v0 = span.vector_start
            v1 = span.vector_stop
            samples = s1 - s0
            rows = samples * (v1 - v0)
            memcpy(xs, &x[s0, 0], samples * n * sizeof(floating))
            memset(exps, 0, samples * sizeof(double))
            _scale_rows(samples, n, xs, exps)
            for layer in range(depth):
                _forward_layer(samples, n, activation, has_residual, res, norm,
                               &weights[layer, 0, 0], &biases[layer, 0], xs + layer * plane,
                               xs + (layer + 1) * plane, derivatives + layer * plane, u_work,
                               mean_pre + layer * max_samples, inv_pre + layer * max_samples,
                               inv_post + layer * max_samples, exps + layer * max_samples,
                               exps + (layer + 1) * max_samples)
            for layer in range(depth - 1, -1, -1):
                _vjp_layer(rows, n, v1 - v0, has_residual, res, norm, &weights[layer, 0, 0],
                           xs + layer * plane, xs + (layer + 1) * plane, derivatives + layer * plane,
                           mean_pre + layer * max_samples, inv_pre + layer * max_samples,
                           inv_post + layer * max_samples, &cotangents[s0, v0, 0], g_h, work, u_work,
                           exps + layer * max_samples, exps + (layer + 1) * max_samples)
        _workspace_free(&space)
    if failed:
        raise _workspace_error("vjp", size)
