/*
 * bench_e2e.c - end-to-end CPU speed of the forward pass: prompt processing
 * (pp, tok/s) and generation (tg, tok/s) at given contexts, median of
 * several runs. Prints a markdown table (one row per figure) to stdout.
 *
 *   build/bench/bench_e2e -m models/SmolLM2-135M-Instruct.Q4_1.gguf -t 2 -r 5 \
 *       [-k fp16|int4] [-P 512,2048] [-G 16,2048]
 *
 * pp N: N prompt tokens evaluated from an empty cache in batches of 512.
 * tg N@C: N tokens generated one at a time after a C-token prompt (the
 * prompt is not timed). -k picks the KV cache (default fp16, the baseline
 * that llama.cpp is compared with). Tokens are a fixed pseudo-random sequence: speed does
 * not depend on the text. Not a test: timings are noisy on a shared machine.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench/bench_util.h"
#include "engine/graph/forward.h"
#include "engine/model/model.h"
#include "kernels/cpu/kcpu.h"

int main(int argc, char **argv)
{
    const char *model = NULL;
    int threads = 2, reps = 5;
    int opt;
    cfg_kv kv = cfg_kv_default();
    kv.mode = CFG_KV_FP16;
    char err[512];
    int pp[8] = {512, 2048}, npp = 2, tg_ctx[8] = {16, 2048}, ntg = 2;
    while ((opt = getopt(argc, argv, "m:t:r:k:P:G:")) != -1) {
        switch (opt) {
        case 'P':
        case 'G': {
            int *dst = opt == 'P' ? pp : tg_ctx, cnt = 0;
            for (char *tok = strtok(optarg, ","); tok && cnt < 8; tok = strtok(NULL, ","))
                dst[cnt++] = atoi(tok);
            for (int i = 0; i < cnt; i++)
                if (dst[i] < 1 || dst[i] > 65536) {
                    fprintf(stderr, "bench_e2e: sizes must be in [1, 65536]\n");
                    return 2;
                }
            *(opt == 'P' ? &npp : &ntg) = cnt;
            break;
        }
        case 'm': model = optarg; break;
        case 'k':
            if (cfg_kv_set(&kv, "kv_cache", optarg, err, sizeof err) < 0) {
                fprintf(stderr, "bench_e2e: %s\n", err);
                return 2;
            }
            break;
        case 't': threads = atoi(optarg); break;
        case 'r': reps = atoi(optarg); break;
        default:
            fprintf(stderr, "usage: bench_e2e -m MODEL [-t THREADS] [-r REPS] [-k fp16|int4]\n");
            return 2;
        }
    }
    if (!model || threads < 1 || reps < 1 || reps > 100) {
        fprintf(stderr, "usage: bench_e2e -m MODEL [-t THREADS] [-r REPS]\n");
        return 2;
    }
    mdl_model *m = NULL;
    if (mdl_load(model, NULL, &m, err, sizeof err) < 0) {
        fprintf(stderr, "bench_e2e: %s\n", err);
        return 1;
    }
    int n_ctx = 0;
    for (int i = 0; i < npp; i++)
        n_ctx = pp[i] > n_ctx ? pp[i] : n_ctx;
    for (int i = 0; i < ntg; i++)
        n_ctx = tg_ctx[i] + 64 > n_ctx ? tg_ctx[i] + 64 : n_ctx;
    int32_t *ids = malloc((size_t)n_ctx * sizeof *ids);
    uint32_t x = 42;
    for (int i = 0; i < n_ctx; i++) {
        x = x * 1664525u + 1013904223u;
        ids[i] = (int32_t)(100 + (x >> 8) % (uint32_t)(m->hp.n_vocab - 200));
    }
    fwd_params fp = fwd_default_params();
    fp.n_ctx = n_ctx;
    fp.n_threads = threads;
    fp.kv = kv;
    fwd_state *s = NULL;
    if (fwd_create(m, &fp, &s, err, sizeof err) < 0) {
        fprintf(stderr, "bench_e2e: %s\n", err);
        return 1;
    }
    const float *lg;
    double t[100];
    const char *kvn = cfg_kv_mode_name(&kv);
    printf("| model | kernels | kv | threads | test | tok/s (median of %d) |\n", reps);
    printf("|---|---|---|---|---|---|\n");
    for (int k = 0; k < npp; k++) {
        fwd_eval(s, ids, 64, 0, 0, &lg, err, sizeof err); /* warm-up */
        for (int r = 0; r < reps; r++) {
            double t0 = bu_now_s();
            if (fwd_eval(s, ids, pp[k], 0, 0, &lg, err, sizeof err) < 0) {
                fprintf(stderr, "bench_e2e: %s\n", err);
                return 1;
            }
            t[r] = pp[k] / (bu_now_s() - t0);
        }
        printf("| %s | %s | %s | %d | pp%d | %.1f |\n", m->name, kcpu_simd_name(), kvn,
               threads, pp[k], bu_median(t, reps));
        fflush(stdout);
    }
    const int n_gen = 64;
    for (int k = 0; k < ntg; k++) {
        for (int r = 0; r < reps; r++) {
            if (fwd_eval(s, ids, tg_ctx[k], 0, 0, &lg, err, sizeof err) < 0) {
                fprintf(stderr, "bench_e2e: %s\n", err);
                return 1;
            }
            double t0 = bu_now_s();
            for (int i = 0; i < n_gen; i++)
                fwd_eval(s, &ids[tg_ctx[k] + i], 1, tg_ctx[k] + i, 0, &lg, err, sizeof err);
            t[r] = n_gen / (bu_now_s() - t0);
        }
        printf("| %s | %s | %s | %d | tg%d@%d | %.1f |\n", m->name, kcpu_simd_name(), kvn,
               threads, n_gen, tg_ctx[k], bu_median(t, reps));
        fflush(stdout);
    }
    fwd_destroy(s);
    mdl_free(m);
    free(ids);
    return 0;
}
