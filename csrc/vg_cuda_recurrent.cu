/*
 * vg_cuda_recurrent.cu -- the CUDA kernels of the recurrent models' CuPy mirror
 * (vgcore/backends/cuda_recurrent.py).
 *
 * Built as vg_cuda_kernels.cu is: by NVRTC at run time (cupy.RawModule, float
 * and double instantiations through name_expressions) and by nvcc in CI
 * (tests/test_cuda_build.py).  No system header.  The cell's math is the CPU
 * kernels' own header, csrc/vg_gates.h: one thread computes one hidden unit j
 * of one row r with the very unit functions the CPU block loops call.  The
 * matrix products around them (W_hh h, W_ih u, g_hh W_hh) are cuBLAS's,
 * through cupy.matmul, for the whole batch at once.
 *
 * Layouts as in vg_gates.h: pre_h / pre_x / g_hh / t_a (rows, G n), states and
 * vectors (rows, N), caches (samples, C), row-major; rows of vectors belong to
 * sample r / per_sample.  Offsets in long long.
 */
#include "vg_gates.h"

__device__ __forceinline__ void vg_cell_forward_unit_t(int cell, int activation, long n, long j,
                                                       const double *pre_h, const double *bias_hh,
                                                       const double *pre_x, const double *bias_ih,
                                                       const double *state_prev, double *state_out,
                                                       double *cache)
{
    vg_cell_forward_unit_d(cell, activation, n, j, pre_h, bias_hh, pre_x, bias_ih, state_prev, state_out,
                           cache);
}

__device__ __forceinline__ void vg_cell_forward_unit_t(int cell, int activation, long n, long j,
                                                       const float *pre_h, const float *bias_hh,
                                                       const float *pre_x, const float *bias_ih,
                                                       const float *state_prev, float *state_out,
                                                       float *cache)
{
    vg_cell_forward_unit_f(cell, activation, n, j, pre_h, bias_hh, pre_x, bias_ih, state_prev, state_out,
                           cache);
}

__device__ __forceinline__ void vg_cell_backward_unit_t(int cell, long n, long j, const double *g,
                                                        const double *cache, const double *state_prev,
                                                        double *g_hh, double *g_prev)
{
    vg_cell_backward_unit_d(cell, n, j, g, cache, state_prev, g_hh, g_prev);
}

__device__ __forceinline__ void vg_cell_backward_unit_t(int cell, long n, long j, const float *g,
                                                        const float *cache, const float *state_prev,
                                                        float *g_hh, float *g_prev)
{
    vg_cell_backward_unit_f(cell, n, j, g, cache, state_prev, g_hh, g_prev);
}

__device__ __forceinline__ void vg_cell_jvp_unit_t(int cell, long n, long j, const double *t_a,
                                                   const double *t_prev, const double *cache,
                                                   const double *state_prev, double *t_out)
{
    vg_cell_jvp_unit_d(cell, n, j, t_a, t_prev, cache, state_prev, t_out);
}

__device__ __forceinline__ void vg_cell_jvp_unit_t(int cell, long n, long j, const float *t_a,
                                                   const float *t_prev, const float *cache,
                                                   const float *state_prev, float *t_out)
{
    vg_cell_jvp_unit_f(cell, n, j, t_a, t_prev, cache, state_prev, t_out);
}

/* (row, unit) of this thread, or false past the end. */
__device__ __forceinline__ bool vg_row_unit(int rows, int n, long long *row, long *unit)
{
    const long long index = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (index >= (long long)rows * n)
        return false;
    *row = index / n;
    *unit = (long)(index % n);
    return true;
}

/* One step forward: state_prev (rows, N) -> state_out (rows, N), cache (rows, C) filled.
   pre_x may be NULL (no inputs). */
template <typename T>
__global__ void vg_cell_forward(int cell, int activation, int rows, int n, const T *pre_h, const T *bias_hh,
                                const T *pre_x, const T *bias_ih, const T *state_prev, T *state_out,
                                T *cache)
{
    long long r;
    long j;
    if (!vg_row_unit(rows, n, &r, &j))
        return;
    const long long gn = (long long)vg_cell_gates(cell) * n, width = cell == VG_CELL_LSTM ? 2LL * n : n;
    const long long columns = 2 * gn + (long long)vg_cell_extra(cell) * n;
    vg_cell_forward_unit_t(cell, activation, n, j, pre_h + r * gn, bias_hh,
                           pre_x ? pre_x + r * gn : (const T *)0, bias_ih, state_prev + r * width,
                           state_out + r * width, cache + r * columns);
}

/* One step backward without the W_hh product: g (rows, N) at s_t -> g_hh (rows, G n; rows
   g_hh_stride apart) and the direct part of g_prev (rows, N), which may alias g. */
template <typename T>
__global__ void vg_cell_backward(int cell, int rows, int n, int per_sample, const T *g, const T *cache,
                                 const T *state_prev, T *g_hh, long long g_hh_stride, T *g_prev)
{
    long long r;
    long j;
    if (!vg_row_unit(rows, n, &r, &j))
        return;
    const long long width = cell == VG_CELL_LSTM ? 2LL * n : n;
    const long long columns = 2LL * vg_cell_gates(cell) * n + (long long)vg_cell_extra(cell) * n;
    const long long s = r / per_sample;
    vg_cell_backward_unit_t(cell, n, j, g + r * width, cache + s * columns, state_prev + s * width,
                            g_hh + r * g_hh_stride, g_prev + r * width);
}

/* One step's JVP without the W_hh product: t_a (rows, G n) = t_h W_hh^T, t_prev (rows, N) ->
   t_out (rows, N), which may alias t_prev. */
template <typename T>
__global__ void vg_cell_jvp(int cell, int rows, int n, int per_sample, const T *t_a, const T *t_prev,
                            const T *cache, const T *state_prev, T *t_out)
{
    long long r;
    long j;
    if (!vg_row_unit(rows, n, &r, &j))
        return;
    const long long gn = (long long)vg_cell_gates(cell) * n, width = cell == VG_CELL_LSTM ? 2LL * n : n;
    const long long columns = 2 * gn + (long long)vg_cell_extra(cell) * n;
    const long long s = r / per_sample;
    vg_cell_jvp_unit_t(cell, n, j, t_a + r * gn, t_prev + r * width, cache + s * columns,
                       state_prev + s * width, t_out + r * width);
}
