/*
 * gguf.c - GGUF v2/v3 reader: maps the file, validates the whole header in
 * one pass (see gguf.h for the list of checks) and answers typed lookups.
 *
 * Parsing goes through a cursor whose every read is checked against the
 * bytes left, so no offset arithmetic can wrap or step outside the file.
 * Keys and tensor names are sorted once (duplicates are rejected there) and
 * looked up by binary search.
 *
 * Threading: open/close from one thread; lookups on an open file from any.
 */
#include "engine/model/gguf.h"

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

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "gguf.c assumes a little-endian host"
#endif

#define MAX_KEY_LEN 65535u
#define MAX_NAME_LEN 1024u
#define MAX_ALIGNMENT (1u << 30)

typedef struct {
    char *key;            /* owned, NUL-terminated */
    gguf_vtype type;
    const uint8_t *val;   /* scalar value, string bytes, or first array element */
    uint64_t len;         /* string: byte length; array: element count */
    gguf_vtype etype;     /* array element type */
    uint64_t *str_off;    /* owned; string arrays only */
} kv_entry;

struct gguf_file {
    const uint8_t *base;
    size_t size;
    int mapped;
    uint32_t version;
    size_t alignment;
    int64_t n_kv, n_tensors;
    kv_entry *kv;
    gguf_tensor *tensors;
    kv_entry **kv_sorted;      /* by key */
    gguf_tensor **t_sorted;    /* by name */
};

typedef struct {
    const uint8_t *p;
    size_t size, pos;
    char *err;
    size_t errlen;
} cursor;

/* Copies n bytes at the cursor into dst, or fails naming `what`. */
static int cur_read(cursor *c, void *dst, size_t n, const char *what)
{
    if (n > c->size - c->pos) {
        memset(dst, 0, n); /* keeps callers' locals defined on the error path */
        return lkq_err(c->err, c->errlen, GGUF_EFORMAT,
                       "truncated file: %s at offset %zu needs %zu bytes, only %zu left",
                    what, c->pos, n, c->size - c->pos);
    }
    memcpy(dst, c->p + c->pos, n);
    c->pos += n;
    return 0;
}

static int cur_u32(cursor *c, uint32_t *v, const char *what) { return cur_read(c, v, 4, what); }
static int cur_u64(cursor *c, uint64_t *v, const char *what) { return cur_read(c, v, 8, what); }

/* Reads a string (u64 length + bytes); the bytes stay in the file. */
static int cur_str(cursor *c, gguf_str *s, const char *what)
{
    s->s = NULL; /* defined on every path */
    s->len = 0;
    uint64_t len;
    if (cur_u64(c, &len, what))
        return GGUF_EFORMAT;
    if (len > c->size - c->pos)
        return lkq_err(c->err, c->errlen, GGUF_EFORMAT,
                       "%s at offset %zu: string length %llu exceeds the %zu bytes left",
                    what, c->pos - 8, (unsigned long long)len, c->size - c->pos);
    s->s = (const char *)(c->p + c->pos);
    s->len = len;
    c->pos += (size_t)len;
    return 0;
}

/* 1 if s[0..len) is non-empty, well-formed UTF-8 (no overlongs, surrogates
 * or code points past U+10FFFF) and holds no NUL byte. */
static int valid_name(const char *s, uint64_t len)
{
    const unsigned char *u = (const unsigned char *)s;
    if (len == 0)
        return 0;
    for (uint64_t i = 0; i < len;) {
        unsigned c = u[i];
        if (c == 0)
            return 0;
        if (c < 0x80) { i++; continue; }
        unsigned n;
        uint32_t cp;
        if (c >= 0xc2 && c <= 0xdf) { n = 1; cp = c & 0x1f; }
        else if (c >= 0xe0 && c <= 0xef) { n = 2; cp = c & 0x0f; }
        else if (c >= 0xf0 && c <= 0xf4) { n = 3; cp = c & 0x07; }
        else return 0;
        if (n > len - i - 1)
            return 0;
        for (unsigned k = 1; k <= n; k++) {
            if ((u[i + k] & 0xc0) != 0x80)
                return 0;
            cp = (cp << 6) | (u[i + k] & 0x3f);
        }
        if ((n == 2 && cp < 0x800) || (n == 3 && (cp < 0x10000 || cp > 0x10ffff)) ||
            (cp >= 0xd800 && cp <= 0xdfff))
            return 0;
        i += n + 1;
    }
    return 1;
}

/* Size of one element of a fixed-size value type, 0 for string/array/unknown. */
static size_t vtype_size(uint32_t t)
{
    switch (t) {
    case GGUF_UINT8: case GGUF_INT8: case GGUF_BOOL: return 1;
    case GGUF_UINT16: case GGUF_INT16: return 2;
    case GGUF_UINT32: case GGUF_INT32: case GGUF_FLOAT32: return 4;
    case GGUF_UINT64: case GGUF_INT64: case GGUF_FLOAT64: return 8;
    default: return 0;
    }
}

const char *gguf_vtype_name(uint32_t t)
{
    static const char *const names[] = {
        "uint8", "int8", "uint16", "int16", "uint32", "int32", "float32",
        "bool", "string", "array", "uint64", "int64", "float64"};
    return t < sizeof(names) / sizeof(names[0]) ? names[t] : "unknown";
}

const char *gguf_type_name(uint32_t type)
{
    static const char *const names[] = {
        [0] = "F32", [1] = "F16", [2] = "Q4_0", [3] = "Q4_1", [6] = "Q5_0",
        [7] = "Q5_1", [8] = "Q8_0", [9] = "Q8_1", [10] = "Q2_K", [11] = "Q3_K",
        [12] = "Q4_K", [13] = "Q5_K", [14] = "Q6_K", [15] = "Q8_K",
        [16] = "IQ2_XXS", [17] = "IQ2_XS", [18] = "IQ3_XXS", [19] = "IQ1_S",
        [20] = "IQ4_NL", [21] = "IQ3_S", [22] = "IQ2_S", [23] = "IQ4_XS",
        [24] = "I8", [25] = "I16", [26] = "I32", [27] = "I64", [28] = "F64",
        [29] = "IQ1_M", [30] = "BF16", [34] = "TQ1_0", [35] = "TQ2_0"};
    if (type < sizeof(names) / sizeof(names[0]) && names[type])
        return names[type];
    return "unknown";
}

/* Parses the value of key kv->key (type already read) at the cursor. */
static int parse_value(cursor *c, kv_entry *kv, uint32_t type)
{
    if (type > GGUF_FLOAT64)
        return lkq_err(c->err, c->errlen, GGUF_EFORMAT,
                       "key '%s' has unknown value type %u", kv->key, type);
    kv->type = (gguf_vtype)type;
    if (type == GGUF_STRING) {
        gguf_str s;
        if (cur_str(c, &s, kv->key))
            return GGUF_EFORMAT;
        kv->val = (const uint8_t *)s.s;
        kv->len = s.len;
        return 0;
    }
    if (type != GGUF_ARRAY) {
        size_t sz = vtype_size(type);
        kv->val = c->p + c->pos;
        uint8_t tmp[8];
        if (cur_read(c, tmp, sz, kv->key))
            return GGUF_EFORMAT;
        if (type == GGUF_BOOL && tmp[0] > 1)
            return lkq_err(c->err, c->errlen, GGUF_EFORMAT,
                           "key '%s': invalid bool byte %u", kv->key, tmp[0]);
        return 0;
    }
    uint32_t et;
    uint64_t n;
    if (cur_u32(c, &et, kv->key) || cur_u64(c, &n, kv->key))
        return GGUF_EFORMAT;
    if (et == GGUF_ARRAY)
        return lkq_err(c->err, c->errlen, GGUF_EFORMAT,
                       "key '%s': nested arrays are not supported", kv->key);
    if (et > GGUF_FLOAT64)
        return lkq_err(c->err, c->errlen, GGUF_EFORMAT,
                       "key '%s': unknown array element type %u", kv->key, et);
    kv->etype = (gguf_vtype)et;
    kv->len = n;
    kv->val = c->p + c->pos;
    size_t left = c->size - c->pos;
    if (et != GGUF_STRING) {
        size_t sz = vtype_size(et);
        if (n > left / sz)
            return lkq_err(c->err, c->errlen, GGUF_EFORMAT,
                           "key '%s': array of %llu %s elements cannot fit in the %zu bytes left",
                        kv->key, (unsigned long long)n, gguf_vtype_name(et), left);
        if (et == GGUF_BOOL)
            for (uint64_t i = 0; i < n; i++)
                if (kv->val[i] > 1)
                    return lkq_err(c->err, c->errlen, GGUF_EFORMAT,
                                   "key '%s': invalid bool byte %u at element %llu",
                                kv->key, kv->val[i], (unsigned long long)i);
        c->pos += (size_t)n * sz;
        return 0;
    }
    if (n > left / 8) /* every string needs at least its 8-byte length */
        return lkq_err(c->err, c->errlen, GGUF_EFORMAT,
                       "key '%s': array of %llu strings cannot fit in the %zu bytes left",
                    kv->key, (unsigned long long)n, left);
    kv->str_off = malloc((n ? n : 1) * sizeof(uint64_t));
    if (!kv->str_off)
        return lkq_err(c->err, c->errlen, GGUF_EFORMAT, "out of memory for key '%s'", kv->key);
    size_t start = c->pos;
    for (uint64_t i = 0; i < n; i++) {
        gguf_str s;
        kv->str_off[i] = c->pos - start;
        if (cur_str(c, &s, kv->key))
            return GGUF_EFORMAT;
    }
    return 0;
}

static char *dup_name(const gguf_str *s)
{
    char *p = malloc((size_t)s->len + 1);
    if (p) {
        memcpy(p, s->s, (size_t)s->len);
        p[s->len] = 0;
    }
    return p;
}

static int cmp_kv(const void *a, const void *b)
{
    return strcmp((*(kv_entry *const *)a)->key, (*(kv_entry *const *)b)->key);
}

static int cmp_tname(const void *a, const void *b)
{
    return strcmp((*(gguf_tensor *const *)a)->name, (*(gguf_tensor *const *)b)->name);
}

static int cmp_toff(const void *a, const void *b)
{
    uint64_t x = (*(gguf_tensor *const *)a)->offset, y = (*(gguf_tensor *const *)b)->offset;
    return x < y ? -1 : x > y;
}

/* Parses one tensor info record into t (name copied). */
static int parse_tensor_info(cursor *c, gguf_tensor *t, int64_t idx)
{
    gguf_str name;
    char what[48];
    snprintf(what, sizeof(what), "tensor %lld name", (long long)idx);
    if (cur_str(c, &name, what))
        return GGUF_EFORMAT;
    if (name.len > MAX_NAME_LEN || !valid_name(name.s, name.len))
        return lkq_err(c->err, c->errlen, GGUF_EFORMAT,
                       "tensor %lld: name is empty, longer than %u bytes, not UTF-8 or holds NUL",
                    (long long)idx, MAX_NAME_LEN);
    if (!(t->name = dup_name(&name)))
        return lkq_err(c->err, c->errlen, GGUF_EFORMAT, "out of memory");
    uint32_t nd, type;
    if (cur_u32(c, &nd, t->name))
        return GGUF_EFORMAT;
    if (nd < 1 || nd > GGUF_MAX_DIMS)
        return lkq_err(c->err, c->errlen, GGUF_EFORMAT,
                       "tensor '%s': n_dims %u out of range 1..%d", t->name,
                    nd, GGUF_MAX_DIMS);
    t->n_dims = nd;
    int64_t n_elems = 1;
    for (int d = 0; d < GGUF_MAX_DIMS; d++) {
        uint64_t ne = 1;
        if ((uint32_t)d < nd && cur_u64(c, &ne, t->name))
            return GGUF_EFORMAT;
        if (ne < 1 || ne > (uint64_t)INT64_MAX)
            return lkq_err(c->err, c->errlen, GGUF_EFORMAT,
                           "tensor '%s': dimension %d is %lld (must be > 0)",
                        t->name, d, (long long)ne);
        if ((int64_t)ne > INT64_MAX / n_elems)
            return lkq_err(c->err, c->errlen, GGUF_EFORMAT,
                           "tensor '%s': element count overflows", t->name);
        t->ne[d] = (int64_t)ne;
        n_elems *= (int64_t)ne;
    }
    t->n_elems = n_elems;
    if (cur_u32(c, &type, t->name) || cur_u64(c, &t->offset, t->name))
        return GGUF_EFORMAT;
    if (!kt_type_valid(type))
        return lkq_err(c->err, c->errlen, GGUF_EFORMAT,
                       "tensor '%s': unsupported tensor type %u (%s); supported: " KT_SUPPORTED_NAMES,
                       t->name, type, gguf_type_name(type));
    t->type = (kt_type)type;
    int64_t be = kt_block_elems(t->type);
    if (t->ne[0] % be)
        return lkq_err(c->err, c->errlen, GGUF_EFORMAT,
                       "tensor '%s': row length %lld is not a multiple of %s block size %lld",
                    t->name, (long long)t->ne[0], kt_name(t->type), (long long)be);
    uint64_t nblocks = (uint64_t)(n_elems / be);
    if (nblocks > SIZE_MAX / kt_block_bytes(t->type))
        return lkq_err(c->err, c->errlen, GGUF_EFORMAT,
                       "tensor '%s': byte size overflows", t->name);
    t->nbytes = (size_t)nblocks * kt_block_bytes(t->type);
    return 0;
}

/* Validates the header at f->base / f->size and fills f. */
static int parse(gguf_file *f, char *err, size_t errlen)
{
    cursor c = {f->base, f->size, 0, err, errlen};
    char magic[4];
    uint64_t n_tensors, n_kv;
    if (cur_read(&c, magic, 4, "magic"))
        return GGUF_EFORMAT;
    if (memcmp(magic, "GGUF", 4))
        return lkq_err(err, errlen, GGUF_EFORMAT, "not a GGUF file (bad magic)");
    if (cur_u32(&c, &f->version, "version"))
        return GGUF_EFORMAT;
    if (f->version != 2 && f->version != 3)
        return lkq_err(err, errlen, GGUF_EFORMAT,
                       "unsupported GGUF version %u (need 2 or 3)", f->version);
    if (cur_u64(&c, &n_tensors, "n_tensors") || cur_u64(&c, &n_kv, "n_kv"))
        return GGUF_EFORMAT;
    /* A key/value takes >= 14 bytes (8 len, 1 key byte, 4 type, 1 value);
     * a tensor info >= 33 (8 len, 1 name byte, 4 n_dims, 8 ne, 4 type, 8 off). */
    size_t left = f->size - c.pos;
    if (n_kv > left / 14)
        return lkq_err(err, errlen, GGUF_EFORMAT, "n_kv %llu cannot fit in a %zu-byte file",
                    (unsigned long long)n_kv, f->size);
    if (n_tensors > left / 33)
        return lkq_err(err, errlen, GGUF_EFORMAT, "n_tensors %llu cannot fit in a %zu-byte file",
                    (unsigned long long)n_tensors, f->size);
    f->kv = calloc(n_kv ? n_kv : 1, sizeof(kv_entry));
    f->tensors = calloc(n_tensors ? n_tensors : 1, sizeof(gguf_tensor));
    f->kv_sorted = malloc((n_kv ? n_kv : 1) * sizeof(kv_entry *));
    f->t_sorted = malloc((n_tensors ? n_tensors : 1) * sizeof(gguf_tensor *));
    if (!f->kv || !f->tensors || !f->kv_sorted || !f->t_sorted)
        return lkq_err(err, errlen, GGUF_EFORMAT, "out of memory");

    for (uint64_t i = 0; i < n_kv; i++) {
        kv_entry *kv = &f->kv[i];
        gguf_str key;
        uint32_t type;
        char what[48];
        snprintf(what, sizeof(what), "key %llu", (unsigned long long)i);
        if (cur_str(&c, &key, what))
            return GGUF_EFORMAT;
        if (key.len > MAX_KEY_LEN || !valid_name(key.s, key.len))
            return lkq_err(err, errlen, GGUF_EFORMAT,
                           "key %llu at offset %zu: empty, too long, invalid UTF-8 or embedded NUL",
                        (unsigned long long)i, c.pos - (size_t)key.len - 8);
        if (!(kv->key = dup_name(&key)))
            return lkq_err(err, errlen, GGUF_EFORMAT, "out of memory");
        f->n_kv = (int64_t)i + 1; /* so that close frees it */
        if (cur_u32(&c, &type, kv->key) || parse_value(&c, kv, type))
            return GGUF_EFORMAT;
        f->kv_sorted[i] = kv;
    }
    qsort(f->kv_sorted, n_kv, sizeof(kv_entry *), cmp_kv);
    for (uint64_t i = 1; i < n_kv; i++)
        if (!strcmp(f->kv_sorted[i - 1]->key, f->kv_sorted[i]->key))
            return lkq_err(err, errlen, GGUF_EFORMAT, "duplicate key '%s'", f->kv_sorted[i]->key);

    f->alignment = GGUF_DEFAULT_ALIGNMENT;
    int64_t al;
    int rc = gguf_get_int(f, "general.alignment", 1, MAX_ALIGNMENT, &al, err, errlen);
    if (rc == GGUF_OK) {
        if (al & (al - 1))
            return lkq_err(err, errlen, GGUF_EFORMAT,
                           "general.alignment %lld is not a power of two", (long long)al);
        f->alignment = (size_t)al;
    } else if (rc != GGUF_EMISSING) {
        return GGUF_EFORMAT;
    }

    for (uint64_t i = 0; i < n_tensors; i++) {
        gguf_tensor *t = &f->tensors[i];
        f->n_tensors = (int64_t)i + 1;
        if (parse_tensor_info(&c, t, (int64_t)i))
            return GGUF_EFORMAT;
        if (t->offset % f->alignment)
            return lkq_err(err, errlen, GGUF_EFORMAT,
                           "tensor '%s': data offset %llu is not a multiple of the alignment %zu",
                        t->name, (unsigned long long)t->offset, f->alignment);
        f->t_sorted[i] = t;
    }
    if (n_tensors == 0)
        return 0;

    size_t data_start = c.pos + (f->alignment - c.pos % f->alignment) % f->alignment;
    if (data_start < c.pos || data_start > f->size)
        return lkq_err(err, errlen, GGUF_EFORMAT,
                       "truncated file: the tensor data section would start at %zu, past the end (%zu)",
                       
                    data_start, f->size);
    size_t data_size = f->size - data_start;
    for (uint64_t i = 0; i < n_tensors; i++) {
        gguf_tensor *t = &f->tensors[i];
        if (t->offset > data_size || t->nbytes > data_size - t->offset)
            return lkq_err(err, errlen, GGUF_EFORMAT,
                           "tensor '%s': data [%llu, +%zu) lies past the end of the file (data section is %zu bytes)",
                           
                        t->name, (unsigned long long)t->offset, t->nbytes, data_size);
        t->data = f->base + data_start + t->offset;
    }
    qsort(f->t_sorted, n_tensors, sizeof(gguf_tensor *), cmp_toff);
    for (uint64_t i = 1; i < n_tensors; i++) {
        const gguf_tensor *a = f->t_sorted[i - 1], *b = f->t_sorted[i];
        if (a->offset + a->nbytes > b->offset)
            return lkq_err(err, errlen, GGUF_EFORMAT,
                           "tensors '%s' and '%s' overlap in the file", a->name, b->name);
    }
    qsort(f->t_sorted, n_tensors, sizeof(gguf_tensor *), cmp_tname);
    for (uint64_t i = 1; i < n_tensors; i++)
        if (!strcmp(f->t_sorted[i - 1]->name, f->t_sorted[i]->name))
            return lkq_err(err, errlen, GGUF_EFORMAT,
                           "duplicate tensor name '%s'", f->t_sorted[i]->name);
    return 0;
}

void gguf_close(gguf_file *f)
{
    if (!f)
        return;
    if (f->kv)
        for (int64_t i = 0; i < f->n_kv; i++) {
            free(f->kv[i].key);
            free(f->kv[i].str_off);
        }
    if (f->tensors)
        for (int64_t i = 0; i < f->n_tensors; i++)
            free((char *)f->tensors[i].name);
    free(f->kv);
    free(f->tensors);
    free(f->kv_sorted);
    free(f->t_sorted);
    if (f->mapped)
        munmap((void *)f->base, f->size);
    free(f);
}

/* Shared tail of both opens: parse, or clean up everything on failure. */
static int finish_open(gguf_file *f, gguf_file **out, char *err, size_t errlen)
{
    int rc = parse(f, err, errlen);
    if (rc) {
        gguf_close(f);
        return rc;
    }
    *out = f;
    return 0;
}

int gguf_open_mem(const void *data, size_t size, gguf_file **out, char *err,
                  size_t errlen)
{
    *out = NULL;
    gguf_file *f = calloc(1, sizeof(*f));
    if (!f)
        return lkq_err(err, errlen, GGUF_EFORMAT, "out of memory");
    f->base = data;
    f->size = data ? size : 0;
    return finish_open(f, out, err, errlen);
}

int gguf_open(const char *path, gguf_file **out, char *err, size_t errlen)
{
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        lkq_err(err, errlen, GGUF_EFORMAT, "cannot open '%s': %s", path, strerror(errno));
        return GGUF_EIO;
    }
    struct stat st;
    if (fstat(fd, &st)) {
        lkq_err(err, errlen, GGUF_EFORMAT, "cannot stat '%s': %s", path, strerror(errno));
        close(fd);
        return GGUF_EIO;
    }
    if (!S_ISREG(st.st_mode) || st.st_size == 0) {
        if (S_ISDIR(st.st_mode))
            lkq_err(err, errlen, GGUF_EFORMAT, "'%s' is a directory, not a model file", path);
        else if (!S_ISREG(st.st_mode))
            lkq_err(err, errlen, GGUF_EFORMAT, "'%s' is not a regular file", path);
        else
            lkq_err(err, errlen, GGUF_EFORMAT, "'%s' is empty", path);
        close(fd);
        return GGUF_EIO;
    }
    void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);
    if (p == MAP_FAILED) {
        lkq_err(err, errlen, GGUF_EFORMAT, "cannot map '%s': %s", path, strerror(e));
        return GGUF_EIO;
    }
    gguf_file *f = calloc(1, sizeof(*f));
    if (!f) {
        munmap(p, (size_t)st.st_size);
        return lkq_err(err, errlen, GGUF_EFORMAT, "out of memory");
    }
    f->base = p;
    f->size = (size_t)st.st_size;
    f->mapped = 1;
    int rc = finish_open(f, out, err, errlen);
    if (rc && err && errlen) { /* prefix the path: "'x.gguf': reason" */
        char tmp[512];
        snprintf(tmp, sizeof(tmp), "%s", err);
        snprintf(err, errlen, "'%s': %s", path, tmp);
    }
    return rc;
}

uint32_t gguf_version(const gguf_file *f) { return f->version; }
size_t gguf_alignment(const gguf_file *f) { return f->alignment; }
size_t gguf_file_size(const gguf_file *f) { return f->size; }
int64_t gguf_n_kv(const gguf_file *f) { return f->n_kv; }
int64_t gguf_n_tensors(const gguf_file *f) { return f->n_tensors; }

static const kv_entry *find_kv(const gguf_file *f, const char *key)
{
    int64_t lo = 0, hi = f->n_kv;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        int c = strcmp(f->kv_sorted[mid]->key, key);
        if (c == 0)
            return f->kv_sorted[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

int64_t gguf_find_key(const gguf_file *f, const char *key)
{
    const kv_entry *kv = find_kv(f, key);
    return kv ? kv - f->kv : -1;
}

const char *gguf_key_at(const gguf_file *f, int64_t i)
{
    return i >= 0 && i < f->n_kv ? f->kv[i].key : NULL;
}

gguf_vtype gguf_kv_type(const gguf_file *f, int64_t i)
{
    return i >= 0 && i < f->n_kv ? f->kv[i].type : (gguf_vtype)-1;
}

/* Converts one integer/bool element at p to int64. */
static int load_int(gguf_vtype t, const uint8_t *p, int64_t *out)
{
    union { uint8_t u8; int8_t i8; uint16_t u16; int16_t i16; uint32_t u32;
            int32_t i32; uint64_t u64; int64_t i64; } v;
    switch (t) {
    case GGUF_UINT8: case GGUF_BOOL: memcpy(&v.u8, p, 1); *out = v.u8; return 0;
    case GGUF_INT8: memcpy(&v.i8, p, 1); *out = v.i8; return 0;
    case GGUF_UINT16: memcpy(&v.u16, p, 2); *out = v.u16; return 0;
    case GGUF_INT16: memcpy(&v.i16, p, 2); *out = v.i16; return 0;
    case GGUF_UINT32: memcpy(&v.u32, p, 4); *out = v.u32; return 0;
    case GGUF_INT32: memcpy(&v.i32, p, 4); *out = v.i32; return 0;
    case GGUF_INT64: memcpy(&v.i64, p, 8); *out = v.i64; return 0;
    case GGUF_UINT64:
        memcpy(&v.u64, p, 8);
        if (v.u64 > (uint64_t)INT64_MAX)
            return GGUF_ERANGE;
        *out = (int64_t)v.u64;
        return 0;
    default: return GGUF_ETYPE;
    }
}

/* Converts one float (or integer) element at p to double. */
static int load_float(gguf_vtype t, const uint8_t *p, double *out)
{
    if (t == GGUF_FLOAT32) {
        float v;
        memcpy(&v, p, 4);
        *out = v;
        return 0;
    }
    if (t == GGUF_FLOAT64) {
        memcpy(out, p, 8);
        return 0;
    }
    int64_t i;
    int rc = load_int(t, p, &i);
    if (rc == 0)
        *out = (double)i;
    return rc;
}

/* Looks key up; *rc = GGUF_OK or GGUF_EMISSING. */
static const kv_entry *lookup(const gguf_file *f, const char *key, int *rc)
{
    const kv_entry *kv = find_kv(f, key);
    *rc = kv ? GGUF_OK : GGUF_EMISSING;
    return kv;
}

/* Writes "key 'k' is <type>, expected <want>" and returns GGUF_ETYPE. */
static int type_err(const kv_entry *kv, const char *want, char *err, size_t errlen)
{
    lkq_err(err, errlen, GGUF_EFORMAT,
            "key '%s' is %s, expected %s", kv->key, gguf_vtype_name(kv->type), want);
    return GGUF_ETYPE;
}

int gguf_get_int(const gguf_file *f, const char *key, int64_t min, int64_t max,
                 int64_t *out, char *err, size_t errlen)
{
    int rc;
    const kv_entry *kv = lookup(f, key, &rc);
    if (!kv)
        return rc;
    int64_t v;
    rc = load_int(kv->type, kv->val, &v);
    if (rc == GGUF_ETYPE)
        return type_err(kv, "an integer", err, errlen);
    if (rc || v < min || v > max) {
        if (rc)
            lkq_err(err, errlen, GGUF_EFORMAT, "key '%s': value does not fit int64", key);
        else
            lkq_err(err, errlen, GGUF_EFORMAT, "key '%s' = %lld is out of range [%lld, %lld]", key,
                 (long long)v, (long long)min, (long long)max);
        return GGUF_ERANGE;
    }
    *out = v;
    return 0;
}

int gguf_get_float(const gguf_file *f, const char *key, double *out, char *err,
                   size_t errlen)
{
    int rc;
    const kv_entry *kv = lookup(f, key, &rc);
    if (!kv)
        return rc;
    rc = load_float(kv->type, kv->val, out);
    if (rc == GGUF_ETYPE)
        return type_err(kv, "a number", err, errlen);
    if (rc)
        lkq_err(err, errlen, GGUF_EFORMAT, "key '%s': value does not fit int64", key);
    return rc;
}

int gguf_get_bool(const gguf_file *f, const char *key, int *out, char *err,
                  size_t errlen)
{
    int rc;
    const kv_entry *kv = lookup(f, key, &rc);
    if (!kv)
        return rc;
    int64_t v;
    if (load_int(kv->type, kv->val, &v) != 0)
        return type_err(kv, "a bool", err, errlen);
    if (v != 0 && v != 1) {
        lkq_err(err, errlen, GGUF_EFORMAT, "key '%s' = %lld is not a bool", key, (long long)v);
        return GGUF_ERANGE;
    }
    *out = (int)v;
    return 0;
}

int gguf_get_str(const gguf_file *f, const char *key, gguf_str *out, char *err,
                 size_t errlen)
{
    int rc;
    const kv_entry *kv = lookup(f, key, &rc);
    if (!kv)
        return rc;
    if (kv->type != GGUF_STRING)
        return type_err(kv, "a string", err, errlen);
    out->s = (const char *)kv->val;
    out->len = kv->len;
    return 0;
}

int gguf_get_arr(const gguf_file *f, const char *key, gguf_arr *out, char *err,
                 size_t errlen)
{
    int rc;
    const kv_entry *kv = lookup(f, key, &rc);
    if (!kv)
        return rc;
    if (kv->type != GGUF_ARRAY)
        return type_err(kv, "an array", err, errlen);
    out->type = kv->etype;
    out->n = kv->len;
    out->data = kv->val;
    out->str_off = kv->str_off;
    return 0;
}

int gguf_arr_int(const gguf_arr *a, uint64_t i, int64_t *out)
{
    if (i >= a->n)
        return GGUF_ERANGE;
    if (a->type == GGUF_STRING)
        return GGUF_ETYPE;
    return load_int(a->type, a->data + i * vtype_size(a->type), out);
}

int gguf_arr_float(const gguf_arr *a, uint64_t i, double *out)
{
    if (i >= a->n)
        return GGUF_ERANGE;
    if (a->type == GGUF_STRING)
        return GGUF_ETYPE;
    return load_float(a->type, a->data + i * vtype_size(a->type), out);
}

int gguf_arr_str(const gguf_arr *a, uint64_t i, gguf_str *out)
{
    if (i >= a->n)
        return GGUF_ERANGE;
    if (a->type != GGUF_STRING || !a->str_off)
        return GGUF_ETYPE;
    const uint8_t *p = a->data + a->str_off[i];
    memcpy(&out->len, p, 8);
    out->s = (const char *)p + 8;
    return 0;
}

const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name)
{
    int64_t lo = 0, hi = f->n_tensors;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        int c = strcmp(f->t_sorted[mid]->name, name);
        if (c == 0)
            return f->t_sorted[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

const gguf_tensor *gguf_tensor_at(const gguf_file *f, int64_t i)
{
    return i >= 0 && i < f->n_tensors ? &f->tensors[i] : NULL;
}
