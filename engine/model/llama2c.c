/*
 * llama2c.c - llama2.c `.bin` checkpoint reader: header sanity checks, exact
 * file-size check, weight views into the mapping. See llama2c.h.
 *
 * Threading: open/close from one thread; the opened file is read-only.
 */
#include "engine/model/llama2c.h"

#include "engine/util/err.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define HDR_BYTES 28u

/* Checks one header field against [1, max]. */
static int in_range(int32_t v, int32_t max, const char *what, char *err, size_t errlen)
{
    if (v < 1 || v > max)
        return lkq_err(err, errlen, -1,
                       "llama2.c header: %s = %d is out of range [1, %d]", what, v, max);
    return 0;
}

int l2c_check(const int32_t hdr[7], uint64_t file_size, l2c_config *cfg,
              char *err, size_t errlen)
{
    l2c_config c = {
        .dim = hdr[0], .hidden_dim = hdr[1], .n_layers = hdr[2], .n_heads = hdr[3],
        .n_kv_heads = hdr[4], .seq_len = hdr[6],
        .shared_classifier = hdr[5] > 0,
        .vocab_size = hdr[5] == INT32_MIN ? 0 : (hdr[5] < 0 ? -hdr[5] : hdr[5]),
    };
    if (in_range(c.dim, L2C_MAX_DIM, "dim", err, errlen) ||
        in_range(c.hidden_dim, L2C_MAX_HIDDEN, "hidden_dim", err, errlen) ||
        in_range(c.n_layers, L2C_MAX_LAYERS, "n_layers", err, errlen) ||
        in_range(c.n_heads, L2C_MAX_HEADS, "n_heads", err, errlen) ||
        in_range(c.n_kv_heads, L2C_MAX_HEADS, "n_kv_heads", err, errlen) ||
        in_range(c.vocab_size, L2C_MAX_VOCAB, "|vocab_size|", err, errlen) ||
        in_range(c.seq_len, L2C_MAX_SEQ, "seq_len", err, errlen))
        return -1;
    if (c.dim % c.n_heads)
        return lkq_err(err, errlen, -1, "llama2.c header: dim %d is not a multiple of n_heads %d",
                    c.dim, c.n_heads);
    if (c.n_heads % c.n_kv_heads)
        return lkq_err(err, errlen, -1,
                       "llama2.c header: n_heads %d is not a multiple of n_kv_heads %d",
                    c.n_heads, c.n_kv_heads);
    uint64_t head_dim = (uint64_t)(c.dim / c.n_heads);
    if (head_dim % 2)
        return lkq_err(err, errlen, -1, "llama2.c header: head_dim %llu is odd (RoPE needs pairs)",
                    (unsigned long long)head_dim);

    /* Sizes in floats; the limits above keep every product far below 2^62. */
    uint64_t dim = (uint64_t)c.dim, hid = (uint64_t)c.hidden_dim, L = (uint64_t)c.n_layers;
    uint64_t kv_dim = head_dim * (uint64_t)c.n_kv_heads;
    uint64_t emb = (uint64_t)c.vocab_size * dim;
    uint64_t per_layer = 2 * dim + 2 * dim * dim + 2 * kv_dim * dim + 3 * hid * dim;
    uint64_t base = emb + L * per_layer + dim;
    uint64_t fc = (uint64_t)c.seq_len * head_dim;
    uint64_t cls = c.shared_classifier ? 0 : emb;
    uint64_t without = HDR_BYTES + 4 * (base + cls), with = HDR_BYTES + 4 * (base + fc + cls);
    if (file_size == with)
        c.has_freq_cis = 1;
    else if (file_size != without)
        return lkq_err(err, errlen, -1,
                       "llama2.c checkpoint is %llu bytes, expected %llu (or %llu with the legacy "
                    "freq_cis arrays) for dim %d hidden %d layers %d heads %d/%d vocab %d seq %d%s",
                    (unsigned long long)file_size, (unsigned long long)without,
                    (unsigned long long)with, c.dim, c.hidden_dim, c.n_layers, c.n_heads,
                    c.n_kv_heads, c.vocab_size, c.seq_len,
                    c.shared_classifier ? "" : " (unshared classifier)");
    *cfg = c;
    return 0;
}

void l2c_close(l2c_file *f)
{
    if (!f)
        return;
    if (f->mapped)
        munmap((void *)f->base, f->size);
    free(f);
}

/* Validates and sets the weight views of f (base/size already set). */
static int setup(l2c_file *f, char *err, size_t errlen)
{
    int32_t hdr[7];
    if (f->size < HDR_BYTES)
        return lkq_err(err, errlen, -1,
                       "file too small for a llama2.c header (%zu bytes, need 28)", f->size);
    memcpy(hdr, f->base, sizeof(hdr));
    if (l2c_check(hdr, f->size, &f->cfg, err, errlen))
        return -1;
    const l2c_config *c = &f->cfg;
    size_t dim = (size_t)c->dim, hid = (size_t)c->hidden_dim, L = (size_t)c->n_layers;
    size_t head_dim = dim / (size_t)c->n_heads, kv_dim = head_dim * (size_t)c->n_kv_heads;
    const float *p = (const float *)((const char *)f->base + HDR_BYTES);
    f->token_embedding = p; p += (size_t)c->vocab_size * dim;
    f->rms_att = p; p += L * dim;
    f->wq = p; p += L * dim * dim;
    f->wk = p; p += L * kv_dim * dim;
    f->wv = p; p += L * kv_dim * dim;
    f->wo = p; p += L * dim * dim;
    f->rms_ffn = p; p += L * dim;
    f->w1 = p; p += L * hid * dim;
    f->w2 = p; p += L * dim * hid;
    f->w3 = p; p += L * hid * dim;
    f->rms_final = p; p += dim;
    if (c->has_freq_cis)
        p += (size_t)c->seq_len * head_dim;
    f->wcls = c->shared_classifier ? f->token_embedding : p;
    return 0;
}

int l2c_open_mem(const void *data, size_t size, l2c_file **out, char *err,
                 size_t errlen)
{
    *out = NULL;
    if ((uintptr_t)data % sizeof(float))
        return lkq_err(err, errlen, -1, "llama2.c buffer is not 4-byte aligned");
    l2c_file *f = calloc(1, sizeof(*f));
    if (!f)
        return lkq_err(err, errlen, -1, "out of memory");
    f->base = data;
    f->size = data ? size : 0;
    if (setup(f, err, errlen)) {
        l2c_close(f);
        return -1;
    }
    *out = f;
    return 0;
}

int l2c_open(const char *path, l2c_file **out, char *err, size_t errlen)
{
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return lkq_err(err, errlen, -1, "cannot open '%s': %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st)) {
        lkq_err(err, errlen, -1, "cannot stat '%s': %s", path, strerror(errno));
        close(fd);
        return -1;
    }
    if (S_ISDIR(st.st_mode) || !S_ISREG(st.st_mode) || st.st_size == 0) {
        lkq_err(err, errlen, -1, S_ISDIR(st.st_mode) ? "'%s' is a directory, not a model file"
                          : st.st_size == 0 && S_ISREG(st.st_mode) ? "'%s' is empty"
                          : "'%s' is not a regular file", path);
        close(fd);
        return -1;
    }
    void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);
    if (p == MAP_FAILED)
        return lkq_err(err, errlen, -1, "cannot map '%s': %s", path, strerror(e));
    l2c_file *f = calloc(1, sizeof(*f));
    if (!f) {
        munmap(p, (size_t)st.st_size);
        return lkq_err(err, errlen, -1, "out of memory");
    }
    f->base = p;
    f->size = (size_t)st.st_size;
    f->mapped = 1;
    char why[384];
    if (setup(f, why, sizeof(why))) {
        lkq_err(err, errlen, -1, "'%s': %s", path, why);
        l2c_close(f);
        return -1;
    }
    *out = f;
    return 0;
}
