/*
 * bench_http.c - overhead of the HTTP layer: the same work (a prompt, then
 * N generated tokens, greedy) done in-process the way the CLI does it
 * (fwd_eval + sampler + decoder, the `livekvq generate` loop) and as
 * non-streaming POST /v1/completions requests to a running livekvq-server
 * (one keep-alive libcurl connection, concurrency 1). Alternates the two,
 * R rounds, and prints medians and the ratio.
 *
 * usage: bench_http -m MODEL [--tokenizer T] --url http://127.0.0.1:PORT
 *                   [-p PROMPT] [-n 16] [-r 50] [-t THREADS]
 * The server must serve the same model with the same cache settings
 * (bench/server_bench.sh starts it).
 */
#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench/bench_util.h"
#include "engine/graph/forward.h"
#include "engine/model/model.h"
#include "engine/sample/sampler.h"
#include "tokenizer/tok.h"

static size_t sink(char *p, size_t sz, size_t nm, void *ud)
{
    (void)p;
    *(size_t *)ud += sz * nm;
    return sz * nm;
}

/* The CLI's generate loop for n tokens; returns seconds. */
static double cli_work(const mdl_model *m, fwd_state *fs, const int32_t *ids, int n_prompt,
                       int n_gen, int32_t *hist)
{
    char err[256], piece[512];
    smp_params sp = smp_default_params();
    sp.temperature = 0;
    smp_sampler *smp;
    if (smp_create(&sp, m->hp.n_vocab, &smp, err, sizeof err) < 0)
        return -1;
    double t0 = bu_now_s();
    memcpy(hist, ids, (size_t)n_prompt * sizeof *ids);
    const float *lg;
    if (fwd_eval(fs, ids, n_prompt, 0, 0, &lg, err, sizeof err) < 0) {
        fprintf(stderr, "bench_http: %s\n", err);
        smp_destroy(smp);
        return -1;
    }
    tok_decoder dec;
    tok_decoder_init(&dec, m->tok, 0);
    int pos = n_prompt;
    for (int g = 0; g < n_gen; g++) {
        int32_t t = smp_sample(smp, lg, hist, pos, NULL);
        hist[pos] = t;
        (void)tok_decoder_push(&dec, t, piece, sizeof piece);
        if (g + 1 == n_gen)
            break;
        if (fwd_eval(fs, &t, 1, pos, 0, &lg, err, sizeof err) < 0)
            break;
        pos++;
    }
    double dt = bu_now_s() - t0;
    smp_destroy(smp);
    return dt;
}

int main(int argc, char **argv)
{
    const char *model = NULL, *tokz = NULL, *url = NULL;
    const char *prompt = "Once upon a time, there was a little dog";
    int n_gen = 16, rounds = 50, threads = 2;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "-m")) model = argv[i + 1];
        else if (!strcmp(argv[i], "--tokenizer")) tokz = argv[i + 1];
        else if (!strcmp(argv[i], "--url")) url = argv[i + 1];
        else if (!strcmp(argv[i], "-p")) prompt = argv[i + 1];
        else if (!strcmp(argv[i], "-n")) n_gen = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-r")) rounds = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-t")) threads = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "bench_http: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (!model || !url || n_gen < 1 || rounds < 1 || rounds > 10000) {
        fprintf(stderr, "usage: bench_http -m MODEL [--tokenizer T] --url URL [-p PROMPT] "
                        "[-n 16] [-r 50] [-t 2]\n");
        return 2;
    }
    char err[512];
    mdl_model *m = NULL;
    if (mdl_load(model, tokz, &m, err, sizeof err) < 0) {
        fprintf(stderr, "bench_http: %s\n", err);
        return 1;
    }
    int32_t ids[4096];
    int n_prompt = 0;
    if (tok_encode(m->tok, prompt, strlen(prompt), tok_default_add_bos(m->tok), 0, ids, 4096,
                   &n_prompt) < 0 || n_prompt + n_gen > 4000) {
        fprintf(stderr, "bench_http: prompt too long\n");
        return 1;
    }
    fwd_params fp = fwd_default_params();
    fp.n_ctx = n_prompt + n_gen + 1;
    fp.n_threads = threads;
    fwd_state *fs;
    if (fwd_create(m, &fp, &fs, err, sizeof err) < 0) {
        fprintf(stderr, "bench_http: %s\n", err);
        return 1;
    }
    int32_t *hist = malloc(4096 * sizeof *hist);

    char body[8192], full[512];
    snprintf(body, sizeof body, "{\"prompt\": \"%s\", \"max_tokens\": %d, \"temperature\": 0, "
             "\"ignore_eos\": true}", prompt, n_gen);
    snprintf(full, sizeof full, "%s/v1/completions", url);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    CURL *c = curl_easy_init();
    struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/json");
    size_t got = 0;
    curl_easy_setopt(c, CURLOPT_URL, full);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, sink);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &got);
    curl_easy_setopt(c, CURLOPT_TCP_NODELAY, 1L);

    double *tc = malloc((size_t)rounds * sizeof *tc), *th = malloc((size_t)rounds * sizeof *th);
    /* warm-up both */
    cli_work(m, fs, ids, n_prompt, n_gen, hist);
    if (curl_easy_perform(c) != CURLE_OK) {
        fprintf(stderr, "bench_http: cannot reach %s\n", full);
        return 1;
    }
    for (int r = 0; r < rounds; r++) {
        tc[r] = cli_work(m, fs, ids, n_prompt, n_gen, hist);
        double t0 = bu_now_s();
        long st = 0;
        if (curl_easy_perform(c) != CURLE_OK ||
            (curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &st), st != 200)) {
            fprintf(stderr, "bench_http: request failed (status %ld)\n", st);
            return 1;
        }
        th[r] = bu_now_s() - t0;
    }
    double mc = bu_median(tc, rounds), mh = bu_median(th, rounds);
    printf("| work | median ms (%d rounds) |\n|---|---|\n", rounds);
    printf("| in-process (CLI loop): %d prompt + %d generated tokens | %.3f |\n", n_prompt,
           n_gen, mc * 1e3);
    printf("| HTTP POST /v1/completions, non-streaming, keep-alive | %.3f |\n", mh * 1e3);
    printf("| ratio HTTP / in-process | %.3f |\n", mh / mc);
    curl_slist_free_all(h);
    curl_easy_cleanup(c);
    curl_global_cleanup();
    free(tc);
    free(th);
    free(hist);
    fwd_destroy(fs);
    mdl_free(m);
    return 0;
}
