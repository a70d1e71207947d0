/*
 * kcu_kvstore.cuh - FP16 pages of the GPU KV pool: writing rows of a step's
 * K/V (f32, RoPE applied) into pages, and gathering page rows back as f32
 * (the input of re-quantization when warm-up ends or the decode tail is
 * full). Same rounding as engine/kv/kvcache.c (kt_f32_to_f16). C-callable
 * launchers; kernels in kcu_kvstore.cu. Device pointers throughout.
 */
#ifndef LKQ_KCU_KVSTORE_CUH
#define LKQ_KCU_KVSTORE_CUH

#include "kernels/cuda/kcu_kv.cuh"
#include "kernels/cuda/kcu_rt.cuh"

#ifdef __cplusplus
extern "C" {
#endif

/* Rows [row0, row0+n) of the step go to page id, slots slot0 .. slot0+n-1. */
typedef struct {
    int32_t id, slot0, row0, n;
} kcu_page_tgt;

/* Row r of a gather comes from page id, slot. */
typedef struct {
    int32_t id, slot;
} kcu_page_row;

/* For each of n_tgts targets (device array; max_n >= every target's n):
 * K/V rows of k, v [rows][A->kv_dim] f32 -> FP16 page slots of layer. */
int kcu_kv_store_pages(kcu_ctx *c, const kcu_kv_arena *A, int layer, const kcu_page_tgt *tgts,
                       int n_tgts, int max_n, const float *k, const float *v, char *err,
                       size_t errlen);

/* k_out, v_out [n_rows][kv_dim] f32 = page rows rows[0 .. n_rows) of layer. */
int kcu_kv_gather_pages(kcu_ctx *c, const kcu_kv_arena *A, int layer, const kcu_page_row *rows,
                        int n_rows, float *k_out, float *v_out, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
