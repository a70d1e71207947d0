/*
 * kvcache.h - the paged KV cache and the LiveKVQuant-P sequence lifecycle
 * (../shared/DESIGN.md §4).
 *
 * A kvc_pool owns two preallocated arenas: INT4 blocks (block_tokens tokens
 * x all layers, layout kernels/kvq.h) and FP16 pages (page_tokens tokens x
 * all layers, K then V per layer). Free lists hand them out; nothing is
 * allocated per token. Exhaustion is an error (-ENOSPC) the caller handles.
 * The free lists, entry lists and every step decision belong to the KV
 * planner (engine/kv/kv_plan.h), shared with the GPU cache
 * (engine/kv/kvcache_cuda.h); this cache executes them on host memory.
 *
 * A kvc_seq is one sequence's history: an ordered list of entries (INT4
 * block or FP16 page, with its positions), the per-layer clipped-EMA ranges
 * of K and V, and the chunk protocol the forward pass follows for every
 * step of n tokens at the sequence end:
 *     kvc_begin      reserve the blocks/pages the step needs (fails cleanly)
 *     per layer:     kvc_segments -> attention (history + the step's exact
 *                    K/V), then kvc_store (EMA update, staging or live
 *                    quantization of the step's K/V for that layer)
 *     kvc_commit     publish the step (or kvc_abort to undo the reservation)
 * Prefill steps are chunks (statistics per chunk, warm-up staging in FP16);
 * decode steps append to an FP16 tail that is quantized a block at a time.
 * Sink tokens stay FP16. No token is ever dropped.
 *
 * Threading: a pool and its sequences are used by one thread at a time (the
 * engine thread); kvc_pool_stats may be read from another thread only with
 * external synchronization (the server takes a snapshot under its lock).
 */
#ifndef LKQ_KVCACHE_H
#define LKQ_KVCACHE_H

#include <stddef.h>
#include <stdint.h>

#include "config/kvq_config.h"
#include "kernels/kvq.h"

typedef struct {
    int32_t n_layers;
    int32_t kv_dim;   /* n_kv_heads * head_dim */
    int32_t head_dim;
} kvc_dims;

typedef struct kvc_pool kvc_pool;

/* Sequences that may be in prefill (warm-up staging) at once; the pool's
 * FP16 staging is planned for this many and the scheduler keeps to it. */
#define KVC_PREFILL_SLOTS 2
typedef struct kvc_seq kvc_seq;

/* Accounting: bytes actually held (allocated blocks and pages), by kind. */
typedef struct {
    int64_t tokens;           /* positions stored */
    int64_t elements;         /* tokens * n_layers * kv_dim * 2 (K and V) */
    int64_t bytes_int4;       /* dense INT4 codes */
    int64_t bytes_scales;     /* scale / zero snapshots */
    int64_t bytes_outliers;   /* outlier values + indices (capacity held) */
    int64_t bytes_fp16;       /* FP16 pages: warm-up staging, sinks, tail (and
                                 everything in fp16 mode) */
    int64_t bytes_other;      /* block headers and alignment padding */
    int64_t bytes_total;      /* sum of the above */
    int64_t bytes_fp16_equiv; /* elements * 2: what an FP16 cache would hold */
    int64_t n_quantized;      /* elements stored in INT4 blocks */
    int64_t n_outliers;       /* of those, kept exactly as FP16 outliers */
    int64_t n_clamped;        /* outside the range but over the budget */
    int64_t qblocks_used, qblocks_total;
    int64_t fpages_used, fpages_total;
} kvc_stats;

/* Bits per element all-in (8 * bytes_total / elements), 0 when empty. */
double kvc_stats_bits(const kvc_stats *s);
/* Adds the token / element / quantized / outlier / clamped counts of s to
 * sum (a pool's total over its sequences, on either device). */
void kvc_stats_add_counts(kvc_stats *sum, const kvc_stats *s);
/* Sets the bytes_* fields of *s for nq INT4 blocks and nf FP16 pages of a
 * pool whose layer-blocks have layout Lq (NULL in fp16 mode) and whose
 * blocks / pages take qbytes / fbytes over all n_layers layers (the
 * accounting of any device's pool). */
void kvc_stats_set_bytes(kvc_stats *s, const kvq_layout *Lq, int n_layers, size_t qbytes,
                         size_t fbytes, int64_t nq, int64_t nf);

/* Plans a pool: for a byte or token budget in cfg (kv_budget), or else for
 * max_seqs sequences of n_ctx tokens each. Returns the arena sizes. */
int kvc_pool_plan(const cfg_kv *cfg, const kvc_dims *d, int n_ctx, int max_seqs,
                  int64_t *n_qblocks, int64_t *n_fpages, char *err, size_t errlen);

/* Creates a pool with the given arena sizes (cfg and d are copied). Returns
 * 0 and *out (caller frees with kvc_pool_destroy) or negative with a reason. */
int kvc_pool_create(const cfg_kv *cfg, const kvc_dims *d, int64_t n_qblocks,
                    int64_t n_fpages, kvc_pool **out, char *err, size_t errlen);
void kvc_pool_destroy(kvc_pool *p); /* NULL is a no-op; sequences first */

const kvq_layout *kvc_pool_layout(const kvc_pool *p); /* NULL in fp16 mode */
const cfg_kv *kvc_pool_cfg(const kvc_pool *p);
int kvc_pool_page_tokens(const kvc_pool *p);
/* Pool-wide accounting over all live sequences. */
void kvc_pool_stats(const kvc_pool *p, kvc_stats *out);
/* Fraction of the pool's bytes in use, 0..1. */
double kvc_pool_usage(const kvc_pool *p);

/* Bytes of the pool's arenas (what it can hold, all overheads). */
int64_t kvc_pool_capacity_bytes(const kvc_pool *p);
/* INT4 blocks and FP16 pages free now. */
void kvc_pool_free_units(const kvc_pool *p, int64_t *qfree, int64_t *ffree);
/* Upper bound of the INT4 blocks and FP16 pages a fresh sequence holds at
 * its peak while prefilling n tokens (warm-up staging included); the
 * scheduler admits by it. */
void kvc_pool_estimate(const kvc_pool *p, int n, int64_t *nq, int64_t *nf);
/* The same for any pool of configuration cfg (the GPU cache,
 * engine/kv/kvcache_cuda.h, holds the same blocks and pages: kvp_estimate),
 * and the tokens per FP16 page such a pool uses. */
void kvc_plan_estimate(const cfg_kv *cfg, int n, int64_t *nq, int64_t *nf);
int kvc_plan_page_tokens(const cfg_kv *cfg);

/* A sequence of at most max_tokens positions. Its metadata (entry list,
 * EMA state, scratch) is allocated here, once. */
int kvc_seq_create(kvc_pool *p, int max_tokens, kvc_seq **out, char *err,
                   size_t errlen);
void kvc_seq_destroy(kvc_seq *s); /* returns its blocks; NULL is a no-op */
/* Empties the sequence (blocks back to the pool, EMA state cleared). */
void kvc_seq_reset(kvc_seq *s);
int kvc_seq_n_tokens(const kvc_seq *s);
void kvc_seq_stats(const kvc_seq *s, kvc_stats *out);
/* Mean over channels of the EMA range of layer l, tensor 0 = K / 1 = V;
 * returns 0 if the range exists (at least one chunk seen), else -1. */
int kvc_seq_ema(const kvc_seq *s, int layer, int tensor, float *lo, float *hi);
/* 1 while the sequence is still in warm-up (int4 mode). */
int kvc_seq_warming(const kvc_seq *s);
/* Prefill chunks folded into the statistics so far. */
int kvc_seq_chunks(const kvc_seq *s);

/* Starts a step of n tokens at position pos0 == kvc_seq_n_tokens(s).
 * prefill: 1 for a prompt chunk, 0 for decode. The first decode step ends
 * the prefill (see kvc_finish_prefill). Reserves every block the step needs
 * (including those for quantizing staged warm-up chunks or a full decode
 * tail). Returns 0, -ENOSPC when the pool cannot hold the step (nothing is
 * changed), or another negative value with a reason. */
int kvc_begin(kvc_seq *s, int pos0, int n, int prefill, char *err, size_t errlen);

/* Segments of layer l's committed history (positions < the step's pos0),
 * in position order. Returns the count (<= cap). */
int kvc_segments(const kvc_seq *s, int layer, kvs_seg *segs, int cap);
/* Upper bound of kvc_segments' count for this sequence. */
int kvc_max_segments(const kvc_seq *s);

/* Stores the step's K and V of layer l: k, v [n][kv_dim] f32 (K after RoPE).
 * Updates the layer's EMA for prefill chunks, then stages, quantizes live,
 * or appends to the tail. Call for every layer between begin and commit. */
void kvc_store(kvc_seq *s, int layer, const float *k, const float *v);

/* Publishes the step: the new positions become history. */
void kvc_commit(kvc_seq *s);
/* Undoes kvc_begin (returns the reserved blocks). */
void kvc_abort(kvc_seq *s);

/* Ends the prefill: if the prompt ended during warm-up, quantizes the staged
 * chunks with the statistics gathered so far (unless keep_warmup_fp16).
 * Idempotent. Returns 0, -ENOSPC (staged data then stays FP16; still
 * correct), or another negative value with a reason. */
int kvc_finish_prefill(kvc_seq *s, char *err, size_t errlen);

/* Per-layer outlier accounting of the INT4 blocks the sequence holds now
 * (for evaluation: outlier ratio per layer). */
typedef struct {
    int64_t n_quantized;  /* elements of layer l in INT4 blocks (K and V) */
    int64_t n_k_outliers; /* K values kept as FP16 outliers */
    int64_t n_v_outliers; /* V values kept as FP16 outliers */
    int64_t n_clamped;    /* out-of-range values over the budget (K and V) */
} kvc_layer_counts;

/* Fills *out for layer l (zeros in fp16 mode). Returns 0, or -1 for a
 * layer out of range. Reads block headers only; O(blocks). */
int kvc_seq_layer_counts(const kvc_seq *s, int layer, kvc_layer_counts *out);

#endif
