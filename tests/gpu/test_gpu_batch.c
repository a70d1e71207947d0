/*
 * test_gpu_batch.c - fwd_eval_batch on the CUDA backend (continuous
 * batching on the GPU), mirroring tests/engine/test_forward_batch.c, on
 * stories260K and stories15M (../shared/models):
 *  - a sequence's logits are the same whether it runs alone or beside
 *    three others of different lengths in the same steps (FP16 and INT4
 *    cache; prompt pieces and decode tokens mixed in one step), and the
 *    same as fwd_eval's (the single-sequence path);
 *  - the GPU batch agrees with the CPU backend's batch on every
 *    recorded row with the FP16 cache (ATOL_LOGIT, as test_gpu_forward);
 *  - a full pool is refused with -ENOSPC and nothing changes (the pool's
 *    accounting, the sequences' lengths); invalid items are refused
 *    (-EINVAL), more items than max_seqs too; after the first sequence is
 *    reset the second runs.
 * Alone vs batched: bit-identical in the emulator (its GEMM sums each row
 * the same way for any number of rows; the attention splits are planned
 * per item). On a device cuBLAS may pick another kernel for another number
 * of rows and sum a row in another order, so there the rows must agree
 * within ATOL_BATCH 1e-4 (FP32 GEMMs: reordered sums of a few hundred
 * products give ~1e-6 relative; logits are O(10)) with the FP16 cache; with
 * the INT4 cache a K/V value that lands on a rounding boundary may take the
 * other code, so on a device the INT4 check is ATOL_BATCH_INT4 2e-2 (the
 * size of one code step's effect on the logits of these small models,
 * measured as the INT4 vs CPU differences in test_gpu_forward).
 */
#include "tests/gpu/gpu_test.h"

#include <errno.h>

#include "engine/graph/forward.h"
#include "tests/gpu/gpu_models.h"

#define NMAX 4
#define ATOL_LOGIT 2e-3
#define ATOL_BATCH 1e-4
#define ATOL_BATCH_INT4 2e-2

#ifdef GT_LIGHT
#define LIGHT 2 /* sanitizer build: the emulated runs are shortened */
#else
#define LIGHT 1
#endif

static fwd_params params(cfg_kv_mode mode, int max_seqs, int64_t budget_tokens)
{
    fwd_params p = fwd_default_params();
    p.device = BK_DEVICE_CUDA;
    p.n_ctx = 256;
    p.max_seqs = max_seqs;
    p.max_batch = 65 * max_seqs;
    p.n_threads = 2;
    p.kv.mode = mode;
    p.kv.chunk_size = 64;
    p.kv.block_tokens = 32;
    p.kv.warmup_chunks = 1;
    p.kv.sink_tokens = 0;
    p.kv.kv_budget_tokens = budget_tokens;
    return p;
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

/* Runs n_seq sequences with prompt lengths lens[] through fwd_eval_batch the
 * way the scheduler does (each prompt in chunk-aligned pieces, then n_dec
 * fixed decode tokens), all in the same steps, sequence 0 as the last item
 * of each step. Records the last logits row of sequence 0 at each of its
 * steps into rec, and every row of every sequence into all (if not NULL,
 * *n_all rows); returns sequence 0's rows, -1 on failure. */
static int run(fwd_state *s, int V, int n_seq, const int *lens, int n_dec, float *rec,
               float *all, int *n_all)
{
    char err[512] = "";
    const int C = 64;
    fwd_seq *seq[NMAX] = {NULL};
    int32_t ids[NMAX][256];
    int done[NMAX] = {0}, left_dec[NMAX], rows = 0, rc = 0;
    for (int i = 0; i < n_seq && rc == 0; i++) {
        rc = fwd_seq_create(s, 256, &seq[i], err, sizeof err);
        GT_CHECK(rc == 0, "seq create: %s", err);
        prompt(ids[i], lens[i] + n_dec, V, 777u + (uint32_t)i * 31u);
        left_dec[i] = n_dec;
    }
    while (rc == 0) {
        fwd_item it[NMAX];
        int map[NMAX], ni = 0;
        for (int i = n_seq - 1; i >= 0; i--) {
            if (done[i] < lens[i]) {
                int n = lens[i] - done[i], tb = C - done[i] % C;
                it[ni] = (fwd_item){seq[i], ids[i] + done[i], n < tb ? n : tb, 1, 1, NULL};
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
        rc = fwd_eval_batch(s, it, ni, &failed, err, sizeof err);
        GT_CHECK(rc == 0, "batch step: %s (item %d)", err, failed);
        for (int k = 0; rc == 0 && k < ni; k++) {
            int i = map[k];
            if (done[i] >= lens[i])
                left_dec[i]--;
            done[i] += it[k].n;
            if (i == 0)
                memcpy(rec + (size_t)rows++ * V, it[k].out_logits, (size_t)V * sizeof(float));
            if (all)
                memcpy(all + (size_t)(*n_all)++ * V, it[k].out_logits, (size_t)V * sizeof(float));
        }
    }
    for (int i = 0; i < n_seq; i++)
        fwd_seq_destroy(seq[i]);
    return rc == 0 ? rows : -1;
}

/* rows of a and b equal: bit for bit in the emulator, else within atol */
static void same_rows(const char *what, const float *a, const float *b, int rows, int V,
                      double atol)
{
    if (gt_emulated()) {
        for (int r = 0; r < rows; r++)
            GT_CHECK(memcmp(a + (size_t)r * V, b + (size_t)r * V, (size_t)V * sizeof(float)) == 0,
                     "%s: row %d differs", what, r);
    } else {
        gt_close(what, b, a, (size_t)rows * V, atol, 0.0);
    }
}

static void invariance(const char *rel, cfg_kv_mode mode, int light)
{
    mdl_model *m = gt_load_model(rel);
    if (!m)
        return;
    char err[512] = "";
    const int V = m->hp.n_vocab, n_dec = 12 / light;
    const char *mname = mode == CFG_KV_FP16 ? "fp16" : "int4";
    float *a = malloc((size_t)40 * V * sizeof(float));
    float *b = malloc((size_t)40 * V * sizeof(float));
    float *c = malloc((size_t)40 * V * sizeof(float));
    float *ga = malloc((size_t)160 * V * sizeof(float));
    float *ca = malloc((size_t)160 * V * sizeof(float));
    int n_ga = 0, n_ca = 0;
    fwd_params p = params(mode, NMAX, 0);
    fwd_state *g = NULL, *cpu = NULL;
    int rc = fwd_create(m, &p, &g, err, sizeof err);
    GT_CHECK(rc == 0, "gpu state: %s", err);
    int alone[] = {150 / light};
    int mixed[] = {150 / light, 37, 200 / light, 64};
    int ra = rc == 0 ? run(g, V, 1, alone, n_dec, a, NULL, NULL) : -1;
    int rb = rc == 0 ? run(g, V, 4, mixed, n_dec, b, ga, &n_ga) : -1;
    GT_CHECK(ra == rb && ra == (alone[0] + 63) / 64 + n_dec, "rows %d / %d", ra, rb);
    char what[160];
    if (ra > 0 && ra == rb) {
        snprintf(what, sizeof what, "%s %s alone vs batched", rel, mname);
        same_rows(what, a, b, ra, V, mode == CFG_KV_FP16 ? ATOL_BATCH : ATOL_BATCH_INT4);
    }
    /* the CPU batch: every sequence's rows within the GPU-vs-CPU tolerance
     * (FP16) */
    if (ra > 0 && mode == CFG_KV_FP16) {
        fwd_params pc = p;
        pc.device = BK_DEVICE_CPU;
        rc = fwd_create(m, &pc, &cpu, err, sizeof err);
        GT_CHECK(rc == 0, "cpu state: %s", err);
        int rcpu = rc == 0 ? run(cpu, V, 4, mixed, n_dec, c, ca, &n_ca) : -1;
        GT_CHECK(rcpu == rb && n_ca == n_ga && n_ga > 4 * n_dec, "cpu rows %d/%d, %d/%d",
                 rcpu, rb, n_ca, n_ga);
        snprintf(what, sizeof what, "%s fp16 batched gpu vs cpu, all sequences", rel);
        if (rcpu == rb && n_ca == n_ga)
            gt_close(what, ga, ca, (size_t)n_ga * V, ATOL_LOGIT, 0.0);
        fwd_destroy(cpu);
    }
    /* fwd_eval (the CLI's path) on the same tokens */
    fwd_params p1 = params(mode, 1, 0);
    fwd_state *one = NULL;
    rc = fwd_create(m, &p1, &one, err, sizeof err);
    GT_CHECK(rc == 0, "single state: %s", err);
    if (rc == 0 && ra > 0) {
        int32_t ids[256];
        prompt(ids, alone[0] + n_dec, V, 777u);
        const float *lg;
        int np = alone[0];
        rc = fwd_eval(one, ids, np, 0, 0, &lg, err, sizeof err);
        GT_CHECK(rc == 0, "fwd_eval: %s", err);
        int r0 = (np + 63) / 64 - 1; /* the prompt's last row */
        snprintf(what, sizeof what, "%s %s fwd_eval vs batch, prompt", rel, mname);
        if (rc == 0)
            same_rows(what, a + (size_t)r0 * V, lg, 1, V,
                      mode == CFG_KV_FP16 ? ATOL_BATCH : ATOL_BATCH_INT4);
        for (int t = 0; rc == 0 && t < n_dec; t++) {
            rc = fwd_eval(one, ids + np + t, 1, np + t, 0, &lg, err, sizeof err);
            GT_CHECK(rc == 0, "fwd_eval decode %d: %s", t, err);
            snprintf(what, sizeof what, "%s %s fwd_eval vs batch, decode %d", rel, mname, t);
            if (rc == 0)
                same_rows(what, a + (size_t)(r0 + 1 + t) * V, lg, 1, V,
                          mode == CFG_KV_FP16 ? ATOL_BATCH : ATOL_BATCH_INT4);
        }
    }
    fwd_destroy(one);
    fwd_destroy(g);
    free(a), free(b), free(c), free(ga), free(ca);
    mdl_free(m);
}

static void case_invariance_260k(void)
{
    int light = gt_emulated() ? LIGHT : 1; /* shorter under sanitizers */
    invariance(GT_260K, CFG_KV_FP16, light);
    invariance(GT_260K, CFG_KV_INT4, light);
}

static void case_invariance_15m(void)
{
#ifdef GT_LIGHT
    if (gt_emulated()) { /* emulator under sanitizers: too slow for CI */
        printf("     (stories15M: not run in the sanitizer build of the emulator)\n");
        return;
    }
#endif
    /* the emulator is slow: shorter prompts, and the INT4 cache (covered on
     * stories260K) only on a device */
    invariance(GT_15M, CFG_KV_FP16, gt_emulated() ? 2 : 1);
    if (!gt_emulated())
        invariance(GT_15M, CFG_KV_INT4, 1);
}

/* A pool of 128 tokens: a sequence fills it, the next step of it and of a
 * second sequence are refused with -ENOSPC and nothing changes; after the
 * first is reset the second runs. Invalid items are refused too. */
static void case_full_pool(void)
{
    mdl_model *m = gt_load_model(GT_260K);
    if (!m)
        return;
    char err[512] = "";
    fwd_params p = params(CFG_KV_INT4, 2, 128);
    p.max_batch = 130;
    p.kv.sink_tokens = 4;
    fwd_state *s = NULL;
    GT_OK(fwd_create(m, &p, &s, err, sizeof err));
    if (!s) {
        mdl_free(m);
        return;
    }
    fwd_seq *a = NULL, *b = NULL, *c = NULL;
    GT_OK(fwd_seq_create(s, 256, &a, err, sizeof err));
    GT_OK(fwd_seq_create(s, 256, &b, err, sizeof err));
    GT_OK(fwd_seq_create(s, 256, &c, err, sizeof err));
    int32_t ids[256];
    prompt(ids, 256, m->hp.n_vocab, 5);
    int failed = -2, rc = 0, pos = 0;
    while (a && pos < 256) {
        fwd_item it = {a, ids + pos, 64, 1, 0, NULL};
        rc = fwd_eval_batch(s, &it, 1, &failed, err, sizeof err);
        if (rc < 0)
            break;
        pos += 64;
    }
    GT_CHECK(rc == -ENOSPC && failed == 0, "a 128-token pool held %d tokens (rc %d: %s)", pos,
             rc, err);
    GT_CHECK(pos >= 128 && pos < 256, "pos %d", pos);
    kvc_stats before, after;
    GT_OK(fwd_pool_stats(s, &before, err, sizeof err));
    int64_t qf0, ff0, qf1, ff1;
    fwd_pool_free_units(s, &qf0, &ff0);
    fwd_item two[2] = {{b, ids, 64, 1, 1, NULL}, {a, ids + pos, 64, 1, 1, NULL}};
    rc = fwd_eval_batch(s, two, 2, &failed, err, sizeof err);
    GT_CHECK(rc == -ENOSPC && (failed == 0 || failed == 1), "rc %d failed %d: %s", rc, failed,
             err);
    GT_OK(fwd_pool_stats(s, &after, err, sizeof err));
    fwd_pool_free_units(s, &qf1, &ff1);
    GT_CHECK(after.bytes_total == before.bytes_total && qf0 == qf1 && ff0 == ff1 &&
                 after.n_quantized == before.n_quantized,
             "the refused step changed the pool");
    GT_CHECK(fwd_seq_n_tokens(b) == 0 && fwd_seq_n_tokens(a) == pos, "lengths %d %d",
             fwd_seq_n_tokens(b), fwd_seq_n_tokens(a));
    GT_CHECK(before.tokens == pos && before.qblocks_used > 0, "pool stats: %lld tokens",
             (long long)before.tokens);
    fwd_seq_reset(a); /* a preempted: its blocks return */
    fwd_item one = {b, ids, 64, 1, 1, NULL};
    GT_OK(fwd_eval_batch(s, &one, 1, &failed, err, sizeof err));
    GT_CHECK(one.out_logits != NULL && fwd_seq_n_tokens(b) == 64, "b after the reset");
    /* invalid: a prompt piece crossing a chunk boundary, a 2-token decode,
     * more sequences than max_seqs (2) */
    fwd_item bad = {b, ids, 65, 1, 0, NULL};
    err[0] = '\0';
    GT_CHECK(fwd_eval_batch(s, &bad, 1, &failed, err, sizeof err) == -EINVAL &&
                 strstr(err, "chunk"),
             "a piece across a chunk boundary: %s", err);
    fwd_item bad2 = {b, ids, 2, 0, 0, NULL};
    GT_CHECK(fwd_eval_batch(s, &bad2, 1, &failed, err, sizeof err) == -EINVAL,
             "a 2-token decode step");
    fwd_item three[3] = {{a, ids, 1, 1, 0, NULL}, {b, ids, 1, 0, 0, NULL},
                          {c, ids, 1, 1, 0, NULL}};
    GT_CHECK(fwd_eval_batch(s, three, 3, &failed, err, sizeof err) == -EINVAL && failed == 2,
             "three sequences in a state for two: %s", err);
    GT_CHECK(fwd_seq_n_tokens(b) == 64 && fwd_seq_n_tokens(a) == 0,
             "refused items changed a sequence");
    fwd_seq_destroy(a);
    fwd_seq_destroy(b);
    fwd_seq_destroy(c);
    fwd_destroy(s);
    mdl_free(m);
}

int main(void)
{
    gt_begin("test_gpu_batch");
    gt_case("invariance_260k", case_invariance_260k);
    gt_case("invariance_15m", case_invariance_15m);
    gt_case("full_pool", case_full_pool);
    return gt_end();
}
