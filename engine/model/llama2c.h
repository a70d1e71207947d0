/*
 * llama2c.h - reader for llama2.c `.bin` checkpoints (fp32, "version 0").
 *
 * Layout (see ../shared/models/README.md): seven int32 (dim, hidden_dim,
 * n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a negative vocab_size
 * means the classifier is not shared with the token embedding), then fp32
 * arrays token_embedding [vocab, dim], rms_att [L, dim], wq [L, dim, dim],
 * wk [L, kv_dim, dim], wv [L, kv_dim, dim], wo [L, dim, dim], rms_ffn
 * [L, dim], w1 [L, hidden, dim], w2 [L, dim, hidden], w3 [L, hidden, dim],
 * rms_final [dim], optionally the legacy freq_cis_real/imag [seq_len,
 * head_dim/2] (skipped), then wcls [vocab, dim] if not shared.
 *
 * l2c_open() checks the header for sane dimensions and that the file size
 * matches the layout exactly (with or without the legacy freq_cis arrays).
 * The float pointers below are views into the read-only mapping.
 *
 * Threading: an open l2c_file is immutable; any thread may read it.
 */
#ifndef LKQ_LLAMA2C_H
#define LKQ_LLAMA2C_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    int32_t dim, hidden_dim, n_layers, n_heads, n_kv_heads;
    int32_t vocab_size; /* always positive here */
    int32_t seq_len;
    int shared_classifier; /* 1 when wcls == token_embedding */
    int has_freq_cis;      /* 1 when the legacy arrays are present */
} l2c_config;

typedef struct {
    l2c_config cfg;
    const float *token_embedding; /* [vocab, dim] */
    const float *rms_att;         /* [L, dim] */
    const float *wq;              /* [L, dim, dim] */
    const float *wk, *wv;         /* [L, kv_dim, dim] */
    const float *wo;              /* [L, dim, dim] */
    const float *rms_ffn;         /* [L, dim] */
    const float *w1, *w3;         /* [L, hidden, dim] */
    const float *w2;              /* [L, dim, hidden] */
    const float *rms_final;       /* [dim] */
    const float *wcls;            /* [vocab, dim] (== token_embedding if shared) */
    const void *base;             /* the mapping (or the caller's buffer) */
    size_t size;
    int mapped;
} l2c_file;

/* Sanity limits on the header; larger values are refused as absurd. */
#define L2C_MAX_DIM 65536
#define L2C_MAX_HIDDEN (1 << 20)
#define L2C_MAX_LAYERS 1024
#define L2C_MAX_HEADS 1024
#define L2C_MAX_VOCAB (1 << 22)
#define L2C_MAX_SEQ (1 << 24)

/* Validates a header against a file of file_size bytes; fills cfg (with
 * vocab made positive). Returns 0 or -1 with a reason in err. */
int l2c_check(const int32_t hdr[7], uint64_t file_size, l2c_config *cfg,
              char *err, size_t errlen);

/* Maps and validates path. Returns 0 and *out (free with l2c_close) or -1
 * with a one-line reason in err ("cannot open 'x': ...", "'x': file is N
 * bytes, expected ..."). */
int l2c_open(const char *path, l2c_file **out, char *err, size_t errlen);
/* Same over a caller-owned, 4-byte-aligned buffer that outlives the file. */
int l2c_open_mem(const void *data, size_t size, l2c_file **out, char *err,
                 size_t errlen);
void l2c_close(l2c_file *f); /* NULL is a no-op */

#endif
