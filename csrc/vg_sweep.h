/* vg_sweep.h -- the small dense loops of the sweep's shared-draw kernel (vgcore/_ext/_sweep.pyx).
 *
 * Weight-gradient norms of many small problems without a BLAS call each: for a layer with
 * cotangents g (B, n) at h and linear inputs u (B, n), the gradient is G^T U (n, n) and
 *     ||G^T U||_F^2 = sum_ij (g_i . g_j) (u_i . u_j)          (B < n: two B x B Gram matrices)
 *                   = sum over the entries of sum_b g_b u_b^T  (B >= n: the n x n gradient).
 * Double and float twins (suffix _d, _f); sums are accumulated in double.  `omp simd`
 * vectorises the reductions in a fixed order (the same for any number of threads); without
 * OpenMP the pragma is ignored and the loops run in plain order.
 */
#ifndef VG_SWEEP_H
#define VG_SWEEP_H

static inline double vg_dot_d(long n, const double *a, const double *b)
{
    double total = 0;
#pragma omp simd reduction(+ : total)
    for (long i = 0; i < n; ++i)
        total += a[i] * b[i];
    return total;
}

static inline double vg_dot_f(long n, const float *a, const float *b)
{
    double total = 0;
#pragma omp simd reduction(+ : total)
    for (long i = 0; i < n; ++i)
        total += (double)a[i] * (double)b[i];
    return total;
}

/* sum_ij (g_i . g_j)(u_i . u_j) over the rows of g and u (rows, n): the squared Frobenius norm
   of g^T u from the two Gram matrices, each pair once. */
#define VG_GRAM_PRODUCT(SFX, T)                                                           \
    static inline double vg_gram_product_##SFX(long rows, long n, const T *g, const T *u) \
    {                                                                                     \
        double total = 0;                                                                 \
        for (long j = 0; j < rows; ++j) {                                                 \
            for (long i = 0; i < j; ++i)                                                  \
                total += 2.0 * vg_dot_##SFX(n, g + j * n, g + i * n)                      \
                         * vg_dot_##SFX(n, u + j * n, u + i * n);                         \
            total += vg_dot_##SFX(n, g + j * n, g + j * n) * vg_dot_##SFX(n, u + j * n, u + j * n); \
        }                                                                                 \
        return total;                                                                     \
    }
VG_GRAM_PRODUCT(d, double)
VG_GRAM_PRODUCT(f, float)
#undef VG_GRAM_PRODUCT

/* ||sum_b g_b u_b^T||_F^2 with the (n, n) sum formed in `gradient` (scratch, n * n values, in
   double): for rows >= n, where it is cheaper than the Gram matrices. */
#define VG_OUTER_PRODUCT(SFX, T)                                                          \
    static inline double vg_outer_product_##SFX(long rows, long n, const T *g, const T *u, \
                                                double *gradient)                         \
    {                                                                                     \
        double total = 0;                                                                 \
        for (long i = 0; i < n * n; ++i)                                                  \
            gradient[i] = 0;                                                              \
        for (long b = 0; b < rows; ++b)                                                   \
            for (long i = 0; i < n; ++i) {                                                \
                double gi = (double)g[b * n + i];                                         \
                double *row = gradient + i * n;                                           \
                const T *ub = u + b * n;                                                  \
                _Pragma("omp simd")                                                       \
                for (long j = 0; j < n; ++j)                                              \
                    row[j] += gi * (double)ub[j];                                         \
            }                                                                             \
        _Pragma("omp simd reduction(+ : total)")                                          \
        for (long i = 0; i < n * n; ++i)                                                  \
            total += gradient[i] * gradient[i];                                           \
        return total;                                                                     \
    }
VG_OUTER_PRODUCT(d, double)
VG_OUTER_PRODUCT(f, float)
#undef VG_OUTER_PRODUCT

#endif /* VG_SWEEP_H */
