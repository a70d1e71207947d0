/*
 * test_gpu_arch.c - the graph per architecture on the CUDA backend against
 * HF transformers: the tiny random-weight models of tests/engine/
 * test_arch_hf.c (qwen2 with biases, GQA 3 untied and MHA tied; Llama 3.1
 * rope_freqs GQA 8; Llama linear scaling with head_dim 32; Gemma-3 global
 * layers: Q/K norms, sandwich norms, GELU-tanh, sqrt(dim) embedding scale,
 * soft-cap) and their committed golden logits (tests/golden/tiny_*_logits
 * .txt: HF float32, 40 tokens, every position, vocab 256). The GGUFs are
 * written at test time by tests/golden/make_tiny_models.py --gguf-only,
 * through tests/engine/arch_hf.sh ($LKQ_TINY_DIR; without a python with gguf
 * + numpy the test is skipped, exit 77, saying so).
 *
 * Each model runs twice on the GPU, FP16 KV cache, logits of every position
 * compared with HF:
 *  - one prefill of all 40 tokens: max |diff| <= TOL_PREFILL 1e-4 (as on
 *    the CPU: the chunk attends to its own exact float K/V, only float32
 *    summation order differs; the generic attention kernel takes these
 *    head sizes, 16 and 32; F32 weights, FP32 GEMMs without TF32);
 *  - a prefill of 20, then 20 single-token decodes: max |diff| <=
 *    TOL_DECODE 1e-2 (decode reads the FP16 cache);
 *  - argmax equal wherever the golden top-1 / top-2 margin is >= 10 x tol.
 * gemma3_swa (window 8 on layers 0-4: sliding-window attention, and the
 * window layers' group of the KV pool dropping what the window passed).
 */
#include "tests/gpu/gpu_test.h"

#include <errno.h>

#include "engine/graph/forward.h"
#include "engine/model/model.h"
#include "tests/test_util.h"

#define TOL_PREFILL 1e-4
#define TOL_DECODE 1e-2
#define MAXT 64
#define MAXV 256

typedef struct {
    int n_tok, vocab, n_rows;
    int32_t tok[MAXT];
    float logits[MAXT][MAXV];
} golden;

static golden G;
static float E[MAXT][MAXV];

/* Reads a golden file (# comments, "model" line, vocab, tokens, logits);
 * 0 or -1 with a failed check. */
static int read_golden(const char *path, golden *g)
{
    FILE *f = fopen(path, "r");
    GT_CHECK(f != NULL, "cannot open %s", path);
    if (!f)
        return -1;
    memset(g, 0, sizeof *g);
    char word[64];
    int ok = 1;
    while (ok && fscanf(f, "%63s", word) == 1) {
        if (word[0] == '#' || !strcmp(word, "model")) {
            int c;
            while ((c = fgetc(f)) != '\n' && c != EOF)
                ;
        } else if (!strcmp(word, "vocab")) {
            ok = fscanf(f, "%d", &g->vocab) == 1 && g->vocab > 0 && g->vocab <= MAXV;
        } else if (!strcmp(word, "tokens")) {
            ok = fscanf(f, "%d", &g->n_tok) == 1 && g->n_tok > 0 && g->n_tok <= MAXT;
            for (int i = 0; ok && i < g->n_tok; i++)
                ok = fscanf(f, "%d", &g->tok[i]) == 1;
        } else if (!strcmp(word, "logits")) {
            int v = 0;
            ok = fscanf(f, "%d %d", &g->n_rows, &v) == 2 && g->n_rows == g->n_tok &&
                 v == g->vocab;
            for (int r = 0; ok && r < g->n_rows; r++)
                for (int j = 0; ok && j < v; j++)
                    ok = fscanf(f, "%f", &g->logits[r][j]) == 1;
        } else {
            ok = 0;
        }
    }
    fclose(f);
    GT_CHECK(ok && g->n_rows > 0, "%s: malformed golden file (at '%s')", path, word);
    return ok && g->n_rows > 0 ? 0 : -1;
}

static int argmax(const float *x, int n)
{
    int b = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[b])
            b = i;
    return b;
}

/* Top-1 minus top-2 of x. */
static double margin(const float *x, int n)
{
    double a = -INFINITY, b = -INFINITY;
    for (int i = 0; i < n; i++) {
        if (x[i] > a) {
            b = a;
            a = x[i];
        } else if (x[i] > b) {
            b = x[i];
        }
    }
    return a - b;
}

/* The golden tokens through m on the GPU: a prefill of `split` tokens
 * (logits of every position), then one decode per remaining token; every
 * logit compared with HF. Returns the fwd_* error, if any. */
static int compare_run(const mdl_model *m, const char *name, int split, char *err,
                       size_t errlen)
{
    fwd_params p = fwd_default_params();
    p.n_ctx = G.n_tok;
    p.max_batch = G.n_tok;
    p.logits_all = 1;
    p.device = BK_DEVICE_CUDA;
    p.kv.mode = CFG_KV_FP16;
    fwd_state *s = NULL;
    int rc = fwd_create(m, &p, &s, err, errlen);
    const float *lg = NULL;
    const size_t V = (size_t)G.vocab;
    if (rc == 0)
        rc = fwd_eval(s, G.tok, split, 0, 1, &lg, err, errlen);
    if (rc == 0)
        memcpy(E, lg, (size_t)split * V * sizeof(float));
    for (int i = split; rc == 0 && i < G.n_tok; i++) {
        rc = fwd_eval(s, &G.tok[i], 1, i, 0, &lg, err, errlen);
        if (rc == 0)
            memcpy(E[i], lg, V * sizeof(float));
    }
    fwd_destroy(s);
    if (rc < 0)
        return rc;
    const char *how = split == G.n_tok ? "prefill" : "prefill+decode";
    const double tol = split == G.n_tok ? TOL_PREFILL : TOL_DECODE;
    double worst = 0;
    int wp = 0, wi = 0;
    for (int r = 0; r < G.n_tok; r++)
        for (int j = 0; j < G.vocab; j++) {
            double d = fabs((double)E[r][j] - (double)G.logits[r][j]);
            if (!(d <= worst)) { /* NaN counts as worst */
                worst = isnan(d) ? INFINITY : d;
                wp = r;
                wi = j;
            }
        }
    if (getenv("GT_VERBOSE"))
        fprintf(stderr, "  tiny_%s (gpu, %s): max |diff| %.3g over %d x %d logits\n", name, how,
                worst, G.n_tok, G.vocab);
    GT_CHECK(worst <= tol, "tiny_%s (gpu, %s): max |diff| %g > %g at pos %d id %d (gpu %g, HF %g)",
             name, how, worst, tol, wp, wi, (double)E[wp][wi], (double)G.logits[wp][wi]);
    int bad = 0;
    for (int r = 0; r < G.n_tok; r++)
        if (margin(G.logits[r], G.vocab) >= 10 * tol)
            bad += argmax(E[r], G.vocab) != argmax(G.logits[r], G.vocab);
    GT_CHECK(bad == 0, "tiny_%s (gpu, %s): %d positions with a clear golden top-1 differ", name,
             how, bad);
    return 0;
}

/* Model `name` from $LKQ_TINY_DIR against its golden file; window = 1 for
 * the model with window layers (its descriptor says so). */
static void check_model(const char *name, int window)
{
    const char *dir = getenv("LKQ_TINY_DIR");
    char path[1024], gpath[128], err[512] = "";
    snprintf(path, sizeof path, "%s/tiny_%s.gguf", dir, name);
    snprintf(gpath, sizeof gpath, "tests/golden/tiny_%s_logits.txt", name);
    if (read_golden(tu_src(gpath), &G) < 0)
        return;
    mdl_model *m = NULL;
    if (mdl_load(path, NULL, &m, err, sizeof err) < 0) {
        GT_CHECK(0, "%s: %s", path, err);
        return;
    }
    GT_CHECK(m->hp.n_vocab == G.vocab, "tiny_%s: vocab %d, golden %d", name, m->hp.n_vocab,
             G.vocab);
    GT_CHECK((m->hp.sliding_window > 0) == window, "tiny_%s: sliding_window %d", name,
             m->hp.sliding_window);
    for (int run = 0; run < 2; run++) {
        err[0] = '\0';
        int rc = compare_run(m, name, run ? G.n_tok / 2 : G.n_tok, err, sizeof err);
        GT_CHECK(rc == 0, "tiny_%s: %s", name, err);
    }
    mdl_free(m);
}

static void case_qwen2(void)
{
    check_model("qwen2_gqa3", 0);
    check_model("qwen2_mha_tied", 0);
}

static void case_llama(void)
{
    check_model("llama31_gqa8", 0);
    check_model("llama_linear_hd32", 0);
}

static void case_gemma3(void)
{
    check_model("gemma3_global", 0);
    check_model("gemma3_swa", 1);
}

int main(void)
{
    if (!getenv("LKQ_TINY_DIR")) {
        printf("SKIP test_gpu_arch: LKQ_TINY_DIR not set (run through meson: "
               "tests/engine/arch_hf.sh writes the tiny models)\n");
        return 77;
    }
    gt_begin("test_gpu_arch");
    gt_case("qwen2", case_qwen2);
    gt_case("llama", case_llama);
    gt_case("gemma3", case_gemma3);
    return gt_end();
}
