/*
 * log.c - leveled logging to stderr (see log.h). The level is one atomic
 * int; each line is formatted into a stack buffer and written with one
 * write(2) so concurrent lines do not interleave.
 */
#include "engine/util/log.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

static atomic_int g_level = -1; /* -1: not yet read from the environment */

static const char *const level_names[] = {"debug", "info", "warn", "error", "off"};

int log_parse_level(const char *s, log_level *out)
{
    for (int i = 0; i <= LOG_LEVEL_OFF; i++) {
        if (s && strcasecmp(s, level_names[i]) == 0) {
            *out = (log_level)i;
            return 0;
        }
    }
    return -1;
}

log_level log_get_level(void)
{
    int lv = atomic_load(&g_level);
    if (lv < 0) {
        log_level parsed = LOG_LEVEL_INFO;
        const char *env = getenv("LKQ_LOG_LEVEL");
        if (env)
            (void)log_parse_level(env, &parsed);
        lv = (int)parsed;
        atomic_store(&g_level, lv);
    }
    return (log_level)lv;
}

void log_set_level(log_level lv)
{
    atomic_store(&g_level, (int)lv);
}

void log_msg(log_level lv, const char *req, const char *fmt, ...)
{
    if (lv < log_get_level() || lv >= LOG_LEVEL_OFF)
        return;
    char buf[2048];
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(buf, sizeof buf, "%02d:%02d:%02d.%03ld %-5s ", tm.tm_hour,
                     tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000L,
                     level_names[lv]);
    if (req && n > 0 && (size_t)n < sizeof buf)
        n += snprintf(buf + n, sizeof buf - (size_t)n, "[%s] ", req);
    if (n > 0 && (size_t)n < sizeof buf) {
        va_list ap;
        va_start(ap, fmt);
        int m = vsnprintf(buf + n, sizeof buf - (size_t)n, fmt, ap);
        va_end(ap);
        if (m > 0)
            n += m;
    }
    if (n < 0)
        return;
    if ((size_t)n >= sizeof buf - 1)
        n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    ssize_t w = write(STDERR_FILENO, buf, (size_t)n);
    (void)w;
}
