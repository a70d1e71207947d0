/*
 * kcu_bias.cu - bias-add kernel and launcher (see kcu_bias.cuh): one
 * thread per element, grid-stride loop over rows * cols.
 */
#include "kernels/cuda/kcu_bias.cuh"
#include "kernels/cuda/kcu_compat.cuh"

static __global__ void kcu_bias_kernel(float *y, const float *b, size_t n, int cols)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] += b[i % (size_t)cols];
}

extern "C" int kcu_add_bias(kcu_ctx *c, float *y, const float *b, int rows, int cols,
                            char *err, size_t errlen)
{
    if (rows <= 0 || cols <= 0)
        return 0;
    size_t n = (size_t)rows * (size_t)cols;
    unsigned grid = kcu_cdiv(n, 256) > 65536u ? 65536u : kcu_cdiv(n, 256);
    KCU_LAUNCH(kcu_bias_kernel, dim3(grid), dim3(256), 0, c->stream, y, b, n, cols);
    KCU_CHECK_LAUNCH(err, errlen, "kcu_add_bias");
    return 0;
}
