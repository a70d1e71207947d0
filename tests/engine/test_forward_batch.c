/*
 * test_forward_batch.c - fwd_eval_batch (the server's continuous batching):
 * a sequence's logits are bit-identical whether it runs alone or beside
 * other sequences of different lengths in the same steps (FP16 and INT4
 * cache), equal to fwd_eval's, and a full pool is refused cleanly with
 * nothing changed.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <string.h>

#include "engine/graph/forward.h"
#include "engine/model/model.h"
#include "tests/test_util.h"

#define NMAX 4

static mdl_model *load(const char *path)
{
    char err[512];
    mdl_model *m = NULL;
    cr_assert_eq(mdl_load(path, NULL, &m, err, sizeof err), 0, "%s", err);
    return m;
}

static fwd_state *mk(const mdl_model *m, cfg_kv_mode mode, int max_seqs, int64_t budget)
{
    char err[512];
    fwd_params p = fwd_default_params();
    p.n_ctx = 256;
    p.max_seqs = max_seqs;
    p.max_batch = 65 * max_seqs;
    p.n_threads = 2;
    p.kv.mode = mode;
    p.kv.chunk_size = 64;
    p.kv.block_tokens = 32;
    p.kv.warmup_chunks = 1;
    p.kv.sink_tokens = 0;
    p.kv.kv_budget_bytes = budget;
    fwd_state *s = NULL;
    cr_assert_eq(fwd_create(m, &p, &s, err, sizeof err), 0, "%s", err);
    return s;
}

static void prompt(int32_t *ids, int n, int32_t n_vocab, uint32_t seed)
{
    uint32_t x = seed;
    ids[0] = 1;
    for (int i = 1; i < n; i++) {
        x = x * 1664525u + 1013904223u;
        ids[i] = 3 + (int32_t)((x >> 8) % (uint32_t)(n_vocab - 3));
    }
}

/* Runs n_seq sequences with prompt lengths lens[] through fwd_eval_batch
 * the way the scheduler does (each prompt in chunk-aligned pieces, then
 * greedy-free decode of fixed tokens), all in the same steps. Records the
 * last logits row of sequence 0 at each of its steps into rec. */
static int run(fwd_state *s, const mdl_model *m, int n_seq, const int *lens, int n_dec,
               float *rec)
{
    char err[512];
    const int V = m->hp.n_vocab, C = 64;
    fwd_seq *seq[NMAX];
    int32_t ids[NMAX][200];
    int done[NMAX] = {0}, left_dec[NMAX];
    for (int i = 0; i < n_seq; i++) {
        cr_assert_eq(fwd_seq_create(s, 256, &seq[i], err, sizeof err), 0, "%s", err);
        prompt(ids[i], lens[i] + n_dec, V, 777u + (uint32_t)i * 31u);
        left_dec[i] = n_dec;
    }
    int rows = 0;
    for (;;) {
        fwd_item it[NMAX];
        int map[NMAX], ni = 0;
        for (int i = 0; i < n_seq; i++) {
            if (done[i] < lens[i]) {
                int n = lens[i] - done[i];
                int tb = C - done[i] % C;
                if (n > tb)
                    n = tb;
                it[ni] = (fwd_item){seq[i], ids[i] + done[i], n, 1, 1, NULL};
            } else if (left_dec[i] > 0) {
                it[ni] = (fwd_item){seq[i], ids[i] + done[i], 1, 0, 1, NULL};
            } else {
                continue;
            }
            map[ni++] = i;
        }
        if (ni == 0)
            break;
        int failed = -2;
        int rc = fwd_eval_batch(s, it, ni, &failed, err, sizeof err);
        cr_assert_eq(rc, 0, "%s", err);
        for (int k = 0; k < ni; k++) {
            int i = map[k];
            if (done[i] >= lens[i])
                left_dec[i]--;
            done[i] += it[k].n;
            if (i == 0)
                memcpy(rec + (size_t)rows++ * V, it[k].out_logits, (size_t)V * sizeof(float));
        }
    }
    for (int i = 0; i < n_seq; i++)
        fwd_seq_destroy(seq[i]);
    return rows;
}

static void invariance(const char *path, cfg_kv_mode mode)
{
    mdl_model *m = load(path);
    fwd_state *s = mk(m, mode, NMAX, 0);
    const int V = m->hp.n_vocab;
    float *a = malloc((size_t)40 * V * sizeof(float));
    float *b = malloc((size_t)40 * V * sizeof(float));
    int alone[] = {150};
    int ra = run(s, m, 1, alone, 12, a);
    int mixed[] = {150, 37, 200, 64};
    int rb = run(s, m, 4, mixed, 12, b);
    cr_assert_eq(ra, rb);
    cr_assert_eq(ra, 3 + 12);
    for (int r = 0; r < ra; r++)
        cr_assert(memcmp(a + (size_t)r * V, b + (size_t)r * V, (size_t)V * sizeof(float)) == 0,
                  "row %d differs between alone and batched", r);

    /* the same tokens through fwd_eval (the CLI's path) give the same logits */
    fwd_state *one = mk(m, mode, 1, 0);
    int32_t ids[200];
    prompt(ids, 150 + 12, V, 777u);
    const float *lg;
    char err[512];
    cr_assert_eq(fwd_eval(one, ids, 150, 0, 0, &lg, err, sizeof err), 0, "%s", err);
    cr_assert(memcmp(lg, a + (size_t)2 * V, (size_t)V * sizeof(float)) == 0);
    for (int t = 0; t < 12; t++) {
        cr_assert_eq(fwd_eval(one, ids + 150 + t, 1, 150 + t, 0, &lg, err, sizeof err), 0);
        cr_assert(memcmp(lg, a + (size_t)(3 + t) * V, (size_t)V * sizeof(float)) == 0,
                  "decode %d differs from fwd_eval", t);
    }
    fwd_destroy(one);
    free(a);
    free(b);
    fwd_destroy(s);
    mdl_free(m);
}

Test(forward_batch, invariance_fp16_stories15m)
{
    invariance(tu_shared("models/stories15M/stories15M.bin"), CFG_KV_FP16);
}

Test(forward_batch, invariance_int4_stories15m)
{
    invariance(tu_shared("models/stories15M/stories15M.bin"), CFG_KV_INT4);
}

Test(forward_batch, invariance_int4_smollm2)
{
    const char *p = tu_smollm2();
    if (!p)
        cr_skip_test("SmolLM2 not fetched");
    invariance(p, CFG_KV_INT4);
}

/* A pool of 128 tokens: a sequence fills it, the next step of it and of a
 * second sequence are refused with -ENOSPC and nothing changes; after the
 * first is freed the second runs. Invalid items are refused too. */
Test(forward_batch, full_pool_refused_cleanly)
{
    char err[512];
    mdl_model *m = load(tu_shared("models/stories260K/stories260K.bin"));
    fwd_state *s = mk(m, CFG_KV_INT4, 2, 0);
    fwd_destroy(s);
    s = NULL;
    fwd_params p = fwd_default_params();
    p.n_ctx = 256;
    p.max_seqs = 2;
    p.max_batch = 130;
    p.n_threads = 1;
    p.kv.chunk_size = 64;
    p.kv.block_tokens = 32;
    p.kv.warmup_chunks = 1;
    p.kv.kv_budget_tokens = 128;
    cr_assert_eq(fwd_create(m, &p, &s, err, sizeof err), 0, "%s", err);
    fwd_seq *a, *b;
    cr_assert_eq(fwd_seq_create(s, 256, &a, err, sizeof err), 0);
    cr_assert_eq(fwd_seq_create(s, 256, &b, err, sizeof err), 0);
    int32_t ids[256];
    prompt(ids, 256, m->hp.n_vocab, 5);
    int failed = -2, rc = 0, pos = 0;
    while (pos < 256) {
        fwd_item it = {a, ids + pos, 64, 1, 0, NULL};
        rc = fwd_eval_batch(s, &it, 1, &failed, err, sizeof err);
        if (rc < 0)
            break;
        pos += 64;
    }
    cr_assert_eq(rc, -ENOSPC, "a 128-token pool held %d tokens", pos);
    cr_assert(pos >= 128 && pos < 256, "pos %d", pos);
    kvc_stats before, after;
    cr_assert_eq(fwd_pool_stats(s, &before, NULL, 0), 0);
    fwd_item two[2] = {{b, ids, 64, 1, 1, NULL}, {a, ids + pos, 64, 1, 1, NULL}};
    rc = fwd_eval_batch(s, two, 2, &failed, err, sizeof err);
    cr_assert_eq(rc, -ENOSPC, "%s", err);
    cr_assert(failed == 0 || failed == 1);
    cr_assert_eq(fwd_pool_stats(s, &after, NULL, 0), 0);
    cr_assert_eq(after.bytes_total, before.bytes_total);
    cr_assert_eq(fwd_seq_n_tokens(b), 0);
    cr_assert_eq(fwd_seq_n_tokens(a), pos);
    fwd_seq_reset(a); /* a preempted: its blocks return */
    fwd_item one = {b, ids, 64, 1, 1, NULL};
    cr_assert_eq(fwd_eval_batch(s, &one, 1, &failed, err, sizeof err), 0, "%s", err);
    cr_assert_not_null(one.out_logits);
    cr_assert_eq(fwd_seq_n_tokens(b), 64);
    /* invalid: a prompt piece crossing a chunk boundary, a 2-token decode */
    fwd_item bad = {b, ids, 65, 1, 0, NULL};
    cr_assert_eq(fwd_eval_batch(s, &bad, 1, &failed, err, sizeof err), -EINVAL);
    cr_assert(strstr(err, "chunk") != NULL, "%s", err);
    fwd_item bad2 = {b, ids, 2, 0, 0, NULL};
    cr_assert_eq(fwd_eval_batch(s, &bad2, 1, &failed, err, sizeof err), -EINVAL);
    cr_assert_eq(fwd_seq_n_tokens(b), 64);
    fwd_seq_destroy(a);
    fwd_seq_destroy(b);
    fwd_destroy(s);
    mdl_free(m);
}
