"""The layer of docs/ARCHITECTURE.md on a block of rows, shared by the compiled extensions.

Inline, nogil C-level functions over fused float32 / float64: the BLAS
wrappers (row-major through scipy.linalg.cython_blas), layer norm and its
(symmetric) Jacobian product, and one layer's forward, VJP and JVP.
vgcore._kernels and vgcore._spectra cimport them, so each piece of a layer's
math is written once.  Conventions are those of vgcore._kernels: C-contiguous
(rows, n) blocks, weights in (out, in) layout, nothing raises.
"""

from cython cimport floating
from libc.math cimport INFINITY, M_LN2, fabs, frexp, ldexp, log, sqrt
from libc.stdint cimport uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from scipy.linalg.cython_blas cimport dgemm, dsyrk, sgemm, ssyrk
from scipy.linalg.cython_lapack cimport dgeqrf, dorgqr, sgeqrf, sorgqr

cdef extern from "vg_activations.h" nogil:
    double VG_SATURATION_THRESHOLD
    double VG_LEAKY_SLOPE
    double VG_SELU_ALPHA
    double VG_SELU_SCALE
    enum:
        VG_N_ACTIVATIONS
    void vg_bias_activation_block_d(int kind, long rows, long n, double *h, const double *bias,
                                    double *derivative)
    void vg_bias_activation_block_f(int kind, long rows, long n, float *h, const float *bias,
                                    float *derivative)
    int VG_SCALE_RANGE_D
    int VG_SCALE_RANGE_F
    ctypedef struct vg_pair_d:
        double value
        double derivative
    ctypedef struct vg_pair_f:
        float value
        float derivative
    vg_pair_d vg_activation_d(int kind, double h)
    vg_pair_f vg_activation_f(int kind, float h)
    vg_pair_d vg_activation_tiny_d(int kind, double h_scaled)
    vg_pair_f vg_activation_tiny_f(int kind, float h_scaled)
    vg_pair_d vg_activation_huge_d(int kind, double h_scaled, int e)
    vg_pair_f vg_activation_huge_f(int kind, float h_scaled, int e)

cdef extern from "vg_sweep.h" nogil:
    double vg_largest_entry_d(long count, const double *a)
    double vg_largest_entry_f(long count, const float *a)

cdef extern from "vg_stack.h" nogil:
    double LAYER_NORM_EPS "VG_LAYER_NORM_EPS"
    enum:
        NORM_NONE "VG_NORM_NONE"
        NORM_PRE "VG_NORM_PRE"
        NORM_POST "VG_NORM_POST"
        NORM_BATCH "VG_NORM_BATCH"


# ---------------------------------------------------------------------------
# BLAS, row-major
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


cdef inline void _rows_times_weight(Py_ssize_t rows, Py_ssize_t n, const floating *g,
                                    const floating *weight, floating *out) noexcept nogil:
    """out (rows, n) = g (rows, n) @ weight, weight (out, in)."""
    _gemm(c'N', c'N', <int> n, <int> rows, <int> n, <floating> 1, weight, <int> n, g, <int> n,
          <floating> 0, out, <int> n)


cdef inline void _gram_upper(Py_ssize_t rows, Py_ssize_t n, const floating *a,
                             floating *gram) noexcept nogil:
    """Upper triangle of a @ a.T, a (rows, n) row-major, gram (rows, rows)."""
    cdef char uplo = c'U'
    cdef char trans = c'T'
    cdef int nr = <int> rows, k = <int> n
    cdef floating one = 1, zero = 0
    if floating is double:
        dsyrk(&uplo, &trans, &nr, &k, &one, <double *> a, &k, &zero, gram, &nr)
    else:
        ssyrk(&uplo, &trans, &nr, &k, &one, <float *> a, &k, &zero, gram, &nr)


cdef inline void _activation_block(int kind, Py_ssize_t rows, Py_ssize_t n, floating *h,
                                   const floating *bias, floating *derivative) noexcept nogil:
    if floating is double:
        vg_bias_activation_block_d(kind, rows, n, h, bias, derivative)
    else:
        vg_bias_activation_block_f(kind, rows, n, h, bias, derivative)


# ---------------------------------------------------------------------------
# Layer norm over the features of one row
# ---------------------------------------------------------------------------

cdef inline double _row_variance(Py_ssize_t n, const floating *v, floating *mean) noexcept nogil:
    """The variance of v[0..n) (in double) and its mean (in v's type), as layer norm takes them."""
    cdef Py_ssize_t i
    cdef double total = 0, centred, var = 0
    for i in range(n):
        total = total + v[i]
    mean[0] = <floating> (total / n)
    for i in range(n):
        centred = <double> (v[i] - mean[0])
        var = var + centred * centred
    return var / n


cdef inline double _beyond_factor(double var, int e) noexcept nogil:
    """LN's factor for a row beyond the floats (v * 2**e, e > 0): 1 / sqrt(var + eps 4**-e), so the
    normalised row is true values; 0 for a constant row (var = 0: the centred row is 0 anyway)."""
    if var == 0:
        return 0
    return 1.0 / sqrt(var + ldexp(LAYER_NORM_EPS, -2 * e))


cdef inline void _layer_norm_rows(Py_ssize_t rows, Py_ssize_t n, const floating *v, floating *out,
                                  floating *mean_out, floating *inv_std_out,
                                  const double *exps) noexcept nogil:
    """out[r] = (v[r] - mean) * inv_std; out may alias v; mean_out may be NULL.

    With exps (rows,) (NULL: all 0) row r is scaled, v[r] * 2**exps[r]
    (_scale_rows): its variance is var * 4**e.  Below the floats (e < 0)
    out[r] keeps the exponent; beyond them (e > 0) out[r] = (v - mean) /
    sqrt(var + eps 4**-e), true values (exponent 0).  inv_std is always the
    true one, 1 / sqrt(var 4**e + eps), computed in double (for e > 0 as 2**-e
    times the factor, subnormal or 0 only where it is that small) (vgcore.reference.stack.layer_norm).
    """
    cdef Py_ssize_t r, i
    cdef double var
    cdef int e
    cdef floating mean, inv_std, factor
    for r in range(rows):
        var = _row_variance(n, v + r * n, &mean)
        e = 0 if exps == NULL else <int> exps[r]
        if e <= 0:
            inv_std = <floating> (1.0 / sqrt(ldexp(var, 2 * e) + LAYER_NORM_EPS))
            factor = inv_std
        else:  # the true inv_std is 2**-e times the factor (a constant row: 1 / sqrt(eps))
            factor = <floating> _beyond_factor(var, e)
            inv_std = <floating> (ldexp(_beyond_factor(var, e), -e) if var > 0 else 1.0 / sqrt(LAYER_NORM_EPS))
        for i in range(n):
            out[r * n + i] = (v[r * n + i] - mean) * factor
        if mean_out != NULL:
            mean_out[r] = mean
        inv_std_out[r] = inv_std


cdef inline void _layer_norm_product(Py_ssize_t rows, Py_ssize_t n, Py_ssize_t per_sample,
                                     floating *g, const floating *normalised,
                                     const floating *inv_std, const double *exps) noexcept nogil:
    """In place, g[r] <- J_LN g[r] = inv_std (g - mean(g) - xhat mean(xhat g)).

    Row r belongs to sample r // per_sample, whose normalised vector is
    normalised[sample] and scale inv_std[sample].  J_LN is symmetric, so this
    serves the JVP and the VJP alike.  With exps (samples,) (NULL: all 0) the
    normalised vectors are scaled rows, xhat = normalised * 2**e, and the last
    term carries 4**e; a positive e (the exponent of an LN input beyond the
    floats, whose normalised row is true values) counts as 0.
    """
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
        if exps != NULL and exps[s] < 0:
            gx_mean = ldexp(gx_mean, 2 * <int> exps[s])
        for i in range(n):
            g[r * n + i] = inv_std[s] * <floating> (g[r * n + i] - g_mean - normalised[s * n + i] * gx_mean)


cdef inline void _recompute_pre_norm(Py_ssize_t rows, Py_ssize_t n, const floating *x,
                                     const floating *mean, const floating *inv_std,
                                     floating *u, const double *exps) noexcept nogil:
    """u = LN(x) from the stored statistics, bit for bit as in the forward pass.

    exps (rows,) (NULL: all 0): the exponents of x's rows; beyond the floats
    (e > 0) the factor LN applied is not the stored (true) inv_std, and is
    recomputed from the row as the forward pass computed it.
    """
    cdef Py_ssize_t r, i
    cdef floating factor, row_mean
    for r in range(rows):
        factor = inv_std[r]
        if exps != NULL and exps[r] > 0:
            factor = <floating> _beyond_factor(_row_variance(n, x + r * n, &row_mean), <int> exps[r])
        for i in range(n):
            u[r * n + i] = (x[r * n + i] - mean[r]) * factor


# ---------------------------------------------------------------------------
# One layer: forward, VJP, JVP on a block of rows
# ---------------------------------------------------------------------------

cdef enum:
    SCALE_EXPONENT_LIMIT = 1 << 29  # |exponent| of a scaled row at most (log norms to +-3.7e8)


cdef inline int _scale_range(floating kind) noexcept nogil:
    """R of the scaled forward pass: rows below 2**-R are kept scaled (VG_SCALE_RANGE_D / _F)."""
    if floating is double:
        return VG_SCALE_RANGE_D
    else:
        return VG_SCALE_RANGE_F


cdef inline void _phi(int kind, floating h_scaled, int e, floating *value,
                      floating *derivative) noexcept nogil:
    """phi at h = h_scaled * 2**e, csrc/vg_activations.h: value (scaled back by 2**-e) and phi'(h).

    e = 0: h itself (vg_activation); e < 0: a row below 2**-R, on phi's
    linearisation at 0 (vg_activation_tiny: the value is phi'(0+-) h_scaled,
    phi(0) apart); e > 0: a row beyond 2**R (vg_activation_huge).
    """
    cdef vg_pair_d pd
    cdef vg_pair_f pf
    if floating is double:
        pd = (vg_activation_d(kind, h_scaled) if e == 0 else
              vg_activation_tiny_d(kind, h_scaled) if e < 0 else vg_activation_huge_d(kind, h_scaled, e))
        value[0] = pd.value
        derivative[0] = pd.derivative
    else:
        pf = (vg_activation_f(kind, h_scaled) if e == 0 else
              vg_activation_tiny_f(kind, h_scaled) if e < 0 else vg_activation_huge_f(kind, h_scaled, e))
        value[0] = pf.value
        derivative[0] = pf.derivative


cdef inline double _largest_magnitude(Py_ssize_t n, const floating *v) noexcept nogil:
    """max_i |v_i| (0 for n = 0), vectorised (csrc/vg_sweep.h; NaN entries are skipped)."""
    if floating is double:
        return vg_largest_entry_d(n, v)
    else:
        return vg_largest_entry_f(n, v)


cdef inline bint _within(Py_ssize_t count, const floating *v, int low, int high) noexcept nogil:
    """Whether the largest |v_i| lies in [2**low, 2**high): one vectorised pass."""
    cdef double largest = _largest_magnitude(count, v)
    return ldexp(1.0, low) <= largest < ldexp(1.0, high)


cdef inline void _scale_rows(Py_ssize_t rows, Py_ssize_t n, floating *v, double *exps) noexcept nogil:
    """Rows v[r] * 2**exps[r] re-expressed in place: scaled when beyond 2**+-R, else true values.

    The scaled forward pass (docs/ARCHITECTURE.md, "Rows beyond the floats";
    vgcore.reference.stack.scaled_rows): a row whose largest magnitude is
    outside (2**-R, 2**R] is scaled by a power of two to a largest entry in
    [0.5, 1) and its exponent kept in exps; a row in range gets exponent 0
    back (rows in range with exponent 0, every row of a usual network, are
    untouched).
    """
    cdef Py_ssize_t r, i
    cdef double largest
    cdef int k, top, high = _scale_range(<floating> 0)
    for r in range(rows):
        if exps[r] == 0 and _within(n, v + r * n, -high, high):
            continue  # the usual row
        largest = _largest_magnitude(n, v + r * n)
        if largest == 0:
            exps[r] = 0
            continue
        frexp(largest, &k)
        top = <int> exps[r] + k
        # saturate: beyond 2**(+-2**29) every true value is 0 or inf, and 2 e must stay an int
        top = SCALE_EXPONENT_LIMIT if top > SCALE_EXPONENT_LIMIT else top
        top = -SCALE_EXPONENT_LIMIT if top < -SCALE_EXPONENT_LIMIT else top
        if -high < top <= high:
            if exps[r] != 0:
                for i in range(n):
                    v[r * n + i] = <floating> ldexp(<double> v[r * n + i], <int> exps[r])
                exps[r] = 0
        else:
            for i in range(n):
                v[r * n + i] = <floating> ldexp(<double> v[r * n + i], -k)
            exps[r] = top


cdef inline void _true_rows(Py_ssize_t rows, Py_ssize_t n, floating *v, const double *exps) noexcept nogil:
    """v[r] <- v[r] * 2**exps[r], the true values (they may under- or overflow: that is their value)."""
    cdef Py_ssize_t r, i
    for r in range(rows):
        if exps[r] != 0:
            for i in range(n):
                v[r * n + i] = <floating> ldexp(<double> v[r * n + i], <int> exps[r])


cdef inline double _scaled_activation_row(int activation, Py_ssize_t n, floating *h, const floating *bias,
                                          floating *derivative, double exponent) noexcept nogil:
    """h <- phi(h * 2**exponent + bias) of one row of scaled products (exponent != 0); returns its exponent.

    vgcore.reference.stack.scaled_activation: the products and the bias are
    put on one exponent; a row then in range is evaluated as true values.
    Below 2**-R phi is its linearisation at 0 (_phi), plus phi(0), which
    when not 0 swamps the rest; beyond 2**R entries up to 2**R are evaluated
    as they are and larger ones on phi's asymptote (_phi).
    """
    cdef Py_ssize_t i
    cdef double largest = _largest_magnitude(n, h), bias_largest = _largest_magnitude(n, bias)
    cdef int k, e_h = 0, high = _scale_range(<floating> 0), low = -high
    cdef bint any_term = False
    cdef floating zero_value, zero_derivative, value
    if largest > 0:
        frexp(largest, &k)
        e_h = <int> exponent + k
        any_term = True
    if bias_largest > 0:
        frexp(bias_largest, &k)
        if not any_term or k > e_h:
            e_h = k
        any_term = True
    if not any_term:  # h = 0 and bias = 0
        for i in range(n):
            _phi(activation, <floating> 0, 0, &h[i], &derivative[i])
        return 0
    for i in range(n):
        h[i] = (<floating> ldexp(<double> h[i], <int> exponent - e_h)
                + <floating> ldexp(<double> bias[i], -e_h))
    if e_h > high:
        for i in range(n):
            _phi(activation, h[i], e_h, &h[i], &derivative[i])
        return e_h
    if e_h > low:
        for i in range(n):
            _phi(activation, <floating> ldexp(<double> h[i], e_h), 0, &h[i], &derivative[i])
        return 0
    _phi(activation, <floating> 0, 0, &zero_value, &zero_derivative)
    for i in range(n):
        _phi(activation, h[i], e_h, &value, &derivative[i])
        h[i] = zero_value if zero_value != 0 else value
    return 0 if zero_value != 0 else e_h


cdef inline void _forward_layer(Py_ssize_t rows, Py_ssize_t n, int activation, bint has_residual,
                         floating residual, int norm, const floating *weight, const floating *bias,
                         const floating *x, floating *out, floating *derivative, floating *u_work,
                         floating *mean_pre, floating *inv_pre, floating *inv_post,
                         const double *x_exp, double *out_exp) noexcept nogil:
    """x (rows, n) -> out (rows, n), keeping phi'(h) and the LN statistics.

    Rows are scaled (_scale_rows): x[r] stands for x[r] * 2**x_exp[r], and
    out[r] for out[r] * 2**out_exp[r] on return.  Rows with exponent 0 take
    exactly the arithmetic they always took.  u_work (rows, n) receives LN(x)
    (exponents x_exp) when norm is pre.  out must not alias x.
    """
    cdef const floating *u = x
    cdef Py_ssize_t r, i, size = rows * n
    cdef bint scaled = False
    cdef int top, e_x, e_f
    for r in range(rows):
        if x_exp[r] != 0:
            scaled = True
    if norm == NORM_PRE:
        _layer_norm_rows(rows, n, x, u_work, mean_pre, inv_pre, x_exp if scaled else <double *> NULL)
        u = u_work
    _rows_times_weight_t(rows, n, u, weight, out)
    if not scaled:
        _activation_block(activation, rows, n, out, bias, derivative)
        for r in range(rows):
            out_exp[r] = 0
    else:
        for r in range(rows):
            if x_exp[r] == 0:
                _activation_block(activation, 1, n, out + r * n, bias, derivative + r * n)
                out_exp[r] = 0
            elif norm == NORM_PRE and x_exp[r] > 0:  # LN(x) of a row beyond the floats: true values
                _activation_block(activation, 1, n, out + r * n, bias, derivative + r * n)
                out_exp[r] = 0
            else:
                out_exp[r] = _scaled_activation_row(activation, n, out + r * n, bias, derivative + r * n,
                                                    x_exp[r])
    if has_residual:
        if not scaled:
            for i in range(size):
                out[i] = x[i] + residual * out[i]
        else:
            for r in range(rows):
                e_x = <int> x_exp[r]
                e_f = <int> out_exp[r]
                if e_x == 0 and e_f == 0:
                    for i in range(n):
                        out[r * n + i] = x[r * n + i] + residual * out[r * n + i]
                else:
                    top = e_x if e_x > e_f else e_f
                    for i in range(n):
                        out[r * n + i] = (<floating> ldexp(<double> x[r * n + i], e_x - top)
                                          + <floating> ldexp(<double> (residual * out[r * n + i]),
                                                             e_f - top))
                    out_exp[r] = top
    if norm == NORM_POST:
        # a row beyond the floats gets its exponent before LN squares it (squares of 2**512 are inf)
        _scale_rows(rows, n, out, out_exp)
        scaled = False
        for r in range(rows):
            if out_exp[r] != 0:
                scaled = True
        _layer_norm_rows(rows, n, out, out, <floating *> NULL, inv_post, out_exp if scaled else <double *> NULL)
        if scaled:
            for r in range(rows):
                if out_exp[r] > 0:  # LN of a row beyond the floats: true values
                    out_exp[r] = 0
    _scale_rows(rows, n, out, out_exp)


cdef inline void _vjp_layer(Py_ssize_t rows, Py_ssize_t n, Py_ssize_t per_sample, bint has_residual,
                     floating residual, int norm, const floating *weight, const floating *x,
                     const floating *out, const floating *derivative, const floating *mean_pre,
                     const floating *inv_pre, const floating *inv_post, floating *g,
                     floating *g_h, floating *work, floating *u_work, const double *x_exp,
                     const double *out_exp) noexcept nogil:
    """Cotangents g (rows, n) at the layer output -> at its input, in place.

    Row r belongs to sample r // per_sample of the block whose input x,
    output out, phi'(h) and LN statistics are given.  g_h (rows, n) receives
    the cotangent at h; it may alias ``derivative`` when per_sample == 1.
    work (rows, n) is scratch; u_work (samples, n) is scratch for pre-norm.
    x_exp and out_exp (samples,) are the exponents of x and out (_forward_layer).
    """
    cdef Py_ssize_t r, i, s
    cdef Py_ssize_t samples = rows // per_sample
    cdef floating scale = residual if has_residual else 1
    if norm == NORM_POST:
        _layer_norm_product(rows, n, per_sample, g, out, inv_post, out_exp)
    for r in range(rows):
        s = r // per_sample
        for i in range(n):
            g_h[r * n + i] = scale * g[r * n + i] * derivative[s * n + i]
    _rows_times_weight(rows, n, g_h, weight, work)
    if norm == NORM_PRE:
        _recompute_pre_norm(samples, n, x, mean_pre, inv_pre, u_work, x_exp)
        _layer_norm_product(rows, n, per_sample, work, u_work, inv_pre, x_exp)
    if has_residual:
        for i in range(rows * n):
            g[i] = g[i] + work[i]
    else:
        memcpy(g, work, rows * n * sizeof(floating))


cdef inline void _jvp_layer(Py_ssize_t rows, Py_ssize_t n, Py_ssize_t per_sample, bint has_residual,
                     floating residual, int norm, const floating *weight, const floating *u,
                     const floating *out, const floating *derivative, const floating *inv_pre,
                     const floating *inv_post, floating *t, floating *work,
                     floating *work2, const double *x_exp, const double *out_exp) noexcept nogil:
    """Tangents t (rows, n) at the layer input -> at its output, in place.

    u is the layer's linear input (LN(x) for pre-norm, else x) of the block's
    samples; work and work2 (rows, n) are scratch; x_exp and out_exp
    (samples,) the exponents of u and out (_forward_layer).
    """
    cdef Py_ssize_t r, i, s
    cdef const floating *t_u = t
    if norm == NORM_PRE:
        memcpy(work, t, rows * n * sizeof(floating))
        _layer_norm_product(rows, n, per_sample, work, u, inv_pre, x_exp)
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
        _layer_norm_product(rows, n, per_sample, t, out, inv_post, out_exp)


# ---------------------------------------------------------------------------
# Renormalised cotangents
# ---------------------------------------------------------------------------

cdef inline void _renormalise_rows(Py_ssize_t rows, Py_ssize_t n, floating *g, double *log_scale,
                                   double *log_norm_out, Py_ssize_t out_stride) noexcept nogil:
    """Record log ||g_r|| + log_scale_r, then rescale g_r to unit norm and carry the factor.

    The row is first scaled by the power of two 2**-e that brings its largest
    entry into [0.5, 1) (exact), so the sum of squares neither underflows nor
    overflows: the log norm is exact for any finite scale of g (a plain sum of
    squares loses rows below 1e-154 or above 1e154 in float64).  A zero row
    records -inf and stays zero.
    """
    cdef Py_ssize_t r, i
    cdef double total, largest, magnitude, unit, unit_rest, inv, value, log_norm
    cdef int exponent
    for r in range(rows):
        largest = 0
        for i in range(n):
            magnitude = fabs(<double> g[r * n + i])
            if magnitude > largest:
                largest = magnitude
        if largest > 0:
            frexp(largest, &exponent)
            # 2**-e in one factor, or two when it exceeds the largest double (subnormal rows)
            unit = ldexp(1.0, -exponent // 2 if exponent < -1000 else -exponent)
            unit_rest = ldexp(1.0, -exponent - (-exponent // 2)) if exponent < -1000 else 1.0
            total = 0
            for i in range(n):
                value = (<double> g[r * n + i] * unit) * unit_rest
                g[r * n + i] = <floating> value
                total = total + value * value
            log_norm = exponent * M_LN2 + 0.5 * log(total)
            log_norm_out[r * out_stride] = log_scale[r] + log_norm
            inv = 1.0 / sqrt(total)
            for i in range(n):
                g[r * n + i] = <floating> (<double> g[r * n + i] * inv)
            log_scale[r] = log_scale[r] + log_norm
        else:
            log_norm_out[r * out_stride] = -INFINITY


# ---------------------------------------------------------------------------
# Weight-gradient norms: log ||G^T U||_F for any finite scale of U
# ---------------------------------------------------------------------------

cdef inline double _largest_row_norm(Py_ssize_t rows, Py_ssize_t n, const floating *a) noexcept nogil:
    """The largest row norm of a (rows, n), for any finite scale of a.

    Entries are scaled by the power of two that brings the largest into [0.5, 1)
    before squaring (a plain sum of squares is 0 for rows below 1e-154, which
    made weight-gradient norms -inf where a layer's inputs are tiny).
    """
    cdef Py_ssize_t r, i
    cdef double total, value, largest = 0, biggest = 0, unit
    cdef int exponent
    for i in range(rows * n):
        value = fabs(<double> a[i])
        if value > biggest:
            biggest = value
    if biggest == 0:
        return 0
    frexp(biggest, &exponent)
    if exponent < -1000:  # subnormal entries: 2**-e is not a double; such rows are below any weight
        return biggest
    unit = ldexp(1.0, -exponent)
    for r in range(rows):
        total = 0
        for i in range(n):
            value = <double> a[r * n + i] * unit
            total = total + value * value
        if total > largest:
            largest = total
    return ldexp(sqrt(largest), exponent)


cdef inline double _log_norm_of_outer_sum(Py_ssize_t batch, Py_ssize_t gn, Py_ssize_t n, floating *g,
                                          floating *u, floating *product) noexcept nogil:
    """log ||sum_b g_b u_b^T||_F = log ||G^T U||_F for G (batch, gn) and U (batch, n); -inf when 0.

    G and U are scaled in place to unit largest row (their squares cannot
    underflow: G, the cotangents at h, may be far below 1 in float32) and the
    scales added back in log space.  With fewer samples than columns of U
    the squared norm comes from the two Gram matrices, sum_ij (G G^T)_ij
    (U U^T)_ij, without forming the (gn, n) product; ``product`` holds
    2 batch^2 values then, else gn * n.  Shared by the weight-gradient norms of
    every model kind (the callers weight the rows of G by their log scales).
    """
    cdef bint use_gram = batch < n
    cdef Py_ssize_t i, j
    cdef floating *gram_g = product
    cdef floating *gram_u = product + batch * batch
    cdef double total = 0, u_scale = _largest_row_norm(batch, n, u), g_scale = 0
    if not _within(batch * gn, g, -40, 40):  # rarely: squares of G would leave float32
        g_scale = _largest_row_norm(batch, gn, g)
    if u_scale > 0:
        for i in range(batch * n):
            u[i] = <floating> (u[i] / u_scale)
    else:
        u_scale = 1
    if g_scale > 0:
        for i in range(batch * gn):
            g[i] = <floating> (g[i] / g_scale)
    else:
        g_scale = 1  # G in range, or 0 (then the norm is -inf anyway)
    if use_gram:
        _gram_upper(batch, gn, g, gram_g)
        _gram_upper(batch, n, u, gram_u)
        for j in range(batch):
            for i in range(j):
                total = total + 2.0 * gram_g[j * batch + i] * gram_u[j * batch + i]
            total = total + <double> gram_g[j * batch + j] * gram_u[j * batch + j]
    else:
        # the product's transpose (n, gn) = U^T G, column-major
        _gemm(c'N', c'T', <int> n, <int> gn, <int> batch, <floating> 1, u, <int> n, g, <int> gn,
              <floating> 0, product, <int> n)
        for i in range(gn * n):
            total = total + <double> product[i] * product[i]
    if total > 0:
        return log(u_scale) + log(g_scale) + 0.5 * log(total)
    return -INFINITY


# ---------------------------------------------------------------------------
# LAPACK QR, column-major (a, n) x k (the Lyapunov kernels of stacks and recurrent cells)
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


cdef inline int _qr_workspace(floating probe, int n, int k) noexcept nogil:
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


# ---------------------------------------------------------------------------
# Helpers for blocks
# ---------------------------------------------------------------------------

cdef inline Py_ssize_t _block_start(Py_ssize_t block, Py_ssize_t n_blocks,
                                    Py_ssize_t total) noexcept nogil:
    """Start of block ``block`` in a contiguous, balanced partition of range(total).

    Values, not out-pointers: Cython makes a prange variable thread-private
    only when the loop body assigns it.
    """
    return (block * total) // n_blocks


# ---------------------------------------------------------------------------
# Workspaces: one allocation per thread, carved into named pieces
# ---------------------------------------------------------------------------
#
# Each kernel writes its per-thread layout once, as a function that carves its
# pieces with _piece in a fixed order.  Called on _measuring() (before the
# parallel region) it only adds up the bytes; called on the thread's
# _workspace_allocate(those bytes) with the same arguments it hands out the
# pieces.  A NULL base means the allocation failed: the kernel's threads skip
# their work and the kernel raises MemoryError after the region.

cdef enum:
    WORKSPACE_ALIGNMENT = 64  # a cache line, and the widest vector load (AVX-512)


cdef struct Workspace:
    char *base          # where the pieces start, WORKSPACE_ALIGNMENT-aligned; NULL: measuring or failed
    size_t used         # bytes carved so far (after measuring: the bytes to allocate)
    void *allocation    # what malloc returned (base rounds it up): what free takes


cdef inline Workspace _measuring() noexcept nogil:
    """A workspace without memory: carving from it only counts the bytes the pieces need."""
    cdef Workspace space
    space.base = NULL
    space.used = 0
    space.allocation = NULL
    return space


cdef inline Workspace _workspace_allocate(size_t size, bint refuse) noexcept nogil:
    """``size`` bytes (a measuring pass's ``used``) to carve from; base is NULL when malloc fails.

    ``refuse`` fails without asking malloc: the modules' test switch
    (_fail_allocations_for_tests), so the MemoryError paths can be tested.
    """
    cdef Workspace space = _measuring()
    if not refuse:
        space.allocation = malloc(size + WORKSPACE_ALIGNMENT)
    if space.allocation != NULL:
        space.base = <char *> ((<uintptr_t> space.allocation + WORKSPACE_ALIGNMENT - 1)
                               & ~(<uintptr_t> (WORKSPACE_ALIGNMENT - 1)))
    return space


cdef inline void _workspace_free(Workspace *space) noexcept nogil:
    free(space.allocation)
    space[0] = _measuring()


cdef inline floating *_piece(Workspace *space, Py_ssize_t count, floating kind) noexcept nogil:
    """The next ``count`` values of ``kind``'s type (kind only selects it), aligned; NULL while measuring."""
    cdef size_t start = ((space.used + WORKSPACE_ALIGNMENT - 1)
                         & ~(<size_t> (WORKSPACE_ALIGNMENT - 1)))
    space.used = start + <size_t> count * sizeof(floating)
    if space.base == NULL:
        return NULL
    return <floating *> (space.base + start)
