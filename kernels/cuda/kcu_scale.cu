/*
 * kcu_scale.cu - scaling kernel and launcher (see kcu_scale.cuh): one
 * thread per element, grid-stride loop, one f32 multiply (__fmul_rn: never
 * contracted with a neighbouring add).
 */
#include "kernels/cuda/kcu_compat.cuh"
#include "kernels/cuda/kcu_scale.cuh"

static __global__ void kcu_scale_kernel(float *x, size_t n, float s)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] = __fmul_rn(x[i], s);
}

extern "C" int kcu_scale(kcu_ctx *c, float *x, size_t n, float s, char *err, size_t errlen)
{
    if (n == 0)
        return 0;
    unsigned grid = kcu_cdiv(n, 256) > 65536u ? 65536u : kcu_cdiv(n, 256);
    KCU_LAUNCH(kcu_scale_kernel, dim3(grid), dim3(256), 0, c->stream, x, n, s);
    KCU_CHECK_LAUNCH(err, errlen, "kcu_scale");
    return 0;
}
