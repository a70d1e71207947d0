/*
 * kcu_rope.cuh - rotary position embedding on the GPU, same contract as
 * kref_rope / kref_rope_ex (angles in double) for n_tok consecutive
 * positions (kcu_rope), one position per token (kcu_rope_at: a batched
 * step of several sequences), or one position per token with the model
 * descriptor's options (kcu_rope_ex: NEOX pairing, per-frequency
 * divisors). C-callable launchers; kernel in kcu_rope.cu.
 */
#ifndef LKQ_KCU_ROPE_CUH
#define LKQ_KCU_ROPE_CUH

#include "kernels/cuda/kcu_rt.cuh"

#ifdef __cplusplus
extern "C" {
#endif

/* In place on x [n_tok][row_stride] (device), heads of head_dim at the start
 * of each row: token i sits at position pos0 + i; the first n_rot dims of
 * each of n_heads heads rotate by angle pos * freq_scale *
 * theta^(-2j/n_rot) for pair j (adjacent pairs x[2j], x[2j+1]). */
int kcu_rope(kcu_ctx *c, float *x, int n_tok, size_t row_stride, int n_heads, int head_dim,
             int n_rot, int pos0, float theta, float freq_scale, char *err, size_t errlen);

/* The same with token i at position pos[i] (pos: device int32 [n_tok]). */
int kcu_rope_at(kcu_ctx *c, float *x, int n_tok, size_t row_stride, int n_heads, int head_dim,
                int n_rot, const int32_t *pos, float theta, float freq_scale, char *err,
                size_t errlen);

/* kref_rope_ex per token: token i at position pos[i] (device int32
 * [n_tok]); neox = 1 rotates the halves (x[j], x[j + n_rot/2]) instead of
 * adjacent pairs; freqs (device [n_rot/2], or NULL) divides pair j's
 * frequency. neox 0 and freqs NULL is kcu_rope_at. */
int kcu_rope_ex(kcu_ctx *c, float *x, int n_tok, size_t row_stride, int n_heads, int head_dim,
                int n_rot, const int32_t *pos, float theta, float freq_scale,
                const float *freqs, int neox, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
