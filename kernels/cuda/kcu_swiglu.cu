/*
 * kcu_swiglu.cu - SwiGLU kernel and launcher (see kcu_swiglu.cuh): one
 * thread per element, g / (1 + exp(-g)) * up in double.
 */
#include "kernels/cuda/kcu_compat.cuh"
#include "kernels/cuda/kcu_swiglu.cuh"

static __global__ void kcu_swiglu_kernel(float *gate, const float *up, size_t n)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n)
        return;
    double g = gate[i];
    gate[i] = (float)(__dmul_rn(g / (1.0 + exp(-g)), (double)up[i]));
}

extern "C" int kcu_swiglu(kcu_ctx *c, float *gate, const float *up, size_t n, char *err,
                          size_t errlen)
{
    if (n == 0)
        return 0;
    KCU_LAUNCH(kcu_swiglu_kernel, dim3(kcu_cdiv(n, 256)), dim3(256), 0, c->stream, gate, up,
               n);
    KCU_CHECK_LAUNCH(err, errlen, "kcu_swiglu");
    return 0;
}
