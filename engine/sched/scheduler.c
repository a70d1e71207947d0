/*
 * scheduler.c - engine thread, continuous batching, fair admission by free
 * KV blocks, preemption by recomputation, output publishing (see
 * scheduler.h).
 *
 * Threading: one mutex (s->mu) guards the queues, every request's shared
 * fields (text, token records, cursors, flags) and the metrics. The engine
 * thread holds it while it picks a step and while it publishes the step's
 * tokens, never during fwd_eval_batch or sampling. Fields marked "engine"
 * are touched by the engine thread only.
 */
#include "engine/sched/scheduler.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine/util/log.h"
#include "tokenizer/tok.h"

typedef enum { JOB_WAITING, JOB_RUNNING, JOB_DONE } job_state;

/* One client request: the sched_reqs of its prompts share it. Fairness
 * counts sequences per group. */
typedef struct sched_group {
    int refs;                  /* sched_reqs pointing here */
    int running;               /* jobs holding a slot (engine, under mu) */
    uint64_t seq;              /* arrival order */
} sched_group;

typedef struct job {
    sched_req *req;
    int index;
    job_state st;
    struct job *qnext, *qprev; /* waiting queue links */
    /* engine */
    int slot;                  /* -1: none */
    int32_t *toks;             /* [n_ctx] prompt then generated tokens */
    int n_tok, n_past, prefill_to;
    int n_gen;
    smp_sampler *smp;
    tok_decoder dec;
    uint64_t admit_seq;
    uint64_t prefill_turn;     /* prefill round robin: served at this turn */
    uint64_t skip_step;        /* its piece did not fit this step */
    double t_last_tok;
    int32_t next_tok;          /* sampled in the current step */
    sched_tok next_rec;
    /* shared (under mu) */
    char *text;
    size_t len, cap, visible, delivered;
    sched_tok *rec;
    int n_rec, cap_rec, rec_delivered;
    const char *finish;
    int finish_delivered;
} job;

struct sched_req {
    int refs;                  /* HTTP side + engine side */
    sched_group *grp;
    int engine_ref;
    int cancelled;
    int n_jobs, n_done;
    int n_prompt;
    int max_tokens, logprobs, ignore_eos;
    int kv_mode;               /* cfg_kv_mode of its sequences */
    int cache_prompt;          /* and the scheduler has prefix reuse on */
    char *stop[SCHED_MAX_STOP];
    size_t stop_len[SCHED_MAX_STOP];
    int n_stop;
    size_t max_stop;
    char id[64];
    void (*notify)(void *ctx);
    void *notify_ctx;
    int notify_final;
    int armed;
    int status, status_delivered;
    char error[256];
    double t_submit, t_first;
    int got_first;
    job jobs[];
};

struct sched {
    const mdl_model *m;
    sched_params p;
    fwd_state *bk;             /* forward state and KV pool (CPU or GPU) */
    fwd_seq **slots;            /* [max_seqs] */
    job **running;             /* [max_seqs] by slot */
    int n_running;
    job *wait_head, *wait_tail;
    int n_waiting;             /* jobs */
    int n_wait_reqs;           /* requests with a job waiting and none running */
    int n_active_reqs;
    fwd_item *items;
    job **item_job;
    uint64_t admit_counter;
    uint64_t group_counter, turn_counter, step_no;
    int max_per_req;           /* sequences one group may run at once */
    int32_t max_seq_tokens;    /* longest sequence the pool holds alone */
    int32_t max_seq_mode[CFG_KV_MODES]; /* the same by KV mode (0: not held) */
    sched_capacity cap;
    pthread_t thr;
    int thr_started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int quit, admitting;
    int fail_status;           /* sched_fail_all pending */
    char fail_why[200];
    sched_metrics met;
    double t_metrics;
    int64_t cap_q, cap_f;      /* INT4 blocks and FP16 pages of the pool */
    int admit_hold;            /* a step found the pool full (on_nospc): admit
                                  nothing until a sequence ends, or a sequence
                                  that holds nothing yet is preempted and
                                  re-admitted at every step, forever */
    char piece_buf[1024];
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int fail(char *err, size_t errlen, int code, const char *msg)
{
    if (err && errlen)
        snprintf(err, errlen, "%s", msg);
    return code;
}

static void hist_init(sched_hist *h, const double *le, int n)
{
    memset(h, 0, sizeof *h);
    h->n_le = n < SCHED_HIST_BUCKETS ? n : SCHED_HIST_BUCKETS;
    memcpy(h->le, le, (size_t)h->n_le * sizeof *le);
}

static void hist_add(sched_hist *h, double v)
{
    int i = 0;
    while (i < h->n_le && v > h->le[i])
        i++;
    h->count[i]++;
    h->sum += v;
    h->total++;
}

sched_params sched_default_params(void)
{
    sched_params p = {.n_ctx = 0, .max_seqs = 16, .max_seqs_per_req = 0, .max_queue = 64,
                      .max_batch = 0, .n_threads = 0, .kv = cfg_kv_default(),
                      .prefix_nodes = 128,
                      .device = BK_DEVICE_CPU};
    return p;
}

void sched_out_free(sched_out *o)
{
    if (!o)
        return;
    for (int i = 0; i < SCHED_MAX_N; i++) {
        free(o->ch[i].text);
        free(o->ch[i].toks);
        o->ch[i].text = NULL;
        o->ch[i].toks = NULL;
        o->ch[i].cap = 0;
        o->ch[i].cap_toks = 0;
    }
}

/* ---- request lifetime (under mu) ------------------------------------------- */

static void req_free(sched_req *r)
{
    for (int i = 0; i < r->n_jobs; i++) {
        free(r->jobs[i].toks);
        free(r->jobs[i].text);
        free(r->jobs[i].rec);
        smp_destroy(r->jobs[i].smp);
    }
    for (int i = 0; i < r->n_stop; i++)
        free(r->stop[i]);
    if (r->grp && --r->grp->refs == 0)
        free(r->grp);
    free(r);
}

static void req_unref(sched_req *r)
{
    if (--r->refs == 0)
        req_free(r);
}

static void notify(sched_req *r)
{
    if (r->notify_final && r->n_done < r->n_jobs && r->status == 0)
        return;
    if (r->armed && r->notify) {
        r->armed = 0;
        r->notify(r->notify_ctx);
    }
}

static void wait_push(sched *s, job *j, int front)
{
    j->qnext = j->qprev = NULL;
    if (!s->wait_head) {
        s->wait_head = s->wait_tail = j;
    } else if (front) {
        j->qnext = s->wait_head;
        s->wait_head->qprev = j;
        s->wait_head = j;
    } else {
        j->qprev = s->wait_tail;
        s->wait_tail->qnext = j;
        s->wait_tail = j;
    }
    s->n_waiting++;
}

static void wait_remove(sched *s, job *j)
{
    if (j->qprev)
        j->qprev->qnext = j->qnext;
    else
        s->wait_head = j->qnext;
    if (j->qnext)
        j->qnext->qprev = j->qprev;
    else
        s->wait_tail = j->qprev;
    j->qnext = j->qprev = NULL;
    s->n_waiting--;
}

static void release_slot(sched *s, job *j)
{
    if (j->slot < 0)
        return;
    fwd_seq_reset(s->slots[j->slot]);
    s->running[j->slot] = NULL;
    s->n_running--;
    j->req->grp->running--;
    j->slot = -1;
}

/* The job ends (finish reason, or NULL when cancelled/failed): its KV
 * blocks return to the pool now. When the request's last job ends the
 * engine's reference is dropped. */
static void job_end(sched *s, job *j, const char *finish)
{
    sched_req *r = j->req;
    if (j->st == JOB_WAITING)
        wait_remove(s, j);
    s->admit_hold = 0; /* its units come back */
    kvc_stats st; /* what a sequence of its KV mode held at its end */
    if (j->slot >= 0 && finish) {
        fwd_seq_held(s->slots[j->slot], &st);
        s->met.kv_mode[r->kv_mode].finished++;
        s->met.kv_mode[r->kv_mode].finished_bytes += st.bytes_total;
        s->met.kv_mode[r->kv_mode].finished_tokens += st.tokens;
    }
    release_slot(s, j);
    j->st = JOB_DONE;
    if (finish && !j->finish) {
        j->finish = finish;
        if (strcmp(finish, "stop") == 0)
            s->met.finished_stop++;
        else
            s->met.finished_length++;
    }
    if (++r->n_done == r->n_jobs) {
        if (!r->cancelled && r->status == 0)
            hist_add(&s->met.e2e, now_s() - r->t_submit);
        s->n_active_reqs--;
        notify(r);
        r->engine_ref = 0;
        req_unref(r);
    }
}

/* Fails every unfinished job of r with an HTTP status and a reason. */
static void req_fail(sched *s, sched_req *r, int status, const char *msg)
{
    if (r->status == 0) {
        r->status = status;
        snprintf(r->error, sizeof r->error, "%.250s", msg);
        s->met.failed++;
    }
    for (int i = 0; i < r->n_jobs; i++)
        if (r->jobs[i].st != JOB_DONE)
            job_end(s, &r->jobs[i], NULL);
}

/* ---- submit / poll / release (HTTP threads) ------------------------------- */

int32_t sched_n_ctx(const sched *s)
{
    return s->p.n_ctx;
}

const char *sched_describe(const sched *s)
{
    return fwd_describe(s->bk);
}

int32_t sched_max_seq_tokens(const sched *s)
{
    return s->max_seq_tokens;
}

int sched_kv_has_mode(const sched *s, int m)
{
    return cfg_kv_has_mode(&s->p.kv, m);
}

int32_t sched_max_seq_tokens_mode(const sched *s, int m)
{
    return m >= 0 && m < CFG_KV_MODES ? s->max_seq_mode[m] : 0;
}

/* The admission estimate of job j's sequence at n tokens (its KV mode). */
static void job_estimate(const sched *s, const job *j, int n, int64_t *nq, int64_t *nf)
{
    fwd_pool_estimate_mode(s->bk, j->req->kv_mode, n, nq, nf);
}

void sched_get_capacity(const sched *s, sched_capacity *out)
{
    *out = s->cap;
}

/* Validates p and builds its request (not yet visible to the engine). */
static int req_new(sched *s, const sched_req_params *p, sched_req **out, char *err,
                   size_t errlen)
{
    *out = NULL;
    const int n_ctx = s->p.n_ctx;
    if (p->n < 1 || p->n > SCHED_MAX_N)
        return fail(err, errlen, -EINVAL, "n must be between 1 and 16");
    if (p->n_prompt < 1)
        return fail(err, errlen, -EINVAL, "the prompt is empty");
    for (int i = 0; i < p->n_prompt; i++) {
        if (p->prompt[i] < 0 || p->prompt[i] >= s->m->hp.n_vocab) {
            if (err && errlen)
                snprintf(err, errlen, "token id %d at prompt position %d is out of range "
                         "[0, %d)", p->prompt[i], i, s->m->hp.n_vocab);
            return -EINVAL;
        }
    }
    if (p->max_tokens < 1)
        return fail(err, errlen, -EINVAL, "max_tokens must be at least 1");
    int kv_mode = p->kv_mode > 0 ? p->kv_mode - 1 : cfg_kv_mode_id(&s->p.kv);
    if (!cfg_kv_has_mode(&s->p.kv, kv_mode)) {
        char on[160];
        cfg_kv_modes_str(cfg_kv_mode_mask(&s->p.kv), on, sizeof on);
        if (err && errlen)
            snprintf(err, errlen, "kv_cache '%s' is not enabled on this server (its KV pool "
                     "holds %s sequences; start it with --kv-modes to add others)",
                     cfg_kv_mode_str(kv_mode), on);
        return -EINVAL;
    }
    const int32_t max_seq = s->max_seq_mode[kv_mode];
    if ((int64_t)p->n_prompt + p->max_tokens > n_ctx) {
        if (err && errlen)
            snprintf(err, errlen,
                     "This model's maximum context length is %d tokens. However, you "
                     "requested %lld tokens (%d in the prompt, %d for the completion). "
                     "Please reduce the prompt or max_tokens.",
                     n_ctx, (long long)p->n_prompt + p->max_tokens, p->n_prompt,
                     p->max_tokens);
        return -E2BIG;
    }
    if ((int64_t)p->n_prompt + p->max_tokens > max_seq) {
        /* it could start, but the pool would run out before max_tokens
         * with nothing left to preempt: say so now, not with a cut text */
        if (err && errlen)
            snprintf(err, errlen,
                     "This request needs up to %lld tokens of KV cache (%d in the prompt, %d "
                     "for the completion), but the server's KV pool holds at most %d tokens "
                     "for one sequence (--kv-budget). Please reduce the prompt or max_tokens.",
                     (long long)p->n_prompt + p->max_tokens, p->n_prompt, p->max_tokens,
                     max_seq);
        return -E2BIG;
    }
    if (p->logprobs > SCHED_MAX_LOGPROBS)
        return fail(err, errlen, -EINVAL, "logprobs must be at most 20");

    sched_req *r = calloc(1, sizeof *r + (size_t)p->n * sizeof(job));
    if (!r)
        return fail(err, errlen, -ENOMEM, "out of memory");
    r->n_jobs = p->n;
    r->n_prompt = p->n_prompt;
    r->max_tokens = p->max_tokens;
    r->logprobs = p->logprobs;
    r->ignore_eos = p->ignore_eos;
    r->kv_mode = kv_mode;
    r->cache_prompt = p->cache_prompt && s->met.prefix_on;
    r->notify = p->notify;
    r->notify_ctx = p->notify_ctx;
    r->notify_final = p->notify_final;
    snprintf(r->id, sizeof r->id, "%s", p->id ? p->id : "-");
    int rc = 0;
    for (int i = 0; i < p->n_stop && i < SCHED_MAX_STOP && rc == 0; i++) {
        if (!p->stop[i] || !p->stop[i][0])
            continue;
        r->stop[r->n_stop] = strdup(p->stop[i]);
        if (!r->stop[r->n_stop])
            rc = -ENOMEM;
        else {
            r->stop_len[r->n_stop] = strlen(p->stop[i]);
            if (r->stop_len[r->n_stop] > r->max_stop)
                r->max_stop = r->stop_len[r->n_stop];
            r->n_stop++;
        }
    }
    char e2[256] = "out of memory";
    for (int i = 0; i < p->n && rc == 0; i++) {
        job *j = &r->jobs[i];
        j->req = r;
        j->index = i;
        j->slot = -1;
        j->toks = malloc((size_t)n_ctx * sizeof *j->toks);
        smp_params sp = p->sp;
        sp.seed = p->sp.seed + (uint64_t)i;
        if (!j->toks) {
            rc = -ENOMEM;
            break;
        }
        if (smp_create(&sp, s->m->hp.n_vocab, &j->smp, e2, sizeof e2) < 0) {
            rc = -EINVAL;
            break;
        }
        memcpy(j->toks, p->prompt, (size_t)p->n_prompt * sizeof *j->toks);
        j->n_tok = p->n_prompt;
        tok_decoder_init(&j->dec, s->m->tok, 0);
        j->dec.first = 0; /* a continuation keeps its leading space */
    }
    if (rc < 0) {
        req_free(r);
        return fail(err, errlen, rc, rc == -ENOMEM ? "out of memory" : e2);
    }
    r->refs = 2;
    r->engine_ref = 1;
    *out = r;
    return 0;
}

int sched_submit_group(sched *s, const sched_req_params *p, int n, sched_req **out, char *err,
                       size_t errlen)
{
    if (n < 1)
        return fail(err, errlen, -EINVAL, "no request to submit");
    for (int k = 0; k < n; k++)
        out[k] = NULL;
    int64_t total = 0;
    for (int k = 0; k < n; k++)
        total += p[k].n;
    if (total > s->p.max_queue) {
        if (err && errlen)
            snprintf(err, errlen,
                     "This request has %lld sequences (%d prompt%s x n = %d), but the server "
                     "queues at most %d (--max-queue): it could never be accepted. Send fewer "
                     "prompts or a smaller n.", (long long)total, n, n == 1 ? "" : "s", p[0].n,
                     s->p.max_queue);
        return -EOVERFLOW;
    }
    sched_group *g = calloc(1, sizeof *g);
    if (!g)
        return fail(err, errlen, -ENOMEM, "out of memory");
    int rc = 0;
    for (int k = 0; k < n && rc == 0; k++) {
        rc = req_new(s, &p[k], &out[k], err, errlen);
        if (rc == 0) {
            out[k]->grp = g;
            g->refs++;
        }
    }
    if (rc == 0) {
        pthread_mutex_lock(&s->mu);
        if (!s->admitting || s->quit)
            rc = fail(err, errlen, -ESHUTDOWN, "the server is shutting down");
        else if (s->n_waiting + total > s->p.max_queue)
            rc = fail(err, errlen, -EBUSY,
                      "the server is at capacity: too many requests are waiting; retry later");
        if (rc == 0) {
            double t = now_s();
            g->seq = ++s->group_counter;
            for (int k = 0; k < n; k++) {
                out[k]->t_submit = t;
                for (int i = 0; i < out[k]->n_jobs; i++)
                    wait_push(s, &out[k]->jobs[i], 0);
                s->n_active_reqs++;
            }
            pthread_cond_signal(&s->cv);
        }
        pthread_mutex_unlock(&s->mu);
    }
    if (rc < 0) {
        int built = g->refs;
        for (int k = 0; k < n; k++) {
            if (out[k])
                req_free(out[k]); /* the last one frees g */
            out[k] = NULL;
        }
        if (built == 0)
            free(g);
    }
    return rc;
}

int sched_submit(sched *s, const sched_req_params *p, sched_req **out, char *err,
                 size_t errlen)
{
    return sched_submit_group(s, p, 1, out, err, errlen);
}

/* Grows a byte buffer to hold need more bytes. */
static int grow_text(char **buf, size_t *cap, size_t len, size_t need)
{
    if (len + need + 1 <= *cap)
        return 0;
    size_t nc = *cap ? *cap : 256;
    while (nc < len + need + 1)
        nc *= 2;
    char *nb = realloc(*buf, nc);
    if (!nb)
        return -1;
    *buf = nb;
    *cap = nc;
    return 0;
}

static int grow_toks(sched_tok **buf, int *cap, int len, int need)
{
    if (len + need <= *cap)
        return 0;
    int nc = *cap ? *cap : 16;
    while (nc < len + need)
        nc *= 2;
    sched_tok *nb = realloc(*buf, (size_t)nc * sizeof *nb);
    if (!nb)
        return -1;
    *buf = nb;
    *cap = nc;
    return 0;
}

/* Copies r's new output into o (under mu). Returns 1 if anything new or
 * done. */
static int poll_one(sched_req *r, sched_out *o)
{
    int any = 0, done = 1;
    o->n_choices = r->n_jobs;
    o->n_prompt = r->n_prompt;
    o->status = r->status;
    o->cancelled = r->cancelled;
    if (r->status)
        snprintf(o->error, sizeof o->error, "%.250s", r->error);
    if (r->status && !r->status_delivered) {
        r->status_delivered = 1;
        any = 1;
    }
    int64_t gen = 0;
    for (int i = 0; i < r->n_jobs; i++) {
        job *j = &r->jobs[i];
        sched_choice_out *c = &o->ch[i];
        gen += j->n_gen;
        if (j->visible > j->delivered) {
            size_t n = j->visible - j->delivered;
            if (grow_text(&c->text, &c->cap, c->len, n) == 0) {
                if (c->len == 0)
                    c->text_off = (int64_t)j->delivered;
                memcpy(c->text + c->len, j->text + j->delivered, n);
                c->len += n;
                c->text[c->len] = '\0';
                j->delivered = j->visible;
                any = 1;
            }
        }
        int upto = j->rec_delivered;
        while (upto < j->n_rec && (j->rec[upto].text_end <= (int64_t)j->delivered ||
                                   (j->finish && j->delivered == j->visible)))
            upto++;
        if (upto > j->rec_delivered &&
            grow_toks(&c->toks, &c->cap_toks, c->n_toks, upto - j->rec_delivered) == 0) {
            memcpy(c->toks + c->n_toks, j->rec + j->rec_delivered,
                   (size_t)(upto - j->rec_delivered) * sizeof *j->rec);
            c->n_toks += upto - j->rec_delivered;
            j->rec_delivered = upto;
            any = 1;
        }
        if (j->finish && !j->finish_delivered && j->delivered == j->visible) {
            c->finish = j->finish;
            j->finish_delivered = 1;
            any = 1;
        }
        if (!j->finish_delivered && !(j->st == JOB_DONE && !j->finish))
            done = 0;
    }
    o->n_generated = gen;
    if (r->status)
        done = 1;
    o->done = done;
    return any;
}

int sched_poll(sched *s, sched_req *const *r, sched_out *o, int n, int arm,
               void (*on_armed)(void *ctx), void *ctx)
{
    int any = 0, all_done = 1;
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < n; i++) {
        any |= poll_one(r[i], &o[i]);
        all_done &= o[i].done;
    }
    if (!any && !all_done && arm) {
        for (int i = 0; i < n; i++)
            r[i]->armed = 1;
        if (on_armed)
            on_armed(ctx);
    }
    pthread_mutex_unlock(&s->mu);
    return any;
}

void sched_req_release(sched *s, sched_req *r)
{
    if (!r)
        return;
    pthread_mutex_lock(&s->mu);
    r->armed = 0;
    r->notify = NULL;
    if (r->engine_ref && !r->cancelled) {
        r->cancelled = 1;
        s->met.cancelled++;
        pthread_cond_signal(&s->cv);
    }
    req_unref(r);
    pthread_mutex_unlock(&s->mu);
}

void sched_req_cancel(sched *s, sched_req *r)
{
    if (!r)
        return;
    pthread_mutex_lock(&s->mu);
    if (r->engine_ref && !r->cancelled) {
        r->cancelled = 1;
        s->met.cancelled++;
        pthread_cond_signal(&s->cv);
    }
    pthread_mutex_unlock(&s->mu);
}

int64_t sched_req_generated(sched *s, const sched_req *r)
{
    if (!r)
        return 0;
    int64_t n = 0;
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < r->n_jobs; i++)
        n += r->jobs[i].n_gen;
    pthread_mutex_unlock(&s->mu);
    return n;
}

void sched_stop_admitting(sched *s)
{
    pthread_mutex_lock(&s->mu);
    s->admitting = 0;
    pthread_mutex_unlock(&s->mu);
}

void sched_fail_all(sched *s, int status, const char *why)
{
    pthread_mutex_lock(&s->mu);
    s->fail_status = status;
    snprintf(s->fail_why, sizeof s->fail_why, "%s", why);
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

/* Engine thread, under mu: fails everything (shutdown). */
static void fail_everything(sched *s, int status, const char *why)
{
    for (int k = 0; k < s->p.max_seqs; k++)
        if (s->running[k])
            req_fail(s, s->running[k]->req, status, why);
    while (s->wait_head)
        req_fail(s, s->wait_head->req, status, why);
}

int sched_n_active(sched *s)
{
    pthread_mutex_lock(&s->mu);
    int n = s->n_active_reqs;
    pthread_mutex_unlock(&s->mu);
    return n;
}

void sched_get_metrics(sched *s, sched_metrics *out)
{
    pthread_mutex_lock(&s->mu);
    *out = s->met;
    out->running = s->n_running;
    out->waiting = s->n_waiting;
    pthread_mutex_unlock(&s->mu);
}

/* ---- the engine thread ------------------------------------------------------ */

/* Refreshes the KV part of the metrics snapshot (engine thread, under mu). */
static void snapshot_kv(sched *s, int force)
{
    double t = now_s();
    if (!force && t - s->t_metrics < 0.2)
        return;
    s->t_metrics = t;
    (void)fwd_pool_stats(s->bk, &s->met.kv, NULL, 0); /* partial sums on a device error */
    s->met.kv_usage = fwd_pool_usage(s->bk);
    if (s->met.kv_shared) {
        int64_t fb, unused;
        fwd_pool_free_units(s->bk, &fb, &unused); /* bytes in a shared pool */
        s->met.kv_free_bytes = fb;
    }
    fwd_prefix_stats(s->bk, &s->met.prefix);
    int L = s->m->hp.n_layers < SCHED_MAX_LAYERS ? s->m->hp.n_layers : SCHED_MAX_LAYERS;
    s->met.n_layers = L;
    s->met.seqs_warming = 0;
    for (int l = 0; l < L; l++) {
        for (int x = 0; x < 2; x++) {
            double lo = 0, hi = 0;
            int n = 0;
            for (int k = 0; k < s->p.max_seqs; k++) {
                if (!s->running[k])
                    continue;
                float a, b;
                if (fwd_seq_ema(s->slots[k], l, x, &a, &b) == 0) {
                    lo += a;
                    hi += b;
                    n++;
                }
            }
            s->met.ema_valid[l][x] = n > 0;
            if (n > 0) {
                s->met.ema_lo[l][x] = (float)(lo / n);
                s->met.ema_hi[l][x] = (float)(hi / n);
            }
        }
    }
    if (cfg_kv_has_quant(&s->p.kv))
        for (int k = 0; k < s->p.max_seqs; k++)
            if (s->running[k] && fwd_seq_n_tokens(s->slots[k]) > 0 &&
                fwd_seq_warming(s->slots[k]))
                s->met.seqs_warming++;
    /* what the running sequences of each KV mode hold */
    for (int m = 0; m < CFG_KV_MODES; m++) {
        s->met.kv_mode[m].seqs = 0;
        s->met.kv_mode[m].tokens = s->met.kv_mode[m].bytes = 0;
        s->met.kv_mode[m].qblocks = s->met.kv_mode[m].fpages = 0;
    }
    for (int k = 0; k < s->p.max_seqs; k++) {
        kvc_stats st;
        if (!s->running[k])
            continue;
        fwd_seq_held(s->slots[k], &st);
        int m = fwd_seq_mode(s->slots[k]);
        if (m < 0 || m >= CFG_KV_MODES)
            continue;
        s->met.kv_mode[m].seqs++;
        s->met.kv_mode[m].tokens += st.tokens;
        s->met.kv_mode[m].bytes += st.bytes_total;
        s->met.kv_mode[m].qblocks += st.qblocks_used;
        s->met.kv_mode[m].fpages += st.fpages_used;
    }
}

static int prefilling(const job *j)
{
    return j->n_past < j->prefill_to;
}

/* What admission may still hand out: the pool's free INT4 blocks and FP16
 * pages less a page of decode headroom per running job and what admitted
 * prompts still need for their prefill; and the prefills in progress. */
static void admit_budget(sched *s, int64_t *fq, int64_t *ff, int *n_pref)
{
    fwd_pool_free_units(s->bk, fq, ff);
    *n_pref = 0;
    for (int k = 0; k < s->p.max_seqs; k++) {
        job *j = s->running[k];
        if (!j)
            continue;
        /* headroom: a page of decode tail per running job (more is taken
         * lazily; preemption covers the rest); a shared pool counts bytes */
        if (fwd_pool_shared(s->bk))
            *fq -= fwd_pool_page_cost(s->bk);
        else
            *ff -= 1;
        if (prefilling(j)) {
            (*n_pref)++;
            int64_t q1, f1, q0, f0;
            job_estimate(s, j, j->prefill_to, &q1, &f1);
            job_estimate(s, j, j->n_past, &q0, &f0);
            *fq -= q1 - q0;
            *ff -= f1 - f0;
        }
    }
}

/* 1 while choice j > 0 of a request that caches its prompt waits for
 * choice 0 to finish the prompt's prefill: it then forks choice 0's
 * sequence (fork_choices) instead of prefilling the prompt again. */
static int awaits_fork(const job *j)
{
    const job *j0 = &j->req->jobs[0];
    return j->index > 0 && j->req->cache_prompt && j->n_gen == 0 && j0->st == JOB_RUNNING &&
           j0->n_gen == 0;
}

/* The waiting job to admit next: one of the group with the fewest
 * sequences running that is below its cap (round robin between requests),
 * the oldest group on ties, queue order within a group (a preempted job
 * is at the front). NULL if none may start. */
static job *next_waiting(sched *s)
{
    job *best = NULL;
    for (job *j = s->wait_head; j; j = j->qnext) {
        const sched_group *g = j->req->grp;
        if (j->req->cancelled || g->running >= s->max_per_req || awaits_fork(j))
            continue;
        if (!best || g->running < best->req->grp->running ||
            (g->running == best->req->grp->running && g->seq < best->req->grp->seq))
            best = j;
    }
    return best;
}

static void start_job(sched *s, job *j)
{
    wait_remove(s, j);
    int slot = 0;
    while (s->running[slot])
        slot++;
    s->running[slot] = j;
    s->n_running++;
    j->req->grp->running++;
    j->slot = slot;
    j->st = JOB_RUNNING;
    fwd_seq_reset(s->slots[slot]);
    char e[160];
    if (fwd_seq_set_mode(s->slots[slot], j->req->kv_mode, e, sizeof e) < 0) /* checked at submit */
        log_msg(LOG_LEVEL_ERROR, j->req->id, "KV mode: %s", e);
    j->n_past = 0;
    j->prefill_to = j->n_tok;
    if (j->req->cache_prompt) {
        /* continue from the longest cached prefix (whole chunks) */
        j->n_past = fwd_seq_prefix_adopt(s->slots[slot], j->toks, j->n_tok);
        if (j->n_gen == 0)
            s->met.prompt_tokens += (uint64_t)j->n_past;
    }
    j->admit_seq = ++s->admit_counter;
    j->prefill_turn = ++s->turn_counter; /* behind the prefills already going */
    if (j->n_gen == 0 && j->index == 0)
        hist_add(&s->met.queue_time, now_s() - j->req->t_submit);
}

/* A running job gives its slot and blocks back and waits at the front of
 * the queue; it is recomputed later from its prompt plus the tokens it
 * produced (nothing already delivered is repeated). */
static void preempt(sched *s, job *v, const char *why)
{
    log_msg(LOG_LEVEL_INFO, v->req->id, "sequence %d preempted at %d tokens (%s); it will be "
            "recomputed", v->index, v->n_tok, why);
    release_slot(s, v);
    v->st = JOB_WAITING;
    v->n_past = 0;
    wait_push(s, v, 1);
    s->met.preemptions++;
}

/* Admits waiting jobs (next_waiting's order) while a slot and a prefill
 * slot are free and the pool's free blocks cover the job's prompt. */
static int admit_some(sched *s)
{
    int64_t fq, ff;
    int n_pref, n = 0;
    admit_budget(s, &fq, &ff, &n_pref);
    while (s->n_running < s->p.max_seqs && n_pref < KVC_PREFILL_SLOTS) {
        job *j = next_waiting(s);
        if (!j)
            break;
        int64_t nq, nf;
        job_estimate(s, j, j->n_tok, &nq, &nf);
        if (nq > fq || nf > ff) {
            if (s->n_running == 0) {
                /* nothing will free blocks: it can never fit */
                req_fail(s, j->req, 503, "the KV pool cannot hold this prompt");
                continue;
            }
            break;
        }
        fq -= nq;
        ff -= nf;
        start_job(s, j);
        n_pref++;
        n++;
    }
    return n;
}

/* Fairness: the oldest request with nothing running whose next sequence
 * cannot start (no free slot, both prefill slots busy, or no room in the
 * pool) takes one sequence from the request holding the most slots (it
 * keeps at least one): the one with the least computed, so recomputing it
 * is cheap (a prefilling one when the prefill slots are the obstacle).
 * One preemption per step: the blocks come back at once, the next step
 * looks again. Returns 1 if it preempted. */
static int make_room(sched *s)
{
    job *w = NULL;
    for (job *j = s->wait_head; j; j = j->qnext)
        if (!j->req->cancelled && j->req->grp->running == 0 &&
            (!w || j->req->grp->seq < w->req->grp->seq))
            w = j;
    if (!w)
        return 0;
    int64_t fq, ff, nq, nf;
    int n_pref;
    admit_budget(s, &fq, &ff, &n_pref);
    job_estimate(s, w, w->n_tok, &nq, &nf);
    int need_pref = n_pref >= KVC_PREFILL_SLOTS;
    if (s->n_running < s->p.max_seqs && !need_pref && nq <= fq && nf <= ff)
        return 0; /* it can start as it is */
    job *v = NULL;
    for (int k = 0; k < s->p.max_seqs; k++) {
        job *j = s->running[k];
        if (!j || j->req->grp->running < 2 || (need_pref && !prefilling(j)))
            continue;
        int gj = j->req->grp->running, gv = v ? v->req->grp->running : 0;
        if (!v || gj > gv ||
            (gj == gv && (j->n_past < v->n_past ||
                          (j->n_past == v->n_past && j->admit_seq > v->admit_seq))))
            v = j;
    }
    if (!v)
        return 0;
    char why[160];
    snprintf(why, sizeof why, "fair share: request %.60s waits with nothing running",
             w->req->id);
    preempt(s, v, why);
    s->met.preemptions_fair++;
    return 1;
}

static void admit(sched *s)
{
    if (s->admit_hold && s->n_running > 0)
        return;
    s->admit_hold = 0;
    admit_some(s);
    if (make_room(s))
        admit_some(s);
}

/* Frees the jobs of cancelled requests. */
static void reap(sched *s)
{
    for (int k = 0; k < s->p.max_seqs; k++) {
        job *j = s->running[k];
        if (j && j->req->cancelled)
            job_end(s, j, NULL);
    }
    for (job *j = s->wait_head, *nx; j; j = nx) {
        nx = j->qnext;
        if (j->req->cancelled)
            job_end(s, j, NULL);
    }
}

/* Packs the step: every decoding job's next token, then prefill pieces (a
 * piece always runs to the end of its chunk or prompt, so a sequence's
 * results never depend on the load) within max_batch, round robin: the
 * job served longest ago first; a piece that does not fit waits (it is
 * first in line next step) while smaller ones may still fit. */
static int build_batch(sched *s, int *has_prefill)
{
    const int C = s->p.kv.chunk_size;
    int n = 0, total = 0;
    *has_prefill = 0;
    s->step_no++;
    for (int k = 0; k < s->p.max_seqs; k++) {
        job *j = s->running[k];
        if (!j || prefilling(j))
            continue;
        s->items[n] = (fwd_item){s->slots[k], j->toks + j->n_past, 1, 0, 1, NULL};
        s->item_job[n++] = j;
        total++;
    }
    for (;;) {
        job *best = NULL;
        for (int k = 0; k < s->p.max_seqs; k++) {
            job *j = s->running[k];
            if (!j || !prefilling(j) || j->skip_step == s->step_no)
                continue;
            int in_batch = 0;
            for (int i = 0; i < n; i++)
                in_batch |= s->item_job[i] == j;
            if (!in_batch && (!best || j->prefill_turn < best->prefill_turn))
                best = j;
        }
        if (!best)
            break;
        int piece = best->prefill_to - best->n_past;
        int tb = C - best->n_past % C;
        if (piece > tb)
            piece = tb;
        if (total + piece > s->p.max_batch) {
            best->skip_step = s->step_no;
            continue;
        }
        int last = best->n_past + piece == best->prefill_to;
        s->items[n] = (fwd_item){s->slots[best->slot], best->toks + best->n_past, piece, 1,
                                 last, NULL};
        s->item_job[n++] = best;
        best->prefill_turn = ++s->turn_counter;
        total += piece;
        *has_prefill = 1;
    }
    return n;
}

/* The pool could not hold item `failed`'s step: preempt the youngest
 * sequence of the request holding the most slots (its blocks return; it
 * is recomputed later from its prompt plus the tokens it produced). A
 * sequence alone in the pool cannot grow: submit keeps prompt + max_tokens
 * within what the pool holds alone (sched_max_seq_tokens), so this means
 * the estimate fell short - the request fails with a reason the client
 * sees (503 / an error event), never a silent "length". */
static void on_nospc(sched *s, int failed, const char *why)
{
    job *victim = NULL;
    for (int k = 0; k < s->p.max_seqs; k++) {
        job *j = s->running[k];
        if (!j)
            continue;
        int gj = j->req->grp->running, gv = victim ? victim->req->grp->running : 0;
        if (!victim || gj > gv || (gj == gv && j->admit_seq > victim->admit_seq))
            victim = j;
    }
    job *jf = s->item_job[failed];
    if (s->n_running <= 1 || !victim) {
        char msg[256];
        snprintf(msg, sizeof msg,
                 "the KV cache is full: this sequence (%d tokens) does not fit the server's "
                 "KV pool even alone; retry with a shorter prompt or max_tokens", jf->n_tok);
        log_msg(LOG_LEVEL_WARN, jf->req->id, "%s (%s)", msg, why);
        req_fail(s, jf->req, 503, msg);
        return;
    }
    preempt(s, victim, "KV pool full");
    s->admit_hold = 1;
}

/* log-probabilities of the chosen token and the top-n alternatives. */
static void logprobs(const float *lg, int V, int32_t chosen, int n_top, sched_tok *rec)
{
    float mx = lg[0];
    for (int i = 1; i < V; i++)
        mx = lg[i] > mx ? lg[i] : mx;
    double sum = 0;
    for (int i = 0; i < V; i++)
        sum += exp((double)(lg[i] - mx));
    float lse = mx + (float)log(sum);
    rec->logprob = lg[chosen] - lse;
    /* one pass keeping the n_top largest in descending order */
    int k = 0;
    for (int i = 0; i < V; i++) {
        if (k == n_top && (k == 0 || lg[i] <= lg[rec->top_id[k - 1]]))
            continue;
        int at = k < n_top ? k++ : k - 1;
        while (at > 0 && lg[rec->top_id[at - 1]] < lg[i]) {
            rec->top_id[at] = rec->top_id[at - 1];
            at--;
        }
        rec->top_id[at] = i;
    }
    rec->n_top = k;
    for (int i = 0; i < k; i++)
        rec->top_lp[i] = lg[rec->top_id[i]] - lse;
}

/* Appends the sampled token's text to the job and applies stop sequences
 * (under mu). Returns the finish reason or NULL. */
static const char *publish(sched *s, job *j, int32_t tok)
{
    sched_req *r = j->req;
    const tok_tokenizer *tk = s->m->tok;
    int eog = tok_is_eog(tk, tok) && !r->ignore_eos;
    const char *finish = NULL;
    if (!eog) {
        j->toks[j->n_tok++] = tok;
        j->n_gen++;
        s->met.generated_tokens++;
        size_t w = tok_decoder_push(&j->dec, tok, s->piece_buf, sizeof s->piece_buf);
        if (j->n_gen >= r->max_tokens || j->n_tok >= s->p.n_ctx) {
            w += tok_decoder_flush(&j->dec, s->piece_buf + w, sizeof s->piece_buf - w);
            finish = "length";
        }
        if (grow_text(&j->text, &j->cap, j->len, w) == 0) {
            memcpy(j->text + j->len, s->piece_buf, w);
            j->len += w;
            j->text[j->len] = '\0';
        }
        if (r->logprobs >= 0 && grow_toks(&j->rec, &j->cap_rec, j->n_rec, 1) == 0) {
            j->next_rec.text_end = (int64_t)j->len;
            j->rec[j->n_rec++] = j->next_rec;
        }
    } else {
        size_t w = tok_decoder_flush(&j->dec, s->piece_buf, sizeof s->piece_buf);
        if (w && grow_text(&j->text, &j->cap, j->len, w) == 0) {
            memcpy(j->text + j->len, s->piece_buf, w);
            j->len += w;
            j->text[j->len] = '\0';
        }
        finish = "stop";
    }
    /* stop sequences: cut at the earliest match; hold back a suffix that
     * may still become one */
    size_t vis = j->len;
    if (r->n_stop > 0) {
        size_t from = j->visible > r->max_stop ? j->visible - r->max_stop : 0;
        size_t cut = (size_t)-1;
        for (int i = 0; i < r->n_stop; i++) {
            char *p = j->len >= from ? memmem(j->text + from, j->len - from, r->stop[i],
                                              r->stop_len[i]) : NULL;
            if (p && (size_t)(p - j->text) < cut)
                cut = (size_t)(p - j->text);
        }
        if (cut != (size_t)-1) {
            j->len = cut;
            j->text[cut] = '\0';
            vis = cut;
            finish = "stop";
        } else if (!finish) {
            size_t hold = 0;
            for (int i = 0; i < r->n_stop; i++) {
                for (size_t k = r->stop_len[i] - 1; k > hold; k--) {
                    if (k <= j->len && memcmp(j->text + j->len - k, r->stop[i], k) == 0) {
                        hold = k;
                        break;
                    }
                }
            }
            vis = j->len - hold;
        }
    }
    if (vis < j->visible)
        vis = j->visible;
    j->visible = vis;
    return finish;
}

/* Choice 0 (j) of a request just ended its prompt's prefill with logits
 * lg: the other choices still waiting start now as forks of its sequence
 * (the prompt's blocks shared, a partially filled page copied) and sample
 * their first token from the same logits - exactly what their own prefill
 * would have computed. A choice that finds no slot, or no page for the
 * copy, waits and is admitted as usual later (from the prefix cache).
 * Engine thread, under mu (the fork copies the EMA state: small). */
static void fork_choices(sched *s, job *j, const float *lg, double t)
{
    sched_req *r = j->req;
    char err[256];
    for (int i = 1; i < r->n_jobs; i++) {
        job *c = &r->jobs[i];
        if (c->st != JOB_WAITING || c->n_gen != 0 || r->cancelled)
            continue;
        if (s->n_running >= s->p.max_seqs || r->grp->running >= s->max_per_req)
            break;
        wait_remove(s, c);
        int slot = 0;
        while (s->running[slot])
            slot++;
        fwd_seq_reset(s->slots[slot]);
        if (fwd_seq_fork(s->slots[slot], s->slots[j->slot], err, sizeof err) < 0) {
            log_msg(LOG_LEVEL_DEBUG, r->id, "choice %d not forked: %s", i, err);
            wait_push(s, c, 1);
            break;
        }
        s->running[slot] = c;
        s->n_running++;
        r->grp->running++;
        c->slot = slot;
        c->st = JOB_RUNNING;
        c->n_past = c->prefill_to = c->n_tok;
        c->admit_seq = ++s->admit_counter;
        c->prefill_turn = ++s->turn_counter;
        s->met.forks++;
        c->next_tok = smp_sample(c->smp, lg, c->toks, c->n_tok, NULL);
        if (r->logprobs >= 0) {
            c->next_rec.token = c->next_tok;
            logprobs(lg, s->m->hp.n_vocab, c->next_tok, r->logprobs, &c->next_rec);
        }
        c->t_last_tok = t;
        const char *fin = publish(s, c, c->next_tok);
        if (fin)
            job_end(s, c, fin);
    }
}

static void *engine_main(void *arg)
{
    sched *s = arg;
    const int V = s->m->hp.n_vocab;
    char err[512];
    pthread_mutex_lock(&s->mu);
    while (!s->quit) {
        if (s->fail_status) {
            fail_everything(s, s->fail_status, s->fail_why);
            s->fail_status = 0;
        }
        reap(s);
        admit(s);
        int has_prefill = 0;
        int n = build_batch(s, &has_prefill);
        snapshot_kv(s, 0);
        if (n == 0) {
            snapshot_kv(s, 1);
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += 200 * 1000 * 1000;
            if (ts.tv_nsec >= 1000000000L) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000L;
            }
            pthread_cond_timedwait(&s->cv, &s->mu, &ts);
            continue;
        }
        pthread_mutex_unlock(&s->mu);

        double t0 = now_s();
        int failed = -1;
        int rc = fwd_eval_batch(s->bk, s->items, n, &failed, err, sizeof err);
        double t1 = now_s();
        if (rc == 0) {
            for (int i = 0; i < n; i++) {
                job *j = s->item_job[i];
                if (s->items[i].prefill && j->req->cache_prompt)
                    fwd_seq_prefix_store(s->items[i].seq, j->toks); /* engine fields */
                if (!s->items[i].want_logits)
                    continue;
                const float *lg = s->items[i].out_logits;
                j->next_tok = smp_sample(j->smp, lg, j->toks, j->n_tok, NULL);
                if (j->req->logprobs >= 0) {
                    j->next_rec.token = j->next_tok;
                    logprobs(lg, V, j->next_tok, j->req->logprobs, &j->next_rec);
                }
            }
        }

        pthread_mutex_lock(&s->mu);
        s->met.steps++;
        if (rc == -ENOSPC) {
            on_nospc(s, failed, err);
            continue;
        }
        if (rc < 0) {
            job *jf = failed >= 0 ? s->item_job[failed] : s->item_job[0];
            log_msg(LOG_LEVEL_ERROR, jf->req->id, "step failed: %s", err);
            req_fail(s, jf->req, 500, err);
            continue;
        }
        if (has_prefill)
            hist_add(&s->met.prefill_chunk, t1 - t0);
        for (int i = 0; i < n; i++) {
            job *j = s->item_job[i];
            j->n_past += s->items[i].n;
            if (s->items[i].prefill && j->n_gen == 0)
                s->met.prompt_tokens += (uint64_t)s->items[i].n;
            if (!s->items[i].want_logits)
                continue;
            if (j->req->cancelled)
                continue;
            sched_req *r = j->req;
            if (!r->got_first) {
                r->got_first = 1;
                r->t_first = t1;
                hist_add(&s->met.ttft, t1 - r->t_submit);
                s->met.kv_mode[r->kv_mode].ttft_count++;
                s->met.kv_mode[r->kv_mode].ttft_sum += t1 - r->t_submit;
            } else if (j->n_gen > 0 && !s->items[i].prefill) {
                hist_add(&s->met.itl, t1 - j->t_last_tok);
            }
            j->t_last_tok = t1;
            if (s->items[i].prefill && j->index == 0 && r->n_jobs > 1 && r->cache_prompt &&
                j->n_gen == 0)
                fork_choices(s, j, s->items[i].out_logits, t1);
            const char *fin = publish(s, j, j->next_tok);
            notify(r);
            if (fin)
                job_end(s, j, fin);
        }
    }
    fail_everything(s, 503, "the server is shutting down");
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* 1 if a fresh sequence of KV mode m and n tokens fits the whole (empty)
 * pool. */
static int fits_alone(const sched *s, int m, int n)
{
    int64_t nq, nf;
    fwd_pool_estimate_mode(s->bk, m, n, &nq, &nf);
    return nq <= s->cap_q && nf <= s->cap_f;
}

/* The per-request cap, the longest sequence the pool holds alone (the
 * admission estimate's peak against the whole pool, by bisection: it
 * grows with n) and the capacity figures of the startup line. */
static void plan_capacity(sched *s)
{
    const sched_params *p = &s->p;
    s->max_per_req = p->max_seqs_per_req > 0 ? p->max_seqs_per_req
                                             : p->max_seqs - p->max_seqs / 4;
    if (s->max_per_req < 1)
        s->max_per_req = 1;
    if (s->max_per_req > p->max_seqs)
        s->max_per_req = p->max_seqs;
    for (int m = 0; m < CFG_KV_MODES; m++) {
        int lo = 0, hi = cfg_kv_has_mode(&p->kv, m) ? p->n_ctx : 0;
        while (lo < hi) {
            int mid = lo + (hi - lo + 1) / 2;
            if (fits_alone(s, m, mid))
                lo = mid;
            else
                hi = mid - 1;
        }
        s->max_seq_mode[m] = lo;
    }
    int lo = s->max_seq_mode[cfg_kv_mode_id(&p->kv)];
    s->max_seq_tokens = lo;
    sched_capacity *c = &s->cap;
    c->pool_bytes = fwd_pool_capacity_bytes(s->bk);
    c->n_ctx = p->n_ctx;
    c->max_seq_tokens = lo;
    c->kv_int4 = p->kv.mode == CFG_KV_INT4;
    c->kv_modes = cfg_kv_mode_mask(&p->kv);
    c->kv_mode = cfg_kv_mode_id(&p->kv);
    c->shared = fwd_pool_shared(s->bk);
    c->max_seqs = p->max_seqs;
    c->max_seqs_per_req = s->max_per_req;
    c->max_queue = p->max_queue;
    int64_t nq, nf;
    fwd_pool_estimate(s->bk, p->n_ctx, &nq, &nf);
    const mdl_hparams *hp = &s->m->hp;
    /* an FP16 cache of a full-context sequence: K and V of every layer,
     * a sliding-window layer only its last W positions */
    int64_t fp16_seq = 0;
    for (int l = 0; l < hp->n_layers; l++) {
        int32_t w = s->m->layers[l].window;
        fp16_seq += (int64_t)(w > 0 && w < p->n_ctx ? w : p->n_ctx) * hp->n_kv_heads *
                    hp->head_dim * 4;
    }
    for (int m = 0; m < CFG_KV_MODES; m++) {
        /* each mode alone: a shared pool counts bytes (fwd_pool_free_units),
         * a single-mode pool its blocks (int4) or pages (fp16) */
        int64_t q, f;
        c->seqs_mode[m] = 0;
        if (!cfg_kv_has_mode(&p->kv, m))
            continue;
        fwd_pool_estimate_mode(s->bk, m, p->n_ctx, &q, &f);
        if (c->shared) {
            /* what the sequences hold once prefilled, the warm-up staging
             * of the KVC_PREFILL_SLOTS that may prefill at once set aside
             * (as a single-mode pool counts its blocks alone) */
            int64_t held = fwd_pool_held_cost(s->bk, m, p->n_ctx);
            int64_t room = s->cap_q - KVC_PREFILL_SLOTS * (q - held);
            c->seqs_mode[m] = held > 0 && room > 0 ? room / held : 0;
        } else if (m != CFG_KV_FP16) {
            c->seqs_mode[m] = q > 0 ? s->cap_q / q : 0;
        } else {
            c->seqs_mode[m] = f > 0 ? s->cap_f / f : 0;
        }
    }
    if (c->shared) {
        c->seqs_int4 = c->seqs_mode[CFG_KV_INT4];
        c->seqs_fp16 = c->seqs_mode[CFG_KV_FP16];
    } else if (c->kv_int4) {
        /* INT4 blocks bound it: the FP16 pages are staging shared by the
         * prefills in progress plus a short tail per sequence */
        c->seqs_int4 = nq > 0 ? s->cap_q / nq : 0;
        c->seqs_fp16 = fp16_seq > 0 ? c->pool_bytes / fp16_seq : 0;
    } else {
        c->seqs_int4 = -1;
        c->seqs_fp16 = nf > 0 ? s->cap_f / nf : 0;
    }
}

int sched_create(const mdl_model *m, const sched_params *pp, sched **out, char *err,
                 size_t errlen)
{
    *out = NULL;
    sched_params p = pp ? *pp : sched_default_params();
    long max_ctx = m->hp.n_ctx_train > 0 ? m->hp.n_ctx_train : 2048;
    if (p.n_ctx <= 0)
        p.n_ctx = (int32_t)(max_ctx < 8192 ? max_ctx : 8192);
    if (p.max_seqs <= 0)
        p.max_seqs = 1;
    if (p.max_queue < 1)
        p.max_queue = 1;
    if (p.max_batch <= 0)
        p.max_batch = p.kv.chunk_size + p.max_seqs;
    if (p.max_batch < p.kv.chunk_size + p.max_seqs)
        return fail(err, errlen, -EINVAL,
                    "max_batch must hold one prefill chunk plus a decode token per "
                    "sequence (chunk_size + max_seqs)");
    sched *s = calloc(1, sizeof *s);
    if (!s)
        return fail(err, errlen, -ENOMEM, "out of memory");
    s->m = m;
    s->p = p;
    s->admitting = 1;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    fwd_params fp = fwd_default_params();
    fp.n_ctx = p.n_ctx;
    fp.max_seqs = p.max_seqs;
    fp.max_batch = p.max_batch;
    fp.n_threads = p.n_threads;
    fp.kv = p.kv;
    fp.device = p.device;
    int rc = fwd_create(m, &fp, &s->bk, err, errlen);
    if (rc < 0)
        goto fail;
    if (p.prefix_nodes > 0) {
        char why[256];
        int pr = fwd_prefix_enable(s->bk, p.prefix_nodes, why, sizeof why);
        s->met.prefix_on = pr == 0;
        if (pr < 0)
            log_msg(LOG_LEVEL_INFO, NULL, "prompt prefix reuse is off: %s", why);
    }
    fwd_pool_free_units(s->bk, &s->cap_q, &s->cap_f);
    plan_capacity(s);
    s->slots = calloc((size_t)p.max_seqs, sizeof *s->slots);
    s->running = calloc((size_t)p.max_seqs, sizeof *s->running);
    s->items = calloc((size_t)p.max_batch, sizeof *s->items);
    s->item_job = calloc((size_t)p.max_batch, sizeof *s->item_job);
    if (!s->slots || !s->running || !s->items || !s->item_job) {
        rc = fail(err, errlen, -ENOMEM, "out of memory");
        goto fail;
    }
    for (int i = 0; i < p.max_seqs; i++) {
        rc = fwd_seq_create(s->bk, p.n_ctx, &s->slots[i], err, errlen);
        if (rc < 0)
            goto fail;
    }
    static const double lat[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                 2.5, 5, 10, 20, 40, 80, 160};
    static const double itl[] = {0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08,
                                 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5};
    hist_init(&s->met.ttft, lat, 15);
    hist_init(&s->met.e2e, lat, 15);
    hist_init(&s->met.queue_time, lat, 15);
    hist_init(&s->met.prefill_chunk, lat, 15);
    hist_init(&s->met.itl, itl, 15);
    s->met.kv_int4 = p.kv.mode == CFG_KV_INT4;
    s->met.kv_name = cfg_kv_mode_name(&p.kv);
    s->met.kv_window_name = p.kv.mode == CFG_KV_FP16 ? "fp16" : cfg_kv_window_name(&p.kv);
    s->met.kv_modes = cfg_kv_mode_mask(&p.kv);
    s->met.kv_shared = s->cap.shared;
    for (int m = 0; m < CFG_KV_MODES; m++)
        s->met.kv_mode_capacity[m] = s->cap.seqs_mode[m];
    s->met.max_seqs = p.max_seqs;
    s->met.kv_budget_bytes = fwd_pool_capacity_bytes(s->bk);
    snapshot_kv(s, 1);
    if (pthread_create(&s->thr, NULL, engine_main, s) != 0) {
        rc = fail(err, errlen, -EAGAIN, "cannot start the engine thread");
        goto fail;
    }
    s->thr_started = 1;
    *out = s;
    return 0;
fail:
    sched_destroy(s);
    return rc < 0 ? rc : -1;
}

void sched_destroy(sched *s)
{
    if (!s)
        return;
    if (s->thr_started) {
        pthread_mutex_lock(&s->mu);
        s->quit = 1;
        s->admitting = 0;
        pthread_cond_signal(&s->cv);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->thr, NULL);
    }
    if (s->slots)
        for (int i = 0; i < s->p.max_seqs; i++)
            fwd_seq_destroy(s->slots[i]);
    free(s->slots);
    free(s->running);
    free(s->items);
    free(s->item_job);
    fwd_destroy(s->bk);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s);
}
