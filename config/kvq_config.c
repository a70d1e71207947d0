/*
 * kvq_config.c - KV cache knobs: defaults, parsing, validation (see
 * kvq_config.h for the keys and their meaning).
 */
#include "config/kvq_config.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

const char *const cfg_kv_keys[] = {
    "kv_cache", "chunk_size", "block_tokens", "warmup_chunks", "ema_decay",
    "ema_clip", "clip_quantile", "v_group", "outlier_budget", "sink_tokens",
    "keep_warmup_fp16", "k_quant", "kv_budget", "window_kv", "kv_rotate", "k_bits", "v_bits",
    "kv_modes", "window_clip_quantile", NULL,
};

cfg_kv cfg_kv_default(void)
{
    cfg_kv c = {
        .mode = CFG_KV_INT4,
        .chunk_size = 512,
        .block_tokens = 256, /* docs/kvquant.md "Bits per element": 4.39 at 4K */
        .warmup_chunks = 2,
        .ema_decay = 0.3f, /* measured: docs/kvquant.md (0.9/0.5 clamped 1.7%) */
        .ema_clip = 4.0f,
        .clip_quantile = 0.005f,
        .v_group = 0,
        .outlier_budget = 0.004f, /* K uses all of 0.5%, V 0.37%: docs/kvquant.md */
        .sink_tokens = 4,
        .keep_warmup_fp16 = 0,
        .k_mode = KVQ_K_PER_CHANNEL,
        .kv_budget_bytes = 0,
        .kv_budget_tokens = 0,
        .window_kv = CFG_KV_FP16, /* measured: docs/kvquant.md "Window layers" */
        .window_bits = 4,
        .window_clip_quantile = -1.0f, /* auto */
        .kv_rotate = CFG_KV_ROTATE_AUTO, /* K and V rotated cut the KLD 1.7-2.6x */
        .k_bits = 4,
        .v_bits = 4,
    };
    return c;
}

static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* key with '-' folded to '_' into out[cap]; returns 0 if it fits */
static int norm_key(const char *key, char *out, size_t cap)
{
    size_t n = strlen(key);
    if (n + 1 > cap)
        return -1;
    for (size_t i = 0; i <= n; i++)
        out[i] = key[i] == '-' ? '_' : key[i];
    return 0;
}

int cfg_kv_is_key(const char *key)
{
    char k[64];
    if (!key || norm_key(key, k, sizeof k) < 0)
        return 0;
    for (int i = 0; cfg_kv_keys[i]; i++)
        if (!strcmp(k, cfg_kv_keys[i]))
            return 1;
    return 0;
}

static int parse_i(const char *v, long lo, long hi, int32_t *out)
{
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || end == v || *end || x < lo || x > hi)
        return -1;
    *out = (int32_t)x;
    return 0;
}

static int parse_f(const char *v, float lo, float hi, int hi_open, float *out)
{
    char *end;
    errno = 0;
    float x = strtof(v, &end);
    if (errno || end == v || *end || !isfinite(x) || x < lo || x > hi ||
        (hi_open && x >= hi))
        return -1;
    *out = x;
    return 0;
}

/* "123", "64K", "1.5GiB", "65536t" -> bytes or tokens */
static int parse_budget(const char *v, int64_t *bytes, int64_t *tokens)
{
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (errno || end == v || !(x >= 0) || x > 9e18)
        return -1;
    while (*end == ' ')
        end++;
    double mul = 1;
    int is_tok = 0;
    if (!*end || !strcasecmp(end, "b")) mul = 1;
    else if (!strcasecmp(end, "t") || !strcasecmp(end, "tokens")) is_tok = 1;
    else if (!strcasecmp(end, "k") || !strcasecmp(end, "kb")) mul = 1e3;
    else if (!strcasecmp(end, "m") || !strcasecmp(end, "mb")) mul = 1e6;
    else if (!strcasecmp(end, "g") || !strcasecmp(end, "gb")) mul = 1e9;
    else if (!strcasecmp(end, "kib")) mul = 1024.0;
    else if (!strcasecmp(end, "mib")) mul = 1024.0 * 1024;
    else if (!strcasecmp(end, "gib")) mul = 1024.0 * 1024 * 1024;
    else return -1;
    double r = x * mul;
    if (r > 9e18 || (is_tok && x != floor(x)))
        return -1;
    *bytes = is_tok ? 0 : (int64_t)r;
    *tokens = is_tok ? (int64_t)x : 0;
    return 0;
}

/* The mode names by id (cfg_kv_mode ids: 0 fp16, 1 int4, ...), each with
 * its code widths; the second name is an alias. */
static const struct {
    const char *name, *alias;
    int k, v;
} mode_tab[CFG_KV_MODES] = {
    [CFG_KV_FP16] = {"fp16", "f16", 0, 0},
    [CFG_KV_INT4] = {"int4", "q4", 4, 4},
    {"int2", "k2v2", 2, 2}, {"int3", "k3v3", 3, 3}, {"int8", "k8v8", 8, 8},
    {"k2v3", NULL, 2, 3}, {"k2v4", NULL, 2, 4}, {"k2v8", NULL, 2, 8},
    {"k3v2", NULL, 3, 2}, {"k3v4", NULL, 3, 4}, {"k3v8", NULL, 3, 8},
    {"k4v2", NULL, 4, 2}, {"k4v3", NULL, 4, 3}, {"k4v8", NULL, 4, 8},
    {"k8v2", NULL, 8, 2}, {"k8v3", NULL, 8, 3}, {"k8v4", NULL, 8, 4},
};

/* "all" in kv_modes: fp16 and the widths with K at least as wide as V
 * that are worth serving (keys carry the outliers: KIVI and our
 * docs/kvquant.md width table). */
static const char *const all_modes[] = {"fp16", "int8", "int4", "int3", "int2",
                                        "k8v4", "k4v2", "k4v3", "k3v2"};

int cfg_kv_mode_parse(const char *name, int *out)
{
    for (int m = 0; name && m < CFG_KV_MODES; m++)
        if (!strcasecmp(name, mode_tab[m].name) ||
            (mode_tab[m].alias && !strcasecmp(name, mode_tab[m].alias))) {
            *out = m;
            return 0;
        }
    /* "k4v4" for int4 (every kNvN names its intN) */
    if (name && strlen(name) == 4 && (name[0] == 'k' || name[0] == 'K') &&
        (name[2] == 'v' || name[2] == 'V'))
        for (int m = 1; m < CFG_KV_MODES; m++)
            if (mode_tab[m].k == name[1] - '0' && mode_tab[m].v == name[3] - '0') {
                *out = m;
                return 0;
            }
    return -1;
}

const char *cfg_kv_mode_str(int mode)
{
    return mode >= 0 && mode < CFG_KV_MODES ? mode_tab[mode].name : "?";
}

void cfg_kv_mode_bits(int m, int *k_bits, int *v_bits)
{
    *k_bits = m > 0 && m < CFG_KV_MODES ? mode_tab[m].k : 0;
    *v_bits = m > 0 && m < CFG_KV_MODES ? mode_tab[m].v : 0;
}

int cfg_kv_mode_id(const cfg_kv *c)
{
    if (c->mode == CFG_KV_FP16)
        return CFG_KV_FP16;
    for (int m = 1; m < CFG_KV_MODES; m++)
        if (mode_tab[m].k == c->k_bits && mode_tab[m].v == c->v_bits)
            return m;
    return CFG_KV_INT4; /* bad widths: cfg_kv_validate refuses them */
}

int cfg_kv_has_mode(const cfg_kv *c, int m)
{
    return m >= 0 && m < CFG_KV_MODES && (m == cfg_kv_mode_id(c) || ((c->modes >> m) & 1u));
}

int cfg_kv_has_quant(const cfg_kv *c)
{
    return (cfg_kv_mode_mask(c) & ~(1u << CFG_KV_FP16)) != 0;
}

int cfg_kv_rotate_resolve(const cfg_kv *c, int head_dim, int qk_norm)
{
    if (c->kv_rotate != CFG_KV_ROTATE_AUTO)
        return c->kv_rotate;
    int pow2 = head_dim > 0 && (head_dim & (head_dim - 1)) == 0;
    return pow2 && !qk_norm && cfg_kv_has_quant(c) ? 2 : 0;
}

uint32_t cfg_kv_mode_mask(const cfg_kv *c)
{
    return c->modes | (1u << cfg_kv_mode_id(c));
}

int cfg_kv_mode_count(const cfg_kv *c)
{
    uint32_t m = cfg_kv_mode_mask(c);
    int n = 0;
    for (; m; m &= m - 1)
        n++;
    return n;
}

cfg_kv cfg_kv_with_mode(const cfg_kv *c, int m)
{
    cfg_kv r = *c;
    if (m == CFG_KV_FP16 || m < 0 || m >= CFG_KV_MODES) {
        r.mode = CFG_KV_FP16;
        return r;
    }
    r.mode = CFG_KV_INT4;
    r.k_bits = mode_tab[m].k;
    r.v_bits = mode_tab[m].v;
    return r;
}

/* "fp16,int4" (any order, spaces allowed), "all", or "" (kv_cache only)
 * into a bit mask; returns 0 or 1 (bad). */
static int parse_modes(const char *v, uint32_t *out)
{
    uint32_t mask = 0;
    if (!strcasecmp(v, "all")) {
        for (size_t i = 0; i < sizeof all_modes / sizeof *all_modes; i++) {
            int m = 0;
            cfg_kv_mode_parse(all_modes[i], &m);
            mask |= 1u << m;
        }
        *out = mask;
        return 0;
    }
    char buf[128];
    if (strlen(v) >= sizeof buf)
        return 1;
    snprintf(buf, sizeof buf, "%s", v);
    for (char *save = NULL, *t = strtok_r(buf, ", ", &save); t; t = strtok_r(NULL, ", ", &save)) {
        int m;
        if (cfg_kv_mode_parse(t, &m) < 0)
            return 1;
        mask |= 1u << m;
    }
    *out = mask;
    return 0;
}

int cfg_kv_set(cfg_kv *c, const char *key, const char *value, char *err,
               size_t errlen)
{
    char k[64];
    if (!key || !value || norm_key(key, k, sizeof k) < 0 || !cfg_kv_is_key(k))
        return fail(err, errlen, "unknown cache option '%s' (known: kv_cache, chunk_size, "
                    "block_tokens, warmup_chunks, ema_decay, ema_clip, clip_quantile, "
                    "v_group, outlier_budget, sink_tokens, keep_warmup_fp16, k_quant, "
                    "kv_budget, window_kv, kv_rotate, k_bits, v_bits, kv_modes, "
                    "window_clip_quantile)",
                    key ? key : "(null)");
    int bad = 0;
    const char *want = "";
    if (!strcmp(k, "kv_cache")) {
        if (!strcasecmp(value, "fp16") || !strcasecmp(value, "f16"))
            c->mode = CFG_KV_FP16;
        else if (!strcasecmp(value, "int4") || !strcasecmp(value, "q4"))
            c->mode = CFG_KV_INT4, c->k_bits = c->v_bits = 4;
        else if (!strcasecmp(value, "int2") || !strcasecmp(value, "int3") ||
                 !strcasecmp(value, "int8"))
            c->mode = CFG_KV_INT4, c->k_bits = c->v_bits = value[3] - '0';
        else if (strlen(value) == 4 && (value[0] == 'k' || value[0] == 'K') &&
                 (value[2] == 'v' || value[2] == 'V') && KVQ_BITS_OK(value[1] - '0') &&
                 KVQ_BITS_OK(value[3] - '0')) /* "k3v2": cfg_kv_mode_name's mixed names */
            c->mode = CFG_KV_INT4, c->k_bits = value[1] - '0', c->v_bits = value[3] - '0';
        else
            bad = 1, want = "fp16, int2, int3, int4, int8 or kNvM (N, M in 2, 3, 4, 8)";
    } else if (!strcmp(k, "k_bits") || !strcmp(k, "v_bits")) {
        int32_t b = 0;
        bad = parse_i(value, 2, 8, &b) || !KVQ_BITS_OK(b);
        want = "a code width of 2, 3, 4 or 8 bits";
        if (!bad)
            *(k[0] == 'k' ? &c->k_bits : &c->v_bits) = b;
    } else if (!strcmp(k, "chunk_size")) {
        bad = parse_i(value, 1, 1 << 20, &c->chunk_size), want = "an integer >= 1";
    } else if (!strcmp(k, "block_tokens")) {
        bad = parse_i(value, 1, 4096, &c->block_tokens), want = "an integer in [1, 4096]";
    } else if (!strcmp(k, "warmup_chunks")) {
        bad = parse_i(value, 0, 1000, &c->warmup_chunks), want = "an integer in [0, 1000]";
    } else if (!strcmp(k, "ema_decay")) {
        bad = parse_f(value, 0.0f, 1.0f, 1, &c->ema_decay), want = "a number in [0, 1)";
    } else if (!strcmp(k, "ema_clip")) {
        bad = parse_f(value, 0.0f, 1e6f, 0, &c->ema_clip), want = "a number >= 0";
    } else if (!strcmp(k, "clip_quantile")) {
        bad = parse_f(value, 0.0f, 0.5f, 1, &c->clip_quantile), want = "a number in [0, 0.5)";
    } else if (!strcmp(k, "v_group")) {
        bad = parse_i(value, 0, 4096, &c->v_group), want = "an integer in [0, 4096] (0 = head_dim)";
    } else if (!strcmp(k, "outlier_budget")) {
        bad = parse_f(value, 0.0f, 1.0f, 0, &c->outlier_budget), want = "a fraction in [0, 1]";
    } else if (!strcmp(k, "sink_tokens")) {
        bad = parse_i(value, 0, 1 << 20, &c->sink_tokens), want = "an integer >= 0";
    } else if (!strcmp(k, "keep_warmup_fp16")) {
        bad = parse_i(value, 0, 1, &c->keep_warmup_fp16), want = "0 or 1";
    } else if (!strcmp(k, "k_quant")) {
        if (!strcasecmp(value, "channel"))
            c->k_mode = KVQ_K_PER_CHANNEL;
        else if (!strcasecmp(value, "token"))
            c->k_mode = KVQ_K_PER_TOKEN;
        else
            bad = 1, want = "channel or token";
    } else if (!strcmp(k, "window_kv")) {
        if (!strcasecmp(value, "fp16") || !strcasecmp(value, "f16"))
            c->window_kv = CFG_KV_FP16;
        else if (!strcasecmp(value, "int4") || !strcasecmp(value, "q4"))
            c->window_kv = CFG_KV_INT4, c->window_bits = 4;
        else if (!strcasecmp(value, "int2") || !strcasecmp(value, "int3") ||
                 !strcasecmp(value, "int8"))
            c->window_kv = CFG_KV_INT4, c->window_bits = value[3] - '0';
        else
            bad = 1, want = "fp16, int2, int3, int4 or int8";
    } else if (!strcmp(k, "window_clip_quantile")) {
        if (!strcasecmp(value, "auto"))
            c->window_clip_quantile = -1.0f;
        else
            bad = parse_f(value, 0.0f, 0.5f, 1, &c->window_clip_quantile);
        want = "a number in [0, 0.5), or auto";
    } else if (!strcmp(k, "kv_rotate")) {
        if (!strcasecmp(value, "auto"))
            c->kv_rotate = CFG_KV_ROTATE_AUTO;
        else
            bad = parse_i(value, 0, 2, &c->kv_rotate);
        want = "auto, 0, 1 (K) or 2 (K and V)";
    } else if (!strcmp(k, "kv_modes")) {
        bad = parse_modes(value, &c->modes);
        want = "a list of modes such as fp16,int4,int3 (fp16, int2, int3, int4, int8, kNvM), "
               "or all";
    } else if (!strcmp(k, "kv_budget")) {
        bad = parse_budget(value, &c->kv_budget_bytes, &c->kv_budget_tokens);
        want = "bytes (e.g. 512M, 2GiB) or tokens (e.g. 65536t)";
    }
    if (bad)
        return fail(err, errlen, "%s: expected %s, got '%s'", k, want, value);
    return 0;
}

int cfg_kv_load_file(cfg_kv *c, const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return fail(err, errlen, "cannot open config '%s': %s", path, strerror(errno));
    char line[1024], e2[512];
    int ln = 0, rc = 0;
    while (fgets(line, sizeof line, f)) {
        ln++;
        size_t len = strlen(line);
        if (len == sizeof line - 1 && line[len - 1] != '\n') {
            rc = fail(err, errlen, "%s:%d: line too long", path, ln);
            break;
        }
        char *h = strchr(line, '#');
        if (h)
            *h = '\0';
        char *s = line;
        while (isspace((unsigned char)*s))
            s++;
        char *e = s + strlen(s);
        while (e > s && isspace((unsigned char)e[-1]))
            *--e = '\0';
        if (!*s)
            continue;
        char *eq = strchr(s, '=');
        if (!eq) {
            rc = fail(err, errlen, "%s:%d: expected 'key = value'", path, ln);
            break;
        }
        char *ke = eq;
        while (ke > s && isspace((unsigned char)ke[-1]))
            ke--;
        *ke = '\0';
        char *v = eq + 1;
        while (isspace((unsigned char)*v))
            v++;
        if (cfg_kv_set(c, s, v, e2, sizeof e2) < 0) {
            rc = fail(err, errlen, "%s:%d: %s", path, ln, e2);
            break;
        }
    }
    fclose(f);
    if (rc == 0)
        rc = cfg_kv_validate(c, err, errlen);
    return rc;
}

int cfg_kv_validate(const cfg_kv *c, char *err, size_t errlen)
{
    if (c->chunk_size <= 0)
        return fail(err, errlen, "chunk_size must be positive (got %d)", c->chunk_size);
    if (c->block_tokens <= 0)
        return fail(err, errlen, "block_tokens must be positive (got %d)", c->block_tokens);
    if (c->chunk_size % c->block_tokens != 0)
        return fail(err, errlen,
                    "chunk_size %d is not a multiple of block_tokens %d: each chunk "
                    "must fill whole KV blocks", c->chunk_size, c->block_tokens);
    if (c->warmup_chunks < 0)
        return fail(err, errlen, "warmup_chunks must be >= 0");
    if (!(c->ema_decay >= 0 && c->ema_decay < 1))
        return fail(err, errlen, "ema_decay must be in [0, 1)");
    if (!(c->ema_clip >= 0))
        return fail(err, errlen, "ema_clip must be >= 0");
    if (!(c->clip_quantile >= 0 && c->clip_quantile < 0.5f))
        return fail(err, errlen, "clip_quantile must be in [0, 0.5)");
    if (!(c->outlier_budget >= 0 && c->outlier_budget <= 1))
        return fail(err, errlen, "outlier_budget must be in [0, 1]");
    if (c->v_group < 0)
        return fail(err, errlen, "v_group must be >= 0 (0 = head_dim)");
    if (c->sink_tokens < 0)
        return fail(err, errlen, "sink_tokens must be >= 0");
    if (c->kv_budget_bytes < 0 || c->kv_budget_tokens < 0)
        return fail(err, errlen, "kv_budget must be >= 0");
    if (!KVQ_BITS_OK(c->k_bits) || !KVQ_BITS_OK(c->v_bits))
        return fail(err, errlen, "k_bits and v_bits must be 2, 3, 4 or 8 (got %d, %d)",
                    c->k_bits, c->v_bits);
    if (c->kv_rotate < CFG_KV_ROTATE_AUTO || c->kv_rotate > 2)
        return fail(err, errlen, "kv_rotate must be auto, 0, 1 or 2 (got %d)", c->kv_rotate);
    if ((c->k_bits == 3 || c->v_bits == 3) && c->v_group > 0 && c->v_group % 8 != 0)
        return fail(err, errlen, "int3 packs 8 codes in 3 bytes: v_group must be a multiple "
                    "of 8 (got %d)", c->v_group);
    for (int m = 1; m < CFG_KV_MODES; m++)
        if (((c->modes >> m) & 1u) && (mode_tab[m].k == 3 || mode_tab[m].v == 3) &&
            c->v_group > 0 && c->v_group % 8 != 0)
            return fail(err, errlen, "kv_modes %s: int3 packs 8 codes in 3 bytes: v_group "
                        "must be a multiple of 8 (got %d)", mode_tab[m].name, c->v_group);
    if (c->window_kv != CFG_KV_FP16 && c->window_kv != CFG_KV_INT4)
        return fail(err, errlen, "window_kv must be fp16 or quantized");
    if (c->window_kv == CFG_KV_INT4 && !KVQ_BITS_OK(c->window_bits))
        return fail(err, errlen, "window_kv: the window layers' code width must be 2, 3, 4 "
                    "or 8 (got %d)", c->window_bits);
    if (c->window_kv == CFG_KV_INT4 && c->window_bits == 3 && c->v_group > 0 &&
        c->v_group % 8 != 0)
        return fail(err, errlen, "window_kv int3 packs 8 codes in 3 bytes: v_group must be a "
                    "multiple of 8 (got %d)", c->v_group);
    return 0;
}

float cfg_kv_window_clip(const cfg_kv *c)
{
    if (c->window_clip_quantile >= 0.0f)
        return c->window_clip_quantile;
    return c->window_bits == 8 ? 0.0f : c->clip_quantile;
}

const char *cfg_kv_window_name(const cfg_kv *c)
{
    if (c->window_kv == CFG_KV_FP16)
        return "fp16";
    switch (c->window_bits) {
    case 2: return "int2";
    case 3: return "int3";
    case 4: return "int4";
    case 8: return "int8";
    default: return "int?";
    }
}

const char *cfg_kv_mode_name(const cfg_kv *c)
{
    static const char *const names[4][4] = {
        { "int2", "k2v3", "k2v4", "k2v8" },
        { "k3v2", "int3", "k3v4", "k3v8" },
        { "k4v2", "k4v3", "int4", "k4v8" },
        { "k8v2", "k8v3", "k8v4", "int8" },
    };
    if (c->mode == CFG_KV_FP16)
        return "fp16";
    if (!KVQ_BITS_OK(c->k_bits) || !KVQ_BITS_OK(c->v_bits))
        return "int?";
    int k = c->k_bits == 8 ? 3 : c->k_bits - 2, v = c->v_bits == 8 ? 3 : c->v_bits - 2;
    return names[k][v];
}

int cfg_kv_v_group(const cfg_kv *c, int head_dim)
{
    return c->v_group > 0 ? c->v_group : head_dim;
}

int cfg_kv_validate_model(const cfg_kv *c, int head_dim, int n_kv_heads,
                          char *err, size_t errlen)
{
    if (cfg_kv_validate(c, err, errlen) < 0)
        return -1;
    int rot = cfg_kv_rotate_resolve(c, head_dim, 0); /* auto never rotates a bad head_dim */
    if (rot && (head_dim <= 0 || (head_dim & (head_dim - 1))))
        return fail(err, errlen, "kv_rotate %d needs a power-of-two head_dim (this model's "
                    "is %d); use kv_rotate = auto or 0", rot, head_dim);
    /* every quantized mode the pool holds (kv_modes) fits the model */
    for (int m = 1; m < CFG_KV_MODES; m++) {
        if (!cfg_kv_has_mode(c, m))
            continue;
        int kb = mode_tab[m].k, vb = mode_tab[m].v;
        if (head_dim % cfg_kv_v_group(c, head_dim) != 0)
            return fail(err, errlen, "v_group %d does not divide the model's head_dim %d",
                        c->v_group, head_dim);
        if ((kb == 3 || vb == 3) && cfg_kv_v_group(c, head_dim) % 8 != 0)
            return fail(err, errlen, "%s: int3 packs 8 codes in 3 bytes: v_group (%d) must "
                        "be a multiple of 8", mode_tab[m].name, cfg_kv_v_group(c, head_dim));
        if ((kb == 4 || vb == 4) && (head_dim * n_kv_heads) % 2 != 0)
            return fail(err, errlen, "kv_dim %d is odd: INT4 packing needs pairs",
                        head_dim * n_kv_heads);
    }
    return 0;
}

void cfg_kv_modes_str(uint32_t mask, char *b, size_t n)
{
    size_t at = 0;
    if (n == 0)
        return;
    b[0] = 0;
    for (int m = 0; m < CFG_KV_MODES && at < n; m++)
        if ((mask >> m) & 1u) {
            int w = snprintf(b + at, n - at, "%s%s", at ? "," : "", cfg_kv_mode_str(m));
            at += w > 0 ? (size_t)w : 0;
        }
}

void cfg_kv_mode_list(char *buf, size_t cap)
{
    if (cap)
        cfg_kv_modes_str((1u << CFG_KV_MODES) - 1u, buf, cap);
}

static void budget_str(const cfg_kv *c, char *b, size_t n)
{
    if (c->kv_budget_tokens > 0)
        snprintf(b, n, "%lldt", (long long)c->kv_budget_tokens);
    else
        snprintf(b, n, "%lld", (long long)c->kv_budget_bytes);
}

void cfg_kv_write(const cfg_kv *c, FILE *f)
{
    char b[32];
    budget_str(c, b, sizeof b);
    fprintf(f,
            "kv_cache = %s\nchunk_size = %d\nblock_tokens = %d\nwarmup_chunks = %d\n"
            "ema_decay = %g\nema_clip = %g\nclip_quantile = %g\nv_group = %d\n"
            "outlier_budget = %g\nsink_tokens = %d\nkeep_warmup_fp16 = %d\n"
            "k_quant = %s\nkv_budget = %s\nwindow_kv = %s\nk_bits = %d\nv_bits = %d\n",
            c->mode == CFG_KV_FP16 ? "fp16" : "int4", c->chunk_size, c->block_tokens,
            c->warmup_chunks, c->ema_decay, c->ema_clip, c->clip_quantile, c->v_group,
            c->outlier_budget, c->sink_tokens, c->keep_warmup_fp16,
            c->k_mode == KVQ_K_PER_TOKEN ? "token" : "channel", b,
            cfg_kv_window_name(c), c->k_bits, c->v_bits);
    /* auto is the default and is left out; 0 is written, since a file read
     * over the defaults would otherwise turn it into auto */
    if (c->kv_rotate != CFG_KV_ROTATE_AUTO)
        fprintf(f, "kv_rotate = %d\n", c->kv_rotate);
    if (c->window_clip_quantile >= 0.0f)
        fprintf(f, "window_clip_quantile = %g\n", c->window_clip_quantile);
    if (c->modes) {
        char m[160];
        cfg_kv_modes_str(c->modes, m, sizeof m);
        fprintf(f, "kv_modes = %s\n", m);
    }
}

int cfg_kv_json(const cfg_kv *c, char *buf, size_t cap)
{
    char b[32];
    budget_str(c, b, sizeof b);
    /* kv_rotate only when not 0: the text of every configuration measured
     * before rotation existed, or with it off (and the ablation cells hashed
     * from it, which a sweep resumes from), stays the same and still means
     * unrotated; auto, the default since, is written as "auto" so that no
     * such cell is taken for a default-configured one */
    char rot[32] = "";
    if (c->kv_rotate == CFG_KV_ROTATE_AUTO)
        snprintf(rot, sizeof rot, ", \"kv_rotate\": \"auto\"");
    else if (c->kv_rotate)
        snprintf(rot, sizeof rot, ", \"kv_rotate\": %d", c->kv_rotate);
    /* the quantized window layers' clipping, only when they are quantized:
     * the text of every FP16-window configuration stays the same */
    char wclip[48] = "";
    if (c->window_kv == CFG_KV_INT4)
        snprintf(wclip, sizeof wclip, ", \"window_clip_quantile\": %g", cfg_kv_window_clip(c));
    char m[200] = "";
    if (c->modes) {
        char l[160];
        cfg_kv_modes_str(c->modes, l, sizeof l);
        snprintf(m, sizeof m, ", \"kv_modes\": \"%s\"", l);
    }
    return snprintf(buf, cap,
                    "\"kv_cache\": \"%s\", \"chunk_size\": %d, \"block_tokens\": %d, "
                    "\"warmup_chunks\": %d, \"ema_decay\": %g, \"ema_clip\": %g, "
                    "\"clip_quantile\": %g, \"v_group\": %d, \"outlier_budget\": %g, "
                    "\"sink_tokens\": %d, \"keep_warmup_fp16\": %d, \"k_quant\": \"%s\", "
                    "\"kv_budget\": \"%s\", \"window_kv\": \"%s\", \"k_bits\": %d, "
                    "\"v_bits\": %d%s%s%s",
                    cfg_kv_mode_name(c), c->chunk_size,
                    c->block_tokens, c->warmup_chunks, c->ema_decay, c->ema_clip,
                    c->clip_quantile, c->v_group, c->outlier_budget, c->sink_tokens,
                    c->keep_warmup_fp16,
                    c->k_mode == KVQ_K_PER_TOKEN ? "token" : "channel", b,
                    cfg_kv_window_name(c), c->k_bits, c->v_bits, rot,
                    m, wclip);
}
