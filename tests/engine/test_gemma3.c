/*
 * test_gemma3.c - the real Gemma-3-270M Q4_K_M GGUF through the engine
 * (loader, one layer graph, CPU backend) against HF transformers.
 *
 * Golden: tests/golden/gemma3_270m_logits.txt, made by
 * tests/golden/make_gemma3_golden.py (HF Gemma3ForCausalLM float32 loaded
 * from this GGUF, cross-checked by a numpy float64 pass; see its header and
 * docs/models.md). It holds 640 token ids (BOS + Moby-Dick from "CHAPTER 1.
 * Loomings."), so positions 512..639 see the 512-token window of the window
 * layers (removing the window moves those logits by up to 16), and for
 * every position the golden's argmax, top-1/top-2 margin and logsumexp with
 * its top 20 (every 8th position and the last) or top 4 logits, and HF's
 * greedy continuation of 16 tokens with its margins.
 *
 * Tests:
 * - ids_are_our_tokenizers: the golden's ids are what our tokenizer (from
 *   the GGUF's metadata) makes of the recorded bytes of moby-dick.txt.
 * - cpu_kernels: all 640 positions (prefill in pieces of PIECE tokens, KV
 *   cache FP16) on the optimized kernels, then the 16 greedy tokens as
 *   single-token decode steps (teacher-forced with the golden's tokens).
 *   Weights are identical after dequantization, but for quantized weights
 *   the kernels round the activations to 8 bits per block before the
 *   integer dot products (as llama.cpp does), which moves logits by far more
 *   than float rounding (and a different kcpu path, or a reordered sum,
 *   moves a sensitive position by a few tenths). Tolerances TOL_CPU_*
 *   below, set from measurement (docs/models.md): on the recorded logits,
 *   on the lse, and on the log-probabilities (logit - lse) of the recorded
 *   logits.
 * - reference_kernels: kernels/ref (float activations, single-threaded) on
 *   the first N_REF positions: only float32 summation order differs;
 *   TOL_REF.
 * Argmax: equal to the golden's where its top-1/top-2 margin is at least
 * STRICT_MARGIN, else within the golden's top 3. Greedy: the engine's
 * argmax at each step equals the golden's token where its margin allows.
 * Perplexity over the 639 predictions within TOL_PPL_REL of HF's (an
 * aggregate the window moves by 14%).
 *
 * Exact window semantics (a query at p sees p-W+1..p) are tested on a tiny
 * model by test_arch_hf (gemma3_swa, 1e-4); here an off-by-one would hide
 * in the q8 noise, a missing window would not (it fails at position 569).
 *
 * Skips (one line says why) when the GGUF is absent, when the loader refuses
 * a tensor type, or when the backend refuses sliding-window attention.
 * Single-threaded test code.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/graph/forward.h"
#include "engine/model/model.h"
#include "tests/test_util.h"
#include "tests/tokenizer/tok_test_util.h"

/* Measured (docs/models.md; a trial merge of the swa and kquant branches,
 * 640 positions, per kcpu path): max |diff| on the recorded top-k logits
 * 0.74 (avx2) to 1.07 (avx512, avx512vnni; 0.98 scalar), on the lse 0.60 to
 * 1.06, on their log-probabilities 0.67 to 0.85; perplexity +0.26% to
 * +0.44%; kernels/ref 1.8e-5 / 1.0e-5 on 16 positions in one piece (4.9e-3
 * over all 640, where later pieces read the FP16 cache). The golden's
 * numpy q8 simulation: 1.33 top-20, 0.94 lse, +0.4%. Without its window the
 * model moves by up to 16 and its perplexity by +14%. */
#define TOL_CPU_TOP 1.5
#define TOL_CPU_LSE 1.5
#define TOL_CPU_LOGPROB 1.25
#define TOL_PPL_REL 0.01
#define TOL_REF 1e-3
#define STRICT_MARGIN 1.0
#define N_REF 16
#define PIECE 128
#define MAXN 1024
#define MAXK 20
#define MAXG 32

typedef struct {
    int n_tok, vocab;
    int32_t tok[MAXN];
    long text_off, text_len;
    int n_pos;
    int pos[MAXN], argmax[MAXN], k[MAXN];
    double margin[MAXN], lse[MAXN];
    int top_id[MAXN][MAXK];
    double top_v[MAXN][MAXK];
    double ppl;  /* HF's perplexity over the prompt's next-token predictions */
    int n_greedy;
    int32_t greedy[MAXG];
    double greedy_margin[MAXG];
} golden;

static golden G;

static void skip_line(FILE *f)
{
    int c;
    while ((c = fgetc(f)) != '\n' && c != EOF)
        ;
}

static void read_golden(const char *path, golden *g)
{
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f, "cannot open %s", path);
    memset(g, 0, sizeof *g);
    char word[64];
    int n;
    while (fscanf(f, "%63s", word) == 1) {
        if (word[0] == '#' || !strcmp(word, "model")) {
            skip_line(f);
        } else if (!strcmp(word, "vocab")) {
            cr_assert_eq(fscanf(f, "%d", &g->vocab), 1);
        } else if (!strcmp(word, "text")) {
            cr_assert_eq(fscanf(f, "%63s %ld %ld", word, &g->text_off, &g->text_len), 3);
        } else if (!strcmp(word, "tokens")) {
            cr_assert_eq(fscanf(f, "%d", &g->n_tok), 1);
            cr_assert(g->n_tok > 0 && g->n_tok <= MAXN);
            for (int i = 0; i < g->n_tok; i++)
                cr_assert_eq(fscanf(f, "%d", &g->tok[i]), 1);
        } else if (!strcmp(word, "pos")) {
            int i = g->n_pos++;
            cr_assert(i < MAXN);
            cr_assert_eq(fscanf(f, "%d argmax %d margin %lf lse %lf top %d", &g->pos[i],
                                &g->argmax[i], &g->margin[i], &g->lse[i], &g->k[i]), 5);
            cr_assert(g->k[i] >= 3 && g->k[i] <= MAXK && g->pos[i] == i);
            for (int j = 0; j < g->k[i]; j++)
                cr_assert_eq(fscanf(f, " %d:%lf", &g->top_id[i][j], &g->top_v[i][j]), 2);
        } else if (!strcmp(word, "perplexity")) {
            cr_assert_eq(fscanf(f, "%d %lf", &n, &g->ppl), 2);
            cr_assert_eq(n, g->n_tok - 1);
        } else if (!strcmp(word, "greedy")) {
            cr_assert_eq(fscanf(f, "%d", &n), 1);
            cr_assert(n > 0 && n <= MAXG);
            g->n_greedy = n;
            for (int i = 0; i < n; i++)
                cr_assert_eq(fscanf(f, "%d", &g->greedy[i]), 1);
        } else if (!strcmp(word, "greedy_margin")) {
            cr_assert_eq(fscanf(f, "%d", &n), 1);
            cr_assert_eq(n, g->n_greedy);
            for (int i = 0; i < n; i++)
                cr_assert_eq(fscanf(f, "%lf", &g->greedy_margin[i]), 1);
        } else {
            cr_assert_fail("%s: unexpected '%s'", path, word);
        }
    }
    fclose(f);
    cr_assert(g->n_pos == g->n_tok && g->n_greedy > 0 && g->text_len > 0 && g->ppl > 0,
              "%s: incomplete", path);
}

/* $LKQ_MODELS/, else ~/.cache/livekvq/; NULL when absent. */
static const char *gemma_path(void)
{
    static char buf[4096];
    const char *name = "gemma-3-270m-q4_k_m.gguf";
    const char *dir = getenv("LKQ_MODELS");
    if (dir) {
        snprintf(buf, sizeof buf, "%s/%s", dir, name);
        if (access(buf, R_OK) == 0)
            return buf;
    }
    const char *home = getenv("HOME");
    snprintf(buf, sizeof buf, "%s/.cache/livekvq/%s", home ? home : "", name);
    return access(buf, R_OK) == 0 ? buf : NULL;
}

static const char *golden_path(void)
{
    return tu_src("tests/golden/gemma3_270m_logits.txt");
}

static double lse_of(const float *x, int n)
{
    double mx = -INFINITY, s = 0;
    for (int i = 0; i < n; i++)
        mx = x[i] > mx ? x[i] : mx;
    for (int i = 0; i < n; i++)
        s += exp(x[i] - mx);
    return mx + log(s);
}

static int argmax(const float *x, int n)
{
    int b = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[b])
            b = i;
    return b;
}

/* The loaded model, or a skip naming the refusal (missing file, tensor types
 * the loader does not take yet). */
static mdl_model *load_or_skip(void)
{
    const char *path = gemma_path();
    if (!path)
        cr_skip_test("Gemma-3-270M GGUF not found ($LKQ_MODELS, ~/.cache/livekvq; scripts/setup.sh)");
    char err[512];
    mdl_model *m = NULL;
    if (mdl_load(path, NULL, &m, err, sizeof err) != 0) {
        if (strstr(err, "unsupported tensor type"))
            cr_skip_test("the loader does not take this GGUF's tensor types yet: %s", err);
        cr_assert_fail("%s", err);
    }
    cr_assert_str_eq(m->arch, "gemma3");
    cr_assert_eq(m->hp.n_vocab, G.vocab);
    return m;
}

/* After a failed fwd_create / fwd_eval: frees s and m and skips when the
 * backend refused the window layers (else the caller's assert fails). */
static void skip_if_no_window(int rc, const char *err, fwd_state *s, mdl_model *m)
{
    if (rc && strstr(err, "sliding-window") && strstr(err, "not supported")) {
        fwd_destroy(s);
        mdl_free(m);
        cr_skip_test("the backend refuses Gemma-3's window layers: %s", err);
    }
}

typedef struct {
    double top, lse;  /* max |diff| on the recorded top-k logits, on the lse */
    double lp;        /* max |diff| on their log-probabilities (logit - lse) */
    int top_pos, lse_pos, lp_pos;
    int strict, loose;  /* argmax checked equal / within the golden top 3 */
    int argmax_equal;   /* positions where the engine's argmax = golden's */
    double nll;         /* sum of -log p(next token) over the positions seen */
    int n_nll;
} cmp_stats;

/* Compares the engine's logits l [V] of position p with the golden. */
static void compare_pos(const float *l, int V, int p, const char *how, cmp_stats *st)
{
    double lse = lse_of(l, V);
    for (int j = 0; j < G.k[p]; j++) {
        double d = fabs(l[G.top_id[p][j]] - G.top_v[p][j]);
        if (!(d <= st->top)) {
            st->top = isnan(d) ? INFINITY : d;
            st->top_pos = p;
        }
        d = fabs((l[G.top_id[p][j]] - lse) - (G.top_v[p][j] - G.lse[p]));
        if (!(d <= st->lp)) {
            st->lp = isnan(d) ? INFINITY : d;
            st->lp_pos = p;
        }
    }
    if (p + 1 < G.n_tok) {
        st->nll += lse - l[G.tok[p + 1]];
        st->n_nll++;
    }
    double d = fabs(lse - G.lse[p]);
    if (!(d <= st->lse)) {
        st->lse = isnan(d) ? INFINITY : d;
        st->lse_pos = p;
    }
    int a = argmax(l, V);
    st->argmax_equal += a == G.argmax[p];
    if (G.margin[p] >= STRICT_MARGIN) {
        cr_assert_eq(a, G.argmax[p], "%s: pos %d argmax %d, golden %d (margin %.3f)", how, p, a,
                     G.argmax[p], G.margin[p]);
        st->strict++;
    } else {
        cr_assert(a == G.top_id[p][0] || a == G.top_id[p][1] || a == G.top_id[p][2],
                  "%s: pos %d argmax %d not in the golden top 3", how, p, a);
        st->loose++;
    }
}

/* Runs the first n golden tokens (all when n <= 0; prefill in pieces of
 * PIECE tokens, logits of every position), then, after all of them, the
 * golden greedy continuation as decode steps, on kernels/ref (ref = 1) or the
 * optimized CPU kernels; compares. */
static void run_and_compare(int ref, int n, double tol_top, double tol_lse, double tol_lp)
{
    read_golden(golden_path(), &G);
    if (n <= 0 || n > G.n_tok)
        n = G.n_tok;
    const int greedy = n == G.n_tok;
    mdl_model *m = load_or_skip();
    const char *how = ref ? "ref kernels" : "cpu kernels";
    char err[512];
    const int V = m->hp.n_vocab;
    fwd_params p = fwd_default_params();
    p.n_ctx = G.n_tok + G.n_greedy;
    p.max_batch = PIECE;
    p.logits_all = 1;
    p.n_threads = 2;
    p.use_ref = ref;
    p.kv.mode = CFG_KV_FP16;
    fwd_state *s = NULL;
    int rc = fwd_create(m, &p, &s, err, sizeof err);
    skip_if_no_window(rc, err, s, m);
    cr_assert_eq(rc, 0, "%s", err);

    cmp_stats st = {0};
    const float *lg = NULL;
    for (int p0 = 0; p0 < n; p0 += PIECE) {
        int k = n - p0 < PIECE ? n - p0 : PIECE;
        rc = fwd_eval(s, G.tok + p0, k, p0, 1, &lg, err, sizeof err);
        skip_if_no_window(rc, err, s, m);
        cr_assert_eq(rc, 0, "%s: %s", how, err);
        for (int i = 0; i < k; i++)
            compare_pos(lg + (size_t)i * V, V, p0 + i, how, &st);
    }
    cr_log_info("gemma3_270m (%s, KV FP16): %d positions, max |diff| top-k %.4g (pos %d), "
                "lse %.4g (pos %d), top-k log-prob %.4g (pos %d); argmax = golden at %d/%d "
                "(strict %d, top-3 %d)", how, n, st.top, st.top_pos, st.lse, st.lse_pos, st.lp,
                st.lp_pos, st.argmax_equal, n, st.strict, st.loose);
    if (st.n_nll == G.n_tok - 1) { /* the whole prompt: HF's perplexity is comparable */
        double ppl = exp(st.nll / st.n_nll);
        cr_log_info("gemma3_270m (%s): perplexity %.3f over %d predictions, HF %.3f (%+.2f%%)",
                    how, ppl, st.n_nll, G.ppl, 100 * (ppl / G.ppl - 1));
        cr_assert_leq(fabs(ppl / G.ppl - 1), TOL_PPL_REL, "%s: perplexity %.3f, HF %.3f", how,
                      ppl, G.ppl);
    }
    cr_assert_leq(st.top, tol_top, "%s: top-k logit diff %g > %g at pos %d", how, st.top, tol_top,
                  st.top_pos);
    cr_assert_leq(st.lse, tol_lse, "%s: lse diff %g > %g at pos %d", how, st.lse, tol_lse,
                  st.lse_pos);
    cr_assert_leq(st.lp, tol_lp, "%s: top-k log-prob diff %g > %g at pos %d", how, st.lp, tol_lp,
                  st.lp_pos);

    if (greedy) { /* lg still holds the last piece: its last row predicts greedy[0] */
        const float *last = lg + (size_t)((n - 1) % PIECE) * V;
        int same = 0, checked = 0;
        for (int i = 0; i < G.n_greedy; i++) {
            int a = argmax(last, V);
            same += a == G.greedy[i];
            if (G.greedy_margin[i] >= STRICT_MARGIN) {
                cr_assert_eq(a, G.greedy[i], "%s: greedy step %d: %d, golden %d (margin %.3f)",
                             how, i, a, G.greedy[i], G.greedy_margin[i]);
                checked++;
            }
            if (i + 1 == G.n_greedy)
                break;
            /* teacher-forced: the golden's token, so later steps stay comparable */
            cr_assert_eq(fwd_eval(s, &G.greedy[i], 1, n + i, 0, &last, err, sizeof err), 0,
                         "%s: %s", how, err);
        }
        cr_log_info("gemma3_270m (%s): greedy continuation: %d/%d tokens equal to HF's "
                    "(%d with margin >= %.2f checked)", how, same, G.n_greedy, checked,
                    STRICT_MARGIN);
    }
    fwd_destroy(s);
    mdl_free(m);
}

Test(gemma3, ids_are_our_tokenizers)
{
    read_golden(golden_path(), &G);
    const char *path = gemma_path();
    if (!path)
        cr_skip_test("Gemma-3-270M GGUF not found ($LKQ_MODELS, ~/.cache/livekvq; scripts/setup.sh)");
    size_t n = 0;
    char *text = tt_read(tu_shared("data/moby-dick.txt"), &n);
    cr_assert_not_null(text);
    cr_assert_leq((size_t)(G.text_off + G.text_len), n);
    tt_vocab v;
    cr_assert_eq(tt_load_gguf_vocab(path, &v), 0);
    tok_tokenizer *t = NULL;
    char err[256];
    cr_assert_eq(tok_create(&v.d, &t, err, sizeof err), 0, "%s", err);
    int n_ids = 0;
    int32_t *ids = tt_encode(t, text + G.text_off, (size_t)G.text_len, 1, 0, &n_ids);
    cr_assert_not_null(ids);
    cr_assert_geq(n_ids, G.n_tok);
    for (int i = 0; i < G.n_tok; i++)
        cr_assert_eq(ids[i], G.tok[i], "id %d: ours %d, golden %d", i, ids[i], G.tok[i]);
    free(ids);
    free(text);
    tok_destroy(t);
    tt_vocab_free(&v);
}

Test(gemma3, cpu_kernels, .timeout = 240)
{
    run_and_compare(0, 0, TOL_CPU_TOP, TOL_CPU_LSE, TOL_CPU_LOGPROB);
}

Test(gemma3, reference_kernels, .timeout = 240)
{
    run_and_compare(1, N_REF, TOL_REF, TOL_REF, TOL_REF);
}
