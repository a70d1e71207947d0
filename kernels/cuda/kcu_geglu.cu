/*
 * kcu_geglu.cu - GeGLU kernel and launcher (see kcu_geglu.cuh): one thread
 * per element, grid-stride loop; the tanh form of GELU in double, the
 * products written out with _rn intrinsics so that nvcc cannot contract
 * them (the oracle's evaluation order).
 */
#include "kernels/cuda/kcu_compat.cuh"
#include "kernels/cuda/kcu_geglu.cuh"

static __global__ void kcu_geglu_kernel(float *gate, const float *up, size_t n)
{
    const double k = 0.7978845608028654; /* sqrt(2/pi) */
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        double g = gate[i];
        double g3 = __dmul_rn(__dmul_rn(__dmul_rn(0.044715, g), g), g);
        double t = tanh(__dmul_rn(k, __dadd_rn(g, g3)));
        double gl = __dmul_rn(__dmul_rn(0.5, g), __dadd_rn(1.0, t));
        gate[i] = (float)__dmul_rn(gl, (double)up[i]);
    }
}

extern "C" int kcu_geglu(kcu_ctx *c, float *gate, const float *up, size_t n, char *err,
                         size_t errlen)
{
    if (n == 0)
        return 0;
    unsigned grid = kcu_cdiv(n, 256) > 65536u ? 65536u : kcu_cdiv(n, 256);
    KCU_LAUNCH(kcu_geglu_kernel, dim3(grid), dim3(256), 0, c->stream, gate, up, n);
    KCU_CHECK_LAUNCH(err, errlen, "kcu_geglu");
    return 0;
}
