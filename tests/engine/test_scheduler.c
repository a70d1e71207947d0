/*
 * test_scheduler.c - the engine thread without HTTP: a request's greedy
 * text equals a plain fwd_eval loop's (the CLI's), batching beside 7 other
 * requests changes nothing (FP16 and INT4 cache), stop sequences, n > 1,
 * logprobs, a full queue is refused, a pool too small for all requests
 * preempts and still finishes everything, and a cancelled request's
 * blocks return to the pool. With sliding-window layers (stories260K with
 * windows set on three of its five layers): batching still changes
 * nothing, admission by the global layers alone never runs the window
 * layers' reserved group dry (no preemption, every request finishes), and
 * every unit of both groups comes back. Fairness (issue 13): a small
 * request is not starved by one holding 16 sequences (a reserved quarter
 * of the slots, or a fair-share preemption when there is none), a short
 * prompt's prefill is not queued behind every chunk of a long one, a group
 * is queued all or nothing and refused when it can never fit the queue,
 * and a request longer than the KV pool holds is refused at submit.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "engine/graph/forward.h"
#include "engine/model/model.h"
#include "engine/sched/scheduler.h"
#include "tokenizer/tok.h"
#include "tests/test_util.h"

static mdl_model *load(const char *path)
{
    char err[512];
    mdl_model *m = NULL;
    cr_assert_eq(mdl_load(path, NULL, &m, err, sizeof err), 0, "%s", err);
    return m;
}

static const char *m260(void)
{
    return tu_shared("models/stories260K/stories260K.bin");
}

/* how the window layers (if the model has any) keep their positions */
static cfg_kv_mode g_window_kv = CFG_KV_FP16;

static sched *mk_cap(const mdl_model *m, cfg_kv_mode mode, int max_seqs, int64_t budget_tokens,
                     int per_req)
{
    char err[512];
    sched_params p = sched_default_params();
    p.max_seqs_per_req = per_req;
    p.n_ctx = 512;
    p.max_seqs = max_seqs;
    p.n_threads = 2;
    p.kv.mode = mode;
    p.kv.chunk_size = 64;
    p.kv.block_tokens = 32;
    p.kv.warmup_chunks = 1;
    p.kv.kv_budget_tokens = budget_tokens;
    p.kv.window_kv = g_window_kv;
    sched *s = NULL;
    cr_assert_eq(sched_create(m, &p, &s, err, sizeof err), 0, "%s", err);
    return s;
}

static sched *mk(const mdl_model *m, cfg_kv_mode mode, int max_seqs, int64_t budget_tokens)
{
    return mk_cap(m, mode, max_seqs, budget_tokens, 0);
}

static int32_t *encode(const mdl_model *m, const char *text, int *n)
{
    int32_t *ids = malloc(4096 * sizeof *ids);
    cr_assert_eq(tok_encode(m->tok, text, strlen(text), 1, 0, ids, 4096, n), 0);
    return ids;
}

/* Greedy continuation through fwd_eval (what the CLI does). */
static char *reference(const mdl_model *m, cfg_kv_mode mode, const int32_t *ids, int n,
                       int max_tokens)
{
    char err[512];
    fwd_params fp = fwd_default_params();
    fp.n_ctx = 512;
    fp.n_threads = 2;
    fp.kv.mode = mode;
    fp.kv.chunk_size = 64;
    fp.kv.block_tokens = 32;
    fp.kv.warmup_chunks = 1;
    fp.kv.window_kv = g_window_kv;
    fwd_state *fs;
    cr_assert_eq(fwd_create(m, &fp, &fs, err, sizeof err), 0, "%s", err);
    smp_params sp = smp_default_params();
    sp.temperature = 0;
    smp_sampler *smp;
    cr_assert_eq(smp_create(&sp, m->hp.n_vocab, &smp, err, sizeof err), 0);
    int32_t hist[600];
    memcpy(hist, ids, (size_t)n * sizeof *ids);
    const float *lg;
    cr_assert_eq(fwd_eval(fs, ids, n, 0, 0, &lg, err, sizeof err), 0, "%s", err);
    tok_decoder dec;
    tok_decoder_init(&dec, m->tok, 0);
    dec.first = 0;
    char *out = calloc(1, 65536);
    size_t len = 0;
    for (int g = 0; g < max_tokens; g++) {
        int32_t t = smp_sample(smp, lg, hist, n, NULL);
        if (tok_is_eog(m->tok, t))
            break;
        hist[n] = t;
        len += tok_decoder_push(&dec, t, out + len, 65536 - len);
        if (g + 1 == max_tokens)
            break;
        cr_assert_eq(fwd_eval(fs, &t, 1, n, 0, &lg, err, sizeof err), 0, "%s", err);
        n++;
    }
    len += tok_decoder_flush(&dec, out + len, 65536 - len);
    smp_destroy(smp);
    fwd_destroy(fs);
    return out;
}

/* Waits for r to finish; returns its choice texts concatenated with '|'. */
static char *collect(sched *s, sched_req *r, sched_out *o)
{
    char *all = calloc(1, 1 << 17);
    for (int it = 0; it < 6000; it++) {
        int any = sched_poll(s, &r, o, 1, 0, NULL, NULL);
        if (o->done)
            break;
        if (!any)
            usleep(5000);
    }
    cr_assert(o->done, "request did not finish");
    for (int i = 0; i < o->n_choices; i++) {
        if (i)
            strcat(all, "|");
        strncat(all, o->ch[i].text ? o->ch[i].text : "", o->ch[i].len);
    }
    return all;
}

static sched_req_params greedy(const int32_t *ids, int n, int max_tokens)
{
    sched_req_params p;
    memset(&p, 0, sizeof p);
    p.prompt = ids;
    p.n_prompt = n;
    p.max_tokens = max_tokens;
    p.n = 1;
    p.sp = smp_default_params();
    p.sp.temperature = 0;
    p.logprobs = -1;
    p.id = "test";
    return p;
}

static const char *prompts[8] = {
    "Once upon a time", "The little dog ran to the park and", "Lily had a red ball",
    "One day, a big bird", "Tom and Sue went to the store to buy", "The sun was hot",
    "There was a cat named Tim who liked to play with his toys every day",
    "Mom said"};

/* window > 0: layers 0, 1 and 3 become sliding-window layers of that
 * window. */
static void alone_vs_batched(cfg_kv_mode mode, int window)
{
    char err[512];
    mdl_model *m = load(m260());
    if (window > 0) {
        cr_assert_geq(m->hp.n_layers, 4);
        m->layers[0].window = m->layers[1].window = m->layers[3].window = window;
    }
    int n[8];
    int32_t *ids[8];
    for (int i = 0; i < 8; i++)
        ids[i] = encode(m, prompts[i], &n[i]);
    /* a long prompt for request 0: several chunks of 64 */
    char longp[4096] = "";
    for (int i = 0; i < 12; i++)
        strcat(longp, "Once upon a time there was a little girl named Lily. ");
    free(ids[0]);
    ids[0] = encode(m, longp, &n[0]);
    cr_assert_gt(n[0], 130);
    char *ref = reference(m, mode, ids[0], n[0], 40);

    sched *s = mk(m, mode, 8, 0);
    sched_out o;
    memset(&o, 0, sizeof o);
    sched_req_params p = greedy(ids[0], n[0], 40);
    sched_req *r;
    cr_assert_eq(sched_submit(s, &p, &r, err, sizeof err), 0, "%s", err);
    char *alone = collect(s, r, &o);
    sched_req_release(s, r);
    cr_assert_str_eq(alone, ref);

    sched_req *rs[8];
    sched_out os[8];
    memset(os, 0, sizeof os);
    for (int i = 7; i >= 0; i--) { /* request 0 last: it runs beside the others */
        sched_req_params q = greedy(ids[i], n[i], i == 0 ? 40 : 20 + 5 * i);
        cr_assert_eq(sched_submit(s, &q, &rs[i], err, sizeof err), 0, "%s", err);
    }
    for (int i = 0; i < 8; i++) {
        char *t = collect(s, rs[i], &os[i]);
        if (i == 0)
            cr_assert_str_eq(t, ref, "batched:\n%s\nalone:\n%s", t, ref);
        free(t);
        sched_req_release(s, rs[i]);
        sched_out_free(&os[i]);
    }
    sched_metrics met;
    sched_get_metrics(s, &met);
    cr_assert_eq(met.running, 0);
    cr_assert_gt(met.generated_tokens, 40);
    cr_assert_eq(met.ttft.total, 9);
    cr_assert_eq(met.preemptions, 0, "the pool was planned for 8 sequences");
    cr_assert_eq(met.kv.qblocks_used + met.kv.fpages_used, 0, "units not returned");
    const kvc_kind_stats *w = &met.kv.layer_kind[KVC_LAYER_WINDOW];
    cr_assert_eq(w->layers, window > 0 ? 3 : 0);
    if (window > 0)
        cr_assert_gt(w->fpages_total + w->qblocks_total, 0, "the window layers' group");
    sched_destroy(s);
    sched_out_free(&o);
    free(alone);
    free(ref);
    for (int i = 0; i < 8; i++)
        free(ids[i]);
    mdl_free(m);
}

Test(scheduler, alone_vs_batched_fp16)
{
    alone_vs_batched(CFG_KV_FP16, 0);
}

Test(scheduler, alone_vs_batched_int4)
{
    alone_vs_batched(CFG_KV_INT4, 0);
}

Test(scheduler, window_layers_alone_vs_batched)
{
    alone_vs_batched(CFG_KV_FP16, 24);
    alone_vs_batched(CFG_KV_INT4, 40); /* window layers FP16 (window_kv default) */
    g_window_kv = CFG_KV_INT4;
    alone_vs_batched(CFG_KV_INT4, 40);
}

Test(scheduler, stop_n_logprobs)
{
    char err[512];
    mdl_model *m = load(m260());
    int n;
    int32_t *ids = encode(m, "Once upon a time", &n);
    char *ref = reference(m, CFG_KV_FP16, ids, n, 60);
    sched *s = mk(m, CFG_KV_FP16, 4, 0);
    /* stop at the first occurrence of a word the reference contains */
    const char *stop = strstr(ref + 5, " the");
    cr_assert_not_null(stop, "%s", ref);
    sched_req_params p = greedy(ids, n, 60);
    p.stop[0] = "the";
    p.stop[1] = "zzzz";
    p.n_stop = 2;
    p.n = 3;
    p.logprobs = 2;
    sched_req *r;
    sched_out o;
    memset(&o, 0, sizeof o);
    cr_assert_eq(sched_submit(s, &p, &r, err, sizeof err), 0, "%s", err);
    char *t = collect(s, r, &o);
    size_t cut = (size_t)(strstr(ref, "the") - ref);
    char want[4096];
    snprintf(want, sizeof want, "%.*s|%.*s|%.*s", (int)cut, ref, (int)cut, ref, (int)cut, ref);
    cr_assert_str_eq(t, want);
    for (int i = 0; i < 3; i++) {
        cr_assert_str_eq(o.ch[i].finish, "stop");
        cr_assert_gt(o.ch[i].n_toks, 0);
        for (int k = 0; k < o.ch[i].n_toks; k++) {
            const sched_tok *tk = &o.ch[i].toks[k];
            cr_assert_eq(tk->n_top, 2);
            cr_assert(tk->logprob <= 0.0f);
            cr_assert(tk->top_lp[0] >= tk->top_lp[1]);
            cr_assert_eq(tk->top_id[0], tk->token, "greedy picks the top token");
        }
    }
    sched_req_release(s, r);
    sched_out_free(&o);
    free(t);
    /* max_tokens: finish "length" with exactly that many tokens */
    p = greedy(ids, n, 5);
    p.logprobs = 0;
    memset(&o, 0, sizeof o);
    cr_assert_eq(sched_submit(s, &p, &r, err, sizeof err), 0, "%s", err);
    t = collect(s, r, &o);
    cr_assert_str_eq(o.ch[0].finish, "length");
    cr_assert_eq(o.ch[0].n_toks, 5);
    cr_assert_eq(o.n_generated, 5);
    sched_req_release(s, r);
    sched_out_free(&o);
    free(t);
    /* context: prompt + max_tokens beyond n_ctx is refused */
    p = greedy(ids, n, 600);
    cr_assert_eq(sched_submit(s, &p, &r, err, sizeof err), -E2BIG);
    cr_assert(strstr(err, "maximum context length") != NULL, "%s", err);
    int32_t bad[2] = {1, 999999};
    p = greedy(bad, 2, 5);
    cr_assert_eq(sched_submit(s, &p, &r, err, sizeof err), -EINVAL);
    sched_destroy(s);
    free(ref);
    free(ids);
    mdl_free(m);
}

/* 6 requests of ~200 tokens each in a pool of 512 tokens with 6 slots:
 * admission waits and preemption recomputes; every request finishes. */
Test(scheduler, small_pool_preempts_and_finishes)
{
    char err[512];
    mdl_model *m = load(m260());
    char longp[4096] = "";
    for (int i = 0; i < 5; i++)
        strcat(longp, "Once upon a time there was a little girl named Lily. ");
    int n;
    int32_t *ids = encode(m, longp, &n);
    sched *s = mk(m, CFG_KV_INT4, 6, 512);
    sched_req *rs[6];
    sched_out os[6];
    memset(os, 0, sizeof os);
    for (int i = 0; i < 6; i++) {
        sched_req_params p = greedy(ids, n, 120);
        p.ignore_eos = 1;
        cr_assert_eq(sched_submit(s, &p, &rs[i], err, sizeof err), 0, "%s", err);
    }
    for (int i = 0; i < 6; i++) {
        char *t = collect(s, rs[i], &os[i]);
        cr_assert_eq(os[i].status, 0, "%s", os[i].error);
        cr_assert_str_eq(os[i].ch[0].finish, "length");
        cr_assert_eq(os[i].n_generated, 120);
        free(t);
        sched_req_release(s, rs[i]);
        sched_out_free(&os[i]);
    }
    sched_metrics met;
    sched_get_metrics(s, &met);
    cr_assert_gt(met.preemptions + 0 * met.steps, 0, "a 512-token pool held 6 x %d tokens "
                 "without preempting", n + 120);
    sched_destroy(s);
    free(ids);
    mdl_free(m);
}

/* A queue of 2: the third waiting request is refused with -EBUSY; a
 * cancelled request's blocks return to the pool. */
Test(scheduler, queue_full_and_cancel)
{
    char err[512];
    mdl_model *m = load(m260());
    int n;
    int32_t *ids = encode(m, "Once upon a time", &n);
    sched_params sp = sched_default_params();
    sp.n_ctx = 512;
    sp.max_seqs = 1;
    sp.max_queue = 2;
    sp.n_threads = 1;
    sp.kv.chunk_size = 64;
    sp.kv.block_tokens = 32;
    sched *s;
    cr_assert_eq(sched_create(m, &sp, &s, err, sizeof err), 0, "%s", err);
    sched_req_params p = greedy(ids, n, 400);
    p.ignore_eos = 1;
    sched_req *a, *b, *c, *d;
    cr_assert_eq(sched_submit(s, &p, &a, err, sizeof err), 0);
    usleep(100000); /* a is running */
    cr_assert_eq(sched_submit(s, &p, &b, err, sizeof err), 0);
    cr_assert_eq(sched_submit(s, &p, &c, err, sizeof err), 0);
    cr_assert_eq(sched_submit(s, &p, &d, err, sizeof err), -EBUSY);
    cr_assert(strstr(err, "capacity") != NULL, "%s", err);
    sched_req_release(s, a); /* cancel all */
    sched_req_release(s, b);
    sched_req_release(s, c);
    sched_metrics met;
    for (int i = 0; i < 200; i++) {
        usleep(10000);
        sched_get_metrics(s, &met);
        if (met.running == 0 && met.waiting == 0 && met.kv.bytes_total == 0)
            break;
    }
    cr_assert_eq(met.running, 0);
    cr_assert_eq(met.waiting, 0);
    cr_assert_eq(met.kv.qblocks_used + met.kv.fpages_used, 0, "blocks not returned");
    cr_assert_eq(sched_n_active(s), 0);
    sched_stop_admitting(s);
    cr_assert_eq(sched_submit(s, &p, &d, err, sizeof err), -ESHUTDOWN);
    sched_destroy(s);
    free(ids);
    mdl_free(m);
}

/* Polls r once; returns its generated tokens so far. */
static int64_t generated(sched *s, sched_req *r, sched_out *o)
{
    sched_poll(s, &r, o, 1, 0, NULL, NULL);
    return o->n_generated;
}

/* One request of 4 prompts x n = 4 (16 sequences of 200 tokens) on 4
 * slots, then a 4-token request: it must finish while the big one has
 * most of its work left. per_req 0: the default cap (3 of 4 slots) leaves
 * a slot free; per_req 4: the big request takes every slot and the small
 * one gets a slot by a fair-share preemption. The big request's choices
 * (greedy, one prompt each) stay identical through the recomputation. */
static void small_beside_big(int per_req)
{
    char err[512];
    mdl_model *m = load(m260());
    sched *s = mk_cap(m, CFG_KV_FP16, 4, 0, per_req);
    int n[4];
    int32_t *ids[4];
    sched_req_params bp[4];
    for (int i = 0; i < 4; i++) {
        ids[i] = encode(m, prompts[i], &n[i]);
        bp[i] = greedy(ids[i], n[i], 200);
        bp[i].n = 4;
        bp[i].ignore_eos = 1;
        bp[i].id = "big";
    }
    sched_req *big[4];
    sched_out bo[4];
    memset(bo, 0, sizeof bo);
    cr_assert_eq(sched_submit_group(s, bp, 4, big, err, sizeof err), 0, "%s", err);
    sched_metrics met;
    for (int i = 0; i < 2000; i++) { /* the big request holds its slots */
        sched_get_metrics(s, &met);
        if (met.running >= (per_req ? 4 : 3))
            break;
        usleep(1000);
    }
    cr_assert_geq(met.running, per_req ? 4 : 3);
    int ns;
    int32_t *sid = encode(m, "The sun was hot", &ns);
    sched_req_params sp = greedy(sid, ns, 4);
    sp.ignore_eos = 1;
    sp.id = "small";
    sched_req *small;
    sched_out so;
    memset(&so, 0, sizeof so);
    cr_assert_eq(sched_submit(s, &sp, &small, err, sizeof err), 0, "%s", err);
    char *t = collect(s, small, &so);
    int64_t big_done = 0;
    for (int i = 0; i < 4; i++)
        big_done += generated(s, big[i], &bo[i]);
    cr_assert_eq(so.n_generated, 4);
    cr_assert_lt(big_done, 16 * 200 / 4, "the 4-token request finished only after the big "
                 "one had generated %lld of its 3200 tokens", (long long)big_done);
    sched_get_metrics(s, &met);
    if (per_req == 4)
        cr_assert_geq(met.preemptions_fair, 1, "no slot was made for the small request");
    else
        cr_assert_eq(met.preemptions_fair, 0, "the reserved slot should have been enough");
    for (int i = 0; i < 4; i++) {
        char *bt = collect(s, big[i], &bo[i]);
        cr_assert_eq(bo[i].status, 0, "%s", bo[i].error);
        cr_assert_eq(bo[i].n_generated, 4 * 200);
        char *first = strtok(bt, "|"), *c;
        while ((c = strtok(NULL, "|")))
            cr_assert_str_eq(c, first, "greedy choices of one prompt differ");
        free(bt);
        sched_req_release(s, big[i]);
        sched_out_free(&bo[i]);
    }
    sched_req_release(s, small);
    sched_out_free(&so);
    free(t);
    free(sid);
    sched_destroy(s);
    for (int i = 0; i < 4; i++)
        free(ids[i]);
    mdl_free(m);
}

Test(scheduler, small_request_beside_a_big_one_reserved_slot)
{
    small_beside_big(0);
}

Test(scheduler, small_request_beside_a_big_one_fair_preemption)
{
    small_beside_big(4);
}

/* A prompt of 7 chunks prefilling, then a 2-token request with a short
 * prompt: its prefill takes turns with the long one's chunks (a piece of
 * 64 leaves 4 tokens of the step's budget of 68), so it is done before the
 * long prompt has its first token. */
Test(scheduler, short_prefill_not_behind_a_long_one)
{
    char err[512];
    mdl_model *m = load(m260());
    sched *s = mk(m, CFG_KV_FP16, 4, 0);
    char longp[4096] = "";
    for (int i = 0; i < 34; i++)
        strcat(longp, "Once upon a time there was a little girl named Lily. ");
    int nl, ns;
    int32_t *lid = encode(m, longp, &nl);
    cr_assert_gt(nl, 6 * 64);
    int32_t *sid = encode(m, "Tom and Sue went to the store to buy", &ns);
    cr_assert_gt(ns, 4, "the short prompt must not fit beside a full chunk (64 + 4 slots)");
    sched_req_params lp = greedy(lid, nl, 8), sp = greedy(sid, ns, 2);
    sp.ignore_eos = 1;
    sched_req *lr, *sr;
    sched_out lo, so;
    memset(&lo, 0, sizeof lo);
    memset(&so, 0, sizeof so);
    cr_assert_eq(sched_submit(s, &lp, &lr, err, sizeof err), 0, "%s", err);
    cr_assert_eq(sched_submit(s, &sp, &sr, err, sizeof err), 0, "%s", err);
    char *t = collect(s, sr, &so);
    cr_assert_eq(so.n_generated, 2);
    cr_assert_eq(generated(s, lr, &lo), 0, "the short prompt waited for the long prefill");
    char *t2 = collect(s, lr, &lo);
    cr_assert_eq(lo.status, 0);
    sched_req_release(s, lr);
    sched_req_release(s, sr);
    sched_out_free(&lo);
    sched_out_free(&so);
    free(t);
    free(t2);
    free(lid);
    free(sid);
    sched_destroy(s);
    mdl_free(m);
}

/* A group is queued all or none: one bad prompt refuses all; more
 * sequences than the queue holds is -EOVERFLOW (it could never fit, unlike
 * a full queue, -EBUSY); prompt + max_tokens beyond what the KV pool holds
 * alone is -E2BIG at submit, not a generation cut short later. */
Test(scheduler, group_limits_and_pool_limit)
{
    char err[512];
    mdl_model *m = load(m260());
    int n;
    int32_t *ids = encode(m, "Once upon a time", &n);
    sched_params sp = sched_default_params();
    sp.n_ctx = 512;
    sp.max_seqs = 4;
    sp.max_queue = 8;
    sp.n_threads = 1;
    sp.kv.chunk_size = 64;
    sp.kv.block_tokens = 32;
    sp.kv.kv_budget_tokens = 256;
    sched *s;
    cr_assert_eq(sched_create(m, &sp, &s, err, sizeof err), 0, "%s", err);
    int32_t lim = sched_max_seq_tokens(s);
    cr_assert(lim >= 200 && lim < 512, "the pool holds %d tokens for one sequence", lim);
    sched_capacity cap;
    sched_get_capacity(s, &cap);
    cr_assert_eq(cap.max_seq_tokens, lim);
    cr_assert_eq(cap.max_seqs_per_req, 3);
    cr_assert_eq(cap.kv_int4, 1);
    cr_assert_gt(cap.pool_bytes, 0);
    sched_req_params p[3];
    sched_req *r[3];
    for (int i = 0; i < 3; i++) {
        p[i] = greedy(ids, n, 8);
        p[i].n = 3;
    }
    cr_assert_eq(sched_submit_group(s, p, 3, r, err, sizeof err), -EOVERFLOW);
    cr_assert(strstr(err, "9 sequences") && strstr(err, "--max-queue"), "%s", err);
    cr_assert_null(r[0]);
    int32_t bad[2] = {1, 999999};
    p[1] = greedy(bad, 2, 8);
    cr_assert_eq(sched_submit_group(s, p, 2, r, err, sizeof err), -EINVAL);
    sched_metrics met;
    sched_get_metrics(s, &met);
    cr_assert_eq(met.waiting + met.running, 0, "part of a refused group was queued");
    cr_assert_eq(sched_n_active(s), 0);
    /* the pool limit */
    sched_req_params q = greedy(ids, n, lim - n + 1);
    sched_req *x;
    cr_assert_eq(sched_submit(s, &q, &x, err, sizeof err), -E2BIG);
    cr_assert(strstr(err, "KV pool holds at most") != NULL, "%s", err);
    q = greedy(ids, n, lim - n);
    q.ignore_eos = 1;
    cr_assert_eq(sched_submit(s, &q, &x, err, sizeof err), 0, "%s", err);
    sched_out o;
    memset(&o, 0, sizeof o);
    char *t = collect(s, x, &o);
    cr_assert_eq(o.status, 0, "%s", o.error);
    cr_assert_str_eq(o.ch[0].finish, "length");
    cr_assert_eq(o.n_generated, lim - n, "a request the pool holds runs to max_tokens");
    sched_req_release(s, x);
    sched_out_free(&o);
    free(t);
    sched_destroy(s);
    free(ids);
    mdl_free(m);
}

/* ---- prefix reuse (issue 13): cache_prompt, n choices, pool pressure ---- */

/* A prompt of several chunks (stories260K: about 13 tokens a sentence). */
static int32_t *long_prompt(const mdl_model *m, int sentences, const char *tail, int *n)
{
    char text[8192] = "";
    for (int i = 0; i < sentences; i++)
        strcat(text, i % 2 ? "Tom saw a big red ball in the park. "
                           : "Once upon a time there was a little girl named Lily. ");
    strcat(text, tail);
    return encode(m, text, n);
}

static char *run_one(sched *s, const sched_req_params *p)
{
    char err[512];
    sched_req *r;
    sched_out o;
    memset(&o, 0, sizeof o);
    cr_assert_eq(sched_submit(s, p, &r, err, sizeof err), 0, "%s", err);
    char *t = collect(s, r, &o);
    cr_assert_eq(o.status, 0, "%s", o.error);
    sched_req_release(s, r);
    sched_out_free(&o);
    return t;
}

/* The same prompt twice reuses the cached chunks and writes the same text
 * as a cold run; a second prompt sharing its beginning reuses that part;
 * cache_prompt 0 reuses nothing. */
static void prefix_same_text(cfg_kv_mode mode)
{
    mdl_model *m = load(m260());
    int n, n2;
    int32_t *ids = long_prompt(m, 20, "The end", &n);
    int32_t *ids2 = long_prompt(m, 12, "Then the dog barked at the cat", &n2);
    cr_assert_gt(n, 200);
    char *ref = reference(m, mode, ids, n, 24);
    char *ref2 = reference(m, mode, ids2, n2, 24);
    sched *s = mk(m, mode, 4, 0);
    sched_req_params p = greedy(ids, n, 24);
    p.cache_prompt = 1;
    for (int k = 0; k < 3; k++) {
        sched_metrics a, b;
        sched_get_metrics(s, &a);
        p.cache_prompt = k < 2;
        char *t = run_one(s, &p);
        cr_assert_str_eq(t, ref, "run %d:\n%s\ncold:\n%s", k, t, ref);
        free(t);
        usleep(300 * 1000); /* the metrics snapshot is refreshed every 0.2 s */
        sched_get_metrics(s, &b);
        cr_assert(b.prefix_on);
        int64_t hit = b.prefix.hits - a.prefix.hits;
        if (k == 0)
            cr_assert_eq(hit, 0);
        else if (k == 1)
            cr_assert_eq(hit, (n - 1) / 64 * 64, "run 1 reused %lld of %d", (long long)hit, n);
        else
            cr_assert_eq(b.prefix.queries, a.prefix.queries, "cache_prompt 0 looks nothing up");
        cr_assert_gt(b.prefix.nodes, 0);
        cr_assert_eq(b.kv.qblocks_used + b.kv.fpages_used, 0, "cached units are not 'used'");
    }
    sched_req_params p2 = greedy(ids2, n2, 24);
    p2.cache_prompt = 1;
    char *t = run_one(s, &p2);
    cr_assert_str_eq(t, ref2);
    free(t);
    sched_destroy(s);
    free(ref);
    free(ref2);
    free(ids);
    free(ids2);
    mdl_free(m);
}

Test(scheduler, prefix_reuse_int4)
{
    prefix_same_text(CFG_KV_INT4);
}

Test(scheduler, prefix_reuse_fp16)
{
    prefix_same_text(CFG_KV_FP16);
}

/* n = 4 sampled choices fork choice 0 after one prefill and write what
 * four separate requests with seeds seed + i write. */
Test(scheduler, n_choices_share_the_prompt)
{
    mdl_model *m = load(m260());
    int n;
    int32_t *ids = long_prompt(m, 14, "Lily said", &n);
    sched *s = mk(m, CFG_KV_INT4, 8, 0);
    sched_req_params p = greedy(ids, n, 16);
    p.sp.temperature = 0.9f;
    p.sp.seed = 42;
    p.n = 4;
    p.cache_prompt = 1;
    char *together = run_one(s, &p);
    sched_metrics met;
    sched_get_metrics(s, &met);
    cr_assert_eq(met.forks, 3, "choices 1..3 forked choice 0 (%llu)",
                 (unsigned long long)met.forks);
    char want[1 << 14] = "";
    for (int i = 0; i < 4; i++) {
        sched_req_params q = greedy(ids, n, 16);
        q.sp.temperature = 0.9f;
        q.sp.seed = 42 + (uint64_t)i;
        char *t = run_one(s, &q);
        if (i)
            strcat(want, "|");
        strcat(want, t);
        free(t);
    }
    cr_assert_str_eq(together, want);
    free(together);
    sched_destroy(s);
    free(ids);
    mdl_free(m);
}

/* A pool that holds about two prompts: cached prefixes are evicted as new
 * prompts need room, everything finishes with the cold text. */
Test(scheduler, prefix_cache_evicted_under_pressure)
{
    mdl_model *m = load(m260());
    sched *s = mk(m, CFG_KV_INT4, 2, 640);
    static const char *tails[4] = {"The end", "Then Tom ran", "Lily was sad", "A bird sang"};
    for (int k = 0; k < 4; k++) {
        int n;
        int32_t *ids = long_prompt(m, 16 + k, tails[k], &n);
        /* a different first sentence: nothing shared between prompts */
        ids[1] = (int32_t)(ids[1] + k) % m->hp.n_vocab;
        char *ref = reference(m, CFG_KV_INT4, ids, n, 12);
        sched_req_params p = greedy(ids, n, 12);
        p.cache_prompt = 1;
        char *t = run_one(s, &p);
        cr_assert_str_eq(t, ref, "prompt %d", k);
        free(t);
        free(ref);
        free(ids);
    }
    usleep(300 * 1000);
    sched_metrics met;
    sched_get_metrics(s, &met);
    cr_assert_gt(met.prefix.evictions, 0);
    cr_assert_eq(met.preemptions, 0);
    cr_assert_eq(met.kv.qblocks_used + met.kv.fpages_used, 0);
    sched_destroy(s);
    mdl_free(m);
}
