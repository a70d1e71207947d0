/*
 * kcpu_impl.h - internal interface between the kcpu front end (kcpu.c:
 * dispatch, threading, scratch layout) and the per-ISA back ends
 * (kcpu_scalar.c: portable C; kcpu_avx2.c + kcpu_avx2_attn.c +
 * kcpu_avx2_kq.c: AVX2+FMA+F16C; kcpu_avx512.c, built twice, with and
 * without AVX512_VNNI: the quantized matmul of the newer weight types on
 * top of the AVX2 back end). Each ISA's files are compiled with its flags in
 * their own library and only called after a run-time check.
 *
 * Back-end functions are single-threaded and pure: the front end splits the
 * work (rows of a matmul, (token, head) pairs of attention) over the pool.
 */
#ifndef LKQ_KCPU_IMPL_H
#define LKQ_KCPU_IMPL_H

#include "kernels/ktypes.h"
#include "kernels/kvq.h"

/* Activations quantized to int8 per 32-element block, for integer dot
 * products against quantized weights (every kt_is_quant type; K-quants are
 * taken per 32-element sub-block). Tokens are packed in groups
 * of KCPU_XG so that a tile of up to KCPU_XG tokens finds the data of one
 * block side by side: for token t = g*KCPU_XG + u and block b, with
 * i = (g*nb + b)*KCPU_XG + u (kcpu_q8x_index):
 *   x[t][b*32 + j] ~= d[i] * qs[i*32 + j]
 *   s[i] = smul * d[i] * sum_j qs[i*32 + j]
 * where smul is -8 for Q4_0 and -16 for Q5_0 weights (their "q - 8",
 * "q - 16") and 1 otherwise.
 * Padding tokens of the last group are all zero. */
#define KCPU_XG 4

typedef struct {
    const int8_t *qs;
    const float *d;
    const float *s;
    int nb;    /* blocks per token row (n_cols / 32) */
    int n_tok;
} kcpu_q8x;

static inline size_t kcpu_q8x_index(int nb, int t, int b)
{
    return ((size_t)(t / KCPU_XG) * (size_t)nb + (size_t)b) * KCPU_XG +
           (size_t)(t % KCPU_XG);
}

/* The split (kcpu.h) at its default ratio. */
#define KCPU_XSPLIT_DEFAULT 3.0f

/* The split of one token's nb blocks, after quantize_x wrote them (qs, d,
 * s at the token's q8x index: block b at qs + b*KCPU_XG*32, d/s + b*KCPU_XG):
 * a block with exactly one code of magnitude >= kcpu_xsplit_code(ratio) =
 * ceil(127 / ratio) (its largest |x|, code +-127, while every other |x| is
 * below about amax / ratio) is requantized with d = second largest |x| /
 * 127 and the outlier's code 0; oj[b] = its column in the block and ov[b]
 * = its value, else oj[b] = 0xff. Returns the blocks split. Ratio <= 1:
 * none (kcpu_xsplit_code 128). */
int kcpu_xsplit_code(float ratio);
int kcpu_xsplit_token(const float *x, int nb, float smul, float ratio, int8_t *qs, float *d,
                      float *s, uint8_t *oj, float *ov);

/* Quantization rule shared by all back ends (and mirrored by the tests):
 * amax = max |x| over the block, d = amax / 127, id = d ? 1 / d : 0,
 * q = round-half-even(x * id). */

/* A quantized weight matrix repacked for integer GEMM (kcpu_rp_create):
 * rows in groups of KCPU_RP_RG (the last padded with zero rows), columns in
 * sub-blocks of `sub` (32, or 16 for Q6_K's 16-element scales). Group g,
 * sub-block j is one record at data + g * rg_bytes + j * sb_bytes:
 *   codes [sub / 4][KCPU_RP_RG][4] u8: row r's elements 4s .. 4s+3 of the
 *         sub-block at [s][r] (one 64-byte vector per 4 columns: the 16
 *         rows' 4-element dot products are the 16 int32 lanes of one
 *         vpdpbusd against 4 broadcast activation bytes);
 *   scale [KCPU_RP_RG] f32, bias [KCPU_RP_RG] f32;
 * so that the weight is w = scale * code + bias for every element (the
 * very f32 values kref_dequant_row forms; Q8_0 / Q6_K codes are q + 128).
 * The matmul of quantized activations (kcpu_q8x, smul 1) is then, per row
 * and token, sum over sub-blocks of
 *   scale * d_x * sum(code * q_x) + bias * xs,   xs = d_x * sum(q_x)
 * with xs per sub-block ([token][n_sb] floats). */
#define KCPU_RP_RG 16

struct kcpu_rp {
    kt_type t;
    int rows, cols, sub, n_sb, n_rg;
    size_t sb_bytes, rg_bytes;
    uint8_t *data; /* 64-byte aligned */
    void *mem;
};

/* Rows groups [g0, g1) x all tokens of a repacked matmul: y [n_tok][rows]. */
typedef void (*kcpu_mm_rp_fn)(const struct kcpu_rp *rp, const kcpu_q8x *xq, const float *xs,
                              float *y, int g0, int g1);
void kcpu_scalar_mm_rp(const struct kcpu_rp *rp, const kcpu_q8x *xq, const float *xs, float *y,
                       int g0, int g1);
#if defined(LKQ_HAVE_AVX512)
void kcpu_avx512vnni_mm_rp(const struct kcpu_rp *rp, const kcpu_q8x *xq, const float *xs,
                           float *y, int g0, int g1);
#endif
/* Codes 32 at a time of the blocks b0 .. b0+n-1 of a quantized row, with
 * the f32 factors: see kcpu_scalar.c. */
void kcpu_unpack_blocks(kt_type t, const void *row, int b0, int n, int8_t *wq, float *dw,
                        float *dw2, float *mw);

/* Attention work item: up to KCPU_ATTN_QMAX query vectors that share one KV
 * head (GQA group heads x a few tokens), over positions [p0, p1), walked in
 * tiles of kcpu_attn_kp(head_dim) positions with an online softmax (running
 * max and sum per query), so no score row of the full context is kept. */
#define KCPU_ATTN_QMAX 16
#define KCPU_ATTN_KPMAX 256
/* per-thread scratch of attn_item: scores of one tile [QMAX][KPMAX], then
 * room for the tile's K and V converted to f32 (KCPU_ATTN_TILE floats each;
 * used by the scalar back end, where conversion is expensive) */
#define KCPU_ATTN_TILE 4096
#define KCPU_ATTN_TMP_FLOATS (KCPU_ATTN_QMAX * KCPU_ATTN_KPMAX + 2 * KCPU_ATTN_TILE)

/* Positions per tile: a multiple of 8, about 8 KB of f16 keys (a tile holds
 * at most KCPU_ATTN_TILE elements when head_dim <= 512). */
static inline int kcpu_attn_kp(int d)
{
    int kp = 4096 / d / 8 * 8;
    return kp > KCPU_ATTN_KPMAX ? KCPU_ATTN_KPMAX : kp < 8 ? 8 : kp;
}

typedef struct {
    int nq;
    const float *q[KCPU_ATTN_QMAX]; /* [head_dim] each */
    float *o[KCPU_ATTN_QMAX];       /* [head_dim] each */
    int n_pos[KCPU_ATTN_QMAX];      /* query i sees positions < n_pos[i] */
    /* NULL: o gets the normalized result (p0 must be 0). Otherwise a partial
     * result over [p0, p1): o unnormalized, ml[2i] = max score (-inf when no
     * position is visible), ml[2i+1] = sum of exp(score - max). */
    float *ml;
    const uint16_t *k, *v;          /* the KV head at position 0 */
    size_t kv_stride;
    int p0, p1;
    int head_dim;
    float scale;
} kcpu_attn_item;

/* Attention work item over a segmented history (kcpu_attn_seg): up to
 * KCPU_ATTN_QMAX queries, query i reading KV head kvh[i] (queries of one
 * head are consecutive, heads ascending and contiguous), over the part
 * [v0, v1) of the history's positions taken segment after segment in array
 * order (segment i covers indices [sum of the spans before it, + its span),
 * kcpu_seg_span with the call's lo). Query i sees the positions <= qpos[i]
 * of every segment and, when window > 0, > qpos[i] - window
 * (kcpu_win_lo). o / ml as in kcpu_attn_item (a query that sees nothing at
 * all gets zeros). */
typedef struct {
    int nq;
    const float *q[KCPU_ATTN_QMAX];
    float *o[KCPU_ATTN_QMAX];
    int qpos[KCPU_ATTN_QMAX];
    int kvh[KCPU_ATTN_QMAX];
    float *ml;
    const kvs_seg *segs;
    int n_segs;
    const kvq_layout *L;  /* for KVS_Q4 segments */
    int head_dim;
    float scale;
    int v0, v1;
    int window;           /* 0: none; W > 0: the sliding window */
    int lo;               /* the call's first visible position (kcpu_seg_span) */
} kcpu_attn_seg_item;

/* Positions held by a segment (a KVS_Q4 block says it in its header;
 * never more than the layout's T). */
static inline int kcpu_seg_len(const kvs_seg *sg, const kvq_layout *L)
{
    if (sg->kind != KVS_Q4)
        return sg->n > 0 ? sg->n : 0;
    uint32_t n = kvq_chdr(sg->k)->n_tok;
    return n < (uint32_t)L->block_tokens ? (int)n : L->block_tokens;
}

/* First position a query at qpos sees: qpos - window + 1 with a sliding
 * window (window > 0), else 0 (may be negative: positions start at 0). */
static inline int kcpu_win_lo(int qpos, int window)
{
    return window > 0 ? qpos - window + 1 : 0;
}

/* Positions segment sg takes in the walk over a call's history: its
 * length, or 0 when it lies wholly before lo, the first position any query
 * of the call sees (such a segment is skipped: sliding windows). */
static inline int kcpu_seg_span(const kvs_seg *sg, const kvq_layout *L, int lo)
{
    int n = kcpu_seg_len(sg, L);
    return sg->pos0 + n <= lo ? 0 : n;
}

/* One K or V outlier of a block, relative to the item's KV head and the
 * block: token t, channel c in the head, and the exact value minus the
 * value the dense code stands for. */
typedef struct {
    int t, c;
    float delta;
} kcpu_kvq_out;

/* Per-thread scratch of attn_seg_item: offsets in floats, each a multiple
 * of 16 (64 bytes) from the 64-byte aligned start:
 *   sc    [QMAX][KPMAX]        scores / probabilities of a tile
 *   tile  [2][max(KCPU_ATTN_TILE, head_dim)]   K and V tiles as f32 (scalar
 *                              back end), per-row K scales (AVX2)
 *   qk    [QMAX][qk_stride]    per-query keys prepared for a block
 *   blk   [2][hd64]            a block's K scales and zeros, reordered
 *   vsc   [2][KPMAX][head_dim / 16 + 1]   V scales of a tile
 *   outs  [2][QMAX * out_cap + 1] kcpu_kvq_out  a block's outliers by head
 * (hd64 = head_dim rounded up to 64). */
typedef struct {
    size_t sc, tile, qk, qk_stride, blk, vsc, vs_len, outs, total;
} kcpu_seg_tmp;

static inline size_t kcpu_up16(size_t n)
{
    return (n + 15) / 16 * 16;
}

static inline kcpu_seg_tmp kcpu_seg_tmp_layout(const kvq_layout *L, int head_dim)
{
    kcpu_seg_tmp t;
    size_t hd64 = ((size_t)head_dim + 63) / 64 * 64;
    size_t tile = (size_t)head_dim > KCPU_ATTN_TILE ? (size_t)head_dim : KCPU_ATTN_TILE;
    t.sc = 0;
    t.tile = kcpu_up16((size_t)KCPU_ATTN_QMAX * KCPU_ATTN_KPMAX);
    t.qk = t.tile + kcpu_up16(2 * tile);
    t.qk_stride = 2 * hd64 + 16;
    t.blk = t.qk + (size_t)KCPU_ATTN_QMAX * t.qk_stride;
    t.vsc = t.blk + 2 * hd64;
    t.vs_len = kcpu_up16((size_t)KCPU_ATTN_KPMAX * ((size_t)head_dim / 16 + 1));
    t.outs = t.vsc + 2 * t.vs_len;
    t.total = t.outs + kcpu_up16(L ? 2 * (KCPU_ATTN_QMAX * (size_t)L->out_cap + 1) *
                                         (sizeof(kcpu_kvq_out) / sizeof(float)) : 0);
    return t;
}

static inline size_t kcpu_attn_seg_tmp_floats(const kvq_layout *L, int head_dim)
{
    return kcpu_seg_tmp_layout(L, head_dim).total;
}

typedef struct {
    const char *name;
    /* Quantizes one token row x[n_cols] (n_cols % 32 == 0) into the packed
     * layout: block b goes to qs + b*KCPU_XG*32, d[b*KCPU_XG], s[b*KCPU_XG]
     * (pointers already offset to the token). */
    void (*quantize_x)(const float *x, int n_cols, float smul, int8_t *qs,
                       float *d, float *s);
    /* y[t*n_rows + r] for r in [r0, r1), every token t: rows of W (a
     * kt_is_quant type, row_bytes apart) dotted with the quantized xq. */
    void (*mm_quant)(kt_type t, const void *W, size_t row_bytes,
                     const kcpu_q8x *xq, float *y, int n_rows, int r0, int r1);
    /* Same for F32/F16/BF16 weights against f32 x [n_tok, n_cols]. */
    void (*mm_float)(kt_type t, const void *W, size_t row_bytes,
                     const float *x, int n_cols, int n_tok, float *y,
                     int n_rows, int r0, int r1);
    /* One attention work item; tmp: KCPU_ATTN_TMP_FLOATS floats. */
    void (*attn_item)(const kcpu_attn_item *it, float *tmp);
    /* One segmented attention work item; tmp: kcpu_attn_seg_tmp_floats(). */
    void (*attn_seg_item)(const kcpu_attn_seg_item *it, float *tmp);
    void (*rmsnorm)(float *out, const float *x, const float *w, int n,
                    float eps);
    void (*softmax)(float *x, int n);
    void (*swiglu)(float *gate, const float *up, int n);
    void (*geglu)(float *gate, const float *up, int n);
    void (*dequant_row)(kt_type t, const void *row, float *out, int64_t n);
    void (*f32_to_f16)(uint16_t *dst, const float *src, int64_t n);
} kcpu_ops;

extern const kcpu_ops kcpu_scalar_ops;
/* The back end chosen at run time (kcpu.c). */
const kcpu_ops *kcpu_ops_active(void);
#if defined(LKQ_HAVE_AVX2)
extern const kcpu_ops kcpu_avx2_ops;
/* kcpu_avx2_attn.c */
void kcpu_avx2_attn_item(const kcpu_attn_item *it, float *tmp);
void kcpu_avx2_attn_seg_item(const kcpu_attn_seg_item *it, float *tmp);
/* kcpu_avx2_kq.c: mm_quant / dequant_row for Q4_K, Q5_K, Q6_K. */
void kcpu_avx2_mm_kq(kt_type t, const void *W, size_t row_bytes, const kcpu_q8x *xq,
                     float *y, int n_rows, int r0, int r1);
void kcpu_avx2_dequant_kq(kt_type t, const void *row, float *out, int64_t n);
#endif
#if defined(LKQ_HAVE_AVX512)
/* The AVX-512 back ends: kcpu_avx2_ops with mm_quant replaced by
 * kcpu_avx512.c's (defined in kcpu_avx2.c, beside the functions they
 * share). */
extern const kcpu_ops kcpu_avx512_ops, kcpu_avx512vnni_ops;
/* mm_quant of kcpu_avx512.c, compiled without and with AVX512_VNNI; types
 * it has no kernel for go to kcpu_avx2_ops.mm_quant. */
void kcpu_avx512_mm_quant(kt_type t, const void *W, size_t row_bytes, const kcpu_q8x *xq,
                          float *y, int n_rows, int r0, int r1);
void kcpu_avx512vnni_mm_quant(kt_type t, const void *W, size_t row_bytes,
                              const kcpu_q8x *xq, float *y, int n_rows, int r0, int r1);
#endif

#endif
