/*
 * test_prefix.c - prefix reuse and fork on real data (CPU): a sequence
 * that continues from a cached prefix, or a fork of another sequence,
 * produces logits bit-identical to a cold run of the same tokens, in int4
 * and fp16 modes (sinks, warm-up, live blocks, a short last chunk, the
 * decode tail); the shared blocks are counted once; a model with
 * sliding-window layers and the CUDA backend refuse cleanly (fwd level).
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <string.h>

#include "engine/graph/forward.h"
#include "engine/model/model.h"
#include "tests/test_util.h"

#define C 64
#define MAXROWS 32

static char err[512];

static fwd_state *mk(const mdl_model *m, cfg_kv_mode mode, int prefix)
{
    fwd_params p = fwd_default_params();
    p.n_ctx = 320;
    p.max_seqs = 3;
    p.max_batch = C + 3;
    p.n_threads = 2;
    p.kv.mode = mode;
    p.kv.chunk_size = C;
    p.kv.block_tokens = 32;
    p.kv.warmup_chunks = 1;
    p.kv.sink_tokens = 4;
    fwd_state *s = NULL;
    cr_assert_eq(fwd_create(m, &p, &s, err, sizeof err), 0, "%s", err);
    if (prefix)
        cr_assert_eq(fwd_prefix_enable(s, 16, err, sizeof err), 0, "%s", err);
    return s;
}

/* One step of q: tokens [at, at+n) of ids. Returns its logits. */
static const float *step(fwd_state *s, fwd_seq *q, const int32_t *ids, int n, int prefill)
{
    int at = fwd_seq_n_tokens(q), failed;
    fwd_item it = {q, ids + at, n, prefill, 1, NULL};
    cr_assert_eq(fwd_eval_batch(s, &it, 1, &failed, err, sizeof err), 0, "%s", err);
    if (prefill)
        fwd_seq_prefix_store(q, ids);
    return it.out_logits;
}

/* Prefills ids up to n_prompt from where q is (chunk-aligned pieces, as
 * the scheduler), then decodes ids[n_prompt, n_all): the logits of the
 * last prompt token and of each decode step go to rec. Returns rows. */
static int finish(fwd_state *s, fwd_seq *q, const int32_t *ids, int n_prompt, int n_all,
                  int V, float *rec)
{
    int rows = 0;
    const float *lg = NULL;
    while (fwd_seq_n_tokens(q) < n_prompt) {
        int at = fwd_seq_n_tokens(q), piece = C - at % C;
        if (piece > n_prompt - at)
            piece = n_prompt - at;
        lg = step(s, q, ids, piece, 1);
    }
    if (lg)
        memcpy(rec + (size_t)rows++ * V, lg, (size_t)V * sizeof(float));
    while (fwd_seq_n_tokens(q) < n_all) {
        lg = step(s, q, ids, 1, 0);
        memcpy(rec + (size_t)rows++ * V, lg, (size_t)V * sizeof(float));
    }
    return rows;
}

static void same_rows(const float *a, const float *b, int rows, int V, const char *what)
{
    for (int r = 0; r < rows; r++)
        cr_assert(memcmp(a + (size_t)r * V, b + (size_t)r * V, (size_t)V * sizeof(float)) == 0,
                  "%s: row %d differs from the cold run", what, r);
}

static void reuse_is_exact(const char *path, cfg_kv_mode mode)
{
    mdl_model *m = NULL;
    cr_assert_eq(mdl_load(path, NULL, &m, err, sizeof err), 0, "%s", err);
    const int V = m->hp.n_vocab;
    float *cold = malloc((size_t)MAXROWS * V * sizeof(float));
    float *warm = malloc((size_t)MAXROWS * V * sizeof(float));
    int32_t x[300], y[300];
    tu_prompt(x, 300, V, 11);
    memcpy(y, x, sizeof y);
    tu_prompt(y + 150, 150, V, 99); /* y shares x's first 150 tokens */
    y[150] = 5;

    /* cold references on a state without the cache */
    fwd_state *ref = mk(m, mode, 0);
    fwd_seq *r;
    cr_assert_eq(fwd_seq_create(ref, 320, &r, err, sizeof err), 0, "%s", err);
    int n_cold = finish(ref, r, x, 230, 236, V, cold);
    float *cold_y = malloc((size_t)MAXROWS * V * sizeof(float));
    fwd_seq_reset(r);
    finish(ref, r, y, 200, 204, V, cold_y);

    fwd_state *s = mk(m, mode, 1);
    fwd_seq *a, *b;
    cr_assert_eq(fwd_seq_create(s, 320, &a, err, sizeof err), 0, "%s", err);
    cr_assert_eq(fwd_seq_create(s, 320, &b, err, sizeof err), 0, "%s", err);
    /* a fills the cache (and is itself a cold run) */
    same_rows(cold, warm, finish(s, a, x, 230, 236, V, warm), V, "the run that stores");
    kvc_stats held;
    cr_assert_eq(fwd_pool_stats(s, &held, NULL, 0), 0);
    fwd_seq_reset(a);
    /* b continues from the 192 cached tokens of x */
    cr_assert_eq(fwd_seq_prefix_adopt(b, x, 230), 192);
    cr_assert_eq(finish(s, b, x, 230, 236, V, warm), n_cold);
    same_rows(cold, warm, n_cold, V, "full prefix reuse");
    kvc_stats st;
    cr_assert_eq(fwd_pool_stats(s, &st, NULL, 0), 0);
    cr_assert_eq(st.bytes_total, held.bytes_total, "b holds what a held, counted once");
    /* y shares 2 whole chunks of x */
    fwd_seq_reset(b);
    cr_assert_eq(fwd_seq_prefix_adopt(a, y, 200), 128);
    cr_assert_eq(fwd_seq_prefix_adopt(b, x, 230), 192, "both at once");
    finish(s, a, y, 200, 204, V, warm);
    same_rows(cold_y, warm, 5, V, "partial prefix reuse");
    finish(s, b, x, 230, 236, V, warm);
    same_rows(cold, warm, n_cold, V, "beside another sequence");
    kvc_prefix_stats ps;
    fwd_prefix_stats(s, &ps);
    cr_assert_eq(ps.hits, 192 + 128 + 192);
    cr_assert_eq(ps.queries, 230 + 200 + 230);
    cr_assert_geq(ps.nodes, 3);

    /* fork: the n choices of one prompt (after a short last chunk; and a
     * prompt that ends in warm-up, with a partial page) */
    static const int lens[] = {150, 40};
    for (int k = 0; k < 2; k++) {
        fwd_seq *c;
        cr_assert_eq(fwd_seq_create(s, 320, &c, err, sizeof err), 0, "%s", err);
        fwd_seq_reset(a);
        fwd_seq_reset(b);
        fwd_seq_reset(r);
        int n = lens[k];
        /* z: x's prompt, another continuation (the other choice) */
        int32_t z[300];
        memcpy(z, x, sizeof z);
        tu_prompt(z + n, 300 - n, V, 1234u + (uint32_t)k);
        n_cold = finish(ref, r, x, n, n + 20, V, cold);
        fwd_seq_reset(r);
        finish(ref, r, z, n, n + 20, V, cold_y);
        cr_assert_eq(n_cold, 21);
        /* b prefills the prompt (no adoption: a fresh state's cache may
         * hold it, the fork is what is tested), c forks it; they decode
         * interleaved */
        finish(s, b, x, n, n, V, warm);
        cr_assert_eq(fwd_seq_fork(c, b, err, sizeof err), 0, "%s", err);
        float *wc = malloc((size_t)MAXROWS * V * sizeof(float));
        for (int t = 0; t < 20; t++) {
            memcpy(warm + (size_t)(t + 1) * V, step(s, b, x, 1, 0), (size_t)V * sizeof(float));
            memcpy(wc + (size_t)(t + 1) * V, step(s, c, z, 1, 0), (size_t)V * sizeof(float));
        }
        same_rows(cold + V, warm + V, 20, V, "the forked-from sequence");
        same_rows(cold_y + V, wc + V, 20, V, "the fork");
        free(wc);
        fwd_seq_destroy(c);
    }
    fwd_seq_destroy(a);
    fwd_seq_destroy(b);
    fwd_seq_destroy(r);
    fwd_destroy(s);
    fwd_destroy(ref);
    free(cold);
    free(cold_y);
    free(warm);
    mdl_free(m);
}

Test(prefix, reuse_and_fork_exact_int4, .timeout = 120)
{
    reuse_is_exact(tu_shared("models/stories15M/stories15M.bin"), CFG_KV_INT4);
}

Test(prefix, reuse_and_fork_exact_fp16, .timeout = 120)
{
    reuse_is_exact(tu_shared("models/stories15M/stories15M.bin"), CFG_KV_FP16);
}
