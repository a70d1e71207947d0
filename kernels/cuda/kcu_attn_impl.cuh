/*
 * kcu_attn_impl.cuh - what kcu_attn.cu and kcu_attn_mma.cu share (C++
 * only): the kernel argument block and the tensor-core launcher.
 */
#ifndef LKQ_KCU_ATTN_IMPL_CUH
#define LKQ_KCU_ATTN_IMPL_CUH

#include "kernels/cuda/kcu_attn.cuh"
#include "kernels/cuda/kcu_compat.cuh"

/* Zero i of a snapshot's zero array of zb (4 or 8) bits per entry
 * (kvq_zero_at). */
static __device__ __forceinline__ int kcu_zero_at(const uint8_t *z, size_t i, int zb)
{
    return zb == 4 ? (z[i >> 1] >> ((i & 1) * 4)) & 15 : z[i];
}

/* Element index of outlier i of tensor (0 K, 1 V) of the block at blk:
 * 16-bit or 32-bit entries (kvq_layout.idx_bytes, kvq.h). */
static __device__ __forceinline__ uint32_t kcu_oidx(const char *blk, const kvq_layout &L,
                                                    int tensor, uint32_t i)
{
    const char *p = blk + (tensor ? L.off_vout_idx : L.off_kout_idx);
    return L.idx_bytes == 2 ? (uint32_t)((const uint16_t *)p)[i] : ((const uint32_t *)p)[i];
}

struct kcu_attn_args {
    kcu_kv_arena A;
    int layer;
    const kcu_attn_item *items;
    const kcu_seg *segs;
    const float *q;
    float *out;
    const float *k_step, *v_step;       /* f32 (generic kernel) */
    const uint16_t *k_step16, *v_step16; /* f16 copies (tensor-core kernel) */
    int n_head, n_kv, hd;
    float scale;
    int window; /* 0 or the sliding window W */
    kvq_layout L;
    int has_L;
    int n_splits;     /* the grid's splits: the most any item has */
    int split_target; /* blocks one item alone should fill (0: never split) */
    int mma;          /* 1: the tensor-core kernel (its blocks per item) */
    int n_q_max, q_part;
    float *part; /* [items][q_part][n_head][n_splits][hd + 2] when n_splits > 1 */
};

/* Warps per block, positions per chunk, query rows per warp. */
#define KCU_MMA_WARPS 4
#define KCU_MMA_CH 64
#define KCU_ATTN_MAX_SPLITS 64
#define KCU_ATTN_DECODE_MAX_Q 4 /* items with at most this many queries are split */

/* The first position query position qpos sees: qpos - W + 1 with a
 * sliding window W > 0 (at least 0), else 0. */
static __host__ __device__ __forceinline__ int kcu_attn_win_lo(const kcu_attn_args &P, int qpos)
{
    int lo = P.window > 0 ? qpos - P.window + 1 : 0;
    return lo > 0 ? lo : 0;
}

/* How an item's visible positions [base, pos0 + n_q) (base: its first
 * query's first visible position, 0 without a window) are cut into n
 * ranges of span positions, range s = [base + s * span, ...) (n == 1: one
 * range over everything). A function of the item
 * alone (its queries and context) and of the device (split_target), never
 * of the other items of the batch: a sequence's attention is then summed
 * in the same order whatever runs beside it. Decode items are split so
 * that, alone, about split_target blocks run, with at least 256 positions
 * per range; items with more queries are not split. */
struct kcu_attn_split {
    int n, span, base;
};
static __host__ __device__ __forceinline__ kcu_attn_split
kcu_attn_item_split(const kcu_attn_args &P, const kcu_attn_item &it)
{
    const int base = kcu_attn_win_lo(P, it.pos0);
    const int ctx = it.pos0 + it.n_q - base;
    int s = 1;
    if (it.n_q <= KCU_ATTN_DECODE_MAX_Q && P.split_target > 0) {
        int base; /* blocks of the item without splitting */
        if (P.mma) {
            int tasks = P.n_kv * ((it.n_q * (P.n_head / P.n_kv) + 7) / 8);
            base = (tasks + KCU_MMA_WARPS - 1) / KCU_MMA_WARPS;
        } else {
            base = it.n_q * P.n_kv;
        }
        int want = (P.split_target + base - 1) / base;
        int by_ctx = (ctx + 255) / 256;
        s = want < by_ctx ? want : by_ctx;
        s = s > KCU_ATTN_MAX_SPLITS ? KCU_ATTN_MAX_SPLITS : s < 1 ? 1 : s;
    }
    int span = (ctx + s - 1) / s;
    span = (span + 63) / 64 * 64;
    if (s > 1)
        s = (ctx + span - 1) / span;
    kcu_attn_split r = {s, span, base};
    return r;
}

/* Partial softmax state of one (item, query, head, split): m, l, acc[hd]. */
static __device__ __forceinline__ float *kcu_attn_part(const kcu_attn_args &P, int item, int j,
                                                       int head, int split)
{
    size_t rec = (((size_t)item * (size_t)P.q_part + (size_t)j) * (size_t)P.n_head +
                  (size_t)head) * (size_t)P.n_splits + (size_t)split;
    return P.part + rec * (size_t)(P.hd + 2);
}

/* Segment si of an item's history, or (si == n_segs) the step's own K/V:
 * kind, first position, length, and where its data is for `layer` (blk
 * for KVS_Q4; pk / pv for FP16 pages, or the step rows of k16 / v16). */
struct kcu_attn_seg_view {
    int kind, pos0, n;
    const char *blk;
    const uint16_t *pk, *pv;
};

static __device__ __forceinline__ kcu_attn_seg_view
kcu_attn_segment(const kcu_attn_args &P, const kcu_attn_item &item, int si, const uint16_t *k16,
                 const uint16_t *v16)
{
    kcu_attn_seg_view v = {KVS_F32, item.pos0, item.n_q, NULL, NULL, NULL};
    const size_t D = (size_t)P.A.kv_dim;
    if (si == item.n_segs) {
        if (k16) {
            v.pk = k16 + (size_t)item.step_row0 * D;
            v.pv = v16 + (size_t)item.step_row0 * D;
        }
        return v;
    }
    kcu_seg sg = P.segs[item.seg0 + si];
    v.kind = sg.kind;
    v.pos0 = sg.pos0;
    v.n = sg.n;
    if (sg.kind == KVS_Q4) {
        v.blk = P.A.qarena + (size_t)sg.id * P.A.q_stride + (size_t)P.layer * P.A.q_layer;
    } else {
        v.pk = (const uint16_t *)(P.A.farena + (size_t)sg.id * P.A.f_stride +
                                  (size_t)P.layer * P.A.f_layer);
        v.pv = v.pk + (size_t)P.A.page_tokens * D;
    }
    return v;
}

/* Shared memory and launch of the tensor-core kernel (kcu_attn_mma.cu). */
size_t kcu_attn_mma_smem(const kcu_attn_args &P);
int kcu_attn_mma_launch(kcu_ctx *c, const kcu_attn_args &P, int n_items, int tasks_max,
                        char *err, size_t errlen);

#endif
