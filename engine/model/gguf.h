/*
 * gguf.h - a bounds-checked reader for GGUF files (version 3, also 2).
 *
 * gguf_open() maps the file read-only and validates the whole header once:
 * every string, array, tensor shape, type and data range is checked against
 * the file size with overflow-safe arithmetic, keys and tensor names must be
 * valid UTF-8 without NUL and unique, tensor data must be aligned to
 * general.alignment (default 32), lie inside the file and not overlap. A file
 * that fails any check gives a negative return and a one-line reason; after a
 * successful open every accessor below is safe without further checks.
 *
 * Values are not copied: strings and arrays point into the mapping (they are
 * NOT NUL-terminated and may be unaligned; use the accessors). Tensor names
 * and keys are copied into NUL-terminated strings owned by the gguf_file.
 *
 * Layout reminder: "GGUF", u32 version, u64 n_tensors, u64 n_kv, then n_kv
 * (string key, u32 value type, value), then n_tensors (string name, u32
 * n_dims, u64 ne[n_dims], u32 type, u64 offset), padding to the alignment,
 * then the data section (tensor offsets are relative to its start). ne[0] is
 * the fastest-varying dimension (the row length).
 *
 * Threading: a gguf_file is immutable after open; any thread may read it.
 */
#ifndef LKQ_GGUF_H
#define LKQ_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/ktypes.h"

/* Metadata value types, numbered as in the file format. */
typedef enum {
    GGUF_UINT8 = 0,
    GGUF_INT8 = 1,
    GGUF_UINT16 = 2,
    GGUF_INT16 = 3,
    GGUF_UINT32 = 4,
    GGUF_INT32 = 5,
    GGUF_FLOAT32 = 6,
    GGUF_BOOL = 7,
    GGUF_STRING = 8,
    GGUF_ARRAY = 9,
    GGUF_UINT64 = 10,
    GGUF_INT64 = 11,
    GGUF_FLOAT64 = 12,
} gguf_vtype;

/* Return codes of the lookups (gguf_open returns GGUF_EFORMAT or GGUF_EIO). */
enum {
    GGUF_OK = 0,
    GGUF_EIO = -1,      /* cannot open / map the file */
    GGUF_EFORMAT = -2,  /* malformed file */
    GGUF_EMISSING = -3, /* key or tensor not present */
    GGUF_ETYPE = -4,    /* present, but of another type */
    GGUF_ERANGE = -5,   /* integer value outside the requested range */
};

#define GGUF_MAX_DIMS 4
#define GGUF_DEFAULT_ALIGNMENT 32

typedef struct gguf_file gguf_file;

/* A byte string inside the file (not NUL-terminated, may contain NUL). */
typedef struct {
    const char *s;
    uint64_t len;
} gguf_str;

/* An array value. Read elements with gguf_arr_*(); `data` is unaligned. */
typedef struct {
    gguf_vtype type;         /* element type (never GGUF_ARRAY) */
    uint64_t n;              /* element count */
    const uint8_t *data;     /* first element */
    const uint64_t *str_off; /* string arrays: offset of element i from data */
} gguf_arr;

typedef struct {
    const char *name; /* NUL-terminated, owned by the gguf_file */
    kt_type type;
    uint32_t n_dims;
    int64_t ne[GGUF_MAX_DIMS]; /* ne[0] = row length; unused dims are 1 */
    int64_t n_elems;
    const void *data;          /* into the mapping, aligned to the alignment */
    size_t nbytes;
    uint64_t offset;           /* relative to the data section */
} gguf_tensor;

/* Opens and validates path. Returns 0 and *out (free with gguf_close), or
 * GGUF_EIO / GGUF_EFORMAT with a one-line reason in err. */
int gguf_open(const char *path, gguf_file **out, char *err, size_t errlen);
/* Same over a caller-owned buffer that must outlive the gguf_file. */
int gguf_open_mem(const void *data, size_t size, gguf_file **out, char *err,
                  size_t errlen);
void gguf_close(gguf_file *f); /* NULL is a no-op */

uint32_t gguf_version(const gguf_file *f);
size_t gguf_alignment(const gguf_file *f);
size_t gguf_file_size(const gguf_file *f);
int64_t gguf_n_kv(const gguf_file *f);
int64_t gguf_n_tensors(const gguf_file *f);

/* Index of key (0..n_kv-1) or -1. */
int64_t gguf_find_key(const gguf_file *f, const char *key);
const char *gguf_key_at(const gguf_file *f, int64_t i); /* NULL if out of range */
gguf_vtype gguf_kv_type(const gguf_file *f, int64_t i);

/* Typed lookups by key. All return GGUF_OK, GGUF_EMISSING, GGUF_ETYPE or
 * GGUF_ERANGE, and on failure other than GGUF_EMISSING write a reason naming
 * the key into err (err may be NULL). *out is untouched on failure.
 * get_int: any integer type (and bool), coerced to int64 and required to lie
 *   in [min, max].
 * get_float: float32 or float64 (integers are accepted too).
 * get_bool: bool (or an integer 0/1).
 * get_str: a string value (pointer into the file). */
int gguf_get_int(const gguf_file *f, const char *key, int64_t min, int64_t max,
                 int64_t *out, char *err, size_t errlen);
int gguf_get_float(const gguf_file *f, const char *key, double *out, char *err,
                   size_t errlen);
int gguf_get_bool(const gguf_file *f, const char *key, int *out, char *err,
                  size_t errlen);
int gguf_get_str(const gguf_file *f, const char *key, gguf_str *out, char *err,
                 size_t errlen);
/* Any array; the caller checks out->type. */
int gguf_get_arr(const gguf_file *f, const char *key, gguf_arr *out, char *err,
                 size_t errlen);

/* Element access, i < a->n. Return 0, or GGUF_ETYPE when the element type
 * does not convert (get_int/float as for the scalar lookups), GGUF_ERANGE
 * when i is out of range or an integer does not fit int64. */
int gguf_arr_int(const gguf_arr *a, uint64_t i, int64_t *out);
int gguf_arr_float(const gguf_arr *a, uint64_t i, double *out);
int gguf_arr_str(const gguf_arr *a, uint64_t i, gguf_str *out);

/* Tensor by name (NULL if absent) or by index (NULL if out of range). */
const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name);
const gguf_tensor *gguf_tensor_at(const gguf_file *f, int64_t i);

/* Name of a GGML tensor type id ("Q4_K", ...) or "unknown"; covers types
 * this project cannot load, for error messages. */
const char *gguf_type_name(uint32_t type);
/* Name of a metadata value type ("uint32", "string", ...). */
const char *gguf_vtype_name(uint32_t t);

#endif
