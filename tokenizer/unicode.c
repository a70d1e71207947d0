/*
 * unicode.c - strict UTF-8 codec and character classes for the tokenizers.
 * Class lookups: a 128-entry table for ASCII, binary search over the
 * generated ranges otherwise. Stateless; safe from any thread.
 */
#include "tokenizer/unicode.h"

#include "tokenizer/unicode_tables.h"

int uni_seq_len(unsigned char b)
{
    if (b < 0x80)
        return 1;
    if (b >= 0xC2 && b <= 0xDF)
        return 2;
    if (b >= 0xE0 && b <= 0xEF)
        return 3;
    if (b >= 0xF0 && b <= 0xF4)
        return 4;
    return 0;
}

int uni_decode(const unsigned char *s, size_t n, uint32_t *cp)
{
    unsigned char b = s[0];
    int len = uni_seq_len(b);
    if (len == 1) {
        *cp = b;
        return 1;
    }
    if (len == 0 || (size_t)len > n)
        goto bad;
    uint32_t c = b & (0xFFu >> (len + 1));
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80)
            goto bad;
        c = (c << 6) | (s[i] & 0x3Fu);
    }
    /* overlong forms, surrogates and values past U+10FFFF */
    if ((len == 3 && c < 0x800) || (len == 4 && (c < 0x10000 || c > 0x10FFFF)) ||
        (c >= 0xD800 && c <= 0xDFFF))
        goto bad;
    *cp = c;
    return len;
bad:
    *cp = UNI_INVALID;
    return 1;
}

int uni_encode(uint32_t cp, char *out)
{
    unsigned char *o = (unsigned char *)out;
    if (cp < 0x80) {
        o[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (unsigned char)(0xC0 | (cp >> 6));
        o[1] = (unsigned char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (unsigned char)(0xE0 | (cp >> 12));
        o[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (unsigned char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (unsigned char)(0xF0 | (cp >> 18));
    o[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (unsigned char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Binary search in the generated ranges. */
static unsigned class_lookup(uint32_t cp)
{
    size_t lo = 0, hi = sizeof(uni_range_cls) / sizeof(uni_range_cls[0]);
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cp < uni_ranges[mid][0])
            hi = mid;
        else if (cp > uni_ranges[mid][1])
            lo = mid + 1;
        else
            return uni_range_cls[mid];
    }
    return 0;
}

unsigned uni_class(uint32_t cp)
{
    if (cp < 128) { /* fast path, same answers as the tables */
        if ((cp | 0x20) >= 'a' && (cp | 0x20) <= 'z')
            return UNI_L;
        if (cp >= '0' && cp <= '9')
            return UNI_N;
        if (cp == ' ' || (cp >= 0x09 && cp <= 0x0D))
            return UNI_S;
        return 0;
    }
    return class_lookup(cp);
}

const char *uni_version(void)
{
    return UNI_VERSION;
}
