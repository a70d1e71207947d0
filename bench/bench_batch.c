/*
 * bench_batch.c - what continuous batching buys at the engine level: one
 * decode step of B sequences (each with a prompt of L tokens already
 * cached) through fwd_eval_batch, per phase (fwd_profile), for B = 1 and
 * B = N; alternated over rounds, medians printed as a table. This is the
 * engine-side half of the server's batching target (bench/server_bench.sh
 * measures the whole server).
 *
 *   bench_batch -m MODEL [-L 1024] [-N 16] [-s 32 decode steps] [-r 5]
 *               [-t threads] [--kv fp16|int4]
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench/bench_util.h"
#include "engine/graph/forward.h"
#include "engine/model/model.h"

static int32_t next_tok(uint32_t *x, int32_t n_vocab)
{
    *x = *x * 1664525u + 1013904223u;
    return 3 + (int32_t)((*x >> 8) % (uint32_t)(n_vocab - 3));
}

static void die(const char *what, const char *err)
{
    fprintf(stderr, "bench_batch: %s: %s\n", what, err);
    exit(1);
}

/* Prefills b fresh sequences with L tokens each (chunk-aligned pieces, one
 * sequence per step), then runs `steps` decode steps over all b at once.
 * Returns the median-free totals of the decode phase in *prof and wall s. */
static double run(fwd_state *s, const mdl_model *m, int b, int L, int steps, int chunk,
                  fwd_profile *prof)
{
    char err[512];
    fwd_seq **seq = calloc((size_t)b, sizeof *seq);
    int32_t *buf = malloc((size_t)chunk * sizeof *buf);
    int32_t *dec = malloc((size_t)b * sizeof *dec);
    fwd_item *it = calloc((size_t)b, sizeof *it);
    if (!seq || !buf || !dec || !it)
        die("alloc", "out of memory");
    uint32_t x = 12345u;
    for (int i = 0; i < b; i++) {
        if (fwd_seq_create(s, L + steps + 1, &seq[i], err, sizeof err) < 0)
            die("fwd_seq_create", err);
        for (int done = 0; done < L;) {
            int n = L - done < chunk ? L - done : chunk;
            for (int j = 0; j < n; j++)
                buf[j] = done + j == 0 ? 1 : next_tok(&x, m->hp.n_vocab);
            fwd_item one = {.seq = seq[i], .tokens = buf, .n = n, .prefill = 1,
                            .want_logits = done + n == L};
            int failed = -1;
            if (fwd_eval_batch(s, &one, 1, &failed, err, sizeof err) < 0)
                die("prefill", err);
            done += n;
        }
    }
    fwd_profile_reset(s);
    double t0 = bu_now_s();
    for (int k = 0; k < steps; k++) {
        for (int i = 0; i < b; i++) {
            dec[i] = next_tok(&x, m->hp.n_vocab);
            it[i] = (fwd_item){.seq = seq[i], .tokens = &dec[i], .n = 1, .prefill = 0,
                               .want_logits = 1};
        }
        int failed = -1;
        if (fwd_eval_batch(s, it, b, &failed, err, sizeof err) < 0)
            die("decode", err);
    }
    double wall = bu_now_s() - t0;
    fwd_profile_get(s, prof);
    for (int i = 0; i < b; i++)
        fwd_seq_destroy(seq[i]);
    free(seq);
    free(buf);
    free(dec);
    free(it);
    return wall;
}

int main(int argc, char **argv)
{
    const char *model = NULL, *kv = "int4";
    int L = 1024, N = 16, steps = 32, rounds = 5, threads = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-m") && v)
            model = v, i++;
        else if (!strcmp(a, "-L") && v)
            L = atoi(v), i++;
        else if (!strcmp(a, "-N") && v)
            N = atoi(v), i++;
        else if (!strcmp(a, "-s") && v)
            steps = atoi(v), i++;
        else if (!strcmp(a, "-r") && v)
            rounds = atoi(v), i++;
        else if (!strcmp(a, "-t") && v)
            threads = atoi(v), i++;
        else if (!strcmp(a, "--kv") && v)
            kv = v, i++;
        else {
            fprintf(stderr, "usage: bench_batch -m MODEL [-L prompt] [-N seqs] [-s steps] "
                            "[-r rounds] [-t threads] [--kv fp16|int4]\n");
            return 2;
        }
    }
    if (!model || L < 1 || N < 1 || steps < 1 || rounds < 1)
        die("arguments", "-m MODEL is required; -L, -N, -s, -r must be >= 1");
    char err[512];
    mdl_model *m = NULL;
    if (mdl_load(model, NULL, &m, err, sizeof err) < 0)
        die(model, err);
    fwd_params p = fwd_default_params();
    p.n_threads = threads;
    p.max_seqs = N;
    p.n_ctx = L + steps + 1;
    if (cfg_kv_set(&p.kv, "kv_cache", kv, err, sizeof err) < 0)
        die("--kv", err);
    p.max_batch = p.kv.chunk_size + N;
    fwd_state *s = NULL;
    if (fwd_create(m, &p, &s, err, sizeof err) < 0)
        die("fwd_create", err);

    const int bs[2] = {1, N};
    double wall[2][64], ph[2][4][64];
    if (rounds > 64)
        rounds = 64;
    for (int r = 0; r < rounds; r++)
        for (int k = 0; k < 2; k++) {
            fwd_profile pr;
            wall[k][r] = run(s, m, bs[k], L, steps, p.kv.chunk_size, &pr) / steps;
            ph[k][0][r] = pr.matmul_s / steps;
            ph[k][1][r] = pr.attn_s / steps;
            ph[k][2][r] = pr.kv_store_s / steps;
            ph[k][3][r] = pr.other_s / steps;
        }
    printf("bench_batch: %s, %s cache, prompt %d tokens, %d decode steps x %d rounds, "
           "%d threads (medians, ms per decode step)\n\n",
           model, kv, L, steps, rounds, fwd_n_threads(s));
    printf("| sequences | step ms | matmul | attention | KV store | other | tok/s | per-seq ms |\n");
    printf("|---|---|---|---|---|---|---|---|\n");
    double tps[2];
    for (int k = 0; k < 2; k++) {
        double w = bu_median(wall[k], rounds);
        tps[k] = bs[k] / w;
        printf("| %d | %.2f | %.2f | %.2f | %.2f | %.2f | %.1f | %.2f |\n", bs[k], 1e3 * w,
               1e3 * bu_median(ph[k][0], rounds), 1e3 * bu_median(ph[k][1], rounds),
               1e3 * bu_median(ph[k][2], rounds), 1e3 * bu_median(ph[k][3], rounds), tps[k],
               1e3 * w / bs[k]);
    }
    printf("\nbatching gain (decode tok/s, %d vs 1 sequences): %.2fx\n", N, tps[1] / tps[0]);
    fwd_destroy(s);
    mdl_free(m);
    return 0;
}
