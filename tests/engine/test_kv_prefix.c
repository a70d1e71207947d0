/*
 * test_kv_prefix.c - the planner's prefix cache and fork alone (no data):
 * which boundaries are shared (whole chunks past warm-up, nothing staged,
 * no tail, no partial page), the longest match that leaves the last token
 * to compute, holders counted per unit (a unit returns to the free stack
 * when neither a sequence nor a node holds it), cached units counted as
 * free and evicted least recently used under pool pressure, fork with a
 * copied partial page, fp16 mode, no sharing with a window.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "engine/kv/kv_plan.h"

static const kvc_dims dims = {2, 16, 8, NULL};
static char err[512];

/* chunk 32, blocks of 16, 2 warm-up chunks, 4 sinks */
static cfg_kv cfg(cfg_kv_mode mode)
{
    cfg_kv c = cfg_kv_default();
    c.mode = mode;
    c.chunk_size = 32;
    c.block_tokens = 16;
    c.warmup_chunks = 2;
    c.sink_tokens = 4;
    c.v_group = 8;
    return c;
}

static kvp_pool *pool(const cfg_kv *c, int64_t nq, int64_t nf)
{
    kvp_pool *p = NULL;
    cr_assert_eq(kvp_pool_create(c, &dims, 0, nq, nf, &p, err, sizeof err), 0, "%s", err);
    cr_assert_eq(kvp_prefix_enable(p, 8, 16, err, sizeof err), 0, "%s", err);
    return p;
}

static kvp_seq *seq(kvp_pool *p, int max_tokens)
{
    kvp_seq *s = NULL;
    cr_assert_eq(kvp_seq_create(p, max_tokens, NULL, &s, err, sizeof err), 0, "%s", err);
    return s;
}

/* Prefills toks[n_tokens(s), n) in chunk-aligned pieces as the scheduler
 * does, caching every shareable boundary; returns the nodes inserted. */
static int prefill(kvp_seq *s, const int32_t *toks, int n)
{
    int ins = 0;
    while (kvp_seq_n_tokens(s) < n) {
        int pos = kvp_seq_n_tokens(s), piece = 32 - pos % 32;
        if (piece > n - pos)
            piece = n - pos;
        cr_assert_eq(kvp_begin(s, pos, piece, 1, err, sizeof err), 0, "%s", err);
        kvp_commit(s, NULL, NULL);
        void *d;
        int rc = kvp_prefix_insert(s, toks, &d);
        cr_assert_geq(rc, 0);
        if (rc == 1) {
            cr_assert_not_null(d);
            memset(d, pos & 0xff, 16);
        }
        ins += rc;
    }
    return ins;
}

static void used(const kvp_pool *p, int64_t *q, int64_t *f)
{
    int64_t tq, tf, fq, ff;
    kvp_pool_units(p, &tq, &tf);
    kvp_pool_free_units(p, &fq, &ff);
    *q = tq - fq;
    *f = tf - ff;
}

static int32_t toks_a[512], toks_b[512];

static void fill_tokens(void)
{
    for (int i = 0; i < 512; i++) {
        toks_a[i] = i * 7 % 101;
        toks_b[i] = i < 96 ? toks_a[i] : 1000 + i; /* shares 3 chunks with a */
    }
}

Test(kv_prefix, shares_whole_chunks_past_warmup)
{
    fill_tokens();
    cfg_kv c = cfg(CFG_KV_INT4);
    kvp_pool *p = pool(&c, 64, 32);
    kvp_seq *a = seq(p, 512), *b = seq(p, 512);
    /* boundaries at 64 (warm-up end), 96, 128: the one at 32 is staged */
    cr_assert_eq(prefill(a, toks_a, 140), 3);
    int64_t q0, f0;
    used(p, &q0, &f0);
    /* b shares a's first 96 tokens: the longest cached match */
    const void *d;
    cr_assert_eq(kvp_prefix_adopt(b, toks_b, 200, &d), 96);
    cr_assert_eq(((const unsigned char *)d)[0], 64, "the node's executor data");
    cr_assert_eq(kvp_seq_n_tokens(b), 96);
    cr_assert_eq(kvp_seq_chunks(b), 3);
    cr_assert_eq(kvp_seq_warming(b), 0);
    int na, nb;
    const kvp_ent *ea = kvp_seq_entries(a, &na), *eb = kvp_seq_entries(b, &nb);
    for (int i = 0; i < nb; i++)
        cr_assert(memcmp(&ea[i], &eb[i], sizeof *ea) == 0, "entry %d shared", i);
    int64_t q1, f1;
    used(p, &q1, &f1);
    cr_assert_eq(q1, q0, "sharing takes no block");
    cr_assert_eq(f1, f0);
    /* b goes on with blocks of its own */
    prefill(b, toks_b, 200);
    eb = kvp_seq_entries(b, &nb);
    for (int i = 0; i < nb; i++)
        for (int j = 0; j < na; j++)
            if (eb[i].pos0 >= 96 && eb[i].kind == ea[j].kind)
                cr_assert_neq(eb[i].id, ea[j].id, "b's own entries are its own");
    kvc_prefix_stats st;
    kvp_prefix_get_stats(p, &st);
    cr_assert_eq(st.queries, 200);
    cr_assert_eq(st.hits, 96);
    kvp_seq_destroy(a);
    kvp_seq_destroy(b);
    kvp_pool_destroy(p);
}

Test(kv_prefix, last_token_always_computed_and_tokens_checked)
{
    fill_tokens();
    cfg_kv c = cfg(CFG_KV_INT4);
    kvp_pool *p = pool(&c, 64, 32);
    kvp_seq *a = seq(p, 512), *b = seq(p, 512);
    prefill(a, toks_a, 128);
    const void *d;
    cr_assert_eq(kvp_prefix_adopt(b, toks_a, 128, &d), 96, "128 tokens: the last chunk "
                 "is computed for its logits");
    kvp_seq_reset(b);
    cr_assert_eq(kvp_prefix_adopt(b, toks_a, 129, &d), 128);
    kvp_seq_reset(b);
    int32_t other[200];
    memcpy(other, toks_a, sizeof other);
    other[70] ^= 1; /* differs in the third chunk */
    cr_assert_eq(kvp_prefix_adopt(b, other, 200, &d), 64);
    kvp_seq_reset(b);
    other[3] ^= 1;
    cr_assert_eq(kvp_prefix_adopt(b, other, 200, &d), 0);
    cr_assert_eq(kvp_seq_n_tokens(b), 0);
    kvp_seq_destroy(a);
    kvp_seq_destroy(b);
    kvp_pool_destroy(p);
}

Test(kv_prefix, cached_units_count_as_free_and_return_when_nobody_holds_them)
{
    fill_tokens();
    cfg_kv c = cfg(CFG_KV_INT4);
    kvp_pool *p = pool(&c, 64, 32);
    int64_t tq, tf, fq, ff;
    kvp_pool_units(p, &tq, &tf);
    kvp_seq *a = seq(p, 512);
    prefill(a, toks_a, 128);
    kvp_seq_destroy(a);
    /* a is gone; its prefixes are cached, counted as free, not as used */
    kvp_pool_free_units(p, &fq, &ff);
    cr_assert_eq(fq, tq);
    cr_assert_eq(ff, tf);
    cr_assert_float_eq(kvp_pool_usage(p), 0.0, 1e-12);
    kvc_prefix_stats st;
    kvp_prefix_get_stats(p, &st);
    cr_assert_eq(st.nodes, 3);
    cr_assert_eq(st.qblocks, 8, "blocks 4..127 less the sink page's tokens: %lld",
                 (long long)st.qblocks);
    cr_assert_eq(st.fpages, 1, "the sink page");
    cr_assert_gt(st.bytes, 0);
    int64_t nfree;
    kvp_pool_free_list(p, KVP_BLOCK, &nfree);
    cr_assert_eq(nfree, tq - 8, "cached blocks are off the free stack");
    kvp_prefix_clear(p);
    kvp_pool_free_list(p, KVP_BLOCK, &nfree);
    cr_assert_eq(nfree, tq);
    kvp_prefix_get_stats(p, &st);
    cr_assert_eq(st.evictions, 3);
    cr_assert_eq(st.qblocks, 0);
    kvp_pool_destroy(p);
}

Test(kv_prefix, evicted_lru_under_pool_pressure)
{
    fill_tokens();
    cfg_kv c = cfg(CFG_KV_INT4);
    /* 16 blocks: a 128-token prompt holds 8 */
    kvp_pool *p = pool(&c, 16, 32);
    kvp_seq *a = seq(p, 512), *b = seq(p, 512), *x = seq(p, 512);
    prefill(a, toks_a, 128);
    kvp_seq_destroy(a);
    prefill(b, toks_b, 128); /* shares a's 96 via no adoption: its own units */
    kvp_seq_destroy(b);
    kvc_prefix_stats st;
    kvp_prefix_get_stats(p, &st);
    cr_assert_eq(st.qblocks, 16, "both prompts cached, the pool is full of them");
    /* a sequence that needs every block evicts both, oldest first */
    int32_t t3[256];
    for (int i = 0; i < 256; i++)
        t3[i] = 5000 + i;
    prefill(x, t3, 200);
    kvp_prefix_get_stats(p, &st);
    cr_assert_geq(st.evictions, 3);
    const void *d;
    kvp_seq *y = seq(p, 512);
    cr_assert_eq(kvp_prefix_adopt(y, toks_a, 200, &d), 0, "a's prefixes went first");
    kvp_seq_destroy(y);
    kvp_seq_destroy(x);
    kvp_pool_destroy(p);
}

Test(kv_prefix, a_held_unit_survives_eviction)
{
    fill_tokens();
    cfg_kv c = cfg(CFG_KV_INT4);
    kvp_pool *p = pool(&c, 64, 32);
    kvp_seq *a = seq(p, 512), *b = seq(p, 512);
    prefill(a, toks_a, 128);
    kvp_seq_destroy(a);
    const void *d;
    cr_assert_eq(kvp_prefix_adopt(b, toks_a, 200, &d), 128);
    kvp_prefix_clear(p); /* b still holds them */
    int64_t nfree, tq, tf;
    kvp_pool_units(p, &tq, &tf);
    kvp_pool_free_list(p, KVP_BLOCK, &nfree);
    cr_assert_eq(nfree, tq - 8);
    kvp_seq_destroy(b);
    kvp_pool_free_list(p, KVP_BLOCK, &nfree);
    cr_assert_eq(nfree, tq);
    kvp_pool_free_list(p, KVP_PAGE, &nfree);
    cr_assert_eq(nfree, tf);
    kvp_pool_destroy(p);
}

Test(kv_prefix, fork_copies_a_partial_last_page)
{
    fill_tokens();
    for (int mode = 0; mode < 2; mode++) {
        cfg_kv c = cfg(mode ? CFG_KV_INT4 : CFG_KV_FP16);
        kvp_pool *p = pool(&c, 64, 64);
        kvp_seq *a = seq(p, 512), *b = seq(p, 512);
        prefill(a, toks_a, mode ? 24 : 40); /* int4: 4 sinks, 16 + 4 staged; fp16: 32 + 8 */
        int64_t q0, f0, q1, f1;
        used(p, &q0, &f0);
        kvp_src from;
        int32_t to;
        cr_assert_eq(kvp_seq_fork(b, a, &from, &to, err, sizeof err), 0, "%s", err);
        used(p, &q1, &f1);
        cr_assert_eq(from.n, mode ? 4 : 8, "mode %d: a last page of %d", mode, from.n);
        cr_assert_neq(to, from.id);
        cr_assert_eq(q1, q0);
        cr_assert_eq(f1, f0 + 1, "one page copied, the rest shared");
        cr_assert_eq(kvp_seq_n_tokens(b), mode ? 24 : 40);
        cr_assert_eq(kvp_seq_warming(b), kvp_seq_warming(a));
        /* both decode on: neither writes the other's units */
        for (int k = 0; k < 40; k++) {
            kvp_seq *s = k % 2 ? a : b;
            int pos = kvp_seq_n_tokens(s);
            int rc = kvp_begin(s, pos, 1, 0, err, sizeof err);
            if (rc == KVP_FINISH_PREFILL) {
                if (kvp_finish_prefill(s, err, sizeof err) == KVP_REQUANT)
                    kvp_commit(s, NULL, NULL);
                rc = kvp_begin(s, pos, 1, 0, err, sizeof err);
            }
            cr_assert_eq(rc, 0, "%s", err);
            const kvp_step *st = kvp_seq_step(s);
            const kvp_seq *o = s == a ? b : a;
            int no;
            const kvp_ent *eo = kvp_seq_entries(o, &no);
            for (int t = 0; t < st->n_tgt; t++)
                for (int i = 0; i < no; i++)
                    cr_assert(!(eo[i].kind == st->tgt[t].kind && eo[i].id == st->tgt[t].id),
                              "a step writes a unit the other sequence holds");
            kvp_commit(s, NULL, NULL);
        }
        kvp_seq_destroy(a);
        kvp_seq_destroy(b);
        kvp_prefix_clear(p); /* fp16: the first chunk was cached */
        int64_t nfree, tq, tf;
        kvp_pool_units(p, &tq, &tf);
        kvp_pool_free_list(p, KVP_PAGE, &nfree);
        cr_assert_eq(nfree, tf, "every page back (mode %d)", mode);
        kvp_pool_free_list(p, KVP_BLOCK, &nfree);
        cr_assert_eq(nfree, tq);
        kvp_pool_destroy(p);
    }
}

Test(kv_prefix, fp16_mode_shares_from_the_first_chunk)
{
    fill_tokens();
    cfg_kv c = cfg(CFG_KV_FP16);
    kvp_pool *p = pool(&c, 0, 64);
    kvp_seq *a = seq(p, 512), *b = seq(p, 512);
    cr_assert_eq(prefill(a, toks_a, 100), 3);
    const void *d;
    cr_assert_eq(kvp_prefix_adopt(b, toks_a, 100, &d), 96);
    kvp_seq_destroy(a);
    kvp_seq_destroy(b);
    kvp_pool_destroy(p);
}

Test(kv_prefix, configuration_keys_and_window_pools)
{
    fill_tokens();
    cfg_kv c = cfg(CFG_KV_INT4);
    kvp_pool *w = NULL;
    cr_assert_eq(kvp_pool_create(&c, &dims, 64, 64, 32, &w, err, sizeof err), 0, "%s", err);
    cr_assert_eq(kvp_prefix_enable(w, 8, 0, err, sizeof err), -ENOTSUP);
    cr_assert_eq(kvp_prefix_enabled(w), 0);
    kvp_pool_destroy(w);
    /* without the cache: adopt finds nothing, insert does nothing */
    kvp_pool *p = NULL;
    cr_assert_eq(kvp_pool_create(&c, &dims, 0, 64, 32, &p, err, sizeof err), 0, "%s", err);
    kvp_seq *a = seq(p, 512);
    cr_assert_eq(prefill(a, toks_a, 128), 0);
    const void *d;
    kvp_seq *b = seq(p, 512);
    cr_assert_eq(kvp_prefix_adopt(b, toks_a, 200, &d), 0);
    kvp_seq_destroy(a);
    kvp_seq_destroy(b);
    kvp_pool_destroy(p);
}

/* A pool of both KV modes (kv_modes): each mode's prefixes are its own;
 * a fork continues its source's mode. */
Test(kv_prefix, modes_keep_their_own_prefixes)
{
    fill_tokens();
    cfg_kv c = cfg(CFG_KV_INT4);
    c.modes = (1u << CFG_KV_FP16) | (1u << CFG_KV_INT4);
    kvp_pool *p = pool(&c, 64, 64);
    kvp_seq *q4 = seq(p, 512), *f16 = seq(p, 512), *a = seq(p, 512), *b = seq(p, 512);
    cr_assert_eq(kvp_seq_set_mode(f16, CFG_KV_FP16, err, sizeof err), 0, "%s", err);
    cr_assert_eq(prefill(q4, toks_a, 140), 3, "int4: boundaries at 64, 96, 128");
    const void *d;
    cr_assert_eq(kvp_seq_set_mode(a, CFG_KV_FP16, err, sizeof err), 0, "%s", err);
    cr_assert_eq(kvp_prefix_adopt(a, toks_a, 200, &d), 0, "an fp16 sequence takes no int4 prefix");
    cr_assert_eq(prefill(f16, toks_a, 100), 3, "fp16: boundaries at 32, 64, 96");
    cr_assert_eq(kvp_prefix_adopt(a, toks_a, 200, &d), 96);
    int n;
    const kvp_ent *e = kvp_seq_entries(a, &n);
    for (int i = 0; i < n; i++)
        cr_assert_eq(e[i].kind, KVP_PAGE, "entry %d of the fp16 prefix is a page", i);
    cr_assert_eq(kvp_prefix_adopt(b, toks_a, 200, &d), 128, "int4 takes its own, longest");
    e = kvp_seq_entries(b, &n);
    cr_assert_eq(e[n - 1].kind, KVP_BLOCK);
    kvp_seq *fk = seq(p, 512);
    kvp_src from;
    int32_t to;
    cr_assert_eq(kvp_seq_fork(fk, a, &from, &to, err, sizeof err), 0, "%s", err);
    cr_assert_eq(kvp_seq_mode(fk), CFG_KV_FP16, "a fork continues its source's mode");
    kvp_seq *all[] = {q4, f16, a, b, fk};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        kvp_seq_destroy(all[i]);
    kvp_pool_destroy(p);
}

/* Widths keep their own prefixes too: an int3 sequence never adopts the
 * int4 blocks of the same tokens (the chain starts from the mode id, which
 * carries the widths), and takes its own once cached; a cached prefix's
 * units are evictable in a shared pool like in any other. */
Test(kv_prefix, widths_keep_their_own_prefixes)
{
    fill_tokens();
    cfg_kv c = cfg(CFG_KV_INT4);
    int i3;
    cr_assert_eq(cfg_kv_mode_parse("int3", &i3), 0);
    c.modes = (1u << CFG_KV_INT4) | (1u << i3);
    kvp_pool *p = pool(&c, 64, 64);
    kvp_seq *q4 = seq(p, 512), *q3 = seq(p, 512), *a = seq(p, 512), *b = seq(p, 512);
    cr_assert_eq(prefill(q4, toks_a, 140), 3, "int4: boundaries at 64, 96, 128");
    cr_assert_eq(kvp_seq_set_mode(a, i3, err, sizeof err), 0, "%s", err);
    const void *d;
    cr_assert_eq(kvp_prefix_adopt(a, toks_a, 200, &d), 0, "int3 takes no int4 prefix");
    cr_assert_eq(kvp_seq_set_mode(q3, i3, err, sizeof err), 0, "%s", err);
    cr_assert_eq(prefill(q3, toks_a, 140), 3, "int3: its own boundaries");
    cr_assert_eq(kvp_prefix_adopt(a, toks_a, 200, &d), 128);
    int na, n3;
    const kvp_ent *ea = kvp_seq_entries(a, &na), *e3 = kvp_seq_entries(q3, &n3);
    cr_assert_leq(na, n3);
    for (int i = 0; i < na; i++)
        cr_assert_eq(ea[i].id, e3[i].id, "entry %d: the int3 sequence's own units", i);
    cr_assert_eq(kvp_prefix_adopt(b, toks_a, 200, &d), 128, "int4 still takes its own");
    kvp_seq *all[] = {q4, q3, a, b};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        kvp_seq_destroy(all[i]);
    kvp_prefix_clear(p);
    cr_assert_eq(kvp_pool_free_bytes(p), kvp_pool_capacity_bytes(p), "all back");
    kvp_pool_destroy(p);
}
