/*
 * kvq_config.h - every knob of the KV cache (mode, chunked prefill and the
 * LiveKVQuant-P method of ../shared/DESIGN.md §4, budget), with documented
 * defaults, set from "key = value" config files or command-line flags, and
 * validated with a clear reason. Pure data; thread-safe.
 *
 * Keys (a '-' may be written for '_'):
 *   kv_cache        fp16 | int2 | int3 | int4 | int8 | kNvM  (default int4);
 *                   intN sets k_bits = v_bits = N, kNvM (e.g. k3v2) k_bits = N
 *                   and v_bits = M
 *   k_bits, v_bits  code width of K / V in the quantized cache: 2, 3, 4 or 8
 *                   (4); int3 needs v_group a multiple of 8
 *   chunk_size      prefill chunk C, tokens; multiple of block_tokens (512)
 *   block_tokens    tokens per KV block T (256)
 *   warmup_chunks   W: chunks staged in FP16 before quantizing (2)
 *   ema_decay       beta in [0, 1) (0.3)
 *   ema_clip        gamma >= 0, range move per chunk in widths (4)
 *   clip_quantile   alpha in [0, 0.5) (0.005)
 *   v_group         V channels per scale group; divides head_dim; 0 = one
 *                   group per head, i.e. head_dim (0)
 *   outlier_budget  FP16 outliers per block, fraction of elements (0.004)
 *   sink_tokens     first positions kept FP16 for the whole sequence (4)
 *   keep_warmup_fp16  0 | 1: leave warm-up chunks in FP16 (0)
 *   k_quant         channel | token: keys per channel (EMA) or per token (channel)
 *   kv_budget       KV pool size: bytes (suffix K/M/G/KiB/MiB/GiB) or
 *                   tokens (suffix "t", e.g. 65536t); 0 = sized for the
 *                   context (0)
 *   window_kv       fp16 | int2 | int3 | int4 | int8: how sliding-window
 *                   layers (Gemma-3: 5 of every 6) hold their last W
 *                   positions: FP16 pages, or LiveKVQuant-P like the global
 *                   layers with codes of that width for K and V (window_bits;
 *                   only with a quantized kv_cache; with fp16 every layer is
 *                   FP16) (default fp16, measured: docs/kvquant.md "Window
 *                   layers", docs/gemma3.md)
 *   window_clip_quantile  the quantized window layers' clip_quantile, in
 *                   [0, 0.5), or auto: 0 (no clipping) at 8 bits, where 256
 *                   levels span a channel's whole range finely, else
 *                   clip_quantile (auto)
 *   kv_modes        modes sequences of one pool may use, e.g. "fp16,int4,int3"
 *                   (any kv_cache value: fp16, int2, int3, int4, int8, kNvM)
 *                   or "all" (= fp16,int8,int4,int3,int2,k8v4,k4v2,k4v3,
 *                   k3v2: every width with K at least as wide as V): one
 *                   shared pool of slabs (engine/kv/kv_plan.h) holds the
 *                   FP16 pages and the blocks of every width, and every
 *                   sequence picks its own mode (a server's per-request
 *                   "kv_cache"); kv_cache stays the default.
 *                   Empty: kv_cache only (default)
 *   kv_rotate       auto | 0 | 1 | 2: per-head Walsh-Hadamard rotation before
 *                   the cache - 1 rotates K (and the query with it), 2 also V
 *                   (and the attention output back); 1 and 2 need a
 *                   power-of-two head_dim; scores are unchanged up to
 *                   rounding, and quantization error spreads over the
 *                   channels. auto: 2 when head_dim is a power of two, the
 *                   model has no QK-norm and the pool holds a quantized mode
 *                   (kv_cache or kv_modes), else 0 (cfg_kv_rotate_resolve;
 *                   measured at 4K: on SmolLM2 K and V rotated cut the INT4
 *                   cache's KLD 1.9x (exact mode), on Gemma-3, whose keys are
 *                   RMS-normed per head, rotating K raises it 2.6x) (auto)
 */
#ifndef LKQ_KVQ_CONFIG_H
#define LKQ_KVQ_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "kernels/kvq.h"

/* cfg_kv.mode: CFG_KV_INT4 is the LiveKVQuant-P (quantized) cache,
 * whatever its code widths (k_bits, v_bits). */
typedef enum { CFG_KV_FP16 = 0, CFG_KV_INT4 = 1 } cfg_kv_mode;
/* KV mode ids: what a sequence (a request's "kv_cache") holds its cache
 * in, the mode and the widths together. 0 is fp16 (CFG_KV_FP16), 1 is
 * int4 = k4v4 (CFG_KV_INT4), 2.. the other width pairs (int2, int3, int8,
 * then kNvM with N != M, in the name table of kvq_config.c). cfg_kv.modes,
 * cfg_kv_has_mode, cfg_kv_with_mode and cfg_kv_mode_str take ids. */
#define CFG_KV_MODES 17

/* cfg_kv.kv_rotate: chosen per model by cfg_kv_rotate_resolve */
#define CFG_KV_ROTATE_AUTO (-1)

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
    cfg_kv_mode window_kv;    /* window layers: FP16, or quantized (with mode INT4) */
    int32_t window_bits;      /* their code width (K and V) when quantized, {2, 3, 4, 8} */
    float window_clip_quantile; /* their clip_quantile when quantized; < 0: auto
                                   (cfg_kv_window_clip) */
    uint32_t modes;           /* bit m: a sequence may use mode m (per request);
                                 0: `mode` only (a single-mode pool) */
    int32_t kv_rotate;        /* CFG_KV_ROTATE_AUTO (-1), 0 off, 1 K (and q), 2 K and V
                                 (and the output); a forward state holds it resolved
                                 (cfg_kv_rotate_resolve): 0, 1 or 2 */
    int32_t k_bits, v_bits;   /* code widths of the quantized cache, {2, 3, 4, 8} */
} cfg_kv;

cfg_kv cfg_kv_default(void);

/* Sets one knob from text. Returns 0, or negative with "key: reason" in err
 * (unknown key, malformed or out-of-range value). Range checks that involve
 * two knobs are left to cfg_kv_validate. */
int cfg_kv_set(cfg_kv *c, const char *key, const char *value, char *err,
               size_t errlen);

/* 1 if key names a knob (accepts '-' for '_'). */
int cfg_kv_is_key(const char *key);

/* Mode names by id ("fp16", "int4", "int2", "int3", "int8", "k2v3" ..;
 * parsing also takes "f16", "q4", any case): cfg_kv_mode_parse returns 0
 * and the id in *out, or -1 for an unknown name; cfg_kv_mode_str returns
 * "?" for an id out of range; cfg_kv_mode_list writes every name,
 * comma-separated (for error messages); cfg_kv_modes_str the names of a
 * mask ("fp16,int4"). */
int cfg_kv_mode_parse(const char *name, int *out);
const char *cfg_kv_mode_str(int mode);
void cfg_kv_mode_list(char *buf, size_t cap);
void cfg_kv_modes_str(uint32_t mask, char *buf, size_t cap);
/* The mode id of c's own mode (kv_cache with its widths). */
int cfg_kv_mode_id(const cfg_kv *c);
/* The code widths of a quantized mode id (0, 0 for fp16 or a bad id). */
void cfg_kv_mode_bits(int m, int *k_bits, int *v_bits);
/* 1 if a sequence of a pool of configuration c may use mode id m: m is
 * c's own mode (cfg_kv_mode_id) or one of its kv_modes. */
int cfg_kv_has_mode(const cfg_kv *c, int m);
/* 1 if c's pool holds a quantized mode (any width). */
int cfg_kv_has_quant(const cfg_kv *c);
/* The mode ids a pool of configuration c holds, as a bit mask (never 0);
 * cfg_kv_mode_count: how many. */
uint32_t cfg_kv_mode_mask(const cfg_kv *c);
int cfg_kv_mode_count(const cfg_kv *c);
/* c with mode id m (mode and k_bits / v_bits; the other knobs, kv_modes
 * included, unchanged): what a sequence of mode m in c's pool is planned
 * with. */
cfg_kv cfg_kv_with_mode(const cfg_kv *c, int m);

/* The rotation a model of head dimension head_dim runs c with: an explicit
 * 0, 1 or 2 as set (1 and 2 on a head_dim that is not a power of two are
 * the caller's to refuse); auto: 2 when head_dim is a power of two, the
 * model has no per-head QK-norm (qk_norm 0) and c's pool holds a quantized
 * mode (cfg_kv_has_quant), else 0 - an FP16-only cache gains nothing from
 * rotating and stays bit-identical to the plain one, and a QK-normed model
 * (Gemma-3) measured worse rotated (docs/kvquant.md, "Rotation"). */
int cfg_kv_rotate_resolve(const cfg_kv *c, int head_dim, int qk_norm);

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

/* The cache mode as a kv_cache value: "fp16", "int2" .. "int8" when K and
 * V have one width, else "k<K>v<V>" (e.g. "k3v2"). A static string. */
const char *cfg_kv_mode_name(const cfg_kv *c);

/* The window layers' setting as a window_kv value: "fp16", or "int2" ..
 * "int8" (window_bits). A static string. */
const char *cfg_kv_window_name(const cfg_kv *c);

/* The clip_quantile the quantized window layers use: window_clip_quantile,
 * or when it is auto (< 0) 0 at window_bits 8 and clip_quantile otherwise. */
float cfg_kv_window_clip(const cfg_kv *c);

/* The names of all keys, NULL-terminated (for --help and option tables). */
extern const char *const cfg_kv_keys[];

#endif
