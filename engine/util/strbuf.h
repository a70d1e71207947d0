/*
 * strbuf.h - a growing, NUL-terminated text buffer filled printf-style
 * (Prometheus exposition in server/metrics.c, CSV/JSON rows in tools/).
 * Room: engine/util. May call: libc only.
 *
 * An allocation failure is sticky: later appends do nothing and `oom`
 * stays set, so a caller checks once at the end. Threading: a buffer is
 * used by one thread at a time.
 */
#ifndef LKQ_STRBUF_H
#define LKQ_STRBUF_H

#include <stddef.h>

typedef struct {
    char *s;    /* the text (NULL until the first append) */
    size_t len; /* bytes before the terminating NUL */
    size_t cap; /* bytes allocated */
    int oom;    /* 1 after an allocation (or formatting) failure */
} lkq_sb;

/* Appends the formatted text; grows the buffer as needed. */
void lkq_sb_printf(lkq_sb *b, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* Frees the text and empties the buffer (an empty buffer is a no-op). */
void lkq_sb_free(lkq_sb *b);

#endif
