/*
 * backend.h - the device switch of the engine: the forward pass and its KV
 * pool on the CPU (engine/forward.h, engine/kvcache.h) or on a CUDA GPU
 * (engine/forward_cuda.h, engine/kvcache_cuda.h) behind one interface:
 *  - one sequence per state (bk_eval ...): the CLI (`--device cpu|cuda`)
 *    and the evaluation (eval_params.device);
 *  - sequences on the state's shared KV pool stepped together
 *    (bk_seq_*, bk_pool_*, bk_eval_batch): the scheduler's continuous
 *    batching (sched_params.device, `livekvq-server --device`).
 * The CPU path is fwd_* / kvc_* unchanged. The GPU pool's bookkeeping
 * mirrors kvcache.c decision for decision, so admission estimates, free
 * units and block counts are the same on both devices; the few figures
 * that live in device memory are said where they are read.
 *
 * In a build without CUDA (nvcc not found, or -Dcuda=disabled) creating a
 * CUDA state fails with a one-line reason; nothing else changes.
 * Threading: a bk_state is used by one thread at a time.
 */
#ifndef LKQ_BACKEND_H
#define LKQ_BACKEND_H

#include "engine/graph/forward.h"
#include "engine/kv/kvcache.h"
#include "engine/model/model.h"

typedef enum { BK_DEVICE_CPU = 0, BK_DEVICE_CUDA = 1 } bk_device;

/* "cpu" or "cuda" -> *out; returns 0, or -1 for anything else. */
int bk_parse_device(const char *s, bk_device *out);
const char *bk_device_str(bk_device d);
/* 1 when this build has the CUDA backend compiled in. */
int bk_cuda_built(void);

typedef struct bk_state bk_state;

/* A forward state for model m on device dev (CUDA: device 0). Returns 0
 * and *out (bk_destroy) or negative with a reason. */
int bk_create(const mdl_model *m, const fwd_params *p, bk_device dev, bk_state **out,
              char *err, size_t errlen);
void bk_destroy(bk_state *s); /* NULL is a no-op */

/* fwd_eval / fwd_finish_prefill / fwd_reset / fwd_kv_stats / fwd_n_ctx on
 * the chosen device (same contracts). */
int bk_eval(bk_state *s, const int32_t *tokens, int n, int pos, int want_all,
            const float **logits, char *err, size_t errlen);
int bk_finish_prefill(bk_state *s, char *err, size_t errlen);
void bk_reset(bk_state *s);
int bk_kv_stats(bk_state *s, kvc_stats *out, char *err, size_t errlen);
int32_t bk_n_ctx(const bk_state *s);
/* "cpu (avx2, 2 threads)" or "cuda (NVIDIA H200, ...)". */
const char *bk_describe(const bk_state *s);
bk_device bk_state_device(const bk_state *s);

/* ---- sequences on the shared pool (continuous batching) ---------------- */

typedef struct bk_seq bk_seq;

/* fwd_max_batch: tokens one bk_eval_batch step may hold. */
int32_t bk_max_batch(const bk_state *s);
/* The pool, as kvc_pool_capacity_bytes / kvc_pool_free_units /
 * kvc_pool_estimate / kvc_pool_usage (host bookkeeping on both devices). */
int64_t bk_pool_capacity_bytes(const bk_state *s);
void bk_pool_free_units(const bk_state *s, int64_t *qfree, int64_t *ffree);
void bk_pool_estimate(const bk_state *s, int n, int64_t *nq, int64_t *nf);
double bk_pool_usage(const bk_state *s);
/* kvc_pool_stats. CUDA: the outlier / clamp counts of blocks committed
 * since the last call are read from the device (kvcd_pool_stats: a small
 * kernel and copy per sequence with new blocks). Returns 0 or negative
 * with a reason (the sums may then be partial). Between steps only. */
int bk_pool_stats(bk_state *s, kvc_stats *out, char *err, size_t errlen);

/* A sequence of at most max_tokens positions on s's pool (kvc_seq_create
 * / kvcd_seq_create). Returns 0 and *out (bk_seq_destroy, before s) or
 * negative with a reason. */
int bk_seq_create(bk_state *s, int max_tokens, bk_seq **out, char *err, size_t errlen);
void bk_seq_destroy(bk_seq *q); /* returns its blocks; NULL is a no-op */
void bk_seq_reset(bk_seq *q);
int bk_seq_n_tokens(const bk_seq *q);
/* kvc_seq_ema: mean EMA range of layer l, tensor 0 = K / 1 = V; 0 or -1.
 * CUDA: the first call after the sequence's EMA changed copies its EMA
 * state from the device (kvcd_seq_ema_mean); the rest are cached. */
int bk_seq_ema(bk_seq *q, int layer, int tensor, float *lo, float *hi);
int bk_seq_warming(const bk_seq *q);

/* One sequence's part of a batched step (fwd_item with a bk_seq). */
typedef struct {
    bk_seq *seq;             /* borrowed; created on the same state */
    const int32_t *tokens;
    int n;
    int prefill;
    int want_logits;
    const float *out_logits; /* out: [n_vocab] host memory, until the next call */
} bk_item;

/* fwd_eval_batch / fwdc_eval_batch (same contract; the GPU takes at most
 * max(1, max_seqs) items and reports a device error during the step with
 * *failed = -1). */
int bk_eval_batch(bk_state *s, bk_item *items, int n_items, int *failed, char *err,
                  size_t errlen);

#endif
