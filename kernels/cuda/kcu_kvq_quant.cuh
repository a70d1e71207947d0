/*
 * kcu_kvq_quant.cuh - LiveKVQuant-P block quantization (Eq. 3-4) on the GPU:
 * the same bytes kvq_quantize_block (kernels/ref/kvq_ref.c) writes - header,
 * INT4 codes, FP16 scale / uint8 zero snapshots, outlier lists with the
 * per-block budget (largest excursions kept, ties to the lower element
 * index) - for several blocks at once, read from f32 K/V rows in device
 * memory and written in place into the GPU KV pool. C-callable launcher;
 * kernels in kcu_kvq_quant.cu.
 */
#ifndef LKQ_KCU_KVQ_QUANT_CUH
#define LKQ_KCU_KVQ_QUANT_CUH

#include "kernels/cuda/kcu_kv.cuh"
#include "kernels/cuda/kcu_rt.cuh"
#include "kernels/kvq.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One block to write: pool block id, first source row, tokens (0..T). */
typedef struct {
    int32_t id, row0, n, pad;
} kcu_q_tgt;

/* Device scratch for up to max_tgts blocks per call (more are done in
 * batches of max_tgts). */
size_t kcu_kvq_quant_scratch_bytes(const kvq_layout *L, int max_tgts);

/* For each target j (tgts: device array, n_tgts entries): quantizes rows
 * [row0, row0+n) of k and v (device f32, `stride` floats between rows) into
 * block tgts[j].id of `layer` of arena A, exactly like
 * kvq_quantize_block(L, block, k + row0*stride, v + row0*stride, stride, n,
 * k_lo, k_hi, v_lo, v_hi): the ranges are device arrays [kv_dim] or NULL
 * (K: the block's own min/max per channel, no K outliers; V: no outlier
 * band). The blocks are fully rewritten. */
int kcu_kvq_quantize(kcu_ctx *c, const kvq_layout *L, const kcu_kv_arena *A, int layer,
                     const kcu_q_tgt *tgts, int n_tgts, int max_tgts, const float *k,
                     const float *v, size_t stride, const float *k_lo, const float *k_hi,
                     const float *v_lo, const float *v_hi, void *scratch, size_t scratch_bytes,
                     char *err, size_t errlen);

/* out[0..3] (device int64) += the sums of n_tok, n_kout + n_vout and
 * n_clamped over the headers of blocks ids[0 .. n_ids) (device int32) in
 * every one of n_layers layers: the cache's outlier / clamp accounting. */
int kcu_kvq_count_blocks(kcu_ctx *c, const kcu_kv_arena *A, int n_layers, const int32_t *ids,
                         int n_ids, int64_t *out, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
