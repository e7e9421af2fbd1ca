/*
 * vg_batchnorm_kernels.cu -- the CUDA kernels of the batch-norm CuPy mirror
 * (vgcore/backends/cuda_batchnorm.py), twins of vgcore/_ext/_batchnorm.pyx.
 *
 * Built like vg_cuda_kernels.cu, whose helpers it includes (vg_activation_t,
 * vg_block_sum, vg_negative_infinity): by CuPy's RawModule at run time with
 * NVRTC, template kernels instantiated for float and double; by nvcc in CI
 * (tests/test_batchnorm_cuda_build.py).  No system header.
 *
 * BN normalises each feature over the batch, so the kernels that reduce run
 * one block per feature column (grid = n, or count * n for count batch
 * vectors at once), striding over the batch with blockDim.x threads; sums are
 * taken in double in a fixed order, as the CPU kernels take them.  Matrix
 * products are cuBLAS's (cupy.matmul).  Layouts are row-major and
 * C-contiguous: a batch is (B, n), count batch vectors (count, B, n).
 */
#include "vg_cuda_kernels.cu"

/* One layer's work after v = x W^T (cuBLAS, in z): z <- BN(v + b), out <- x' and
   derivative <- phi'(z) (derivative may be NULL), inv_std[j] <- 1 / sqrt(var + eps).
   One block per feature column j; the mean in double rounded to T, then the variance
   of the rounded deviations in double, as vgcore/_ext/_batchnorm.pyx. */
template <typename T>
__global__ void vg_bn_forward_columns(int batch, int n, int activation, int has_residual, T residual,
                                      const T *bias, const T *x, T *z, T *out, T *derivative, T *inv_std)
{
    __shared__ double scratch[32];
    const int j = blockIdx.x;
    double partial = 0;
    for (int b = threadIdx.x; b < batch; b += blockDim.x) {
        const long long at = (long long)b * n + j;
        const T value = z[at] + bias[j];
        z[at] = value;
        partial += (double)value;
    }
    const T mean = (T)(vg_block_sum(partial, scratch) / batch);
    double var = 0;
    for (int b = threadIdx.x; b < batch; b += blockDim.x) {
        const double centred = (double)(z[(long long)b * n + j] - mean);
        var += centred * centred;
    }
    const T inv = (T)(1.0 / sqrt(vg_block_sum(var, scratch) / batch + VG_LAYER_NORM_EPS));
    if (threadIdx.x == 0)
        inv_std[j] = inv;
    for (int b = threadIdx.x; b < batch; b += blockDim.x) {
        const long long at = (long long)b * n + j;
        const T h = (z[at] - mean) * inv;
        z[at] = h;
        const auto pair = vg_activation_t(activation, h);
        out[at] = has_residual ? x[at] + residual * pair.value : pair.value;
        if (derivative != 0)
            derivative[at] = pair.derivative;
    }
}

/* In place on count batch vectors v (count, B, n): v <- inv_std (v - mean_b v - z mean_b(v z)),
   BN's (symmetric) Jacobian over the batch at the normalised z (B, n).  One block per
   (vector, feature): grid count * n. */
template <typename T>
__global__ void vg_bn_product(int count, int batch, int n, T *v, const T *z, const T *inv_std)
{
    __shared__ double scratch[32];
    const int j = blockIdx.x % n;
    T *column = v + (long long)(blockIdx.x / n) * batch * n + j;
    double total = 0, total_z = 0;
    for (int b = threadIdx.x; b < batch; b += blockDim.x) {
        const T value = column[(long long)b * n];
        total += (double)value;
        total_z += (double)value * z[(long long)b * n + j];
    }
    const double mean = vg_block_sum(total, scratch) / batch;
    const double mean_z = vg_block_sum(total_z, scratch) / batch;
    for (int b = threadIdx.x; b < batch; b += blockDim.x) {
        const long long at = (long long)b * n;
        column[at] = inv_std[j] * (T)((double)column[at] - mean - (double)z[at + j] * mean_z);
    }
}

/* Row b of the input cotangent: g_in[b] (= g_v W from cuBLAS) += pending * g[b] when residual,
   and row_squares[b] = ||g_in[b]||^2 in double.  One block per row. */
template <typename T>
__global__ void vg_bn_rows(int batch, int n, int has_residual, const double *pending, const T *g, T *g_in,
                           double *row_squares)
{
    __shared__ double scratch[32];
    const long long row = (long long)blockIdx.x * n;
    const T keep = (T)(*pending);
    double total = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        T value = g_in[row + i];
        if (has_residual) {
            value = value + keep * g[row + i];
            g_in[row + i] = value;
        }
        total += (double)value * value;
    }
    total = vg_block_sum(total, scratch);
    if (threadIdx.x == 0)
        row_squares[blockIdx.x] = total;
}

/* The batch-wide renormalisation of one layer (one block): log_grad_norm[b * stride] =
   log_scale + log ||g_b||, then log_scale += log ||G||_F and pending = 1 / ||G||_F (the factor
   the next layer applies); a zero cotangent keeps its scale (pending 1). */
extern "C" __global__ void vg_bn_batch_scale(int batch, const double *row_squares, double *log_scale,
                                             double *pending, double *log_grad_norm, int stride)
{
    __shared__ double scratch[32];
    const double scale = *log_scale;
    double total = 0;
    for (int b = threadIdx.x; b < batch; b += blockDim.x) {
        const double squares = row_squares[b];
        total += squares;
        log_grad_norm[(long long)b * stride] = squares > 0 ? scale + 0.5 * log(squares) : vg_negative_infinity();
    }
    total = vg_block_sum(total, scratch); /* synchronises: every thread has read *log_scale */
    if (threadIdx.x == 0) {
        if (total > 0) {
            *log_scale = scale + 0.5 * log(total);
            *pending = 1.0 / sqrt(total);
        } else {
            *pending = 1.0;
        }
    }
}
