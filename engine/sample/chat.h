/*
 * chat.h - chat prompt formatting for the template families a GGUF names
 * (ChatML, Llama-2, Llama-3, Zephyr, Gemma) without a Jinja interpreter.
 * Room: engine/sample. May call: libc only.
 * Pure functions; thread-safe.
 */
#ifndef LKQ_CHAT_H
#define LKQ_CHAT_H

#include <stddef.h>

typedef struct {
    const char *role;    /* "system", "user", "assistant" */
    const char *content;
} chat_msg;

/* 1 if name is a known template ("chatml", "llama2", "llama3", "zephyr",
 * "gemma"). */
int chat_template_known(const char *name);

/* Formats msgs with template name (empty or NULL -> "chatml"), ending with
 * the assistant prefix when add_generation_prompt. Writes at most cap-1
 * bytes + NUL to out and returns the full length, or negative (with a
 * reason in err) for an unknown template or role. *has_bos is set to 1 when
 * the text itself begins with the BOS marker (then do not add BOS again).
 *
 * gemma (Gemma 1/2/3's official template): "<bos>", then per turn
 * "<start_of_turn>ROLE\n" + trimmed content + "<end_of_turn>\n" with
 * assistant spelled "model"; generation prompt "<start_of_turn>model\n".
 * Gemma has no system role: a system message's content + "\n\n" is put in
 * front of the next user turn (the official template does this for a
 * leading system message and refuses others; llama.cpp merges any). A
 * system message with no user turn after it becomes a user turn of its own
 * rather than being dropped.
 *
 * The output spells special tokens out ("<|im_start|>"); the messages'
 * text is in it verbatim, so tokenize it with chat_format_spans' runs
 * (content as plain text) or a user can forge control tokens. */
long chat_format(const char *name, const chat_msg *msgs, int n,
                 int add_generation_prompt, char *out, size_t cap,
                 int *has_bos, char *err, size_t errlen);

/* A run of the formatted text that is message content (plain text: it must
 * be tokenized without parsing special tokens); the rest is template
 * markup. Byte offset and length in the output of chat_format_spans. */
typedef struct {
    size_t off, len;
} chat_span;

/* As chat_format, and lists the content runs of the output in order in
 * spans[0..*n_spans) (at most max_spans; *n_spans is the full count, which
 * may exceed max_spans: call again with more room). A content string is
 * recognized by its address (the template writes it from msgs[i].content),
 * so every template of this file reports it, whatever its layout. */
long chat_format_spans(const char *name, const chat_msg *msgs, int n,
                       int add_generation_prompt, char *out, size_t cap,
                       int *has_bos, chat_span *spans, int max_spans, int *n_spans,
                       char *err, size_t errlen);

#endif
