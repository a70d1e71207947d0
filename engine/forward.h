/*
 * forward.h - the Llama forward pass on the CPU: token embedding, per layer
 * RMSNorm -> Q/K/V -> RoPE -> causal GQA attention over the KV cache ->
 * output projection -> residual -> RMSNorm -> SwiGLU FFN -> residual, then
 * the final norm and the output head.
 *
 * A fwd_state owns every buffer the pass needs (activations for a batch of
 * up to max_batch tokens, the FP16 KV cache for n_ctx positions, kernel
 * scratch, the thread pool), all allocated by fwd_create: fwd_eval
 * allocates nothing. One fwd_state is one sequence; it is used by one
 * thread at a time. The model is borrowed and must outlive the state.
 */
#ifndef LKQ_FORWARD_H
#define LKQ_FORWARD_H

#include "engine/model.h"

typedef struct {
    int32_t n_ctx;      /* KV cache positions (<= 0: the model's n_ctx_train) */
    int32_t max_batch;  /* tokens per internal step (<= 0: 512) */
    int32_t n_threads;  /* <= 0: number of online CPUs */
    int logits_all;     /* 1: fwd_eval can return logits for every token */
    int use_ref;        /* 1: run kernels/ref (single-threaded oracle) */
} fwd_params;

typedef struct fwd_state fwd_state;

fwd_params fwd_default_params(void);

/* Allocates the state for model m. Returns 0 and *out (caller frees with
 * fwd_destroy) or negative with a reason in err. */
int fwd_create(const mdl_model *m, const fwd_params *p, fwd_state **out,
               char *err, size_t errlen);
void fwd_destroy(fwd_state *s); /* NULL is a no-op */

int32_t fwd_n_ctx(const fwd_state *s);
int32_t fwd_n_threads(const fwd_state *s);
/* Bytes held by the KV cache (both K and V, all layers). */
size_t fwd_kv_bytes(const fwd_state *s);

/* Runs n tokens at positions pos .. pos+n-1; the cache must hold positions
 * 0 .. pos-1 of the same sequence (they are kept; later ones are
 * overwritten). On success *logits points into the state (valid until the
 * next call): [n_vocab] for the last token, or [n, n_vocab] when the state
 * was created with logits_all and want_all is 1 (then n <= max_batch).
 * Returns 0, or negative with a reason in err (bad token id, context full,
 * ...); on error the cache beyond pos is unspecified. */
int fwd_eval(fwd_state *s, const int32_t *tokens, int n, int pos, int want_all,
             const float **logits, char *err, size_t errlen);

#endif
