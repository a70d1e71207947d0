/*
 * api.c - OpenAI request parsing/validation and response formatting (see
 * api.h). Every failure names the field and the rule it broke.
 */
#include "server/api.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/sample/chat.h"
#include "engine/util/strbuf.h"
#include "tokenizer/tok.h"

void api_set_error(api_error *e, int status, const char *type, const char *code,
                   const char *param, const char *fmt, ...)
{
    e->status = status;
    snprintf(e->type, sizeof e->type, "%s", type ? type : "invalid_request_error");
    snprintf(e->code, sizeof e->code, "%s", code ? code : "");
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
}

char *api_error_json(const api_error *e)
{
    json_t *o = json_pack("{s:{s:s, s:s, s:o, s:o}}", "error", "message", e->message,
                          "type", e->type,
                          "param", e->param[0] ? json_string(e->param) : json_null(),
                          "code", e->code[0] ? json_string(e->code) : json_null());
    char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    return s;
}

void api_request_free(api_request *r)
{
    for (int i = 0; i < API_MAX_PROMPTS; i++) {
        free(r->ids[i]);
        free(r->text[i]);
        r->ids[i] = NULL;
        r->text[i] = NULL;
    }
    for (int i = 0; i < r->n_stop; i++)
        free(r->stop[i]);
    r->n_stop = 0;
    free(r->bias);
    r->bias = NULL;
    r->n_bias = 0;
    r->sp.logit_bias = NULL;
    r->sp.n_logit_bias = 0;
}

/* ---- field readers: 0 absent/null (default kept), 1 read, -1 error -------- */

static int get_bool(json_t *o, const char *k, int *out, api_error *e)
{
    json_t *v = json_object_get(o, k);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_boolean(v)) {
        api_set_error(e, 400, NULL, NULL, k, "'%s' must be a boolean", k);
        return -1;
    }
    *out = json_is_true(v);
    return 1;
}

static int get_int(json_t *o, const char *k, long long lo, long long hi, long long *out,
                   api_error *e)
{
    json_t *v = json_object_get(o, k);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_integer(v)) {
        api_set_error(e, 400, NULL, NULL, k, "'%s' must be an integer", k);
        return -1;
    }
    long long x = json_integer_value(v);
    if (x < lo || x > hi) {
        api_set_error(e, 400, NULL, NULL, k, "'%s' is %lld; it must be between %lld and %lld",
                      k, x, lo, hi);
        return -1;
    }
    *out = x;
    return 1;
}

static int get_num(json_t *o, const char *k, double lo, double hi, int lo_open, float *out,
                   api_error *e)
{
    json_t *v = json_object_get(o, k);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_number(v)) {
        api_set_error(e, 400, NULL, NULL, k, "'%s' must be a number", k);
        return -1;
    }
    double x = json_number_value(v);
    if (!isfinite(x) || x < lo || x > hi || (lo_open && x == lo)) {
        api_set_error(e, 400, NULL, NULL, k, "'%s' is %g; it must be in %s%g, %g]", k, x,
                      lo_open ? "(" : "[", lo, hi);
        return -1;
    }
    *out = (float)x;
    return 1;
}

/* Tokenizes text into prompt slot i. */
static int add_text_prompt(api_request *r, int i, const char *text, size_t len,
                           int add_bos, int special, const api_ctx *c, api_error *e)
{
    int n = 0;
    (void)tok_encode(c->m->tok, text, len, add_bos, special, NULL, 0, &n);
    r->ids[i] = malloc(((size_t)n + 1) * sizeof(int32_t));
    r->text[i] = malloc(len + 1);
    if (!r->ids[i] || !r->text[i]) {
        api_set_error(e, 500, "server_error", NULL, NULL, "out of memory");
        return -1;
    }
    int n2 = 0;
    if (tok_encode(c->m->tok, text, len, add_bos, special, r->ids[i], n + 1, &n2) < 0) {
        api_set_error(e, 400, NULL, NULL, "prompt", "the prompt cannot be tokenized");
        return -1;
    }
    memcpy(r->text[i], text, len);
    r->text[i][len] = '\0';
    r->text_len[i] = len;
    r->n_ids[i] = n2;
    return 0;
}

static int add_token_prompt(api_request *r, int i, json_t *arr, const api_ctx *c,
                            api_error *e)
{
    size_t n = json_array_size(arr);
    if (n == 0) {
        api_set_error(e, 400, NULL, NULL, "prompt", "a token prompt is empty");
        return -1;
    }
    if (n > (size_t)INT_MAX / 8) {
        api_set_error(e, 400, NULL, "context_length_exceeded", "prompt", "the prompt is too long");
        return -1;
    }
    r->ids[i] = malloc(n * sizeof(int32_t));
    if (!r->ids[i]) {
        api_set_error(e, 500, "server_error", NULL, NULL, "out of memory");
        return -1;
    }
    for (size_t k = 0; k < n; k++) {
        json_t *v = json_array_get(arr, k);
        if (!json_is_integer(v) || json_integer_value(v) < 0 ||
            json_integer_value(v) >= c->m->hp.n_vocab) {
            api_set_error(e, 400, NULL, NULL, "prompt",
                          "prompt token %zu is not a token id in [0, %d)", k, c->m->hp.n_vocab);
            return -1;
        }
        r->ids[i][k] = (int32_t)json_integer_value(v);
    }
    r->n_ids[i] = (int)n;
    /* the text, for echo */
    size_t cap = n * 16 + 16;
    r->text[i] = malloc(cap);
    if (!r->text[i]) {
        api_set_error(e, 500, "server_error", NULL, NULL, "out of memory");
        return -1;
    }
    size_t need = tok_decode(c->m->tok, r->ids[i], (int)n, 0, r->text[i], cap);
    if (need >= cap) {
        char *t = realloc(r->text[i], need + 1);
        if (!t) {
            api_set_error(e, 500, "server_error", NULL, NULL, "out of memory");
            return -1;
        }
        r->text[i] = t;
        tok_decode(c->m->tok, r->ids[i], (int)n, 0, r->text[i], need + 1);
    }
    r->text_len[i] = need;
    return 0;
}

static int parse_prompt(json_t *root, api_request *r, const api_ctx *c, api_error *e)
{
    json_t *p = json_object_get(root, "prompt");
    int add_bos = tok_default_add_bos(c->m->tok);
    if (!p || json_is_null(p)) {
        api_set_error(e, 400, NULL, NULL, "prompt", "'prompt' is required");
        return -1;
    }
    if (json_is_string(p)) {
        r->n_prompts = 1;
        return add_text_prompt(r, 0, json_string_value(p), json_string_length(p), add_bos,
                               0, c, e);
    }
    if (!json_is_array(p) || json_array_size(p) == 0) {
        api_set_error(e, 400, NULL, NULL, "prompt",
                      "'prompt' must be a string, an array of token ids, or a non-empty "
                      "array of those");
        return -1;
    }
    json_t *first = json_array_get(p, 0);
    if (json_is_integer(first)) {
        r->n_prompts = 1;
        return add_token_prompt(r, 0, p, c, e);
    }
    size_t n = json_array_size(p);
    if (n > API_MAX_PROMPTS) {
        api_set_error(e, 400, NULL, NULL, "prompt", "at most %d prompts per request",
                      API_MAX_PROMPTS);
        return -1;
    }
    r->n_prompts = (int)n;
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(p, i);
        int rc;
        if (json_is_string(v))
            rc = add_text_prompt(r, (int)i, json_string_value(v), json_string_length(v),
                                 add_bos, 0, c, e);
        else if (json_is_array(v))
            rc = add_token_prompt(r, (int)i, v, c, e);
        else {
            api_set_error(e, 400, NULL, NULL, "prompt",
                          "prompt %zu must be a string or an array of token ids", i);
            rc = -1;
        }
        if (rc < 0)
            return -1;
    }
    return 0;
}

/* Token ids of text[0..len) (caller frees), or NULL with e set. */
static int32_t *encode(const api_ctx *c, const char *text, size_t len, int special, int *n,
                       api_error *e)
{
    *n = 0;
    (void)tok_encode(c->m->tok, text, len, 0, special, NULL, 0, n);
    int32_t *ids = malloc(((size_t)*n + 1) * sizeof *ids);
    if (!ids) {
        api_set_error(e, 500, "server_error", NULL, NULL, "out of memory");
        return NULL;
    }
    int n2 = 0;
    if (tok_encode(c->m->tok, text, len, 0, special, ids, *n + 1, &n2) < 0) {
        free(ids);
        api_set_error(e, 400, NULL, NULL, "messages", "a message cannot be tokenized");
        return NULL;
    }
    *n = n2;
    return ids;
}

/* 1 if text spells a control token (it tokenizes differently with special
 * tokens parsed), 0 if not, -1 with e set. */
static int spells_special(const api_ctx *c, const char *text, size_t len, api_error *e)
{
    int na, nb;
    int32_t *a = encode(c, text, len, 1, &na, e);
    int32_t *b = a ? encode(c, text, len, 0, &nb, e) : NULL;
    int rc = !a || !b ? -1 : na != nb || memcmp(a, b, (size_t)na * sizeof *a) != 0;
    free(a);
    free(b);
    return rc;
}

/* The chat prompt: template markup comes from the template only, message
 * content is plain text. When no message spells a control token (the
 * usual case) the formatted text is tokenized in one piece with special
 * tokens parsed, exactly as the template expects; otherwise piece by
 * piece, the content without special-token parsing, so "<|im_end|>" in a
 * user message stays text and nobody can forge a turn. */
static int add_chat_prompt(api_request *r, const char *text, size_t len, const chat_span *spans,
                           int n_spans, int add_bos, const api_ctx *c, api_error *e)
{
    int unsafe = 0;
    for (int i = 0; i < n_spans && !unsafe; i++) {
        unsafe = spells_special(c, text + spans[i].off, spans[i].len, e);
        if (unsafe < 0)
            return -1;
    }
    if (!unsafe)
        return add_text_prompt(r, 0, text, len, add_bos, 1, c, e);
    int32_t bos = tok_bos(c->m->tok);
    size_t cap = 16, n = 0;
    int32_t *ids = malloc(cap * sizeof *ids);
    if (!ids)
        goto oom;
    if (add_bos && bos >= 0)
        ids[n++] = bos;
    size_t pos = 0;
    for (int i = 0; i <= n_spans; i++) {
        size_t off = i < n_spans ? spans[i].off : len;
        for (int part = 0; part < 2; part++) { /* markup [pos, off), then content */
            size_t a = part == 0 ? pos : off;
            size_t b = part == 0 ? off : i < n_spans ? off + spans[i].len : len;
            if (b <= a)
                continue;
            int k;
            int32_t *piece = encode(c, text + a, b - a, part == 0, &k, e);
            if (!piece) {
                free(ids);
                return -1;
            }
            if (n + (size_t)k > cap) {
                while (cap < n + (size_t)k)
                    cap *= 2;
                int32_t *t = realloc(ids, cap * sizeof *ids);
                if (!t) {
                    free(piece);
                    goto oom;
                }
                ids = t;
            }
            memcpy(ids + n, piece, (size_t)k * sizeof *ids);
            n += (size_t)k;
            free(piece);
        }
        if (i < n_spans)
            pos = off + spans[i].len;
    }
    if (n > (size_t)INT_MAX) {
        free(ids);
        api_set_error(e, 400, NULL, "context_length_exceeded", "messages", "the prompt is too long");
        return -1;
    }
    r->ids[0] = ids;
    r->n_ids[0] = (int)n;
    r->text[0] = malloc(len + 1);
    if (!r->text[0])
        goto oom;
    memcpy(r->text[0], text, len);
    r->text[0][len] = '\0';
    r->text_len[0] = len;
    return 0;
oom:
    free(ids);
    r->ids[0] = NULL;
    api_set_error(e, 500, "server_error", NULL, NULL, "out of memory");
    return -1;
}

/* Text of a message's content: a string or an array of {"type":"text"}
 * parts (concatenated). Returns a new string or NULL with e set. */
static char *message_text(json_t *content, size_t idx, api_error *e)
{
    if (json_is_string(content))
        return strdup(json_string_value(content));
    if (!json_is_array(content)) {
        api_set_error(e, 400, NULL, NULL, "messages",
                      "messages[%zu].content must be a string or an array of text parts", idx);
        return NULL;
    }
    size_t total = 1;
    for (size_t k = 0; k < json_array_size(content); k++) {
        json_t *part = json_array_get(content, k);
        json_t *type = json_object_get(part, "type");
        json_t *text = json_object_get(part, "text");
        if (!json_is_string(type) || strcmp(json_string_value(type), "text") != 0 ||
            !json_is_string(text)) {
            api_set_error(e, 400, NULL, NULL, "messages",
                          "messages[%zu].content[%zu]: only {\"type\": \"text\", \"text\": "
                          "...} parts are supported", idx, k);
            return NULL;
        }
        total += json_string_length(text);
    }
    char *s = malloc(total);
    if (!s) {
        api_set_error(e, 500, "server_error", NULL, NULL, "out of memory");
        return NULL;
    }
    s[0] = '\0';
    size_t at = 0;
    for (size_t k = 0; k < json_array_size(content); k++) {
        json_t *text = json_object_get(json_array_get(content, k), "text");
        memcpy(s + at, json_string_value(text), json_string_length(text));
        at += json_string_length(text);
    }
    s[at] = '\0';
    return s;
}

static int parse_messages(json_t *root, api_request *r, const api_ctx *c, api_error *e)
{
    json_t *msgs = json_object_get(root, "messages");
    if (!json_is_array(msgs) || json_array_size(msgs) == 0) {
        api_set_error(e, 400, NULL, NULL, "messages",
                      "'messages' must be a non-empty array of {role, content}");
        return -1;
    }
    size_t n = json_array_size(msgs);
    if (n > 4096) {
        api_set_error(e, 400, NULL, NULL, "messages", "too many messages (%zu)", n);
        return -1;
    }
    chat_msg *cm = calloc(n + 1, sizeof *cm);
    char **owned = calloc(n, sizeof *owned);
    int rc = -1;
    char *buf = NULL;
    chat_span *spans = NULL;
    if (!cm || !owned) {
        api_set_error(e, 500, "server_error", NULL, NULL, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *m = json_array_get(msgs, i);
        json_t *role = json_object_get(m, "role");
        if (!json_is_object(m) || !json_is_string(role)) {
            api_set_error(e, 400, NULL, NULL, "messages",
                          "messages[%zu] must be an object with a string 'role'", i);
            goto done;
        }
        /* the canonical literals: chat_format_spans tells content from
         * markup by address, and a literal is never inside a message */
        const char *rs = json_string_value(role);
        if (strcmp(rs, "developer") == 0 || strcmp(rs, "system") == 0)
            rs = "system";
        else if (strcmp(rs, "user") == 0)
            rs = "user";
        else if (strcmp(rs, "assistant") == 0)
            rs = "assistant";
        else {
            api_set_error(e, 400, NULL, NULL, "messages",
                          "messages[%zu].role '%s' is not one of system, user, assistant",
                          i, json_string_value(role));
            goto done;
        }
        owned[i] = message_text(json_object_get(m, "content"), i, e);
        if (!owned[i])
            goto done;
        cm[i] = (chat_msg){rs, owned[i]};
    }
    /* the model's default system message, as its template would insert it */
    chat_msg *all = cm;
    int nm = (int)n;
    if (c->m->default_system[0] && strcmp(cm[0].role, "system") != 0) {
        memmove(cm + 1, cm, n * sizeof *cm);
        cm[0] = (chat_msg){"system", c->m->default_system};
        nm++;
    }
    char err[256];
    int has_bos = 0, n_spans = 0;
    long need = chat_format_spans(c->m->chat_template, all, nm, 1, NULL, 0, &has_bos, NULL, 0,
                                  &n_spans, err, sizeof err);
    if (need < 0) {
        api_set_error(e, 400, NULL, NULL, "messages", "%s", err);
        goto done;
    }
    buf = malloc((size_t)need + 1);
    spans = malloc(((size_t)n_spans + 1) * sizeof *spans);
    if (!buf || !spans) {
        api_set_error(e, 500, "server_error", NULL, NULL, "out of memory");
        goto done;
    }
    chat_format_spans(c->m->chat_template, all, nm, 1, buf, (size_t)need + 1, &has_bos, spans,
                      n_spans, &n_spans, err, sizeof err);
    r->n_prompts = 1;
    rc = add_chat_prompt(r, buf, (size_t)need, spans, n_spans,
                         has_bos ? 0 : tok_default_add_bos(c->m->tok), c, e);
done:
    if (owned)
        for (size_t i = 0; i < n; i++)
            free(owned[i]);
    free(owned);
    free(cm);
    free(buf);
    free(spans);
    return rc;
}

static int parse_stop(json_t *root, api_request *r, api_error *e)
{
    json_t *s = json_object_get(root, "stop");
    if (!s || json_is_null(s))
        return 0;
    if (json_is_string(s)) {
        if (json_string_length(s) > API_MAX_STOP_BYTES) {
            api_set_error(e, 400, NULL, NULL, "stop",
                          "'stop' is %zu bytes; a stop sequence may have at most %d",
                          json_string_length(s), API_MAX_STOP_BYTES);
            return -1;
        }
        if (json_string_length(s) > 0) {
            r->stop[0] = strdup(json_string_value(s));
            r->n_stop = r->stop[0] ? 1 : 0;
        }
        return 0;
    }
    if (!json_is_array(s) || json_array_size(s) > SCHED_MAX_STOP) {
        api_set_error(e, 400, NULL, NULL, "stop",
                      "'stop' must be a string or an array of at most %d strings",
                      SCHED_MAX_STOP);
        return -1;
    }
    for (size_t i = 0; i < json_array_size(s); i++) {
        json_t *v = json_array_get(s, i);
        if (!json_is_string(v) || json_string_length(v) > API_MAX_STOP_BYTES) {
            api_set_error(e, 400, NULL, NULL, "stop",
                          "stop[%zu] must be a string of at most %d bytes", i,
                          API_MAX_STOP_BYTES);
            return -1;
        }
        if (json_string_length(v) == 0)
            continue;
        r->stop[r->n_stop] = strdup(json_string_value(v));
        if (r->stop[r->n_stop])
            r->n_stop++;
    }
    return 0;
}

/* OpenAI logit_bias: {"token id": bias in [-100, 100], ...}. */
static int parse_logit_bias(json_t *root, api_request *r, const api_ctx *c, api_error *e)
{
    json_t *lb = json_object_get(root, "logit_bias");
    if (!lb || json_is_null(lb))
        return 0;
    if (!json_is_object(lb)) {
        api_set_error(e, 400, NULL, NULL, "logit_bias",
                      "'logit_bias' must be an object mapping token ids to numbers from -100 "
                      "to 100");
        return -1;
    }
    size_t n = json_object_size(lb);
    if (n > API_MAX_LOGIT_BIAS) {
        api_set_error(e, 400, NULL, NULL, "logit_bias",
                      "'logit_bias' has %zu entries; at most %d are allowed", n,
                      API_MAX_LOGIT_BIAS);
        return -1;
    }
    if (n == 0)
        return 0;
    r->bias = malloc(n * sizeof *r->bias);
    if (!r->bias) {
        api_set_error(e, 500, "server_error", NULL, NULL, "out of memory");
        return -1;
    }
    const char *key;
    json_t *v;
    json_object_foreach(lb, key, v) {
        char *end = NULL;
        long id = strtol(key, &end, 10);
        if (!key[0] || key[0] == '-' || key[0] == '+' || key[0] == ' ' || *end ||
            id < 0 || id >= c->m->hp.n_vocab) {
            api_set_error(e, 400, NULL, NULL, "logit_bias",
                          "logit_bias key '%.40s' is not a token id in [0, %d)", key,
                          c->m->hp.n_vocab);
            return -1;
        }
        double b = json_is_number(v) ? json_number_value(v) : NAN;
        if (!(b >= SMP_BIAS_MIN && b <= SMP_BIAS_MAX)) {
            api_set_error(e, 400, NULL, NULL, "logit_bias",
                          "logit_bias['%.40s'] must be a number from -100 to 100", key);
            return -1;
        }
        r->bias[r->n_bias++] = (smp_bias){(int32_t)id, (float)b};
    }
    return 0;
}

/* "kv_cache": a KV mode name (cfg_kv_mode_parse: fp16, int2, int3, int4,
 * int8, kNvM) the server's pool holds; absent or null: the server's
 * --kv-cache. Errors name the field and list the modes this server serves. */
static int parse_kv_cache(json_t *root, const api_ctx *c, api_request *r, api_error *e)
{
    json_t *v = json_object_get(root, "kv_cache");
    if (!v || json_is_null(v))
        return 0;
    char on[160];
    if (c->kv_modes)
        cfg_kv_modes_str(c->kv_modes, on, sizeof on);
    else
        cfg_kv_mode_list(on, sizeof on);
    if (!json_is_string(v)) {
        api_set_error(e, 400, NULL, NULL, "kv_cache",
                      "'kv_cache' must be a string, one of the modes this server serves: %s",
                      on);
        return -1;
    }
    int m;
    if (cfg_kv_mode_parse(json_string_value(v), &m) < 0) {
        api_set_error(e, 400, NULL, NULL, "kv_cache",
                      "unknown 'kv_cache' value '%.40s' (KV modes are fp16, int2, int3, int4, "
                      "int8 and kNvM such as k4v2; this server serves: %s)",
                      json_string_value(v), on);
        return -1;
    }
    if (c->kv_modes && !((c->kv_modes >> m) & 1u)) {
        api_set_error(e, 400, NULL, NULL, "kv_cache",
                      "'kv_cache' %s is not enabled on this server (it serves: %s; start it "
                      "with --kv-modes to add others)", cfg_kv_mode_str(m), on);
        return -1;
    }
    r->kv_mode = SCHED_KV_MODE(m);
    return 0;
}

int api_parse(api_kind kind, const char *body, size_t len, const api_ctx *c,
              api_request *r, api_error *e)
{
    memset(r, 0, sizeof *r);
    r->kind = kind;
    json_error_t je;
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &je);
    if (!root) {
        api_set_error(e, 400, NULL, NULL, NULL, "could not parse the JSON body: %s (line %d, "
                      "column %d)", je.text, je.line, je.column);
        return -1;
    }
    int rc = -1;
    long long v;
    if (!json_is_object(root)) {
        api_set_error(e, 400, NULL, NULL, NULL, "the body must be a JSON object");
        goto done;
    }
    json_t *model = json_object_get(root, "model");
    if (model && !json_is_null(model)) {
        if (!json_is_string(model)) {
            api_set_error(e, 400, NULL, NULL, "model", "'model' must be a string");
            goto done;
        }
        const char *ms = json_string_value(model);
        if (strcmp(ms, c->model_id) != 0 && strcmp(ms, c->m->name) != 0) {
            api_set_error(e, 404, NULL, "model_not_found", "model",
                          "The model '%s' does not exist; this server serves '%s'", ms,
                          c->model_id);
            goto done;
        }
    }
    r->sp = smp_default_params();
    r->sp.temperature = 1.0f;
    r->sp.top_p = 1.0f;
    r->sp.seed = 0;
    r->n = 1;
    r->logprobs = -1;
    r->cache_prompt = 1;
    if (get_bool(root, "stream", &r->stream, e) < 0 || get_bool(root, "echo", &r->echo, e) < 0 ||
        get_bool(root, "ignore_eos", &r->ignore_eos, e) < 0 ||
        get_bool(root, "cache_prompt", &r->cache_prompt, e) < 0)
        goto done;
    json_t *so = json_object_get(root, "stream_options");
    if (so && !json_is_null(so)) {
        if (!json_is_object(so) || get_bool(so, "include_usage", &r->include_usage, e) < 0) {
            if (!json_is_object(so))
                api_set_error(e, 400, NULL, NULL, "stream_options",
                              "'stream_options' must be an object");
            goto done;
        }
    }
    if (get_num(root, "temperature", 0, 2, 0, &r->sp.temperature, e) < 0 ||
        get_num(root, "top_p", 0, 1, 1, &r->sp.top_p, e) < 0 ||
        get_num(root, "min_p", 0, 1, 0, &r->sp.min_p, e) < 0 ||
        get_num(root, "presence_penalty", -2, 2, 0, &r->sp.presence_penalty, e) < 0 ||
        get_num(root, "frequency_penalty", -2, 2, 0, &r->sp.frequency_penalty, e) < 0 ||
        get_num(root, "repetition_penalty", 0, 10, 1, &r->sp.repeat_penalty, e) < 0)
        goto done;
    if (get_int(root, "top_k", -1, INT_MAX, &v, e) < 0)
        goto done;
    if (json_object_get(root, "top_k") && json_is_integer(json_object_get(root, "top_k")))
        r->sp.top_k = v < 0 ? 0 : (int32_t)v;
    int rs = get_int(root, "seed", LLONG_MIN, LLONG_MAX, &v, e);
    if (rs < 0)
        goto done;
    if (rs == 1)
        r->sp.seed = (uint64_t)v;
    else
        r->sp.seed = ((uint64_t)rand() << 32) ^ (uint64_t)rand();
    if (get_int(root, "n", 1, c->max_n, &v, e) < 0)
        goto done;
    if (json_is_integer(json_object_get(root, "n")))
        r->n = (int)v;
    if (json_object_get(root, "best_of") && !json_is_null(json_object_get(root, "best_of"))) {
        long long bo = 0;
        if (get_int(root, "best_of", 1, c->max_n, &bo, e) < 0)
            goto done;
        if (bo != r->n) {
            api_set_error(e, 400, NULL, NULL, "best_of", "best_of other than n is not supported");
            goto done;
        }
    }
    if (kind == API_COMPLETIONS) {
        if (get_int(root, "logprobs", 0, SCHED_MAX_LOGPROBS, &v, e) < 0)
            goto done;
        if (json_is_integer(json_object_get(root, "logprobs")))
            r->logprobs = (int)v;
    } else {
        int lp = 0;
        if (get_bool(root, "logprobs", &lp, e) < 0)
            goto done;
        long long tl = 0;
        int has_tl = get_int(root, "top_logprobs", 0, SCHED_MAX_LOGPROBS, &tl, e);
        if (has_tl < 0)
            goto done;
        if (has_tl == 1 && !lp) {
            api_set_error(e, 400, NULL, NULL, "top_logprobs",
                          "'top_logprobs' needs 'logprobs': true");
            goto done;
        }
        if (lp)
            r->logprobs = (int)tl;
        if (r->echo) {
            api_set_error(e, 400, NULL, NULL, "echo", "'echo' is for /v1/completions");
            goto done;
        }
    }
    if (parse_stop(root, r, e) < 0 || parse_logit_bias(root, r, c, e) < 0 ||
        parse_kv_cache(root, c, r, e) < 0)
        goto done;
    r->sp.logit_bias = r->bias;
    r->sp.n_logit_bias = r->n_bias;
    if ((kind == API_COMPLETIONS ? parse_prompt(root, r, c, e) : parse_messages(root, r, c, e)) < 0)
        goto done;
    int max_prompt = c->max_prompt_tokens > 0 ? c->max_prompt_tokens : c->n_ctx - 1;
    int longest = 0;
    for (int i = 0; i < r->n_prompts; i++) {
        if (r->n_ids[i] == 0) {
            api_set_error(e, 400, NULL, NULL, "prompt",
                          "the prompt is empty and the model has no BOS token to start from");
            goto done;
        }
        if (r->n_ids[i] > max_prompt) {
            api_set_error(e, 400, NULL, "context_length_exceeded",
                          kind == API_CHAT ? "messages" : "prompt",
                          "This model's maximum context length is %d tokens. However, your "
                          "prompt is %d tokens (the limit for a prompt is %d).", c->n_ctx,
                          r->n_ids[i], max_prompt);
            goto done;
        }
        longest = r->n_ids[i] > longest ? r->n_ids[i] : longest;
    }
    const char *mt_key = json_object_get(root, "max_completion_tokens") ? "max_completion_tokens"
                                                                        : "max_tokens";
    int has_mt = get_int(root, mt_key, 1, INT_MAX, &v, e);
    if (has_mt < 0)
        goto done;
    if (has_mt == 1) {
        r->max_tokens = (int)v;
        if ((long long)longest + v > c->n_ctx) {
            api_set_error(e, 400, NULL, "context_length_exceeded", mt_key,
                          "This model's maximum context length is %d tokens. However, you "
                          "requested %lld tokens (%d in the prompt, %lld in the completion). "
                          "Please reduce the prompt or %s.", c->n_ctx, longest + v, longest,
                          v, mt_key);
            goto done;
        }
    } else {
        /* the default: 16, or for chat the rest of what one sequence may
         * hold (the context, or less when the KV pool holds less) */
        int seq = r->kv_mode > 0 && c->max_seq_kv[r->kv_mode - 1] > 0
                      ? c->max_seq_kv[r->kv_mode - 1]
                      : c->max_seq_tokens;
        int room = seq > 0 && seq < c->n_ctx ? seq : c->n_ctx;
        r->max_tokens = kind == API_COMPLETIONS ? 16 : room - longest;
        if (r->max_tokens > room - longest)
            r->max_tokens = room - longest;
        if (r->max_tokens < 1)
            r->max_tokens = 1; /* the scheduler says why it cannot run */
    }
    rc = 0;
done:
    json_decref(root);
    if (rc < 0)
        api_request_free(r);
    return rc;
}

/* ---- output ------------------------------------------------------------------ */

/* Length of the valid UTF-8 sequence at p (1..4), or 0 if invalid. */
static int utf8_len(const unsigned char *p, size_t n)
{
    unsigned c = p[0];
    int k;
    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf)
        k = 2;
    else if (c >= 0xe0 && c <= 0xef)
        k = 3;
    else if (c >= 0xf0 && c <= 0xf4)
        k = 4;
    else
        return 0;
    if ((size_t)k > n)
        return 0;
    for (int j = 1; j < k; j++)
        if ((p[j] & 0xc0) != 0x80)
            return 0;
    return k;
}

static int utf8_valid(const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        int k = utf8_len(p + i, n - i);
        if (k == 0)
            return 0;
        i += (size_t)k;
    }
    return 1;
}

/* A JSON string of n bytes; invalid UTF-8 bytes become U+FFFD. */
static json_t *jstr(const char *s, size_t n)
{
    if (utf8_valid(s, n))
    {
        json_t *j = json_stringn(s, n);
        return j ? j : json_string("");
    }
    char *t = malloc(n * 3 + 1);
    if (!t)
        return json_string("");
    size_t at = 0;
    const unsigned char *p = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        int k = utf8_len(p + i, n - i);
        if (k == 0) {
            memcpy(t + at, "\xef\xbf\xbd", 3);
            at += 3;
            i++;
        } else {
            memcpy(t + at, p + i, (size_t)k);
            at += (size_t)k;
            i += (size_t)k;
        }
    }
    json_t *j = json_stringn(t, at);
    free(t);
    return j;
}

/* A token as text: its piece, or "bytes:\xNN..." when not valid UTF-8. */
static json_t *token_str(const mdl_model *m, int32_t id, json_t **bytes)
{
    char buf[256];
    int n = tok_piece(m->tok, id, 1, buf, sizeof buf);
    if (n < 0)
        n = 0;
    if (n > (int)sizeof buf)
        n = (int)sizeof buf;
    if (bytes) {
        *bytes = json_array();
        for (int i = 0; i < n; i++)
            json_array_append_new(*bytes, json_integer((unsigned char)buf[i]));
    }
    if (utf8_valid(buf, (size_t)n))
        return jstr(buf, (size_t)n);
    char hex[1100] = "bytes:";
    size_t at = strlen(hex);
    for (int i = 0; i < n && at + 5 < sizeof hex; i++)
        at += (size_t)snprintf(hex + at, sizeof hex - at, "\\x%02x", (unsigned char)buf[i]);
    return json_string(hex);
}

static json_t *logprobs_completions(const api_piece *p, int top, const mdl_model *m)
{
    json_t *o = json_object();
    json_t *toks = json_array(), *lps = json_array(), *tops = json_array(), *offs = json_array();
    int64_t off = p->prev_end + p->text_shift;
    for (int i = 0; i < p->n_toks; i++) {
        const sched_tok *t = &p->toks[i];
        json_array_append_new(toks, token_str(m, t->token, NULL));
        json_array_append_new(lps, json_real(t->logprob));
        json_array_append_new(offs, json_integer(off));
        off = t->text_end + p->text_shift;
        json_t *d = json_object();
        for (int k = 0; k < t->n_top && k < top; k++) {
            json_t *key = token_str(m, t->top_id[k], NULL);
            json_object_set_new(d, json_string_value(key), json_real(t->top_lp[k]));
            json_decref(key);
        }
        json_array_append_new(tops, d);
    }
    json_object_set_new(o, "tokens", toks);
    json_object_set_new(o, "token_logprobs", lps);
    json_object_set_new(o, "top_logprobs", tops);
    json_object_set_new(o, "text_offset", offs);
    return o;
}

static json_t *logprobs_chat(const api_piece *p, int top, const mdl_model *m)
{
    json_t *content = json_array();
    for (int i = 0; i < p->n_toks; i++) {
        const sched_tok *t = &p->toks[i];
        json_t *bytes;
        json_t *e = json_object();
        json_object_set_new(e, "token", token_str(m, t->token, &bytes));
        json_object_set_new(e, "logprob", json_real(t->logprob));
        json_object_set_new(e, "bytes", bytes);
        json_t *tl = json_array();
        for (int k = 0; k < t->n_top && k < top; k++) {
            json_t *b2;
            json_t *a = json_object();
            json_object_set_new(a, "token", token_str(m, t->top_id[k], &b2));
            json_object_set_new(a, "logprob", json_real(t->top_lp[k]));
            json_object_set_new(a, "bytes", b2);
            json_array_append_new(tl, a);
        }
        json_object_set_new(e, "top_logprobs", tl);
        json_array_append_new(content, e);
    }
    return json_pack("{s:o}", "content", content);
}

static json_t *choice_json(api_kind kind, const api_piece *p, int logprobs, int stream,
                           const mdl_model *m)
{
    json_t *c = json_object();
    json_object_set_new(c, "index", json_integer(p->index));
    json_t *text = jstr(p->text ? p->text : "", p->text ? p->len : 0);
    if (kind == API_COMPLETIONS) {
        json_object_set_new(c, "text", text);
    } else {
        json_t *msg = json_object();
        if (!stream || p->role)
            json_object_set_new(msg, "role", json_string("assistant"));
        if (!stream || p->len > 0 || p->role)
            json_object_set_new(msg, "content", text);
        else
            json_decref(text);
        json_object_set_new(c, stream ? "delta" : "message", msg);
    }
    if (logprobs >= 0 && (p->n_toks > 0 || !stream))
        json_object_set_new(c, "logprobs", kind == API_COMPLETIONS
                                               ? logprobs_completions(p, logprobs, m)
                                               : logprobs_chat(p, logprobs, m));
    else
        json_object_set_new(c, "logprobs", json_null());
    json_object_set_new(c, "finish_reason", p->finish ? json_string(p->finish) : json_null());
    return c;
}

static json_t *usage_json(int64_t prompt, int64_t completion)
{
    return json_pack("{s:I, s:I, s:I}", "prompt_tokens", (json_int_t)prompt,
                     "completion_tokens", (json_int_t)completion, "total_tokens",
                     (json_int_t)(prompt + completion));
}

static json_t *envelope(api_kind kind, const char *id, const char *model, long created,
                        int stream)
{
    const char *obj = kind == API_COMPLETIONS ? "text_completion"
                      : stream                ? "chat.completion.chunk"
                                              : "chat.completion";
    return json_pack("{s:s, s:s, s:I, s:s, s:s}", "id", id, "object", obj, "created",
                     (json_int_t)created, "model", model, "system_fingerprint",
                     "livekvquant");
}

char *api_response_json(api_kind kind, const char *id, const char *model, long created,
                        const api_piece *ch, int n_ch, int logprobs, const mdl_model *m,
                        int64_t prompt_tokens, int64_t completion_tokens)
{
    json_t *o = envelope(kind, id, model, created, 0);
    json_t *arr = json_array();
    for (int i = 0; i < n_ch; i++)
        json_array_append_new(arr, choice_json(kind, &ch[i], logprobs, 0, m));
    json_object_set_new(o, "choices", arr);
    json_object_set_new(o, "usage", usage_json(prompt_tokens, completion_tokens));
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    return s;
}

char *api_chunk_json(api_kind kind, const char *id, const char *model, long created,
                     const api_piece *ch, int n_ch, int logprobs, const mdl_model *m,
                     int64_t usage_prompt, int64_t usage_completion)
{
    json_t *o = envelope(kind, id, model, created, 1);
    json_t *arr = json_array();
    for (int i = 0; i < n_ch; i++)
        json_array_append_new(arr, choice_json(kind, &ch[i], logprobs, 1, m));
    json_object_set_new(o, "choices", arr);
    json_object_set_new(o, "usage", usage_prompt >= 0 ? usage_json(usage_prompt, usage_completion)
                                                      : json_null());
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    return s;
}

/* ---- /tokenize, /detokenize ------------------------------------------------- */

/* Appends s[0..n) as a JSON string (valid UTF-8 expected). */
static void sb_json_str(lkq_sb *b, const char *s, size_t n)
{
    lkq_sb_printf(b, "\"");
    size_t run = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch >= 0x20 && ch != '"' && ch != '\\')
            continue;
        lkq_sb_printf(b, "%.*s", (int)(i - run), s + run);
        if (ch == '"' || ch == '\\')
            lkq_sb_printf(b, "\\%c", ch);
        else
            lkq_sb_printf(b, "\\u%04x", ch);
        run = i + 1;
    }
    lkq_sb_printf(b, "%.*s\"", (int)(n - run), s + run);
}

/* Grows *ids to hold need tokens; refuses more than API_MAX_TOKENIZE
 * (400) or fails on memory (500). */
static int tokens_room(int32_t **ids, size_t *cap, size_t need, api_error *e)
{
    if (need > API_MAX_TOKENIZE) {
        api_set_error(e, 400, NULL, NULL, "content",
                      "the content is more than %d tokens", API_MAX_TOKENIZE);
        return -1;
    }
    if (need <= *cap)
        return 0;
    size_t nc = *cap ? *cap : 64;
    while (nc < need)
        nc *= 2;
    int32_t *t = realloc(*ids, nc * sizeof *t);
    if (!t) {
        api_set_error(e, 500, "server_error", NULL, NULL, "out of memory");
        return -1;
    }
    *ids = t;
    *cap = nc;
    return 0;
}

int api_tokenize(const char *body, size_t len, const api_ctx *c, char **out, api_error *e)
{
    *out = NULL;
    json_error_t je;
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &je);
    if (!root) {
        api_set_error(e, 400, NULL, NULL, NULL, "could not parse the JSON body: %s (line %d, "
                      "column %d)", je.text, je.line, je.column);
        return -1;
    }
    int rc = -1, add_special = 0, parse_special = 1, with_pieces = 0;
    int32_t *ids = NULL;
    size_t n = 0, cap = 0;
    lkq_sb b = {0};
    json_t *content = json_is_object(root) ? json_object_get(root, "content") : NULL;
    if (!json_is_object(root)) {
        api_set_error(e, 400, NULL, NULL, NULL, "the body must be a JSON object");
        goto done;
    }
    if (get_bool(root, "add_special", &add_special, e) < 0 ||
        get_bool(root, "parse_special", &parse_special, e) < 0 ||
        get_bool(root, "with_pieces", &with_pieces, e) < 0)
        goto done;
    if (!json_is_string(content) && !json_is_array(content)) {
        api_set_error(e, 400, NULL, NULL, "content",
                      "'content' is required: a string, or an array of strings and token ids");
        goto done;
    }
    /* llama.cpp's mixed content: strings are tokenized (special tokens
     * added to the first one only), ids are taken as they are */
    size_t parts = json_is_string(content) ? 1 : json_array_size(content);
    for (size_t k = 0; k < parts; k++) {
        json_t *v = json_is_string(content) ? content : json_array_get(content, k);
        if (json_is_integer(v)) {
            json_int_t id = json_integer_value(v);
            if (id < 0 || id >= c->m->hp.n_vocab) {
                api_set_error(e, 400, NULL, NULL, "content",
                              "content[%zu] is not a token id in [0, %d)", k, c->m->hp.n_vocab);
                goto done;
            }
            if (tokens_room(&ids, &cap, n + 1, e) < 0)
                goto done;
            ids[n++] = (int32_t)id;
            continue;
        }
        if (!json_is_string(v)) {
            api_set_error(e, 400, NULL, NULL, "content",
                          "content[%zu] must be a string or a token id", k);
            goto done;
        }
        int bos = add_special && k == 0, m = 0;
        (void)tok_encode(c->m->tok, json_string_value(v), json_string_length(v), bos,
                         parse_special, NULL, 0, &m);
        if (tokens_room(&ids, &cap, n + (size_t)m + 1, e) < 0)
            goto done;
        int m2 = 0;
        if (tok_encode(c->m->tok, json_string_value(v), json_string_length(v), bos,
                       parse_special, ids + n, m + 1, &m2) < 0) {
            api_set_error(e, 400, NULL, NULL, "content", "the content cannot be tokenized");
            goto done;
        }
        n += (size_t)m2;
    }
    lkq_sb_printf(&b, "{\"tokens\":[");
    for (size_t i = 0; i < n; i++) {
        if (i)
            lkq_sb_printf(&b, ",");
        if (!with_pieces) {
            lkq_sb_printf(&b, "%d", ids[i]);
            continue;
        }
        char buf[256];
        int pl = tok_piece(c->m->tok, ids[i], 1, buf, sizeof buf);
        pl = pl < 0 ? 0 : pl > (int)sizeof buf ? (int)sizeof buf : pl;
        lkq_sb_printf(&b, "{\"id\":%d,\"piece\":", ids[i]);
        if (utf8_valid(buf, (size_t)pl)) {
            sb_json_str(&b, buf, (size_t)pl);
        } else {
            lkq_sb_printf(&b, "[");
            for (int k = 0; k < pl; k++)
                lkq_sb_printf(&b, "%s%u", k ? "," : "", (unsigned char)buf[k]);
            lkq_sb_printf(&b, "]");
        }
        lkq_sb_printf(&b, "}");
    }
    lkq_sb_printf(&b, "]}");
    if (b.oom) {
        api_set_error(e, 500, "server_error", NULL, NULL, "out of memory");
        goto done;
    }
    *out = b.s;
    b.s = NULL;
    rc = 0;
done:
    lkq_sb_free(&b);
    free(ids);
    json_decref(root);
    return rc;
}

int api_detokenize(const char *body, size_t len, const api_ctx *c, char **out, api_error *e)
{
    *out = NULL;
    json_error_t je;
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &je);
    if (!root) {
        api_set_error(e, 400, NULL, NULL, NULL, "could not parse the JSON body: %s (line %d, "
                      "column %d)", je.text, je.line, je.column);
        return -1;
    }
    int rc = -1;
    int32_t *ids = NULL;
    char *text = NULL;
    json_t *toks = json_is_object(root) ? json_object_get(root, "tokens") : NULL;
    if (!json_is_array(toks)) {
        api_set_error(e, 400, NULL, NULL, "tokens", "'tokens' must be an array of token ids");
        goto done;
    }
    size_t n = json_array_size(toks);
    if (n > API_MAX_TOKENIZE) {
        api_set_error(e, 400, NULL, NULL, "tokens", "at most %d tokens", API_MAX_TOKENIZE);
        goto done;
    }
    ids = malloc((n + 1) * sizeof *ids);
    if (!ids) {
        api_set_error(e, 500, "server_error", NULL, NULL, "out of memory");
        goto done;
    }
    for (size_t k = 0; k < n; k++) {
        json_t *v = json_array_get(toks, k);
        if (!json_is_integer(v) || json_integer_value(v) < 0 ||
            json_integer_value(v) >= c->m->hp.n_vocab) {
            api_set_error(e, 400, NULL, NULL, "tokens", "tokens[%zu] is not a token id in [0, %d)",
                          k, c->m->hp.n_vocab);
            goto done;
        }
        ids[k] = (int32_t)json_integer_value(v);
    }
    size_t need = tok_decode(c->m->tok, ids, (int)n, 1, NULL, 0);
    text = malloc(need + 1);
    if (!text) {
        api_set_error(e, 500, "server_error", NULL, NULL, "out of memory");
        goto done;
    }
    tok_decode(c->m->tok, ids, (int)n, 1, text, need + 1);
    json_t *o = json_object();
    json_object_set_new(o, "content", jstr(text, need));
    *out = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (!*out) {
        api_set_error(e, 500, "server_error", NULL, NULL, "out of memory");
        goto done;
    }
    rc = 0;
done:
    free(text);
    free(ids);
    json_decref(root);
    return rc;
}
