/*
 * kvcache_cuda.h - the LiveKVQuant-P KV cache in GPU memory: the same paged
 * pool, block layout and sequence lifecycle as engine/kvcache.h (sinks in
 * FP16, warm-up chunks staged in FP16 then quantized with the stabilized
 * statistics, live INT4 quantization of later chunks, an FP16 decode tail
 * quantized a block at a time, clipped-EMA ranges per layer), with the data
 * in device memory and every data operation (statistics, quantization, page
 * writes) done by kernels/cuda. The bookkeeping (entries, free lists, every
 * decision of the step protocol) is the host-side KV planner
 * (engine/kv/kv_plan.h) that kvcache.c executes too, so the two caches hold
 * the same segments for the same steps by construction.
 *
 * Layer groups (as kvc_*): the global layers and the sliding-window layers
 * each have their arenas and planner pool; a window layer's units return to
 * the pool as its window moves on.
 *
 * Step protocol (as kvc_*): kvcd_begin reserves and uploads the step's
 * tables; per layer the caller attends over its group's committed history
 * (kvcd_seq_host_segs, uploaded by the caller with its attention items) and
 * the step's own K/V, then calls kvcd_store; kvcd_commit publishes
 * (kvcd_abort undoes). The arenas are allocated once, with cudaMalloc, at
 * pool creation; nothing is allocated per step.
 *
 * Threading: a pool and its sequences are used by one thread at a time,
 * with the pool's kcu_ctx.
 */
#ifndef LKQ_KVCACHE_CUDA_H
#define LKQ_KVCACHE_CUDA_H

#include "config/kvq_config.h"
#include "engine/kv/kvcache.h"
#include "kernels/cuda/kcu_kv.cuh"
#include "kernels/cuda/kcu_rt.cuh"

typedef struct kvcd_pool kvcd_pool;
typedef struct kvcd_seq kvcd_seq;

/* Creates a pool on context c (borrowed; must outlive the pool) with the
 * arena sizes of kvc_pool_plan for each layer group (d->layer_window splits
 * the layers; a step holds at most cfg->chunk_size tokens). Returns 0 and
 * *out (kvcd_pool_destroy) or negative with a reason. */
int kvcd_pool_create(kcu_ctx *c, const cfg_kv *cfg, const kvc_dims *d, const kvc_pool_sizes *sz,
                     kvcd_pool **out, char *err, size_t errlen);
void kvcd_pool_destroy(kvcd_pool *p); /* NULL is a no-op; sequences first */

/* The global layers' block layout (NULL in fp16 mode or without global
 * layers). */
const kvq_layout *kvcd_pool_layout(const kvcd_pool *p);
/* The layer group of layer l (KVC_LAYER_GLOBAL / KVC_LAYER_WINDOW) and,
 * in *local (may be NULL), its index within the group: the layer index of
 * the group's arena. */
int kvcd_layer_group(const kvcd_pool *p, int layer, int *local);
/* A group's block layout (NULL in fp16 mode) and device arenas (NULL when
 * the model has no layers of that kind). */
const kvq_layout *kvcd_group_layout(const kvcd_pool *p, int g);
const kcu_kv_arena *kvcd_group_arena(const kvcd_pool *p, int g);
/* Device bytes held by the arenas (what the pool can hold, all overheads:
 * kvc_pool_capacity_bytes). */
size_t kvcd_pool_bytes(const kvcd_pool *p);
/* As kvc_pool_free_units / kvc_pool_kind_units / kvc_pool_estimate /
 * kvc_pool_usage (host bookkeeping only: no device access; free units and
 * the estimate are the global layers'). */
void kvcd_pool_free_units(const kvcd_pool *p, int64_t *qfree, int64_t *ffree);
/* kvc_pool_free_bytes. */
int64_t kvcd_pool_free_bytes(const kvcd_pool *p);
void kvcd_pool_kind_units(const kvcd_pool *p, int kind, int64_t *qfree, int64_t *ffree,
                          int64_t *qtotal, int64_t *ftotal);
void kvcd_pool_estimate(const kvcd_pool *p, int n, int64_t *nq, int64_t *nf);
double kvcd_pool_usage(const kvcd_pool *p);
/* kvc_pool_stats over the pool's live sequences (the INT4 counters: one
 * 64-byte copy per sequence, kvcd_seq_stats; waits for pending work);
 * everything else is host bookkeeping. Returns 0, or negative with a
 * reason (the sums then miss the sequences that failed). */
int kvcd_pool_stats(kvcd_pool *p, kvc_stats *out, char *err, size_t errlen);

/* A sequence of at most max_tokens positions (metadata and its device
 * tables allocated here, once). */
int kvcd_seq_create(kvcd_pool *p, int max_tokens, kvcd_seq **out, char *err, size_t errlen);
void kvcd_seq_destroy(kvcd_seq *s); /* NULL is a no-op */
void kvcd_seq_reset(kvcd_seq *s);
/* kvc_seq_set_mode / kvc_seq_mode. */
int kvcd_seq_set_mode(kvcd_seq *s, int mode, char *err, size_t errlen);
int kvcd_seq_mode(const kvcd_seq *s);
int kvcd_seq_n_tokens(const kvcd_seq *s);
/* Exact accounting, as kvc_seq_stats: bytes by kind and layer kind from the
 * host bookkeeping; the INT4 counters of the blocks held from the device
 * (counted at each commit; this waits for pending work). Returns 0, or
 * -EIO when a counting or the copy failed. */
int kvcd_seq_stats(kvcd_seq *s, kvc_stats *out, char *err, size_t errlen);
/* kvc_seq_held: host bookkeeping only, no device access. */
void kvcd_seq_held(const kvcd_seq *s, kvc_stats *out);

/* kvc_begin: reserves the step's pages/blocks in every layer group, all or
 * nothing, and uploads each group's tables. Returns 0, -ENOSPC (nothing
 * changed but, possibly, the end of the prefill) or another negative
 * value. */
int kvcd_begin(kvcd_seq *s, int pos0, int n, int prefill, char *err, size_t errlen);
/* The committed history of group g during an open step (host copy of its
 * device table: what the attention items of the step point at) and its
 * count in *n (0 and NULL when the model has no such group). */
const kcu_seg *kvcd_seq_host_segs(const kvcd_seq *s, int g, int *n);
/* kvc_store: layer l's K (after RoPE) and V of the step, device f32
 * [n][kv_dim]: EMA update for prefill chunks, then FP16 staging / live
 * quantization / tail, and re-quantization when warm-up ends or the tail
 * is full, in the layer's group. */
int kvcd_store(kvcd_seq *s, int layer, const float *k, const float *v, char *err,
               size_t errlen);
void kvcd_commit(kvcd_seq *s);
void kvcd_abort(kvcd_seq *s);
/* kvc_finish_prefill. */
int kvcd_finish_prefill(kvcd_seq *s, char *err, size_t errlen);

/* kvc_seq_ema: the channel means of layer l's EMA range, tensor 0 = K /
 * 1 = V; 0 when the range exists, else -1 (also on a device error). The
 * first call after the EMA changed (a prefill chunk or a full decode tail
 * was folded) copies the sequence's whole EMA state to the host (n_layers
 * * 8 * kv_dim floats: 1 MiB for Llama-3-8B) and waits for pending work;
 * later calls read the cached means. Not during an open step. */
int kvcd_seq_ema_mean(kvcd_seq *s, int layer, int tensor, float *lo, float *hi);
/* kvc_seq_warming: 1 while the sequence is still in warm-up (int4 mode). */
int kvcd_seq_warming(const kvcd_seq *s);

/* Device EMA ranges of layer l, tensor 0 = K / 1 = V (lo, hi: [kv_dim]),
 * and the chunks folded so far; for tests. */
int kvcd_seq_ema(const kvcd_seq *s, int layer, int tensor, const float **lo, const float **hi,
                 int *n_chunks);

#endif
