/*
 * lkq_sse.c - incremental SSE parser and OpenAI stream interpreter (see
 * lkq_sse.h for the rules followed). Threading: none.
 */
#include "loadtests/lkq_sse.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LKQ_SSE_DEFAULT_MAX ((size_t)1 << 20)

void lkq_sse_init(lkq_sse *p, size_t max_event)
{
    memset(p, 0, sizeof *p);
    p->max_event = max_event ? max_event : LKQ_SSE_DEFAULT_MAX;
}

void lkq_sse_free(lkq_sse *p)
{
    if (!p)
        return;
    free(p->line);
    free(p->data);
    p->line = p->data = NULL;
    p->line_len = p->line_cap = p->data_len = p->data_cap = 0;
}

/* Grows *buf to hold need+1 bytes (room for a NUL). 0 or -1. */
static int grow(char **buf, size_t *cap, size_t need)
{
    if (need + 1 <= *cap)
        return 0;
    size_t nc = *cap ? *cap : 256;
    while (nc < need + 1)
        nc *= 2;
    char *nb = realloc(*buf, nc);
    if (!nb)
        return -1;
    *buf = nb;
    *cap = nc;
    return 0;
}

/* Resets the event being built (after dispatch or a blank line). */
static void event_reset(lkq_sse *p)
{
    p->data_len = 0;
    p->have_data = 0;
    p->event[0] = '\0';
}

/* Processes one complete line (without its terminator). A blank line
 * dispatches. Returns 0, the callback's value, or -1 with err. */
static int process_line(lkq_sse *p, lkq_sse_cb cb, void *user, char *err, size_t errlen)
{
    const char *l = p->line ? p->line : "";
    size_t n = p->line_len;
    if (n == 0) {
        if (!p->have_data) {
            event_reset(p);
            return 0;
        }
        if (grow(&p->data, &p->data_cap, p->data_len) != 0) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        p->data[p->data_len] = '\0';
        p->n_events++;
        int rc = cb ? cb(user, p->event, p->data, p->data_len) : 0;
        event_reset(p);
        return rc;
    }
    if (l[0] == ':')
        return 0; /* comment / keep-alive */
    const char *colon = memchr(l, ':', n);
    size_t flen = colon ? (size_t)(colon - l) : n;
    const char *val = colon ? colon + 1 : l + n;
    size_t vlen = (size_t)(l + n - val);
    if (vlen > 0 && val[0] == ' ') {
        val++;
        vlen--;
    }
    if (flen == 4 && memcmp(l, "data", 4) == 0) {
        size_t need = p->data_len + (p->have_data ? 1 : 0) + vlen;
        if (need > p->max_event) {
            snprintf(err, errlen, "SSE event over %zu bytes", p->max_event);
            return -1;
        }
        if (grow(&p->data, &p->data_cap, need) != 0) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        if (p->have_data)
            p->data[p->data_len++] = '\n';
        memcpy(p->data + p->data_len, val, vlen);
        p->data_len += vlen;
        p->have_data = 1;
    } else if (flen == 5 && memcmp(l, "event", 5) == 0) {
        size_t k = vlen < sizeof p->event - 1 ? vlen : sizeof p->event - 1;
        memcpy(p->event, val, k);
        p->event[k] = '\0';
    }
    /* id:, retry: and unknown fields are ignored, as the spec says. */
    return 0;
}

int lkq_sse_feed(lkq_sse *p, const char *bytes, size_t n, lkq_sse_cb cb, void *user,
                 char *err, size_t errlen)
{
    static const unsigned char bom[3] = {0xEF, 0xBB, 0xBF};
    size_t i = 0;
    /* A BOM may itself be split across reads; bytes matched so far are held
     * in bom_state and replayed if the match fails. */
    while (p->bom_state < 3 && i < n) {
        if ((unsigned char)bytes[i] == bom[p->bom_state]) {
            p->bom_state++;
            i++;
            continue;
        }
        int matched = p->bom_state;
        p->bom_state = 3;
        if (matched > 0) {
            /* not a BOM after all: the matched bytes are line content */
            if (grow(&p->line, &p->line_cap, p->line_len + (size_t)matched) != 0) {
                snprintf(err, errlen, "out of memory");
                return -1;
            }
            memcpy(p->line + p->line_len, bom, (size_t)matched);
            p->line_len += (size_t)matched;
        }
    }
    while (i < n) {
        char c = bytes[i];
        if (c == '\n' && p->after_cr) {
            /* second half of a CR LF whose CR ended the previous line */
            p->after_cr = 0;
            i++;
            continue;
        }
        p->after_cr = 0;
        if (c == '\r' || c == '\n') {
            p->after_cr = (c == '\r');
            i++;
            int rc = process_line(p, cb, user, err, errlen);
            p->line_len = 0;
            if (rc != 0)
                return rc;
            continue;
        }
        /* copy the run of ordinary bytes up to the next terminator */
        size_t j = i;
        while (j < n && bytes[j] != '\r' && bytes[j] != '\n')
            j++;
        size_t run = j - i;
        if (p->line_len + run > p->max_event) {
            snprintf(err, errlen, "SSE line over %zu bytes", p->max_event);
            return -1;
        }
        if (grow(&p->line, &p->line_cap, p->line_len + run) != 0) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        memcpy(p->line + p->line_len, bytes + i, run);
        p->line_len += run;
        i = j;
    }
    return 0;
}

int lkq_sse_finish(lkq_sse *p, char *err, size_t errlen)
{
    if (p->bom_state > 0 && p->bom_state < 3) {
        snprintf(err, errlen, "truncated event at end of stream");
        return -1;
    }
    if (p->line_len > 0 || p->have_data) {
        snprintf(err, errlen, "truncated event at end of stream");
        return -1;
    }
    return 0;
}

/* --- OpenAI stream interpreter ------------------------------------------- */

void lkq_stream_init(lkq_stream *s)
{
    memset(s, 0, sizeof *s);
    s->t_first = -1.0;
    s->prompt_tokens = -1;
    s->completion_tokens = -1;
}

void lkq_stream_free(lkq_stream *s)
{
    if (!s)
        return;
    free(s->gaps);
    s->gaps = NULL;
    s->n_gaps = s->gaps_cap = 0;
}

static int fail(lkq_stream *s, lkq_stream_state st, const char *why)
{
    s->state = st;
    snprintf(s->reason, sizeof s->reason, "%s", why);
    return 1;
}

/* Records a token-bearing chunk at time t. */
static int token_at(lkq_stream *s, double t)
{
    if (s->n_token_chunks == 0) {
        s->t_first = t;
    } else {
        if (s->n_gaps == s->gaps_cap) {
            size_t nc = s->gaps_cap ? s->gaps_cap * 2 : 64;
            double *ng = realloc(s->gaps, nc * sizeof *ng);
            if (!ng)
                return fail(s, LKQ_STREAM_MALFORMED, "out of memory");
            s->gaps = ng;
            s->gaps_cap = nc;
        }
        s->gaps[s->n_gaps++] = t - s->t_last;
    }
    s->t_last = t;
    s->n_token_chunks++;
    return 0;
}

int lkq_stream_event(lkq_stream *s, const char *data, size_t len, double t)
{
    int is_done = (len == 6 && memcmp(data, "[DONE]", 6) == 0);
    if (s->state == LKQ_STREAM_ERROR && is_done)
        return 1; /* an error event may be followed by the usual terminator */
    if (s->state == LKQ_STREAM_MALFORMED)
        return 1; /* keep the first reason */
    if (s->state != LKQ_STREAM_OPEN)
        return fail(s, LKQ_STREAM_MALFORMED, "data after the end of the stream");
    if (is_done) {
        s->state = LKQ_STREAM_DONE;
        return 1;
    }
    json_error_t je;
    json_t *root = json_loadb(data, len, 0, &je);
    if (!root || !json_is_object(root)) {
        char why[160];
        snprintf(why, sizeof why, "chunk is not a JSON object: %.100s", root ? "not an object" : je.text);
        json_decref(root);
        return fail(s, LKQ_STREAM_MALFORMED, why);
    }
    json_t *e = json_object_get(root, "error");
    if (e) {
        json_t *m = json_is_object(e) ? json_object_get(e, "message") : NULL;
        char why[160];
        snprintf(why, sizeof why, "error event: %.140s",
                 json_is_string(m) ? json_string_value(m) : "(no message)");
        json_decref(root);
        return fail(s, LKQ_STREAM_ERROR, why);
    }
    json_t *choices = json_object_get(root, "choices");
    json_t *usage = json_object_get(root, "usage");
    if (!json_is_array(choices) && !json_is_object(usage)) {
        json_decref(root);
        return fail(s, LKQ_STREAM_MALFORMED, "chunk has neither choices nor usage");
    }
    int has_text = 0;
    size_t i;
    json_t *ch;
    json_array_foreach(choices, i, ch) {
        if (!json_is_object(ch)) {
            json_decref(root);
            return fail(s, LKQ_STREAM_MALFORMED, "choice is not an object");
        }
        json_t *txt = json_object_get(ch, "text");
        json_t *delta = json_object_get(ch, "delta");
        if (json_is_object(delta))
            txt = json_object_get(delta, "content");
        if (json_is_string(txt) && json_string_length(txt) > 0)
            has_text = 1;
        json_t *fr = json_object_get(ch, "finish_reason");
        if (i == 0 && json_is_string(fr))
            snprintf(s->finish_reason, sizeof s->finish_reason, "%s", json_string_value(fr));
    }
    if (json_is_object(usage)) {
        json_t *pt = json_object_get(usage, "prompt_tokens");
        json_t *ct = json_object_get(usage, "completion_tokens");
        if (json_is_integer(pt))
            s->prompt_tokens = json_integer_value(pt);
        if (json_is_integer(ct))
            s->completion_tokens = json_integer_value(ct);
    }
    json_decref(root);
    if (has_text)
        return token_at(s, t);
    return 0;
}
