/*
 * chat.c - chat templates (see chat.h). Output is text in which special
 * tokens are spelled out ("<|im_start|>"); encode the markup with
 * parse_special and the content runs (chat_format_spans) as plain text.
 */
#include "engine/sample/chat.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

typedef struct {
    char *out;
    size_t cap, len;
    /* content runs: a write whose source lies inside a message's content */
    const chat_msg *msgs;
    int n_msgs, hint;
    uintptr_t lo, hi;         /* the contents lie in [lo, hi) */
    chat_span *spans;
    int max_spans, n_spans;
    size_t span_end;          /* end of the last content run */
} sbuf;

/* 1 if s points into a message's content (the templates write the
 * messages in order, so the search starts at the last hit; markup comes
 * from string literals and role names, outside [lo, hi) - the server
 * passes the canonical role literals - and is rejected at once). */
static int is_content(sbuf *b, const char *s)
{
    uintptr_t p = (uintptr_t)s;
    if (!b->msgs || p < b->lo || p >= b->hi)
        return 0;
    for (int k = 0; k < b->n_msgs; k++) {
        int i = (b->hint + k) % b->n_msgs;
        if (p == (uintptr_t)b->msgs[i].content) {
            b->hint = i;
            return 1;
        }
    }
    /* inside a message (a trimmed write): the current or the next one,
     * else any (rare: templates write the messages in order) */
    for (int k = 0; k < b->n_msgs; k++) {
        int i = (b->hint + k) % b->n_msgs;
        uintptr_t c = (uintptr_t)b->msgs[i].content;
        if (p >= c && p <= c + strlen(b->msgs[i].content)) {
            b->hint = i;
            return 1;
        }
    }
    return 0;
}

/* Appends n bytes of s (a template literal or a piece of a message). */
static void put_n(sbuf *b, const char *s, size_t n)
{
    /* (an empty write is looked up too: it keeps the search's hint in step) */
    if (is_content(b, s) && n > 0) {
        if (b->n_spans > 0 && b->span_end == b->len) { /* adjacent runs merge */
            if (b->n_spans <= b->max_spans)
                b->spans[b->n_spans - 1].len += n;
        } else if (b->n_spans++ < b->max_spans) {
            b->spans[b->n_spans - 1] = (chat_span){b->len, n};
        }
        b->span_end = b->len + n;
    }
    if (b->cap > 0 && b->len < b->cap - 1) {
        size_t room = b->cap - 1 - b->len;
        memcpy(b->out + b->len, s, n < room ? n : room);
    }
    b->len += n;
}

static void put(sbuf *b, const char *s) { put_n(b, s, strlen(s)); }

int chat_template_known(const char *name)
{
    return name && (!strcmp(name, "chatml") || !strcmp(name, "llama2") ||
                    !strcmp(name, "llama3") || !strcmp(name, "zephyr") ||
                    !strcmp(name, "gemma"));
}

static int role_ok(const char *r)
{
    return r && (!strcmp(r, "system") || !strcmp(r, "user") ||
                 !strcmp(r, "assistant"));
}

/* Llama-2: system folded into the first user turn. */
static void fmt_llama2(sbuf *b, const chat_msg *m, int n)
{
    const char *sys = NULL;
    int open = 0; /* inside an [INST] turn */
    for (int i = 0; i < n; i++) {
        if (!strcmp(m[i].role, "system")) {
            sys = m[i].content;
        } else if (!strcmp(m[i].role, "user")) {
            put(b, "<s>[INST] ");
            if (sys) {
                put(b, "<<SYS>>\n");
                put(b, sys);
                put(b, "\n<</SYS>>\n\n");
                sys = NULL;
            }
            put(b, m[i].content);
            put(b, " [/INST]");
            open = 1;
        } else {
            put(b, " ");
            put(b, m[i].content);
            put(b, " </s>");
            open = 0;
        }
    }
    (void)open;
}

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

/* s without leading and trailing whitespace (Jinja's trim). */
static void put_trimmed(sbuf *b, const char *s)
{
    size_t n = strlen(s);
    while (n > 0 && is_space(*s)) {
        s++;
        n--;
    }
    while (n > 0 && is_space(s[n - 1]))
        n--;
    put_n(b, s, n);
}

/* A Gemma user turn holding only a system message's text (one that no user
 * turn follows to carry it). */
static void gemma_system_turn(sbuf *b, const char *sys)
{
    put(b, "<start_of_turn>user\n");
    put(b, sys);
    put(b, "<end_of_turn>\n");
}

/* Gemma (see chat.h): no system role; system text goes in front of the next
 * user turn, assistant is "model". */
static void fmt_gemma(sbuf *b, const chat_msg *m, int n, int add_generation_prompt)
{
    const char *sys = NULL; /* waiting for the next user turn */
    put(b, "<bos>");
    for (int i = 0; i < n; i++) {
        int user = !strcmp(m[i].role, "user");
        if (sys && !user) {
            gemma_system_turn(b, sys);
            sys = NULL;
        }
        if (!strcmp(m[i].role, "system")) {
            sys = m[i].content;
            continue;
        }
        put(b, user ? "<start_of_turn>user\n" : "<start_of_turn>model\n");
        if (sys) {
            put(b, sys);
            put(b, "\n\n");
            sys = NULL;
        }
        put_trimmed(b, m[i].content);
        put(b, "<end_of_turn>\n");
    }
    if (sys)
        gemma_system_turn(b, sys);
    if (add_generation_prompt)
        put(b, "<start_of_turn>model\n");
}

long chat_format(const char *name, const chat_msg *msgs, int n,
                 int add_generation_prompt, char *out, size_t cap,
                 int *has_bos, char *err, size_t errlen)
{
    int n_spans;
    return chat_format_spans(name, msgs, n, add_generation_prompt, out, cap, has_bos, NULL, 0,
                             &n_spans, err, errlen);
}

long chat_format_spans(const char *name, const chat_msg *msgs, int n,
                       int add_generation_prompt, char *out, size_t cap,
                       int *has_bos, chat_span *spans, int max_spans, int *n_spans,
                       char *err, size_t errlen)
{
    *n_spans = 0;
    if (!name || !*name)
        name = "chatml";
    if (!chat_template_known(name)) {
        if (err && errlen)
            snprintf(err, errlen, "unknown chat template '%s'", name);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        if (!role_ok(msgs[i].role) || !msgs[i].content) {
            if (err && errlen)
                snprintf(err, errlen, "message %d: role must be system, user or assistant", i);
            return -1;
        }
    }
    sbuf b = {out, cap, 0, msgs, n, 0, UINTPTR_MAX, 0, spans, spans ? max_spans : 0, 0, 0};
    for (int i = 0; i < n; i++) {
        uintptr_t c = (uintptr_t)msgs[i].content;
        b.lo = c < b.lo ? c : b.lo;
        b.hi = c + strlen(msgs[i].content) + 1 > b.hi ? c + strlen(msgs[i].content) + 1 : b.hi;
    }
    *has_bos = 0;
    if (!strcmp(name, "chatml")) {
        for (int i = 0; i < n; i++) {
            put(&b, "<|im_start|>");
            put(&b, msgs[i].role);
            put(&b, "\n");
            put(&b, msgs[i].content);
            put(&b, "<|im_end|>\n");
        }
        if (add_generation_prompt)
            put(&b, "<|im_start|>assistant\n");
    } else if (!strcmp(name, "llama3")) {
        put(&b, "<|begin_of_text|>");
        *has_bos = 1;
        for (int i = 0; i < n; i++) {
            put(&b, "<|start_header_id|>");
            put(&b, msgs[i].role);
            put(&b, "<|end_header_id|>\n\n");
            put(&b, msgs[i].content);
            put(&b, "<|eot_id|>");
        }
        if (add_generation_prompt)
            put(&b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
    } else if (!strcmp(name, "zephyr")) {
        for (int i = 0; i < n; i++) {
            put(&b, "<|");
            put(&b, msgs[i].role);
            put(&b, "|>\n");
            put(&b, msgs[i].content);
            put(&b, "</s>\n");
        }
        if (add_generation_prompt)
            put(&b, "<|assistant|>\n");
    } else if (!strcmp(name, "gemma")) {
        fmt_gemma(&b, msgs, n, add_generation_prompt);
        *has_bos = 1;
    } else { /* llama2 */
        fmt_llama2(&b, msgs, n);
        *has_bos = 1;
    }
    if (cap > 0)
        out[b.len < cap ? b.len : cap - 1] = '\0';
    *n_spans = b.n_spans;
    return (long)b.len;
}
