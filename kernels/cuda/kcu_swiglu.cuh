/*
 * kcu_swiglu.cuh - SwiGLU on the GPU, same contract as kref_swiglu.
 * C-callable launcher; kernel in kcu_swiglu.cu.
 */
#ifndef LKQ_KCU_SWIGLU_CUH
#define LKQ_KCU_SWIGLU_CUH

#include "kernels/cuda/kcu_rt.cuh"

#ifdef __cplusplus
extern "C" {
#endif

/* gate[i] = silu(gate[i]) * up[i] for i < n (device memory; computed in
 * double like the oracle). */
int kcu_swiglu(kcu_ctx *c, float *gate, const float *up, size_t n, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
