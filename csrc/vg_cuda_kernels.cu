/*
 * vg_cuda_kernels.cu -- the CUDA kernels of vgcore's CuPy mirror (vgcore/backends/cuda_stack.py).
 *
 * CuPy builds this file at run time with NVRTC (cupy.RawModule, once per
 * device), instantiating each template kernel for float and double through
 * name_expressions; CI compiles it with nvcc (tests/test_cuda_build.py).  It
 * includes no system header, so NVRTC needs nothing but csrc/ on its include
 * path.  The activation math is the CPU kernels' own header.
 *
 * Matrix products are not here: cuBLAS does them through cupy.matmul, over
 * all samples (and all vectors of all samples) at once.  These kernels are
 * the fused row-wise work around each product, so that one layer costs a
 * fixed number of launches whatever the batch.  A kernel that reduces over a
 * row runs one block per row (blockDim.x a multiple of 32, at most 1024,
 * grid = rows); sums are taken in double, as the CPU kernels take them
 * (vgcore/_ext/_kernels.pyx), and in a fixed order, so results are deterministic.
 *
 * Layouts are row-major and C-contiguous.  A row is one vector of n
 * features.  With per_sample = k, rows b*k .. b*k + k - 1 belong to sample b,
 * whose caches (normalised vectors, inverse standard deviations, phi') sit at
 * index b.  Element offsets are computed in long long: B * k * n may exceed
 * 2^31 (a Jacobian of 512 samples of width 2048).
 *
 * Scaled rows (docs/ARCHITECTURE.md, "Rows beyond the floats"; the specification is
 * vgcore/reference/stack.py: scaled_rows, scaled_activation, activation_huge, add_scaled,
 * layer_norm, layer_norm_jacobian_product, layer_forward).  Every stored row of
 * activations r carries an int exponent e_r (int32 arrays beside the rows): its true
 * values are row * 2^e_r.  A row whose largest |entry| * 2^e lies outside
 * [2^-VG_SCALE_RANGE, 2^VG_SCALE_RANGE) is stored scaled to a largest |entry| in
 * [0.5, 1) (e < 0 below the floats, e > 0 beyond them); a row in range has e = 0 and is
 * computed exactly as it was before exponents existed.  LN of a row beyond the floats
 * gives true values (exponent 0) and the true inv_std, so the pre-norm's u = LN(x) has
 * exponent min(e_x, 0).  The exponent of a row is uniform over its block, so every
 * branch on it is too (the block barriers inside are safe).
 */
#include "vg_activations.h"
#include "vg_stack.h"

/* ---- helpers ----------------------------------------------------------- */

__device__ __forceinline__ vg_pair_d vg_activation_t(int kind, double h) { return vg_activation_d(kind, h); }
__device__ __forceinline__ vg_pair_f vg_activation_t(int kind, float h) { return vg_activation_f(kind, h); }
/* phi at h = h_scaled * 2^e_h far below the floats: its linearisation at 0 (the shared header) */
__device__ __forceinline__ vg_pair_d vg_activation_tiny_t(int kind, double h_scaled)
{
    return vg_activation_tiny_d(kind, h_scaled);
}
__device__ __forceinline__ vg_pair_f vg_activation_tiny_t(int kind, float h_scaled)
{
    return vg_activation_tiny_f(kind, h_scaled);
}
/* phi at h = h_scaled * 2^e_h beyond the floats (e_h > R), scaled back: (phi(h) 2^-e_h, phi'(h));
   entries up to 2^R as they are, larger ones on phi's asymptote (the shared header) */
__device__ __forceinline__ vg_pair_d vg_activation_huge_t(int kind, double h_scaled, int e_h)
{
    return vg_activation_huge_d(kind, h_scaled, e_h);
}
__device__ __forceinline__ vg_pair_f vg_activation_huge_t(int kind, float h_scaled, int e_h)
{
    return vg_activation_huge_f(kind, h_scaled, e_h);
}

/* |exponent| of a scaled row at most (SCALE_EXPONENT_LIMIT of vgcore/reference/stack.py; log norms to
   +-3.7e8): 2 e stays an int. */
#define VG_SCALE_EXPONENT_LIMIT (1 << 29)

/* R of the scaled rows: a row is in range when its largest |entry| lies in [2^-R, 2^R). */
__device__ __forceinline__ int vg_scale_range(double) { return VG_SCALE_RANGE_D; }
__device__ __forceinline__ int vg_scale_range(float) { return VG_SCALE_RANGE_F; }

/* v * 2^e in v's own type (exact but where the result is subnormal or overflows). */
__device__ __forceinline__ double vg_ldexp(double v, int e) { return ldexp(v, e); }
__device__ __forceinline__ float vg_ldexp(float v, int e) { return ldexpf(v, e); }

/* k with v = m 2^k, m in [0.5, 1) (frexp's exponent, NumPy's np.frexp(v)[1]); 0 for v = 0.
   Taken in double: a float, subnormal or not, has the same k. */
__device__ __forceinline__ int vg_frexp_exponent(double v)
{
    int k = 0;
    if (v != 0)
        frexp(v, &k);
    return k;
}

/* phi at h = h_scaled * 2^e_h of a scaled row: beyond the floats (huge: e_h > R), below them
   (tiny: e_h <= -R, the linearisation at 0, value phi' h_scaled), else the true values. */
template <typename T>
__device__ __forceinline__ auto vg_scaled_activation_t(int kind, T h_scaled, int e_h, bool huge, bool tiny)
    -> decltype(vg_activation_t(kind, h_scaled))
{
    if (huge)
        return vg_activation_huge_t(kind, h_scaled, e_h);
    if (tiny)
        return vg_activation_tiny_t(kind, h_scaled);
    return vg_activation_t(kind, vg_ldexp(h_scaled, e_h));
}

/* -inf without <math.h> (NVRTC has no system headers). */
__device__ __forceinline__ double vg_negative_infinity()
{
    return __longlong_as_double((long long)0xfff0000000000000ULL);
}

/* Sum over the block of one value per thread, returned to every thread.
   Every thread of the block must call it; scratch is 32 doubles of shared memory. */
__device__ __forceinline__ double vg_block_sum(double value, double *scratch)
{
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const unsigned warps = (blockDim.x + 31u) >> 5;
    for (int offset = 16; offset > 0; offset >>= 1)
        value += __shfl_down_sync(0xffffffffu, value, offset);
    __syncthreads(); /* a previous call's result may still be being read */
    if (lane == 0)
        scratch[warp] = value;
    __syncthreads();
    if (warp == 0) {
        value = lane < warps ? scratch[lane] : 0.0;
        for (int offset = 16; offset > 0; offset >>= 1)
            value += __shfl_down_sync(0xffffffffu, value, offset);
        if (lane == 0)
            scratch[0] = value;
    }
    __syncthreads();
    return scratch[0];
}

/* Maximum over the block, as vg_block_sum. */
__device__ __forceinline__ double vg_block_max(double value, double *scratch)
{
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const unsigned warps = (blockDim.x + 31u) >> 5;
    for (int offset = 16; offset > 0; offset >>= 1)
        value = fmax(value, __shfl_down_sync(0xffffffffu, value, offset));
    __syncthreads();
    if (lane == 0)
        scratch[warp] = value;
    __syncthreads();
    if (warp == 0) {
        value = lane < warps ? scratch[lane] : vg_negative_infinity();
        for (int offset = 16; offset > 0; offset >>= 1)
            value = fmax(value, __shfl_down_sync(0xffffffffu, value, offset));
        if (lane == 0)
            scratch[0] = value;
    }
    __syncthreads();
    return scratch[0];
}

/* ---- layer norm of one row (one block per row) -------------------------- */

/* LN's factor for a row beyond the floats (v * 2^e, e > 0): 1 / sqrt(var + eps 4^-e) in double, so
   the normalised row is true values; 0 for a constant row (var = 0: its centred row is 0 anyway). */
__device__ __forceinline__ double vg_beyond_factor(double variance, int exponent)
{
    if (variance == 0)
        return 0;
    return 1.0 / sqrt(variance + ldexp(VG_LAYER_NORM_EPS, -2 * exponent));
}

/* out <- (v - mean) * inv_std over the calling block's row, given each thread's partial
   sum of v; returns inv_std.  Two passes, as the CPU kernel: the mean in double rounded
   to T, then the variance of the rounded deviations in double.  out may alias v.
   The row is scaled by 2^exponent (reference layer_norm(v, exponent)): its true variance
   is the stored one times 4^exponent.  Below the floats (exponent < 0) out carries the
   same exponent as v; beyond them (exponent > 0) out = (v - mean) / sqrt(var + eps 4^-e),
   true values (exponent 0; a constant row gives 0).  The returned inv_std is always the true
   one, 1 / sqrt(var 4^e + eps), computed in double (for e > 0 as 2^-e times the factor, 1 / sqrt(eps)
   for a constant row; beyond 2^126 in float it is subnormal and loses bits).
   Every thread of the block must call it. */
template <typename T>
__device__ __forceinline__ T vg_layer_norm_row(int n, double partial_sum, const T *v, T *out, int exponent,
                                               double *scratch)
{
    const T mean = (T)(vg_block_sum(partial_sum, scratch) / n);
    double var = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const double centred = (double)(v[i] - mean);
        var += centred * centred;
    }
    const double variance = vg_block_sum(var, scratch) / n;
    T factor, inv_std;
    if (exponent <= 0) {
        inv_std = (T)(1.0 / sqrt(ldexp(variance, 2 * exponent) + VG_LAYER_NORM_EPS));
        factor = inv_std;
    } else { /* the true inv_std is 2^-e times the factor (a constant row: 1 / sqrt(eps)) */
        const double beyond = vg_beyond_factor(variance, exponent);
        factor = (T)beyond;
        inv_std = (T)(variance > 0 ? ldexp(beyond, -exponent) : 1.0 / sqrt(VG_LAYER_NORM_EPS));
    }
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        out[i] = (v[i] - mean) * factor;
    return inv_std;
}

/* Row sums of LN's Jacobian product: J g = inv_std (g - mean(g) - xhat mean(xhat g)).
   Returns (mean(g), mean(xhat g)) in double, for the calling thread's share of the row.
   xhat is stored scaled by 2^exponent (reference layer_norm_jacobian_product): the
   returned mean(xhat g) is that of the stored xhat times 4^exponent, ready to multiply
   the stored xhat again.  A positive exponent (that of an LN input beyond the floats,
   whose normalised row is true values) counts as 0. */
template <typename T>
__device__ __forceinline__ void vg_layer_norm_means(int n, const T *gr, const T *xhat, int exponent,
                                                    double *scratch, double *g_mean, double *gx_mean)
{
    double g_total = 0, gx_total = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        g_total += (double)gr[i];
        gx_total += (double)gr[i] * xhat[i];
    }
    *g_mean = vg_block_sum(g_total, scratch) / n;
    *gx_mean = vg_block_sum(gx_total, scratch) / n;
    if (exponent < 0)
        *gx_mean = ldexp(*gx_mean, 2 * exponent);
}

/* out <- J_LN in (+ addend) over the calling block's row, J_LN the layer norm's (symmetric)
   Jacobian at the normalised vector xhat * 2^min(exponent, 0) with scale inv_std:
   inv_std (in - mean(in) - xhat 4^min(exponent, 0) mean(xhat in)).  out may alias in or addend;
   addend may be NULL.  Every thread of the block must call it. */
template <typename T>
__device__ __forceinline__ void vg_layer_norm_product_row(int n, const T *in, const T *xhat, int exponent,
                                                          T inv_std, const T *addend, T *out, double *scratch)
{
    double g_mean, gx_mean;
    vg_layer_norm_means(n, in, xhat, exponent, scratch, &g_mean, &gx_mean);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const T v = inv_std * (T)((double)in[i] - g_mean - (double)xhat[i] * gx_mean);
        out[i] = addend != nullptr ? addend[i] + v : v;
    }
}

/* ---- scaled rows -------------------------------------------------------- */

/* The reference's scaled_rows for the calling block's row v, standing for v * 2^e, in place;
   largest is max_i |v_i| (block-reduced: the same on every thread).  A zero row, or one whose
   largest entry lies in [2^-R, 2^R) in true value (-R < e + k <= R with largest = m 2^k, m in
   [0.5, 1)), is written as its true values (left as it is when e is 0) and gets exponent 0;
   any other is scaled by 2^-k to a largest entry in [0.5, 1) and gets exponent e + k.
   The new exponent saturates at +-VG_SCALE_EXPONENT_LIMIT (the reference's SCALE_EXPONENT_LIMIT).
   Returns the new exponent (*shifted, if given: whether the row's entries were rescaled).  Each thread rescales its own entries (i = threadIdx.x + j blockDim.x)
   and nothing else, so no barrier is needed after a loop of the same stride wrote them. */
template <typename T>
__device__ __forceinline__ int vg_rescale_row(int n, T *v, int e, double largest, bool *shifted = nullptr)
{
    const int k = vg_frexp_exponent(largest);
    const int range = vg_scale_range((T)0);
    /* saturate: beyond 2^(+-2^29) every true value is 0 or inf, and 2 e must stay an int */
    int top = e + k;
    top = top > VG_SCALE_EXPONENT_LIMIT ? VG_SCALE_EXPONENT_LIMIT : top;
    top = top < -VG_SCALE_EXPONENT_LIMIT ? -VG_SCALE_EXPONENT_LIMIT : top;
    const bool in_range = largest == 0 || (top > -range && top <= range);
    const int shift = in_range ? e : -k;
    if (shift != 0)
        for (int i = threadIdx.x; i < n; i += blockDim.x)
            v[i] = vg_ldexp(v[i], shift);
    if (shifted != nullptr)
        *shifted = shift != 0;
    return in_range ? 0 : top;
}

/* The layer's activation and residual branch for a scaled row (e_u or e_x != 0), in place on
   hr: on entry hr holds the products hs = u W^T of the linear input u, whose true values are
   hs * 2^e_u; on return hr holds y, whose true values are y * 2^(returned exponent), and
   dr (if not NULL) phi'(h).  e_x is the exponent of the layer's input x (the residual's
   addend): e_u = e_x but for a pre-norm row beyond the floats, whose u = LN(x) is true values
   (e_u = 0).  The reference's scaled_activation then add_scaled:
     - e_u = 0: h = hs + bias and f = phi(h), exponent 0, as for a row in range;
     - else h = hs 2^e_u + bias is put on one exponent e_h, the larger of e_u + k(max |hs|)
       and k(max |bias|) (k: frexp's exponent; e_h = 0 when both parts are zero, h = 0):
       h_scaled = hs 2^(e_u - e_h) + bias 2^-e_h;
     - e_h > R: beyond the floats, f = phi(h) 2^-e_h with exponent e_h (vg_activation_huge:
       entries up to 2^R as they are, larger ones on phi's asymptote), phi' the true one;
     - -R < e_h <= R: h is in range, phi is evaluated on the true values h_scaled 2^e_h and f
       has exponent 0;
     - e_h <= -R: every |h| < 2^-R and phi is its linearisation at 0 (vg_activation_tiny:
       phi'(0+) or phi'(0-) by the sign, value phi' h_scaled); f = phi(0) with exponent 0 when
       phi(0) != 0 (it swamps the rest), else f = phi' h_scaled with exponent e_h;
     - y = x + residual f added on the larger exponent of x (e_x) and f; y = f without a residual.
   *total and *largest receive this thread's partial sum and largest |y|.
   Every thread of the block must call it. */
template <typename T>
__device__ int vg_scaled_layer_row(int n, int activation, int has_residual, T residual, const T *bias,
                                   const T *xr, int e_x, int e_u, T *hr, T *dr, double *total,
                                   double *largest, double *scratch)
{
    int e_h = 0;
    if (e_u != 0) { /* uniform over the block: every thread reaches the reductions */
        double products_largest = 0, bias_largest = 0;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            products_largest = fmax(products_largest, fabs((double)hr[i]));
            bias_largest = fmax(bias_largest, fabs((double)bias[i]));
        }
        products_largest = vg_block_max(products_largest, scratch);
        bias_largest = vg_block_max(bias_largest, scratch);
        if (products_largest > 0)
            e_h = e_u + vg_frexp_exponent(products_largest);
        if (bias_largest > 0) {
            const int k_bias = vg_frexp_exponent(bias_largest);
            e_h = (products_largest > 0 && e_h > k_bias) ? e_h : k_bias;
        }
    }
    const int range = vg_scale_range((T)0);
    const bool huge = e_u != 0 && e_h > range;
    const bool tiny = e_u != 0 && e_h <= -range;
    const T zero_value = vg_activation_t(activation, (T)0).value;
    const int e_f = huge ? e_h : ((tiny && zero_value == (T)0) ? e_h : 0);
    const int e_y = (has_residual && e_x > e_f) ? e_x : e_f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const T h_scaled = e_u == 0 ? hr[i] : vg_ldexp(hr[i], e_u - e_h) + vg_ldexp(bias[i], -e_h);
        auto p = e_u == 0 ? vg_activation_t(activation, hr[i] + bias[i])
                          : vg_scaled_activation_t(activation, h_scaled, e_h, huge, tiny);
        if (tiny && zero_value != (T)0)
            p.value = zero_value;
        if (dr != nullptr)
            dr[i] = p.derivative;
        const T branch = residual * p.value;
        const T y = has_residual ? vg_ldexp(xr[i], e_x - e_y) + vg_ldexp(branch, e_f - e_y) : p.value;
        hr[i] = y;
        *total += (double)y;
        *largest = fmax(*largest, fabs((double)y));
    }
    return e_y;
}

/* out[r], exponent[r] <- the reference's scaled_rows(v, 0) for the inputs x_0 of a pass:
   a row in range is copied as it is with exponent 0, a row below 2^-R or from 2^R on (float
   inputs near 3e38, say) is stored scaled. */
template <typename T>
__global__ void vg_scale_rows(int rows, int n, const T *v, T *out, int *exponent)
{
    __shared__ double scratch[32];
    const long long row = blockIdx.x;
    const T *vr = v + row * n;
    T *outr = out + row * n;
    double largest = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        outr[i] = vr[i];
        largest = fmax(largest, fabs((double)vr[i]));
    }
    largest = vg_block_max(largest, scratch);
    const int e = vg_rescale_row(n, outr, 0, largest);
    if (threadIdx.x == 0)
        exponent[row] = e;
}

/* ---- forward pass ------------------------------------------------------ */

/* out[r] = LN(v[r]) = (v[r] - mean) * inv_std and inv_std_out[r]: the pre-norm's
   u = LN(x).  Two passes, as the CPU kernel: the mean in double rounded to T,
   then the variance of the rounded deviations in double.  Row r stands for
   v[r] * 2^exponent[r]; out[r] carries the exponent min(exponent[r], 0) (true values for a
   row beyond the floats: vg_layer_norm_row), inv_std_out[r] is the true scale. */
template <typename T>
__global__ void vg_layer_norm_rows(int rows, int n, const T *v, const int *exponent, T *out, T *inv_std_out)
{
    __shared__ double scratch[32];
    const long long row = blockIdx.x;
    const T *vr = v + row * n;
    double total = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        total += (double)vr[i];
    const T inv_std = vg_layer_norm_row(n, total, vr, out + row * n, exponent[row], scratch);
    if (threadIdx.x == 0)
        inv_std_out[row] = inv_std;
}

/* Everything of one layer after its matrix product, in place on h (rows, n):
       h <- phi(h + bias)                          keeping phi'(h + bias) in derivative,
       h <- x + residual * h                       when has_residual,
       the row check, then h <- LN(h),             when norm is post,
         inv_std_post[r] = its scale
       the row check (vg_rescale_row)              out_exponent[r] = the row's exponent.
   x is the layer's input (for the residual), row r standing for x[r] * 2^x_exponent[r], as
   do the products in h (u = x, or LN(x), which has x's exponent below the floats and is true
   values beyond them: exponent min(e_x, 0)).  A row with exponent 0 is computed as it always
   was (scaled rows: vg_scaled_layer_row).  The post-norm's row y gets the row check before
   LN, so LN never squares entries beyond 2^512 (relu at sigma_w 1e160 in float64); LN of a
   row beyond the floats gives true values (exponent 0) before the final row check.  derivative may be NULL (forward only).
   out_exponent NULL (the last layer of a forward pass) writes the rows as true values,
   x' * 2^e, which may under- or overflow (to +-inf): that is their true value. */
template <typename T>
__global__ void vg_forward_epilogue(int rows, int n, int activation, int has_residual, T residual,
                                    int norm, const T *bias, const T *x, const int *x_exponent, T *h,
                                    T *derivative, T *inv_std_post, int *out_exponent)
{
    __shared__ double scratch[32];
    const long long row = blockIdx.x;
    T *hr = h + row * n;
    const T *xr = x + row * n;
    const int e_x = x_exponent[row];
    const int e_u = (norm == VG_NORM_PRE && e_x > 0) ? 0 : e_x;
    int e_y = 0;
    double total = 0, largest = 0;
    if (e_x == 0) {
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const auto p = vg_activation_t(activation, hr[i] + bias[i]);
            if (derivative != nullptr)
                derivative[row * n + i] = p.derivative;
            const T y = has_residual ? xr[i] + residual * p.value : p.value;
            hr[i] = y;
            total += (double)y;
            largest = fmax(largest, fabs((double)y));
        }
    } else {
        e_y = vg_scaled_layer_row(n, activation, has_residual, residual, bias, xr, e_x, e_u, hr,
                                  derivative != nullptr ? derivative + row * n : (T *)nullptr, &total,
                                  &largest, scratch);
    }
    if (norm == VG_NORM_POST) { /* uniform over the block: no thread is left waiting at a barrier */
        /* a row beyond the floats gets its exponent before LN squares it (squares of 2^512 are inf) */
        bool shifted;
        e_y = vg_rescale_row(n, hr, e_y, vg_block_max(largest, scratch), &shifted);
        if (shifted) { /* LN's mean of the rescaled entries (each thread's own: no barrier needed) */
            total = 0;
            for (int i = threadIdx.x; i < n; i += blockDim.x)
                total += (double)hr[i];
        }
        const T inv_std = vg_layer_norm_row(n, total, (const T *)hr, hr, e_y, scratch);
        if (threadIdx.x == 0)
            inv_std_post[row] = inv_std;
        if (e_y > 0) /* LN of a row beyond the floats: true values */
            e_y = 0;
        largest = 0;
        for (int i = threadIdx.x; i < n; i += blockDim.x)
            largest = fmax(largest, fabs((double)hr[i]));
    }
    largest = vg_block_max(largest, scratch);
    const int e_out = vg_rescale_row(n, hr, e_y, largest);
    if (out_exponent != nullptr) {
        if (threadIdx.x == 0)
            out_exponent[row] = e_out;
    } else if (e_out != 0) {
        for (int i = threadIdx.x; i < n; i += blockDim.x)
            hr[i] = vg_ldexp(hr[i], e_out);
    }
}

/* ---- Jacobian products ------------------------------------------------- */

/* out[r] = J_LN in[r] (+ addend[r]) with J_LN the layer norm's (symmetric) Jacobian of
   sample r / per_sample, whose normalised vector is normalised[s] * 2^min(exponent[s], 0) and
   scale inv_std[s]; J_LN is the identity when normalised is NULL (exponent may then be NULL), and
   nothing is added when addend is NULL.  out may alias in or addend.  Serves the pre-norm of
   the JVP (t_u = J t) and of the VJP (g_x = J g_u + g for a residual layer). */
template <typename T>
__global__ void vg_layer_norm_product(int rows, int n, int per_sample, const T *in, const T *normalised,
                                      const int *exponent, const T *inv_std, const T *addend, T *out)
{
    __shared__ double scratch[32];
    const long long row = blockIdx.x, sample = row / per_sample;
    const T *inr = in + row * n;
    T *outr = out + row * n;
    if (normalised != nullptr) {
        vg_layer_norm_product_row(n, inr, normalised + sample * n, exponent[sample], inv_std[sample],
                                  addend != nullptr ? addend + row * n : nullptr, outr, scratch);
    } else {
        for (int i = threadIdx.x; i < n; i += blockDim.x)
            outr[i] = addend != nullptr ? addend[row * n + i] + inr[i] : inr[i];
    }
}

/* The last block of a vg_vjp_epilogue launch for a gradient profile rescales G_w, the weighted
   cotangents at h, when its largest entry lies outside [2^-40, 2^40): the Gram product
   G_w G_w^T (cuBLAS, in T) would under- or overflow (float cotangents at h below 2^-63
   squared to 0), as would U_s^T G_w below the floats.  Each block has written its row of
   g_weighted = w_b g_h and passes its largest |entry| (largest, this thread's share) in
   row_largest; the block that arrives last (arrivals counts them; it is reset for the next
   launch) takes the largest over the rows and, when it is out of that range, rewrites every
   row as (w_b g_h) 2^shift with a largest entry in [0.5, 1), from g_h and the weights in
   double.  stats[2] = -shift, which vg_weight_gradient_log_norm adds back (times ln 2); 0
   in the usual case, where nothing is rewritten.  The row maxima and g_h of other blocks are
   read through volatile (not L1-cached) loads after the fence that orders their writes.
   Every thread of the block must call it (once, at the end of the kernel). */
template <typename T>
__device__ void vg_rescale_weighted_cotangents(int rows, int n, const T *g_h, const double *sample_weights,
                                               double largest, double *row_largest, unsigned int *arrivals,
                                               T *g_weighted, double *stats, double *scratch)
{
    __shared__ bool last;
    largest = vg_block_max(largest, scratch);
    if (threadIdx.x == 0) {
        row_largest[blockIdx.x] = largest;
        __threadfence();
        last = atomicAdd(arrivals, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) /* uniform over the block */
        return;
    __threadfence();
    const volatile double *maxima = row_largest;
    double top = 0;
    for (int r = threadIdx.x; r < rows; r += blockDim.x)
        top = fmax(top, maxima[r]);
    top = vg_block_max(top, scratch);
    /* 2^-40 and 2^40, as the CPU kernels' _log_norm_of_outer_sum */
    const bool in_range = top == 0 || (top >= 9.094947017729282e-13 && top < 1099511627776.0);
    const int shift = in_range ? 0 : -vg_frexp_exponent(top);
    if (shift != 0) {
        const volatile T *cotangents = g_h;
        const long long count = (long long)rows * n;
        for (long long j = threadIdx.x; j < count; j += blockDim.x)
            g_weighted[j] = (T)ldexp(sample_weights[j / n] * (double)cotangents[j], shift);
    }
    if (threadIdx.x == 0) {
        stats[2] = (double)-shift;
        *arrivals = 0u;
    }
}

/* The VJP of one layer up to its matrix product, rows (B * k, n), in place on g:
       g   <- J_LN g                  when norm is post (out_cache: the layer's output,
                                      sample s scaled by 2^out_exponent[s]),
       g_h  = residual * g * phi'     (residual 1 without a residual branch).
   For a gradient profile (per_sample 1, sample_weights not NULL) it also writes the
   operands of the weight-gradient norm: g_weighted = w_b g_h with w_b = exp(s_b - max s)
   (vg_sample_weights: s_b carries the exponent of u_b), rescaled by a power of two 2^-stats[2]
   when its squares would leave the floats (vg_rescale_weighted_cotangents, with row_largest
   (B,) and arrivals (one counter, 0 between launches)), and u_scaled = u / u_scale, u the
   layer's stored linear input and u_scale = stats[1]. */
template <typename T>
__global__ void vg_vjp_epilogue(int rows, int n, int per_sample, int has_residual, T residual, int norm,
                                const T *out_cache, const int *out_exponent, const T *inv_std_post,
                                const T *derivative, T *g, T *g_h, const double *sample_weights,
                                double *stats, const T *u, T *g_weighted, T *u_scaled,
                                double *row_largest, unsigned int *arrivals)
{
    __shared__ double scratch[32];
    const long long row = blockIdx.x, sample = row / per_sample;
    T *gr = g + row * n;
    const T *dr = derivative + sample * n;
    if (norm == VG_NORM_POST)
        vg_layer_norm_product_row(n, (const T *)gr, out_cache + sample * n, out_exponent[sample],
                                  inv_std_post[sample], (const T *)nullptr, gr, scratch);
    const T scale = has_residual ? residual : (T)1;
    double weighted_largest = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const T value = scale * gr[i] * dr[i];
        g_h[row * n + i] = value;
        if (sample_weights != nullptr) {
            const double weighted = sample_weights[sample] * value;
            g_weighted[row * n + i] = (T)weighted;
            u_scaled[row * n + i] = (T)(u[sample * n + i] / stats[1]);
            weighted_largest = fmax(weighted_largest, fabs(weighted));
        }
    }
    if (sample_weights != nullptr)
        vg_rescale_weighted_cotangents(rows, n, (const T *)g_h, sample_weights, weighted_largest, row_largest,
                                       arrivals, g_weighted, stats, scratch);
}

/* The JVP of one layer after its matrix product, rows (B * k, n), in place on t:
       t <- t + residual * phi' t_h   (phi' t_h without a residual branch),
       t <- J_LN t                    when norm is post (out_cache: the layer's output,
                                      sample s scaled by 2^out_exponent[s]). */
template <typename T>
__global__ void vg_jvp_epilogue(int rows, int n, int per_sample, int has_residual, T residual, int norm,
                                const T *derivative, const T *t_h, const T *out_cache,
                                const int *out_exponent, const T *inv_std_post, T *t)
{
    __shared__ double scratch[32];
    const long long row = blockIdx.x, sample = row / per_sample;
    T *tr = t + row * n;
    const T *dr = derivative + sample * n;
    const T *hr = t_h + row * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        tr[i] = has_residual ? tr[i] + residual * (dr[i] * hr[i]) : dr[i] * hr[i];
    if (norm == VG_NORM_POST)
        vg_layer_norm_product_row(n, (const T *)tr, out_cache + sample * n, out_exponent[sample],
                                  inv_std_post[sample], (const T *)nullptr, tr, scratch);
}

/* ---- gradient profile ---------------------------------------------------- */

/* Per-layer renormalisation of the cotangents g (rows, n): records
   log_norm[r * stride] = log_scale[r] + log ||g_r|| (-inf for a zero row), then
   rescales g_r to unit norm and adds the log of the factor to log_scale[r].
   When u is not NULL, also u_squared_norm[r] = max_i |u_ri| (despite its name: the
   next layer's linear input, whose largest entry scales the weight-gradient operands). */
template <typename T>
__global__ void vg_renormalise_rows(int rows, int n, T *g, double *log_scale, double *log_norm,
                                    int stride, const T *u, double *u_squared_norm)
{
    __shared__ double scratch[32];
    const long long row = blockIdx.x;
    T *gr = g + row * n;
    /* Prescale by the power of two 2^-e that brings the largest entry into [0.5, 1)
       (exact; two factors for subnormal rows): the sum of squares then neither
       underflows nor overflows, so the log norm is exact for any finite scale. */
    double largest = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        largest = fmax(largest, fabs((double)gr[i]));
    largest = vg_block_max(largest, scratch);
    int exponent = 0;
    if (largest > 0)
        frexp(largest, &exponent);
    const double unit = ldexp(1.0, exponent < -1000 ? (-exponent) / 2 : -exponent);
    const double unit_rest = exponent < -1000 ? ldexp(1.0, -exponent - (-exponent) / 2) : 1.0;
    double total = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const double value = ((double)gr[i] * unit) * unit_rest;
        total += value * value;
    }
    total = vg_block_sum(total, scratch);
    const double norm = largest > 0 ? sqrt(total) : 0.0;
    const double log_norm_row = exponent * 0.6931471805599453 + 0.5 * log(total);
    if (norm > 0) {
        const double inv = 1.0 / norm;
        for (int i = threadIdx.x; i < n; i += blockDim.x)
            gr[i] = (T)((((double)gr[i] * unit) * unit_rest) * inv);
    }
    if (u != nullptr) {
        /* the largest |u| of the row (not its squared norm, which is 0 for rows below
           1e-154 and made the weight-gradient norm -inf there): a scale for u */
        const T *ur = u + row * n;
        double u_largest = 0;
        for (int i = threadIdx.x; i < n; i += blockDim.x)
            u_largest = fmax(u_largest, fabs((double)ur[i]));
        u_largest = vg_block_max(u_largest, scratch);
        if (threadIdx.x == 0)
            u_squared_norm[row] = u_largest;
    }
    if (threadIdx.x == 0) {
        if (norm > 0) {
            log_norm[row * stride] = log_scale[row] + log_norm_row;
            log_scale[row] = log_scale[row] + log_norm_row;
        } else {
            log_norm[row * stride] = vg_negative_infinity();
        }
    }
}

/* s_b of sample b's weight-gradient term exp(log_scale_b) g_h,b (u_b 2^e_b): log_scale_b + e_b ln 2,
   rounded as the reference's log_scale + u_exp * np.log(2.0) (no fused multiply-add). */
__device__ __forceinline__ double vg_sample_log(double log_scale, int exponent)
{
    return log_scale + __dmul_rn((double)exponent, 0.6931471805599453);
}

/* The exponent of the linear input u_b of a layer whose input x_b has exponent x_exponent:
   LN(x) of a row beyond the floats is true values (reference layer_forward: min(e, 0)). */
__device__ __forceinline__ int vg_linear_input_exponent(int pre_norm, int x_exponent)
{
    return (pre_norm && x_exponent > 0) ? 0 : x_exponent;
}

/* One block: the sample weights w_b = exp(s_b - max s) of a layer's weight gradient, with
   s_b = log_scale_b + e_b ln 2 (the stored linear input u_b stands for u_b 2^e_b;
   e_b = vg_linear_input_exponent(pre_norm, x_exponent_b), x the layer's input),
   stats[0] = max s and stats[1] = u_scale, the largest |entry| of the layer's stored linear
   input (1 when every row is zero). */
extern "C" __global__ void vg_sample_weights(int batch, int pre_norm, const double *log_scale,
                                             const int *x_exponent, const double *u_squared_norm,
                                             double *weights, double *stats)
{
    __shared__ double scratch[32];
    double top = vg_negative_infinity(), largest = 0;
    for (int b = threadIdx.x; b < batch; b += blockDim.x) {
        top = fmax(top, vg_sample_log(log_scale[b], vg_linear_input_exponent(pre_norm, x_exponent[b])));
        largest = fmax(largest, u_squared_norm[b]);
    }
    top = vg_block_max(top, scratch);
    largest = vg_block_max(largest, scratch);
    for (int b = threadIdx.x; b < batch; b += blockDim.x) {
        const int exponent = vg_linear_input_exponent(pre_norm, x_exponent[b]);
        weights[b] = exp(vg_sample_log(log_scale[b], exponent) - top);
    }
    if (threadIdx.x == 0) {
        const double u_scale = largest;  /* u_squared_norm holds each row's largest |u| */
        stats[0] = top;
        stats[1] = u_scale > 0 ? u_scale : 1.0;
    }
}

/* partials[block] = this block's share of sum_i a[i] b[i], in double (grid-stride). */
template <typename T>
__global__ void vg_dot_partials(long long count, const T *a, const T *b, double *partials)
{
    __shared__ double scratch[32];
    double total = 0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x)
        total += (double)a[i] * b[i];
    total = vg_block_sum(total, scratch);
    if (threadIdx.x == 0)
        partials[blockIdx.x] = total;
}

/* One block: *out = log ||dL/dW|| = stats[0] + log(stats[1]) + stats[2] ln 2 + log(sum of
   partials) / 2, -inf for a zero gradient.  The partials hold ||G_w^T U_s||_F^2 with G_w the
   weighted cotangents at h, scaled by 2^-stats[2] (vg_rescale_weighted_cotangents; 0 as a
   rule), and U_s the scaled linear inputs (vgcore.backends.cuda_stack). */
extern "C" __global__ void vg_weight_gradient_log_norm(int count, const double *partials,
                                                       const double *stats, double *out)
{
    __shared__ double scratch[32];
    double total = 0;
    for (int i = threadIdx.x; i < count; i += blockDim.x)
        total += partials[i];
    total = vg_block_sum(total, scratch);
    if (threadIdx.x == 0)
        *out = total > 0
                   ? stats[0] + log(stats[1]) + __dmul_rn(stats[2], 0.6931471805599453) + 0.5 * log(total)
                   : vg_negative_infinity();
}
