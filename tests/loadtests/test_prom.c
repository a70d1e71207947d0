/*
 * test_prom.c - the load generator's reader of the Prometheus text format:
 * samples with and without labels, escaped label values, histograms, special
 * values, timestamps, malformed lines; the snapshot of the server's gauges
 * (sums over kinds, vLLM-compatible fallbacks) and the per-level aggregate.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "loadtests/lkq_prom.h"

static const char EXPO[] =
    "# HELP livekvq_requests_running Requests being decoded or prefilled.\n"
    "# TYPE livekvq_requests_running gauge\n"
    "livekvq_requests_running 3\n"
    "livekvq_requests_waiting 2\n"
    "livekvq_kv_bytes{kind=\"int4\"} 1000\n"
    "livekvq_kv_bytes{kind=\"scales\"} 200\n"
    "livekvq_kv_bytes{kind=\"outliers\"} 30\n"
    "livekvq_kv_bytes{kind=\"fp16\"} 400\n"
    "livekvq_kv_bytes{kind=\"other\"} 0\n"
    "livekvq_kv_fp16_equivalent_bytes 6000\n"
    "livekvq_kv_bits_per_element 4.35\n"
    "livekvq_kv_blocks_used{kind=\"int4\"} 10\n"
    "livekvq_kv_blocks_used{kind=\"fp16\"} 2\n"
    "livekvq_kv_blocks_total{kind=\"int4\"} 100\n"
    "livekvq_kv_blocks_total{kind=\"fp16\"} 20\n"
    "livekvq_kv_usage_ratio 0.1\n"
    "livekvq_requests_rejected_total{reason=\"queue_full\"} 4\n"
    "livekvq_requests_rejected_total{reason=\"too_long\"} 1\n"
    "livekvq_preemptions_total 0\n"
    "livekvq_prompt_tokens_total 12345\n"
    "livekvq_requests_total{endpoint=\"/v1/completions\",code=\"200\"} 17 1700000000000\n"
    "livekvq_kv_ema_lo{layer=\"0\",tensor=\"k\"} -1.5e+00\n"
    "# TYPE livekvq_time_to_first_token_seconds histogram\n"
    "livekvq_time_to_first_token_seconds_bucket{le=\"0.1\"} 1\n"
    "livekvq_time_to_first_token_seconds_bucket{le=\"+Inf\"} 17\n"
    "livekvq_time_to_first_token_seconds_sum 42.5\n"
    "livekvq_time_to_first_token_seconds_count 17\n"
    "vllm:kv_cache_usage_perc 0.1\n"
    "vllm:num_requests_waiting 2\n"
    "vllm:num_requests_running 3\n"
    "livekvq_build_info{version=\"0.1.0\",model=\"Smol \\\"LM\\\" {2}, 135M\",kv_cache=\"int4\"} 1\n";

typedef struct {
    int n;
    double ttft_inf;
    char model[128];
} walk;

static int on_sample(void *u, const char *name, const char *labels, double v)
{
    walk *w = u;
    w->n++;
    if (strcmp(name, "livekvq_time_to_first_token_seconds_bucket") == 0) {
        char le[16];
        cr_assert_eq(lkq_prom_label(labels, "le", le, sizeof le), 0);
        if (strcmp(le, "+Inf") == 0)
            w->ttft_inf = v;
    }
    if (strcmp(name, "livekvq_build_info") == 0)
        cr_assert_eq(lkq_prom_label(labels, "model", w->model, sizeof w->model), 0);
    return 0;
}

Test(prom, parses_every_sample)
{
    walk w = {0};
    cr_assert_eq(lkq_prom_parse(EXPO, strlen(EXPO), on_sample, &w), 0, "no malformed lines");
    cr_assert_eq(w.n, 28);
    cr_assert_float_eq(w.ttft_inf, 17, 0);
    cr_assert_str_eq(w.model, "Smol \"LM\" {2}, 135M");
}

Test(prom, labels)
{
    char v[32];
    cr_assert_eq(lkq_prom_label("a=\"1\",b=\"x\\\\y\\n\"", "b", v, sizeof v), 0);
    cr_assert_str_eq(v, "x\\y\n");
    cr_assert_eq(lkq_prom_label("a=\"1\",b=\"2\"", "c", v, sizeof v), -1);
    cr_assert_eq(lkq_prom_label("ab=\"1\",b=\"2\"", "b", v, sizeof v), 0);
    cr_assert_str_eq(v, "2");
    cr_assert_eq(lkq_prom_label("a=1", "a", v, sizeof v), -1, "unquoted value");
    cr_assert_eq(lkq_prom_label("", "a", v, sizeof v), -1);
}

static int count_cb(void *u, const char *n, const char *l, double v)
{
    (void)n, (void)l, (void)v;
    ++*(int *)u;
    return 0;
}

Test(prom, special_values_and_malformed_lines)
{
    const char *t =
        "a +Inf\nb -Inf\nc NaN\nd 1e-3 123\r\n"
        "\n   \n# comment\n"
        "9bad 1\n"                  /* name starts with a digit */
        "e{x=\"unterminated} 1\n"
        "f\n"                       /* no value */
        "g 1 2 3\n"                 /* junk after the timestamp */
        "h{x=\"1\"}2\n"             /* no space before the value */
        "i abc\n";
    int n = 0;
    cr_assert_eq(lkq_prom_parse(t, strlen(t), count_cb, &n), 6);
    cr_assert_eq(n, 4);
    /* the last line without a newline still counts */
    n = 0;
    cr_assert_eq(lkq_prom_parse("x 1\ny 2", 7, count_cb, &n), 0);
    cr_assert_eq(n, 2);
}

Test(prom, snapshot_sums_and_fallbacks)
{
    lkq_prom_snap s;
    cr_assert_gt(lkq_prom_snapshot(EXPO, strlen(EXPO), &s), 10);
    cr_assert_float_eq(s.running, 3, 0);
    cr_assert_float_eq(s.waiting, 2, 0);
    cr_assert_float_eq(s.kv_bytes, 1630, 0);
    cr_assert_float_eq(s.kv_fp16_equiv, 6000, 0);
    cr_assert_float_eq(s.blocks_used[0], 10, 0);
    cr_assert_float_eq(s.blocks_used[1], 2, 0);
    cr_assert_float_eq(s.blocks_total[0], 100, 0);
    cr_assert_float_eq(s.blocks_total[1], 20, 0);
    cr_assert_float_eq(s.rejected, 5, 0);
    cr_assert_float_eq(s.kv_usage, 0.1, 1e-12);
    cr_assert_float_eq(s.bits_per_element, 4.35, 1e-12);
    cr_assert_float_eq(s.prompt_tokens, 12345, 0);

    /* a server exporting only the vLLM-compatible gauges */
    const char *v = "vllm:kv_cache_usage_perc 0.5\nvllm:num_requests_waiting 7\nvllm:num_requests_running 9\n";
    cr_assert_eq(lkq_prom_snapshot(v, strlen(v), &s), 3);
    cr_assert_float_eq(s.running, 9, 0);
    cr_assert_float_eq(s.waiting, 7, 0);
    cr_assert_float_eq(s.kv_usage, 0.5, 0);
    cr_assert_float_eq(s.kv_bytes, -1, 0, "absent");

    cr_assert_eq(lkq_prom_snapshot("<html>not metrics</html>", 24, &s), 0);
    cr_assert_eq(s.n_bad, 1);
}

Test(prom, aggregate_over_a_level)
{
    lkq_prom_agg a;
    lkq_prom_agg_init(&a);
    lkq_prom_snap s;
    const char *t[] = {
        "livekvq_requests_running 2\nlivekvq_requests_waiting 0\nlivekvq_kv_usage_ratio 0.2\nlivekvq_requests_rejected_total{reason=\"q\"} 1\n",
        "livekvq_requests_running 5\nlivekvq_requests_waiting 0\nlivekvq_kv_usage_ratio 0.9\nlivekvq_requests_rejected_total{reason=\"q\"} 1\n",
        "livekvq_requests_running 6\nlivekvq_requests_waiting 3\nlivekvq_kv_usage_ratio 0.95\nlivekvq_requests_rejected_total{reason=\"q\"} 4\n",
        "livekvq_requests_running 1\nlivekvq_requests_waiting 0\nlivekvq_kv_usage_ratio 0.1\nlivekvq_requests_rejected_total{reason=\"q\"} 4\n",
    };
    for (int i = 0; i < 4; i++) {
        lkq_prom_snapshot(t[i], strlen(t[i]), &s);
        lkq_prom_agg_add(&a, &s);
    }
    cr_assert_eq(a.n, 4);
    cr_assert_float_eq(a.max_running, 6, 0);
    cr_assert_float_eq(a.max_running_no_queue, 5, 0, "6 ran only while 3 waited");
    cr_assert_float_eq(a.max_running_queued, 6, 0);
    cr_assert_float_eq(a.max_waiting, 3, 0);
    cr_assert_float_eq(a.mean_running, 3.5, 1e-12);
    cr_assert_float_eq(a.max_kv_usage, 0.95, 1e-12);
    cr_assert_float_eq(a.rejected_last - a.rejected_first, 3, 0);
}
