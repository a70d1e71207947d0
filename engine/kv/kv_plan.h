/*
 * kv_plan.h - the host-side KV planner: the one copy of every decision of
 * the LiveKVQuant-P cache (../shared/DESIGN.md §4), executed by the CPU
 * cache (kvcache.c) and by the GPU cache (kvcache_cuda.c).
 *
 * A kvp_pool owns the free lists of a pool's INT4 blocks and FP16 pages
 * (ids only: the arenas belong to the executor), its sizes and block
 * layout, and the pool-level bookkeeping: free units, usage, accounting,
 * the admission estimate and the sizing of a pool for a context or budget.
 *
 * Layer groups: a model's layers split by kind (kvp_layer_groups) into the
 * global layers, which keep the whole context under LiveKVQuant-P, and the
 * sliding-window layers, which keep their last W positions only; each
 * group that has layers is a kvp_pool of its own (its units span all layers
 * of the group), and a sequence has one kvp_seq per group, begun all or
 * nothing (kvp_begin_groups) and committed together. A window pool frees
 * the leading entries of its sequences that no later query can see (the
 * window moved past them) at every commit, so their memory stays bounded
 * however long the sequence (kvp_window_need).
 *
 * A kvp_seq owns one sequence's entry list, in position order
 *     [sink pages] [INT4 blocks | staged pages] ... [tail pages],
 * its prefill / warm-up / tail state, and the plan of the open step:
 *   kvp_begin     checks the step and reserves its targets: rows of the
 *                 step go to FP16 pages (sinks, warm-up staging, decode
 *                 tail; everything in fp16 mode; a partially filled last
 *                 page of the same run is continued) or to new INT4 blocks
 *                 (live chunks), plus the INT4 blocks of a re-quantization
 *                 (warm-up end, a full decode tail) and its source pages.
 *                 All or nothing: on -ENOSPC the free lists and the entries
 *                 are exactly as before.
 *   executor      per layer: EMA update over rows [row_stats, n) when
 *                 stats is set; an FP16 write or a quantization per target;
 *                 when rq is set, re-quantization of src[] (in order,
 *                 concatenated) into rq_ids[], block_tokens tokens each.
 *   kvp_commit    publishes: targets become entries (the last page grows),
 *                 re-quantized sources are replaced by their blocks and go
 *                 back to the free lists; in a window pool, entries wholly
 *                 before the next query's window go back too (never a
 *                 staged page before its re-quantization, never a page of
 *                 the decode tail). kvp_abort returns the reservation.
 * The executors own the arenas, the EMA state and every data operation
 * (statistics, quantization, page writes, segment tables) and ask the
 * planner for every decision, so that the two caches hold the same entries
 * for the same steps by construction.
 *
 * KV modes: a pool holds the mode ids of its configuration (cfg_kv_mode_id,
 * plus kv_modes: cfg_kv_has_mode; a mode id is fp16 or a quantized mode
 * with its code widths, e.g. int3 or k4v2); each sequence has one
 * (kvp_seq_set_mode, the pool's by default), and the planner decides by
 * it: an FP16 sequence keeps every position in FP16 pages, a quantized one
 * follows the lifecycle above with blocks of its own widths
 * (kvp_seq_layout). A pool of several modes uses the INT4 page size
 * (kvp_page_tokens) for every page, and is "shared": one byte arena cut
 * into slabs of a few of its largest unit (so that no class wastes more
 * than ~3 % of a slab); a slab in use holds units of one
 * class only (FP16 pages, or the blocks of one mode), handed out lowest
 * slab first, and returns to the common free stack as soon as all its
 * units are free - so memory an FP16 sequence let go of holds int4 or
 * int3 blocks next, and vice versa. Unit ids there are byte offsets / 64
 * (kvp_pool_arena: the executors address every unit as arena + id *
 * stride). A single-mode pool keeps its two arenas and free stacks.
 *
 * Prefix cache (kvp_prefix_*, kvp_seq_fork; see its section below): units
 * count their holders, so whole prompt chunks can be shared between
 * sequences and kept cached after them.
 *
 * May call: config/ (validation), kernels/kvq.h (block layout sizes). Uses
 * the shared types of engine/kv/kvcache.h (kvc_dims, kvc_stats). Allocates
 * only in kvp_pool_create / kvp_seq_create, and per cached prefix in
 * kvp_prefix_enable / kvp_prefix_insert (once per prompt chunk, never per
 * token).
 * Threading: a pool and its sequences are used by one thread at a time (the
 * executor's thread).
 */
#ifndef LKQ_KV_PLAN_H
#define LKQ_KV_PLAN_H

#include <stddef.h>
#include <stdint.h>

#include "config/kvq_config.h"
#include "engine/kv/kvcache.h"
#include "kernels/kvq.h"

typedef struct kvp_pool kvp_pool;
typedef struct kvp_seq kvp_seq;

/* Unit kinds: an FP16 page (page_tokens tokens) or an INT4 block
 * (block_tokens tokens), each over all layers. */
typedef enum { KVP_PAGE = 0, KVP_BLOCK = 1 } kvp_kind;

/* What a step re-quantizes into INT4 blocks besides its own rows. */
typedef enum {
    KVP_RQ_NONE = 0,
    KVP_RQ_WARMUP = 1, /* the staged warm-up chunks (warm-up end, or prompt end) */
    KVP_RQ_TAIL = 2    /* the decode tail reached block_tokens: each full block
                          is folded into the EMA (weight T/C) before quantizing */
} kvp_rq;

/* One entry of a sequence: positions [pos0, pos0+n) in unit id. */
typedef struct {
    int32_t kind; /* kvp_kind */
    int32_t id;
    int32_t pos0;
    int32_t n;
} kvp_ent;

/* Where some of the step's rows go: rows [row0, row0+n) into unit id from
 * slot slot0. existing: the page is the sequence's last entry, partially
 * filled (it grows at commit), else a unit reserved for this step. */
typedef struct {
    int32_t kind; /* kvp_kind */
    int32_t id;
    int32_t slot0;
    int32_t row0;
    int32_t n;
    int32_t existing;
} kvp_tgt;

/* A run of FP16 tokens to re-quantize: page id, slots [0, n). */
typedef struct {
    int32_t id;
    int32_t n;
} kvp_src;

/* The plan of the open step (read-only for the executor; valid from
 * kvp_begin / kvp_finish_prefill to kvp_commit / kvp_abort). */
typedef struct {
    int active;
    int pos0, n;     /* the step's positions [pos0, pos0+n) = its rows */
    int prefill;     /* a prompt chunk (1) or a decode step (0) */
    int stats;       /* fold rows [row_stats, n) into the EMA (int4 prefill) */
    int row_stats;   /* rows before it are sink tokens (never re-quantized) */
    int n_tgt;
    const kvp_tgt *tgt; /* in row order */
    int rq;          /* kvp_rq */
    int rq_tokens;   /* tokens re-quantized: sum of src[].n */
    int n_src;
    const kvp_src *src;
    int n_rq;        /* ceil(rq_tokens / block_tokens) blocks; block i holds */
    const int32_t *rq_ids; /* tokens [i*T, min((i+1)*T, rq_tokens)) of src */
    int rq_pos0;     /* position of src's first token (a window pool leaves
                        out staged pages the window has passed) */
} kvp_step;

/* Table sizes of a sequence of max_tokens positions: its entries (the
 * bound of the history's segment count), a step's targets, re-quantization
 * sources and blocks (the last three do not depend on max_tokens). */
typedef struct {
    int ents, tgt, src, rq;
} kvp_caps;

/* kvp_begin: the prompt must end first (see kvp_finish_prefill). */
#define KVP_FINISH_PREFILL 1
/* kvp_finish_prefill: a re-quantization step is open. */
#define KVP_REQUANT 1

/* ---- layer groups ------------------------------------------------------------ */

/* A model's layers by kind (KVC_LAYER_GLOBAL / KVC_LAYER_WINDOW): what each
 * group's pool is made of. */
typedef struct {
    int n_layers[KVC_LAYER_KINDS];  /* layers of each kind (0: no such group) */
    int window;                     /* W the window group keeps: the largest
                                       window of its layers (0: none) */
    cfg_kv cfg[KVC_LAYER_KINDS];    /* each group's configuration: c for the
                                       global layers; for the window layers c
                                       in fp16 mode unless c is int4 and
                                       window_kv is quantized (int2 .. int8:
                                       k_bits = v_bits = window_bits), and
                                       then with pages
                                       of at most 16 tokens (block_tokens is
                                       the page size in fp16 mode; the
                                       largest divisor of c's up to 16) */
    kvc_dims dims[KVC_LAYER_KINDS]; /* each group's dimensions (its layers;
                                       layer_window NULL) */
} kvp_groups;

/* Splits the layers of d (d->layer_window, NULL: all global) into *g and,
 * when not NULL, group[l] / local[l] ([d->n_layers]: the group of layer l
 * and its index within the group). */
void kvp_layer_groups(const cfg_kv *c, const kvc_dims *d, kvp_groups *g, int32_t *group,
                      int32_t *local);
/* The mode group `kind`'s part of a sequence of mode `mode` uses (a window
 * layer is FP16 unless mode is int4 - quantized - and c->window_kv is
 * quantized; its code width is then c->window_bits). */
int kvp_group_mode(const cfg_kv *c, int kind, int mode);

/* Units a sequence of a window pool (configuration c, window W) holds at
 * most when its steps are the engine's (prompt pieces aligned to chunks,
 * then decode; fwd_eval and the scheduler step so): *hq / *hf INT4 blocks
 * / FP16 pages while it decodes (after any step plus a decode step's
 * reservation), *pq / *pf (>= the hold) at its peak, a prompt chunk's
 * reservation or a warm-up re-quantization included. n_ctx caps the
 * positions (W >= n_ctx keeps everything). Other step patterns (prompt
 * pieces shorter than a chunk in the middle of a prompt, prompts appended
 * after decode) can need more: the pool then answers -ENOSPC as any full
 * pool. */
void kvp_window_need(const cfg_kv *c, int window, int n_ctx, int64_t *hq, int64_t *hf,
                     int64_t *pq, int64_t *pf);

/* ---- configuration-level planning (no pool needed) --------------------------- */

/* Tokens per FP16 page of a pool of configuration c: block_tokens in an
 * fp16-only pool (pages are the blocks), else min(block_tokens, 16) so
 * that sinks, the tail and the staging hold little slack. */
int kvp_page_tokens(const cfg_kv *c);
/* The fewest tokens any unit (page or block) of any group of a pool of
 * configuration c holds: what bounds the segment count of a history of n
 * positions (n / unit + a partial unit per chunk boundary). */
int kvp_unit_tokens(const cfg_kv *c);
/* Upper bound of the INT4 blocks *nq and FP16 pages *nf a fresh sequence
 * of mode c->mode (cfg_kv_with_mode for another mode of the pool)
 * holds at its peak (reservations of an open step included) while it
 * prefills n tokens in chunks of chunk_size and ends its prefill, in a
 * pool of configuration c without a window (the global group: the
 * scheduler admits by it; window groups are reserved per sequence slot,
 * kvp_pool_size). */
void kvp_estimate(const cfg_kv *c, int n, int64_t *nq, int64_t *nf);
/* Sizes the groups of a pool (kvp_layer_groups of c and d). The global
 * group: for the budget in c (kv_budget bytes or tokens), or else for
 * max_seqs sequences of n_ctx tokens each. The window group: max_seqs
 * sequences holding their decode bound plus KVC_PREFILL_SLOTS of them at
 * their peak (kvp_window_need), so that a sequence slot always finds its
 * window's units and admission can decide by the global group alone; a
 * byte budget pays for that reservation first (a token budget counts the
 * global group's tokens). Returns 0 and the arena sizes, or -EINVAL with a
 * reason (bad config, budget too small). */
int kvp_pool_size(const cfg_kv *c, const kvc_dims *d, int n_ctx, int max_seqs,
                  kvc_pool_sizes *out, char *err, size_t errlen);
/* How many sequences of n_ctx tokens a pool sized by kvp_pool_size(c, d,
 * n_ctx, max_seqs) holds at once: max_seqs, or fewer when the global
 * group's units run out first (its INT4 blocks, or its FP16 pages in fp16
 * mode, by kvp_estimate of n_ctx; FP16 staging and tail pages of an INT4
 * global group are shared and not counted). The window group needs no
 * check: it is reserved per sequence slot. Returns the count (0 without a
 * global group: unbounded by blocks, the slots decide: max_seqs), or
 * -EINVAL with a reason. */
int kvp_pool_fit(const cfg_kv *c, const kvc_dims *d, int n_ctx, int max_seqs, char *err,
                 size_t errlen);
/* The tables of a sequence of max_tokens positions (see kvp_caps). */
void kvp_plan_caps(const cfg_kv *c, int max_tokens, kvp_caps *out);
/* Checks a configuration against KV dimensions (what every pool needs).
 * Returns 0 or -EINVAL with a reason. */
int kvp_check(const cfg_kv *c, const kvc_dims *d, char *err, size_t errlen);

/* Adds the token / element / quantized / outlier / clamped counts of s
 * (the totals and each layer kind's tokens and elements) and its FP16
 * equivalent to *sum. */
void kvp_stats_add_counts(kvc_stats *sum, const kvc_stats *s);

/* ---- the pool -------------------------------------------------------------- */

/* Creates the bookkeeping of a pool of n_qblocks INT4 blocks (forced to 0
 * in fp16 mode) and n_fpages FP16 pages (a shared pool, cfg of several
 * modes: the slabs that hold their bytes, rounded up; kvp_pool_size gives
 * it n_qblocks 0 and the pages of its slabs) for configuration cfg and
 * dimensions d (both copied; d->n_layers: the layers of the group, its
 * layer_window is ignored) whose sequences keep their last `window`
 * positions (0: all of them). Lowest ids are handed out first. Returns 0
 * and *out (caller frees with kvp_pool_destroy), or -EINVAL / -ENOMEM with
 * a reason. */
int kvp_pool_create(const cfg_kv *cfg, const kvc_dims *d, int window, int64_t n_qblocks,
                    int64_t n_fpages, kvp_pool **out, char *err, size_t errlen);
/* NULL is a no-op; destroy the pool's sequences first. */
void kvp_pool_destroy(kvp_pool *p);

const cfg_kv *kvp_pool_cfg(const kvp_pool *p);
const kvc_dims *kvp_pool_dims(const kvp_pool *p);
/* The window its sequences keep (0: all positions). */
int kvp_pool_window(const kvp_pool *p);
/* The layout of one layer's INT4 block; NULL in fp16 mode. */
const kvq_layout *kvp_pool_layout(const kvp_pool *p);
int kvp_pool_page_tokens(const kvp_pool *p);
/* Units of the pool (*nq is 0 in fp16 mode; a shared pool: what its whole
 * arena holds in blocks of the pool's mode / in pages). */
void kvp_pool_units(const kvp_pool *p, int64_t *nq, int64_t *nf);
/* Bytes of one INT4 block / one FP16 page over all layers (an FP16 page
 * holds, per layer, K [page_tokens][kv_dim] then V, fp16). */
void kvp_pool_unit_bytes(const kvp_pool *p, size_t *qbytes, size_t *fbytes);
/* Units free now (a shared pool: what its free bytes hold in blocks of the
 * pool's mode / in pages). */
void kvp_pool_free_units(const kvp_pool *p, int64_t *qfree, int64_t *ffree);
/* The free stack of one kind (the next id handed out is ids[*n - 1]);
 * borrowed, valid until the next call that takes or returns units; NULL
 * and 0 for a shared pool. For tests. */
const int32_t *kvp_pool_free_list(const kvp_pool *p, int kind, int64_t *n);
/* Bytes of both arenas, all overheads. */
int64_t kvp_pool_capacity_bytes(const kvp_pool *p);
/* 1 for a shared pool (several modes: one arena of slabs). */
int kvp_pool_shared(const kvp_pool *p);
/* The arenas the executor allocates: *qarena bytes for blocks and *farena
 * for pages, unit id i at i * *qstride / i * *fstride. A shared pool has
 * one arena (*farena 0: pages live in the block arena) and both strides
 * are its id step. */
void kvp_pool_arena(const kvp_pool *p, size_t *qarena, size_t *farena, size_t *qstride,
                    size_t *fstride);
/* The block layout of quantized mode id `mode` in this pool (NULL for
 * fp16 or a mode the pool does not hold). */
const kvq_layout *kvp_pool_mode_layout(const kvp_pool *p, int mode);
/* Free bytes, cached prefix units included (admission): in a shared pool
 * free slabs plus the free units of slabs in use at their slab share. */
int64_t kvp_pool_free_bytes(const kvp_pool *p);
/* What nq blocks of mode id `mode` and nf pages cost in this pool's bytes
 * (a shared pool: their slab shares), the currency of kvp_pool_free_bytes. */
int64_t kvp_pool_cost(const kvp_pool *p, int mode, int64_t nq, int64_t nf);
/* kvp_pool_cost for a shared pool of configuration c and dimensions d
 * without the pool; -1 when c holds one mode only. */
int64_t kvp_plan_cost(const cfg_kv *c, const kvc_dims *d, int mode, int64_t nq, int64_t nf);
/* Fraction of the pool's bytes in use, 0..1. */
double kvp_pool_usage(const kvp_pool *p);
/* Adds the pool's units (used and total) and the bytes of the units in
 * use to *out, in its totals and in layer_kind[kind] (with the pool's
 * layer count). The executor zeroes *out, sums its sequences' counts into
 * it (kvp_stats_add_counts), then adds each group's pool. */
void kvp_pool_add_stats(const kvp_pool *p, int kind, kvc_stats *out);

/* ---- sequences ------------------------------------------------------------- */

/* A sequence of at most max_tokens positions in pool p (borrowed; must
 * outlive it), on the pool's list of live sequences; owner (borrowed, may
 * be NULL) is the executor's object, for kvp_seq_owner. Its tables are
 * allocated here, once. Returns 0 and *out (kvp_seq_destroy) or -EINVAL /
 * -ENOMEM with a reason. */
int kvp_seq_create(kvp_pool *p, int max_tokens, void *owner, kvp_seq **out, char *err,
                   size_t errlen);
/* Returns every unit (open step included) to the pool and leaves the
 * pool's list; NULL is a no-op. */
void kvp_seq_destroy(kvp_seq *s);
/* The pool's live sequences, newest first: pass NULL for the first, then
 * the previous one; NULL at the end. Borrowed. */
kvp_seq *kvp_pool_next_seq(const kvp_pool *p, const kvp_seq *prev);
/* The owner given to kvp_seq_create. */
void *kvp_seq_owner(const kvp_seq *s);
/* Empties the sequence: aborts an open step, returns its entries' units to
 * the pool (in entry order), clears the prefill state. */
void kvp_seq_reset(kvp_seq *s);

/* Sets the KV mode of an empty sequence (one its pool holds: group modes,
 * kvp_group_mode); it stays until the next call (kvp_seq_reset keeps it).
 * Returns 0 or -EINVAL with a reason. kvp_seq_mode: the mode. */
int kvp_seq_set_mode(kvp_seq *s, int mode, char *err, size_t errlen);
int kvp_seq_mode(const kvp_seq *s);
/* The layout of the sequence's blocks (its mode's); NULL for fp16. */
const kvq_layout *kvp_seq_layout(const kvp_seq *s);
/* kvp_seq_set_mode over the groups of one sequence (s[g], NULL where the
 * pool has no such group; c the executor's whole configuration): each
 * group gets kvp_group_mode(c, g, mode). */
int kvp_seq_set_mode_groups(kvp_seq *const *s, int n_groups, const cfg_kv *c, int mode,
                            char *err, size_t errlen);

int kvp_seq_n_tokens(const kvp_seq *s);
/* Prefill chunks committed so far. */
int kvp_seq_chunks(const kvp_seq *s);
/* 1 while the sequence is still in warm-up (int4 mode). */
int kvp_seq_warming(const kvp_seq *s);
/* The committed entries in position order (borrowed; *n of them). During
 * an open step they are the history as it was before the step. */
const kvp_ent *kvp_seq_entries(const kvp_seq *s, int *n);
/* The bound of the entry count (the tables the executor sizes by it). */
int kvp_seq_max_entries(const kvp_seq *s);
/* INT4 blocks and FP16 pages held by the entries. */
void kvp_seq_units(const kvp_seq *s, int64_t *nq, int64_t *nf);
/* Positions the entries hold: n_tokens, or fewer in a window pool. */
int kvp_seq_held_tokens(const kvp_seq *s);
/* Adds the sequence's accounting in this group (units, bytes, positions
 * held, elements) to *out, in its totals and in layer_kind[kind]; tokens
 * and the data-derived counts (n_quantized, n_outliers, n_clamped) are the
 * executor's to set. */
void kvp_seq_add_stats(const kvp_seq *s, int kind, kvc_stats *out);
/* The host-side accounting of one sequence over its groups (s[g], NULL
 * where the pool has no such group): zeroes *out, adds each group's
 * kvp_seq_add_stats and sets tokens (the first group's); the data-derived
 * counts are left 0. */
void kvp_seq_groups_stats(kvp_seq *const *s, int n_groups, kvc_stats *out);
/* The open step's plan (active == 0 when none). Borrowed. */
const kvp_step *kvp_seq_step(const kvp_seq *s);

/* Plans a step of n tokens at pos0 == kvp_seq_n_tokens(s): prefill 1 for a
 * prompt chunk, 0 for decode (n > 1 is always a chunk). Returns
 *   0                   the step is open: execute kvp_seq_step(s), then
 *                       kvp_commit or kvp_abort;
 *   KVP_FINISH_PREFILL  the first decode step of a prompt that ended during
 *                       warm-up: nothing was reserved; run the executor's
 *                       finish_prefill (kvp_finish_prefill), then call
 *                       kvp_begin again;
 *   -EINVAL             bad step (a step already open, wrong position,
 *                       n outside 1..chunk_size), with a reason;
 *   -ENOSPC             the sequence or the pool cannot hold the step;
 *                       nothing was changed. */
int kvp_begin(kvp_seq *s, int pos0, int n, int prefill, char *err, size_t errlen);

/* Ends the prefill (idempotent; no-op in fp16 mode). If the prompt ended
 * during warm-up and keep_warmup_fp16 is off, opens a step (n = 0) that
 * re-quantizes the staged chunks with the statistics gathered so far and
 * returns KVP_REQUANT: the executor re-quantizes every layer and commits
 * (or aborts on a device error). Returns 0 when there is nothing to do,
 * -ENOSPC when the blocks are not there (the staged chunks then stay FP16
 * for good: still exact), -EINVAL when a step is open. */
int kvp_finish_prefill(kvp_seq *s, char *err, size_t errlen);

/* Called by kvp_commit for each INT4 block that becomes an entry (added
 * 1: live blocks, then re-quantized blocks) and for each that leaves the
 * entries because the window moved past it (added 0, before its id returns
 * to the free list), before the step closes: the executor keeps its
 * counters of the blocks held there. */
typedef void (*kvp_block_fn)(void *ctx, int32_t id, int added);

/* Publishes the open step (no-op when none): see the file header. on_block
 * may be NULL; ctx is passed through. */
void kvp_commit(kvp_seq *s, kvp_block_fn on_block, void *ctx);

/* The executor's end of the prefill of group g of a sequence (called by
 * kvp_begin_groups when kvp_begin answers KVP_FINISH_PREFILL). */
typedef int (*kvp_finish_fn)(void *ctx, int g, char *err, size_t errlen);

/* kvp_begin over the groups of one sequence (s[g], NULL where the pool has
 * no such group), all or nothing: KVP_FINISH_PREFILL is answered with
 * fin(ctx, g) (its -ENOSPC is no failure: the staged chunks stay FP16) and
 * a second kvp_begin. Returns 0 with every group's step open, or the first
 * failure with every group's step aborted (the free lists and entries as
 * they were). */
int kvp_begin_groups(kvp_seq *const *s, int n_groups, int pos0, int n, int prefill,
                     kvp_finish_fn fin, void *ctx, char *err, size_t errlen);
/* Undoes kvp_begin / kvp_finish_prefill's reservation: the free lists are
 * restored exactly (same ids, same order). No-op when no step is open. */
void kvp_abort(kvp_seq *s);

/* ---- the prefix cache -------------------------------------------------------
 * A quantized block depends only on the tokens before it and on the EMA
 * state at its chunk boundary, so a sequence's entries at a chunk boundary
 * can be continued by any later sequence with the same tokens: they are
 * shared (each unit counts its holders: sequences and cache nodes) instead
 * of recomputed. Only what is provably what a cold run would hold is
 * shared: whole chunks of a prompt past warm-up (int4: the staged warm-up
 * has been re-quantized into blocks and each later chunk was quantized
 * live; so the warm-up is shared as a unit, with the first boundary at
 * warmup_chunks * chunk_size), no decode tail, no partially filled page a
 * later step would continue (a fork copies such a page instead). Pools
 * with a window (sliding-window layers) do not share: their units leave
 * as the window moves. A node keys its prefix by a hash chain over its
 * chunks seeded with the configuration (KV mode first), and checks the
 * tokens themselves. Units only nodes hold are "cached": they count as
 * free (kvp_pool_free_units, admission) and are not "used" in the
 * accounting; take() evicts the least recently used nodes when the free
 * stack is empty. The executor keeps its own state at the boundary (EMA
 * ranges, counters) in the node's data (data_bytes, opaque here). */

/* Turns the prefix cache on (at most max_nodes prefixes, each with
 * data_bytes of the executor's). Returns 0, -ENOTSUP for a pool with a
 * window, -EINVAL / -ENOMEM with a reason. Idempotent. */
int kvp_prefix_enable(kvp_pool *p, int max_nodes, size_t data_bytes, char *err,
                      size_t errlen);
int kvp_prefix_enabled(const kvp_pool *p);
/* Drops every cached prefix (counted as evictions) / and turns the cache
 * off (kvp_pool_destroy does). */
void kvp_prefix_clear(kvp_pool *p);
void kvp_prefix_disable(kvp_pool *p);
/* An empty sequence s takes the longest cached prefix of toks[0, n) that
 * leaves at least its last token to compute: its entries (held, not
 * copied), position and chunk state. Returns the tokens taken (a multiple
 * of chunk_size; 0: none, or no cache) and *data, the node's executor
 * state (borrowed; valid until the next call that may evict). Counts n
 * queried tokens and the tokens hit. */
int kvp_prefix_adopt(kvp_seq *s, const int32_t *toks, int n, const void **data);
/* After a commit: when s (whose first tokens are toks[0, n_tokens)) is at
 * a shareable boundary that is not cached yet, caches it (evicting the
 * least recently used node if max_nodes are cached) and returns 1 with
 * *data for the executor to fill now; 0 when there is nothing to do
 * (already cached: it counts as a use), -ENOMEM (nothing cached). */
int kvp_prefix_insert(kvp_seq *s, const int32_t *toks, void **data);
void kvp_prefix_get_stats(const kvp_pool *p, kvc_prefix_stats *out);

/* Makes the empty sequence dst continue from where src is (no step open
 * on either): the same entries, held by both, and the same prefill /
 * warm-up / tail state - the n choices of one prompt. A partially filled
 * last page is not shared: dst gets a new page *copy_to and the executor
 * copies slots [0, copy_from->n) of page copy_from->id into it (id -1:
 * nothing to copy). Returns 0, -ENOSPC (no page for the copy), -ENOTSUP
 * (a pool with a window), -EINVAL, with a reason. */
int kvp_seq_fork(kvp_seq *dst, const kvp_seq *src, kvp_src *copy_from, int32_t *copy_to,
                 char *err, size_t errlen);

#endif
