/*
 * model.h - an in-memory Llama-architecture model: hyper-parameters, weight
 * views (pointing into the mmap'd file or into buffers the model owns) and
 * the tokenizer. Loaded from a GGUF v3 file or a llama2.c .bin checkpoint.
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

typedef struct {
    int32_t n_vocab;
    int32_t dim;        /* embedding length */
    int32_t hidden_dim; /* feed-forward length */
    int32_t n_layers;
    int32_t n_heads;
    int32_t n_kv_heads;
    int32_t head_dim;   /* dim / n_heads */
    int32_t n_rot;      /* rotary dims per head (usually head_dim) */
    int32_t n_ctx_train;
    float rope_theta;
    float rope_freq_scale; /* 1 / linear scaling factor */
    float norm_eps;
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
} mdl_layer;

typedef struct mdl_model {
    mdl_hparams hp;
    mdl_weight tok_embd;     /* (n_vocab, dim) */
    const float *out_norm;   /* [dim] */
    mdl_weight output;       /* (n_vocab, dim); same data as tok_embd if tied */
    mdl_layer *layers;       /* [n_layers] */
    tok_tokenizer *tok;      /* owned */
    char arch[32];           /* "llama" */
    char name[128];          /* general.name or file stem */
    char chat_template[32];  /* "chatml", "llama2", "llama3", "zephyr" or "" */
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
