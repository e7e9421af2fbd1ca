/* vg_sweep.h -- the small dense loops of the sweep's shared-draw kernel (vgcore/_ext/_sweep.pyx).
 *
 * Weight-gradient norms of many small problems without a BLAS call each: for a layer with
 * cotangents g (B, n) at h and linear inputs u (B, n), the gradient is G^T U (n, n) and
 *     ||G^T U||_F^2 = sum_ij (g_i . g_j) (u_i . u_j)          (B < n: two B x B Gram matrices)
 *                   = sum over the entries of sum_b g_b u_b^T  (B >= n: the n x n gradient).
 * Double and float twins (suffix _d, _f); sums are accumulated in double.
 */
#ifndef VG_SWEEP_H
#define VG_SWEEP_H

#include <math.h>
#include <stdint.h>

/* The loops are compiled for the baseline and, where GCC can dispatch at load time (ifunc), for
   AVX2 and AVX-512F too (chosen by CPU features): the widest vectors whatever the build flags.  Each clone sums
   in a fixed order, so results do not depend on threads (they may differ between machines). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && __GNUC__ >= 8
#define VG_SWEEP_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define VG_SWEEP_CLONES
#endif

/* max_i |a_i| (0 for count 0), vectorised: `omp simd` max reduction. */
#define VG_LARGEST_ENTRY(SFX, T)                                                              \
    VG_SWEEP_CLONES static double vg_largest_entry_##SFX(long count, const T *a)              \
    {                                                                                         \
        double largest = 0;                                                                   \
        _Pragma("omp simd reduction(max : largest)")                                          \
        for (long i = 0; i < count; ++i) {                                                    \
            double value = a[i] < 0 ? -(double)a[i] : (double)a[i];                           \
            largest = value > largest ? value : largest;                                      \
        }                                                                                     \
        return largest;                                                                       \
    }
VG_LARGEST_ENTRY(d, double)
VG_LARGEST_ENTRY(f, float)
#undef VG_LARGEST_ENTRY

/* The row renormalisation of vgcore/_ext/_layers.pxd (_renormalise_rows), vectorised: record
   log ||g_r|| + log_scale_r into log_norm_out[r * stride], rescale g_r to unit norm and carry the
   factor in log_scale_r.  The row is first scaled by the power of two that brings its largest entry
   into [0.5, 1) (exact; in two factors for subnormal rows), so the sum of squares cannot underflow or
   overflow.  A zero row records -inf and stays zero. */
#define VG_RENORMALISE(SFX, T)                                                                \
    VG_SWEEP_CLONES static void vg_renormalise_rows_##SFX(long rows, long n, T *g, double *log_scale, \
                                                          double *log_norm_out, long stride)  \
    {                                                                                         \
        for (long r = 0; r < rows; ++r) {                                                     \
            T *row = g + r * n;                                                               \
            double largest = 0, total = 0;                                                    \
            _Pragma("omp simd reduction(max : largest)")                                      \
            for (long i = 0; i < n; ++i) {                                                    \
                double value = row[i] < 0 ? -(double)row[i] : (double)row[i];                 \
                largest = value > largest ? value : largest;                                  \
            }                                                                                 \
            if (!(largest > 0)) {                                                             \
                log_norm_out[r * stride] = -INFINITY;                                         \
                continue;                                                                     \
            }                                                                                 \
            int exponent;                                                                     \
            frexp(largest, &exponent);                                                        \
            double unit = ldexp(1.0, exponent < -1000 ? (-exponent) / 2 : -exponent);         \
            double unit_rest = exponent < -1000 ? ldexp(1.0, -exponent - (-exponent) / 2) : 1.0; \
            _Pragma("omp simd reduction(+ : total)")                                          \
            for (long i = 0; i < n; ++i) {                                                    \
                double value = ((double)row[i] * unit) * unit_rest;                           \
                row[i] = (T)value;                                                            \
                total += value * value;                                                       \
            }                                                                                 \
            double log_norm = exponent * 0.69314718055994530942 + 0.5 * log(total);           \
            log_norm_out[r * stride] = log_scale[r] + log_norm;                               \
            double inv = 1.0 / sqrt(total);                                                   \
            _Pragma("omp simd")                                                               \
            for (long i = 0; i < n; ++i)                                                      \
                row[i] = (T)((double)row[i] * inv);                                           \
            log_scale[r] += log_norm;                                                         \
        }                                                                                     \
    }
VG_RENORMALISE(d, double)
VG_RENORMALISE(f, float)
#undef VG_RENORMALISE

/* tanh of a row-major block with the bias added, value into h and derivative, as
   VG_BLOCK_CASE(VG_TANH) of csrc/vg_activation_body.h defines them: Cephes' rational form below
   |h| = 0.625; above, e = exp(-2|h|), tanh|h| = (1 - e) / (1 + e), tanh' = 4 e / (1 + e)^2.  Both
   forms are evaluated and blended arithmetically (no branch) and exp(-2|h|) is inlined
   (Cody-Waite reduction by ln 2, degree-13 Taylor polynomial on |r| <= ln(2) / 2, 2^k built from
   its bits in two factors so that a subnormal e is rounded once), so the loop vectorises (about
   2x the header's libm-based loop).  Values agree with it to 1 ulp, derivatives to a few ulps
   (1e-12 relative in the subnormal range); tests/test_sweep_engine.py holds them.  Double only. */
VG_SWEEP_CLONES static void vg_tanh_block_d(long rows, long n, double *h, const double *bias,
                                            double *derivative)
{
    for (long r = 0; r < rows; ++r) {
        double *hr = h + r * n, *dr = derivative + r * n;
#pragma omp simd
        for (long i = 0; i < n; ++i) {
            double x = hr[i] + bias[i];
            double a = x < 0 ? -x : x;
            double small = (double)(a < 0.625);
            /* |x| < 0.625: vg_tanh_small's rational form (on 0 elsewhere, where it is not used) */
            double xs = x * small, z = xs * xs;
            double p = (-9.64399179425052238628e-1 * z - 9.92877231001918586564e1) * z
                       - 1.61468768441708447952e3;
            double q = ((z + 1.12811678491632931402e2) * z + 2.23548839060100448583e3) * z
                       + 4.84406305325125486048e3;
            double t_small = xs + xs * z * p / q;
            /* e = exp(y), y = -2|x| (0 below -1000, where it is 0 in double anyway) */
            double y = -2.0 * a;
            double under = (double)(y < -1000.0);
            y = y * (1.0 - under) - 1000.0 * under;
            double kd = (y * 1.4426950408889634074 + 6755399441055744.0) - 6755399441055744.0;
            double red = (y - kd * 6.93147180369123816490e-01) - kd * 1.90821492927058770002e-10;
            double poly = 1.0 + red * (1.0 + red * (1.0 / 2 + red * (1.0 / 6 + red * (1.0 / 24
                          + red * (1.0 / 120 + red * (1.0 / 720 + red * (1.0 / 5040 + red * (1.0 / 40320
                          + red * (1.0 / 362880 + red * (1.0 / 3628800 + red * (1.0 / 39916800
                          + red * (1.0 / 479001600 + red * (1.0 / 6227020800.0)))))))))))));
            double k1 = (kd * 0.5 - 0.25 + 6755399441055744.0) - 6755399441055744.0, k2 = kd - k1;
            union { double value; int64_t bits; } s1, s2;
            s1.value = k1 + (6755399441055744.0 + 1023.0);  /* k1 + 1023 in the low bits */
            s2.value = k2 + (6755399441055744.0 + 1023.0);
            s1.bits <<= 52;                                   /* 2^k1 */
            s2.bits <<= 52;
            double e = (poly * s1.value) * s2.value * (1.0 - under);
            double t_large = (1.0 - e) / (1.0 + e) * (1.0 - 2.0 * (double)(x < 0.0));
            double d_large = 4.0 * e / ((1.0 + e) * (1.0 + e));
            hr[i] = small * t_small + (1.0 - small) * t_large;
            dr[i] = small * (1.0 - t_small * t_small) + (1.0 - small) * d_large;
        }
    }
}

/* Scratch (in doubles) the two functions below need for rows x n blocks. */
static inline long vg_gradient_norm_scratch(long rows, long n)
{
    return rows < n ? 1 : n * n;
}

/* ||g^T u||_F^2 for g, u (rows, n) row-major.  rows < n: sum_ij (g_i . g_j)(u_i . u_j), each pair
   once, both dot products in one vectorised pass (`omp simd` reductions: a fixed order per clone);
   rows >= n: the n x n gradient sum_b g_b u_b^T.
   scratch: vg_gradient_norm_scratch(rows, n) doubles. */
#define VG_GRADIENT_NORM(SFX, T)                                                              \
    VG_SWEEP_CLONES static double vg_squared_gradient_norm_##SFX(long rows, long n, const T *g, \
                                                                 const T *u, double *scratch)  \
    {                                                                                         \
        double total = 0;                                                                     \
        if (rows < n) {                                                                       \
            for (long i = 0; i < rows; ++i) {                                                 \
                const T *gi = g + i * n, *ui = u + i * n;                                     \
                for (long j = 0; j <= i; ++j) {                                               \
                    const T *gj = g + j * n, *uj = u + j * n;                                 \
                    double gg = 0, uu = 0;                                                    \
                    _Pragma("omp simd reduction(+ : gg, uu)")                                 \
                    for (long k = 0; k < n; ++k) {                                            \
                        gg += (double)gi[k] * (double)gj[k];                                  \
                        uu += (double)ui[k] * (double)uj[k];                                  \
                    }                                                                         \
                    total += (j < i ? 2.0 : 1.0) * gg * uu;                                   \
                }                                                                             \
            }                                                                                 \
        } else {                                                                              \
            for (long i = 0; i < n * n; ++i)                                                  \
                scratch[i] = 0;                                                               \
            for (long b = 0; b < rows; ++b)                                                   \
                for (long i = 0; i < n; ++i) {                                                \
                    double gi = (double)g[b * n + i];                                         \
                    double *row = scratch + i * n;                                            \
                    const T *ub = u + b * n;                                                  \
                    for (long j = 0; j < n; ++j)                                              \
                        row[j] += gi * (double)ub[j];                                         \
                }                                                                             \
            for (long i = 0; i < n * n; ++i)                                                  \
                total += scratch[i] * scratch[i];                                             \
        }                                                                                     \
        return total;                                                                         \
    }
VG_GRADIENT_NORM(d, double)
VG_GRADIENT_NORM(f, float)
#undef VG_GRADIENT_NORM

#endif /* VG_SWEEP_H */
