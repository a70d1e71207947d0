/*
 * model.h - an in-memory model of the llama, qwen2 or gemma3 family: the
 * descriptor (hyper-parameters and per-architecture features), weight views
 * (pointing into the mmap'd file or into buffers the model owns) and the
 * tokenizer. Loaded from a GGUF v3 file (families: engine/model/arch.c) or
 * a llama2.c .bin checkpoint.
 *
 * A loaded mdl_model is read-only: any thread may read it. Loading checks
 * every offset and size against the file; a bad file gives an error message,
 * never a crash.
 */
#ifndef LKQ_MODEL_H
#define LKQ_MODEL_H

#include "kernels/ktypes.h"
#include "tokenizer/tok.h"

/* A weight matrix: n_rows rows of n_cols elements of type `type`, rows
 * contiguous (kt_row_bytes(type, n_cols) bytes each). Vectors have
 * n_rows == 1. */
typedef struct {
    kt_type type;
    const void *data;
    int64_t n_cols;
    int64_t n_rows;
} mdl_weight;

/* The model descriptor: hyper-parameters and the per-architecture features
 * the one layer graph (engine/graph) reads. Filled by the loader from the
 * arch-prefixed GGUF keys ({arch}.block_count, {arch}.attention.*, ...) or
 * from a llama2.c header; a new family is new values here (and, where
 * needed, new backend ops), never a new forward pass.
 *
 * The layer sequence these fields select (graph/forward.c):
 *   x = embd[tok] * embd_scale
 *   per layer l:
 *     h = rmsnorm(x, attn_norm)
 *     q, k, v = h @ wq, wk, wv (+ bq, bk, bv when qkv_bias)
 *     q, k = rmsnorm per head (q_norm, k_norm) when qk_norm
 *     q, k = rope(pos; rope_type, layer's rope base, rope_freq_scale, rope_freqs)
 *     a = attention(q * attn_scale, KV cache; causal, the layer's window)
 *     a = a @ wo;  a = rmsnorm(a, post_attn_norm) when sandwich_norm
 *     x += a
 *     h = rmsnorm(x, ffn_norm)
 *     f = (act(h @ gate) * (h @ up)) @ down;  f = rmsnorm(f, post_ffn_norm) when sandwich_norm
 *     x += f
 *   logits = rmsnorm(x, out_norm) @ output  (softcap: c * tanh(z / c) when final_softcap > 0)
 */
typedef enum {
    MDL_ACT_SILU = 0,      /* SwiGLU: silu(gate) * up (Llama, Qwen2) */
    MDL_ACT_GELU_TANH = 1, /* GeGLU: gelu_tanh(gate) * up (Gemma) */
} mdl_act;

typedef enum {
    MDL_ROPE_NORM = 0, /* rotate adjacent pairs (x[2i], x[2i+1]): GGUF llama, llama2.c */
    MDL_ROPE_NEOX = 1, /* rotate halves (x[i], x[i + n_rot/2]): Qwen2, Gemma */
} mdl_rope_type;

typedef enum {
    MDL_ROPE_SCALE_NONE = 0,
    MDL_ROPE_SCALE_LINEAR = 1, /* positions times rope_freq_scale */
    MDL_ROPE_SCALE_LLAMA3 = 2, /* per-frequency divisors rope_freqs (Llama 3.1+) */
} mdl_rope_scaling;

typedef struct {
    int32_t n_vocab;
    int32_t dim;        /* embedding length */
    int32_t hidden_dim; /* feed-forward length */
    int32_t n_layers;
    int32_t n_heads;
    int32_t n_kv_heads;
    int32_t head_dim;   /* {arch}.attention.key_length, else dim / n_heads */
    int32_t n_rot;      /* rotary dims per head (usually head_dim) */
    int32_t n_ctx_train;
    float rope_theta;      /* RoPE base of global layers */
    float rope_freq_scale; /* 1 / linear scaling factor (1 = none) */
    float norm_eps;
    /* ---- per-architecture features (defaults = Llama) ---- */
    int qkv_bias;            /* Q/K/V projections carry biases (Qwen2) */
    int qk_norm;             /* RMSNorm over each head of Q and K (Gemma-3) */
    int sandwich_norm;       /* post-attention and post-FFN RMSNorms (Gemma-3) */
    mdl_act act;             /* gated FFN activation */
    mdl_rope_type rope_type;
    mdl_rope_scaling rope_scaling;
    float embd_scale;        /* embeddings are multiplied by it (1; Gemma: sqrt(dim)) */
    float attn_scale;        /* query scale (1/sqrt(head_dim); Gemma-3: query_pre_attn_scalar^-1/2) */
    float final_softcap;     /* logits c * tanh(z / c); 0 = none */
    int tied_output;         /* the output head is the token embedding */
    int32_t sliding_window;  /* W of the window layers (0: every layer is global) */
    float rope_theta_local;  /* RoPE base of window layers (= rope_theta when absent) */
} mdl_hparams;

typedef struct {
    const float *attn_norm; /* [dim] */
    mdl_weight wq;          /* (n_heads*head_dim, dim) */
    mdl_weight wk;          /* (n_kv_heads*head_dim, dim) */
    mdl_weight wv;          /* (n_kv_heads*head_dim, dim) */
    mdl_weight wo;          /* (dim, n_heads*head_dim) */
    const float *ffn_norm;  /* [dim] */
    mdl_weight ffn_gate;    /* w1 (hidden, dim) */
    mdl_weight ffn_down;    /* w2 (dim, hidden) */
    mdl_weight ffn_up;      /* w3 (hidden, dim) */
    /* optional, per the descriptor's features (NULL when absent) */
    const float *bq, *bk, *bv;      /* [n_heads*head_dim], [kv_dim], [kv_dim] (qkv_bias) */
    const float *q_norm, *k_norm;   /* [head_dim] (qk_norm) */
    const float *post_attn_norm;    /* [dim] (sandwich_norm) */
    const float *post_ffn_norm;     /* [dim] (sandwich_norm) */
    /* attention kind of this layer */
    int32_t window;                 /* 0: global; > 0: sliding window of W positions */
    float rope_theta;               /* RoPE base of this layer */
} mdl_layer;

typedef struct mdl_model {
    mdl_hparams hp;
    mdl_weight tok_embd;     /* (n_vocab, dim) */
    const float *out_norm;   /* [dim] */
    mdl_weight output;       /* (n_vocab, dim); same data as tok_embd if tied */
    mdl_layer *layers;       /* [n_layers] */
    const float *rope_freqs; /* [n_rot/2] frequency divisors (MDL_ROPE_SCALE_LLAMA3), else NULL */
    tok_tokenizer *tok;      /* owned */
    char arch[32];           /* "llama", "qwen2", "gemma3" */
    char name[128];          /* general.name or file stem */
    char chat_template[32];  /* "chatml", "llama2", "llama3", "zephyr", "gemma" or "" */
    char default_system[256];/* system message the GGUF's template inserts when
                                a chat does not start with one ("" = none) */
    const char *format;      /* "gguf" or "llama2c" */
    void *priv;              /* loader state: mapping, owned buffers */
} mdl_model;

/* Loads path (GGUF v3, or llama2.c .bin detected by content). For .bin,
 * tokenizer_path names the tokenizer (llama2.c tokenizer.bin or a
 * SentencePiece tokenizer.model); NULL looks beside the model for
 * tokenizer.bin, tok<N>.bin, tokenizer.model, tok<N>.model.
 * Returns 0 and *out (caller frees with mdl_free) or negative with a
 * one-line reason in err. */
int mdl_load(const char *path, const char *tokenizer_path, mdl_model **out,
             char *err, size_t errlen);
void mdl_free(mdl_model *m); /* NULL is a no-op */

#endif
