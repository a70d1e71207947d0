/*
 * bench_gpu.c - GPU throughput of the forward pass and of the decode
 * attention, FP16 vs INT4 (LiveKVQuant-P) cache, on a synthetic model of
 * the Llama-3-8B shape (32 layers, dim 4096, GQA 32/8, head_dim 128, FFN
 * 14336, vocab 128256) with random FP16 weights generated on the GPU:
 * throughput does not need trained weights.
 *
 *   bench_gpu [--ctx 1024,8192,32768] [--decode N] [--batch B] [--tiny]
 *             [--no-model] [--no-attn] [--no-batched] [--batched-budget S]
 *
 * Measures, for each context L and cache mode:
 *  - prefill tok/s: L random tokens from position 0 (chunks of 512);
 *  - decode tok/s: N single-token steps after that prefill (median step);
 *  - KV bytes per token and bits per element after the prefill;
 *  - at 8K (or the middle context), the share of the prefill spent in the
 *    KV store (chunk statistics + live quantization + FP16 pages), from
 *    CUDA events around every layer's store;
 * and, separately, the decode-attention kernel alone: B sequences of L =
 * the largest context each, one query per sequence, one layer: time per
 * call (median of 20), bytes actually read (codes, scale/zero snapshots,
 * the outlier entries present, headers; FP16: K and V) and the achieved
 * bandwidth against the device-to-device copy bandwidth measured the same
 * way (read + write bytes / time).
 * and continuous batching: B sequences (the scheduler's slots) decoding
 * together, one fwd_eval_batch step of B tokens (logits of all B copied
 * to the host, as the server needs them), at each context L (the
 * sequences are grown to L by batched prefill steps of up to B chunks,
 * after the previous row's decode tokens): time per step (median), decode
 * tok/s (B / step) and its gain over one sequence's decode at the same L.
 * The batched rows stop (marked "not run") when the prefill they need
 * would not finish within --batched-budget seconds (default 150),
 * predicted from the prefill rate measured so far.
 * The tables are printed as each part finishes (the batched one last).
 * --tiny runs a miniature version of everything (used as a smoke test,
 * also in the CPU emulator).
 */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench/bench_util.h"
#include "engine/graph/forward.h"
#include "kernels/cuda/kcu_attn.cuh"
#include "kernels/cuda/kcu_elem.cuh"
#include "kernels/cuda/kcu_kvq_quant.cuh"
#include "kernels/cuda/kcu_rt.cuh"

#define MAX_CTX 8

typedef struct {
    int ctx;
    int ok;
    double prefill_tps, decode_tps, kv_bytes_tok, bits;
    double kv_share; /* KV store share of the prefill (profiled run) */
} model_row;

typedef struct {
    int ok;
    double ms, bytes, gbps;
} attn_row;

typedef struct {
    int ctx;
    int ok, skipped;
    double step_ms, tps, gain, prefill_tps;
} batch_row;

/* ---- forward pass ---------------------------------------------------------------- */

/* A byte count of the backend (BK_CTL_WEIGHT_BYTES / BK_CTL_POOL_BYTES). */
static size_t ctl_bytes(fwd_state *s, int what)
{
    size_t b = 0;
    (void)fwd_ctl(s, what, &b, NULL, 0);
    return b;
}

static void run_model(const mdl_hparams *hp, const cfg_kv *kv, const int *ctxs, int n_ctx,
                      int n_dec, int prof_ctx, model_row *rows)
{
    char err[512] = "";
    fwd_params fp = fwd_default_params();
    fp.n_ctx = ctxs[n_ctx - 1] + n_dec + 1;
    fp.device = BK_DEVICE_CUDA;
    fp.kv = *kv;
    cfg_kv_mode mode = kv->mode;
    fwd_state *s = NULL;
    const char *mname = mode == CFG_KV_FP16 ? "fp16" : "int4";
    double t0 = bu_now_s();
    if (fwd_create_synthetic(hp, KT_F16, 7, &fp, &s, err, sizeof err) < 0) {
        fprintf(stderr, "bench_gpu: %s model: %s\n", mname, err);
        return;
    }
    fprintf(stderr, "bench_gpu: %s: %.2f GiB of weights, %.2f GiB KV pool, created in %.1f s on %s\n",
            mname, ctl_bytes(s, BK_CTL_WEIGHT_BYTES) / 1073741824.0,
            ctl_bytes(s, BK_CTL_POOL_BYTES) / 1073741824.0, bu_now_s() - t0, fwd_describe(s));
    int maxc = ctxs[n_ctx - 1] + n_dec + 1;
    int32_t *tok = malloc((size_t)maxc * sizeof *tok);
    uint64_t r = 12345;
    for (int i = 0; i < maxc; i++) {
        r = r * 6364136223846793005ull + 1442695040888963407ull;
        tok[i] = (int32_t)((r >> 33) % (uint64_t)hp->n_vocab);
    }
    const float *lg;
    /* warm-up: cuBLAS heuristics, first launches */
    if (fwd_eval(s, tok, 64 < ctxs[0] ? 64 : ctxs[0], 0, 0, &lg, err, sizeof err) < 0) {
        fprintf(stderr, "bench_gpu: %s warm-up: %s\n", mname, err);
        fwd_destroy(s);
        free(tok);
        return;
    }
    for (int ci = 0; ci < n_ctx; ci++) {
        int L = ctxs[ci];
        model_row *row = &rows[ci];
        row->ctx = L;
        double ta = bu_now_s();
        if (fwd_eval(s, tok, L, 0, 0, &lg, err, sizeof err) < 0) {
            fprintf(stderr, "bench_gpu: %s prefill %d: %s\n", mname, L, err);
            continue;
        }
        double tp = bu_now_s() - ta;
        double *dt = malloc((size_t)(n_dec > 0 ? n_dec : 1) * sizeof *dt);
        int ok = 1;
        for (int i = 0; i < n_dec && ok; i++) {
            double tb = bu_now_s();
            ok = fwd_eval(s, &tok[L + i], 1, L + i, 0, &lg, err, sizeof err) == 0;
            dt[i] = bu_now_s() - tb;
        }
        if (!ok) {
            fprintf(stderr, "bench_gpu: %s decode at %d: %s\n", mname, L, err);
            free(dt);
            continue;
        }
        kvc_stats st;
        if (fwd_kv_stats(s, &st, err, sizeof err) < 0) {
            fprintf(stderr, "bench_gpu: %s stats: %s\n", mname, err);
            free(dt);
            continue;
        }
        row->prefill_tps = L / tp;
        row->decode_tps = n_dec > 0 ? 1.0 / bu_median(dt, n_dec) : 0;
        row->kv_bytes_tok = st.tokens ? (double)st.bytes_total / (double)st.tokens : 0;
        row->bits = kvc_stats_bits(&st);
        row->ok = 1;
        free(dt);
        fprintf(stderr, "bench_gpu: %s ctx %6d: prefill %.3f s (%.0f tok/s), decode %.2f ms/tok, "
                "%.0f KV bytes/token (%.2f bits/elt)\n", mname, L, tp, row->prefill_tps,
                row->decode_tps > 0 ? 1000.0 / row->decode_tps : 0.0, row->kv_bytes_tok,
                row->bits);
        if (L == prof_ctx) {
            /* the same prefill again with per-layer events */
            /* (device timers: BK_CTL_PROFILE_*, cuda events) */
            bk_dev_profile pr;
            int on = 1, off = 0;
            if (fwd_ctl(s, BK_CTL_PROFILE_ON, &on, err, sizeof err) == 0) {
                (void)fwd_ctl(s, BK_CTL_PROFILE_CLEAR, NULL, err, sizeof err);
                if (fwd_eval(s, tok, L, 0, 0, &lg, err, sizeof err) == 0 &&
                    fwd_ctl(s, BK_CTL_PROFILE_GET, &pr, err, sizeof err) == 0) {
                    row->kv_share = pr.step_ms > 0 ? pr.kv_ms / pr.step_ms : 0;
                    fprintf(stderr, "bench_gpu: %s ctx %d profile: steps %.1f ms, attention "
                            "%.1f ms, KV store %.1f ms (%.2f%%)\n", mname, L, pr.step_ms,
                            pr.attn_ms, pr.kv_ms, 100.0 * row->kv_share);
                }
                (void)fwd_ctl(s, BK_CTL_PROFILE_ON, &off, NULL, 0);
            }
        }
    }
    free(tok);
    fwd_destroy(s);
}

/* ---- continuous batching: B sequences decoding together -------------------------- */

static uint64_t lcg(uint64_t *r)
{
    *r = *r * 6364136223846793005ull + 1442695040888963407ull;
    return *r >> 33;
}

/* B sequences on one state grown to each context in ctxs by batched prefill
 * steps, then n_dec batched decode steps per context; single[] (may have
 * ok == 0) gives one sequence's decode rate for the gain and the first
 * prefill-rate guess. Rows left when budget_s would be exceeded are marked
 * skipped. */
static void run_batched(const mdl_hparams *hp, const cfg_kv *kv, const int *ctxs, int n_ctx,
                        int n_dec, int B, double budget_s, const model_row *single,
                        batch_row *rows)
{
    char err[512] = "";
    const char *mname = kv->mode == CFG_KV_FP16 ? "fp16" : "int4";
    const int C = kv->chunk_size;
    fwd_params fp = fwd_default_params();
    fp.n_ctx = ctxs[n_ctx - 1] + n_ctx * n_dec + 1;
    fp.max_seqs = B;
    fp.max_batch = B * C < 8192 ? B * C : 8192; /* prefill: up to B chunks per step */
    if (fp.max_batch < C + B)
        fp.max_batch = C + B;
    fp.device = BK_DEVICE_CUDA;
    fp.kv = *kv;
    double t_end = bu_now_s() + budget_s;
    for (int i = 0; i < n_ctx; i++)
        rows[i].ctx = ctxs[i];
    fwd_state *s = NULL;
    if (fwd_create_synthetic(hp, KT_F16, 7, &fp, &s, err, sizeof err) < 0) {
        fprintf(stderr, "bench_gpu: batched %s (%d sequences): %s\n", mname, B, err);
        return;
    }
    fprintf(stderr, "bench_gpu: batched %s: %d sequences of up to %d positions, %.2f GiB KV "
            "pool, steps of up to %d tokens\n", mname, B, fp.n_ctx,
            ctl_bytes(s, BK_CTL_POOL_BYTES) / 1073741824.0, fp.max_batch);
    fwd_seq **seq = calloc((size_t)B, sizeof *seq);
    int32_t *tok = malloc((size_t)B * (size_t)fp.n_ctx * sizeof *tok);
    int *len = calloc((size_t)B, sizeof *len), *who = calloc((size_t)B, sizeof *who);
    fwd_item *it = calloc((size_t)B, sizeof *it);
    double *dt = malloc((size_t)(n_dec > 0 ? n_dec : 1) * sizeof *dt);
    int rc = seq && tok && len && who && it && dt ? 0 : -ENOMEM;
    uint64_t r = 999;
    for (size_t i = 0; rc == 0 && i < (size_t)B * (size_t)fp.n_ctx; i++)
        tok[i] = (int32_t)(lcg(&r) % (uint64_t)hp->n_vocab);
    for (int q = 0; rc == 0 && q < B; q++)
        rc = fwd_seq_create(s, fp.n_ctx, &seq[q], err, sizeof err);
    double rate = 0; /* prefill tokens/s measured so far */
    for (int ci = 0; rc == 0 && ci < n_ctx; ci++) {
        const int L = ctxs[ci];
        int64_t need = 0;
        for (int q = 0; q < B; q++)
            need += L > len[q] ? L - len[q] : 0;
        double guess = rate > 0 ? rate : single[ci].ok ? single[ci].prefill_tps : 0;
        if (guess > 0 && bu_now_s() + (double)need / guess > t_end) {
            for (int k = ci; k < n_ctx; k++)
                rows[k].skipped = 1;
            fprintf(stderr, "bench_gpu: batched %s: growing %d sequences to %d would take ~%.0f "
                    "s (beyond --batched-budget): not run\n", mname, B, L,
                    (double)need / guess);
            break;
        }
        double ta = bu_now_s();
        for (;;) { /* prefill steps: a chunk-aligned piece per sequence */
            int n = 0, total = 0;
            for (int q = 0; q < B; q++) {
                if (len[q] >= L)
                    continue;
                int piece = L - len[q], tb = C - len[q] % C;
                piece = piece < tb ? piece : tb;
                if (total + piece > fp.max_batch)
                    break;
                who[n] = q;
                it[n++] = (fwd_item){seq[q], tok + (size_t)q * fp.n_ctx + len[q], piece, 1, 0,
                                     NULL};
                total += piece;
            }
            if (n == 0)
                break;
            int failed;
            rc = fwd_eval_batch(s, it, n, &failed, err, sizeof err);
            if (rc < 0)
                break;
            for (int k = 0; k < n; k++)
                len[who[k]] += it[k].n;
        }
        double tp = bu_now_s() - ta;
        if (rc < 0) {
            fprintf(stderr, "bench_gpu: batched %s prefill to %d: %s\n", mname, L, err);
            break;
        }
        if (need > 0 && tp > 0)
            rate = (double)need / tp;
        for (int i = 0; i < n_dec && rc == 0; i++) {
            for (int q = 0; q < B; q++)
                it[q] = (fwd_item){seq[q], tok + (size_t)q * fp.n_ctx + len[q], 1, 0, 1, NULL};
            double tb = bu_now_s();
            int failed;
            rc = fwd_eval_batch(s, it, B, &failed, err, sizeof err);
            dt[i] = bu_now_s() - tb;
            for (int q = 0; rc == 0 && q < B; q++)
                len[q]++;
        }
        if (rc < 0) {
            fprintf(stderr, "bench_gpu: batched %s decode at %d: %s\n", mname, L, err);
            break;
        }
        batch_row *row = &rows[ci];
        row->step_ms = n_dec > 0 ? 1000.0 * bu_median(dt, n_dec) : 0;
        row->tps = row->step_ms > 0 ? B / (row->step_ms / 1000.0) : 0;
        row->gain = single[ci].ok && single[ci].decode_tps > 0 ? row->tps / single[ci].decode_tps
                                                               : 0;
        row->prefill_tps = rate;
        row->ok = 1;
        fprintf(stderr, "bench_gpu: batched %s ctx %6d: grown in %.1f s (%.0f tok/s), decode "
                "step of %d: %.2f ms (%.0f tok/s, %.2fx one sequence)\n", mname, L, tp, rate, B,
                row->step_ms, row->tps, row->gain);
    }
    if (rc == -ENOMEM)
        fprintf(stderr, "bench_gpu: batched %s: out of host memory\n", mname);
    else if (rc < 0)
        fprintf(stderr, "bench_gpu: batched %s: %s\n", mname, err);
    for (int q = 0; seq && q < B; q++)
        fwd_seq_destroy(seq[q]);
    free(seq), free(tok), free(len), free(who), free(it), free(dt);
    fwd_destroy(s);
}

/* ---- decode attention alone ------------------------------------------------------- */

static double copy_bandwidth(kcu_ctx *c, size_t bytes, int reps)
{
    char err[256];
    void *a = NULL, *b = NULL;
    kcu_timer *t = NULL;
    double best = 0;
    if (kcu_malloc(c, &a, bytes, err, sizeof err) < 0 ||
        kcu_malloc(c, &b, bytes, err, sizeof err) < 0 ||
        kcu_timer_create(c, &t, err, sizeof err) < 0 ||
        kcu_memset(c, a, 1, bytes, err, sizeof err) < 0) {
        fprintf(stderr, "bench_gpu: copy bandwidth: %s\n", err);
        goto done;
    }
    double *v = malloc((size_t)reps * sizeof *v);
    int n = 0;
    for (int i = 0; i < reps; i++) {
        double ms;
        if (kcu_timer_start(t, err, sizeof err) < 0 || kcu_d2d(c, b, a, bytes, err, sizeof err) < 0 ||
            kcu_timer_stop(t, err, sizeof err) < 0 || kcu_timer_ms(t, &ms, err, sizeof err) < 0)
            break;
        v[n++] = ms;
    }
    if (n > 0)
        best = 2.0 * (double)bytes / (bu_median(v, n) * 1e-3) / 1e9; /* read + write */
    free(v);
done:
    kcu_timer_destroy(t);
    kcu_free(c, a);
    kcu_free(c, b);
    return best;
}

/* B sequences of L positions each (INT4 blocks or FP16 pages of T
 * positions), one layer; times kcu_attn for one query per sequence. */
static void run_attn(kcu_ctx *c, int int4, int B, int L, int n_head, int n_kv, int hd,
                     attn_row *out)
{
    char err[512] = "";
    const int T = 128, D = n_kv * hd, nb = (L + T - 1) / T;
    kvq_layout Lq;
    memset(out, 0, sizeof *out);
    if (int4 && kvq_layout_init(&Lq, T, D, hd, hd, KVQ_K_PER_CHANNEL, 0.005f, err, sizeof err) < 0) {
        fprintf(stderr, "bench_gpu: layout: %s\n", err);
        return;
    }
    kcu_kv_arena A;
    memset(&A, 0, sizeof A);
    A.kv_dim = D;
    A.page_tokens = T;
    size_t unit = int4 ? Lq.bytes : (size_t)T * D * 2 * 2;
    size_t n_units = (size_t)B * nb;
    void *arena = NULL, *scr = NULL, *gen = NULL, *lohi = NULL, *tg = NULL;
    float *q = NULL, *o = NULL, *ks = NULL, *vs = NULL;
    kcu_attn_item *items_d = NULL;
    kcu_seg *segs_d = NULL;
    kcu_timer *t = NULL;
    int rc = kcu_malloc(c, &arena, n_units * unit, err, sizeof err);
    if (int4) {
        A.qarena = arena;
        A.q_stride = A.q_layer = Lq.bytes;
    } else {
        A.farena = arena;
        A.f_stride = A.f_layer = unit;
    }
    /* fill: FP16 pages directly with random halves; INT4 blocks by
     * quantizing random K/V (uniform in [-1.2, 1.2] against the range
     * [-1, 1]: the outlier lists fill to their budget, the worst case) */
    const int G = 16; /* blocks generated per batch */
    if (rc == 0 && !int4)
        rc = kcu_fill_uniform(c, KT_F16, arena, n_units * unit / 2, 99, -1.0f, 1.0f, err,
                              sizeof err);
    if (rc == 0 && int4) {
        size_t qsb = kcu_kvq_quant_scratch_bytes(&Lq, G);
        rc = kcu_malloc(c, &scr, qsb, err, sizeof err);
        if (rc == 0)
            rc = kcu_malloc(c, &gen, (size_t)2 * G * T * D * sizeof(float), err, sizeof err);
        if (rc == 0)
            rc = kcu_malloc(c, &lohi, (size_t)2 * D * sizeof(float), err, sizeof err);
        if (rc == 0)
            rc = kcu_fill_uniform(c, KT_F32, lohi, (size_t)D, 1, -1.0f, -1.0f, err, sizeof err);
        if (rc == 0)
            rc = kcu_fill_uniform(c, KT_F32, (float *)lohi + D, (size_t)D, 1, 1.0f, 1.0f, err,
                                  sizeof err);
        if (rc == 0)
            rc = kcu_malloc(c, &tg, (size_t)G * sizeof(kcu_q_tgt), err, sizeof err);
        float *gk = gen, *gv = (float *)gen + (size_t)G * T * D;
        for (size_t b0 = 0; rc == 0 && b0 < n_units; b0 += G) {
            int nbk = n_units - b0 < (size_t)G ? (int)(n_units - b0) : G;
            kcu_q_tgt h[16];
            for (int j = 0; j < nbk; j++)
                h[j] = (kcu_q_tgt){(int32_t)(b0 + j), j * T, T, 0};
            rc = kcu_fill_uniform(c, KT_F32, gen, (size_t)2 * G * T * D, 1000 + b0, -1.2f, 1.2f,
                                  err, sizeof err);
            if (rc == 0)
                rc = kcu_h2d(c, tg, h, (size_t)nbk * sizeof *h, err, sizeof err);
            if (rc == 0)
                rc = kcu_kvq_quantize(c, &Lq, &A, 0, (const kcu_q_tgt *)tg, nbk, G, gk, gv,
                                      (size_t)D, (float *)lohi, (float *)lohi + D,
                                      (float *)lohi, (float *)lohi + D, scr, qsb, err,
                                      sizeof err);
            if (rc == 0)
                rc = kcu_sync(c, err, sizeof err); /* tg is reused */
        }
    }
    /* the bytes the kernel reads */
    double bytes = 0;
    if (rc == 0 && int4) {
        int64_t sums[4] = {0, 0, 0, 0};
        int32_t *ids = malloc(n_units * sizeof *ids);
        void *dids = NULL, *dsum = NULL;
        for (size_t i = 0; i < n_units; i++)
            ids[i] = (int32_t)i;
        rc = kcu_malloc(c, &dids, n_units * sizeof *ids, err, sizeof err);
        if (rc == 0)
            rc = kcu_malloc(c, &dsum, sizeof sums, err, sizeof err);
        if (rc == 0)
            rc = kcu_h2d(c, dids, ids, n_units * sizeof *ids, err, sizeof err);
        if (rc == 0)
            rc = kcu_h2d(c, dsum, sums, sizeof sums, err, sizeof err);
        if (rc == 0)
            rc = kcu_kvq_count_blocks(c, &A, 1, dids, (int)n_units, dsum, err, sizeof err);
        if (rc == 0)
            rc = kcu_d2h(c, sums, dsum, sizeof sums, err, sizeof err);
        kcu_free(c, dids);
        kcu_free(c, dsum);
        free(ids);
        bytes = (double)n_units * (double)(Lq.bytes_dense + Lq.bytes_scales + 16) +
                (double)sums[1] * 6.0;
    } else if (rc == 0) {
        bytes = (double)B * L * D * 2 * 2;
    }
    /* items: B sequences, history = nb full units, then one query each */
    size_t Qw = (size_t)n_head * hd;
    kcu_attn_item *items = calloc((size_t)B, sizeof *items);
    kcu_seg *segs = calloc(n_units, sizeof *segs);
    for (int i = 0; i < B; i++) {
        for (int j = 0; j < nb; j++)
            segs[(size_t)i * nb + j] = (kcu_seg){int4 ? KVS_Q4 : KVS_F16, j * T, T, i * nb + j};
        items[i] = (kcu_attn_item){i * nb, nb, nb * T, 1, i, i, {0, 0}};
    }
    kcu_attn_shape sh = {n_head, n_kv, hd, 1.0f / sqrtf((float)hd), int4 ? &Lq : NULL, 0};
    size_t asb = kcu_attn_scratch_bytes(&sh, B, B, 1);
    void *ascr = NULL;
    if (rc == 0)
        rc = kcu_malloc(c, (void **)&items_d, (size_t)B * sizeof *items, err, sizeof err);
    if (rc == 0)
        rc = kcu_malloc(c, (void **)&segs_d, n_units * sizeof *segs, err, sizeof err);
    if (rc == 0)
        rc = kcu_malloc(c, (void **)&q, (size_t)B * Qw * 4, err, sizeof err);
    if (rc == 0)
        rc = kcu_malloc(c, (void **)&o, (size_t)B * Qw * 4, err, sizeof err);
    if (rc == 0)
        rc = kcu_malloc(c, (void **)&ks, (size_t)B * D * 4, err, sizeof err);
    if (rc == 0)
        rc = kcu_malloc(c, (void **)&vs, (size_t)B * D * 4, err, sizeof err);
    if (rc == 0)
        rc = kcu_malloc(c, &ascr, asb, err, sizeof err);
    if (rc == 0)
        rc = kcu_h2d(c, items_d, items, (size_t)B * sizeof *items, err, sizeof err);
    if (rc == 0)
        rc = kcu_h2d(c, segs_d, segs, n_units * sizeof *segs, err, sizeof err);
    if (rc == 0)
        rc = kcu_fill_uniform(c, KT_F32, q, (size_t)B * Qw, 5, -1.0f, 1.0f, err, sizeof err);
    if (rc == 0)
        rc = kcu_fill_uniform(c, KT_F32, ks, (size_t)B * D, 6, -1.0f, 1.0f, err, sizeof err);
    if (rc == 0)
        rc = kcu_fill_uniform(c, KT_F32, vs, (size_t)B * D, 7, -1.0f, 1.0f, err, sizeof err);
    if (rc == 0)
        rc = kcu_timer_create(c, &t, err, sizeof err);
    const int reps = 20;
    double v[20];
    int n = 0;
    for (int i = 0; rc == 0 && i < reps + 2; i++) {
        double ms;
        rc = kcu_timer_start(t, err, sizeof err);
        if (rc == 0)
            rc = kcu_attn(c, &sh, &A, 0, items, items_d, B, segs_d, q, o, ks, vs, KCU_ATTN_AUTO,
                          ascr, asb, err, sizeof err);
        if (rc == 0)
            rc = kcu_timer_stop(t, err, sizeof err);
        if (rc == 0)
            rc = kcu_timer_ms(t, &ms, err, sizeof err);
        if (rc == 0 && i >= 2)
            v[n++] = ms; /* the first two are warm-up */
    }
    if (rc == 0 && n > 0) {
        out->ok = 1;
        out->ms = bu_median(v, n);
        out->bytes = bytes;
        out->gbps = bytes / (out->ms * 1e-3) / 1e9;
        fprintf(stderr, "bench_gpu: decode attention %s, %d x %d positions: %.3f ms, %.1f MB "
                "read, %.0f GB/s (%s kernel)\n", int4 ? "int4" : "fp16", B, L, out->ms,
                bytes / 1e6, out->gbps, kcu_attn_mma_supported(&sh) ? "tensor-core" : "generic");
    } else {
        fprintf(stderr, "bench_gpu: decode attention %s: %s\n", int4 ? "int4" : "fp16", err);
    }
    kcu_timer_destroy(t);
    kcu_free(c, arena);
    kcu_free(c, scr);
    kcu_free(c, gen);
    kcu_free(c, lohi);
    kcu_free(c, tg);
    kcu_free(c, items_d);
    kcu_free(c, segs_d);
    kcu_free(c, q);
    kcu_free(c, o);
    kcu_free(c, ks);
    kcu_free(c, vs);
    kcu_free(c, ascr);
    free(items);
    free(segs);
}

/* ---- main ---------------------------------------------------------------------- */

static int parse_ctx(const char *s, int *ctx)
{
    int n = 0;
    while (*s && n < MAX_CTX) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < 16 || v > (1 << 20))
            return -1;
        ctx[n++] = (int)v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',')
            return -1;
    }
    for (int i = 1; i < n; i++)
        if (ctx[i] < ctx[i - 1])
            return -1;
    return n;
}

int main(int argc, char **argv)
{
    int ctx[MAX_CTX] = {1024, 8192, 32768}, n_ctx = 3, n_dec = 16, B = 16, tiny = 0;
    int do_model = 1, do_attn = 1, do_batched = 1;
    double batched_budget = 150;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--ctx") && i + 1 < argc) {
            n_ctx = parse_ctx(argv[++i], ctx);
            if (n_ctx <= 0) {
                fprintf(stderr, "bench_gpu: --ctx expects increasing sizes like 1024,8192\n");
                return 2;
            }
        } else if (!strcmp(argv[i], "--decode") && i + 1 < argc) {
            n_dec = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--batch") && i + 1 < argc) {
            B = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--tiny")) {
            tiny = 1;
        } else if (!strcmp(argv[i], "--no-model")) {
            do_model = 0;
        } else if (!strcmp(argv[i], "--no-attn")) {
            do_attn = 0;
        } else if (!strcmp(argv[i], "--no-batched")) {
            do_batched = 0;
        } else if (!strcmp(argv[i], "--batched-budget") && i + 1 < argc) {
            batched_budget = atof(argv[++i]);
        } else {
            fprintf(stderr, "usage: bench_gpu [--ctx 1024,8192,32768] [--decode N] [--batch B] "
                            "[--tiny] [--no-model] [--no-attn] [--no-batched] "
                            "[--batched-budget S]\n");
            return 2;
        }
    }
    if (n_dec < 0 || n_dec > 4096 || B < 1 || B > 256) {
        fprintf(stderr, "bench_gpu: --decode 0..4096, --batch 1..256\n");
        return 2;
    }
    char why[256] = "";
    if (kcu_device_count(why, sizeof why) <= 0) {
        printf("bench_gpu: no CUDA device (%s): nothing to measure\n", why);
        return 77;
    }
    /* Llama-3-8B, or a miniature for smoke tests */
    mdl_hparams hp = {.n_vocab = 128256, .dim = 4096, .hidden_dim = 14336, .n_layers = 32,
                      .n_heads = 32, .n_kv_heads = 8, .head_dim = 128, .n_rot = 128,
                      .n_ctx_train = 131072, .rope_theta = 500000.0f, .rope_freq_scale = 1.0f,
                      .norm_eps = 1e-5f, .embd_scale = 1.0f, .attn_scale = 0.08838834764f,
                      .rope_theta_local = 500000.0f};
    if (tiny) {
        hp = (mdl_hparams){.n_vocab = 256, .dim = 128, .hidden_dim = 256, .n_layers = 1,
                           .n_heads = 4, .n_kv_heads = 2, .head_dim = 64, .n_rot = 64,
                           .n_ctx_train = 4096, .rope_theta = 10000.0f,
                           .rope_freq_scale = 1.0f, .norm_eps = 1e-5f, .embd_scale = 1.0f,
                           .attn_scale = 0.125f, .rope_theta_local = 10000.0f};
        ctx[0] = 48, ctx[1] = 200, n_ctx = 2;
        n_dec = 2;
        B = 2;
    }
    /* the defaults of the cache; small chunks in --tiny so that warm-up
     * staging, live quantization and the decode tail all run */
    cfg_kv kv = cfg_kv_default();
    if (tiny) {
        kv.chunk_size = 64;
        kv.block_tokens = 32;
    }
    int prof_ctx = ctx[n_ctx > 1 ? 1 : 0];
    for (int i = 0; i < n_ctx; i++)
        if (ctx[i] == 8192)
            prof_ctx = 8192;
    model_row rows[2][MAX_CTX];
    memset(rows, 0, sizeof rows);
    if (do_model) {
        kv.mode = CFG_KV_FP16;
        run_model(&hp, &kv, ctx, n_ctx, n_dec, prof_ctx, rows[0]);
        kv.mode = CFG_KV_INT4;
        run_model(&hp, &kv, ctx, n_ctx, n_dec, prof_ctx, rows[1]);
    }
    attn_row ar[2];
    memset(ar, 0, sizeof ar);
    double copy_gbps = 0;
    char dev[256] = "?";
    if (do_attn) {
        char err[512];
        kcu_ctx *c = NULL;
        if (kcu_ctx_create(0, &c, err, sizeof err) < 0) {
            fprintf(stderr, "bench_gpu: %s\n", err);
        } else {
            snprintf(dev, sizeof dev, "%s", kcu_ctx_name(c));
            copy_gbps = copy_bandwidth(c, tiny ? ((size_t)4 << 20) : ((size_t)1 << 30),
                                       tiny ? 3 : 20);
            fprintf(stderr, "bench_gpu: device-to-device copy: %.0f GB/s\n", copy_gbps);
            int La = ctx[n_ctx - 1];
            run_attn(c, 0, B, La, hp.n_heads, hp.n_kv_heads, hp.head_dim, &ar[0]);
            run_attn(c, 1, B, La, hp.n_heads, hp.n_kv_heads, hp.head_dim, &ar[1]);
            kcu_ctx_destroy(c);
        }
    }

    printf("\n## GPU benchmark: %s model shape (%d layers, dim %d, %d/%d heads x %d), FP16 "
           "weights\n", tiny ? "tiny" : "Llama-3-8B", hp.n_layers, hp.dim, hp.n_heads,
           hp.n_kv_heads, hp.head_dim);
    if (do_model) {
        printf("\n| context | cache | prefill tok/s | decode tok/s | KV bytes/token | bits/elt |\n");
        printf("|---:|---|---:|---:|---:|---:|\n");
        for (int i = 0; i < n_ctx; i++)
            for (int mo = 0; mo < 2; mo++) {
                const model_row *r = &rows[mo][i];
                if (!r->ok) {
                    printf("| %d | %s | failed | | | |\n", ctx[i], mo ? "int4" : "fp16");
                    continue;
                }
                printf("| %d | %s | %.0f | %.1f | %.0f | %.2f |\n", r->ctx, mo ? "int4" : "fp16",
                       r->prefill_tps, r->decode_tps, r->kv_bytes_tok, r->bits);
            }
        for (int i = 0; i < n_ctx; i++)
            if (ctx[i] == prof_ctx && rows[0][i].ok && rows[1][i].ok)
                printf("\nKV store share of the prefill at %d: int4 %.2f%% (statistics + live "
                       "quantization + FP16 pages), fp16 %.2f%%; int4 prefill time / fp16 = "
                       "%.3f. Decode step at %d: int4 / fp16 time = %.3f.\n",
                       prof_ctx, 100 * rows[1][i].kv_share, 100 * rows[0][i].kv_share,
                       rows[0][i].prefill_tps / rows[1][i].prefill_tps, ctx[n_ctx - 1],
                       rows[1][n_ctx - 1].ok && rows[0][n_ctx - 1].ok
                           ? rows[0][n_ctx - 1].decode_tps / rows[1][n_ctx - 1].decode_tps
                           : 0.0);
    }
    if (do_attn) {
        printf("\nDecode attention alone, one layer, %d sequences x %d positions, on %s; "
               "copy bandwidth %.0f GB/s (device-to-device, read + write):\n\n", B,
               ctx[n_ctx - 1], dev, copy_gbps);
        printf("| cache | ms / call | MB read | GB/s | of copy bandwidth |\n|---|---:|---:|---:|---:|\n");
        for (int i = 0; i < 2; i++) {
            if (!ar[i].ok) {
                printf("| %s | failed | | | |\n", i ? "int4" : "fp16");
                continue;
            }
            printf("| %s | %.3f | %.1f | %.0f | %.1f%% |\n", i ? "int4" : "fp16", ar[i].ms,
                   ar[i].bytes / 1e6, ar[i].gbps, copy_gbps > 0 ? 100 * ar[i].gbps / copy_gbps : 0);
        }
    }
    fflush(stdout);
    /* continuous batching last: the longest part, bounded by its budget */
    batch_row br[2][MAX_CTX];
    memset(br, 0, sizeof br);
    int n_dec_b = n_dec > 0 ? n_dec : 1;
    if (do_batched) {
        kv.mode = CFG_KV_FP16;
        run_batched(&hp, &kv, ctx, n_ctx, n_dec_b, B, batched_budget / 2, rows[0], br[0]);
        kv.mode = CFG_KV_INT4;
        run_batched(&hp, &kv, ctx, n_ctx, n_dec_b, B, batched_budget / 2, rows[1], br[1]);
        printf("\nContinuous batching: %d sequences decoding together, one fwd_eval_batch step "
               "of %d tokens (logits of all copied to the host), median of %d steps; gain = "
               "decode tok/s over one sequence's at the same context (table above):\n\n", B, B,
               n_dec_b);
        printf("| context | cache | step ms | decode tok/s | gain | batched prefill tok/s |\n");
        printf("|---:|---|---:|---:|---:|---:|\n");
        for (int i = 0; i < n_ctx; i++)
            for (int mo = 0; mo < 2; mo++) {
                const batch_row *r = &br[mo][i];
                const char *mn = mo ? "int4" : "fp16";
                if (r->skipped)
                    printf("| %d | %s | not run (budget) | | | |\n", ctx[i], mn);
                else if (!r->ok)
                    printf("| %d | %s | failed | | | |\n", ctx[i], mn);
                else if (r->gain > 0)
                    printf("| %d | %s | %.2f | %.0f | %.2fx | %.0f |\n", ctx[i], mn, r->step_ms,
                           r->tps, r->gain, r->prefill_tps);
                else
                    printf("| %d | %s | %.2f | %.0f | | %.0f |\n", ctx[i], mn, r->step_ms, r->tps,
                           r->prefill_tps);
            }
    }
    int ok = 1;
    for (int i = 0; do_model && i < n_ctx; i++)
        ok = ok && rows[0][i].ok && rows[1][i].ok;
    for (int i = 0; do_batched && i < n_ctx; i++)
        ok = ok && (br[0][i].ok || br[0][i].skipped) && (br[1][i].ok || br[1][i].skipped);
    ok = ok && (!do_attn || (ar[0].ok && ar[1].ok));
    return ok ? 0 : 1;
}
