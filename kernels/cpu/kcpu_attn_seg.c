/*
 * kcpu_attn_seg.c - front end of attention over a segmented KV history
 * (kcpu_attn_seg, see kcpu.h and kernels/kvq.h): FP32 / FP16 segments and
 * INT4 (KVS_Q4) blocks read in place, dequantization fused into the back
 * ends' dot products (kcpu_ops.attn_seg_item).
 *
 * Work is split as in kcpu_attn_f16: an item holds the query heads of one
 * KV head for a few tokens (up to KCPU_ATTN_QMAX queries), so every K/V
 * byte read serves all of them - or, with fewer tokens than fill an item
 * (decoding), those of several KV heads, so that an INT4 block's outlier
 * lists are scanned once for all; items are handed out through an atomic
 * counter, the causally longest first. When there are too few items for the
 * pool (decoding), the history - the segments' positions taken one segment
 * after the other in array order - is cut into ranges, each range gives a
 * partial softmax result (unnormalized output, running max, sum), and the
 * partials are merged afterwards. With a sliding window, segments wholly
 * before the first query's window take no part (a span of 0 in the walk),
 * and the items mask the rest per query.
 *
 * Threading: one call at a time per pool (kcpu.h); no allocation.
 */
#include "kernels/cpu/kcpu.h"
#include "kernels/cpu/kcpu_impl.h"

#include <math.h>
#include <stdatomic.h>
#include <stdint.h>

#define ALIGN_UP(v, a) (((v) + (a) - 1) / (a) * (a))
/* partial results kept per thread of the pool (items x splits) */
#define SEG_PART_SLOTS 8
/* most splits of the history per item */
#define SEG_MAX_SPLITS 128

static size_t part_floats(int head_dim)
{
    return (size_t)KCPU_ATTN_QMAX * ((size_t)head_dim + 2);
}

/* See kcpu.h: per thread, the back end's tmp and SEG_PART_SLOTS partial
 * results. */
size_t kcpu_attn_seg_scratch_bytes(int n_threads, const kvq_layout *L,
                                   int head_dim)
{
    if (n_threads < 1)
        n_threads = 1;
    if (head_dim < 1)
        head_dim = 1;
    size_t per = kcpu_attn_seg_tmp_floats(L, head_dim) + SEG_PART_SLOTS * part_floats(head_dim);
    return 64 + (size_t)n_threads * per * sizeof(float);
}

typedef struct {
    const kcpu_ops *ops;
    float *out;
    const float *q;
    int pos0, n_q, n_head, n_kv_head, head_dim;
    int window, lo; /* the sliding window (0: none); first visible position */
    const kvs_seg *segs;
    int n_segs;
    const kvq_layout *L;
    float scale;
    float *tmp;
    size_t tmp_floats;
    int group, hsub, n_hsub, tb, n_tb; /* as in kcpu.c's attn_ctx */
    int kn;                            /* KV heads per item */
    int n_pos;                         /* positions of all segments (spans) */
    int n_split;
    int split_v[SEG_MAX_SPLITS + 1]; /* split s covers [split_v[s], split_v[s+1]) */
    float *part; /* n_split > 1: per item and split, part_floats() */
    int n_items;
    atomic_int next;
} seg_ctx;

/* Fills item number base (before splitting) over the whole history:
 * token block tb (tokens j0 .. j0 + tb - 1), KV heads kh0 .. kh0 + kn - 1,
 * head subgroup hs of each; queries head-major. */
static void seg_fill(const seg_ctx *c, int base, kcpu_attn_seg_item *it)
{
    int n_kg = (c->n_kv_head + c->kn - 1) / c->kn; /* KV head groups */
    int per_tb = n_kg * c->n_hsub;
    int tb = c->n_tb - 1 - base / per_tb;
    int kg = base % per_tb / c->n_hsub, hs = base % c->n_hsub;
    int j0 = tb * c->tb, j1 = j0 + c->tb < c->n_q ? j0 + c->tb : c->n_q;
    int kh0 = kg * c->kn, kh1 = kh0 + c->kn < c->n_kv_head ? kh0 + c->kn : c->n_kv_head;
    it->nq = 0;
    for (int kvh = kh0; kvh < kh1; kvh++) {
        int h0 = kvh * c->group + hs * c->hsub;
        int h1 = h0 + c->hsub < (kvh + 1) * c->group ? h0 + c->hsub : (kvh + 1) * c->group;
        for (int j = j0; j < j1; j++)
            for (int h = h0; h < h1; h++) {
                size_t qo = ((size_t)j * (size_t)c->n_head + (size_t)h) * (size_t)c->head_dim;
                it->q[it->nq] = c->q + qo;
                it->o[it->nq] = c->out + qo;
                it->qpos[it->nq] = c->pos0 + j;
                it->kvh[it->nq] = kvh;
                it->nq++;
            }
    }
    it->ml = NULL;
    it->segs = c->segs;
    it->n_segs = c->n_segs;
    it->L = c->L;
    it->head_dim = c->head_dim;
    it->scale = c->scale;
    it->v0 = 0;
    it->v1 = c->n_pos;
    it->window = c->window;
    it->lo = c->lo;
}

static void seg_task(void *arg, int ith, int nth)
{
    (void)nth;
    seg_ctx *c = arg;
    float *tmp = c->tmp + (size_t)ith * c->tmp_floats;
    for (;;) {
        int i = atomic_fetch_add_explicit(&c->next, 1, memory_order_relaxed);
        if (i >= c->n_items)
            break;
        int split = i % c->n_split, base = i / c->n_split;
        kcpu_attn_seg_item it;
        seg_fill(c, base, &it);
        if (c->n_split > 1) {
            float *pp = c->part + ((size_t)base * (size_t)c->n_split + (size_t)split) *
                                      part_floats(c->head_dim);
            for (int q = 0; q < it.nq; q++)
                it.o[q] = pp + (size_t)q * (size_t)c->head_dim;
            it.ml = pp + (size_t)KCPU_ATTN_QMAX * (size_t)c->head_dim;
            it.v0 = c->split_v[split];
            it.v1 = c->split_v[split + 1];
        }
        c->ops->attn_seg_item(&it, tmp);
    }
}

/* Combines the split partials of every item into the outputs (a query that
 * saw no position in any split gets zeros). */
static void seg_merge(const seg_ctx *c)
{
    const int D = c->head_dim;
    size_t sstride = part_floats(D), ml_off = (size_t)KCPU_ATTN_QMAX * (size_t)D;
    for (int base = 0; base < c->n_items / c->n_split; base++) {
        kcpu_attn_seg_item it;
        seg_fill(c, base, &it);
        const float *pp = c->part + (size_t)base * (size_t)c->n_split * sstride;
        for (int q = 0; q < it.nq; q++) {
            float mx = -INFINITY, l = 0.0f;
            for (int s = 0; s < c->n_split; s++)
                mx = fmaxf(mx, pp[(size_t)s * sstride + ml_off + 2 * (size_t)q]);
            float *o = it.o[q];
            for (int d = 0; d < D; d++)
                o[d] = 0.0f;
            for (int s = 0; s < c->n_split; s++) {
                const float *ps = pp + (size_t)s * sstride;
                const float *ml = ps + ml_off + 2 * (size_t)q;
                if (ml[0] == -INFINITY)
                    continue; /* no visible position in this split */
                float w = expf(ml[0] - mx);
                l += w * ml[1];
                for (int d = 0; d < D; d++)
                    o[d] += w * ps[(size_t)q * (size_t)D + (size_t)d];
            }
            float inv = l > 0.0f ? 1.0f / l : 0.0f;
            for (int d = 0; d < D; d++)
                o[d] *= inv;
        }
    }
}

/* Cuts the history (segments in array order) into c->n_split parts of
 * about equal length; a cut that falls inside an INT4 block moves to the
 * block's nearer edge, so that no block is prepared twice. */
static void split_points(seg_ctx *c)
{
    int cum = 0, si = 0;
    c->split_v[0] = 0;
    for (int k = 1; k < c->n_split; k++) {
        int target = (int)((long long)k * c->n_pos / c->n_split), v = target;
        while (si < c->n_segs && cum + kcpu_seg_span(&c->segs[si], c->L, c->lo) <= target)
            cum += kcpu_seg_span(&c->segs[si++], c->L, c->lo);
        if (si < c->n_segs && c->segs[si].kind == KVS_Q4 && target > cum) {
            int end = cum + kcpu_seg_span(&c->segs[si], c->L, c->lo);
            v = target - cum <= end - target ? cum : end;
        }
        c->split_v[k] = v > c->split_v[k - 1] ? v : c->split_v[k - 1];
    }
    c->split_v[c->n_split] = c->n_pos;
}

/* See kcpu.h. ws: kcpu_attn_seg_scratch_bytes(kcpu_pool_size(p), L,
 * head_dim) bytes. */
void kcpu_attn_seg(kcpu_pool *p, float *out, const float *q, int pos0,
                   int n_q, int window, const kvs_seg *segs, int n_segs,
                   const kvq_layout *L, int n_head, int n_kv_head,
                   int head_dim, float scale, void *ws)
{
    if (n_q <= 0 || n_head <= 0 || n_kv_head <= 0 || head_dim <= 0)
        return;
    int nth = kcpu_pool_size(p);
    seg_ctx c = {
        .ops = kcpu_ops_active(), .out = out, .q = q, .pos0 = pos0, .n_q = n_q,
        .n_head = n_head, .n_kv_head = n_kv_head, .head_dim = head_dim,
        .window = window > 0 ? window : 0, .lo = kcpu_win_lo(pos0, window),
        .segs = segs, .n_segs = n_segs, .L = L, .scale = scale,
        .tmp = (float *)ALIGN_UP((uintptr_t)ws, 64),
        .tmp_floats = kcpu_attn_seg_tmp_floats(L, head_dim),
        .group = n_head / n_kv_head,
    };
    atomic_init(&c.next, 0);
    /* segments wholly before the first query's window count for nothing
     * (spans of 0): the splits and items cover the visible history only */
    for (int i = 0; i < n_segs; i++)
        c.n_pos += kcpu_seg_span(&segs[i], L, c.lo);
    c.n_hsub = (c.group + KCPU_ATTN_QMAX - 1) / KCPU_ATTN_QMAX;
    c.hsub = (c.group + c.n_hsub - 1) / c.n_hsub;
    c.tb = KCPU_ATTN_QMAX / c.hsub;
    c.tb = c.tb < n_q ? c.tb : n_q;
    c.n_tb = (n_q + c.tb - 1) / c.tb;
    /* few tokens (decoding): several KV heads per item, so that a block's
     * outlier lists and constants are read once for all of them */
    c.kn = KCPU_ATTN_QMAX / (c.hsub * c.tb);
    c.kn = c.kn < 1 ? 1 : c.kn < n_kv_head ? c.kn : n_kv_head;
    int items = c.n_tb * ((n_kv_head + c.kn - 1) / c.kn) * c.n_hsub;
    /* split the history when items are too few to keep every thread busy:
     * at least 256 positions per split, partials within the scratch */
    int n_split = 1;
    if (nth > 1 && items < 4 * nth) {
        n_split = (4 * nth + items - 1) / items;
        int by_len = c.n_pos / 256;
        int by_mem = nth * SEG_PART_SLOTS / items;
        n_split = n_split < by_len ? n_split : by_len;
        n_split = n_split < by_mem ? n_split : by_mem;
        n_split = n_split < SEG_MAX_SPLITS ? n_split : SEG_MAX_SPLITS;
        if (n_split < 1)
            n_split = 1;
    }
    c.n_split = n_split;
    split_points(&c);
    c.n_items = items * n_split;
    c.part = c.tmp + (size_t)nth * c.tmp_floats;
    kcpu_pool_run(p, seg_task, &c);
    if (n_split > 1)
        seg_merge(&c);
}
