/*
 * kref.h - plain-C reference kernels: the oracle every optimized layer
 * (kernels/cpu, kernels/cuda) is tested against. Written for clarity, not
 * speed; single-threaded; no allocation except where a comment says so.
 * All functions are pure with respect to global state and thread-safe.
 *
 * Conventions: a weight matrix W has n_rows rows of n_cols elements, each row
 * stored contiguously in type t (kt_row_bytes(t, n_cols) bytes per row).
 * Activations are f32, token-major: x [n_tok, n_cols].
 */
#ifndef LKQ_KREF_H
#define LKQ_KREF_H

#include "kernels/ktypes.h"
#include "kernels/kvq.h"

/* Dequantize one row of n elements of type t into out[n]. */
void kref_dequant_row(kt_type t, const void *row, float *out, int64_t n);

/* y [n_tok, n_rows] = x [n_tok, n_cols] @ W^T, W (n_rows, n_cols) of type t.
 * Accumulates in double over the dequantized weights. */
void kref_matmul(kt_type t, const void *W, const float *x, float *y,
                 int n_rows, int n_cols, int n_tok);

/* out[n] = x[n] / sqrt(mean(x^2) + eps) * w[n]; out may alias x. */
void kref_rmsnorm(float *out, const float *x, const float *w, int n, float eps);

/* In-place rotary embedding of x [n_heads, head_dim] at position pos,
 * interleaved pairing (x[2i], x[2i+1]) as llama2.c and GGUF 'llama' use.
 * Only the first n_rot dims of each head rotate (n_rot <= head_dim, even).
 * angle_i = pos * freq_scale * theta^(-2i/n_rot). */
void kref_rope(float *x, int n_heads, int head_dim, int n_rot, int pos,
               float theta, float freq_scale);

/* kref_rope with the model descriptor's options: neox = 1 rotates the
 * halves (x[i], x[i + n_rot/2]) (Qwen2, Gemma) instead of adjacent pairs;
 * freqs (NULL or [n_rot/2]) divides pair i's frequency (Llama-3
 * rope_freqs): angle_i = pos * freq_scale * theta^(-2i/n_rot) / freqs[i].
 * neox 0 and freqs NULL is exactly kref_rope. */
void kref_rope_ex(float *x, int n_heads, int head_dim, int n_rot, int pos, float theta,
                  float freq_scale, const float *freqs, int neox);

/* In place, each of the rows rows of x [rows][dim] becomes x H / sqrt(dim),
 * H the Walsh-Hadamard matrix of order dim (H[i][j] = (-1)^popcount(i & j);
 * dim a power of two): orthonormal and its own inverse, so rotating both
 * sides of a dot product leaves it unchanged. Straight from the definition
 * (O(dim^2) per row, double sums). */
void kref_hadamard(float *x, int rows, int dim);

/* In-place numerically stable softmax over x[n]. */
void kref_softmax(float *x, int n);

/* gate[i] = silu(gate[i]) * up[i], i < n. */
void kref_swiglu(float *gate, const float *up, int n);

/* gate[i] = gelu_tanh(gate[i]) * up[i], i < n, with
 * gelu_tanh(x) = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (GeGLU). */
void kref_geglu(float *gate, const float *up, int n);

/* x[i] = cap * tanh(x[i] / cap), i < n (logit soft-capping; cap > 0). */
void kref_softcap(float *x, int n, float cap);

/* Causal attention of one query token over an FP16 KV cache.
 * q   [n_head, head_dim] (already roped)
 * k,v caches: position p, kv head h starts at k + p*kv_stride + h*head_dim
 * attends to positions 0..n_pos-1; GQA: query head i uses kv head
 * i / (n_head / n_kv_head). out [n_head, head_dim].
 * scale is usually 1/sqrt(head_dim). scratch needs n_pos floats. */
void kref_attn_f16(float *out, const float *q, const uint16_t *k,
                   const uint16_t *v, size_t kv_stride, int n_pos, int n_head,
                   int n_kv_head, int head_dim, float scale, float *scratch);

/* Causal attention of one query token at absolute position q_pos over a
 * history made of segments (kernels/kvq.h): every position p of every
 * segment with p <= q_pos and, for a sliding window W = window > 0, also
 * p > q_pos - W (W = 0: no lower bound), i.e. p in [q_pos - W + 1, q_pos]
 * (segments do not overlap; any order). KVS_Q4 segments are
 * dequantized with kvq_dequant_block first (L describes them; may be NULL
 * when there are none), then attended like the others: the oracle of the
 * fused kernels. q [n_head, head_dim], out [n_head, head_dim]; GQA as
 * kref_attn_f16. scratch: kref_attn_seg_scratch_floats() floats. */
size_t kref_attn_seg_scratch_floats(const kvs_seg *segs, int n_segs,
                                    const kvq_layout *L);
void kref_attn_seg(float *out, const float *q, int q_pos, int window, const kvs_seg *segs,
                   int n_segs, const kvq_layout *L, int n_head, int n_kv_head,
                   int head_dim, float scale, float *scratch);

#endif
