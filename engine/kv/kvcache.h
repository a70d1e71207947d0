/*
 * kvcache.h - the paged KV cache and the LiveKVQuant-P sequence lifecycle
 * (../shared/DESIGN.md §4).
 *
 * A kvc_pool owns two preallocated arenas per layer group: INT4 blocks
 * (block_tokens tokens x all layers of the group, layout kernels/kvq.h) and
 * FP16 pages (page_tokens tokens x all layers of the group, K then V per
 * layer). The groups: the global layers (the whole context, LiveKVQuant-P)
 * and the sliding-window layers (kvc_dims.layer_window: their last W
 * positions only, FP16 pages or LiveKVQuant-P by cfg_kv.window_kv; units
 * return to the pool as the window moves on, so a window layer's memory is
 * bounded however long the sequence). Free lists hand them out; nothing is
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
 * Sink tokens stay FP16. No token a query can still see is ever dropped
 * (a window layer drops only positions before every later query's window).
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
    /* NULL: every layer is global; else [n_layers], the sliding window W of
     * each layer (0: global; Gemma-3: 512 on l % 6 < 5). Borrowed for the
     * call that takes it (pools keep what they need). */
    const int32_t *layer_window;
} kvc_dims;

/* Layer kinds: global layers keep the whole context (LiveKVQuant-P);
 * window layers only their last W positions. Each kind is a group of the
 * pool with its own arenas, free lists and sequence entries (its units
 * span all layers of the kind). */
enum { KVC_LAYER_GLOBAL = 0, KVC_LAYER_WINDOW = 1, KVC_LAYER_KINDS = 2 };

/* Arena sizes of a pool, per layer kind: INT4 blocks and FP16 pages (a
 * kind without layers has none). */
typedef struct {
    int64_t n_qblocks[KVC_LAYER_KINDS];
    int64_t n_fpages[KVC_LAYER_KINDS];
} kvc_pool_sizes;

typedef struct kvc_pool kvc_pool;

/* Sequences that may be in prefill (warm-up staging) at once; the pool's
 * FP16 staging is planned for this many and the scheduler keeps to it. */
#define KVC_PREFILL_SLOTS 2
typedef struct kvc_seq kvc_seq;

/* The accounting of one layer kind (kvc_stats.layer_kind). */
typedef struct {
    int32_t layers;           /* layers of this kind */
    int64_t tokens;           /* positions held (window layers: about the last W) */
    int64_t elements;         /* tokens * layers * kv_dim * 2 */
    int64_t bytes_int4, bytes_scales, bytes_outliers, bytes_fp16, bytes_other;
    int64_t bytes_total;      /* sum of the above */
    int64_t qblocks_used, qblocks_total;
    int64_t fpages_used, fpages_total;
} kvc_kind_stats;

/* Accounting: bytes actually held (allocated blocks and pages), by kind of
 * storage and, in layer_kind[], by kind of layer (global / window); the
 * top-level bytes, elements and units are the sums over the layer kinds. */
typedef struct {
    int64_t tokens;           /* positions of the sequence(s) */
    int64_t elements;         /* elements held (K and V): the sum over the layer
                                 kinds of positions held * layers * kv_dim * 2;
                                 without window layers tokens * n_layers *
                                 kv_dim * 2 */
    int64_t bytes_int4;       /* dense INT4 codes */
    int64_t bytes_scales;     /* scale / zero snapshots */
    int64_t bytes_outliers;   /* outlier values + indices (capacity held) */
    int64_t bytes_fp16;       /* FP16 pages: warm-up staging, sinks, tail (and
                                 everything in fp16 mode) */
    int64_t bytes_other;      /* block headers and alignment padding */
    int64_t bytes_total;      /* sum of the above */
    int64_t bytes_fp16_equiv; /* elements * 2: what an FP16 cache would hold */
    int64_t n_quantized;      /* elements in the INT4 blocks held */
    int64_t n_outliers;       /* of those, kept exactly as FP16 outliers */
    int64_t n_clamped;        /* outside the range but over the budget */
    int64_t qblocks_used, qblocks_total;
    int64_t fpages_used, fpages_total;
    kvc_kind_stats layer_kind[KVC_LAYER_KINDS];
} kvc_stats;

/* Bits per element all-in (8 * bytes_total / elements), 0 when empty. */
double kvc_stats_bits(const kvc_stats *s);
/* The same over the layers of one kind (KVC_LAYER_GLOBAL: the figure the
 * LiveKVQuant-P targets are stated for), 0 when it holds nothing. */
double kvc_stats_kind_bits(const kvc_stats *s, int kind);
/* Adds the token / element / quantized / outlier / clamped counts of s to
 * sum (a pool's total over its sequences, on either device). */
void kvc_stats_add_counts(kvc_stats *sum, const kvc_stats *s);

/* Plans a pool (engine/kv/kv_plan.h, kvp_pool_size): the global layers for
 * a byte or token budget in cfg (kv_budget), or else for max_seqs
 * sequences of n_ctx tokens each; the window layers (d->layer_window) for
 * max_seqs sequences of their bounded window (a byte budget pays for them
 * first). Returns the arena sizes of each layer kind. */
int kvc_pool_plan(const cfg_kv *cfg, const kvc_dims *d, int n_ctx, int max_seqs,
                  kvc_pool_sizes *out, char *err, size_t errlen);

/* Creates a pool with the given arena sizes (cfg and d are copied, the
 * layer windows too). Returns 0 and *out (caller frees with
 * kvc_pool_destroy) or negative with a reason. */
int kvc_pool_create(const cfg_kv *cfg, const kvc_dims *d, const kvc_pool_sizes *sz,
                    kvc_pool **out, char *err, size_t errlen);
void kvc_pool_destroy(kvc_pool *p); /* NULL is a no-op; sequences first */

/* The global layers' block layout (NULL in fp16 mode or without global
 * layers); kvc_layer_layout: the layout of layer l's blocks (its group's). */
const kvq_layout *kvc_pool_layout(const kvc_pool *p);
const kvq_layout *kvc_layer_layout(const kvc_pool *p, int layer);
/* The layout of layer l's blocks of sequence s (its mode's: a pool of
 * kv_modes holds blocks of several widths); NULL when s is fp16 there. */
const kvq_layout *kvc_seq_layer_layout(const kvc_seq *s, int layer);
/* Every block layout the pool's sequences may use (each group's modes), at
 * most cap of them into out; returns the count (scratch sizing). */
size_t kvc_pool_attn_layouts(const kvc_pool *p, const kvq_layout **out, size_t cap);
/* Free bytes of the global layers' pool (kvp_pool_free_bytes): what a
 * shared pool (kv_modes) admits by. */
int64_t kvc_pool_free_bytes(const kvc_pool *p);
const cfg_kv *kvc_pool_cfg(const kvc_pool *p);
int kvc_pool_page_tokens(const kvc_pool *p);
/* Pool-wide accounting over all live sequences. */
void kvc_pool_stats(const kvc_pool *p, kvc_stats *out);
/* Fraction of the pool's bytes in use, 0..1. */
double kvc_pool_usage(const kvc_pool *p);

/* Bytes of the pool's arenas (what it can hold, all overheads). */
int64_t kvc_pool_capacity_bytes(const kvc_pool *p);
/* INT4 blocks and FP16 pages of the global layers free now (what the
 * scheduler admits by: the window layers are reserved per sequence slot);
 * kvc_pool_kind_units: free and total units of one layer kind (zeros when
 * the pool has no such layers). */
void kvc_pool_free_units(const kvc_pool *p, int64_t *qfree, int64_t *ffree);
void kvc_pool_kind_units(const kvc_pool *p, int kind, int64_t *qfree, int64_t *ffree,
                         int64_t *qtotal, int64_t *ftotal);
/* Upper bound of the global layers' INT4 blocks and FP16 pages a fresh
 * sequence holds at its peak while prefilling n tokens (warm-up staging
 * included; zeros without global layers); the scheduler admits by it. */
void kvc_pool_estimate(const kvc_pool *p, int n, int64_t *nq, int64_t *nf);
/* The same for any pool of configuration cfg (the GPU cache,
 * engine/kv/kvcache_cuda.h, holds the same blocks and pages: kvp_estimate),
 * and the tokens per FP16 page such a pool uses. */
void kvc_plan_estimate(const cfg_kv *cfg, int n, int64_t *nq, int64_t *nf);
int kvc_plan_page_tokens(const cfg_kv *cfg);
/* The fewest tokens any page or block of any layer group of such a pool
 * holds (kvp_unit_tokens): the bound of a history's segment count. */
int kvc_plan_unit_tokens(const cfg_kv *cfg);

/* A sequence of at most max_tokens positions. Its metadata (entry list,
 * EMA state, scratch) is allocated here, once. */
int kvc_seq_create(kvc_pool *p, int max_tokens, kvc_seq **out, char *err,
                   size_t errlen);
void kvc_seq_destroy(kvc_seq *s); /* returns its blocks; NULL is a no-op */
/* Empties the sequence (blocks back to the pool, EMA state cleared). */
void kvc_seq_reset(kvc_seq *s);
/* Sets the KV mode (cfg_kv_mode) of an empty sequence: one of the pool's
 * (cfg_kv_has_mode; a pool of kv_modes holds several), in every layer
 * group (kvp_seq_set_mode_groups). Returns 0 or -EINVAL with a reason.
 * kvc_seq_mode: its mode (the pool's until set; kvc_seq_reset keeps it). */
int kvc_seq_set_mode(kvc_seq *s, int mode, char *err, size_t errlen);
int kvc_seq_mode(const kvc_seq *s);
int kvc_seq_n_tokens(const kvc_seq *s);
void kvc_seq_stats(const kvc_seq *s, kvc_stats *out);
/* kvc_seq_stats without the data-derived counts (n_quantized, n_outliers,
 * n_clamped left 0): units, bytes and positions held, from the planner. */
void kvc_seq_held(const kvc_seq *s, kvc_stats *out);
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
 * in every layer group, all or nothing (including those for quantizing
 * staged warm-up chunks or a full decode tail). Returns 0, -ENOSPC when the
 * pool cannot hold the step (nothing is changed but, possibly, the end of
 * the prefill), or another negative value with a reason. */
int kvc_begin(kvc_seq *s, int pos0, int n, int prefill, char *err, size_t errlen);

/* Segments of layer l's committed history (positions < the step's pos0),
 * in position order: all of it for a global layer; for a window layer the
 * positions its group still holds (about the last W: the attention masks
 * the rest). Returns the count (<= cap). */
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

/* ---- prefix reuse (the planner's prefix cache, engine/kv/kv_plan.h) ---- */

/* The prefix cache's counters (tokens, nodes, units only the cache holds). */
typedef struct {
    int64_t queries;     /* prompt tokens looked up (kvp_prefix_adopt) */
    int64_t hits;        /* of those, tokens found cached */
    int64_t inserts, evictions; /* nodes */
    int64_t nodes;       /* cached prefixes now */
    int64_t qblocks, fpages, bytes; /* units only the cache holds (evictable) */
    int64_t longest;     /* tokens of the longest cached prefix */
} kvc_prefix_stats;

/* Turns prefix reuse on (at most max_nodes cached prefixes, each with a
 * snapshot of the sequence's EMA state). Returns 0, -ENOTSUP with a reason
 * for a model with sliding-window layers, -ENOMEM. */
int kvc_pool_prefix_enable(kvc_pool *p, int max_nodes, char *err, size_t errlen);
/* The counters (zeros when off). */
void kvc_pool_prefix_stats(const kvc_pool *p, kvc_prefix_stats *out);
/* An empty sequence continues from the longest cached prefix of toks[0, n)
 * (its blocks shared, its EMA state restored): returns the positions it
 * now holds (0: none). The next step starts there. */
int kvc_seq_prefix_adopt(kvc_seq *s, const int32_t *toks, int n);
/* After a committed prompt chunk: caches the sequence's prefix (toks: its
 * first kvc_seq_n_tokens tokens) if it is at a shareable boundary. */
void kvc_seq_prefix_store(kvc_seq *s, const int32_t *toks);
/* The empty sequence dst continues from where src is (shared blocks, a
 * copy of a partially filled last page, the same EMA state): the n
 * choices of one prompt. Returns 0, -ENOSPC, -ENOTSUP, -EINVAL with a
 * reason. */
int kvc_seq_fork(kvc_seq *dst, const kvc_seq *src, char *err, size_t errlen);

#endif
