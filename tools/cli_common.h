/*
 * cli_common.h - small helpers shared by the evaluation subcommands of
 * livekvq (ablate, needle, profile): option values, files, text, the cache
 * knob flags, atomic file writes and process memory. Every function reports
 * problems through a one-line reason in err (no printing, no exit), so each
 * command decides how to show it. Thread-safe (no shared state) except
 * cli_kv_long_opts, which fills a caller-owned table.
 */
#ifndef LKQ_CLI_COMMON_H
#define LKQ_CLI_COMMON_H

#include <getopt.h>
#include <stddef.h>
#include <stdint.h>

#include "config/kvq_config.h"
#include "engine/backend/backend.h"
#include "engine/model/model.h"

/* Monotonic clock, seconds. */
double cli_now_s(void);

/* Whole-string integer in [lo, hi] / finite number. Return 0 or -1 with
 * "OPT expects ..., got 'S'" in err. */
int cli_parse_long(const char *opt, const char *s, long lo, long hi, long *out,
                   char *err, size_t errlen);
int cli_parse_double(const char *opt, const char *s, double *out, char *err,
                     size_t errlen);

/* Comma-separated list "a,b,c": splits s into at most cap items (pointers
 * into buf, a copy of s of size bufcap). Empty items, a leading/trailing
 * comma or more than cap items are errors. Returns the count or -1. */
int cli_split_list(const char *s, char *buf, size_t bufcap, char **items, int cap,
                   char *err, size_t errlen);

/* Whole file into a NUL-terminated heap buffer (caller frees). NULL with the
 * reason in err. */
char *cli_read_file(const char *path, size_t *len, char *err, size_t errlen);

/* Writes len bytes to path atomically (path.tmp, fsync, rename): a reader
 * sees the old file or the whole new one, never a torn write. */
int cli_write_atomic(const char *path, const char *data, size_t len, char *err,
                     size_t errlen);

/* mkdir -p for one or two levels (parent must be creatable). */
int cli_mkdir(const char *path, char *err, size_t errlen);

/* The first line of text starting with marker (NULL marker: "CHAPTER 1.",
 * falling back to the start of text when that is absent). Returns NULL only
 * when an explicit marker is not found. */
const char *cli_text_start(const char *text, const char *marker);

/* Tokenizes text; returns a heap array (caller frees) or NULL with err. */
int32_t *cli_encode(const mdl_model *m, const char *text, size_t len, int add_bos,
                    int special, int *n_out, char *err, size_t errlen);

/* Appends one "--knob-name" option per cache knob (cfg_kv_keys, '_' written
 * '-') to opts[n..], with val = first_val + knob index; names live in
 * names[32][32] (caller storage). Returns the new count (terminator added
 * after it, so opts needs room for count + 1). */
int cli_kv_long_opts(struct option *opts, int n, int cap, char names[][32],
                     int first_val);

/* Option values shared by the evaluation commands: each command numbers its
 * own long options below CLI_OPT_SET. */
enum {
    CLI_OPT_SET = 400, /* --set K=V       a cache knob */
    CLI_OPT_CONFIG,    /* --config FILE   cache knobs from a file */
    CLI_OPT_START,     /* --start TEXT    where the text starts */
    CLI_OPT_DEVICE,    /* --device cpu|cuda where the forward pass runs */
    CLI_OPT_KV = 512,  /* --knob-name V   + index into cfg_kv_keys */
};

/* Builds a command's long-option table: base[0..nb) plus --model (-m),
 * --file (-f), --threads (-t), --help (-h) (the command handles those four),
 * --set, --config, --start, --device and one --knob-name flag per cache knob (names:
 * caller storage of 32 entries). opts needs room for nb + 40 entries. */
void cli_eval_opts(const struct option *base, int nb, struct option *opts, int cap,
                   char names[][32]);

/* Handles what getopt_long returned when the command's own switch did not:
 * --set / --config / knob flags into *kv, --start into *start, and the
 * "needs a value" / "unknown option" cases. Returns 0, or -1 with one line
 * in err. */
int cli_eval_opt(int c, const char *arg, char **argv, cfg_kv *kv, const char **start,
                 bk_device *device,
                 char *err, size_t errlen);

/* "--kv-cache fp16,int4": up to two distinct modes, each base with the mode
 * set, validated. Returns the count or -1 with the reason. */
int cli_kv_modes(const char *list, const cfg_kv *base, cfg_kv *modes, char *err,
                 size_t errlen);

/* "key=value" into c through cfg_kv_set (key may use '-'). */
int cli_kv_assign(cfg_kv *c, const char *kv, char *err, size_t errlen);

/* Peak resident set of this process (VmHWM), bytes; -1 if unknown. */
int64_t cli_vm_hwm_bytes(void);

/* FNV-1a 64-bit hash (stable across runs and machines). */
uint64_t cli_hash64(const char *s);

/* "1h02m", "3m05s", "12s" into buf. */
void cli_fmt_duration(double s, char *buf, size_t cap);

/* Mode name of a cache config ("fp16" / "int4"). */
const char *cli_kv_mode_name(const cfg_kv *c);

#endif
