/*
 * kcu_softcap.cu - soft-capping kernel and launcher (see kcu_softcap.cuh):
 * one thread per element, grid-stride loop, cap * tanh(x / cap) in double.
 */
#include "kernels/cuda/kcu_compat.cuh"
#include "kernels/cuda/kcu_softcap.cuh"

static __global__ void kcu_softcap_kernel(float *x, size_t n, double cap)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] = (float)__dmul_rn(cap, tanh((double)x[i] / cap));
}

extern "C" int kcu_softcap(kcu_ctx *c, float *x, size_t n, float cap, char *err,
                           size_t errlen)
{
    if (!(cap > 0.0f))
        return kcu_failf(err, errlen, "kcu_softcap: cap %g must be > 0", (double)cap);
    if (n == 0)
        return 0;
    unsigned grid = kcu_cdiv(n, 256) > 65536u ? 65536u : kcu_cdiv(n, 256);
    KCU_LAUNCH(kcu_softcap_kernel, dim3(grid), dim3(256), 0, c->stream, x, n, (double)cap);
    KCU_CHECK_LAUNCH(err, errlen, "kcu_softcap");
    return 0;
}
