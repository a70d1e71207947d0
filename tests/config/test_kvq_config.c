/*
 * test_kvq_config.c - cache knobs: defaults, parsing from flags and files,
 * and refusals with a reason.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config/kvq_config.h"

static char err[512];

Test(kvq_config, defaults_are_valid_and_documented)
{
    cfg_kv c = cfg_kv_default();
    cr_assert_eq(cfg_kv_validate(&c, err, sizeof err), 0, "%s", err);
    cr_assert_eq(c.mode, CFG_KV_INT4);
    cr_assert_eq(c.chunk_size, 512);
    cr_assert_eq(c.warmup_chunks, 2);
    cr_assert_eq(c.window_kv, CFG_KV_FP16, "window layers: FP16 (docs/kvquant.md)");
    cr_assert_eq(cfg_kv_validate_model(&c, 64, 3, err, sizeof err), 0, "%s", err);
}

Test(kvq_config, set_each_key)
{
    cfg_kv c = cfg_kv_default();
    cr_assert_eq(cfg_kv_set(&c, "kv-cache", "fp16", err, sizeof err), 0);
    cr_assert_eq(c.mode, CFG_KV_FP16);
    cr_assert_eq(cfg_kv_set(&c, "chunk_size", "256", err, sizeof err), 0);
    cr_assert_eq(c.chunk_size, 256);
    cr_assert_eq(cfg_kv_set(&c, "ema_decay", "0.75", err, sizeof err), 0);
    cr_assert_float_eq(c.ema_decay, 0.75f, 1e-7);
    cr_assert_eq(cfg_kv_set(&c, "k-quant", "token", err, sizeof err), 0);
    cr_assert_eq(c.k_mode, KVQ_K_PER_TOKEN);
    cr_assert_eq(cfg_kv_set(&c, "kv_budget", "2GiB", err, sizeof err), 0);
    cr_assert_eq(c.kv_budget_bytes, 2LL << 30);
    cr_assert_eq(cfg_kv_set(&c, "kv_budget", "65536t", err, sizeof err), 0);
    cr_assert_eq(c.kv_budget_tokens, 65536);
    cr_assert_eq(c.kv_budget_bytes, 0);
    cr_assert_eq(cfg_kv_set(&c, "kv_budget", "512M", err, sizeof err), 0);
    cr_assert_eq(c.kv_budget_bytes, 512000000LL);
    cr_assert(cfg_kv_is_key("outlier-budget") && !cfg_kv_is_key("bogus"));
    cr_assert_eq(cfg_kv_set(&c, "window-kv", "int4", err, sizeof err), 0);
    cr_assert_eq(c.window_kv, CFG_KV_INT4);
    cr_assert_eq(cfg_kv_set(&c, "window_kv", "fp16", err, sizeof err), 0);
    cr_assert_eq(c.window_kv, CFG_KV_FP16);
    cr_assert_eq(cfg_kv_set(&c, "window_kv", "int8", err, sizeof err), 0);
    cr_assert_eq(c.window_kv, CFG_KV_INT4, "quantized");
    cr_assert_eq(c.window_bits, 8);
    cr_assert_str_eq(cfg_kv_window_name(&c), "int8");
    cr_assert_eq(c.k_bits, 4, "the global layers keep their width");
    cr_assert_eq(cfg_kv_set(&c, "window-kv", "int4", err, sizeof err), 0);
    cr_assert_eq(c.window_bits, 4);
    cr_assert_lt(cfg_kv_set(&c, "window_kv", "int5", err, sizeof err), 0);
    cr_assert(strstr(err, "window_kv") && strstr(err, "fp16, int2, int3, int4 or int8"), "%s",
              err);
    /* the quantized window layers' clipping: auto is none at 8 bits */
    cr_assert_float_eq(cfg_kv_window_clip(&c), c.clip_quantile, 1e-9, "int4: the global one");
    c.window_bits = 8;
    cr_assert_float_eq(cfg_kv_window_clip(&c), 0.0f, 1e-9, "int8: none");
    cr_assert_eq(cfg_kv_set(&c, "window-clip-quantile", "0.01", err, sizeof err), 0, "%s", err);
    cr_assert_float_eq(cfg_kv_window_clip(&c), 0.01f, 1e-9);
    cr_assert_eq(cfg_kv_set(&c, "window_clip_quantile", "auto", err, sizeof err), 0);
    cr_assert_float_eq(cfg_kv_window_clip(&c), 0.0f, 1e-9);
    cr_assert_lt(cfg_kv_set(&c, "window_clip_quantile", "0.5", err, sizeof err), 0);
    c.window_bits = 5;
    cr_assert_lt(cfg_kv_validate(&c, err, sizeof err), 0);
    cr_assert(strstr(err, "window_kv") != NULL, "%s", err);
}

Test(kvq_config, refusals_say_why)
{
    cfg_kv c = cfg_kv_default();
    cr_assert_lt(cfg_kv_set(&c, "chunk_size", "0", err, sizeof err), 0);
    cr_assert(strstr(err, "chunk_size") != NULL, "%s", err);
    cr_assert_lt(cfg_kv_set(&c, "chunk_size", "12abc", err, sizeof err), 0);
    cr_assert_lt(cfg_kv_set(&c, "ema_decay", "1", err, sizeof err), 0);
    cr_assert_lt(cfg_kv_set(&c, "ema_decay", "nan", err, sizeof err), 0);
    cr_assert_lt(cfg_kv_set(&c, "clip_quantile", "0.5", err, sizeof err), 0);
    cr_assert_lt(cfg_kv_set(&c, "outlier_budget", "-0.1", err, sizeof err), 0);
    cr_assert_lt(cfg_kv_set(&c, "kv_cache", "int5", err, sizeof err), 0);
    cr_assert(strstr(err, "int2, int3, int4, int8 or kNvM") != NULL, "%s", err);
    cr_assert_lt(cfg_kv_set(&c, "kv_budget", "12 parsecs", err, sizeof err), 0);
    cr_assert_lt(cfg_kv_set(&c, "frobnicate", "1", err, sizeof err), 0);
    cr_assert(strstr(err, "unknown cache option") != NULL, "%s", err);
    c = cfg_kv_default();
    c.chunk_size = 300;
    cr_assert_lt(cfg_kv_validate(&c, err, sizeof err), 0);
    cr_assert(strstr(err, "not a multiple of block_tokens") != NULL, "%s", err);
    c = cfg_kv_default();
    cr_assert_eq(cfg_kv_v_group(&c, 48), 48, "0 = one group per head");
    c.v_group = 48;
    cr_assert_lt(cfg_kv_validate_model(&c, 64, 3, err, sizeof err), 0);
    cr_assert(strstr(err, "does not divide") != NULL, "%s", err);
}

Test(kvq_config, file_round_trip_and_errors)
{
    char path[] = "/tmp/lkq_cfgXXXXXX";
    int fd = mkstemp(path);
    cr_assert(fd >= 0);
    FILE *f = fdopen(fd, "w");
    cfg_kv a = cfg_kv_default();
    a.chunk_size = 1024;
    a.ema_clip = 0.25f;
    a.sink_tokens = 0;
    a.kv_budget_tokens = 4096;
    a.window_kv = CFG_KV_INT4;
    a.window_bits = 8;
    fprintf(f, "# a comment\n\n");
    cfg_kv_write(&a, f);
    fclose(f);
    cfg_kv b = cfg_kv_default();
    cr_assert_eq(cfg_kv_load_file(&b, path, err, sizeof err), 0, "%s", err);
    cr_assert_eq(b.chunk_size, 1024);
    cr_assert_float_eq(b.ema_clip, 0.25f, 1e-7);
    cr_assert_eq(b.sink_tokens, 0);
    cr_assert_eq(b.kv_budget_tokens, 4096);
    cr_assert_eq(b.window_kv, CFG_KV_INT4);
    cr_assert_eq(b.window_bits, 8);
    f = fopen(path, "w");
    fprintf(f, "chunk_size = 512\nwarmup_chunks = many\n");
    fclose(f);
    cr_assert_lt(cfg_kv_load_file(&b, path, err, sizeof err), 0);
    cr_assert(strstr(err, ":2:") && strstr(err, "warmup_chunks"), "%s", err);
    f = fopen(path, "w");
    fprintf(f, "chunk_size 512\n");
    fclose(f);
    cr_assert_lt(cfg_kv_load_file(&b, path, err, sizeof err), 0);
    cr_assert(strstr(err, "key = value") != NULL, "%s", err);
    unlink(path);
    cr_assert_lt(cfg_kv_load_file(&b, "/nonexistent.conf", err, sizeof err), 0);
    char js[1024];
    cr_assert_lt(cfg_kv_json(&a, js, sizeof js), (int)sizeof js);
    cr_assert(strstr(js, "\"chunk_size\": 1024") != NULL, "%s", js);
    cr_assert(strstr(js, "\"window_kv\": \"int8\"") != NULL, "%s", js);
    cr_assert(strstr(js, "\"window_clip_quantile\": 0") != NULL, "int8 windows: %s", js);
    a.window_bits = 4; /* int4 windows: the text of earlier configurations */
    cr_assert_lt(cfg_kv_json(&a, js, sizeof js), (int)sizeof js);
    cr_assert(strstr(js, "\"window_kv\": \"int4\"") != NULL, "%s", js);
}

/* kv_rotate: auto (the default), 0, 1 or 2; auto resolves per model to 2
 * on a power-of-two head_dim with a quantized mode in the pool, else 0. */
Test(kvq_config, kv_rotate_parse_and_resolve)
{
    cfg_kv c = cfg_kv_default();
    cr_assert_eq(c.kv_rotate, CFG_KV_ROTATE_AUTO, "default: auto");
    const char *ok[] = {"auto", "0", "1", "2", "AUTO"};
    const int want[] = {CFG_KV_ROTATE_AUTO, 0, 1, 2, CFG_KV_ROTATE_AUTO};
    for (int i = 0; i < 5; i++) {
        cr_assert_eq(cfg_kv_set(&c, i % 2 ? "kv-rotate" : "kv_rotate", ok[i], err, sizeof err),
                     0, "%s: %s", ok[i], err);
        cr_assert_eq(c.kv_rotate, want[i], "%s", ok[i]);
        cr_assert_eq(cfg_kv_validate(&c, err, sizeof err), 0, "%s", err);
    }
    const char *bad[] = {"3", "x", "-1", ""};
    for (int i = 0; i < 4; i++) {
        c.kv_rotate = 1;
        err[0] = '\0';
        cr_assert_lt(cfg_kv_set(&c, "kv_rotate", bad[i], err, sizeof err), 0, "'%s'", bad[i]);
        cr_assert(strstr(err, "kv_rotate") && strstr(err, "auto, 0, 1 (K) or 2 (K and V)") &&
                  !strchr(err, '\n'), "%s", err);
        cr_assert_eq(c.kv_rotate, 1, "a refusal changes nothing");
    }
    c.kv_rotate = 3;
    cr_assert_lt(cfg_kv_validate(&c, err, sizeof err), 0);
    cr_assert(strstr(err, "kv_rotate") != NULL, "%s", err);

    /* resolution */
    c = cfg_kv_default(); /* auto, int4 */
    cr_assert_eq(cfg_kv_rotate_resolve(&c, 64, 0), 2, "auto + int4 + head_dim 64");
    cr_assert_eq(cfg_kv_rotate_resolve(&c, 256, 0), 2, "auto + int4 + head_dim 256");
    cr_assert_eq(cfg_kv_rotate_resolve(&c, 48, 0), 0, "auto + int4 + head_dim 48");
    cr_assert_eq(cfg_kv_rotate_resolve(&c, 256, 1), 0, "auto + int4 + QK-norm (Gemma-3)");
    cr_assert_eq(cfg_kv_validate_model(&c, 48, 3, err, sizeof err), 0, "%s", err);
    cr_assert_eq(cfg_kv_set(&c, "kv_cache", "k3v2", err, sizeof err), 0);
    cr_assert_eq(cfg_kv_rotate_resolve(&c, 64, 0), 2, "any quantized width");
    c.mode = CFG_KV_FP16;
    cr_assert_eq(cfg_kv_rotate_resolve(&c, 64, 0), 0, "auto + fp16");
    cr_assert_eq(cfg_kv_set(&c, "kv_modes", "fp16,int3", err, sizeof err), 0);
    cr_assert_eq(cfg_kv_rotate_resolve(&c, 64, 0), 2, "auto + fp16 default, int3 served");
    cr_assert_eq(cfg_kv_set(&c, "kv_modes", "fp16", err, sizeof err), 0);
    cr_assert_eq(cfg_kv_rotate_resolve(&c, 64, 0), 0, "auto + fp16 only");
    c = cfg_kv_default();
    for (int r = 0; r <= 2; r++) { /* explicit values stay as set */
        c.kv_rotate = r;
        cr_assert_eq(cfg_kv_rotate_resolve(&c, 64, 0), r);
        cr_assert_eq(cfg_kv_rotate_resolve(&c, 48, 0), r);
    }
    c.mode = CFG_KV_FP16;
    c.kv_rotate = 2;
    cr_assert_eq(cfg_kv_rotate_resolve(&c, 64, 0), 2, "explicit 2 rotates an FP16 cache too");
    cr_assert_eq(cfg_kv_validate_model(&c, 64, 3, err, sizeof err), 0, "%s", err);
    err[0] = '\0';
    cr_assert_lt(cfg_kv_validate_model(&c, 48, 3, err, sizeof err), 0);
    cr_assert(strstr(err, "power-of-two head_dim") && !strchr(err, '\n'), "%s", err);

    /* printed: auto as "auto" in JSON and left out of the text (the
     * default); 0 left out of the JSON (the text of every unrotated
     * configuration measured before) but written in the text, where a file
     * read over the defaults would otherwise make it auto */
    char js[1024];
    c = cfg_kv_default();
    cfg_kv_json(&c, js, sizeof js);
    cr_assert(strstr(js, "\"kv_rotate\": \"auto\"") != NULL, "%s", js);
    c.kv_rotate = 0;
    cfg_kv_json(&c, js, sizeof js);
    cr_assert_null(strstr(js, "kv_rotate"), "%s", js);
    c.kv_rotate = 2;
    cfg_kv_json(&c, js, sizeof js);
    cr_assert(strstr(js, "\"kv_rotate\": 2") != NULL, "%s", js);
    for (int r = CFG_KV_ROTATE_AUTO; r <= 2; r++) {
        char path[] = "/tmp/lkq_rotXXXXXX";
        int fd = mkstemp(path);
        cr_assert(fd >= 0);
        FILE *f = fdopen(fd, "w");
        c = cfg_kv_default();
        c.kv_rotate = r;
        cfg_kv_write(&c, f);
        fclose(f);
        cfg_kv b = cfg_kv_default();
        cr_assert_eq(cfg_kv_load_file(&b, path, err, sizeof err), 0, "%s", err);
        cr_assert_eq(b.kv_rotate, r, "text round trip of %d", r);
        unlink(path);
    }
}

/* kv_modes: the KV modes sequences of one pool may use (a server's
 * per-request "kv_cache"); the mode names. */
Test(kvq_config, kv_modes)
{
    cfg_kv c = cfg_kv_default();
    cr_assert_eq(c.modes, 0u, "default: kv_cache only");
    cr_assert(cfg_kv_has_mode(&c, CFG_KV_INT4) && !cfg_kv_has_mode(&c, CFG_KV_FP16));
    cr_assert_eq(cfg_kv_set(&c, "kv-modes", "fp16, INT4", err, sizeof err), 0, "%s", err);
    cr_assert_eq(c.modes, 3u);
    cr_assert(cfg_kv_has_mode(&c, CFG_KV_FP16) && cfg_kv_has_mode(&c, CFG_KV_INT4));
    cr_assert(!cfg_kv_has_mode(&c, CFG_KV_MODES) && !cfg_kv_has_mode(&c, -1));
    cr_assert_eq(cfg_kv_mode_mask(&c), 3u);
    cfg_kv f = cfg_kv_with_mode(&c, CFG_KV_FP16);
    cr_assert_eq(f.mode, CFG_KV_FP16);
    cr_assert_eq(f.modes, 3u);
    cr_assert_eq(cfg_kv_set(&c, "kv_modes", "all", err, sizeof err), 0);
    uint32_t all = c.modes;
    char l[200];
    cfg_kv_modes_str(all, l, sizeof l);
    cr_assert_str_eq(l, "fp16,int4,int2,int3,int8,k3v2,k4v2,k4v3,k8v4", "all: K >= V");
    cr_assert_lt(cfg_kv_set(&c, "kv_modes", "fp16,int5", err, sizeof err), 0);
    cr_assert(strstr(err, "kv_modes") != NULL, "%s", err);
    cr_assert_eq(c.modes, all, "a refusal changes nothing");
    cr_assert_eq(cfg_kv_set(&c, "kv_modes", "fp16,int4", err, sizeof err), 0);
    char js[1024];
    cfg_kv_json(&c, js, sizeof js);
    cr_assert(strstr(js, "\"kv_modes\": \"fp16,int4\"") != NULL, "%s", js);
    cfg_kv d = cfg_kv_default();
    cfg_kv_json(&d, js, sizeof js);
    cr_assert_null(strstr(js, "kv_modes"), "unset: not written");
    cr_assert_eq(cfg_kv_set(&c, "kv_modes", "", err, sizeof err), 0);
    cr_assert_eq(c.modes, 0u);
    int m;
    cr_assert_eq(cfg_kv_mode_parse("F16", &m), 0);
    cr_assert_eq(m, CFG_KV_FP16);
    cr_assert_eq(cfg_kv_mode_parse("q4", &m), 0);
    cr_assert_eq(m, CFG_KV_INT4);
    cr_assert_lt(cfg_kv_mode_parse("int4 ", &m), 0);
    cr_assert_lt(cfg_kv_mode_parse(NULL, &m), 0);
    cr_assert_str_eq(cfg_kv_mode_str(CFG_KV_INT4), "int4");
    cr_assert_str_eq(cfg_kv_mode_str(CFG_KV_MODES), "?");
    char names[200];
    cfg_kv_mode_list(names, sizeof names);
    cr_assert_str_eq(names, "fp16,int4,int2,int3,int8,k2v3,k2v4,k2v8,k3v2,k3v4,k3v8,k4v2,"
                            "k4v3,k4v8,k8v2,k8v3,k8v4");
}

/* kv_modes of every width: mode ids carry the widths (int4 = k4v4 is id 1
 * whatever the pool's own widths), cfg_kv_with_mode sets them, and a
 * pool's own mode is its kv_cache with its widths. */
Test(kvq_config, kv_modes_widths)
{
    cfg_kv c = cfg_kv_default();
    char err[256] = "";
    cr_assert_eq(cfg_kv_set(&c, "kv_cache", "int3", err, sizeof err), 0, "%s", err);
    cr_assert_eq(cfg_kv_set(&c, "kv_modes", "fp16,int4,k4v2", err, sizeof err), 0, "%s", err);
    int i3, i4, k42, f;
    cr_assert_eq(cfg_kv_mode_parse("int3", &i3), 0);
    cr_assert_eq(cfg_kv_mode_parse("int4", &i4), 0);
    cr_assert_eq(cfg_kv_mode_parse("K4V2", &k42), 0);
    cr_assert_eq(cfg_kv_mode_parse("fp16", &f), 0);
    cr_assert_eq(i4, CFG_KV_INT4);
    cr_assert_eq(cfg_kv_mode_parse("k4v4", &i4), 0, "an alias of int4");
    cr_assert_eq(i4, CFG_KV_INT4);
    cr_assert_eq(cfg_kv_mode_id(&c), i3, "the pool's own mode: int3");
    cr_assert(cfg_kv_has_mode(&c, i3) && cfg_kv_has_mode(&c, i4) && cfg_kv_has_mode(&c, k42) &&
              cfg_kv_has_mode(&c, f));
    int k3v2;
    cr_assert_eq(cfg_kv_mode_parse("k3v2", &k3v2), 0);
    cr_assert(!cfg_kv_has_mode(&c, k3v2));
    cr_assert_eq(cfg_kv_mode_count(&c), 4);
    cr_assert(cfg_kv_has_quant(&c));
    cfg_kv w = cfg_kv_with_mode(&c, k42);
    cr_assert(w.mode == CFG_KV_INT4 && w.k_bits == 4 && w.v_bits == 2);
    cr_assert_str_eq(cfg_kv_mode_name(&w), "k4v2");
    cr_assert_eq(cfg_kv_mode_id(&w), k42);
    cfg_kv h = cfg_kv_with_mode(&c, CFG_KV_FP16);
    cr_assert_eq(h.mode, CFG_KV_FP16);
    cr_assert_eq(cfg_kv_mode_id(&h), CFG_KV_FP16);
    /* an int3 mode in kv_modes checks v_group like kv_cache int3 does */
    cfg_kv g = cfg_kv_default();
    g.v_group = 4;
    cr_assert_eq(cfg_kv_validate(&g, err, sizeof err), 0, "%s", err);
    cr_assert_eq(cfg_kv_set(&g, "kv_modes", "fp16,int3", err, sizeof err), 0, "%s", err);
    cr_assert_lt(cfg_kv_validate(&g, err, sizeof err), 0);
    cr_assert(strstr(err, "int3") != NULL, "%s", err);
}

/* Code widths: kv_cache intN sets both, k_bits / v_bits one each; widths
 * outside {2, 3, 4, 8} and int3 with a group that is not a multiple of 8
 * are refused with a reason. */
Test(kvq_config, code_widths)
{
    cfg_kv c = cfg_kv_default();
    char err[256] = "";
    cr_assert(c.k_bits == 4 && c.v_bits == 4, "int4 is the default");
    cr_assert_str_eq(cfg_kv_mode_name(&c), "int4");
    cr_assert_eq(cfg_kv_set(&c, "kv-cache", "int3", err, sizeof err), 0, "%s", err);
    cr_assert(c.mode == CFG_KV_INT4 && c.k_bits == 3 && c.v_bits == 3);
    cr_assert_str_eq(cfg_kv_mode_name(&c), "int3");
    cr_assert_eq(cfg_kv_set(&c, "v-bits", "2", err, sizeof err), 0, "%s", err);
    cr_assert(c.k_bits == 3 && c.v_bits == 2);
    cr_assert_str_eq(cfg_kv_mode_name(&c), "k3v2");
    cr_assert_eq(cfg_kv_set(&c, "kv_cache", "int8", err, sizeof err), 0, "%s", err);
    cr_assert(c.k_bits == 8 && c.v_bits == 8);
    cr_assert_eq(cfg_kv_set(&c, "kv_cache", "int2", err, sizeof err), 0, "%s", err);
    cr_assert_str_eq(cfg_kv_mode_name(&c), "int2");
    cr_assert_eq(cfg_kv_set(&c, "kv_cache", "k3v2", err, sizeof err), 0, "%s", err);
    cr_assert(c.k_bits == 3 && c.v_bits == 2, "the mixed names parse back");
    cr_assert_str_eq(cfg_kv_mode_name(&c), "k3v2");
    cr_assert_lt(cfg_kv_set(&c, "kv_cache", "k5v2", err, sizeof err), 0);
    static const char *bad[] = { "5", "1", "0", "16", "4.0", "", "x" };
    for (int i = 0; i < 7; i++) {
        err[0] = 0;
        cr_assert_lt(cfg_kv_set(&c, "k_bits", bad[i], err, sizeof err), 0, "'%s'", bad[i]);
        cr_assert(strstr(err, "2, 3, 4 or 8") != NULL, "%s", err);
        cr_assert_lt(cfg_kv_set(&c, "v_bits", bad[i], err, sizeof err), 0, "'%s'", bad[i]);
    }
    c = cfg_kv_default();
    cr_assert_eq(cfg_kv_set(&c, "k_bits", "3", err, sizeof err), 0);
    c.v_group = 12;
    cr_assert_lt(cfg_kv_validate(&c, err, sizeof err), 0);
    cr_assert(strstr(err, "multiple of 8") != NULL, "%s", err);
    c.v_group = 0; /* one group per head: head_dim 12 */
    cr_assert_lt(cfg_kv_validate_model(&c, 12, 2, err, sizeof err), 0);
    cr_assert(strstr(err, "multiple of 8") != NULL, "%s", err);
    cr_assert_eq(cfg_kv_validate_model(&c, 64, 3, err, sizeof err), 0, "%s", err);
    c.k_bits = 7; /* set behind the parser's back */
    cr_assert_lt(cfg_kv_validate(&c, err, sizeof err), 0);
}
