/*
 * lkq_stats.c - per-level results of the load generator and their output
 * formats (see lkq_stats.h). Threading: none.
 */
#include "loadtests/lkq_stats.h"

#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

int lkq_samples_add(lkq_samples *s, double x)
{
    if (s->n == s->cap) {
        size_t nc = s->cap ? s->cap * 2 : 256;
        double *nv = realloc(s->v, nc * sizeof *nv);
        if (!nv)
            return -1;
        s->v = nv;
        s->cap = nc;
    }
    s->v[s->n++] = x;
    s->sorted = 0;
    return 0;
}

void lkq_samples_free(lkq_samples *s)
{
    if (!s)
        return;
    free(s->v);
    memset(s, 0, sizeof *s);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double lkq_samples_pct(lkq_samples *s, double p)
{
    if (s->n == 0)
        return NAN;
    if (!s->sorted) {
        qsort(s->v, s->n, sizeof *s->v, cmp_double);
        s->sorted = 1;
    }
    if (p <= 0)
        return s->v[0];
    if (p >= 100)
        return s->v[s->n - 1];
    double pos = p / 100.0 * (double)(s->n - 1);
    size_t lo = (size_t)pos;
    double frac = pos - (double)lo;
    if (lo + 1 >= s->n)
        return s->v[s->n - 1];
    return s->v[lo] + frac * (s->v[lo + 1] - s->v[lo]);
}

double lkq_samples_mean(const lkq_samples *s)
{
    if (s->n == 0)
        return NAN;
    double sum = 0;
    for (size_t i = 0; i < s->n; i++)
        sum += s->v[i];
    return sum / (double)s->n;
}

const char *lkq_fail_name(lkq_fail_kind k)
{
    switch (k) {
    case LKQ_FAIL_HTTP: return "http";
    case LKQ_FAIL_CONNECT: return "connect";
    case LKQ_FAIL_TIMEOUT: return "timeout";
    case LKQ_FAIL_TRANSPORT: return "transport";
    case LKQ_FAIL_STREAM: return "malformed_stream";
    case LKQ_FAIL_INBAND: return "stream_error";
    case LKQ_FAIL_DROPPED: return "dropped";
    default: return "?";
    }
}

void lkq_level_init(lkq_level *l)
{
    memset(l, 0, sizeof *l);
    lkq_prom_agg_init(&l->prom);
}

void lkq_level_free(lkq_level *l)
{
    if (!l)
        return;
    lkq_samples_free(&l->ttft);
    lkq_samples_free(&l->itl);
    lkq_samples_free(&l->e2e);
    lkq_samples_free(&l->tpot);
}

int64_t lkq_level_unexpected(const lkq_level *l)
{
    return l->failed - l->by_status[429] - l->by_status[503] - l->by_kind[LKQ_FAIL_DROPPED];
}

void lkq_level_errors_str(const lkq_level *l, char *buf, size_t len)
{
    size_t o = 0;
    buf[0] = '\0';
    for (int st = 0; st < LKQ_STATUS_MAX; st++)
        if (l->by_status[st] && o < len)
            o += (size_t)snprintf(buf + o, len - o, "%s%d:%lld", o ? " " : "", st,
                                  (long long)l->by_status[st]);
    for (int k = 1; k < LKQ_FAIL_N; k++)
        if (l->by_kind[k] && o < len)
            o += (size_t)snprintf(buf + o, len - o, "%s%s:%lld", o ? " " : "",
                                  lkq_fail_name((lkq_fail_kind)k), (long long)l->by_kind[k]);
    if (l->cancelled && o < len)
        o += (size_t)snprintf(buf + o, len - o, "%scancelled:%lld", o ? " " : "",
                              (long long)l->cancelled);
    if (o == 0)
        snprintf(buf, len, "-");
}

/* Seconds to milliseconds for the table. */
static double ms(double s)
{
    return s * 1e3;
}

void lkq_level_print_header(FILE *f)
{
    fprintf(f, "%-6s %-5s %7s %5s %5s %5s %7s %8s | %21s | %21s | %21s | %4s %4s %5s | %s\n",
            "label", "mode", "level", "sent", "ok", "fail", "req/s", "tok/s",
            "TTFT ms p50/p90/p99", "ITL ms p50/p90/p99", "E2E s p50/p90/p99",
            "run", "wait", "kv%", "errors");
}

/* A gauge for the table: "-" when the scrape never carried it. */
static const char *gauge(char *buf, size_t len, double v, double scale, const char *fmt)
{
    if (v < 0)
        return "-";
    snprintf(buf, len, fmt, v * scale);
    return buf;
}

void lkq_level_print_row(FILE *f, lkq_level *l)
{
    char errs[256], lvl[32], g1[16], g2[16], g3[16];
    lkq_level_errors_str(l, errs, sizeof errs);
    if (l->open_loop)
        snprintf(lvl, sizeof lvl, "%.3g/s", l->rate);
    else
        snprintf(lvl, sizeof lvl, "%d", l->concurrency);
    double w = l->wall_s > 0 ? l->wall_s : NAN;
    fprintf(f, "%-6.6s %-5s %7s %5lld %5lld %5lld %7.3f %8.2f | %6.0f %6.0f %7.0f | %6.1f %6.1f %7.1f | "
               "%6.2f %6.2f %7.2f | %4s %4s %5s | %s\n",
            l->label[0] ? l->label : "-", l->open_loop ? "open" : "closed", lvl,
            (long long)l->sent, (long long)l->ok, (long long)l->failed,
            (double)l->ok / w, (double)l->completion_tokens / w,
            ms(lkq_samples_pct(&l->ttft, 50)), ms(lkq_samples_pct(&l->ttft, 90)),
            ms(lkq_samples_pct(&l->ttft, 99)),
            ms(lkq_samples_pct(&l->itl, 50)), ms(lkq_samples_pct(&l->itl, 90)),
            ms(lkq_samples_pct(&l->itl, 99)),
            lkq_samples_pct(&l->e2e, 50), lkq_samples_pct(&l->e2e, 90), lkq_samples_pct(&l->e2e, 99),
            gauge(g1, sizeof g1, l->prom.max_running, 1, "%.0f"),
            gauge(g2, sizeof g2, l->prom.max_waiting, 1, "%.0f"),
            gauge(g3, sizeof g3, l->prom.max_kv_usage, 100, "%.1f"), errs);
}

#define LKQ_CSV_COLS \
    "label,mode,concurrency,rate,sent,ok,failed,unexpected_failures,cancelled,saturated_s,wall_s,req_per_s,gen_tok_per_s," \
    "prompt_tokens_mean,completion_tokens_mean," \
    "ttft_p50,ttft_p90,ttft_p99,itl_p50,itl_p90,itl_p99,e2e_p50,e2e_p90,e2e_p99,tpot_p50,tpot_p90,tpot_p99," \
    "max_inflight,scrapes,max_running,max_running_no_queue,max_running_queued,mean_running,max_waiting,mean_waiting," \
    "max_kv_usage,mean_kv_usage,max_kv_bytes,max_int4_blocks_used,int4_blocks_total," \
    "max_fp16_blocks_used,fp16_blocks_total,bits_per_element," \
    "rejected_delta,preemptions_delta,errors"

void lkq_level_csv_header(FILE *f)
{
    fprintf(f, "%s\n", LKQ_CSV_COLS);
}

/* Prints a double for CSV/JSON-free text: empty for NaN / absent (< 0 when
 * absent_neg). */
static void csv_num(FILE *f, double v, int absent_neg)
{
    if (isnan(v) || isinf(v) || (absent_neg && v < 0))
        fputs(",", f);
    else
        fprintf(f, ",%.6g", v);
}

static double delta(double first, double last)
{
    return (first >= 0 && last >= 0) ? last - first : -1;
}

void lkq_level_csv_row(FILE *f, lkq_level *l)
{
    char errs[256];
    lkq_level_errors_str(l, errs, sizeof errs);
    double w = l->wall_s > 0 ? l->wall_s : NAN;
    double okd = l->ok > 0 ? (double)l->ok : NAN;
    fprintf(f, "%s,%s,%d", l->label, l->open_loop ? "open" : "closed",
            l->open_loop ? 0 : l->concurrency);
    csv_num(f, l->open_loop ? l->rate : 0, 0);
    fprintf(f, ",%lld,%lld,%lld,%lld,%lld", (long long)l->sent, (long long)l->ok,
            (long long)l->failed, (long long)lkq_level_unexpected(l), (long long)l->cancelled);
    csv_num(f, l->saturated ? l->saturated_at : NAN, 0);
    csv_num(f, l->wall_s, 0);
    csv_num(f, (double)l->ok / w, 0);
    csv_num(f, (double)l->completion_tokens / w, 0);
    csv_num(f, (double)l->prompt_tokens / okd, 0);
    csv_num(f, (double)l->completion_tokens / okd, 0);
    lkq_samples *ss[4] = {&l->ttft, &l->itl, &l->e2e, &l->tpot};
    for (int k = 0; k < 4; k++) {
        csv_num(f, lkq_samples_pct(ss[k], 50), 0);
        csv_num(f, lkq_samples_pct(ss[k], 90), 0);
        csv_num(f, lkq_samples_pct(ss[k], 99), 0);
    }
    fprintf(f, ",%d,%d", l->max_inflight_seen, l->prom.n);
    const lkq_prom_agg *p = &l->prom;
    csv_num(f, p->max_running, 1);
    csv_num(f, p->max_running_no_queue, 1);
    csv_num(f, p->max_running_queued, 1);
    csv_num(f, p->n ? p->mean_running : -1, 1);
    csv_num(f, p->max_waiting, 1);
    csv_num(f, p->n ? p->mean_waiting : -1, 1);
    csv_num(f, p->max_kv_usage, 1);
    csv_num(f, p->n ? p->mean_kv_usage : -1, 1);
    csv_num(f, p->max_kv_bytes, 1);
    for (int k = 0; k < 2; k++) {
        csv_num(f, p->max_blocks_used[k], 1);
        csv_num(f, p->blocks_total[k], 1);
    }
    csv_num(f, p->bits_per_element, 1);
    csv_num(f, delta(p->rejected_first, p->rejected_last), 1);
    csv_num(f, delta(p->preempt_first, p->preempt_last), 1);
    fprintf(f, ",%s\n", errs);
}

/* A JSON number, or null for NaN / absent. */
static json_t *jnum(double v, int absent_neg)
{
    if (isnan(v) || isinf(v) || (absent_neg && v < 0))
        return json_null();
    return json_real(v);
}

/* {"p50":..,"p90":..,"p99":..,"mean":..,"n":..} */
static json_t *jpct(lkq_samples *s)
{
    json_t *o = json_object();
    if (!o)
        return NULL;
    json_object_set_new(o, "p50", jnum(lkq_samples_pct(s, 50), 0));
    json_object_set_new(o, "p90", jnum(lkq_samples_pct(s, 90), 0));
    json_object_set_new(o, "p99", jnum(lkq_samples_pct(s, 99), 0));
    json_object_set_new(o, "mean", jnum(lkq_samples_mean(s), 0));
    json_object_set_new(o, "n", json_integer((json_int_t)s->n));
    return o;
}

int lkq_level_json_line(FILE *f, lkq_level *l)
{
    json_t *o = json_object(), *st = json_object(), *kd = json_object(), *m = json_object();
    if (!o || !st || !kd || !m) {
        json_decref(o);
        json_decref(st);
        json_decref(kd);
        json_decref(m);
        return -1;
    }
    double w = l->wall_s > 0 ? l->wall_s : NAN;
    json_object_set_new(o, "label", json_string(l->label));
    json_object_set_new(o, "mode", json_string(l->open_loop ? "open" : "closed"));
    if (l->open_loop)
        json_object_set_new(o, "rate", json_real(l->rate));
    else
        json_object_set_new(o, "concurrency", json_integer(l->concurrency));
    json_object_set_new(o, "sent", json_integer(l->sent));
    json_object_set_new(o, "ok", json_integer(l->ok));
    json_object_set_new(o, "failed", json_integer(l->failed));
    json_object_set_new(o, "unexpected_failures", json_integer(lkq_level_unexpected(l)));
    json_object_set_new(o, "cancelled", json_integer(l->cancelled));
    json_object_set_new(o, "saturated_s", l->saturated ? json_real(l->saturated_at) : json_null());
    for (int s = 0; s < LKQ_STATUS_MAX; s++)
        if (l->by_status[s]) {
            char k[8];
            snprintf(k, sizeof k, "%d", s);
            json_object_set_new(st, k, json_integer(l->by_status[s]));
        }
    for (int k = 1; k < LKQ_FAIL_N; k++)
        if (l->by_kind[k])
            json_object_set_new(kd, lkq_fail_name((lkq_fail_kind)k), json_integer(l->by_kind[k]));
    json_object_set_new(o, "errors_by_status", st);
    json_object_set_new(o, "errors_by_kind", kd);
    json_object_set_new(o, "wall_s", jnum(l->wall_s, 0));
    json_object_set_new(o, "req_per_s", jnum((double)l->ok / w, 0));
    json_object_set_new(o, "gen_tok_per_s", jnum((double)l->completion_tokens / w, 0));
    json_object_set_new(o, "prompt_tokens", json_integer(l->prompt_tokens));
    json_object_set_new(o, "completion_tokens", json_integer(l->completion_tokens));
    json_object_set_new(o, "ttft_s", jpct(&l->ttft));
    json_object_set_new(o, "itl_s", jpct(&l->itl));
    json_object_set_new(o, "e2e_s", jpct(&l->e2e));
    json_object_set_new(o, "tpot_s", jpct(&l->tpot));
    json_object_set_new(o, "max_inflight", json_integer(l->max_inflight_seen));
    const lkq_prom_agg *p = &l->prom;
    json_object_set_new(m, "scrapes", json_integer(p->n));
    json_object_set_new(m, "max_running", jnum(p->max_running, 1));
    json_object_set_new(m, "max_running_no_queue", jnum(p->max_running_no_queue, 1));
    json_object_set_new(m, "max_running_queued", jnum(p->max_running_queued, 1));
    json_object_set_new(m, "mean_running", jnum(p->n ? p->mean_running : -1, 1));
    json_object_set_new(m, "max_waiting", jnum(p->max_waiting, 1));
    json_object_set_new(m, "mean_waiting", jnum(p->n ? p->mean_waiting : -1, 1));
    json_object_set_new(m, "max_kv_usage", jnum(p->max_kv_usage, 1));
    json_object_set_new(m, "mean_kv_usage", jnum(p->n ? p->mean_kv_usage : -1, 1));
    json_object_set_new(m, "max_kv_bytes", jnum(p->max_kv_bytes, 1));
    json_object_set_new(m, "max_int4_blocks_used", jnum(p->max_blocks_used[0], 1));
    json_object_set_new(m, "int4_blocks_total", jnum(p->blocks_total[0], 1));
    json_object_set_new(m, "max_fp16_blocks_used", jnum(p->max_blocks_used[1], 1));
    json_object_set_new(m, "fp16_blocks_total", jnum(p->blocks_total[1], 1));
    json_object_set_new(m, "bits_per_element", jnum(p->bits_per_element, 1));
    json_object_set_new(m, "rejected_delta", jnum(delta(p->rejected_first, p->rejected_last), 1));
    json_object_set_new(m, "preemptions_delta", jnum(delta(p->preempt_first, p->preempt_last), 1));
    json_object_set_new(o, "server", m);
    char *txt = json_dumps(o, JSON_COMPACT | JSON_REAL_PRECISION(6));
    json_decref(o);
    if (!txt)
        return -1;
    fprintf(f, "%s\n", txt);
    free(txt);
    return 0;
}
