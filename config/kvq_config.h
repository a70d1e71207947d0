/*
 * kvq_config.h - every knob of the KV cache (mode, chunked prefill and the
 * LiveKVQuant-P method of ../shared/DESIGN.md §4, budget), with documented
 * defaults, set from "key = value" config files or command-line flags, and
 * validated with a clear reason. Pure data; thread-safe.
 *
 * Keys (a '-' may be written for '_'):
 *   kv_cache        fp16 | int4                     (default int4)
 *   chunk_size      prefill chunk C, tokens; multiple of block_tokens (512)
 *   block_tokens    tokens per KV block T (128)
 *   warmup_chunks   W: chunks staged in FP16 before quantizing (2)
 *   ema_decay       beta in [0, 1) (0.3)
 *   ema_clip        gamma >= 0, range move per chunk in widths (4)
 *   clip_quantile   alpha in [0, 0.5) (0.005)
 *   v_group         V channels per scale group; divides head_dim; 0 = one
 *                   group per head, i.e. head_dim (0)
 *   outlier_budget  FP16 outliers per block, fraction of elements (0.005)
 *   sink_tokens     first positions kept FP16 for the whole sequence (4)
 *   keep_warmup_fp16  0 | 1: leave warm-up chunks in FP16 (0)
 *   k_quant         channel | token: keys per channel (EMA) or per token (channel)
 *   kv_budget       KV pool size: bytes (suffix K/M/G/KiB/MiB/GiB) or
 *                   tokens (suffix "t", e.g. 65536t); 0 = sized for the
 *                   context (0)
 *   window_kv       fp16 | int4: how sliding-window layers (Gemma-3: 5 of
 *                   every 6) hold their last W positions: FP16 pages, or
 *                   LiveKVQuant-P like the global layers (only with
 *                   kv_cache = int4; with fp16 every layer is FP16)
 *                   (default fp16, measured: docs/kvquant.md "Window layers")
 *   kv_rotate       0 | 1 | 2: per-head Walsh-Hadamard rotation before the
 *                   cache - 1 rotates K (and the query with it), 2 also V
 *                   (and the attention output back); needs a power-of-two
 *                   head_dim; scores are unchanged up to rounding, and
 *                   quantization error spreads over the channels (0)
 */
#ifndef LKQ_KVQ_CONFIG_H
#define LKQ_KVQ_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "kernels/kvq.h"

typedef enum { CFG_KV_FP16 = 0, CFG_KV_INT4 = 1 } cfg_kv_mode;

typedef struct {
    cfg_kv_mode mode;
    int32_t chunk_size;
    int32_t block_tokens;
    int32_t warmup_chunks;
    float ema_decay;
    float ema_clip;
    float clip_quantile;
    int32_t v_group;
    float outlier_budget;
    int32_t sink_tokens;
    int32_t keep_warmup_fp16;
    kvq_k_mode k_mode;
    int64_t kv_budget_bytes;  /* 0 = unset */
    int64_t kv_budget_tokens; /* 0 = unset (at most one of the two is set) */
    cfg_kv_mode window_kv;    /* window layers: FP16, or INT4 (with mode INT4) */
    int32_t kv_rotate;        /* 0 off, 1 K (and q), 2 K and V (and the output) */
} cfg_kv;

cfg_kv cfg_kv_default(void);

/* Sets one knob from text. Returns 0, or negative with "key: reason" in err
 * (unknown key, malformed or out-of-range value). Range checks that involve
 * two knobs are left to cfg_kv_validate. */
int cfg_kv_set(cfg_kv *c, const char *key, const char *value, char *err,
               size_t errlen);

/* 1 if key names a knob (accepts '-' for '_'). */
int cfg_kv_is_key(const char *key);

/* Reads "key = value" lines ('#' comments, blank lines) into c. Errors name
 * the file and line. */
int cfg_kv_load_file(cfg_kv *c, const char *path, char *err, size_t errlen);

/* Cross-knob checks (e.g. chunk_size a multiple of block_tokens). */
int cfg_kv_validate(const cfg_kv *c, char *err, size_t errlen);

/* v_group as used for a model: the knob, or head_dim when it is 0. */
int cfg_kv_v_group(const cfg_kv *c, int head_dim);

/* Checks against a model's shapes (v_group divides head_dim, ...). */
int cfg_kv_validate_model(const cfg_kv *c, int head_dim, int n_kv_heads,
                          char *err, size_t errlen);

/* Writes the config as "key = value" lines (a loadable config file). */
void cfg_kv_write(const cfg_kv *c, FILE *f);

/* Writes the config as JSON object members ("key": value, ...) without
 * braces, for embedding in reports. Returns bytes that would be written. */
int cfg_kv_json(const cfg_kv *c, char *buf, size_t cap);

/* The names of all keys, NULL-terminated (for --help and option tables). */
extern const char *const cfg_kv_keys[];

#endif
