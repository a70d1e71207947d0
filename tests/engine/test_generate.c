/*
 * test_generate.c - end to end: greedy generation with the real tiny
 * checkpoints equals the known-good texts of ../shared/models/README.md,
 * with the optimized kernels and with the reference kernels.
 */
#include <criterion/criterion.h>
#include <string.h>

#include "engine/graph/forward.h"
#include "engine/model/model.h"
#include "tests/test_util.h"

/* Greedy-generates n tokens after prompt (BOS added) and returns the decoded
 * text of prompt + continuation (caller frees). */
static char *greedy(const char *model_path, const char *prompt, int n, int ref,
                    int32_t *ids_out, int *n_ids)
{
    char err[512];
    mdl_model *m = NULL;
    cr_assert_eq(mdl_load(model_path, NULL, &m, err, sizeof err), 0, "%s", err);
    int32_t ids[1024];
    int np = 0;
    cr_assert_eq(tok_encode(m->tok, prompt, strlen(prompt), 1, 0, ids, 1024, &np), 0);
    fwd_params fp = fwd_default_params();
    fp.n_ctx = np + n;
    fp.n_threads = 2;
    fp.use_ref = ref;
    fp.kv.mode = CFG_KV_FP16; /* the exact baseline */
    fwd_state *fs = NULL;
    cr_assert_eq(fwd_create(m, &fp, &fs, err, sizeof err), 0, "%s", err);
    const float *logits;
    cr_assert_eq(fwd_eval(fs, ids, np, 0, 0, &logits, err, sizeof err), 0, "%s", err);
    int total = np;
    for (int i = 0; i < n; i++) {
        int32_t best = 0;
        for (int v = 1; v < m->hp.n_vocab; v++)
            if (logits[v] > logits[best])
                best = v;
        ids[total++] = best;
        if (i + 1 < n)
            cr_assert_eq(fwd_eval(fs, &best, 1, total - 1, 0, &logits, err, sizeof err), 0,
                         "%s", err);
    }
    char *text = malloc(16384);
    tok_decode(m->tok, ids, total, 0, text, 16384);
    if (ids_out) {
        memcpy(ids_out, ids, (size_t)total * sizeof *ids);
        *n_ids = total;
    }
    fwd_destroy(fs);
    mdl_free(m);
    return text;
}

static const char *stories15m_expected =
    "Once upon a time, there was a little girl named Lily. She loved to play "
    "outside in the sunshine. One day, she saw a big, red ball in the sky. It "
    "was the sun! She thought it was so pretty.";

static const char *stories260k_expected =
    "Once upon a time, there was a little girl named Lily. She loved to play "
    "outside in the park. One day, she saw a big, red ball.";

Test(generate, stories15m_known_good, .timeout = 120)
{
    int32_t ids[1024];
    int n = 0;
    char *text = greedy(tu_shared("models/stories15M/stories15M.bin"),
                        "Once upon a time", 60, 0, ids, &n);
    cr_assert_eq(ids[0], 1);
    cr_assert_eq(ids[1], 9038);
    cr_assert_eq(ids[4], 931);
    cr_assert(strncmp(text, stories15m_expected, strlen(stories15m_expected)) == 0,
              "got: %s", text);
    free(text);
}

Test(generate, stories260k_known_good, .timeout = 120)
{
    char *text = greedy(tu_shared("models/stories260K/stories260K.bin"), "", 60, 0,
                        NULL, NULL);
    cr_assert(strncmp(text, stories260k_expected, strlen(stories260k_expected)) == 0,
              "got: %s", text);
    free(text);
}

Test(generate, reference_kernels_agree_on_stories, .timeout = 300)
{
    int32_t a[1024], b[1024];
    int na = 0, nb = 0;
    char *t1 = greedy(tu_shared("models/stories260K/stories260K.bin"), "", 60, 0, a, &na);
    char *t2 = greedy(tu_shared("models/stories260K/stories260K.bin"), "", 60, 1, b, &nb);
    cr_assert_eq(na, nb);
    for (int i = 0; i < na; i++)
        cr_assert_eq(a[i], b[i], "token %d differs: %d vs %d", i, a[i], b[i]);
    free(t1);
    free(t2);
    char *t3 = greedy(tu_shared("models/stories15M/stories15M.bin"), "Once upon a time", 30, 1,
                      NULL, NULL);
    cr_assert(strncmp(t3, stories15m_expected, 60) == 0, "ref got: %s", t3);
    free(t3);
}
