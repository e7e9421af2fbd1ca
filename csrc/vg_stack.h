/* vg_stack.h -- constants of the stack's layer shared by the CPU and GPU kernels. */
#ifndef VG_STACK_H
#define VG_STACK_H

/* LN(v) = (v - mean(v)) / sqrt(var(v) + VG_LAYER_NORM_EPS), no affine parameters. */
#define VG_LAYER_NORM_EPS 1e-5

/* Where the normalisation sits (docs/ARCHITECTURE.md): none, a layer norm before the linear map or
   after the residual sum, or a batch norm of the pre-activations.  Python's twin:
   vgcore._activations.NORM_CODES (tests/test_constants.py holds them equal). */
enum { VG_NORM_NONE = 0, VG_NORM_PRE = 1, VG_NORM_POST = 2, VG_NORM_BATCH = 3 };

#endif
