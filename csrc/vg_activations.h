/*
 * vg_activations.h -- the math of every vgcore activation, written once.
 *
 * Header-only, C99 and CUDA C++ alike: the CPU kernels (Cython) include it
 * directly, the CuPy mirror includes the very same file through a kernel
 * preamble.  Every function is VG_HOST_DEVICE static inline and free of
 * global state, so it is safe to call from any thread or GPU lane.
 *
 * Each activation has a value-and-derivative function returning a 2-field
 * struct, in a double twin (suffix _d) and a float twin (suffix _f) that
 * computes in single precision throughout.  The twins are generated from one
 * body, vg_activation_body.h, included twice with different types.
 *
 * Numerical care:
 *   sigmoid, silu, softplus  never evaluate exp of a positive argument, so
 *                            nothing overflows for |h| large;
 *   tanh'                    is 4 e / (1 + e)^2 with e = exp(-2|h|), which
 *                            keeps full relative precision in the tails
 *                            where 1 - tanh(h)^2 would round to zero;
 *   softplus                 is the exact log(1 + e^h) = max(h, 0) +
 *                            log1p(exp(-|h|)), with no switch to identity.
 */
#ifndef VG_ACTIVATIONS_H
#define VG_ACTIVATIONS_H

#if defined(__CUDACC__) || defined(__CUDA_ARCH__) || defined(__HIPCC__)
#define VG_HOST_DEVICE __host__ __device__
#else
#define VG_HOST_DEVICE
#endif

#ifndef __CUDACC_RTC__
#include <math.h>
#endif

/* Activation codes; the order is the public order of vgcore.ACTIVATIONS. */
enum {
    VG_LINEAR = 0,
    VG_SIGMOID = 1,
    VG_TANH = 2,
    VG_RELU = 3,
    VG_LEAKY_RELU = 4,
    VG_ELU = 5,
    VG_SELU = 6,
    VG_GELU = 7,
    VG_SILU = 8,
    VG_SOFTPLUS = 9,
    VG_ERF = 10,
    VG_N_ACTIVATIONS = 11
};

#define VG_LEAKY_SLOPE 0.01
#define VG_SELU_ALPHA 1.6732632423543772848170429916717
#define VG_SELU_SCALE 1.0507009873554804934193349852946
#define VG_SQRT1_2 0.70710678118654752440084436210485     /* 1 / sqrt(2)      */
#define VG_INV_SQRT_2PI 0.39894228040143267793994605993438 /* 1 / sqrt(2 pi)   */
#define VG_TWO_INV_SQRT_PI 1.1283791670955125738961589031215 /* 2 / sqrt(pi)  */

/* Saturation threshold on |phi'(h)| used by the gradient profile. */
#define VG_SATURATION_THRESHOLD 1e-3

/* The scaled forward pass (docs/ARCHITECTURE.md, "Rows beyond the floats"): a row of
   activations whose largest entry is below 2^-VG_SCALE_RANGE or above 2^VG_SCALE_RANGE
   is kept as a scaled row times 2^e, e carried apart, so no forward pass underflows or
   overflows.  Below 2^-RANGE every activation equals its linearisation at 0, and above
   2^RANGE its asymptote a h + c, to working precision (the next term is 2^-RANGE
   relative: 2^-100 in double, 2^-30 in float). */
#define VG_SCALE_RANGE_D 100
#define VG_SCALE_RANGE_F 30
#define VG_SCALE_TINY_D 7.8886090522101180541172856528278622967320643510902e-31 /* 2^-100 */
#define VG_SCALE_TINY_F 9.31322574615478515625e-10f                             /* 2^-30  */

/* ---- double twin ------------------------------------------------------ */
#define VG_T double
#define VG_IS_DOUBLE 1
#define VG_SFX(name) name##_d
#define VG_EXP exp
#define VG_EXPM1 expm1
#define VG_LOG1P log1p
#define VG_ERF_FN erf
#define VG_ERFC_FN erfc
#define VG_SCALE_TINY VG_SCALE_TINY_D
#define VG_SCALE_RANGE VG_SCALE_RANGE_D
#define VG_LDEXP ldexp
#define VG_FREXP frexp
#include "vg_activation_body.h"
#undef VG_T
#undef VG_IS_DOUBLE
#undef VG_SFX
#undef VG_EXP
#undef VG_EXPM1
#undef VG_LOG1P
#undef VG_ERF_FN
#undef VG_ERFC_FN
#undef VG_SCALE_TINY
#undef VG_SCALE_RANGE
#undef VG_LDEXP
#undef VG_FREXP

/* ---- float twin ------------------------------------------------------- */
#define VG_T float
#define VG_IS_DOUBLE 0
#define VG_SFX(name) name##_f
#define VG_EXP expf
#define VG_EXPM1 expm1f
#define VG_LOG1P log1pf
#define VG_ERF_FN erff
#define VG_ERFC_FN erfcf
#define VG_SCALE_TINY VG_SCALE_TINY_F
#define VG_SCALE_RANGE VG_SCALE_RANGE_F
#define VG_LDEXP ldexpf
#define VG_FREXP frexpf
#include "vg_activation_body.h"
#undef VG_T
#undef VG_IS_DOUBLE
#undef VG_SFX
#undef VG_EXP
#undef VG_EXPM1
#undef VG_LOG1P
#undef VG_ERF_FN
#undef VG_ERFC_FN
#undef VG_SCALE_TINY
#undef VG_SCALE_RANGE
#undef VG_LDEXP
#undef VG_FREXP

#endif /* VG_ACTIVATIONS_H */
