/*
 * kcu_geglu.cuh - GeGLU on the GPU (Gemma's gated FFN), same contract as
 * kref_geglu. C-callable launcher; kernel in kcu_geglu.cu.
 */
#ifndef LKQ_KCU_GEGLU_CUH
#define LKQ_KCU_GEGLU_CUH

#include "kernels/cuda/kcu_rt.cuh"

#ifdef __cplusplus
extern "C" {
#endif

/* gate[i] = gelu_tanh(gate[i]) * up[i] for i < n, with gelu_tanh(x) =
 * x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (device memory; computed
 * in double like the oracle, rounded once). */
int kcu_geglu(kcu_ctx *c, float *gate, const float *up, size_t n, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
