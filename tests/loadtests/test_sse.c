/*
 * test_sse.c - the load generator's SSE parser and OpenAI stream
 * interpreter: events, line endings (LF, CRLF, CR), comments, multi-line
 * data, BOM, every split of a stream into two and three reads (CR LF and
 * UTF-8 sequences cut in half), oversize events, truncation; completions and
 * chat chunks, usage, in-band errors, malformed streams, token timing.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "loadtests/lkq_sse.h"

/* Collected events as "event|data" lines joined with '\x1e'. */
typedef struct {
    char out[8192];
    size_t len;
    int n;
} collect;

static int on_ev(void *user, const char *event, const char *data, size_t len)
{
    collect *c = user;
    cr_assert_eq(strlen(data), len, "data NUL-terminated at len");
    c->len += (size_t)snprintf(c->out + c->len, sizeof c->out - c->len, "%s|%s\x1e", event, data);
    c->n++;
    return 0;
}

/* Parses stream[0..n) fed in the pieces cut at the given offsets. */
static int parse_split(const char *stream, size_t n, const size_t *cuts, int ncuts, collect *c,
                       int *finish_rc)
{
    lkq_sse p;
    char err[128];
    lkq_sse_init(&p, 0);
    memset(c, 0, sizeof *c);
    size_t prev = 0;
    int rc = 0;
    for (int i = 0; i <= ncuts && rc == 0; i++) {
        size_t end = i < ncuts ? cuts[i] : n;
        rc = lkq_sse_feed(&p, stream + prev, end - prev, on_ev, c, err, sizeof err);
        prev = end;
    }
    *finish_rc = lkq_sse_finish(&p, err, sizeof err);
    lkq_sse_free(&p);
    return rc;
}

static void parse_whole(const char *s, collect *c, int *frc)
{
    cr_assert_eq(parse_split(s, strlen(s), NULL, 0, c, frc), 0);
}

Test(sse, basic_fields_and_dispatch)
{
    collect c;
    int frc;
    parse_whole("data: hello\n\n"
                ": keep-alive comment\n\n"
                "event: ping\ndata:no-space\n\n"
                "data: a\ndata: b\ndata\n\n"   /* 'data' alone: empty line of data */
                "id: 7\nretry: 100\n\n"        /* no data: not dispatched */
                "data:  two spaces\n\n",
                &c, &frc);
    cr_assert_eq(frc, 0);
    cr_assert_eq(c.n, 4, "got %d events: %s", c.n, c.out);
    cr_assert_str_eq(c.out, "|hello\x1e" "ping|no-space\x1e" "|a\nb\n\x1e" "| two spaces\x1e");
}

Test(sse, line_endings)
{
    collect a, b, d;
    int f1, f2, f3;
    parse_whole("data: x\n\ndata: y\ndata: z\n\n", &a, &f1);
    parse_whole("data: x\r\n\r\ndata: y\r\ndata: z\r\n\r\n", &b, &f2);
    parse_whole("data: x\r\rdata: y\rdata: z\r\r", &d, &f3);
    cr_assert_str_eq(a.out, b.out);
    cr_assert_str_eq(a.out, d.out);
    cr_assert_eq(a.n, 2);
    cr_assert(f1 == 0 && f2 == 0 && f3 == 0);
}

Test(sse, bom_skipped_once)
{
    collect c;
    int frc;
    parse_whole("\xEF\xBB\xBF" "data: after bom\n\n", &c, &frc);
    cr_assert_str_eq(c.out, "|after bom\x1e");
    /* a partial BOM-like start is ordinary content: "\xEF\xBB" + "x" */
    parse_whole("\xEF\xBBx: y\ndata: z\n\n", &c, &frc);
    cr_assert_str_eq(c.out, "|z\x1e");
}

/* A realistic stream with every hazard: CRLF, a UTF-8 char (é, 2 bytes; and
 * a 4-byte emoji), a comment, multi-line data, the terminator. */
static const char STREAM[] =
    "\xEF\xBB\xBF"
    ": hello\r\n\r\n"
    "data: {\"choices\":[{\"text\":\"caf\xC3\xA9\"}]}\r\n\r\n"
    "event: message\r\n"
    "data: {\"choices\":[{\"text\":\" \xF0\x9F\x90\xB3\"}]}\r\n\r\n"
    "data: line1\ndata: line2\n\n"
    "data: [DONE]\r\n\r\n";

Test(sse, every_two_and_three_way_split_matches_whole)
{
    size_t n = strlen(STREAM);
    collect whole, c;
    int frc;
    parse_whole(STREAM, &whole, &frc);
    cr_assert_eq(frc, 0);
    cr_assert_eq(whole.n, 4, "%s", whole.out);
    for (size_t i = 0; i <= n; i++) {
        size_t cut[1] = {i};
        cr_assert_eq(parse_split(STREAM, n, cut, 1, &c, &frc), 0);
        cr_assert_str_eq(c.out, whole.out, "split at %zu", i);
        cr_assert_eq(frc, 0);
    }
    for (size_t i = 0; i <= n; i += 3)
        for (size_t j = i; j <= n; j += 2) {
            size_t cut[2] = {i, j};
            cr_assert_eq(parse_split(STREAM, n, cut, 2, &c, &frc), 0);
            cr_assert_str_eq(c.out, whole.out, "split at %zu,%zu", i, j);
        }
    /* byte by byte */
    size_t cuts[512];
    cr_assert(n < 512);
    for (size_t i = 0; i < n; i++)
        cuts[i] = i;
    cr_assert_eq(parse_split(STREAM, n, cuts, (int)n, &c, &frc), 0);
    cr_assert_str_eq(c.out, whole.out);
}

Test(sse, cr_then_lf_in_next_read_is_one_line_end)
{
    /* "data: a\r" | "\n\r\n": must give one event, not an extra blank line
     * dispatching early or twice */
    const char *s = "data: a\r\n\r\ndata: b\r\n\r\n";
    size_t cut[1] = {8};
    collect c;
    int frc;
    cr_assert_eq(parse_split(s, strlen(s), cut, 1, &c, &frc), 0);
    cr_assert_str_eq(c.out, "|a\x1e|b\x1e");
}

Test(sse, truncated_and_oversize)
{
    collect c;
    int frc;
    parse_whole("data: complete\n\ndata: partial", &c, &frc);
    cr_assert_eq(c.n, 1);
    cr_assert_lt(frc, 0, "partial line at end is reported");
    parse_whole("data: complete\n\ndata: no blank line\n", &c, &frc);
    cr_assert_lt(frc, 0, "event without its blank line is reported");

    lkq_sse p;
    char err[128] = "";
    lkq_sse_init(&p, 64);
    char big[200];
    memset(big, 'x', sizeof big);
    memcpy(big, "data: ", 6);
    cr_assert_eq(lkq_sse_feed(&p, big, sizeof big, on_ev, &c, err, sizeof err), -1);
    cr_assert(strstr(err, "64"), "%s", err);
    lkq_sse_free(&p);
    /* many data lines that add up past the cap */
    lkq_sse_init(&p, 64);
    int rc = 0;
    for (int i = 0; i < 20 && rc == 0; i++)
        rc = lkq_sse_feed(&p, "data: 0123456789\n", 17, on_ev, &c, err, sizeof err);
    cr_assert_eq(rc, -1);
    lkq_sse_free(&p);
    lkq_sse_free(NULL);
}

static int stop_cb(void *u, const char *e, const char *d, size_t l)
{
    (void)e, (void)d, (void)l;
    ++*(int *)u;
    return 7;
}

Test(sse, callback_can_stop)
{
    lkq_sse p;
    char err[64];
    int calls = 0;
    lkq_sse_init(&p, 0);
    cr_assert_eq(lkq_sse_feed(&p, "data: 1\n\ndata: 2\n\n", 18, stop_cb, &calls, err, sizeof err), 7);
    cr_assert_eq(calls, 1);
    lkq_sse_free(&p);
}

/* --- stream interpreter -------------------------------------------------- */

static int ev(lkq_stream *s, const char *data, double t)
{
    return lkq_stream_event(s, data, strlen(data), t);
}

Test(stream, completions_tokens_usage_done)
{
    lkq_stream s;
    lkq_stream_init(&s);
    cr_assert_eq(ev(&s, "{\"id\":\"x\",\"choices\":[{\"index\":0,\"text\":\"Call\",\"finish_reason\":null}],\"usage\":null}", 1.0), 0);
    cr_assert_eq(ev(&s, "{\"choices\":[{\"text\":\" me\"}]}", 1.25), 0);
    cr_assert_eq(ev(&s, "{\"choices\":[{\"text\":\"\"}]}", 1.3), 0); /* empty: not a token */
    cr_assert_eq(ev(&s, "{\"choices\":[{\"text\":\" Ishmael\",\"finish_reason\":\"length\"}]}", 1.75), 0);
    cr_assert_eq(ev(&s, "{\"choices\":[],\"usage\":{\"prompt_tokens\":4096,\"completion_tokens\":3,\"total_tokens\":4099}}", 1.8), 0);
    cr_assert_eq(ev(&s, "[DONE]", 1.9), 1);
    cr_assert_eq(s.state, LKQ_STREAM_DONE);
    cr_assert_eq(s.n_token_chunks, 3);
    cr_assert_float_eq(s.t_first, 1.0, 1e-12);
    cr_assert_eq(s.n_gaps, 2);
    cr_assert_float_eq(s.gaps[0], 0.25, 1e-12);
    cr_assert_float_eq(s.gaps[1], 0.5, 1e-12, "the empty chunk is not a token");
    cr_assert_eq(s.prompt_tokens, 4096);
    cr_assert_eq(s.completion_tokens, 3);
    cr_assert_str_eq(s.finish_reason, "length");
    /* anything after [DONE] is malformed */
    cr_assert_eq(ev(&s, "{\"choices\":[{\"text\":\"late\"}]}", 2.0), 1);
    cr_assert_eq(s.state, LKQ_STREAM_MALFORMED);
    lkq_stream_free(&s);
    lkq_stream_free(NULL);
}

Test(stream, chat_role_chunk_is_not_a_token)
{
    lkq_stream s;
    lkq_stream_init(&s);
    ev(&s, "{\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"}}]}", 0.5);
    cr_assert_eq(s.n_token_chunks, 0);
    ev(&s, "{\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}", 0.7);
    ev(&s, "{\"choices\":[{\"delta\":{\"content\":\"!\"},\"finish_reason\":\"stop\"}]}", 0.8);
    ev(&s, "[DONE]", 0.9);
    cr_assert_eq(s.state, LKQ_STREAM_DONE);
    cr_assert_eq(s.n_token_chunks, 2);
    cr_assert_float_eq(s.t_first, 0.7, 1e-12);
    cr_assert_str_eq(s.finish_reason, "stop");
    cr_assert_eq(s.completion_tokens, -1, "no usage chunk");
    lkq_stream_free(&s);
}

Test(stream, error_event_then_done)
{
    lkq_stream s;
    lkq_stream_init(&s);
    ev(&s, "{\"choices\":[{\"text\":\"a\"}]}", 0.1);
    cr_assert_eq(ev(&s, "{\"error\":{\"message\":\"KV cache exhausted\",\"type\":\"server_error\",\"param\":null,\"code\":503}}", 0.2), 1);
    cr_assert_eq(s.state, LKQ_STREAM_ERROR);
    cr_assert(strstr(s.reason, "KV cache exhausted"), "%s", s.reason);
    cr_assert_eq(ev(&s, "[DONE]", 0.3), 1);
    cr_assert_eq(s.state, LKQ_STREAM_ERROR, "[DONE] after an error keeps the error");
    lkq_stream_free(&s);
}

Test(stream, malformed_chunks)
{
    const char *bad[] = {"{\"choices\":[{\"text\":\"a\"}", "not json", "[1,2]", "{\"id\":\"no choices\"}",
                         "{\"choices\":[42]}", "\"[DONE]\""};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        lkq_stream s;
        lkq_stream_init(&s);
        cr_assert_eq(ev(&s, bad[i], 0), 1, "%s", bad[i]);
        cr_assert_eq(s.state, LKQ_STREAM_MALFORMED, "%s", bad[i]);
        cr_assert(s.reason[0]);
        char first[160];
        strcpy(first, s.reason);
        ev(&s, "{\"choices\":[]}", 0);
        cr_assert_str_eq(s.reason, first, "the first reason is kept");
        lkq_stream_free(&s);
    }
}

/* The whole path: bytes split anywhere -> SSE -> interpreter. */
typedef struct {
    lkq_stream st;
    double t;
} pipe_state;

static int to_stream(void *u, const char *e, const char *d, size_t l)
{
    pipe_state *p = u;
    (void)e;
    p->t += 1.0;
    lkq_stream_event(&p->st, d, l, p->t);
    return 0;
}

Test(stream, split_bytes_through_parser)
{
    const char *body =
        "data: {\"choices\":[{\"text\":\"Call\"}]}\n\n"
        "data: {\"choices\":[{\"text\":\" me\"}]}\r\n\r\n"
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\n"
        "data: [DONE]\n\n";
    size_t n = strlen(body);
    for (size_t cut = 0; cut <= n; cut++) {
        pipe_state ps = {0};
        lkq_stream_init(&ps.st);
        lkq_sse p;
        char err[64];
        lkq_sse_init(&p, 0);
        cr_assert_eq(lkq_sse_feed(&p, body, cut, to_stream, &ps, err, sizeof err), 0);
        cr_assert_eq(lkq_sse_feed(&p, body + cut, n - cut, to_stream, &ps, err, sizeof err), 0);
        cr_assert_eq(lkq_sse_finish(&p, err, sizeof err), 0);
        cr_assert_eq(ps.st.state, LKQ_STREAM_DONE, "cut %zu", cut);
        cr_assert_eq(ps.st.n_token_chunks, 2);
        cr_assert_eq(ps.st.completion_tokens, 2);
        lkq_sse_free(&p);
        lkq_stream_free(&ps.st);
    }
}
