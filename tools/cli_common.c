/*
 * cli_common.c - helpers shared by the evaluation subcommands (see
 * cli_common.h). No global state.
 */
#include "tools/cli_common.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "tokenizer/tok.h"

double cli_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int cli_parse_long(const char *opt, const char *s, long lo, long hi, long *out,
                   char *err, size_t errlen)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        snprintf(err, errlen, "%s expects an integer in [%ld, %ld], got '%s'", opt, lo,
                 hi, s);
        return -1;
    }
    *out = v;
    return 0;
}

int cli_parse_double(const char *opt, const char *s, double *out, char *err,
                     size_t errlen)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v)) {
        snprintf(err, errlen, "%s expects a number, got '%s'", opt, s);
        return -1;
    }
    *out = v;
    return 0;
}

int cli_split_list(const char *s, char *buf, size_t bufcap, char **items, int cap,
                   char *err, size_t errlen)
{
    size_t n = strlen(s);
    if (n + 1 > bufcap) {
        snprintf(err, errlen, "list too long (%zu characters)", n);
        return -1;
    }
    memcpy(buf, s, n + 1);
    int k = 0;
    char *p = buf;
    for (;;) {
        char *c = strchr(p, ',');
        if (c)
            *c = '\0';
        if (!*p) {
            snprintf(err, errlen, "empty item in list '%s'", s);
            return -1;
        }
        if (k == cap) {
            snprintf(err, errlen, "more than %d items in list '%s'", cap, s);
            return -1;
        }
        items[k++] = p;
        if (!c)
            break;
        p = c + 1;
    }
    return k;
}

char *cli_read_file(const char *path, size_t *len, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "cannot open '%s': %s", path, strerror(errno));
        return NULL;
    }
    char *buf = NULL;
    long sz = -1;
    if (fseek(f, 0, SEEK_END) == 0)
        sz = ftell(f);
    if (sz < 0 || sz > (1L << 30) || fseek(f, 0, SEEK_SET) != 0) {
        snprintf(err, errlen, "cannot read '%s': not a regular file of at most 1 GiB",
                 path);
        goto done;
    }
    buf = malloc((size_t)sz + 1);
    if (!buf) {
        snprintf(err, errlen, "out of memory reading '%s'", path);
        goto done;
    }
    if (fread(buf, 1, (size_t)sz, f) != (size_t)sz) {
        snprintf(err, errlen, "cannot read '%s': %s", path,
                 ferror(f) ? strerror(errno) : "short read");
        free(buf);
        buf = NULL;
        goto done;
    }
    buf[sz] = '\0';
    *len = (size_t)sz;
done:
    fclose(f);
    return buf;
}

int cli_write_atomic(const char *path, const char *data, size_t len, char *err,
                     size_t errlen)
{
    char tmp[4096];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp) {
        snprintf(err, errlen, "path too long: %s", path);
        return -1;
    }
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        snprintf(err, errlen, "cannot create '%s': %s", tmp, strerror(errno));
        return -1;
    }
    size_t off = 0;
    while (off < len) {
        ssize_t w = write(fd, data + off, len - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            snprintf(err, errlen, "cannot write '%s': %s", tmp, strerror(errno));
            close(fd);
            unlink(tmp);
            return -1;
        }
        off += (size_t)w;
    }
    if (fsync(fd) < 0 || close(fd) < 0) {
        snprintf(err, errlen, "cannot write '%s': %s", tmp, strerror(errno));
        unlink(tmp);
        return -1;
    }
    if (rename(tmp, path) < 0) {
        snprintf(err, errlen, "cannot rename '%s': %s", tmp, strerror(errno));
        unlink(tmp);
        return -1;
    }
    return 0;
}

int cli_mkdir(const char *path, char *err, size_t errlen)
{
    char buf[4096];
    size_t n = strlen(path);
    if (n == 0 || n + 1 > sizeof buf) {
        snprintf(err, errlen, "bad directory path '%s'", path);
        return -1;
    }
    memcpy(buf, path, n + 1);
    for (char *p = buf + 1;; p++) {
        if (*p == '/' || *p == '\0') {
            char c = *p;
            *p = '\0';
            if (mkdir(buf, 0755) < 0 && errno != EEXIST) {
                snprintf(err, errlen, "cannot create directory '%s': %s", buf,
                         strerror(errno));
                return -1;
            }
            *p = c;
            if (!c)
                break;
        }
    }
    struct stat st;
    if (stat(path, &st) < 0 || !S_ISDIR(st.st_mode)) {
        snprintf(err, errlen, "'%s' is not a directory", path);
        return -1;
    }
    return 0;
}

const char *cli_text_start(const char *text, const char *marker)
{
    const char *m = marker ? marker : "CHAPTER 1.";
    size_t ml = strlen(m);
    for (const char *q = text; (q = strstr(q, m)) != NULL; q++)
        if (q == text || q[-1] == '\n')
            return q;
    if (marker && strncmp(text, m, ml) != 0)
        return NULL;
    return text;
}

int32_t *cli_encode(const mdl_model *m, const char *text, size_t len, int add_bos,
                    int special, int *n_out, char *err, size_t errlen)
{
    int n = 0;
    (void)tok_encode(m->tok, text, len, add_bos, special, NULL, 0, &n);
    int32_t *ids = malloc(((size_t)n + 1) * sizeof *ids);
    if (!ids) {
        snprintf(err, errlen, "out of memory tokenizing %zu bytes", len);
        return NULL;
    }
    if (tok_encode(m->tok, text, len, add_bos, special, ids, n + 1, n_out) < 0) {
        snprintf(err, errlen, "cannot tokenize the text");
        free(ids);
        return NULL;
    }
    return ids;
}

int cli_kv_long_opts(struct option *opts, int n, int cap, char names[][32], int first_val)
{
    for (int i = 0; cfg_kv_keys[i] && i < 32 && n + 1 < cap; i++) {
        snprintf(names[i], 32, "%s", cfg_kv_keys[i]);
        for (char *c = names[i]; *c; c++)
            if (*c == '_')
                *c = '-';
        opts[n++] = (struct option){names[i], required_argument, 0, first_val + i};
    }
    opts[n] = (struct option){0, 0, 0, 0};
    return n;
}

int cli_kv_assign(cfg_kv *c, const char *kv, char *err, size_t errlen)
{
    const char *eq = strchr(kv, '=');
    if (!eq || eq == kv || !eq[1]) {
        snprintf(err, errlen, "expected KEY=VALUE, got '%s'", kv);
        return -1;
    }
    char key[64];
    size_t kl = (size_t)(eq - kv);
    if (kl >= sizeof key) {
        snprintf(err, errlen, "unknown knob '%.*s'", (int)kl, kv);
        return -1;
    }
    memcpy(key, kv, kl);
    key[kl] = '\0';
    return cfg_kv_set(c, key, eq + 1, err, errlen);
}

int64_t cli_vm_hwm_bytes(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (!f)
        return -1;
    char line[256];
    int64_t kb = -1;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "VmHWM:", 6)) {
            kb = strtoll(line + 6, NULL, 10);
            break;
        }
    fclose(f);
    return kb < 0 ? -1 : kb * 1024;
}

uint64_t cli_hash64(const char *s)
{
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211ULL;
    }
    return h;
}

void cli_fmt_duration(double s, char *buf, size_t cap)
{
    if (!(s >= 0) || s > 1e7)
        s = 0;
    long t = lround(s);
    if (t >= 3600)
        snprintf(buf, cap, "%ldh%02ldm", t / 3600, t % 3600 / 60);
    else if (t >= 60)
        snprintf(buf, cap, "%ldm%02lds", t / 60, t % 60);
    else
        snprintf(buf, cap, "%lds", t);
}

const char *cli_kv_mode_name(const cfg_kv *c)
{
    return cfg_kv_mode_name(c);
}

void cli_eval_opts(const struct option *base, int nb, struct option *opts, int cap,
                   char names[][32])
{
    static const struct option shared[] = {
        {"model", required_argument, 0, 'm'},
        {"file", required_argument, 0, 'f'},
        {"threads", required_argument, 0, 't'},
        {"help", no_argument, 0, 'h'},
        {"set", required_argument, 0, CLI_OPT_SET},
        {"config", required_argument, 0, CLI_OPT_CONFIG},
        {"start", required_argument, 0, CLI_OPT_START},
        {"device", required_argument, 0, CLI_OPT_DEVICE},
    };
    int n = 0;
    for (int i = 0; i < nb && n + 1 < cap; i++)
        opts[n++] = base[i];
    for (size_t i = 0; i < sizeof shared / sizeof shared[0] && n + 1 < cap; i++)
        opts[n++] = shared[i];
    cli_kv_long_opts(opts, n, cap, names, CLI_OPT_KV);
}

int cli_eval_opt(int c, const char *arg, char **argv, cfg_kv *kv, const char **start,
                 bk_device *device,
                 char *err, size_t errlen)
{
    char lerr[256];
    switch (c) {
    case CLI_OPT_SET:
        if (cli_kv_assign(kv, arg, lerr, sizeof lerr) < 0) {
            snprintf(err, errlen, "--set '%s': %s", arg, lerr);
            return -1;
        }
        return 0;
    case CLI_OPT_CONFIG:
        return cfg_kv_load_file(kv, arg, err, errlen) < 0 ? -1 : 0;
    case CLI_OPT_START:
        *start = arg;
        return 0;
    case CLI_OPT_DEVICE:
        if (bk_parse_device(arg, device) < 0) {
            snprintf(err, errlen, "--device expects cpu or cuda, got '%s'", arg);
            return -1;
        }
        return 0;
    case ':':
        snprintf(err, errlen, "option '%s' needs a value", argv[optind - 1]);
        return -1;
    default:
        if (c >= CLI_OPT_KV && c < CLI_OPT_KV + 32) {
            if (cfg_kv_set(kv, cfg_kv_keys[c - CLI_OPT_KV], arg, lerr, sizeof lerr) < 0) {
                snprintf(err, errlen, "--%s", lerr);
                return -1;
            }
            return 0;
        }
        snprintf(err, errlen, "unknown option '%s'", argv[optind - 1]);
        return -1;
    }
}

int cli_kv_modes(const char *list, const cfg_kv *base, cfg_kv *modes, char *err,
                 size_t errlen)
{
    char buf[64], *items[2], lerr[256];
    int k = cli_split_list(list, buf, sizeof buf, items, 2, lerr, sizeof lerr);
    if (k < 0) {
        snprintf(err, errlen, "--kv-cache: %s", lerr);
        return -1;
    }
    for (int i = 0; i < k; i++) {
        modes[i] = *base;
        if (cfg_kv_set(&modes[i], "kv_cache", items[i], lerr, sizeof lerr) < 0 ||
            cfg_kv_validate(&modes[i], lerr, sizeof lerr) < 0) {
            snprintf(err, errlen, "%s", lerr);
            return -1;
        }
        if (i && modes[i].mode == modes[0].mode) {
            snprintf(err, errlen, "--kv-cache: '%s' listed twice", items[i]);
            return -1;
        }
    }
    return k;
}
