/*
 * err.h - the one way engine code reports a failure: a one-line reason
 * formatted into the caller's buffer and an error code returned, so a
 * function can `return lkq_err(err, errlen, -EINVAL, "bad %s", what);`.
 * Room: engine/util. May call: libc only. Thread-safe (writes only err).
 */
#ifndef LKQ_ERR_H
#define LKQ_ERR_H

#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>

/* Writes the printf-formatted reason into err (when err and errlen are
 * set; truncated to errlen) and returns rc. */
static inline int lkq_err(char *err, size_t errlen, int rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static inline int lkq_err(char *err, size_t errlen, int rc, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return rc;
}

#endif
