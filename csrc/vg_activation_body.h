/*
 * vg_activation_body.h -- one body for the float and double twins.
 *
 * Included twice by vg_activations.h with VG_T the scalar type, VG_SFX the
 * name suffix and VG_EXP ... VG_ERFC_FN (libm names) the matching libm functions.  Do not
 * include it directly.
 */

typedef struct {
    VG_T value;      /* phi(h)  */
    VG_T derivative; /* phi'(h) */
} VG_SFX(vg_pair);

/* exp(-|h|) / (1 + exp(-|h|)) and its complement: sigmoid(h) and
   1 - sigmoid(h) without evaluating exp of a positive number. */
VG_HOST_DEVICE static inline void VG_SFX(vg_sigmoid_parts)(VG_T h, VG_T *s, VG_T *one_minus_s)
{
    if (h >= (VG_T)0) {
        VG_T e = VG_EXP(-h);
        *s = (VG_T)1 / ((VG_T)1 + e);
        *one_minus_s = e / ((VG_T)1 + e);
    } else {
        VG_T e = VG_EXP(h);
        *s = e / ((VG_T)1 + e);
        *one_minus_s = (VG_T)1 / ((VG_T)1 + e);
    }
}

/* Cephes' tanh for |h| < 0.625: h + h z P(z) / Q(z) with z = h^2 (double), or a
   degree-5 odd polynomial (float); relative error about 1 ulp. */
VG_HOST_DEVICE static inline VG_T VG_SFX(vg_tanh_small)(VG_T h)
{
    VG_T z = h * h;
#if VG_IS_DOUBLE
    VG_T p = (-9.64399179425052238628e-1 * z - 9.92877231001918586564e1) * z
             - 1.61468768441708447952e3;
    VG_T q = ((z + 1.12811678491632931402e2) * z + 2.23548839060100448583e3) * z
             + 4.84406305325125486048e3;
    return h + h * z * p / q;
#else
    return ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z
             + 1.33314422036e-1f) * z - 3.33332819422e-1f) * z * h + h;
#endif
}

VG_HOST_DEVICE static inline VG_SFX(vg_pair) VG_SFX(vg_activation)(int kind, VG_T h)
{
    VG_SFX(vg_pair) r;
    VG_T s, oms;
    switch (kind) {
    case VG_SIGMOID:
        VG_SFX(vg_sigmoid_parts)(h, &s, &oms);
        r.value = s;
        r.derivative = s * oms;
        break;
    case VG_TANH: {
        /* No libm call for |h| < 0.625, one exp beyond, accurate to ~1 ulp:
           |h| < 0.625:  Cephes' rational approximation tanh h = h + h z P(z) / Q(z),
                         z = h^2, and tanh' = 1 - tanh^2 (no cancellation: tanh^2 < 0.31);
           otherwise:    e = exp(-2|h|) <= 0.29, tanh|h| = (1 - e) / (1 + e),
                         tanh' = 4 e / (1 + e)^2, which keeps full relative precision in
                         the tails where 1 - tanh^2 would round to 0. */
        VG_T a = h < (VG_T)0 ? -h : h, t;
        if (a < (VG_T)0.625) {
            t = VG_SFX(vg_tanh_small)(h);
            r.value = t;
            r.derivative = (VG_T)1 - t * t;
        } else {
            VG_T e = VG_EXP((VG_T)-2 * a);
            t = ((VG_T)1 - e) / ((VG_T)1 + e);
            r.value = h < (VG_T)0 ? -t : t;
            r.derivative = (VG_T)4 * e / (((VG_T)1 + e) * ((VG_T)1 + e));
        }
        break;
    }
    case VG_RELU:
        r.value = h > (VG_T)0 ? h : (VG_T)0;
        r.derivative = h > (VG_T)0 ? (VG_T)1 : (VG_T)0;
        break;
    case VG_LEAKY_RELU:
        r.value = h > (VG_T)0 ? h : (VG_T)VG_LEAKY_SLOPE * h;
        r.derivative = h > (VG_T)0 ? (VG_T)1 : (VG_T)VG_LEAKY_SLOPE;
        break;
    case VG_ELU:
        if (h > (VG_T)0) {
            r.value = h;
            r.derivative = (VG_T)1;
        } else {
            r.value = VG_EXPM1(h);
            r.derivative = VG_EXP(h);
        }
        break;
    case VG_SELU:
        if (h > (VG_T)0) {
            r.value = (VG_T)VG_SELU_SCALE * h;
            r.derivative = (VG_T)VG_SELU_SCALE;
        } else {
            r.value = (VG_T)(VG_SELU_SCALE * VG_SELU_ALPHA) * VG_EXPM1(h);
            r.derivative = (VG_T)(VG_SELU_SCALE * VG_SELU_ALPHA) * VG_EXP(h);
        }
        break;
    case VG_GELU: {
        /* exact GELU: h Phi(h), Phi(h) = erfc(-h / sqrt 2) / 2 */
        VG_T cdf = (VG_T)0.5 * VG_ERFC_FN(-h * (VG_T)VG_SQRT1_2);
        VG_T pdf = (VG_T)VG_INV_SQRT_2PI * VG_EXP((VG_T)-0.5 * h * h);
        r.value = h * cdf;
        r.derivative = cdf + h * pdf;
        break;
    }
    case VG_SILU:
        VG_SFX(vg_sigmoid_parts)(h, &s, &oms);
        r.value = h * s;
        r.derivative = s * ((VG_T)1 + h * oms);
        break;
    case VG_SOFTPLUS:
        /* log(1 + e^h) = max(h, 0) + log1p(e^-|h|) */
        VG_SFX(vg_sigmoid_parts)(h, &s, &oms);
        r.value = (h > (VG_T)0 ? h : (VG_T)0) + VG_LOG1P(VG_EXP(h < (VG_T)0 ? h : -h));
        r.derivative = s;
        break;
    case VG_ERF:
        r.value = VG_ERF_FN(h);
        r.derivative = (VG_T)VG_TWO_INV_SQRT_PI * VG_EXP(-h * h);
        break;
    case VG_LINEAR:
    default:
        r.value = h;
        r.derivative = (VG_T)1;
        break;
    }
    return r;
}

/* phi at an h far below the floats, given as h_scaled = h * 2^-e (e < -VG_SCALE_RANGE):
   derivative = phi'(0+) or phi'(0-) by the sign of h (phi'(0) when h is 0), and
   value = derivative * h_scaled, the scaled phi(h) - phi(0).  Exact to working precision:
   |h| < 2^-RANGE, where the next term of every activation's expansion is negligible. */
VG_HOST_DEVICE static inline VG_SFX(vg_pair) VG_SFX(vg_activation_tiny)(int kind, VG_T h_scaled)
{
    VG_T probe = h_scaled > (VG_T)0 ? VG_SCALE_TINY : (h_scaled < (VG_T)0 ? -VG_SCALE_TINY : (VG_T)0);
    VG_SFX(vg_pair) r = VG_SFX(vg_activation)(kind, probe);
    r.value = r.derivative * h_scaled;
    return r;
}

/* phi at h = h_scaled * 2^e for a row beyond 2^VG_SCALE_RANGE (e > 0), scaled back:
   value = phi(h) * 2^-e and derivative = phi'(h).  An entry with |h| <= 2^RANGE is
   evaluated as it is; beyond, phi is its asymptote a h + c (a = phi'(+-2^RANGE), c =
   phi(+-2^RANGE) - a (+-2^RANGE)), exact to working precision there for every
   activation (tanh, sigmoid and erf are flat: a = 0). */
VG_HOST_DEVICE static inline VG_SFX(vg_pair) VG_SFX(vg_activation_huge)(int kind, VG_T h_scaled, int e)
{
    VG_SFX(vg_pair) r;
    int k = 0;
    VG_T big;
    if (h_scaled != (VG_T)0)
        VG_FREXP(h_scaled, &k);
    if (h_scaled == (VG_T)0 || k + e <= VG_SCALE_RANGE) {
        r = VG_SFX(vg_activation)(kind, VG_LDEXP(h_scaled, e));
        r.value = VG_LDEXP(r.value, -e);
        return r;
    }
    big = h_scaled > (VG_T)0 ? VG_LDEXP((VG_T)1, VG_SCALE_RANGE) : -VG_LDEXP((VG_T)1, VG_SCALE_RANGE);
    r = VG_SFX(vg_activation)(kind, big);
    r.value = r.derivative * h_scaled + VG_LDEXP(r.value - r.derivative * big, -e);
    return r;
}

#ifndef __CUDACC_RTC__ /* host-only: NVRTC (CuPy) compiles device code alone */
/*
 * The CPU kernels' fused elementwise pass over a row-major block (rows, n):
 *     h[r, i] <- phi(h[r, i] + bias[i]),   derivative[r, i] <- phi'(h[r, i] + bias[i]).
 * One loop per activation, so the switch is outside the inner loop and each
 * loop body is the inlined math of one activation (vectorisable where the
 * math allows).
 */
#define VG_BLOCK_CASE(KIND)                                                    \
    case KIND:                                                                 \
        for (r = 0; r < rows; ++r) {                                           \
            VG_T *hr = h + r * n, *dr = derivative + r * n;                    \
            for (i = 0; i < n; ++i) {                                          \
                VG_SFX(vg_pair) p = VG_SFX(vg_activation)(KIND, hr[i] + bias[i]); \
                hr[i] = p.value;                                               \
                dr[i] = p.derivative;                                          \
            }                                                                  \
        }                                                                      \
        break;

static inline void VG_SFX(vg_bias_activation_block)(int kind, long rows, long n, VG_T *h,
                                                    const VG_T *bias, VG_T *derivative)
{
    long r, i;
    switch (kind) {
        VG_BLOCK_CASE(VG_SIGMOID)
        VG_BLOCK_CASE(VG_TANH)
        VG_BLOCK_CASE(VG_RELU)
        VG_BLOCK_CASE(VG_LEAKY_RELU)
        VG_BLOCK_CASE(VG_ELU)
        VG_BLOCK_CASE(VG_SELU)
        VG_BLOCK_CASE(VG_GELU)
        VG_BLOCK_CASE(VG_SILU)
        VG_BLOCK_CASE(VG_SOFTPLUS)
        VG_BLOCK_CASE(VG_ERF)
    default:
        VG_BLOCK_CASE(VG_LINEAR)
    }
}
#undef VG_BLOCK_CASE
#endif /* __CUDACC_RTC__ */
