/*
 * lkq_prom.c - Prometheus text format reader and the load generator's view of
 * a scrape (see lkq_prom.h). Threading: none.
 */
#include "loadtests/lkq_prom.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define LKQ_PROM_NAME_MAX 256
#define LKQ_PROM_LABELS_MAX 2048

static int is_name_start(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
}

static int is_name_char(char c)
{
    return is_name_start(c) || (c >= '0' && c <= '9');
}

/* Parses a sample value token (strtod understands inf/nan; Prometheus
 * spells them +Inf, -Inf, NaN). Returns 0 or -1. */
static int parse_value(const char *s, size_t n, double *out)
{
    char buf[64];
    if (n == 0 || n >= sizeof buf)
        return -1;
    memcpy(buf, s, n);
    buf[n] = '\0';
    if (strcmp(buf, "+Inf") == 0 || strcmp(buf, "Inf") == 0) {
        *out = INFINITY;
        return 0;
    }
    if (strcmp(buf, "-Inf") == 0) {
        *out = -INFINITY;
        return 0;
    }
    if (strcmp(buf, "NaN") == 0) {
        *out = NAN;
        return 0;
    }
    char *end;
    *out = strtod(buf, &end);
    return (end == buf + n) ? 0 : -1;
}

/* Parses one line [l, l+n). Returns 1 for a sample (callback called, its
 * value in *cbrc), 0 for a blank/comment line, -1 for a malformed line. */
static int parse_line(const char *l, size_t n, lkq_prom_cb cb, void *user, int *cbrc)
{
    size_t i = 0;
    while (i < n && (l[i] == ' ' || l[i] == '\t'))
        i++;
    if (i == n || l[i] == '#')
        return 0;
    char name[LKQ_PROM_NAME_MAX], labels[LKQ_PROM_LABELS_MAX];
    size_t k = 0;
    if (!is_name_start(l[i]))
        return -1;
    while (i < n && is_name_char(l[i])) {
        if (k + 1 >= sizeof name)
            return -1;
        name[k++] = l[i++];
    }
    name[k] = '\0';
    labels[0] = '\0';
    if (i < n && l[i] == '{') {
        size_t start = ++i;
        int in_str = 0;
        while (i < n) {
            char c = l[i];
            if (in_str) {
                if (c == '\\') {
                    i += 2;
                    continue;
                }
                if (c == '"')
                    in_str = 0;
            } else if (c == '"') {
                in_str = 1;
            } else if (c == '}') {
                break;
            }
            i++;
        }
        if (i >= n || in_str)
            return -1;
        size_t ln = i - start;
        if (ln + 1 > sizeof labels)
            return -1;
        memcpy(labels, l + start, ln);
        labels[ln] = '\0';
        i++; /* '}' */
    }
    if (i >= n || (l[i] != ' ' && l[i] != '\t'))
        return -1;
    while (i < n && (l[i] == ' ' || l[i] == '\t'))
        i++;
    size_t vs = i;
    while (i < n && l[i] != ' ' && l[i] != '\t')
        i++;
    double v;
    if (parse_value(l + vs, i - vs, &v) != 0)
        return -1;
    /* an optional integer timestamp may follow; anything else is malformed */
    while (i < n && (l[i] == ' ' || l[i] == '\t'))
        i++;
    if (i < n) {
        if (l[i] == '-')
            i++;
        size_t ds = i;
        while (i < n && l[i] >= '0' && l[i] <= '9')
            i++;
        if (i == ds)
            return -1;
        while (i < n && (l[i] == ' ' || l[i] == '\t'))
            i++;
        if (i != n)
            return -1;
    }
    *cbrc = cb ? cb(user, name, labels, v) : 0;
    return 1;
}

int lkq_prom_parse(const char *text, size_t n, lkq_prom_cb cb, void *user)
{
    int bad = 0;
    size_t i = 0;
    while (i < n) {
        size_t j = i;
        while (j < n && text[j] != '\n')
            j++;
        size_t len = j - i;
        if (len > 0 && text[i + len - 1] == '\r')
            len--;
        int cbrc = 0;
        int r = parse_line(text + i, len, cb, user, &cbrc);
        if (r < 0)
            bad++;
        else if (r == 1 && cbrc != 0)
            return cbrc < 0 ? cbrc : -cbrc;
        i = j + 1;
    }
    return bad;
}

int lkq_prom_label(const char *labels, const char *key, char *out, size_t outlen)
{
    size_t kl = strlen(key);
    const char *p = labels;
    while (*p) {
        while (*p == ' ' || *p == ',')
            p++;
        const char *ks = p;
        while (*p && *p != '=')
            p++;
        if (*p != '=' || p[1] != '"')
            return -1;
        size_t this_kl = (size_t)(p - ks);
        while (this_kl > 0 && ks[this_kl - 1] == ' ')
            this_kl--;
        p += 2;
        int match = (this_kl == kl && memcmp(ks, key, kl) == 0);
        size_t o = 0;
        while (*p && *p != '"') {
            char c = *p++;
            if (c == '\\' && *p) {
                c = *p++;
                if (c == 'n')
                    c = '\n';
            }
            if (match && o + 1 < outlen)
                out[o++] = c;
        }
        if (*p != '"')
            return -1;
        p++;
        if (match) {
            if (outlen)
                out[o] = '\0';
            return 0;
        }
    }
    return -1;
}

/* Scrape state while walking one body. */
typedef struct {
    lkq_prom_snap *s;
    double vllm_running, vllm_waiting, vllm_usage;
    int found;
} snap_walk;

/* Adds v to a field that starts at -1 ("absent"). */
static void acc(double *f, double v)
{
    *f = (*f < 0 ? 0 : *f) + v;
}

static int snap_cb(void *user, const char *name, const char *labels, double v)
{
    snap_walk *w = user;
    lkq_prom_snap *s = w->s;
    s->n_samples++;
    if (!isfinite(v))
        return 0;
    int hit = 1;
    if (strcmp(name, "livekvq_requests_running") == 0)
        s->running = v;
    else if (strcmp(name, "livekvq_requests_waiting") == 0)
        s->waiting = v;
    else if (strcmp(name, "livekvq_kv_usage_ratio") == 0)
        s->kv_usage = v;
    else if (strcmp(name, "livekvq_kv_bytes") == 0)
        acc(&s->kv_bytes, v);
    else if (strcmp(name, "livekvq_kv_fp16_equivalent_bytes") == 0)
        s->kv_fp16_equiv = v;
    else if (strcmp(name, "livekvq_kv_bits_per_element") == 0)
        s->bits_per_element = v;
    else if (strcmp(name, "livekvq_kv_blocks_used") == 0 ||
             strcmp(name, "livekvq_kv_blocks_total") == 0) {
        char kind[16];
        int k = -1;
        if (lkq_prom_label(labels, "kind", kind, sizeof kind) == 0)
            k = strcmp(kind, "int4") == 0 ? 0 : strcmp(kind, "fp16") == 0 ? 1 : -1;
        int used = strcmp(name, "livekvq_kv_blocks_used") == 0;
        if (k >= 0)
            acc(used ? &s->blocks_used[k] : &s->blocks_total[k], v);
    }
    else if (strcmp(name, "livekvq_requests_rejected_total") == 0)
        acc(&s->rejected, v);
    else if (strcmp(name, "livekvq_preemptions_total") == 0)
        s->preemptions = v;
    else if (strcmp(name, "livekvq_prompt_tokens_total") == 0)
        s->prompt_tokens = v;
    else if (strcmp(name, "vllm:num_requests_running") == 0)
        w->vllm_running = v;
    else if (strcmp(name, "vllm:num_requests_waiting") == 0)
        w->vllm_waiting = v;
    else if (strcmp(name, "vllm:kv_cache_usage_perc") == 0)
        w->vllm_usage = v;
    else
        hit = 0;
    w->found += hit;
    return 0;
}

int lkq_prom_snapshot(const char *text, size_t n, lkq_prom_snap *snap)
{
    lkq_prom_snap *s = snap;
    s->running = s->waiting = s->kv_usage = s->kv_bytes = s->kv_fp16_equiv = -1;
    s->bits_per_element = -1;
    s->blocks_used[0] = s->blocks_used[1] = s->blocks_total[0] = s->blocks_total[1] = -1;
    s->rejected = s->preemptions = s->prompt_tokens = -1;
    s->n_samples = 0;
    snap_walk w = {s, -1, -1, -1, 0};
    int bad = lkq_prom_parse(text, n, snap_cb, &w);
    s->n_bad = bad > 0 ? bad : 0;
    /* the vLLM-compatible gauges stand in for a server that exports only them */
    if (s->running < 0)
        s->running = w.vllm_running;
    if (s->waiting < 0)
        s->waiting = w.vllm_waiting;
    if (s->kv_usage < 0)
        s->kv_usage = w.vllm_usage;
    return w.found;
}

void lkq_prom_agg_init(lkq_prom_agg *a)
{
    memset(a, 0, sizeof *a);
    a->max_running = a->max_waiting = a->max_kv_usage = a->max_kv_bytes = -1;
    a->max_blocks_used[0] = a->max_blocks_used[1] = -1;
    a->blocks_total[0] = a->blocks_total[1] = a->bits_per_element = -1;
    a->rejected_first = a->rejected_last = a->preempt_first = a->preempt_last = -1;
    a->max_running_no_queue = a->max_running_queued = -1;
}

static void maxf(double *m, double v)
{
    if (v >= 0 && v > *m)
        *m = v;
}

void lkq_prom_agg_add(lkq_prom_agg *a, const lkq_prom_snap *s)
{
    a->n++;
    maxf(&a->max_running, s->running);
    maxf(&a->max_waiting, s->waiting);
    maxf(&a->max_kv_usage, s->kv_usage);
    maxf(&a->max_kv_bytes, s->kv_bytes);
    for (int k = 0; k < 2; k++) {
        maxf(&a->max_blocks_used[k], s->blocks_used[k]);
        if (s->blocks_total[k] >= 0)
            a->blocks_total[k] = s->blocks_total[k];
    }
    if (s->bits_per_element >= 0)
        a->bits_per_element = s->bits_per_element;
    if (s->waiting <= 0)
        maxf(&a->max_running_no_queue, s->running);
    else
        maxf(&a->max_running_queued, s->running);
    /* running means over the scrapes taken (absent values count as 0) */
    double r = s->running > 0 ? s->running : 0, q = s->waiting > 0 ? s->waiting : 0;
    double u = s->kv_usage > 0 ? s->kv_usage : 0;
    a->mean_running += (r - a->mean_running) / a->n;
    a->mean_waiting += (q - a->mean_waiting) / a->n;
    a->mean_kv_usage += (u - a->mean_kv_usage) / a->n;
    if (s->rejected >= 0) {
        if (a->rejected_first < 0)
            a->rejected_first = s->rejected;
        a->rejected_last = s->rejected;
    }
    if (s->preemptions >= 0) {
        if (a->preempt_first < 0)
            a->preempt_first = s->preemptions;
        a->preempt_last = s->preemptions;
    }
}
