"""The sweep's shared-draw kernel: gradient profiles of many stacks that share their unit weights.

Configs of a sweep with the same seed, depth, width, init and dtype share the
unit variates of their weights: stack c has W_l = s_c Z_l (Z_l the unit
weights, s_c = sigma_w / sqrt(n) for a Gaussian init) and biases
b_l = sigma_b_c z_l, as vgcore.Stack.random draws them (docs/ARCHITECTURE.md,
"Sweeps").  Such configs run as one batched problem: their activations are
stacked into a tile of T configs (T * B rows), and each layer is ONE product
of the tile's rows with the shared Z_l (forward: H = U Z_l^T, backward:
G = A Z_l), with each config's scale s_c, bias, activation, residual branch
and layer norm applied per config in the epilogue; the weight-gradient norms
come from the small Gram matrices (csrc/vg_sweep.h), with no BLAS call per
config.

Determinism: every product of a tile has T * B rows whatever the tile holds
(an unfilled slot is zero rows, skipped by the epilogue), and BLAS rounds a row
independently of the other rows and of its position for a fixed call shape, so
a config's results do not depend on which configs share its tile, on how the
sweep is chunked, or on the number of threads (threads take whole tiles; BLAS
is held to one thread by the caller).

Conventions are those of vgcore._ext._kernels: C-contiguous arrays of one
floating dtype (log norms in float64), weights in (out, in) layout, nothing
raises inside nogil; a workspace that cannot be allocated raises MemoryError
after the parallel region, and shapes are checked before it.
"""

from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.math cimport INFINITY, exp, ldexp, log
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

import numpy as np

from vgcore._ext._layers cimport (
    NORM_POST,
    NORM_PRE,
    Workspace,
    _measuring,
    _piece,
    _workspace_allocate,
    _workspace_free,
    _activation_block,
    _largest_magnitude,
    _layer_norm_product,
    _layer_norm_rows,
    _recompute_pre_norm,
    _rows_times_weight,
    _rows_times_weight_t,
    _scale_range,
)


cdef extern from "vg_activations.h" nogil:
    enum:
        VG_TANH


cdef extern from "vg_sweep.h" nogil:
    long vg_gradient_norm_scratch(long rows, long n)
    void vg_renormalise_rows_d(long rows, long n, double *g, double *log_scale, double *log_norm_out,
                               long stride)
    void vg_renormalise_rows_f(long rows, long n, float *g, double *log_scale, double *log_norm_out,
                               long stride)
    void vg_tanh_block_d(long rows, long n, double *h, const double *bias, double *derivative)
    double vg_squared_gradient_norm_d(long rows, long n, const double *g, const double *u, double *scratch)
    double vg_squared_gradient_norm_f(long rows, long n, const float *g, const float *u, double *scratch)


# The tests' way to the MemoryError path (as vgcore._ext._kernels): parallel regions still to let
# through before every workspace allocation of this module fails; -1: never fail.
cdef Py_ssize_t _regions_before_failure = -1


def _fail_allocations_for_tests(bint fail, Py_ssize_t after=0):
    """For tests: make workspace allocations fail (True) or work again (False), after ``after`` regions."""
    global _regions_before_failure
    _regions_before_failure = after if fail else -1


cdef bint _refuse_workspaces():
    global _regions_before_failure
    if _regions_before_failure < 0:
        return False
    if _regions_before_failure == 0:
        return True
    _regions_before_failure -= 1
    return False


cdef void _tile_pieces(Workspace *space, Py_ssize_t depth, Py_ssize_t n, Py_ssize_t batch,
                       Py_ssize_t rows, floating **buffer, double **log_scale,
                       double **gradient) noexcept nogil:
    """One thread's workspace for tiles of ``rows`` rows (layout of the buffer: see _run_tile)."""
    buffer[0] = _piece(space, _tile_values(depth, n, batch, rows), <floating> 0)
    log_scale[0] = _piece(space, rows, <double> 0)
    gradient[0] = _piece(space, vg_gradient_norm_scratch(batch, n), <double> 0)


cdef inline double _squared_gradient_norm(Py_ssize_t batch, Py_ssize_t n, const floating *g,
                                          const floating *u, double *gradient) noexcept nogil:
    """||g^T u||_F^2 for g, u (batch, n) (csrc/vg_sweep.h); gradient: its scratch."""
    if floating is double:
        return vg_squared_gradient_norm_d(batch, n, g, u, gradient)
    else:
        return vg_squared_gradient_norm_f(batch, n, g, u, gradient)


cdef inline void _activation(int kind, Py_ssize_t rows, Py_ssize_t n, floating *h, const floating *bias,
                             floating *derivative) noexcept nogil:
    """phi(h + bias) and phi' on a block: tanh in float64 through the vectorised vg_tanh_block_d."""
    if floating is double:
        if kind == VG_TANH:
            vg_tanh_block_d(rows, n, h, bias, derivative)
            return
    _activation_block(kind, rows, n, h, bias, derivative)


def tanh_values(double[::1] h, double[::1] value, double[::1] derivative):
    """tanh(h) and tanh'(h) from vg_tanh_block_d (for tests against the csrc header's)."""
    cdef Py_ssize_t n = h.shape[0]
    cdef double[::1] zero = np.zeros(max(n, 1))
    if n > 0:
        memcpy(&value[0], &h[0], n * sizeof(double))
        vg_tanh_block_d(1, n, &value[0], &zero[0], &derivative[0])


cdef inline void _renormalise_rows(Py_ssize_t rows, Py_ssize_t n, floating *g, double *log_scale,
                                   double *log_norm_out, Py_ssize_t stride) noexcept nogil:
    """_layers._renormalise_rows, vectorised (csrc/vg_sweep.h): the same scaling, summed in another order."""
    if floating is double:
        vg_renormalise_rows_d(rows, n, g, log_scale, log_norm_out, stride)
    else:
        vg_renormalise_rows_f(rows, n, g, log_scale, log_norm_out, stride)


cdef double _weight_gradient_norm(Py_ssize_t batch, Py_ssize_t n, const floating *cotangents_h,
                                  const floating *u_in, const double *log_scale_h, floating *g,
                                  floating *u, double *gradient) noexcept nogil:
    """log ||sum_b exp(s_b) g_b u_b^T||_F of one layer of one config.

    As vgcore._ext._kernels._weight_gradient_norm: samples weighted by
    exp(s_b - max s), so the sum is exact whatever the spread of scales; G
    and U are then each divided by their largest entry, so that their squares
    can neither underflow nor overflow at any finite scale; the squared norm
    from csrc/vg_sweep.h instead of BLAS.  g and u (batch, n) are scratch.
    """
    cdef Py_ssize_t b, i
    cdef double top = log_scale_h[0], weight, total, g_scale, u_scale, g_inverse, u_inverse
    for b in range(batch):
        if log_scale_h[b] > top:
            top = log_scale_h[b]
    for b in range(batch):
        weight = exp(log_scale_h[b] - top)
        for i in range(n):
            g[b * n + i] = <floating> (weight * cotangents_h[b * n + i])
    g_scale = _largest_magnitude(batch * n, g)
    u_scale = _largest_magnitude(batch * n, u_in)
    if g_scale == 0 or u_scale == 0:
        return -INFINITY
    g_inverse = 1.0 / g_scale
    u_inverse = 1.0 / u_scale
    for i in range(batch * n):
        g[i] = <floating> (g[i] * g_inverse)
        u[i] = <floating> (u_in[i] * u_inverse)
    total = _squared_gradient_norm(batch, n, g, u, gradient)
    if total > 0:
        return top + log(g_scale) + log(u_scale) + 0.5 * log(total)
    return -INFINITY


cdef Py_ssize_t _tile_values(Py_ssize_t depth, Py_ssize_t n, Py_ssize_t batch,
                             Py_ssize_t rows) noexcept nogil:
    """Floating values of one thread's tile workspace (see _run_tile for the layout)."""
    return (2 * depth + 1) * rows * n + 3 * depth * rows + 4 * rows * n + 3 * batch * n + n


cdef inline bint _leaves_range(Py_ssize_t batch, Py_ssize_t n, const floating *rows, double lower,
                               double upper) noexcept nogil:
    """Whether a row of rows (batch, n) has its largest |entry| outside [lower, upper) (zero rows aside)."""
    cdef Py_ssize_t i
    cdef double largest
    for i in range(batch):
        largest = _largest_magnitude(n, rows + i * n)
        if largest != 0 and not (lower <= largest < upper):
            return True
    return False


cdef void _run_tile(Py_ssize_t slots, Py_ssize_t depth, Py_ssize_t n,
                    Py_ssize_t batch, const floating *unit_weights, const double *unit_biases,
                    const floating *x, const floating *grad_output, const Py_ssize_t *members,
                    const double *weight_scales, const double *bias_scales, const int *activations,
                    const unsigned char *has_residual, const double *residuals, const int *norms,
                    double *log_grad_norm, double *log_weight_grad_norm, floating *buffer,
                    double *log_scale, double *gradient, unsigned char *left_range) noexcept nogil:
    """Forward, renormalised backward and weight-gradient norms of one tile of configs.

    members (slots,): the tile's config indices, -1 for an unfilled slot.
    left_range[c] is set where a row of config c's activations leaves
    [2**-R, 2**R) (zero rows aside): this kernel does not carry the scaled
    forward pass of the stack kernels (docs/ARCHITECTURE.md §1.4), so the
    caller recomputes those configs there.
    Workspace layout (R = slots * batch rows): xs (L+1, R, n) layer outputs |
    derivatives (L, R, n) phi'(h), then the cotangents at h | mean_pre,
    inv_pre, inv_post (L, R) | linear inputs (R, n) | scaled cotangents
    (R, n) | product (R, n) | cotangents (R, n) | pre-norm inputs, and the
    weight-gradient scratch, (B, n) each | one config's bias (n).
    """
    cdef Py_ssize_t rows = slots * batch, plane = rows * n, sample_plane = batch * n
    cdef Py_ssize_t layer, slot, c, i, first
    cdef floating *xs = buffer
    cdef floating *derivatives = xs + (depth + 1) * plane
    cdef floating *mean_pre = derivatives + depth * plane
    cdef floating *inv_pre = mean_pre + depth * rows
    cdef floating *inv_post = inv_pre + depth * rows
    cdef floating *linear_in = inv_post + depth * rows
    cdef floating *scaled = linear_in + plane
    cdef floating *product = scaled + plane
    cdef floating *g = product + plane
    cdef floating *u_work = g + plane
    cdef floating *g_scratch = u_work + sample_plane
    cdef floating *u_scratch = g_scratch + sample_plane
    cdef floating *bias = u_scratch + sample_plane
    cdef floating *x_in
    cdef floating *out
    cdef floating *d
    cdef floating *gs
    cdef const floating *weight
    cdef const floating *u
    cdef bint any_pre = False
    cdef floating scale, residual_scale
    cdef double lower = ldexp(1.0, -_scale_range(<floating> 0)), upper = ldexp(1.0, _scale_range(<floating> 0))

    # unfilled slots are zero rows: the products map them to zero rows and the epilogue skips them
    memset(linear_in, 0, plane * sizeof(floating))
    memset(scaled, 0, plane * sizeof(floating))
    for slot in range(slots):
        c = members[slot]
        first = slot * batch
        if c < 0:
            memset(xs + first * n, 0, sample_plane * sizeof(floating))
        else:
            memcpy(xs + first * n, x, sample_plane * sizeof(floating))
            any_pre = any_pre or norms[c] == NORM_PRE

    # forward: one product per layer for the whole tile
    for layer in range(depth):
        x_in = xs + layer * plane
        out = xs + (layer + 1) * plane
        weight = unit_weights + layer * n * n
        if any_pre:
            for slot in range(slots):
                c = members[slot]
                if c < 0:
                    continue
                first = slot * batch
                if norms[c] == NORM_PRE:
                    _layer_norm_rows(batch, n, x_in + first * n, linear_in + first * n,
                                     mean_pre + layer * rows + first, inv_pre + layer * rows + first,
                                     <double *> NULL)
                else:
                    memcpy(linear_in + first * n, x_in + first * n, sample_plane * sizeof(floating))
            _rows_times_weight_t(rows, n, linear_in, weight, out)
        else:
            _rows_times_weight_t(rows, n, x_in, weight, out)
        for slot in range(slots):
            c = members[slot]
            if c < 0:
                continue
            first = slot * batch
            scale = <floating> weight_scales[c]
            for i in range(n):
                # Stack.random's rounding: sigma_b * z in double, then the dtype
                bias[i] = <floating> (bias_scales[c] * unit_biases[layer * n + i])
            for i in range(first * n, (first + batch) * n):
                out[i] = scale * out[i]
            _activation(activations[c], batch, n, out + first * n, bias,
                        derivatives + layer * plane + first * n)
            if has_residual[c]:
                residual_scale = <floating> residuals[c]
                for i in range(first * n, (first + batch) * n):
                    out[i] = x_in[i] + residual_scale * out[i]
            if norms[c] == NORM_POST:
                # before LN too: LN squares a row beyond the floats to inf (and gives a zero row)
                if not left_range[c] and _leaves_range(batch, n, out + first * n, lower, upper):
                    left_range[c] = 1
                _layer_norm_rows(batch, n, out + first * n, out + first * n, <floating *> NULL,
                                 inv_post + layer * rows + first, <double *> NULL)
            if not left_range[c] and _leaves_range(batch, n, out + first * n, lower, upper):
                left_range[c] = 1

    # renormalised backward from the shared cotangent at the output
    for slot in range(slots):
        c = members[slot]
        if c < 0:
            continue
        first = slot * batch
        memcpy(g + first * n, grad_output, sample_plane * sizeof(floating))
        memset(log_scale + first, 0, batch * sizeof(double))
        _renormalise_rows(batch, n, g + first * n, log_scale + first,
                          log_grad_norm + c * batch * (depth + 1) + depth, depth + 1)
    for layer in range(depth - 1, -1, -1):
        x_in = xs + layer * plane
        out = xs + (layer + 1) * plane
        weight = unit_weights + layer * n * n
        for slot in range(slots):
            c = members[slot]
            if c < 0:
                continue
            first = slot * batch
            gs = g + first * n
            d = derivatives + layer * plane + first * n
            if norms[c] == NORM_POST:
                _layer_norm_product(batch, n, 1, gs, out + first * n, inv_post + layer * rows + first,
                                    <double *> NULL)
            residual_scale = <floating> residuals[c] if has_residual[c] else 1
            scale = <floating> weight_scales[c]
            for i in range(sample_plane):
                # the cotangent at h overwrites phi'(h); the product takes it times the weight scale
                d[i] = residual_scale * gs[i] * d[i]
                scaled[first * n + i] = scale * d[i]
            u = x_in + first * n
            if norms[c] == NORM_PRE:
                _recompute_pre_norm(batch, n, u, mean_pre + layer * rows + first,
                                    inv_pre + layer * rows + first, u_work, <double *> NULL)
                u = u_work
            log_weight_grad_norm[c * depth + layer] = _weight_gradient_norm(
                batch, n, d, u, log_scale + first, g_scratch, u_scratch, gradient)
        _rows_times_weight(rows, n, scaled, weight, product)
        for slot in range(slots):
            c = members[slot]
            if c < 0:
                continue
            first = slot * batch
            gs = g + first * n
            if norms[c] == NORM_PRE:
                _recompute_pre_norm(batch, n, x_in + first * n, mean_pre + layer * rows + first,
                                    inv_pre + layer * rows + first, u_work, <double *> NULL)
                _layer_norm_product(batch, n, 1, product + first * n, u_work,
                                    inv_pre + layer * rows + first, <double *> NULL)
            if has_residual[c]:
                for i in range(sample_plane):
                    gs[i] = gs[i] + product[first * n + i]
            else:
                memcpy(gs, product + first * n, sample_plane * sizeof(floating))
            _renormalise_rows(batch, n, gs, log_scale + first,
                              log_grad_norm + c * batch * (depth + 1) + layer, depth + 1)


def workspace_bytes(Py_ssize_t depth, Py_ssize_t width, Py_ssize_t batch, Py_ssize_t slots,
                    Py_ssize_t itemsize):
    """Bytes one thread allocates for tiles of ``slots`` configs (the caller sizes tiles with it)."""
    cdef Workspace space = _measuring()
    cdef double *log_scale
    cdef double *gradient
    cdef float *single
    cdef double *double_
    if itemsize == 4:
        _tile_pieces(&space, depth, width, batch, slots * batch, &single, &log_scale, &gradient)
    else:
        _tile_pieces(&space, depth, width, batch, slots * batch, &double_, &log_scale, &gradient)
    return space.used


def shared_profiles(list unit_weights, list unit_biases, const floating[:, :, ::1] x,
                    const floating[:, :, ::1] grad_output, const Py_ssize_t[::1] tile_groups,
                    const Py_ssize_t[:, ::1] tiles, const double[::1] weight_scales,
                    const double[::1] bias_scales, const int[::1] activations,
                    const unsigned char[::1] has_residual, const double[::1] residuals,
                    const int[::1] norms, double[:, :, ::1] log_grad_norm,
                    double[:, ::1] log_weight_grad_norm, unsigned char[::1] left_range, int n_threads):
    """Gradient profiles of C configs in G groups of shared unit variates, in tiles of T configs.

    Group g: unit_weights[g] (L, n, n) Z in the configs' dtype, unit_biases[g]
    (L, n) z in float64, inputs x[g] and cotangents grad_output[g] (B, n)
    shared by its configs.  tiles (n_tiles, T): config indices (-1 for an
    unfilled slot), every config at most once, a tile's configs all of group
    tile_groups[tile].  Per config (C,): weight_scales s_c (W_l = s_c Z_l),
    bias_scales sigma_b_c (b_l = sigma_b_c z_l, rounded as Stack.random
    rounds it), activations (codes), has_residual, residuals, norms (codes:
    none, pre, post).  Outputs: log_grad_norm (C, B, L+1) and
    log_weight_grad_norm (C, L) of the configs in tiles, and left_range (C,)
    (zeroed by the caller): 1 where a config's activations left [2**-R, 2**R),
    whose results the caller must recompute with the stack kernels.  Threads
    take whole tiles.

    Raises
    ------
    ValueError
        Arrays of other shapes than the call's (a caller's bug), before any work.
    MemoryError
        A thread's workspace could not be allocated (nothing is computed).
    """
    cdef Py_ssize_t n_groups = x.shape[0], batch = x.shape[1], n = x.shape[2]
    cdef Py_ssize_t depth = log_weight_grad_norm.shape[1]
    cdef Py_ssize_t n_tiles = tiles.shape[0], slots = tiles.shape[1], n_configs = weight_scales.shape[0]
    cdef Py_ssize_t tile, group, slot
    cdef floating *buffer = NULL
    cdef double *log_scale = NULL
    cdef double *gradient = NULL
    cdef const floating[:, :, ::1] weight_view
    cdef const double[:, ::1] bias_view
    cdef const floating **weight_pointers = NULL
    cdef const double **bias_pointers = NULL
    cdef int failed = 0
    cdef int *failure = &failed
    cdef bint refuse
    cdef Workspace space = _measuring()
    _tile_pieces(&space, depth, n, batch, slots * batch, &buffer, &log_scale, &gradient)
    cdef size_t size = space.used
    if (len(unit_weights) != n_groups or len(unit_biases) != n_groups
            or grad_output.shape[0] != n_groups or grad_output.shape[1] != batch
            or grad_output.shape[2] != n or tile_groups.shape[0] != n_tiles
            or log_grad_norm.shape[0] != n_configs or log_grad_norm.shape[1] != batch
            or log_grad_norm.shape[2] != depth + 1 or log_weight_grad_norm.shape[0] != n_configs):
        raise ValueError("shared_profiles: inconsistent shapes")
    for name, per_config in (("bias_scales", bias_scales.shape[0]), ("activations", activations.shape[0]),
                             ("left_range", left_range.shape[0]),
                             ("has_residual", has_residual.shape[0]), ("residuals", residuals.shape[0]),
                             ("norms", norms.shape[0])):
        if per_config != n_configs:
            raise ValueError(f"shared_profiles: {name} has {per_config} entries for {n_configs} configs")
    for tile in range(n_tiles):
        if not 0 <= tile_groups[tile] < n_groups:
            raise ValueError(f"shared_profiles: tile {tile} names group {tile_groups[tile]}")
        for slot in range(slots):
            if not -1 <= tiles[tile, slot] < n_configs:
                raise ValueError(f"shared_profiles: tile {tile} names config {tiles[tile, slot]}")
    if n_tiles == 0:
        return
    # typed views check each group's arrays; the list keeps them alive while the kernel runs
    views = []
    weight_pointers = <const floating **> malloc(n_groups * sizeof(floating *))
    bias_pointers = <const double **> malloc(n_groups * sizeof(double *))
    try:
        if weight_pointers == NULL or bias_pointers == NULL:
            raise MemoryError("shared_profiles: could not allocate the table of groups")
        for group in range(n_groups):
            weight_view = unit_weights[group]
            bias_view = unit_biases[group]
            if (weight_view.shape[0] != depth or weight_view.shape[1] != n or weight_view.shape[2] != n
                    or bias_view.shape[0] != depth or bias_view.shape[1] != n):
                raise ValueError(f"shared_profiles: group {group} has unit weights "
                                 f"{tuple(weight_view.shape)[:3]} and biases {tuple(bias_view.shape)[:2]}, "
                                 f"expected ({depth}, {n}, {n}) and ({depth}, {n})")
            views.append((weight_view, bias_view))
            weight_pointers[group] = &weight_view[0, 0, 0]
            bias_pointers[group] = &bias_view[0, 0]
        refuse = _refuse_workspaces()
        with nogil, parallel(num_threads=max(1, min(<Py_ssize_t> n_threads, n_tiles))):
            # assigned in the region, so each thread has its own (Cython makes them private)
            buffer = NULL
            log_scale = gradient = NULL
            space = _workspace_allocate(size, refuse)
            if space.base == NULL:
                failure[0] = 1
            else:
                _tile_pieces(&space, depth, n, batch, slots * batch, &buffer, &log_scale, &gradient)
            for tile in prange(n_tiles, schedule='dynamic'):
                if space.base == NULL:
                    continue
                group = tile_groups[tile]
                _run_tile(slots, depth, n, batch, weight_pointers[group], bias_pointers[group],
                          &x[group, 0, 0], &grad_output[group, 0, 0], &tiles[tile, 0],
                          &weight_scales[0], &bias_scales[0], &activations[0], &has_residual[0],
                          &residuals[0], &norms[0], &log_grad_norm[0, 0, 0],
                          &log_weight_grad_norm[0, 0], buffer, log_scale, gradient, &left_range[0])
            _workspace_free(&space)
    finally:
        free(weight_pointers)
        free(bias_pointers)
    if failed:
        raise MemoryError(f"shared_profiles: could not allocate {size} bytes of workspace per thread")
