/*
 * test_kv_plan.c - the host-side KV planner alone (no data): every decision
 * the CPU and the GPU caches execute. Sinks go to FP16 pages; warm-up
 * chunks are staged in pages and re-quantized into blocks at warm-up end
 * (or stay FP16 with keep_warmup_fp16); later chunks go live to INT4
 * blocks; a prompt that ends during warm-up is re-quantized by
 * finish_prefill; the decode tail fills pages and is re-quantized when it
 * reaches block_tokens; a partially filled last page is continued; -ENOSPC
 * leaves free lists and entries exactly as they were; abort returns every
 * reservation; the admission estimate bounds the real peak; fp16 mode.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "engine/kv/kv_plan.h"

static const kvc_dims dims = {2, 16, 8, NULL}; /* 2 layers, 2 kv heads of 8 */
static char err[512];

/* chunk 32, blocks of 16 (pages of 16), 2 warm-up chunks, 4 sinks */
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
    return p;
}

static kvp_seq *seq(kvp_pool *p, int max_tokens)
{
    kvp_seq *s = NULL;
    cr_assert_eq(kvp_seq_create(p, max_tokens, NULL, &s, err, sizeof err), 0, "%s", err);
    return s;
}

/* Commits a step as an executor would, handling the end of the prefill
 * (re-quantization of the staged chunks first). Returns kvp_begin's
 * result. */
static int step(kvp_seq *s, int n, int prefill)
{
    int pos0 = kvp_seq_n_tokens(s);
    int rc = kvp_begin(s, pos0, n, prefill, err, sizeof err);
    if (rc == KVP_FINISH_PREFILL) {
        rc = kvp_finish_prefill(s, err, sizeof err);
        if (rc == KVP_REQUANT)
            kvp_commit(s, NULL, NULL);
        else if (rc < 0 && rc != -ENOSPC)
            return rc;
        rc = kvp_begin(s, pos0, n, prefill, err, sizeof err);
        cr_assert_neq(rc, KVP_FINISH_PREFILL, "the prefill ends once");
    }
    if (rc < 0)
        return rc;
    kvp_commit(s, NULL, NULL);
    return 0;
}

/* The entries cover [0, n_tokens) in order; pages hold <= P tokens, blocks
 * <= T. Counts the blocks and pages. */
static void check_cover(const kvp_seq *s, int *nq, int *nf)
{
    int n;
    const kvp_ent *e = kvp_seq_entries(s, &n);
    int pos = 0;
    *nq = *nf = 0;
    for (int i = 0; i < n; i++) {
        cr_assert_eq(e[i].pos0, pos, "entry %d starts at %d, expected %d", i, e[i].pos0, pos);
        cr_assert_gt(e[i].n, 0);
        if (e[i].kind == KVP_BLOCK) {
            cr_assert_leq(e[i].n, 16 * 2);
            (*nq)++;
        } else {
            (*nf)++;
        }
        pos += e[i].n;
    }
    cr_assert_eq(pos, kvp_seq_n_tokens(s));
    cr_assert_leq(n, kvp_seq_max_entries(s));
}

/* Every id is either free (once) or held by exactly one entry / the open
 * step of the given sequences. */
static void check_ids(const kvp_pool *p, kvp_seq **seqs, int n_seqs)
{
    int64_t tq, tf;
    kvp_pool_units(p, &tq, &tf);
    for (int kind = 0; kind < 2; kind++) {
        int64_t total = kind == KVP_BLOCK ? tq : tf, nfree;
        int *seen = calloc((size_t)total + 1, sizeof *seen);
        const int32_t *fl = kvp_pool_free_list(p, kind, &nfree);
        for (int64_t i = 0; i < nfree; i++)
            seen[fl[i]]++;
        for (int j = 0; j < n_seqs; j++) {
            int n;
            const kvp_ent *e = kvp_seq_entries(seqs[j], &n);
            for (int i = 0; i < n; i++)
                if (e[i].kind == kind)
                    seen[e[i].id]++;
            const kvp_step *st = kvp_seq_step(seqs[j]);
            for (int i = 0; st->active && i < st->n_tgt; i++)
                if (st->tgt[i].kind == kind && !st->tgt[i].existing)
                    seen[st->tgt[i].id]++;
            for (int i = 0; st->active && kind == KVP_BLOCK && i < st->n_rq; i++)
                seen[st->rq_ids[i]]++;
        }
        for (int64_t i = 0; i < total; i++)
            cr_assert_eq(seen[i], 1, "%s %lld is counted %d times",
                         kind == KVP_BLOCK ? "block" : "page", (long long)i, seen[i]);
        free(seen);
    }
}

/* A copy of the pool's free lists and a sequence's entries. */
typedef struct {
    int64_t nq, nf;
    int32_t q[256], f[256];
    int n_ents, n_tokens;
    kvp_ent ents[256];
} snap;

static void take_snap(const kvp_pool *p, const kvp_seq *s, snap *o)
{
    memset(o, 0, sizeof *o);
    const int32_t *q = kvp_pool_free_list(p, KVP_BLOCK, &o->nq);
    const int32_t *f = kvp_pool_free_list(p, KVP_PAGE, &o->nf);
    cr_assert_leq(o->nq, 256);
    cr_assert_leq(o->nf, 256);
    memcpy(o->q, q, (size_t)o->nq * sizeof *q);
    memcpy(o->f, f, (size_t)o->nf * sizeof *f);
    const kvp_ent *e = kvp_seq_entries(s, &o->n_ents);
    cr_assert_leq(o->n_ents, 256);
    memcpy(o->ents, e, (size_t)o->n_ents * sizeof *e);
    o->n_tokens = kvp_seq_n_tokens(s);
}

static void assert_same(const snap *a, const snap *b)
{
    cr_assert_eq(a->nq, b->nq, "free blocks %lld -> %lld", (long long)a->nq, (long long)b->nq);
    cr_assert_eq(a->nf, b->nf, "free pages %lld -> %lld", (long long)a->nf, (long long)b->nf);
    cr_assert_eq(memcmp(a->q, b->q, sizeof a->q), 0, "the block free list changed");
    cr_assert_eq(memcmp(a->f, b->f, sizeof a->f), 0, "the page free list changed");
    cr_assert_eq(a->n_ents, b->n_ents);
    cr_assert_eq(memcmp(a->ents, b->ents, sizeof a->ents), 0, "the entries changed");
    cr_assert_eq(a->n_tokens, b->n_tokens);
}

static const kvp_step *begin_ok(kvp_seq *s, int n, int prefill)
{
    int rc = kvp_begin(s, kvp_seq_n_tokens(s), n, prefill, err, sizeof err);
    cr_assert_eq(rc, 0, "kvp_begin: %d %s", rc, err);
    const kvp_step *st = kvp_seq_step(s);
    cr_assert(st->active);
    return st;
}

static void tgt_is(const kvp_tgt *t, int kind, int slot0, int row0, int n, int existing)
{
    cr_assert_eq(t->kind, kind, "kind %d, expected %d", t->kind, kind);
    cr_assert_eq(t->slot0, slot0, "slot0 %d, expected %d", t->slot0, slot0);
    cr_assert_eq(t->row0, row0, "row0 %d, expected %d", t->row0, row0);
    cr_assert_eq(t->n, n, "n %d, expected %d", t->n, n);
    cr_assert_eq(t->existing, existing);
}

Test(kv_plan, sinks_and_warmup_staging_then_requant_at_warmup_end)
{
    cfg_kv c = cfg(CFG_KV_INT4);
    kvp_pool *p = pool(&c, 64, 64);
    kvp_seq *s = seq(p, 512);
    cr_assert_eq(kvp_pool_page_tokens(p), 16);
    cr_assert_not_null(kvp_pool_layout(p));
    /* chunk 0: 4 sinks into a page of their own, 28 staged in pages */
    const kvp_step *st = begin_ok(s, 32, 1);
    cr_assert_eq(st->row_stats, 4);
    cr_assert(st->stats, "a prompt chunk feeds the EMA");
    cr_assert_eq(st->rq, KVP_RQ_NONE);
    cr_assert_eq(st->n_tgt, 3);
    tgt_is(&st->tgt[0], KVP_PAGE, 0, 0, 4, 0);
    tgt_is(&st->tgt[1], KVP_PAGE, 0, 4, 16, 0);
    tgt_is(&st->tgt[2], KVP_PAGE, 0, 20, 12, 0);
    check_ids(p, &s, 1);
    kvp_commit(s, NULL, NULL);
    cr_assert(kvp_seq_warming(s));
    int nq, nf;
    check_cover(s, &nq, &nf);
    cr_assert_eq(nq, 0);
    cr_assert_eq(nf, 3);
    /* chunk 1 ends warm-up: the partial staged page is continued, and the
     * 60 staged tokens (sinks excluded) are re-quantized into 4 blocks */
    st = begin_ok(s, 32, 1);
    cr_assert_eq(st->row_stats, 0);
    cr_assert_eq(st->n_tgt, 3);
    tgt_is(&st->tgt[0], KVP_PAGE, 12, 0, 4, 1);
    tgt_is(&st->tgt[1], KVP_PAGE, 0, 4, 16, 0);
    tgt_is(&st->tgt[2], KVP_PAGE, 0, 20, 12, 0);
    cr_assert_eq(st->rq, KVP_RQ_WARMUP);
    cr_assert_eq(st->rq_tokens, 60);
    cr_assert_eq(st->n_src, 4);
    int src_n[4] = {16, 16, 16, 12};
    for (int i = 0; i < 4; i++)
        cr_assert_eq(st->src[i].n, src_n[i], "source %d holds %d", i, st->src[i].n);
    cr_assert_eq(st->src[1].id, st->tgt[0].id, "the continued page is a source once");
    cr_assert_eq(st->n_rq, 4);
    check_ids(p, &s, 1);
    kvp_commit(s, NULL, NULL);
    cr_assert(!kvp_seq_warming(s));
    cr_assert_eq(kvp_seq_chunks(s), 2);
    check_cover(s, &nq, &nf);
    cr_assert_eq(nq, 4);
    cr_assert_eq(nf, 1, "only the sink page stays FP16");
    int n;
    const kvp_ent *e = kvp_seq_entries(s, &n);
    cr_assert_eq(e[0].kind, KVP_PAGE);
    cr_assert_eq(e[0].n, 4);
    cr_assert_eq(e[4].n, 12, "the last re-quantized block is partial");
    int64_t qf, ff;
    kvp_pool_free_units(p, &qf, &ff);
    cr_assert_eq(qf, 60);
    cr_assert_eq(ff, 63, "staged pages went back to the pool");
    check_ids(p, &s, 1);
    kvp_seq_destroy(s);
    kvp_pool_free_units(p, &qf, &ff);
    cr_assert_eq(qf, 64);
    cr_assert_eq(ff, 64);
    kvp_pool_destroy(p);
}

Test(kv_plan, live_blocks_after_warmup)
{
    cfg_kv c = cfg(CFG_KV_INT4);
    kvp_pool *p = pool(&c, 64, 64);
    kvp_seq *s = seq(p, 512);
    cr_assert_eq(step(s, 32, 1), 0);
    cr_assert_eq(step(s, 32, 1), 0);
    const kvp_step *st = begin_ok(s, 20, 1);
    cr_assert(st->stats);
    cr_assert_eq(st->row_stats, 0);
    cr_assert_eq(st->rq, KVP_RQ_NONE);
    cr_assert_eq(st->n_tgt, 2);
    tgt_is(&st->tgt[0], KVP_BLOCK, 0, 0, 16, 0);
    tgt_is(&st->tgt[1], KVP_BLOCK, 0, 16, 4, 0);
    kvp_commit(s, NULL, NULL);
    int nq, nf;
    check_cover(s, &nq, &nf);
    cr_assert_eq(nq, 6);
    cr_assert_eq(nf, 1);
    /* a later full chunk: two whole blocks of its own */
    st = begin_ok(s, 32, 1);
    cr_assert_eq(st->n_tgt, 2);
    tgt_is(&st->tgt[1], KVP_BLOCK, 0, 16, 16, 0);
    kvp_commit(s, NULL, NULL);
    check_ids(p, &s, 1);
    kvp_seq_destroy(s);
    kvp_pool_destroy(p);
}

/* on_block sees every block that becomes an entry, once. */
static void count_cb(void *ctx, int32_t id, int added)
{
    int *seen = ctx;
    cr_assert(added, "no window: blocks never leave");
    seen[id]++;
}

Test(kv_plan, commit_reports_new_blocks)
{
    cfg_kv c = cfg(CFG_KV_INT4);
    kvp_pool *p = pool(&c, 64, 64);
    kvp_seq *s = seq(p, 512);
    int seen[64] = {0};
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(kvp_begin(s, kvp_seq_n_tokens(s), 32, 1, err, sizeof err), 0);
        kvp_commit(s, count_cb, seen);
    }
    int n, total = 0;
    const kvp_ent *e = kvp_seq_entries(s, &n);
    for (int i = 0; i < n; i++)
        if (e[i].kind == KVP_BLOCK)
            cr_assert_eq(seen[e[i].id], 1);
    for (int i = 0; i < 64; i++)
        total += seen[i];
    cr_assert_eq(total, 6, "4 re-quantized + 2 live blocks");
    kvp_seq_destroy(s);
    kvp_pool_destroy(p);
}

Test(kv_plan, keep_warmup_fp16)
{
    cfg_kv c = cfg(CFG_KV_INT4);
    c.keep_warmup_fp16 = 1;
    kvp_pool *p = pool(&c, 64, 64);
    kvp_seq *s = seq(p, 512);
    cr_assert_eq(step(s, 32, 1), 0);
    const kvp_step *st = begin_ok(s, 32, 1);
    cr_assert_eq(st->rq, KVP_RQ_NONE, "warm-up end re-quantizes nothing");
    kvp_commit(s, NULL, NULL);
    cr_assert(!kvp_seq_warming(s));
    st = begin_ok(s, 32, 1);
    cr_assert_eq(st->n_tgt, 2);
    cr_assert_eq(st->tgt[0].kind, KVP_BLOCK, "later chunks go live");
    kvp_commit(s, NULL, NULL);
    int nq, nf;
    check_cover(s, &nq, &nf);
    cr_assert_eq(nq, 2);
    cr_assert_eq(nf, 5, "sink page + 60 staged tokens in 4 pages");
    /* the first decode step needs no finish_prefill: nothing to quantize */
    st = begin_ok(s, 1, 0);
    cr_assert_eq(st->rq, KVP_RQ_NONE);
    kvp_commit(s, NULL, NULL);
    cr_assert_eq(kvp_finish_prefill(s, err, sizeof err), 0);
    check_ids(p, &s, 1);
    kvp_seq_destroy(s);
    kvp_pool_destroy(p);
}

Test(kv_plan, prompt_ends_during_warmup)
{
    cfg_kv c = cfg(CFG_KV_INT4);
    kvp_pool *p = pool(&c, 64, 64);
    kvp_seq *s = seq(p, 512);
    cr_assert_eq(step(s, 24, 1), 0);
    cr_assert(kvp_seq_warming(s));
    snap a, b;
    take_snap(p, s, &a);
    /* the first decode step asks for the end of the prefill first */
    cr_assert_eq(kvp_begin(s, 24, 1, 0, err, sizeof err), KVP_FINISH_PREFILL);
    cr_assert(!kvp_seq_step(s)->active);
    take_snap(p, s, &b);
    assert_same(&a, &b);
    cr_assert_eq(kvp_finish_prefill(s, err, sizeof err), KVP_REQUANT);
    const kvp_step *st = kvp_seq_step(s);
    cr_assert(st->active);
    cr_assert_eq(st->n, 0);
    cr_assert_eq(st->n_tgt, 0);
    cr_assert_eq(st->rq, KVP_RQ_WARMUP);
    cr_assert_eq(st->rq_tokens, 20, "sinks are not re-quantized");
    cr_assert_eq(st->n_rq, 2);
    kvp_commit(s, NULL, NULL);
    cr_assert(!kvp_seq_warming(s));
    cr_assert_eq(kvp_seq_chunks(s), 1, "the re-quantization is no chunk");
    int nq, nf;
    check_cover(s, &nq, &nf);
    cr_assert_eq(nq, 2, "20 staged tokens -> 2 blocks");
    cr_assert_eq(nf, 1);
    st = begin_ok(s, 1, 0);
    cr_assert(!st->stats, "decode tokens do not feed the EMA until the tail is full");
    cr_assert_eq(st->n_tgt, 1);
    tgt_is(&st->tgt[0], KVP_PAGE, 0, 0, 1, 0);
    kvp_commit(s, NULL, NULL);
    cr_assert_eq(kvp_finish_prefill(s, err, sizeof err), 0, "idempotent");
    check_ids(p, &s, 1);
    kvp_seq_destroy(s);
    kvp_pool_destroy(p);
}

Test(kv_plan, finish_prefill_without_blocks_keeps_fp16)
{
    cfg_kv c = cfg(CFG_KV_INT4);
    kvp_pool *p = pool(&c, 1, 64); /* one block: 20 staged tokens need 2 */
    kvp_seq *s = seq(p, 512);
    cr_assert_eq(step(s, 24, 1), 0);
    snap a, b;
    take_snap(p, s, &a);
    cr_assert_eq(kvp_finish_prefill(s, err, sizeof err), -ENOSPC);
    cr_assert(strstr(err, "stay FP16") != NULL, "%s", err);
    take_snap(p, s, &b);
    assert_same(&a, &b);
    cr_assert(!kvp_seq_warming(s), "the prefill is over all the same");
    /* decode goes on; the staged pages stay FP16 for good */
    cr_assert_eq(step(s, 1, 0), 0, "%s", err);
    int nq, nf;
    check_cover(s, &nq, &nf);
    cr_assert_eq(nq, 0);
    cr_assert_eq(nf, 4, "sinks, 2 staged pages, one tail page");
    check_ids(p, &s, 1);
    kvp_seq_destroy(s);
    kvp_pool_destroy(p);
}

Test(kv_plan, decode_tail_requantized_at_block_tokens)
{
    cfg_kv c = cfg(CFG_KV_INT4);
    c.block_tokens = 32; /* pages of 16: the tail spans two pages */
    c.chunk_size = 64;
    kvp_pool *p = pool(&c, 64, 64);
    kvp_seq *s = seq(p, 1024);
    cr_assert_eq(kvp_pool_page_tokens(p), 16);
    cr_assert_eq(step(s, 64, 1), 0);
    cr_assert_eq(step(s, 64, 1), 0);
    cr_assert_eq(step(s, 40, 1), 0); /* live */
    int nq0, nf0, nq, nf;
    check_cover(s, &nq0, &nf0);
    for (int i = 0; i < 31; i++) {
        const kvp_step *st = begin_ok(s, 1, 0);
        cr_assert_eq(st->rq, KVP_RQ_NONE);
        cr_assert(!st->stats);
        cr_assert_eq(st->n_tgt, 1);
        /* the tail's last page is continued while it has room */
        tgt_is(&st->tgt[0], KVP_PAGE, i % 16, 0, 1, i % 16 != 0);
        kvp_commit(s, NULL, NULL);
    }
    check_cover(s, &nq, &nf);
    cr_assert_eq(nq, nq0);
    cr_assert_eq(nf, nf0 + 2);
    /* the 32nd token fills the tail: its two pages become one block */
    const kvp_step *st = begin_ok(s, 1, 0);
    cr_assert_eq(st->rq, KVP_RQ_TAIL);
    cr_assert_eq(st->rq_tokens, 32);
    cr_assert_eq(st->n_src, 2);
    cr_assert_eq(st->src[0].n, 16);
    cr_assert_eq(st->src[1].n, 16);
    cr_assert_eq(st->n_rq, 1);
    tgt_is(&st->tgt[0], KVP_PAGE, 15, 0, 1, 1);
    kvp_commit(s, NULL, NULL);
    check_cover(s, &nq, &nf);
    cr_assert_eq(nq, nq0 + 1);
    cr_assert_eq(nf, nf0);
    int n;
    const kvp_ent *e = kvp_seq_entries(s, &n);
    cr_assert_eq(e[n - 1].kind, KVP_BLOCK);
    cr_assert_eq(e[n - 1].n, 32);
    /* a new tail starts after it */
    st = begin_ok(s, 1, 0);
    tgt_is(&st->tgt[0], KVP_PAGE, 0, 0, 1, 0);
    kvp_commit(s, NULL, NULL);
    check_ids(p, &s, 1);
    kvp_seq_destroy(s);
    kvp_pool_destroy(p);
}

Test(kv_plan, partial_last_page_continued)
{
    cfg_kv c = cfg(CFG_KV_INT4);
    kvp_pool *p = pool(&c, 64, 64);
    kvp_seq *s = seq(p, 512);
    /* sinks across two steps: the sink page is continued */
    const kvp_step *st = begin_ok(s, 2, 1);
    tgt_is(&st->tgt[0], KVP_PAGE, 0, 0, 2, 0);
    kvp_commit(s, NULL, NULL);
    st = begin_ok(s, 30, 1);
    cr_assert_eq(st->row_stats, 2);
    tgt_is(&st->tgt[0], KVP_PAGE, 2, 0, 2, 1);
    tgt_is(&st->tgt[1], KVP_PAGE, 0, 2, 16, 0);
    tgt_is(&st->tgt[2], KVP_PAGE, 0, 18, 12, 0);
    kvp_commit(s, NULL, NULL);
    int n;
    const kvp_ent *e = kvp_seq_entries(s, &n);
    cr_assert_eq(n, 3);
    cr_assert_eq(e[0].n, 4, "the sink page grew in place");
    kvp_seq_destroy(s);
    /* fp16 mode: every step continues the last page */
    c = cfg(CFG_KV_FP16);
    kvp_pool_destroy(p);
    p = pool(&c, 0, 16);
    s = seq(p, 256);
    cr_assert_eq(step(s, 5, 1), 0);
    int64_t qf, ff0, ff;
    kvp_pool_free_units(p, &qf, &ff0);
    st = begin_ok(s, 3, 1);
    cr_assert_eq(st->n_tgt, 1);
    tgt_is(&st->tgt[0], KVP_PAGE, 5, 0, 3, 1);
    kvp_pool_free_units(p, &qf, &ff);
    cr_assert_eq(ff, ff0, "no new page for a continued one");
    kvp_commit(s, NULL, NULL);
    st = begin_ok(s, 10, 1);
    cr_assert_eq(st->n_tgt, 2);
    tgt_is(&st->tgt[0], KVP_PAGE, 8, 0, 8, 1);
    tgt_is(&st->tgt[1], KVP_PAGE, 0, 8, 2, 0);
    kvp_commit(s, NULL, NULL);
    e = kvp_seq_entries(s, &n);
    cr_assert_eq(n, 2);
    cr_assert_eq(e[0].n, 16);
    cr_assert_eq(e[1].n, 2);
    kvp_seq_destroy(s);
    kvp_pool_destroy(p);
}

Test(kv_plan, enospc_changes_nothing)
{
    cfg_kv c = cfg(CFG_KV_INT4);
    snap a, b;
    /* (1) pages run out while staging */
    kvp_pool *p = pool(&c, 64, 4);
    kvp_seq *s = seq(p, 512);
    cr_assert_eq(step(s, 32, 1), 0); /* 3 pages */
    take_snap(p, s, &a);
    cr_assert_eq(kvp_begin(s, 32, 32, 1, err, sizeof err), -ENOSPC);
    cr_assert(strstr(err, "exhausted") != NULL, "%s", err);
    cr_assert(!kvp_seq_step(s)->active);
    take_snap(p, s, &b);
    assert_same(&a, &b);
    kvp_seq_destroy(s);
    kvp_pool_destroy(p);
    /* (2) pages are there, the re-quantization blocks are not */
    p = pool(&c, 3, 64);
    s = seq(p, 512);
    cr_assert_eq(step(s, 32, 1), 0);
    take_snap(p, s, &a);
    cr_assert_eq(kvp_begin(s, 32, 32, 1, err, sizeof err), -ENOSPC);
    take_snap(p, s, &b);
    assert_same(&a, &b);
    cr_assert(kvp_seq_warming(s), "still in warm-up: the chunk can be retried");
    kvp_seq_destroy(s);
    kvp_pool_destroy(p);
    /* (3) live blocks run out mid-chunk */
    p = pool(&c, 5, 64);
    s = seq(p, 512);
    cr_assert_eq(step(s, 32, 1), 0);
    cr_assert_eq(step(s, 32, 1), 0); /* 4 blocks */
    take_snap(p, s, &a);
    cr_assert_eq(kvp_begin(s, 64, 32, 1, err, sizeof err), -ENOSPC);
    take_snap(p, s, &b);
    assert_same(&a, &b);
    cr_assert_eq(kvp_seq_chunks(s), 2);
    check_ids(p, &s, 1);
    /* (4) a chunk after decode that does not fit leaves the tail run
     * open: the next decode token continues the same tail page */
    cr_assert_eq(step(s, 1, 0), 0);
    cr_assert_eq(step(s, 1, 0), 0);
    take_snap(p, s, &a);
    cr_assert_eq(kvp_begin(s, 66, 32, 1, err, sizeof err), -ENOSPC);
    take_snap(p, s, &b);
    assert_same(&a, &b);
    const kvp_step *st = begin_ok(s, 1, 0);
    tgt_is(&st->tgt[0], KVP_PAGE, 2, 0, 1, 1);
    kvp_abort(s);
    kvp_seq_destroy(s);
    kvp_pool_destroy(p);
    /* (5) a full sequence */
    p = pool(&c, 64, 64);
    kvp_seq *t = seq(p, 40);
    cr_assert_eq(step(t, 32, 1), 0);
    take_snap(p, t, &a);
    cr_assert_eq(kvp_begin(t, 32, 9, 1, err, sizeof err), -ENOSPC);
    cr_assert(strstr(err, "sequence full") != NULL, "%s", err);
    take_snap(p, t, &b);
    assert_same(&a, &b);
    /* bad steps are -EINVAL and change nothing either */
    cr_assert_eq(kvp_begin(t, 7, 1, 0, err, sizeof err), -EINVAL);
    cr_assert_eq(kvp_begin(t, 32, 33, 1, err, sizeof err), -EINVAL);
    cr_assert_eq(kvp_begin(t, 32, 0, 1, err, sizeof err), -EINVAL);
    cr_assert_eq(kvp_begin(t, 32, 1, 1, err, sizeof err), 0);
    cr_assert_eq(kvp_begin(t, 33, 1, 1, err, sizeof err), -EINVAL, "a step is open");
    cr_assert_eq(kvp_finish_prefill(t, err, sizeof err), -EINVAL, "a step is open");
    kvp_abort(t);
    take_snap(p, t, &b);
    assert_same(&a, &b);
    check_ids(p, &t, 1);
    kvp_seq_destroy(t);
    kvp_pool_destroy(p);
}

Test(kv_plan, abort_returns_everything)
{
    cfg_kv c = cfg(CFG_KV_INT4);
    kvp_pool *p = pool(&c, 64, 64);
    kvp_seq *s = seq(p, 512);
    cr_assert_eq(step(s, 32, 1), 0);
    snap a, b;
    take_snap(p, s, &a);
    /* the warm-up end reserves pages and re-quantization blocks */
    const kvp_step *st = begin_ok(s, 32, 1);
    cr_assert_eq(st->n_rq, 4);
    int64_t qf, ff;
    kvp_pool_free_units(p, &qf, &ff);
    cr_assert_eq(qf, 60);
    cr_assert_eq(ff, 59);
    kvp_abort(s);
    cr_assert(!kvp_seq_step(s)->active);
    take_snap(p, s, &b);
    assert_same(&a, &b);
    kvp_abort(s); /* no step: no-op */
    kvp_commit(s, NULL, NULL);
    take_snap(p, s, &b);
    assert_same(&a, &b);
    /* reset with an open step returns the step and the entries */
    begin_ok(s, 32, 1);
    kvp_seq_reset(s);
    cr_assert_eq(kvp_seq_n_tokens(s), 0);
    cr_assert(kvp_seq_warming(s));
    kvp_pool_free_units(p, &qf, &ff);
    cr_assert_eq(qf, 64);
    cr_assert_eq(ff, 64);
    cr_assert_eq(kvp_pool_usage(p), 0.0);
    /* destroy with an open step too */
    cr_assert_eq(step(s, 32, 1), 0);
    begin_ok(s, 32, 1);
    kvp_seq_destroy(s);
    kvp_pool_free_units(p, &qf, &ff);
    cr_assert_eq(qf, 64);
    cr_assert_eq(ff, 64);
    kvp_seq_destroy(NULL);
    kvp_pool_destroy(p);
    kvp_pool_destroy(NULL);
}

/* Prefills n tokens in chunks (and the first decode token) in a pool large
 * enough; returns the peak of units held, reservations included. */
static void peak_of(const cfg_kv *c, int n, int64_t *pq, int64_t *pf)
{
    kvp_pool *p = pool(c, 4096, 4096);
    kvp_seq *s = seq(p, n + 8);
    int64_t tq, tf;
    kvp_pool_units(p, &tq, &tf);
    *pq = *pf = 0;
#define PEAK()                                                                              \
    do {                                                                                    \
        int64_t qf_, ff_;                                                                   \
        kvp_pool_free_units(p, &qf_, &ff_);                                                 \
        *pq = tq - qf_ > *pq ? tq - qf_ : *pq;                                              \
        *pf = tf - ff_ > *pf ? tf - ff_ : *pf;                                              \
    } while (0)
    for (int at = 0; at < n;) {
        int k = n - at < c->chunk_size ? n - at : c->chunk_size;
        cr_assert_eq(kvp_begin(s, at, k, 1, err, sizeof err), 0, "%s", err);
        PEAK();
        kvp_commit(s, NULL, NULL);
        at += k;
    }
    int rc = kvp_begin(s, n, 1, 0, err, sizeof err);
    if (rc == KVP_FINISH_PREFILL) {
        cr_assert_eq(kvp_finish_prefill(s, err, sizeof err), KVP_REQUANT, "%s", err);
        PEAK();
        kvp_commit(s, NULL, NULL);
        rc = kvp_begin(s, n, 1, 0, err, sizeof err);
    }
    cr_assert_eq(rc, 0, "%s", err);
    PEAK();
    kvp_commit(s, NULL, NULL);
#undef PEAK
    kvp_seq_destroy(s);
    kvp_pool_destroy(p);
}

Test(kv_plan, estimate_bounds_the_peak)
{
    const int sinks[] = {0, 4, 20, 40};
    const int warm[] = {0, 1, 2, 3};
    const int blocks[][2] = {{16, 32}, {32, 64}, {16, 64}, {64, 64}}; /* T, C */
    int cases = 0;
    for (int mode = 0; mode < 2; mode++)
        for (size_t bi = 0; bi < 4; bi++)
            for (size_t si = 0; si < 4; si++)
                for (size_t wi = 0; wi < 4; wi++)
                    for (int keep = 0; keep < 2; keep++) {
                        cfg_kv c = cfg(mode ? CFG_KV_INT4 : CFG_KV_FP16);
                        c.block_tokens = blocks[bi][0];
                        c.chunk_size = blocks[bi][1];
                        c.sink_tokens = sinks[si];
                        c.warmup_chunks = warm[wi];
                        c.keep_warmup_fp16 = keep;
                        for (int n = 1; n <= 300; n += n < 70 ? 1 : 7) {
                            int64_t eq, ef, pq, pf;
                            kvp_estimate(&c, n, &eq, &ef);
                            peak_of(&c, n, &pq, &pf);
                            cr_assert_leq(pq, eq,
                                          "blocks: peak %lld > estimate %lld (n %d, T %d, C %d,"
                                          " sinks %d, W %d, keep %d, mode %d)",
                                          (long long)pq, (long long)eq, n, c.block_tokens,
                                          c.chunk_size, c.sink_tokens, c.warmup_chunks, keep,
                                          mode);
                            cr_assert_leq(pf, ef,
                                          "pages: peak %lld > estimate %lld (n %d, T %d, C %d,"
                                          " sinks %d, W %d, keep %d, mode %d)",
                                          (long long)pf, (long long)ef, n, c.block_tokens,
                                          c.chunk_size, c.sink_tokens, c.warmup_chunks, keep,
                                          mode);
                            cases++;
                        }
                    }
    cr_assert_gt(cases, 1000);
}

Test(kv_plan, fp16_mode)
{
    cfg_kv c = cfg(CFG_KV_FP16);
    kvp_pool *p = pool(&c, 99, 16);
    int64_t tq, tf;
    kvp_pool_units(p, &tq, &tf);
    cr_assert_eq(tq, 0, "no blocks in fp16 mode");
    cr_assert_null(kvp_pool_layout(p));
    cr_assert_eq(kvp_pool_page_tokens(p), 16, "pages are the blocks");
    kvp_seq *s = seq(p, 256);
    const kvp_step *st = begin_ok(s, 32, 1);
    cr_assert(!st->stats, "no statistics in fp16 mode");
    cr_assert_eq(st->row_stats, 0);
    cr_assert_eq(st->rq, KVP_RQ_NONE);
    cr_assert_eq(st->n_tgt, 2);
    kvp_commit(s, NULL, NULL);
    cr_assert(!kvp_seq_warming(s));
    cr_assert_eq(step(s, 5, 1), 0);
    for (int i = 0; i < 20; i++) {
        st = begin_ok(s, 1, 0);
        cr_assert_eq(st->rq, KVP_RQ_NONE, "no tail re-quantization");
        kvp_commit(s, NULL, NULL);
    }
    cr_assert_eq(kvp_finish_prefill(s, err, sizeof err), 0);
    int nq, nf;
    check_cover(s, &nq, &nf);
    cr_assert_eq(nq, 0);
    cr_assert_eq(nf, 4, "57 tokens in pages of 16");
    kvc_stats st_s;
    memset(&st_s, 0, sizeof st_s);
    kvp_seq_add_stats(s, KVC_LAYER_GLOBAL, &st_s);
    cr_assert_eq(kvp_seq_held_tokens(s), 57);
    cr_assert_eq(st_s.layer_kind[KVC_LAYER_GLOBAL].tokens, 57);
    cr_assert_eq(st_s.fpages_used, 4);
    cr_assert_eq(st_s.bytes_total, 4 * 16 * 2 * 16 * 2 * 2);
    cr_assert_eq(st_s.bytes_fp16_equiv, 57 * 2 * 16 * 2 * 2);
    int64_t eq, ef;
    kvp_estimate(&c, 57, &eq, &ef);
    cr_assert_eq(eq, 0);
    cr_assert_eq(ef, 5);
    check_ids(p, &s, 1);
    kvp_seq_destroy(s);
    kvp_pool_destroy(p);
}

Test(kv_plan, pool_bookkeeping)
{
    cfg_kv c = cfg(CFG_KV_INT4);
    kvp_pool *p = pool(&c, 8, 8);
    size_t qb, fb;
    kvp_pool_unit_bytes(p, &qb, &fb);
    cr_assert_eq(fb, (size_t)16 * 16 * 2 * 2 * 2);
    cr_assert_eq(qb, kvp_pool_layout(p)->bytes * 2);
    cr_assert_eq(kvp_pool_capacity_bytes(p), (int64_t)(8 * qb + 8 * fb));
    kvp_seq *s = seq(p, 512);
    cr_assert_eq(step(s, 32, 1), 0);
    cr_assert_eq(step(s, 32, 1), 0);
    double u = kvp_pool_usage(p);
    cr_assert_float_eq(u, (4.0 * (double)qb + 1.0 * (double)fb) / (8.0 * (double)(qb + fb)),
                       1e-12);
    kvc_stats ss, ps;
    memset(&ss, 0, sizeof ss);
    kvp_seq_add_stats(s, KVC_LAYER_GLOBAL, &ss);
    ss.tokens = kvp_seq_n_tokens(s);
    cr_assert_eq(ss.qblocks_used, 4);
    cr_assert_eq(ss.fpages_used, 1);
    cr_assert_eq(ss.bytes_total, (int64_t)(4 * qb + fb));
    memset(&ps, 0, sizeof ps);
    kvp_stats_add_counts(&ps, &ss);
    kvp_pool_add_stats(p, KVC_LAYER_GLOBAL, &ps);
    cr_assert_eq(ps.qblocks_total, 8);
    cr_assert_eq(ps.fpages_total, 8);
    cr_assert_eq(ps.bytes_total, ss.bytes_total);
    cr_assert_eq(ps.bytes_fp16_equiv, 64 * 2 * 16 * 2 * 2);
    cr_assert_eq(ps.layer_kind[KVC_LAYER_GLOBAL].bytes_total, ps.bytes_total);
    cr_assert_eq(ps.layer_kind[KVC_LAYER_GLOBAL].layers, 2);
    cr_assert_eq(ps.layer_kind[KVC_LAYER_WINDOW].bytes_total, 0);
    kvp_seq_destroy(s);
    kvp_pool_destroy(p);
    /* bad inputs are reasons, not crashes */
    kvp_pool *q = NULL;
    kvc_dims bad = {2, 16, 0, NULL};
    cr_assert_eq(kvp_pool_create(&c, &bad, 0, 8, 8, &q, err, sizeof err), -EINVAL);
    cr_assert_null(q);
    cr_assert_eq(kvp_pool_create(&c, &dims, 0, 8, 0, &q, err, sizeof err), -EINVAL);
    cr_assert_eq(kvp_pool_create(&c, &dims, -1, 8, 8, &q, err, sizeof err), -EINVAL);
    c.chunk_size = 24; /* not a multiple of block_tokens */
    cr_assert_eq(kvp_pool_create(&c, &dims, 0, 8, 8, &q, err, sizeof err), -EINVAL);
    cr_assert(strstr(err, "multiple") != NULL, "%s", err);
    kvc_pool_sizes sz;
    cr_assert_eq(kvp_pool_size(&c, &dims, 1024, 1, &sz, err, sizeof err), -EINVAL);
    c = cfg(CFG_KV_INT4);
    cr_assert_eq(kvp_pool_size(&c, &dims, 1024, 4, &sz, err, sizeof err), 0, "%s", err);
    int64_t nq = sz.n_qblocks[KVC_LAYER_GLOBAL], nf = sz.n_fpages[KVC_LAYER_GLOBAL];
    /* a pool of that size holds 4 sequences of the whole context */
    p = pool(&c, nq, nf);
    kvp_seq *seqs[4];
    for (int i = 0; i < 4; i++) {
        seqs[i] = seq(p, 1024);
        for (int at = 0; at < 1024; at += 32)
            cr_assert_eq(step(seqs[i], 32, 1), 0, "seq %d at %d: %s", i, at, err);
        for (int j = 0; j < 16; j++)
            cr_assert_eq(step(seqs[i], 1, 0), -ENOSPC, "the sequence is full");
    }
    check_ids(p, seqs, 4);
    for (int i = 0; i < 4; i++)
        kvp_seq_destroy(seqs[i]);
    kvp_pool_destroy(p);
}

Test(kv_plan, live_sequence_list)
{
    cfg_kv c = cfg(CFG_KV_INT4);
    kvp_pool *p = pool(&c, 8, 8);
    int owners[3];
    kvp_seq *s[3];
    for (int i = 0; i < 3; i++)
        cr_assert_eq(kvp_seq_create(p, 64, &owners[i], &s[i], err, sizeof err), 0);
    kvp_seq_destroy(s[1]);
    int seen = 0;
    for (kvp_seq *q = kvp_pool_next_seq(p, NULL); q; q = kvp_pool_next_seq(p, q)) {
        cr_assert(kvp_seq_owner(q) == &owners[0] || kvp_seq_owner(q) == &owners[2]);
        seen++;
    }
    cr_assert_eq(seen, 2);
    kvp_seq_destroy(s[2]);
    kvp_seq_destroy(s[0]);
    cr_assert_null(kvp_pool_next_seq(p, NULL));
    kvp_pool_destroy(p);
}

/* ---- window pools (sliding-window layers) ---- */

static kvp_pool *wpool(const cfg_kv *c, int window, int64_t nq, int64_t nf)
{
    kvp_pool *p = NULL;
    cr_assert_eq(kvp_pool_create(c, &dims, window, nq, nf, &p, err, sizeof err), 0, "%s", err);
    cr_assert_eq(kvp_pool_window(p), window);
    return p;
}

/* A window sequence after a commit: its entries cover [first, n_tokens)
 * in order, reach back to the next query's window (first <= max(0, n - W
 * + 1)), and the oldest one is still visible unless it belongs to a run
 * that is kept whatever the window (staged before its re-quantization, or
 * the decode tail: `kept` says whether such a run may exist). */
static void check_window_cover(const kvp_seq *s, int W, int kept)
{
    int n;
    const kvp_ent *e = kvp_seq_entries(s, &n);
    const int nt = kvp_seq_n_tokens(s), live = nt - W + 1;
    if (n == 0) {
        cr_assert(W == 1 || nt == 0, "%d tokens, window %d, no entry", nt, W);
        return;
    }
    int pos = e[0].pos0;
    cr_assert_leq(pos, live > 0 ? live : 0, "entries start at %d, the window at %d", pos, live);
    if (!kept)
        cr_assert_geq(e[0].pos0 + e[0].n - 1, live, "entry [%d, +%d) is wholly before %d",
                      e[0].pos0, e[0].n, live);
    for (int i = 0; i < n; i++) {
        cr_assert_eq(e[i].pos0, pos, "entry %d starts at %d, expected %d", i, e[i].pos0, pos);
        cr_assert_gt(e[i].n, 0);
        pos += e[i].n;
    }
    cr_assert_eq(pos, nt);
    cr_assert_eq(kvp_seq_held_tokens(s), nt - e[0].pos0);
}

/* Units held now (entries and an open step's reservations). */
static void held_units(const kvp_pool *p, int64_t *q, int64_t *f)
{
    int64_t tq, tf, fq, ff;
    kvp_pool_units(p, &tq, &tf);
    kvp_pool_free_units(p, &fq, &ff);
    *q = tq - fq;
    *f = tf - ff;
}

/* on_block with a window: blocks enter once and leave once. */
typedef struct {
    int in[256], out[256];
} block_log;

static void log_cb(void *ctx, int32_t id, int added)
{
    block_log *b = ctx;
    if (added)
        b->in[id]++;
    else
        b->out[id]++;
}

Test(kv_plan, window_fp16_frees_pages_the_window_passed)
{
    cfg_kv c = cfg(CFG_KV_FP16); /* pages of 16 = blocks */
    const int W = 40;
    kvp_pool *p = wpool(&c, W, 0, 64);
    kvp_seq *s = seq(p, 4096);
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(step(s, 32, 1), 0, "%s", err);
        check_window_cover(s, W, 0);
    }
    /* 96 tokens: the window [57, 96) touches pages [48, 64) .. [80, 96) */
    int n;
    const kvp_ent *e = kvp_seq_entries(s, &n);
    cr_assert_eq(n, 3);
    cr_assert_eq(e[0].pos0, 48);
    for (int i = 0; i < 300; i++) {
        cr_assert_eq(step(s, 1, 0), 0, "%s", err);
        check_window_cover(s, W, 0);
        int64_t q, f;
        held_units(p, &q, &f);
        cr_assert_leq(f, 4, "at most ceil(39 / 16) + 1 pages after a step, %lld held", (long long)f);
    }
    check_ids(p, &s, 1);
    kvp_seq_destroy(s);
    int64_t fq, ff;
    kvp_pool_free_units(p, &fq, &ff);
    cr_assert_eq(ff, 64);
    kvp_pool_destroy(p);
}

Test(kv_plan, window_int4_sinks_go_staging_and_tail_stay)
{
    cfg_kv c = cfg(CFG_KV_INT4); /* C 32, T 16, P 16, 2 warm-up chunks, 4 sinks */
    const int W = 24;
    kvp_pool *p = wpool(&c, W, 64, 64);
    kvp_seq *s = seq(p, 4096);
    block_log bl;
    memset(&bl, 0, sizeof bl);
    /* chunk 0: sinks + staging; the window (9..32) already passed the sinks
     * and the first staged page, but the staged run waits for its
     * re-quantization */
    cr_assert_eq(kvp_begin(s, 0, 32, 1, err, sizeof err), 0, "%s", err);
    kvp_commit(s, log_cb, &bl);
    check_window_cover(s, W, 1);
    int n;
    const kvp_ent *e = kvp_seq_entries(s, &n);
    cr_assert_eq(e[0].pos0, 4, "the sink page [0, 4) went: its last position is before 9");
    cr_assert_eq(n, 2, "both staged pages stay until the re-quantization");
    /* chunk 1 ends warm-up: only the staged tokens a later query can see
     * (from the page holding position 64 - 24 + 1 = 41) are re-quantized */
    const kvp_step *st = begin_ok(s, 32, 1);
    cr_assert_eq(st->rq, KVP_RQ_WARMUP);
    cr_assert_eq(st->rq_pos0, 36, "staged pages [4, 20) and [20, 36) are left out");
    cr_assert_eq(st->rq_tokens, 64 - 36);
    cr_assert_eq(st->n_rq, 2);
    kvp_commit(s, log_cb, &bl);
    check_window_cover(s, W, 0);
    e = kvp_seq_entries(s, &n);
    cr_assert_eq(n, 2);
    cr_assert_eq(e[0].kind, KVP_BLOCK);
    cr_assert_eq(e[0].pos0, 36);
    /* live chunks: each commit frees what the window passed */
    for (int i = 0; i < 5; i++) {
        cr_assert_eq(kvp_begin(s, kvp_seq_n_tokens(s), 32, 1, err, sizeof err), 0, "%s", err);
        kvp_commit(s, log_cb, &bl);
        check_window_cover(s, W, 0);
    }
    /* decode with a window shorter than a block: the tail's pages stay even
     * when the window has passed them, until the tail is re-quantized */
    kvp_pool_destroy(NULL);
    kvp_seq_destroy(s);
    kvp_pool_destroy(p);
    const int W2 = 5;
    p = wpool(&c, W2, 64, 64);
    s = seq(p, 4096);
    memset(&bl, 0, sizeof bl);
    for (int i = 0; i < 3; i++) {
        int rc = kvp_begin(s, kvp_seq_n_tokens(s), 32, 1, err, sizeof err);
        cr_assert_eq(rc, 0, "%s", err);
        kvp_commit(s, log_cb, &bl);
    }
    for (int i = 0; i < 40; i++) {
        int pos0 = kvp_seq_n_tokens(s);
        int rc = kvp_begin(s, pos0, 1, 0, err, sizeof err);
        cr_assert_eq(rc, 0, "%s", err);
        st = kvp_seq_step(s);
        int tail_rq = st->rq == KVP_RQ_TAIL;
        kvp_commit(s, log_cb, &bl);
        check_window_cover(s, W2, 1);
        e = kvp_seq_entries(s, &n);
        int tail = (pos0 + 1 - 96) % 16; /* tokens in the tail after the step */
        int tail0 = pos0 + 1 - tail, live = pos0 + 1 - W2 + 1;
        if (tail_rq)
            cr_assert_eq(tail, 0);
        else
            cr_assert_leq(e[0].pos0, tail0, "step %d: the tail from %d stays whole (entries "
                          "from %d)", i, tail0, e[0].pos0);
        if (e[0].pos0 + e[0].n - 1 < live) /* passed by the window: only a tail page */
            cr_assert(e[0].kind == KVP_PAGE && e[0].pos0 == tail0,
                      "step %d: entry [%d, +%d) kept, the window starts at %d", i, e[0].pos0,
                      e[0].n, live);
    }
    check_ids(p, &s, 1);
    /* every block that entered left once, or is still held */
    e = kvp_seq_entries(s, &n);
    int held[64] = {0};
    for (int i = 0; i < n; i++)
        if (e[i].kind == KVP_BLOCK)
            held[e[i].id] = 1;
    for (int id = 0; id < 64; id++)
        cr_assert(bl.in[id] - bl.out[id] == held[id] && bl.out[id] <= bl.in[id],
                  "block %d: in %d out %d held %d", id, bl.in[id], bl.out[id], held[id]);
    kvp_seq_destroy(s);
    kvp_pool_destroy(p);
}

/* Runs a window sequence through the engine's steps (aligned chunks of an
 * n-token prompt, then `dec` decode steps) and checks every reservation
 * and every state after a commit against kvp_window_need. */
static void window_run(const cfg_kv *c, int W, int n, int dec, int n_ctx)
{
    int64_t hq, hf, pq, pf;
    kvp_window_need(c, W, n_ctx, &hq, &hf, &pq, &pf);
    cr_assert(hq <= pq && hf <= pf);
    kvp_pool *p = wpool(c, W, 4096, 4096);
    kvp_seq *s = seq(p, n + dec + 8);
    int64_t q, f;
    char what[200];
    snprintf(what, sizeof what, "mode %d W %d n %d T %d C %d S %d K %d keep %d", (int)c->mode, W,
             n, c->block_tokens, c->chunk_size, c->sink_tokens, c->warmup_chunks,
             c->keep_warmup_fp16);
    for (int at = 0; at < n;) {
        int k = n - at < c->chunk_size ? n - at : c->chunk_size;
        cr_assert_eq(kvp_begin(s, at, k, 1, err, sizeof err), 0, "%s: %s", what, err);
        held_units(p, &q, &f);
        cr_assert(q <= pq && f <= pf, "%s: chunk at %d holds %lld blocks / %lld pages, peak "
                  "bound %lld / %lld", what, at, (long long)q, (long long)f, (long long)pq,
                  (long long)pf);
        kvp_commit(s, NULL, NULL);
        at += k;
    }
    for (int i = 0; i < dec; i++) {
        int pos0 = kvp_seq_n_tokens(s);
        int rc = kvp_begin(s, pos0, 1, 0, err, sizeof err);
        if (rc == KVP_FINISH_PREFILL) {
            cr_assert_eq(kvp_finish_prefill(s, err, sizeof err), KVP_REQUANT, "%s", err);
            held_units(p, &q, &f);
            cr_assert(q <= pq && f <= pf, "%s: finish_prefill holds %lld / %lld, bound %lld "
                      "/ %lld", what, (long long)q, (long long)f, (long long)pq, (long long)pf);
            kvp_commit(s, NULL, NULL);
            rc = kvp_begin(s, pos0, 1, 0, err, sizeof err);
        }
        cr_assert_eq(rc, 0, "%s: %s", what, err);
        held_units(p, &q, &f);
        cr_assert(q <= hq && f <= hf, "%s: decode at %d holds %lld blocks / %lld pages, hold "
                  "bound %lld / %lld", what, pos0, (long long)q, (long long)f, (long long)hq,
                  (long long)hf);
        kvp_commit(s, NULL, NULL);
        check_window_cover(s, W, 1);
    }
    check_ids(p, &s, 1);
    kvp_seq_destroy(s);
    kvp_pool_destroy(p);
}

/* Bounded memory: a window layer's units stay within kvp_window_need over
 * 20 chunks and 300 decode steps, and over many configurations and prompt
 * lengths (the engine's steps: aligned chunks, then decode). */
Test(kv_plan, window_units_stay_bounded, .timeout = 120)
{
    cfg_kv c = cfg(CFG_KV_INT4);
    window_run(&c, 40, 20 * 32, 300, 4096);
    c.mode = CFG_KV_FP16;
    window_run(&c, 40, 20 * 32, 300, 4096);
    static const int wins[] = {1, 2, 7, 16, 33, 64, 100};
    static const int blocks[][2] = {{16, 32}, {16, 64}, {32, 64}}; /* T, C */
    int cases = 0;
    for (int mode = 0; mode < 2; mode++)
        for (size_t bi = 0; bi < 3; bi++)
            for (int warm = 0; warm < 3; warm++)
                for (int keep = 0; keep < 2; keep++)
                    for (size_t wi = 0; wi < sizeof wins / sizeof wins[0]; wi++) {
                        c = cfg(mode ? CFG_KV_INT4 : CFG_KV_FP16);
                        c.block_tokens = blocks[bi][0];
                        c.chunk_size = blocks[bi][1];
                        c.warmup_chunks = warm;
                        c.keep_warmup_fp16 = keep;
                        c.sink_tokens = (int)wi % 3 == 0 ? 0 : (int)wi % 3 == 1 ? 4 : 20;
                        for (int n = 1; n <= 260; n += n < 40 ? 3 : 17) {
                            window_run(&c, wins[wi], n, 2 * c.block_tokens + 5, 4096);
                            cases++;
                        }
                    }
    cr_assert_gt(cases, 1000);
}

/* The two groups of a sequence begin all or nothing: when the window
 * group cannot hold the step, the global group's reservation is returned
 * (free lists in their exact order), and an abort of both restores them. */
static int no_finish(void *ctx, int g, char *e, size_t el)
{
    (void)ctx, (void)g, (void)e, (void)el;
    cr_assert_fail("no prefill ends here");
    return -EINVAL;
}

Test(kv_plan, groups_begin_all_or_nothing)
{
    cfg_kv c = cfg(CFG_KV_INT4);
    cfg_kv wc = c;
    wc.mode = CFG_KV_FP16;
    kvp_pool *g = pool(&c, 64, 64);
    kvp_pool *w = wpool(&wc, 40, 0, 3); /* 3 pages of 16: 48 positions */
    kvp_seq *s[2] = {seq(g, 4096), seq(w, 4096)};
    cr_assert_eq(kvp_begin_groups(s, 2, 0, 32, 1, no_finish, NULL, err, sizeof err), 0, "%s",
                 err);
    kvp_commit(s[0], NULL, NULL);
    kvp_commit(s[1], NULL, NULL);
    snap a0, b0, a1, b1;
    take_snap(g, s[0], &a0);
    take_snap(w, s[1], &b0);
    /* the window group holds 2 pages and 1 is free: 32 more tokens need 2 */
    int rc = kvp_begin_groups(s, 2, 32, 32, 1, no_finish, NULL, err, sizeof err);
    cr_assert_eq(rc, -ENOSPC, "%d %s", rc, err);
    cr_assert(!kvp_seq_step(s[0])->active && !kvp_seq_step(s[1])->active);
    take_snap(g, s[0], &a1);
    take_snap(w, s[1], &b1);
    assert_same(&a0, &a1);
    assert_same(&b0, &b1);
    /* a step both can hold, aborted: everything as before */
    cr_assert_eq(kvp_begin_groups(s, 2, 32, 8, 1, no_finish, NULL, err, sizeof err), 0, "%s",
                 err);
    kvp_abort(s[0]);
    kvp_abort(s[1]);
    take_snap(g, s[0], &a1);
    take_snap(w, s[1], &b1);
    assert_same(&a0, &a1);
    assert_same(&b0, &b1);
    kvp_seq_destroy(s[0]);
    kvp_seq_destroy(s[1]);
    kvp_pool_destroy(g);
    kvp_pool_destroy(w);
}

/* The layer groups of a Gemma-3-like model, and a pool sized for them:
 * the window group is reserved per sequence (kvp_window_need), a byte
 * budget pays for it first. */
Test(kv_plan, layer_groups_and_sizing)
{
    int32_t win[6] = {8, 8, 8, 8, 8, 0};
    kvc_dims d = {6, 16, 8, win};
    cfg_kv c = cfg(CFG_KV_INT4);
    kvp_groups gr;
    int32_t group[6], local[6];
    kvp_layer_groups(&c, &d, &gr, group, local);
    cr_assert_eq(gr.n_layers[KVC_LAYER_GLOBAL], 1);
    cr_assert_eq(gr.n_layers[KVC_LAYER_WINDOW], 5);
    cr_assert_eq(gr.window, 8);
    cr_assert_eq(group[5], KVC_LAYER_GLOBAL);
    cr_assert_eq(local[5], 0);
    cr_assert_eq(group[3], KVC_LAYER_WINDOW);
    cr_assert_eq(local[3], 3);
    cr_assert_eq(gr.cfg[KVC_LAYER_WINDOW].mode, CFG_KV_FP16, "window_kv fp16 (the default)");
    cr_assert_eq(gr.cfg[KVC_LAYER_GLOBAL].mode, CFG_KV_INT4);
    cr_assert_eq(gr.dims[KVC_LAYER_WINDOW].n_layers, 5);
    c.window_kv = CFG_KV_INT4;
    kvp_layer_groups(&c, &d, &gr, NULL, NULL);
    cr_assert_eq(gr.cfg[KVC_LAYER_WINDOW].mode, CFG_KV_INT4);
    cr_assert_eq(gr.cfg[KVC_LAYER_WINDOW].k_bits, 4);
    c.window_bits = 8; /* window_kv = int8: the window group's width only */
    c.block_tokens = 64;
    c.chunk_size = 128;
    kvp_layer_groups(&c, &d, &gr, NULL, NULL);
    cr_assert_eq(gr.cfg[KVC_LAYER_WINDOW].k_bits, 8);
    cr_assert_eq(gr.cfg[KVC_LAYER_WINDOW].v_bits, 8);
    cr_assert_eq(gr.cfg[KVC_LAYER_WINDOW].block_tokens, 16, "small window blocks");
    cr_assert_eq(gr.cfg[KVC_LAYER_GLOBAL].k_bits, 4);
    cr_assert_eq(gr.cfg[KVC_LAYER_GLOBAL].block_tokens, 64);
    c.mode = CFG_KV_FP16; /* fp16 everywhere whatever window_kv says */
    kvp_layer_groups(&c, &d, &gr, NULL, NULL);
    cr_assert_eq(gr.cfg[KVC_LAYER_WINDOW].mode, CFG_KV_FP16);

    c = cfg(CFG_KV_INT4);
    kvc_pool_sizes sz;
    cr_assert_eq(kvp_pool_size(&c, &d, 1024, 4, &sz, err, sizeof err), 0, "%s", err);
    int64_t hq, hf, pq, pf;
    kvp_layer_groups(&c, &d, &gr, NULL, NULL);
    kvp_window_need(&gr.cfg[KVC_LAYER_WINDOW], 8, 1024, &hq, &hf, &pq, &pf);
    cr_assert_eq(sz.n_qblocks[KVC_LAYER_WINDOW], 4 * hq + 2 * (pq - hq));
    cr_assert_eq(sz.n_fpages[KVC_LAYER_WINDOW], 4 * hf + 2 * (pf - hf));
    cr_assert_eq(sz.n_qblocks[KVC_LAYER_WINDOW], 0, "fp16 window layers: pages only");
    cr_assert_gt(sz.n_qblocks[KVC_LAYER_GLOBAL], 0);
    /* the window group does not grow with the context; the global one does */
    kvc_pool_sizes big;
    cr_assert_eq(kvp_pool_size(&c, &d, 8192, 4, &big, err, sizeof err), 0, "%s", err);
    cr_assert_eq(big.n_fpages[KVC_LAYER_WINDOW], sz.n_fpages[KVC_LAYER_WINDOW]);
    cr_assert_gt(big.n_qblocks[KVC_LAYER_GLOBAL], sz.n_qblocks[KVC_LAYER_GLOBAL]);
    /* a byte budget: the window layers first, the rest buys global blocks */
    c.kv_budget_bytes = 1 << 20;
    kvc_pool_sizes bud;
    cr_assert_eq(kvp_pool_size(&c, &d, 8192, 4, &bud, err, sizeof err), 0, "%s", err);
    cr_assert_eq(bud.n_fpages[KVC_LAYER_WINDOW], sz.n_fpages[KVC_LAYER_WINDOW]);
    c.kv_budget_bytes = 4096;
    cr_assert_eq(kvp_pool_size(&c, &d, 8192, 4, &bud, err, sizeof err), -EINVAL);
    cr_assert(strstr(err, "window layers") != NULL, "%s", err);
    /* only window layers: no global group */
    int32_t all[2] = {8, 8};
    kvc_dims d2 = {2, 16, 8, all};
    c = cfg(CFG_KV_INT4);
    cr_assert_eq(kvp_pool_size(&c, &d2, 1024, 2, &sz, err, sizeof err), 0, "%s", err);
    cr_assert_eq(sz.n_qblocks[KVC_LAYER_GLOBAL] + sz.n_fpages[KVC_LAYER_GLOBAL], 0);
    cr_assert_gt(sz.n_fpages[KVC_LAYER_WINDOW], 0);
}

/* The units a set of sequences holds in a shared pool never overlap: each
 * covers [id * stride, id * stride + its bytes) of the one arena, inside
 * it. Returns the bytes held. */
static int64_t check_shared_disjoint(const kvp_pool *p, kvp_seq **seqs, int n_seqs)
{
    size_t qa, fa, qs, fs;
    kvp_pool_arena(p, &qa, &fa, &qs, &fs);
    cr_assert_eq(fa, 0, "a shared pool has one arena");
    cr_assert_eq(qs, fs);
    unsigned char *used = calloc(qa, 1);
    int64_t held = 0;
    size_t qb, fb;
    kvp_pool_unit_bytes(p, &qb, &fb);
    for (int j = 0; j < n_seqs; j++) {
        int n;
        const kvp_ent *e = kvp_seq_entries(seqs[j], &n);
        const kvq_layout *L = kvp_seq_layout(seqs[j]);
        for (int i = 0; i < n; i++) {
            size_t b = e[i].kind == KVP_BLOCK ? L->bytes * (size_t)kvp_pool_dims(p)->n_layers
                                              : fb;
            size_t off = (size_t)e[i].id * qs;
            cr_assert_leq(off + b, qa, "unit %d past the arena", e[i].id);
            for (size_t k = 0; k < b; k++) {
                cr_assert_eq(used[off + k], 0, "byte %zu held twice", off + k);
                used[off + k] = 1;
            }
            held += (int64_t)b;
        }
    }
    free(used);
    return held;
}

/* A pool of several modes (kv_modes) is shared: each sequence plans by
 * its own mode (fp16 pages, or blocks of its own widths) from one arena of
 * slabs, the units of different sequences never overlap, and a failure
 * changes nothing (the same step again gets the same ids). */
Test(kv_plan, mixed_pool_modes_per_sequence)
{
    cfg_kv c = cfg(CFG_KV_INT4);
    int i3;
    cr_assert_eq(cfg_kv_mode_parse("int3", &i3), 0);
    c.modes = (1u << CFG_KV_FP16) | (1u << CFG_KV_INT4) | (1u << i3);
    cfg_kv c32 = cfg(CFG_KV_FP16);
    c32.block_tokens = 32;
    cr_assert_eq(kvp_page_tokens(&c32), 32, "an fp16-only pool: pages are the blocks");
    c32.modes = c.modes;
    cr_assert_eq(kvp_page_tokens(&c32), 16, "a mixed pool: the INT4 page size for all");

    kvp_pool *p = pool(&c, 16, 12);
    cr_assert(kvp_pool_shared(p));
    kvp_seq *s[3] = {seq(p, 256), seq(p, 256), seq(p, 256)}; /* fp16, int4 (default), int3 */
    cr_assert_eq(kvp_seq_mode(s[1]), CFG_KV_INT4);
    cr_assert_eq(kvp_seq_set_mode(s[0], CFG_KV_FP16, err, sizeof err), 0, "%s", err);
    cr_assert_eq(kvp_seq_set_mode(s[2], i3, err, sizeof err), 0, "%s", err);
    cr_assert_eq(kvp_seq_mode(s[0]), CFG_KV_FP16);
    cr_assert_null(kvp_seq_layout(s[0]));
    const kvq_layout *L4 = kvp_seq_layout(s[1]), *L3 = kvp_seq_layout(s[2]);
    cr_assert(L4 && L3 && L4->k_bits == 4 && L3->k_bits == 3 && L3->v_bits == 3);
    cr_assert_lt(L3->bytes, L4->bytes, "int3 blocks are smaller");
    const kvp_step *st = begin_ok(s[0], 32, 1);
    cr_assert(!st->stats, "an fp16 sequence gathers no statistics");
    cr_assert_eq(st->n_tgt, 2);
    cr_assert_eq(st->tgt[0].kind, KVP_PAGE);
    cr_assert_eq(st->tgt[1].kind, KVP_PAGE);
    kvp_commit(s[0], NULL, NULL);
    cr_assert_eq(kvp_seq_set_mode(s[0], CFG_KV_INT4, err, sizeof err), -EINVAL,
                 "the mode of a sequence that holds tokens stays");
    /* the quantized sequences: sinks + staging (pages), then live blocks */
    for (int k = 1; k <= 2; k++) {
        cr_assert_eq(step(s[k], 32, 1), 0);
        cr_assert_eq(step(s[k], 32, 1), 0);
        cr_assert_eq(step(s[k], 32, 1), 0);
        cr_assert(!kvp_seq_warming(s[k]));
        int nq, nf;
        check_cover(s[k], &nq, &nf);
        cr_assert_eq(nq, 6, "92 quantized tokens in blocks of 16");
        cr_assert_eq(nf, 1, "the sink page");
    }
    check_shared_disjoint(p, s, 3);
    /* the fp16 sequence takes what is left, then -ENOSPC changes nothing */
    while (step(s[0], 16, 1) == 0)
        ;
    int64_t fb0 = kvp_pool_free_bytes(p);
    int pos = kvp_seq_n_tokens(s[2]);
    int rc = kvp_begin(s[2], pos, 32, 1, err, sizeof err);
    if (rc == 0) { /* a slab of int3 blocks had room: abort, then the same ids again */
        int32_t ids[8];
        int nt = kvp_seq_step(s[2])->n_tgt;
        for (int i = 0; i < nt; i++)
            ids[i] = kvp_seq_step(s[2])->tgt[i].id;
        kvp_abort(s[2]);
        cr_assert_eq(kvp_pool_free_bytes(p), fb0);
        begin_ok(s[2], 32, 1);
        for (int i = 0; i < nt; i++)
            cr_assert_eq(kvp_seq_step(s[2])->tgt[i].id, ids[i], "abort restores the pool");
        kvp_abort(s[2]);
    } else {
        cr_assert_eq(rc, -ENOSPC);
        cr_assert(strstr(err, "shared pool"), "%s", err);
    }
    cr_assert_eq(kvp_pool_free_bytes(p), fb0, "a failed or aborted step changes nothing");
    check_shared_disjoint(p, s, 3);
    /* a fresh sequence may take another mode; an fp16-only pool holds no int4 */
    kvp_seq_reset(s[0]);
    cr_assert_eq(kvp_seq_mode(s[0]), CFG_KV_FP16, "reset keeps the mode");
    cr_assert_eq(kvp_seq_set_mode(s[0], CFG_KV_INT4, err, sizeof err), 0, "%s", err);
    int k2v2;
    cr_assert_eq(cfg_kv_mode_parse("int2", &k2v2), 0);
    cr_assert_eq(kvp_seq_set_mode(s[0], k2v2, err, sizeof err), -EINVAL, "not in kv_modes");
    cr_assert(strstr(err, "int2"), "%s", err);
    cfg_kv f = cfg(CFG_KV_FP16);
    kvp_pool *pf = pool(&f, 0, 4);
    cr_assert(!kvp_pool_shared(pf));
    kvp_seq *q = seq(pf, 64);
    cr_assert_eq(kvp_seq_set_mode(q, CFG_KV_INT4, err, sizeof err), -EINVAL);
    cr_assert(strstr(err, "int4"), "%s", err);
    kvp_seq_destroy(q);
    kvp_pool_destroy(pf);
    /* estimates by mode */
    int64_t eq, ef;
    cfg_kv c16 = cfg_kv_with_mode(&c, CFG_KV_FP16);
    kvp_estimate(&c16, 57, &eq, &ef);
    cr_assert_eq(eq, 0);
    cr_assert_eq(ef, 5);
    kvp_estimate(&c, 57, &eq, &ef);
    cr_assert_gt(eq, 0);
    for (int i = 0; i < 3; i++)
        kvp_seq_destroy(s[i]);
    cr_assert_eq(kvp_pool_free_bytes(p), kvp_pool_capacity_bytes(p), "all back");
    kvp_pool_destroy(p);
}

/* Fills a shared pool with sequences of mode m (chunks of 32, as many
 * as fit, each up to 256 tokens); returns how many tokens they hold. */
static int64_t fill_mode(int m, kvp_seq **s, int n_seqs)
{
    int64_t tokens = 0;
    for (int k = 0; k < n_seqs; k++) {
        cr_assert_eq(kvp_seq_set_mode(s[k], m, err, sizeof err), 0, "%s", err);
        while (kvp_seq_n_tokens(s[k]) + 32 <= 256 && step(s[k], 32, 1) == 0)
            ;
        tokens += kvp_seq_n_tokens(s[k]);
    }
    return tokens;
}

/* One shared pool: memory is interchangeable between modes. A pool filled
 * by fp16 sequences and emptied holds as many int4 (and int3) tokens as a
 * pool that never held fp16, and the other way round; almost every byte
 * is used by whichever mode fills it. */
Test(kv_plan, shared_pool_memory_moves_between_modes)
{
    cfg_kv c = cfg(CFG_KV_INT4);
    int i3;
    cr_assert_eq(cfg_kv_mode_parse("int3", &i3), 0);
    c.modes = (1u << CFG_KV_FP16) | (1u << CFG_KV_INT4) | (1u << i3);
    kvp_pool *p = pool(&c, 0, 64); /* the bytes of 64 pages */
    enum { NS = 24 };
    kvp_seq *s[NS];
    for (int k = 0; k < NS; k++)
        s[k] = seq(p, 256);
    const int64_t cap = kvp_pool_capacity_bytes(p);
    size_t qb, fb;
    kvp_pool_unit_bytes(p, &qb, &fb);
    int64_t tok[3][2];
    const int modes[3] = {CFG_KV_FP16, CFG_KV_INT4, i3};
    for (int round = 0; round < 2; round++)
        for (int mi = 0; mi < 3; mi++) {
            tok[mi][round] = fill_mode(modes[mi], s, NS);
            int64_t held = check_shared_disjoint(p, s, NS);
            cr_assert_gt(tok[mi][round], 0);
            /* the mode that fills the pool gets (almost) all of it: what is
             * left is less than a slab's worth per class plus a chunk */
            cr_assert_geq((double)held, 0.6 * (double)cap, "%s holds %lld of %lld bytes",
                          cfg_kv_mode_str(modes[mi]), (long long)held, (long long)cap);
            for (int k = 0; k < NS; k++)
                kvp_seq_reset(s[k]);
            cr_assert_eq(kvp_pool_free_bytes(p), cap, "every slab back after %s",
                         cfg_kv_mode_str(modes[mi]));
        }
    for (int mi = 0; mi < 3; mi++)
        cr_assert_eq(tok[mi][0], tok[mi][1], "%s holds the same after the others ran",
                     cfg_kv_mode_str(modes[mi]));
    /* (these dimensions are tiny: scales and outlier room weigh a lot) */
    cr_assert_gt(2 * tok[1][0], 3 * tok[0][0], "int4 holds 1.5x fp16's tokens: %lld %lld",
                 (long long)tok[1][0], (long long)tok[0][0]);
    cr_assert_geq(tok[2][0], tok[1][0], "int3 at least int4's: %lld %lld",
                  (long long)tok[2][0], (long long)tok[1][0]);
    /* and mixed: fp16 and int3 sequences side by side, then the fp16 ones
     * end and int4 ones take their memory */
    for (int k = 0; k < NS; k++)
        cr_assert_eq(kvp_seq_set_mode(s[k], k % 2 ? i3 : CFG_KV_FP16, err, sizeof err), 0);
    for (int r = 0; r < 8; r++)
        for (int k = 0; k < NS; k++)
            if (kvp_seq_n_tokens(s[k]) + 32 <= 256)
                step(s[k], 32, 1);
    check_shared_disjoint(p, s, NS);
    for (int k = 0; k < NS; k += 2) {
        kvp_seq_reset(s[k]);
        cr_assert_eq(kvp_seq_set_mode(s[k], CFG_KV_INT4, err, sizeof err), 0);
    }
    int64_t t4 = 0;
    for (int r = 0; r < 8; r++)
        for (int k = 0; k < NS; k += 2)
            if (kvp_seq_n_tokens(s[k]) + 32 <= 256 && step(s[k], 32, 1) == 0)
                t4 += 32;
    check_shared_disjoint(p, s, NS);
    cr_assert_gt(t4, 0, "int4 sequences got the memory the fp16 ones let go of");
    for (int k = 0; k < NS; k++)
        kvp_seq_destroy(s[k]);
    cr_assert_eq(kvp_pool_free_bytes(p), cap);
    kvp_pool_destroy(p);
}

/* A window group of a pool of several modes (window_kv int8, kv_modes
 * fp16,int4,int3) is a shared pool too: every quantized mode's window
 * layers take codes of window_bits (kvp_group_mode), so it holds FP16 pages
 * and int8 blocks; sized per sequence slot for the class that needs the
 * most, it holds a sequence of each global mode side by side through
 * chunks and decode, their units never overlap, and every slab comes
 * back. */
Test(kv_plan, shared_window_group)
{
    int32_t win[2] = {64, 0};
    kvc_dims d = {2, 16, 8, win};
    cfg_kv c = cfg(CFG_KV_INT4);
    c.window_kv = CFG_KV_INT4;
    c.window_bits = 8;
    int i3, i8;
    cr_assert_eq(cfg_kv_mode_parse("int3", &i3), 0);
    cr_assert_eq(cfg_kv_mode_parse("int8", &i8), 0);
    c.modes = (1u << CFG_KV_FP16) | (1u << CFG_KV_INT4) | (1u << i3);
    kvp_groups gr;
    kvp_layer_groups(&c, &d, &gr, NULL, NULL);
    const cfg_kv *wc = &gr.cfg[KVC_LAYER_WINDOW];
    cr_assert_eq(cfg_kv_mode_count(wc), 2, "the window group holds fp16 pages and int8 blocks");
    cr_assert_eq(kvp_group_mode(&c, KVC_LAYER_WINDOW, i3), i8);
    cr_assert_eq(kvp_group_mode(&c, KVC_LAYER_WINDOW, CFG_KV_INT4), i8);
    cr_assert_eq(kvp_group_mode(&c, KVC_LAYER_WINDOW, CFG_KV_FP16), CFG_KV_FP16);
    cr_assert_eq(kvp_group_mode(&c, KVC_LAYER_GLOBAL, i3), i3);
    kvc_pool_sizes sz;
    cr_assert_eq(kvp_pool_size(&c, &d, 512, 3, &sz, err, sizeof err), 0, "%s", err);
    kvp_pool *p = NULL;
    cr_assert_eq(kvp_pool_create(wc, &gr.dims[KVC_LAYER_WINDOW], gr.window,
                                 sz.n_qblocks[KVC_LAYER_WINDOW], sz.n_fpages[KVC_LAYER_WINDOW],
                                 &p, err, sizeof err), 0, "%s", err);
    cr_assert(kvp_pool_shared(p));
    const int modes[3] = {CFG_KV_FP16, CFG_KV_INT4, i3};
    kvp_seq *s[3];
    for (int k = 0; k < 3; k++) {
        s[k] = seq(p, 512);
        cr_assert_eq(kvp_seq_set_mode(s[k], kvp_group_mode(&c, KVC_LAYER_WINDOW, modes[k]), err,
                                      sizeof err), 0, "%s", err);
    }
    for (int t = 0; t < 7; t++) /* 224 prompt tokens, one sequence at a time per chunk */
        for (int k = 0; k < 3; k++)
            cr_assert_eq(step(s[k], 32, 1), 0, "%s chunk %d: %s", cfg_kv_mode_str(modes[k]), t,
                         err);
    for (int t = 0; t < 100; t++)
        for (int k = 0; k < 3; k++)
            cr_assert_eq(step(s[k], 1, 0), 0, "%s decode %d: %s", cfg_kv_mode_str(modes[k]), t,
                         err);
    check_shared_disjoint(p, s, 3);
    for (int k = 0; k < 3; k++) {
        cr_assert_leq(kvp_seq_held_tokens(s[k]), 64 + 32 + 16, "%s keeps about its window",
                      cfg_kv_mode_str(modes[k]));
        kvp_seq_destroy(s[k]);
    }
    cr_assert_eq(kvp_pool_free_bytes(p), kvp_pool_capacity_bytes(p));
    kvp_pool_destroy(p);
}

/* Sizing a pool of several modes: one shared arena where max_seqs
 * full-context sequences fit in any one of its modes; a byte budget is the
 * arena; a single-mode pool is sized exactly as before. */
Test(kv_plan, mixed_pool_sizing)
{
    cfg_kv c4 = cfg(CFG_KV_INT4), c16 = cfg(CFG_KV_FP16), cm = cfg(CFG_KV_INT4);
    cm.modes = (1u << CFG_KV_FP16) | (1u << CFG_KV_INT4);
    kvc_pool_sizes z4, z16, zm;
    cr_assert_eq(kvp_pool_size(&c4, &dims, 256, 4, &z4, err, sizeof err), 0, "%s", err);
    cr_assert_eq(kvp_pool_size(&c16, &dims, 256, 4, &z16, err, sizeof err), 0, "%s", err);
    cr_assert_eq(kvp_pool_size(&cm, &dims, 256, 4, &zm, err, sizeof err), 0, "%s", err);
    cr_assert_eq(zm.n_qblocks[0], 0, "a shared pool is sized in pages' bytes");
    kvp_pool *p = pool(&cm, zm.n_qblocks[0], zm.n_fpages[0]);
    int64_t cap = kvp_pool_capacity_bytes(p);
    int64_t q4, f4, f16, q16;
    kvp_estimate(&cm, 256, &q4, &f4);
    cfg_kv cm16 = cfg_kv_with_mode(&cm, CFG_KV_FP16);
    kvp_estimate(&cm16, 256, &q16, &f16);
    cr_assert_geq(cap, 4 * kvp_pool_cost(p, CFG_KV_INT4, q4, f4), "4 int4 sequences fit");
    cr_assert_geq(cap, 4 * kvp_pool_cost(p, CFG_KV_FP16, q16, f16), "4 fp16 sequences fit");
    cr_assert_eq(kvp_plan_cost(&cm, &dims, CFG_KV_INT4, q4, f4),
                 kvp_pool_cost(p, CFG_KV_INT4, q4, f4));
    cr_assert_eq(kvp_pool_fit(&cm, &dims, 256, 4, err, sizeof err), 4);
    kvp_pool_destroy(p);
    cm.kv_budget_bytes = 200000;
    cr_assert_eq(kvp_pool_size(&cm, &dims, 256, 4, &zm, err, sizeof err), 0, "%s", err);
    p = pool(&cm, zm.n_qblocks[0], zm.n_fpages[0]);
    cap = kvp_pool_capacity_bytes(p);
    cr_assert_leq(cap, 200000, "the budget holds: %lld", (long long)cap);
    cr_assert_gt(cap, 150000, "most of the budget is used: %lld", (long long)cap);
    kvp_pool_destroy(p);
    /* single-mode pools: the same sizes as before kv_modes existed */
    cr_assert_eq(z4.n_qblocks[0], 4 * ((256 + 15) / 16 + 2 + (256 + 31) / 32));
    cr_assert_eq(z16.n_qblocks[0], 0);
    cr_assert_eq(z16.n_fpages[0], 4 * ((256 + 15) / 16 + 1));
}

/* FP16 window layers hold pages of at most 16 tokens, not blocks of
 * block_tokens: a long sequence (Gemma-3's shape: blocks of 128, chunks of
 * 512, W 512) holds its last W - 1 positions plus less than two pages,
 * and the group's units stay within kvp_window_need over chunks and decode
 * (the global group keeps its blocks as pages in fp16 mode). */
Test(kv_plan, window_fp16_pages_are_small_and_bounded)
{
    int32_t win[3] = {512, 512, 0};
    kvc_dims d = {3, 16, 8, win};
    static const int modes[] = {CFG_KV_INT4, CFG_KV_FP16};
    for (int mi = 0; mi < 2; mi++) {
        cfg_kv c = cfg_kv_default();
        c.mode = modes[mi];
        c.block_tokens = 128;
        c.chunk_size = 512;
        c.window_kv = CFG_KV_FP16;
        kvp_groups gr;
        kvp_layer_groups(&c, &d, &gr, NULL, NULL);
        const cfg_kv *wc = &gr.cfg[KVC_LAYER_WINDOW];
        cr_assert_eq(wc->mode, CFG_KV_FP16);
        cr_assert_eq(kvp_page_tokens(wc), 16, "window pages of 16 tokens");
        cr_assert_eq(kvp_page_tokens(&gr.cfg[KVC_LAYER_GLOBAL]), mi ? 128 : 16,
                     "the global group keeps its pages");
        cr_assert_eq(kvp_unit_tokens(&c), 16);
        int64_t hq, hf, pq, pf;
        kvp_window_need(wc, 512, 32768, &hq, &hf, &pq, &pf);
        cr_assert_eq(hq + pq, 0);
        cr_assert_eq(hf, 34, "511 positions in pages of 16 plus two: %lld", (long long)hf);
        cr_assert_eq(pf, 65, "plus a chunk's 32 pages: %lld", (long long)pf);
        /* after a step: W - 1 positions plus less than two pages (the hold
         * adds a decode step's page) */
        cr_assert_leq((hf - 1) * 16, 512 - 1 + 2 * 16);
        window_run(wc, 512, 4 * 512 + 77, 300, 32768);
    }
    /* a block size without a power-of-two divisor up to 16 keeps a divisor */
    cfg_kv c = cfg_kv_default();
    c.block_tokens = 24;
    c.chunk_size = 72;
    kvp_groups gr;
    kvp_layer_groups(&c, &d, &gr, NULL, NULL);
    cr_assert_eq(gr.cfg[KVC_LAYER_WINDOW].block_tokens, 12);
    cr_assert_eq(c.chunk_size % gr.cfg[KVC_LAYER_WINDOW].block_tokens, 0);
}

/* The capacity figure of docs/gemma3.md: Gemma-3-270M's KV shape (18
 * layers, one KV head of 256, window 512 on 15 of them), 32K context, a 1
 * GiB budget: the most 32K sequences a pool holds over --max-seqs 1..64.
 * FP16 9; INT4 with FP16 window layers 30 (29 with blocks of 128, 26 when
 * the window group used pages of 128); quantized window layers, in blocks
 * of 16 whatever block_tokens: int8 31 (24 when they were blocks of 256),
 * int4 34 (27 in blocks of 256). */
static int g_window_bits = 4; /* window_kv = int<this> when quantized */
static int best_fit(cfg_kv_mode mode, cfg_kv_mode window_kv, int block_tokens,
                    const kvc_dims *d)
{
    cfg_kv c = cfg_kv_default();
    if (block_tokens)
        c.block_tokens = block_tokens;
    c.mode = mode;
    c.window_kv = window_kv;
    c.window_bits = g_window_bits;
    c.kv_budget_bytes = 1LL << 30;
    int best = 0;
    for (int n = 1; n <= 64; n++) {
        int fit = kvp_pool_fit(&c, d, 32768, n, err, sizeof err);
        cr_assert_geq(fit, 0, "%s", err);
        cr_assert_leq(fit, n);
        best = fit > best ? fit : best;
    }
    return best;
}

Test(kv_plan, gemma3_capacity_in_one_gib)
{
    int32_t win[18];
    for (int l = 0; l < 18; l++)
        win[l] = l % 6 == 5 ? 0 : 512;
    kvc_dims d = {18, 256, 256, win};
    int f16 = best_fit(CFG_KV_FP16, CFG_KV_FP16, 0, &d);
    int q4 = best_fit(CFG_KV_INT4, CFG_KV_FP16, 0, &d);
    /* quantized window layers hold blocks of 16 (kvp_layer_groups), not
     * the global layers' 256 (3 of which a 512-position window spans) */
    int q4w128 = best_fit(CFG_KV_INT4, CFG_KV_INT4, 128, &d);
    int q4w = best_fit(CFG_KV_INT4, CFG_KV_INT4, 0, &d);
    g_window_bits = 8;
    int q8w = best_fit(CFG_KV_INT4, CFG_KV_INT4, 0, &d);
    g_window_bits = 4;
    cr_assert_eq(f16, 9, "fp16: %d", f16);
    cr_assert_eq(q4, 30, "int4, fp16 window layers: %d", q4);
    cr_assert_eq(q4w, 34, "int4, int4 window layers: %d", q4w);
    cr_assert_eq(q4w128, 34, "int4, int4 window layers, global blocks of 128: %d", q4w128);
    cr_assert_eq(q8w, 31, "int4, int8 window layers: %d", q8w);
    cr_assert_geq(q8w * 10, f16 * 34, "int8 windows: >= 3.4x fp16 (%d vs %d)", q8w, f16);
    fprintf(stderr, "gemma3 32K in 1 GiB: fp16 %d, int4 %d, int4 windows %d (global blocks of "
            "128: %d), int8 windows %d\n", f16, q4, q4w, q4w128, q8w);
    /* the FP16 window layers' share per sequence slot: 34 pages of 16
     * positions (7.97 MiB), no longer 6 of 128 (11.25 MiB) */
    cfg_kv g3 = cfg_kv_default();
    kvp_groups gr;
    kvp_layer_groups(&g3, &d, &gr, NULL, NULL);
    int64_t hq, hf, pq, pf;
    kvp_window_need(&gr.cfg[KVC_LAYER_WINDOW], gr.window, 32768, &hq, &hf, &pq, &pf);
    cr_assert_eq(hf * 16 * 15 * 256 * 2 * 2, 34LL * 245760);
    /* without a global group the slots decide */
    int32_t all[2] = {8, 8};
    kvc_dims d2 = {2, 16, 8, all};
    cfg_kv c = cfg(CFG_KV_INT4);
    cr_assert_eq(kvp_pool_fit(&c, &d2, 1024, 3, err, sizeof err), 3);
    /* too small a budget: the sizing's error */
    c.kv_budget_bytes = 4096;
    cr_assert_eq(kvp_pool_fit(&c, &d, 32768, 4, err, sizeof err), -EINVAL);
}
