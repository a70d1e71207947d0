/*
 * unicode.h - the little Unicode the tokenizers need: strict UTF-8 decoding
 * and encoding, and the character classes of the pre-tokenizer regexes
 * (\p{L}, \p{N}, \s) from generated range tables (unicode_tables.h).
 *
 * Pure functions over read-only tables: safe from any thread.
 */
#ifndef LKQ_UNICODE_H
#define LKQ_UNICODE_H

#include <stddef.h>
#include <stdint.h>

enum { UNI_L = 1, UNI_N = 2, UNI_S = 4 };

/* Code point given to a byte that does not start a valid UTF-8 sequence. It
 * is outside Unicode, so it belongs to no class (like punctuation). */
#define UNI_INVALID 0x110000u

/* Decodes one character from s[0..n) (n >= 1). Returns the bytes consumed
 * (1..4) and writes the code point; a malformed sequence (bad lead byte,
 * truncated, overlong, surrogate, > U+10FFFF) consumes 1 byte and gives
 * UNI_INVALID. Never reads past n. */
int uni_decode(const unsigned char *s, size_t n, uint32_t *cp);

/* Writes the UTF-8 form of cp (<= U+10FFFF) to out[4]; returns its length. */
int uni_encode(uint32_t cp, char *out);

/* Class flags (UNI_L | UNI_N | UNI_S) of a code point. */
unsigned uni_class(uint32_t cp);

/* Length a UTF-8 sequence starting with lead byte b should have (2..4), 1 for
 * ASCII, 0 for a byte that cannot start a sequence. */
int uni_seq_len(unsigned char b);

/* Unicode version of the class tables, e.g. "14.0.0". */
const char *uni_version(void);

#endif
