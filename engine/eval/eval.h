/*
 * eval.h - quality evaluation of a KV cache configuration on real text:
 * perplexity, mean KL divergence to the FP16-cache run, top-1 agreement,
 * and the cache's exact memory (bits per element all-in).
 * Room: engine/eval. May call: engine/graph (fwd_* on any device).
 *
 * The text (already tokenized) is cut into windows of n_ctx tokens; each
 * window is prefilled chunk by chunk in two states side by side, the FP16
 * reference and the configuration under test, and every position that has a
 * next token is scored: NLL of that token, KL(P_fp16 || P_test), and whether
 * both argmaxes agree. Allocates its states at the start; single-threaded
 * apart from the kernel pool.
 */
#ifndef LKQ_EVAL_H
#define LKQ_EVAL_H

#include "config/kvq_config.h"
#include "engine/kv/kvcache.h"
#include "engine/model/model.h"

typedef struct {
    int32_t n_ctx;      /* tokens per window */
    int32_t n_windows;  /* windows evaluated (consecutive, non-overlapping) */
    int32_t n_threads;  /* <= 0: online CPUs */
    int use_ref;        /* reference kernels (slow; tests) */
    int device;         /* bk_device (engine/backend/backend.h): 0 = CPU, 1 = CUDA */
    int compare;        /* 1: run the FP16 reference beside (KLD, top-1) */
    int exact;          /* 1: exact mode - both runs with f32 matmuls over the
                           dequantized weights (fwd_params.exact), so they differ
                           only by their KV cache: two FP16 caches of different
                           page sizes then differ by KLD < 1e-5 (the fast mode's
                           8-bit activations put that floor near 2e-3). Slower
                           (about 2x on AVX2) and 4 bytes per weight per run. */
    cfg_kv kv;          /* configuration under test */
    /* progress callback, called after every chunk (may be NULL) */
    void (*progress)(void *ctx, int window, int n_windows, int chunk,
                     int n_chunks, double ppl_so_far, double kld_so_far,
                     double elapsed_s);
    void *progress_ctx;
} eval_params;

typedef struct {
    int64_t n_scored;     /* positions scored */
    double ppl;           /* perplexity of the configuration under test */
    double ppl_ref;       /* perplexity with the FP16 cache (= ppl if !compare) */
    double kld;           /* mean KL(P_fp16 || P_test), nats */
    double kld_max;       /* largest per-position KL */
    double top1_agree;    /* fraction of positions with equal argmax */
    double bits_per_element;
    kvc_stats kv;         /* the test cache after the last window */
    double t_test_s;      /* forward time of the configuration under test */
    double t_ref_s;       /* forward time of the FP16 reference */
} eval_result;

/* Evaluates tokens[0 .. n_tokens) (needs n_windows * n_ctx of them).
 * Returns 0, or negative with a reason in err. */
int eval_perplexity(const mdl_model *m, const int32_t *tokens, int64_t n_tokens,
                    const eval_params *p, eval_result *r, char *err, size_t errlen);

#endif
