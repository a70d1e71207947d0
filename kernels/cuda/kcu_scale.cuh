/*
 * kcu_scale.cuh - scaling by a constant on the GPU (the embedding scale of
 * Gemma: x * sqrt(dim)), in f32 with one rounding per element, as the
 * CPU backend's loop. C-callable launcher; kernel in kcu_scale.cu.
 */
#ifndef LKQ_KCU_SCALE_CUH
#define LKQ_KCU_SCALE_CUH

#include "kernels/cuda/kcu_rt.cuh"

#ifdef __cplusplus
extern "C" {
#endif

/* x[i] = x[i] * s for i < n (device memory). */
int kcu_scale(kcu_ctx *c, float *x, size_t n, float s, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
