/*
 * test_gpu_backend.c - the CUDA op table (engine/backend/backend_cuda.c,
 * bk_cuda_ops) called directly, for what the graph's end-to-end tests
 * (test_gpu_forward, test_gpu_batch) cannot see:
 *  - the GEMM input conversion kept between matmuls (F16 / BF16 weights) is
 *    dropped by every op that writes its source: after add, add_bias,
 *    softcap, rmsnorm in place, glu, embed, rope and a matmul into it, a
 *    matmul of the same buffer is bit-identical to one that had to convert
 *    afresh (the current graph never reuses a buffer that way: this is the
 *    contract for the next graph that does);
 *  - a tensor uploaded twice (a tied output head) is held once;
 *  - exact mode: a quantized weight held in F32, its matmul an F32 GEMM;
 *  - refusals: quantized synthetic weights, a step before the pool, a
 *    token out of range, a matmul larger than planned (a window layer's
 *    attention is taken);
 *  - creation on a device that does not exist fails with a reason.
 * Exact comparisons only (the same device code on the same data).
 */
#include "tests/gpu/gpu_test.h"

#include <errno.h>

#include "engine/backend/backend.h"
#include "kernels/ref/kref.h"

static const bk_ops *O;

/* A tiny shape: dim 32, 2 heads of 16, hidden 48, vocab 40. */
static mdl_hparams tiny_hp(void)
{
    mdl_hparams hp;
    memset(&hp, 0, sizeof hp);
    hp.n_vocab = 40, hp.dim = 32, hp.hidden_dim = 48, hp.n_layers = 1, hp.n_heads = 2;
    hp.n_kv_heads = 1, hp.head_dim = 16, hp.n_rot = 16, hp.n_ctx_train = 64;
    hp.rope_theta = 10000.0f, hp.rope_freq_scale = 1.0f, hp.norm_eps = 1e-5f;
    hp.embd_scale = 1.0f, hp.attn_scale = 0.25f;
    return hp;
}

static void *mk_ex(const mdl_hparams *hp, int device, int exact)
{
    bk_config c = {hp, 8, 2, 8, 64, 1, 0, device, exact};
    void *be = NULL;
    gt_err[0] = '\0';
    int rc = O->create(&c, &be, gt_err, sizeof gt_err);
    if (device == 0)
        GT_CHECK(rc == 0, "create: %s", gt_err);
    return rc == 0 ? be : NULL;
}

static void *mk(const mdl_hparams *hp, int device)
{
    return mk_ex(hp, device, 0);
}

static float *vec(void *be, size_t n, float scale)
{
    float *h = malloc(n * sizeof(float)), *d = NULL;
    for (size_t i = 0; i < n; i++)
        h[i] = scale * gt_gauss();
    GT_OK(O->upload_vector(be, h, n, &d, gt_err, sizeof gt_err));
    free(h);
    return d;
}

/* y = W x for rows of x, read back (n rows of w_rows). */
static void mm(void *be, const bk_weight *w, const float *x, float *y, int n, float *host,
               size_t ny)
{
    GT_OK(O->matmul(be, w, x, y, n, gt_err, sizeof gt_err));
    GT_OK(O->read(be, host, y, ny, gt_err, sizeof gt_err));
}

/* After `what` wrote x, matmul(w, x) equals a matmul that converts afresh
 * (another input converted in between). */
static void check_fresh(void *be, const char *what, const bk_weight *w, const float *x,
                        const float *other, float *y, float *ya, float *yb)
{
    const int n = 4;
    const size_t ny = (size_t)n * 32;
    mm(be, w, x, y, n, ya, ny); /* may use a kept conversion */
    mm(be, w, other, y, n, yb, ny); /* converts `other`: x's conversion is gone */
    mm(be, w, x, y, n, yb, ny);
    GT_CHECK(memcmp(ya, yb, ny * sizeof(float)) == 0,
             "%s: a matmul of the written buffer used its stale F16 conversion", what);
}

static void case_conv_cache(void)
{
    const kt_type types[] = {KT_F16, KT_BF16};
    for (int ti = 0; ti < 2; ti++) {
        mdl_hparams hp = tiny_hp();
        void *be = mk(&hp, 0);
        if (!be)
            return;
        cfg_kv kv = cfg_kv_default();
        kv.mode = CFG_KV_FP16;
        kv.chunk_size = 32;
        kv.block_tokens = 32;
        kvc_dims kd = {1, 16, 16, NULL};
        kvc_pool_sizes sz = {{0, 0}, {16, 0}};
        GT_OK(O->pool_create(be, &kv, &kd, &sz, gt_err, sizeof gt_err));
        bk_weight *w = NULL, *w2 = NULL, *emb = NULL;
        /* w: 32 x 32 (x [4][32] -> y [4][32]); w2 writes into x */
        GT_OK(O->synth_weight(be, types[ti], 32, 32, 5, 0.5f, &w, gt_err, sizeof gt_err));
        GT_OK(O->synth_weight(be, types[ti], 32, 32, 6, 0.5f, &w2, gt_err, sizeof gt_err));
        GT_OK(O->synth_weight(be, KT_F32, 40, 32 * 4, 7, 1.0f, &emb, gt_err, sizeof gt_err));
        float *x = vec(be, 4 * 32, 1.0f), *other = vec(be, 4 * 32, 1.0f);
        float *b = vec(be, 32, 0.5f), *nw = vec(be, 32, 1.0f), *up = vec(be, 4 * 32, 1.0f);
        float *y = NULL;
        GT_OK(O->alloc(be, 4 * 32 * sizeof(float), (void **)&y, gt_err, sizeof gt_err));
        float *ya = malloc(4 * 32 * sizeof(float)), *yb = malloc(4 * 32 * sizeof(float));
        if (!w || !w2 || !emb || !x || !other || !y) {
            O->destroy(be);
            free(ya), free(yb);
            return;
        }
        /* a sequence's second step, one row at position 1 (embed and rope
         * read the step's token and position; at position 0 RoPE would be
         * the identity) */
        void *seq = NULL;
        int32_t tok = 3;
        GT_OK(O->seq_create(be, 32, &seq, gt_err, sizeof gt_err));
        for (int pos = 0; pos < 2 && seq; pos++) {
            bk_slice sl = {seq, 0, 1, pos, pos == 0};
            bk_step st = {&tok, 1, &sl, 1};
            if (pos == 1)
                O->kv_commit(seq);
            GT_OK(O->kv_begin(seq, pos, 1, pos == 0, gt_err, sizeof gt_err));
            GT_OK(O->step_begin(be, &st, gt_err, sizeof gt_err));
        }
        const bk_rope rp = {2, 16, 16, 1, 10000.0f, 1.0f, NULL};

        mm(be, w, x, y, 4, ya, 4 * 32); /* x's conversion is kept now */
        GT_OK(O->add(be, x, other, 4 * 32, gt_err, sizeof gt_err));
        check_fresh(be, "add", w, x, other, y, ya, yb);
        GT_OK(O->add_bias(be, x, b, 4, 32, gt_err, sizeof gt_err));
        check_fresh(be, "add_bias", w, x, other, y, ya, yb);
        GT_OK(O->softcap(be, x, 4 * 32, 1.5f, gt_err, sizeof gt_err));
        check_fresh(be, "softcap", w, x, other, y, ya, yb);
        GT_OK(O->rmsnorm(be, x, x, nw, 4, 32, 1e-5f, gt_err, sizeof gt_err));
        check_fresh(be, "rmsnorm in place", w, x, other, y, ya, yb);
        GT_OK(O->glu(be, x, up, 4, 32, MDL_ACT_GELU_TANH, gt_err, sizeof gt_err));
        check_fresh(be, "glu", w, x, other, y, ya, yb);
        GT_OK(O->matmul(be, w2, other, x, 4, gt_err, sizeof gt_err));
        check_fresh(be, "matmul into it", w, x, other, y, ya, yb);
        GT_OK(O->embed(be, emb, 0.5f, x, gt_err, sizeof gt_err)); /* 1 row of 128 = all x */
        check_fresh(be, "embed", w, x, other, y, ya, yb);
        GT_OK(O->rope(be, x, 32, &rp, gt_err, sizeof gt_err)); /* row 0 of x */
        check_fresh(be, "rope", w, x, other, y, ya, yb);
        O->kv_abort(seq);
        O->seq_destroy(seq);
        O->destroy(be);
        free(ya), free(yb);
    }
}

static void case_upload_and_refusals(void)
{
    mdl_hparams hp = tiny_hp();
    void *be = mk(&hp, 0);
    if (!be)
        return;
    /* the same tensor twice (a tied head): held once */
    float *data = malloc(40 * 32 * sizeof(float));
    for (int i = 0; i < 40 * 32; i++)
        data[i] = gt_gauss();
    mdl_weight mw = {KT_F32, data, 32, 40};
    bk_weight *a = NULL, *b = NULL;
    size_t bytes0 = 0, bytes1 = 0;
    GT_OK(O->upload_weight(be, &mw, &a, gt_err, sizeof gt_err));
    GT_OK(O->ctl(be, BK_CTL_WEIGHT_BYTES, &bytes0, gt_err, sizeof gt_err));
    GT_OK(O->upload_weight(be, &mw, &b, gt_err, sizeof gt_err));
    GT_OK(O->ctl(be, BK_CTL_WEIGHT_BYTES, &bytes1, gt_err, sizeof gt_err));
    GT_CHECK(a && a == b && bytes0 == 40 * 32 * 4 && bytes1 == bytes0,
             "a tensor uploaded twice: %p %p, %zu then %zu bytes", (void *)a, (void *)b, bytes0,
             bytes1);
    /* refusals, each with a reason */
    bk_weight *q = NULL;
    gt_err[0] = '\0';
    GT_CHECK(O->synth_weight(be, KT_Q4_0, 4, 32, 1, 0, &q, gt_err, sizeof gt_err) == -EINVAL &&
                 gt_err[0] && !q,
             "a Q4_0 synthetic weight: %s", gt_err);
    int32_t tok = 1;
    bk_step st = {&tok, 1, NULL, 0};
    gt_err[0] = '\0';
    GT_CHECK(O->step_begin(be, &st, gt_err, sizeof gt_err) == -EINVAL && strstr(gt_err, "pool"),
             "a step before the pool: %s", gt_err);
    cfg_kv kv = cfg_kv_default();
    kv.mode = CFG_KV_FP16;
    kv.chunk_size = 32;
    kv.block_tokens = 32;
    kvc_dims kd = {1, 16, 16, NULL};
    kvc_pool_sizes sz = {{0, 0}, {16, 0}};
    GT_OK(O->pool_create(be, &kv, &kd, &sz, gt_err, sizeof gt_err));
    void *seq = NULL;
    GT_OK(O->seq_create(be, 32, &seq, gt_err, sizeof gt_err));
    GT_OK(O->kv_begin(seq, 0, 1, 1, gt_err, sizeof gt_err));
    tok = 40; /* n_vocab */
    bk_slice sl = {seq, 0, 1, 0, 1};
    st = (bk_step){&tok, 1, &sl, 1};
    gt_err[0] = '\0';
    GT_CHECK(O->step_begin(be, &st, gt_err, sizeof gt_err) == -EINVAL && strstr(gt_err, "range"),
             "token 40 of 40: %s", gt_err);
    tok = 1;
    GT_OK(O->step_begin(be, &st, gt_err, sizeof gt_err));
    float *x = NULL, *y = NULL;
    GT_OK(O->alloc(be, 16 * 32 * sizeof(float), (void **)&x, gt_err, sizeof gt_err));
    GT_OK(O->alloc(be, 16 * 40 * sizeof(float), (void **)&y, gt_err, sizeof gt_err));
    bk_weight *h = NULL;
    GT_OK(O->synth_weight(be, KT_F16, 40, 32, 3, 0, &h, gt_err, sizeof gt_err));
    gt_err[0] = '\0';
    GT_CHECK(O->matmul(be, h, x, y, 16, gt_err, sizeof gt_err) == -EINVAL && gt_err[0],
             "a matmul of 16 rows in an instance for 8: %s", gt_err);
    bk_attn at = {2, 1, 16, 0.25f, 8}; /* a sliding window: taken (no refusal) */
    GT_OK(O->attention(be, 0, &at, x, y, x, x, gt_err, sizeof gt_err));
    O->kv_abort(seq);
    O->seq_destroy(seq);
    O->destroy(be);
    free(data);
    /* a device that does not exist */
    gt_err[0] = '\0';
    GT_CHECK(mk(&hp, 99) == NULL && strstr(gt_err, "device"), "device 99: %s", gt_err);
}

/* Exact mode (bk_config.exact): a Q8_0 weight is held as F32 (4 bytes per
 * element) and the matmul is an F32 GEMM over the exactly dequantized
 * values: within 1e-6 of sum |w x| of the double product (the fast mode's
 * F16 inputs are ~1e-3 off). */
static void case_exact(void)
{
    mdl_hparams hp = tiny_hp();
    void *be = mk_ex(&hp, 0, 1);
    if (!be)
        return;
    const int rows = 40, cols = 32;
    const size_t rb = kt_row_bytes(KT_Q8_0, cols);
    uint8_t *q = malloc(rb * rows);
    for (int r = 0; r < rows; r++) {
        uint16_t d = kt_f32_to_f16(0.01f + 0.001f * r);
        memcpy(q + r * rb, &d, 2);
        for (int j = 0; j < cols; j++)
            q[r * rb + 2 + j] = (uint8_t)(int8_t)(gt_gauss() * 40.0f);
    }
    mdl_weight mw = {KT_Q8_0, q, cols, rows};
    bk_weight *w = NULL;
    size_t bytes = 0;
    GT_OK(O->upload_weight(be, &mw, &w, gt_err, sizeof gt_err));
    GT_OK(O->ctl(be, BK_CTL_WEIGHT_BYTES, &bytes, gt_err, sizeof gt_err));
    GT_CHECK(bytes == (size_t)rows * cols * 4, "exact mode holds %zu bytes for a %dx%d weight",
             bytes, rows, cols);
    const int n = 3;
    float xh[3 * 32], yh[3 * 40], wr[32];
    for (int i = 0; i < n * cols; i++)
        xh[i] = gt_gauss();
    float *x = NULL, *y = NULL;
    GT_OK(O->upload_vector(be, xh, (size_t)n * cols, &x, gt_err, sizeof gt_err));
    GT_OK(O->alloc(be, sizeof yh, (void **)&y, gt_err, sizeof gt_err));
    mm(be, w, x, y, n, yh, (size_t)n * rows);
    for (int r = 0; r < rows; r++) {
        kref_dequant_row(KT_Q8_0, q + r * rb, wr, cols);
        for (int t = 0; t < n; t++) {
            double acc = 0, mag = 0;
            for (int j = 0; j < cols; j++) {
                acc += (double)wr[j] * xh[t * cols + j];
                mag += fabs((double)wr[j] * xh[t * cols + j]);
            }
            GT_CHECK(fabs(yh[t * rows + r] - acc) <= 1e-6 * mag + 1e-30,
                     "exact matmul row %d token %d: %g vs %g", r, t, yh[t * rows + r], acc);
        }
    }
    O->destroy(be);
    free(q);
}

int main(void)
{
    gt_begin("test_gpu_backend");
    char why[256] = "";
    O = bk_find(BK_DEVICE_CUDA, why, sizeof why);
    if (!O) {
        printf("test_gpu_backend: %s\n", why);
        return 1;
    }
    gt_case("conv_cache", case_conv_cache);
    gt_case("upload_and_refusals", case_upload_and_refusals);
    gt_case("exact", case_exact);
    return gt_end();
}
