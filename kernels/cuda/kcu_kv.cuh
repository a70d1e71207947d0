/*
 * kcu_kv.cuh - how the GPU KV pool is laid out in device memory, shared by
 * the KV store, quantizer and attention launchers (C-callable types only).
 *
 * The pool has two arenas, as engine/kv/kvcache.c on the host:
 *  - INT4 blocks: block id b, layer l at qarena + b * q_stride + l * q_layer;
 *    each layer-block is exactly the kvq_layout block of kernels/kvq.h
 *    (header, codes, scale/zero snapshots, outlier lists), so a block copied
 *    back to the host is checked by kernels/ref; q_layer >= L.bytes (the GPU
 *    pool pads layer-blocks to 128 bytes);
 *  - FP16 pages of page_tokens positions: page id p, layer l holds K
 *    [page_tokens][kv_dim] then V [page_tokens][kv_dim] halves at farena +
 *    p * f_stride + l * f_layer.
 * A history is a list of segments in position order: an FP16 page holds
 * positions pos0 .. pos0+n-1 in slots 0 .. n-1; an INT4 block holds n_tok
 * positions from pos0.
 */
#ifndef LKQ_KCU_KV_CUH
#define LKQ_KCU_KV_CUH

#include <stddef.h>
#include <stdint.h>

#include "kernels/kvq.h"

typedef struct {
    char *qarena;
    size_t q_stride, q_layer;
    char *farena;
    size_t f_stride, f_layer;
    int page_tokens;
    int kv_dim;
} kcu_kv_arena;

/* One history segment (16 bytes; kind KVS_F16 or KVS_Q4 of kernels/kvq.h). */
typedef struct {
    int32_t kind, pos0, n, id;
} kcu_seg;

#endif
