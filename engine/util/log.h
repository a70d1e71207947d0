/*
 * log.h - the one logging module: leveled lines to stderr, each line
 * written with a single write so lines from different threads never
 * interleave. Never called from kernels.
 * Room: engine/util. May call: libc only.
 * Thread-safety: all functions may be called from any thread.
 */
#ifndef LKQ_LOG_H
#define LKQ_LOG_H

typedef enum {
    LOG_LEVEL_DEBUG = 0,
    LOG_LEVEL_INFO = 1,
    LOG_LEVEL_WARN = 2,
    LOG_LEVEL_ERROR = 3,
    LOG_LEVEL_OFF = 4,
} log_level;

/* Sets the minimum level printed (default INFO, or $LKQ_LOG_LEVEL =
 * debug|info|warn|error|off read on first use). */
void log_set_level(log_level lv);
log_level log_get_level(void);
/* Parses "debug", "info", ...; returns 0 and *out, or -1. */
int log_parse_level(const char *s, log_level *out);

/* Writes one line "LEVEL [req] message\n"; req may be NULL. */
void log_msg(log_level lv, const char *req, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

#define log_debug(...) log_msg(LOG_LEVEL_DEBUG, NULL, __VA_ARGS__)
#define log_info(...) log_msg(LOG_LEVEL_INFO, NULL, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_LEVEL_WARN, NULL, __VA_ARGS__)
#define log_error(...) log_msg(LOG_LEVEL_ERROR, NULL, __VA_ARGS__)

#endif
