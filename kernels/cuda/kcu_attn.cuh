/*
 * kcu_attn.cuh - attention on the GPU over a segmented KV history (the GPU
 * counterpart of kcpu_attn_seg / kref_attn_seg): for a batch of items (one
 * sequence's step each), every query attends causally to the item's own
 * exact K/V of the step and to its history of FP16 pages and INT4 blocks in
 * the KV pool (kcu_kv.cuh), the INT4 dequantization fused into the dot
 * products and the outliers applied as sparse corrections. With a sliding
 * window (kcu_attn_shape.window) the positions before an item's first
 * window are not walked and the rest are masked per query. Long histories
 * with few queries (decode) are split along the sequence and the partial
 * softmax states merged.
 *
 * Two kernels behind one launcher: a tensor-core kernel (mma.sync
 * m16n8k16, FP16 operands, FP32 accumulation) for head_dim 64 or 128, keys
 * per channel, v_group a multiple of 8 and 4-bit codes; and a generic FP32
 * kernel for every other shape and code width (2, 3, 8 bits). A query that sees no position gets zeros (as the
 * oracle). C-callable launcher; kernels in kcu_attn.cu, kcu_attn_mma.cu.
 */
#ifndef LKQ_KCU_ATTN_CUH
#define LKQ_KCU_ATTN_CUH

#include "kernels/cuda/kcu_kv.cuh"
#include "kernels/cuda/kcu_rt.cuh"
#include "kernels/kvq.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One item of a batch (32 bytes): n_q queries at positions pos0 ..
 * pos0+n_q-1, stored in rows q_row0 .. of q / out ([rows][n_head *
 * head_dim]); their own K/V (positions pos0 .. pos0+n_q-1, visible
 * causally) in rows step_row0 .. of k_step / v_step ([rows][kv_dim] f32);
 * the history (positions < pos0) is segs[seg0 .. seg0+n_segs), in position
 * order. The step rows of all items lie in [0, total queries). An item's
 * result depends on the item alone, not on the rest of the batch (the
 * split of long decode histories is planned per item). */
typedef struct {
    int32_t seg0, n_segs;
    int32_t pos0, n_q;
    int32_t q_row0, step_row0;
    int32_t pad[2];
} kcu_attn_item;

typedef struct {
    int n_head, n_kv_head, head_dim;
    float scale;          /* usually 1/sqrt(head_dim) */
    const kvq_layout *L;  /* layout of the KVS_Q4 segments; NULL when none */
    int window;           /* 0: causal over the whole history; W > 0: a query
                             at p sees positions [p - W + 1, p] (sliding window) */
} kcu_attn_shape;

enum { KCU_ATTN_AUTO = 0, KCU_ATTN_GENERIC = 1, KCU_ATTN_MMA = 2 };

/* 1 when the tensor-core kernel supports the shape (else AUTO uses the
 * generic one and KCU_ATTN_MMA is refused). */
int kcu_attn_mma_supported(const kcu_attn_shape *sh);

/* Device scratch for any batch of at most n_items items, total_q query
 * rows in all and at most max_q queries in one item. */
size_t kcu_attn_scratch_bytes(const kcu_attn_shape *sh, int n_items, int total_q, int max_q);

/* Runs attention for layer `layer`: items (host copy for planning, device
 * copy for the kernels; same contents), segs (device), q, out, k_step,
 * v_step (device) as described above. path: KCU_ATTN_AUTO / _GENERIC /
 * _MMA. */
int kcu_attn(kcu_ctx *c, const kcu_attn_shape *sh, const kcu_kv_arena *A, int layer,
             const kcu_attn_item *items_host, const kcu_attn_item *items_dev, int n_items,
             const kcu_seg *segs, const float *q, float *out, const float *k_step,
             const float *v_step, int path, void *scratch, size_t scratch_bytes, char *err,
             size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
