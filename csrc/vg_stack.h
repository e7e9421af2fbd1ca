/* vg_stack.h -- constants of the stack's layer shared by the CPU and GPU kernels. */
#ifndef VG_STACK_H
#define VG_STACK_H

/* LN(v) = (v - mean(v)) / sqrt(var(v) + VG_LAYER_NORM_EPS), no affine parameters. */
#define VG_LAYER_NORM_EPS 1e-5

/* Where the layer norm sits (DESIGN.md): none, before the linear map, after the residual sum. */
enum { VG_NORM_NONE = 0, VG_NORM_PRE = 1, VG_NORM_POST = 2 };

#endif
