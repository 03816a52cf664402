/* layers_test.c: every layer kind runs and matches a naive reference written here; bad add_* calls are
   refused with messages that name the layer. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "trtshim.h"

static int failures;
#define CHECK(cond, ...)                                                                             \
    do {                                                                                             \
        if (!(cond)) {                                                                               \
            failures++;                                                                              \
            fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond);                 \
            fprintf(stderr, __VA_ARGS__);                                                            \
            fprintf(stderr, " [last error: %s]\n", trtshim_last_error());                            \
        }                                                                                            \
    } while (0)
#define OK(call) CHECK((call) == TRTSHIM_OK, "%s", #call)

static uint64_t rng = 88172645463325252ull;
static float rnd(void) { /* uniform in [-1, 1) */
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (float)(rng >> 40) / (float)(1 << 23) - 1.0f;
}
static float *rand_array(int64_t n) {
    float *p = malloc(sizeof(float) * (size_t)(n ? n : 1));
    for (int64_t i = 0; i < n; i++) p[i] = rnd();
    return p;
}
static trtshim_weights f32w(const float *v, int64_t n) { return (trtshim_weights){TRTSHIM_FLOAT32, v, n}; }

/* Builds (float32 weights, 2 threads), binds "a" (and "b" when given) and "y", runs. Returns the status. */
static int build_run(trtshim_network *n, const void *a, uint64_t abytes, const void *b, uint64_t bbytes, float *y,
                     uint64_t ybytes) {
    trtshim_build_config cfg;
    trtshim_build_config_default(&cfg);
    cfg.num_threads = 2;
    trtshim_engine *e = NULL;
    int st = trtshim_build(n, &cfg, &e);
    trtshim_context *c = NULL;
    if (!st) st = trtshim_context_create(e, &c);
    if (!st) st = trtshim_context_set_tensor(c, "a", (void *)a, abytes);
    if (!st && b) st = trtshim_context_set_tensor(c, "b", (void *)b, bbytes);
    if (!st) st = trtshim_context_set_tensor(c, "y", y, ybytes);
    if (!st) st = trtshim_context_execute(c);
    trtshim_context_destroy(c);
    trtshim_engine_destroy(e);
    trtshim_network_destroy(n);
    return st;
}

static void expect_close(const char *what, const float *got, const double *want, int64_t n) {
    int bad = 0;
    for (int64_t i = 0; i < n; i++) {
        double tol = 1e-4 + 1e-4 * fabs(want[i]);
        if (!(fabs((double)got[i] - want[i]) <= tol) && !(isnan(got[i]) && isnan(want[i]))) {
            if (bad < 3) fprintf(stderr, "  %s[%lld]: got %.7g, want %.7g\n", what, (long long)i, got[i], want[i]);
            bad++;
        }
    }
    CHECK(bad == 0, "%s: %d of %lld values differ", what, bad, (long long)n);
}

static trtshim_network *net_with_input(int32_t rank, const int64_t *dims, int32_t *a) {
    trtshim_network *n;
    trtshim_network_create(&n);
    OK(trtshim_network_add_input(n, "a", TRTSHIM_FLOAT32, rank, dims, a));
    return n;
}

static void test_fully_connected(void) {
    int64_t d[3] = {2, 3, 5};
    int32_t a, t;
    float *x = rand_array(30), *w = rand_array(20), *b = rand_array(4), y[24];
    trtshim_network *n = net_with_input(3, d, &a);
    trtshim_weights kw = f32w(w, 20), bw = f32w(b, 4);
    OK(trtshim_network_add_fully_connected(n, "fc", a, 4, &kw, &bw, &t));
    OK(trtshim_network_mark_output(n, t, "y"));
    OK(build_run(n, x, 120, NULL, 0, y, sizeof(y)));
    double want[24];
    for (int r = 0; r < 6; r++)
        for (int o = 0; o < 4; o++) {
            double s = b[o];
            for (int k = 0; k < 5; k++) s += (double)x[r * 5 + k] * w[o * 5 + k];
            want[r * 4 + o] = s;
        }
    expect_close("fully_connected", y, want, 24);
    free(x), free(w), free(b);
}

/* C = op(A) op(B) with A [batchA..., ...], B [batchB...] broadcast; both as inputs or B as constant. */
static void test_matmul(int b_const, int ta, int tb) {
    int64_t da[3] = {2, ta ? 4 : 3, ta ? 3 : 4}, db[3] = {1, tb ? 5 : 4, tb ? 4 : 5};
    int32_t a, b, t;
    float *x = rand_array(24), *w = rand_array(20), y[30];
    trtshim_network *n = net_with_input(3, da, &a);
    if (b_const) {
        trtshim_weights cw = f32w(w, 20);
        OK(trtshim_network_add_constant(n, "B", 3, db, &cw, &b));
    } else {
        OK(trtshim_network_add_input(n, "b", TRTSHIM_FLOAT32, 3, db, &b));
    }
    OK(trtshim_network_add_matrix_multiply(n, "mm", a, ta, b, tb, &t));
    OK(trtshim_network_mark_output(n, t, "y"));
    OK(build_run(n, x, 96, b_const ? NULL : w, 80, y, sizeof(y)));
    double want[30];
    for (int bi = 0; bi < 2; bi++)
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < 5; j++) {
                double s = 0;
                for (int k = 0; k < 4; k++) {
                    float av = ta ? x[bi * 12 + k * 3 + i] : x[bi * 12 + i * 4 + k];
                    float bv = tb ? w[j * 4 + k] : w[k * 5 + j];
                    s += (double)av * bv;
                }
                want[bi * 15 + i * 5 + j] = s;
            }
    char what[64];
    snprintf(what, sizeof(what), "matmul const=%d ta=%d tb=%d", b_const, ta, tb);
    expect_close(what, y, want, 30);
    free(x), free(w);
}

static void test_convolution(int groups, int stride, int pad, int dil) {
    int64_t N = 2, C = 4, H = 7, W = 6, OC = 6, KH = 3, KW = 2;
    int64_t d[4] = {N, C, H, W};
    int64_t OH = (H + 2 * pad - dil * (KH - 1) - 1) / stride + 1, OW = (W + 2 * pad - dil * (KW - 1) - 1) / stride + 1;
    int64_t icg = C / groups, ocg = OC / groups, yn = N * OC * OH * OW;
    int32_t a, t;
    float *x = rand_array(N * C * H * W), *w = rand_array(OC * icg * KH * KW), *b = rand_array(OC);
    float *y = malloc(sizeof(float) * (size_t)yn);
    double *want = malloc(sizeof(double) * (size_t)yn);
    trtshim_network *n = net_with_input(4, d, &a);
    trtshim_conv_params p = {(int32_t)OC, (int32_t)KH, (int32_t)KW, stride, stride, pad, pad, pad, pad, dil, dil, groups};
    trtshim_weights kw = f32w(w, OC * icg * KH * KW), bw = f32w(b, OC);
    OK(trtshim_network_add_convolution(n, "conv", a, &p, &kw, &bw, &t));
    OK(trtshim_network_mark_output(n, t, "y"));
    OK(build_run(n, x, sizeof(float) * (size_t)(N * C * H * W), NULL, 0, y, sizeof(float) * (size_t)yn));
    for (int64_t ni = 0; ni < N; ni++)
        for (int64_t o = 0; o < OC; o++)
            for (int64_t oh = 0; oh < OH; oh++)
                for (int64_t ow = 0; ow < OW; ow++) {
                    double s = b[o];
                    int64_t g = o / ocg;
                    for (int64_t c = 0; c < icg; c++)
                        for (int64_t i = 0; i < KH; i++)
                            for (int64_t j = 0; j < KW; j++) {
                                int64_t h = oh * stride - pad + i * dil, ww = ow * stride - pad + j * dil;
                                if (h < 0 || h >= H || ww < 0 || ww >= W) continue;
                                s += (double)x[((ni * C + g * icg + c) * H + h) * W + ww] *
                                     w[((o * icg + c) * KH + i) * KW + j];
                            }
                    want[((ni * OC + o) * OH + oh) * OW + ow] = s;
                }
    expect_close("convolution", y, want, yn);
    free(x), free(w), free(b), free(y), free(want);
}

static void test_elementwise_and_unary(void) {
    int64_t da[3] = {2, 1, 3}, db[2] = {4, 1};
    float *x = rand_array(6), *z = rand_array(4), y[24];
    for (int op = 0; op <= TRTSHIM_ELEMENTWISE_MAX; op++) {
        int32_t a, b, t;
        trtshim_network *n = net_with_input(3, da, &a);
        OK(trtshim_network_add_input(n, "b", TRTSHIM_FLOAT32, 2, db, &b));
        OK(trtshim_network_add_elementwise(n, "ew", a, b, (trtshim_elementwise_op)op, &t));
        OK(trtshim_network_mark_output(n, t, "y"));
        /* pow needs a positive base */
        float xa[6];
        for (int i = 0; i < 6; i++) xa[i] = op == TRTSHIM_ELEMENTWISE_POW ? fabsf(x[i]) + 0.1f : x[i];
        OK(build_run(n, xa, 24, z, 16, y, sizeof(y)));
        double want[24];
        for (int i = 0; i < 2; i++)
            for (int j = 0; j < 4; j++)
                for (int k = 0; k < 3; k++) {
                    double p = xa[i * 3 + k], q = z[j], r = 0;
                    switch (op) {
                    case 0: r = p + q; break;
                    case 1: r = p - q; break;
                    case 2: r = p * q; break;
                    case 3: r = p / q; break;
                    case 4: r = pow(p, q); break;
                    case 5: r = fmin(p, q); break;
                    case 6: r = fmax(p, q); break;
                    }
                    want[(i * 4 + j) * 3 + k] = r;
                }
        char what[32];
        snprintf(what, sizeof(what), "elementwise op %d", op);
        expect_close(what, y, want, 24);
    }
    for (int op = 0; op <= TRTSHIM_UNARY_LOG; op++) {
        int64_t d[1] = {16};
        int32_t a, t;
        float xv[16], yv[16];
        for (int i = 0; i < 16; i++) xv[i] = (op == TRTSHIM_UNARY_SQRT || op == TRTSHIM_UNARY_LOG) ? 0.1f + i * 0.3f : -4.0f + i * 0.53f;
        trtshim_network *n = net_with_input(1, d, &a);
        OK(trtshim_network_add_unary(n, "u", a, (trtshim_unary_op)op, &t));
        OK(trtshim_network_mark_output(n, t, "y"));
        OK(build_run(n, xv, 64, NULL, 0, yv, 64));
        double want[16];
        for (int i = 0; i < 16; i++) {
            double v = xv[i], r = v;
            switch (op) {
            case 1: r = v > 0 ? v : 0; break;
            case 2: r = v * 0.5 * (1 + erf(v / sqrt(2.0))); break;
            case 3: r = v * 0.5 * (1 + tanh(sqrt(2 / M_PI) * (v + 0.044715 * v * v * v))); break;
            case 4: r = v / (1 + exp(-v)); break;
            case 5: r = 1 / (1 + exp(-v)); break;
            case 6: r = tanh(v); break;
            case 7: r = v * fmin(fmax(v + 3, 0), 6) / 6; break;
            case 8: r = fmax(0, fmin(1, v / 6 + 0.5)); break;
            case 9: r = exp(v); break;
            case 10: r = sqrt(v); break;
            case 11: r = 1 / v; break;
            case 12: r = -v; break;
            case 13: r = erf(v); break;
            case 14: r = fabs(v); break;
            case 15: r = log(v); break;
            }
            want[i] = r;
        }
        char what[32];
        snprintf(what, sizeof(what), "unary op %d", op);
        expect_close(what, yv, want, 16);
    }
    free(x), free(z);
}

static void test_norms_and_softmax(void) {
    int64_t d[3] = {2, 3, 4};
    float *x = rand_array(24), *sc = rand_array(12), *sh = rand_array(12), y[24];
    double want[24];
    int32_t a, t;
    /* softmax over axis 1 */
    trtshim_network *n = net_with_input(3, d, &a);
    OK(trtshim_network_add_softmax(n, "sm", a, 1, &t));
    OK(trtshim_network_mark_output(n, t, "y"));
    OK(build_run(n, x, 96, NULL, 0, y, 96));
    for (int i = 0; i < 2; i++)
        for (int k = 0; k < 4; k++) {
            double s = 0;
            for (int j = 0; j < 3; j++) s += exp(x[i * 12 + j * 4 + k]);
            for (int j = 0; j < 3; j++) want[i * 12 + j * 4 + k] = exp(x[i * 12 + j * 4 + k]) / s;
        }
    expect_close("softmax", y, want, 24);
    /* layer norm over the last two dimensions */
    n = net_with_input(3, d, &a);
    trtshim_weights sw = f32w(sc, 12), hw = f32w(sh, 12);
    OK(trtshim_network_add_layer_norm(n, "ln", a, -2, 1e-5f, &sw, &hw, &t));
    OK(trtshim_network_mark_output(n, t, "y"));
    OK(build_run(n, x, 96, NULL, 0, y, 96));
    for (int i = 0; i < 2; i++) {
        double m = 0, v = 0;
        for (int j = 0; j < 12; j++) m += x[i * 12 + j] / 12.0;
        for (int j = 0; j < 12; j++) v += (x[i * 12 + j] - m) * (x[i * 12 + j] - m) / 12.0;
        for (int j = 0; j < 12; j++) want[i * 12 + j] = (x[i * 12 + j] - m) / sqrt(v + 1e-5) * sc[j] + sh[j];
    }
    expect_close("layer_norm", y, want, 24);
    /* rms norm over the last dimension */
    n = net_with_input(3, d, &a);
    trtshim_weights rw = f32w(sc, 4);
    OK(trtshim_network_add_rms_norm(n, "rms", a, 1e-6f, &rw, &t));
    OK(trtshim_network_mark_output(n, t, "y"));
    OK(build_run(n, x, 96, NULL, 0, y, 96));
    for (int r = 0; r < 6; r++) {
        double q = 0;
        for (int j = 0; j < 4; j++) q += (double)x[r * 4 + j] * x[r * 4 + j] / 4.0;
        for (int j = 0; j < 4; j++) want[r * 4 + j] = x[r * 4 + j] / sqrt(q + 1e-6) * sc[j];
    }
    expect_close("rms_norm", y, want, 24);
    /* batch norm (not after a convolution, so not folded) over channels = dimension 1 */
    n = net_with_input(3, d, &a);
    float var[3] = {0.5f, 1.5f, 2.0f};
    trtshim_weights bs = f32w(sc, 3), bh = f32w(sh, 3), bm = f32w(sc + 3, 3), bv = f32w(var, 3);
    OK(trtshim_network_add_batch_norm(n, "bn", a, 1e-3f, &bs, &bh, &bm, &bv, &t));
    OK(trtshim_network_mark_output(n, t, "y"));
    OK(build_run(n, x, 96, NULL, 0, y, 96));
    for (int i = 0; i < 2; i++)
        for (int c = 0; c < 3; c++)
            for (int k = 0; k < 4; k++) {
                int idx = (i * 3 + c) * 4 + k;
                want[idx] = (x[idx] - sc[3 + c]) / sqrt(var[c] + 1e-3) * sc[c] + sh[c];
            }
    expect_close("batch_norm", y, want, 24);
    free(x), free(sc), free(sh);
}

static void test_reduce_and_pooling(void) {
    int64_t d[4] = {2, 3, 5, 4};
    float *x = rand_array(120), y[120];
    double want[120];
    int32_t a, t;
    for (int op = 0; op <= TRTSHIM_REDUCE_MAX; op++)
        for (int keep = 0; keep <= 1; keep++) {
            trtshim_network *n = net_with_input(4, d, &a);
            OK(trtshim_network_add_reduce(n, "r", a, (trtshim_reduce_op)op, 0x5 /* dims 0 and 2 */, keep, &t));
            int32_t rank;
            int64_t od[8];
            OK(trtshim_network_tensor_shape(n, t, NULL, &rank, od));
            CHECK(rank == (keep ? 4 : 2) && od[keep ? 1 : 0] == 3 && od[keep ? 3 : 1] == 4, "reduce shape");
            OK(trtshim_network_mark_output(n, t, "y"));
            OK(build_run(n, x, 480, NULL, 0, y, 48));
            for (int c = 0; c < 3; c++)
                for (int w = 0; w < 4; w++) {
                    double s = op == 2 ? -INFINITY : 0;
                    for (int i = 0; i < 2; i++)
                        for (int h = 0; h < 5; h++) {
                            double v = x[((i * 3 + c) * 5 + h) * 4 + w];
                            s = op == 2 ? fmax(s, v) : s + v;
                        }
                    want[c * 4 + w] = op == 0 ? s / 10 : s;
                }
            expect_close("reduce", y, want, 12);
        }
    for (int op = 0; op <= TRTSHIM_POOL_GLOBAL_AVERAGE; op++)
        for (int incl = 0; incl <= 1; incl++) {
            trtshim_network *n = net_with_input(4, d, &a);
            trtshim_pool_params p = {3, 2, 2, 1, 1, 0, 1, 1, incl};
            OK(trtshim_network_add_pooling(n, "p", a, (trtshim_pool_op)op, op == 2 ? NULL : &p, &t));
            int64_t OH = op == 2 ? 1 : (5 + 2 - 3) / 2 + 1, OW = op == 2 ? 1 : (4 + 1 - 2) / 1 + 1;
            OK(trtshim_network_mark_output(n, t, "y"));
            OK(build_run(n, x, 480, NULL, 0, y, (uint64_t)(6 * OH * OW * 4)));
            for (int nc = 0; nc < 6; nc++)
                for (int oh = 0; oh < OH; oh++)
                    for (int ow = 0; ow < OW; ow++) {
                        double s = op == 1 ? -INFINITY : 0;
                        int cnt = 0;
                        int kh = op == 2 ? 5 : 3, kw = op == 2 ? 4 : 2, sh = op == 2 ? 1 : 2, pt = op == 2 ? 0 : 1;
                        for (int i = 0; i < kh; i++)
                            for (int j = 0; j < kw; j++) {
                                int h = oh * sh - pt + i, w = ow - 0 + j;
                                if (h < 0 || h >= 5 || w < 0 || w >= 4) continue;
                                double v = x[(nc * 5 + h) * 4 + w];
                                s = op == 1 ? fmax(s, v) : s + v;
                                cnt++;
                            }
                        if (op == 0) s /= incl ? kh * kw : cnt;
                        if (op == 2) s /= 20;
                        want[(nc * OH + oh) * OW + ow] = s;
                    }
            expect_close("pooling", y, want, 6 * OH * OW);
        }
    free(x);
}

static void test_shape_layers(void) {
    int64_t d[3] = {2, 3, 4};
    float *x = rand_array(24), y[64];
    double want[64];
    int32_t a, t, t2;
    /* transpose [2,3,4] -> perm (2,0,1) -> [4,2,3] */
    trtshim_network *n = net_with_input(3, d, &a);
    int32_t perm[3] = {2, 0, 1};
    OK(trtshim_network_add_transpose(n, "tr", a, perm, &t));
    OK(trtshim_network_mark_output(n, t, "y"));
    OK(build_run(n, x, 96, NULL, 0, y, 96));
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 2; j++)
            for (int k = 0; k < 3; k++) want[(i * 2 + j) * 3 + k] = x[(j * 3 + k) * 4 + i];
    expect_close("transpose", y, want, 24);
    /* slice start (1,0,1) size (1,2,2) stride (1,2,2), then reshape to [4] */
    n = net_with_input(3, d, &a);
    int64_t st[3] = {1, 0, 1}, sz[3] = {1, 2, 2}, sd[3] = {1, 2, 2}, flat[1] = {-1};
    OK(trtshim_network_add_slice(n, "sl", a, st, sz, sd, &t));
    OK(trtshim_network_add_reshape(n, "rs", t, 1, flat, &t));
    OK(trtshim_network_mark_output(n, t, "y"));
    OK(build_run(n, x, 96, NULL, 0, y, 16));
    for (int j = 0; j < 2; j++)
        for (int k = 0; k < 2; k++) want[j * 2 + k] = x[(1 * 3 + j * 2) * 4 + 1 + k * 2];
    expect_close("slice+reshape", y, want, 4);
    /* concat of the input and a constant along axis 1 */
    n = net_with_input(3, d, &a);
    int64_t cd[3] = {2, 1, 4};
    float *cv = rand_array(8);
    trtshim_weights cw = f32w(cv, 8);
    OK(trtshim_network_add_constant(n, "c", 3, cd, &cw, &t2));
    int32_t parts[2] = {a, t2};
    OK(trtshim_network_add_concatenation(n, "cat", 2, parts, 1, &t));
    OK(trtshim_network_mark_output(n, t, "y"));
    OK(build_run(n, x, 96, NULL, 0, y, 128));
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++)
            for (int k = 0; k < 4; k++) want[(i * 4 + j) * 4 + k] = j < 3 ? x[(i * 3 + j) * 4 + k] : cv[i * 4 + k];
    expect_close("concatenation", y, want, 32);
    /* gather: int64 input indices on axis 1 (with a negative index), then int32 constant indices on axis 2 */
    n = net_with_input(3, d, &a);
    int64_t id[1] = {3}, idx64[3] = {2, -3, 1};
    int32_t ix, ic;
    OK(trtshim_network_add_input(n, "b", TRTSHIM_INT64, 1, id, &ix));
    OK(trtshim_network_add_gather(n, "g1", a, ix, 1, &t));
    int32_t idx32[2] = {3, 0};
    int64_t i2d[1] = {2};
    trtshim_weights iw = {TRTSHIM_INT32, idx32, 2};
    OK(trtshim_network_add_constant(n, "gi", 1, i2d, &iw, &ic));
    OK(trtshim_network_add_gather(n, "g2", t, ic, 2, &t));
    OK(trtshim_network_mark_output(n, t, "y"));
    OK(build_run(n, x, 96, idx64, 24, y, 2 * 3 * 2 * 4));
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 3; j++)
            for (int k = 0; k < 2; k++) {
                int64_t r = idx64[j] < 0 ? idx64[j] + 3 : idx64[j];
                want[(i * 3 + j) * 2 + k] = x[(i * 3 + r) * 4 + idx32[k]];
            }
    expect_close("gather", y, want, 12);
    /* an index out of range is an error at run time, not a crash */
    n = net_with_input(3, d, &a);
    OK(trtshim_network_add_input(n, "b", TRTSHIM_INT64, 1, id, &ix));
    OK(trtshim_network_add_gather(n, "g1", a, ix, 1, &t));
    OK(trtshim_network_mark_output(n, t, "y"));
    int64_t badidx[3] = {0, 3, 1};
    CHECK(build_run(n, x, 96, badidx, 24, y, 96) == TRTSHIM_ERR_ARGUMENT, "gather index out of range");
    CHECK(strstr(trtshim_last_error(), "g1") != NULL, "message names the layer: %s", trtshim_last_error());
    /* a constant marked as an output, beside the input */
    n = net_with_input(3, d, &a);
    OK(trtshim_network_add_constant(n, "c", 3, cd, &cw, &t2));
    OK(trtshim_network_mark_output(n, t2, "y"));
    OK(build_run(n, x, 96, NULL, 0, y, 32));
    for (int i = 0; i < 8; i++) want[i] = cv[i];
    expect_close("constant output", y, want, 8);
    free(x), free(cv);
}

static void test_validation(void) {
    trtshim_network *n;
    OK(trtshim_network_create(&n));
    int64_t d[2] = {3, 8}, d4[4] = {1, 6, 5, 5};
    int32_t a, b, t;
    float w[256] = {0};
    OK(trtshim_network_add_input(n, "a", TRTSHIM_FLOAT32, 2, d, &a));
    OK(trtshim_network_add_input(n, "b", TRTSHIM_FLOAT32, 4, d4, &b));
    CHECK(trtshim_network_add_input(n, "a", TRTSHIM_FLOAT32, 2, d, &t) == TRTSHIM_ERR_ARGUMENT, "duplicate input");
    trtshim_weights k = {TRTSHIM_FLOAT32, w, 4 * 7};
    CHECK(trtshim_network_add_fully_connected(n, "fc", a, 4, &k, NULL, &t) == TRTSHIM_ERR_ARGUMENT, "in_features");
    CHECK(strstr(trtshim_last_error(), "'fc'") && strstr(trtshim_last_error(), "8"), "names layer and K: %s", trtshim_last_error());
    k.count = 32;
    OK(trtshim_network_add_fully_connected(n, "fc", a, 4, &k, NULL, &t));
    CHECK(trtshim_network_add_fully_connected(n, "fc", a, 4, &k, NULL, &t) == TRTSHIM_ERR_ARGUMENT, "duplicate layer name");
    CHECK(trtshim_network_add_fully_connected(n, "", a, 4, &k, NULL, &t) == TRTSHIM_ERR_ARGUMENT, "empty name");
    CHECK(trtshim_network_add_fully_connected(n, NULL, a, 4, &k, NULL, &t) == TRTSHIM_ERR_ARGUMENT, "null name");
    CHECK(trtshim_network_add_fully_connected(n, "fc9", 99, 4, &k, NULL, &t) == TRTSHIM_ERR_ARGUMENT, "unknown tensor");
    CHECK(trtshim_network_add_fully_connected(n, "fc9", a, 4, NULL, NULL, &t) == TRTSHIM_ERR_ARGUMENT, "null kernel");
    trtshim_weights kbad = {TRTSHIM_INT32, w, 32};
    CHECK(trtshim_network_add_fully_connected(n, "fc9", a, 4, &kbad, NULL, &t) == TRTSHIM_ERR_ARGUMENT, "int kernel");
    trtshim_conv_params cp = {4, 3, 3, 1, 1, 0, 0, 0, 0, 1, 1, 4};
    trtshim_weights ck = {TRTSHIM_FLOAT32, w, 4 * 1 * 9};
    CHECK(trtshim_network_add_convolution(n, "cv", b, &cp, &ck, NULL, &t) == TRTSHIM_ERR_ARGUMENT, "groups must divide");
    cp.groups = 2;
    ck.count = 4 * 3 * 9;
    OK(trtshim_network_add_convolution(n, "cv", b, &cp, &ck, NULL, &t));
    int32_t rank;
    int64_t od[8];
    OK(trtshim_network_tensor_shape(n, t, NULL, &rank, od));
    CHECK(rank == 4 && od[1] == 4 && od[2] == 3 && od[3] == 3, "conv output shape");
    CHECK(trtshim_network_add_elementwise(n, "ew", a, b, TRTSHIM_ELEMENTWISE_ADD, &t) == TRTSHIM_ERR_ARGUMENT, "broadcast");
    CHECK(trtshim_network_add_elementwise(n, "ew", a, a, (trtshim_elementwise_op)42, &t) == TRTSHIM_ERR_ARGUMENT, "op");
    CHECK(trtshim_network_add_unary(n, "un", a, (trtshim_unary_op)-1, &t) == TRTSHIM_ERR_ARGUMENT, "unary op");
    CHECK(trtshim_network_add_softmax(n, "sm", a, 2, &t) == TRTSHIM_ERR_ARGUMENT, "axis");
    int64_t rs[2] = {5, -1};
    CHECK(trtshim_network_add_reshape(n, "rs", a, 2, rs, &t) == TRTSHIM_ERR_ARGUMENT, "reshape volume");
    int32_t perm[2] = {0, 0};
    CHECK(trtshim_network_add_transpose(n, "tp", a, perm, &t) == TRTSHIM_ERR_ARGUMENT, "perm");
    int64_t s0[2] = {0, 6}, s1[2] = {1, 2}, s2[2] = {1, 2};
    CHECK(trtshim_network_add_slice(n, "sl", a, s0, s1, s2, &t) == TRTSHIM_ERR_ARGUMENT, "slice range");
    CHECK(trtshim_network_add_gather(n, "ga", a, a, 0, &t) == TRTSHIM_ERR_ARGUMENT, "float indices");
    CHECK(trtshim_network_add_reduce(n, "rd", a, TRTSHIM_REDUCE_SUM, 0x4, 0, &t) == TRTSHIM_ERR_ARGUMENT, "axes mask");
    trtshim_weights cw = {TRTSHIM_FLOAT32, w, 5};
    int64_t cd[1] = {6};
    CHECK(trtshim_network_add_constant(n, "co", 1, cd, &cw, &t) == TRTSHIM_ERR_ARGUMENT, "constant count");
    CHECK(strstr(trtshim_last_error(), "6 elements") != NULL, "expected vs found: %s", trtshim_last_error());
    CHECK(trtshim_network_mark_output(n, a, "a") == TRTSHIM_ERR_ARGUMENT, "output name used by input");
    CHECK(trtshim_network_add_matrix_multiply(n, "mm", a, 0, a, 0, &t) == TRTSHIM_ERR_ARGUMENT, "matmul K");
    OK(trtshim_network_add_matrix_multiply(n, "mm", a, 0, a, 1, &t));
    trtshim_build_config cfg;
    trtshim_build_config_default(&cfg);
    trtshim_engine *e = NULL;
    CHECK(trtshim_build(n, &cfg, &e) == TRTSHIM_ERR_ARGUMENT, "no outputs");
    cfg.weight_precision = TRTSHIM_INT8;
    OK(trtshim_network_mark_output(n, t, "y"));
    CHECK(trtshim_build(n, &cfg, &e) == TRTSHIM_ERR_ARGUMENT, "precision");
    cfg.weight_precision = TRTSHIM_FLOAT32;
    cfg.refittable = 0;
    OK(trtshim_build(n, &cfg, &e));
    trtshim_refitter *r = NULL;
    CHECK(trtshim_refitter_create(e, &r) == TRTSHIM_ERR_STATE, "refitter on fixed engine");
    trtshim_context *c = NULL;
    OK(trtshim_context_create(e, &c));
    trtshim_engine_destroy(e); /* the context keeps it alive */
    float xa[24], y[9];
    CHECK(trtshim_context_execute(c) == TRTSHIM_ERR_STATE, "unbound io");
    CHECK(trtshim_context_set_tensor(c, "a", xa, 95) == TRTSHIM_ERR_ARGUMENT, "byte size");
    CHECK(trtshim_context_set_tensor(c, "zz", xa, 96) == TRTSHIM_ERR_NOT_FOUND, "io name");
    OK(trtshim_context_set_tensor(c, "a", xa, 96));
    OK(trtshim_context_set_tensor(c, "y", y, 36));
    float bb[150];
    OK(trtshim_context_set_tensor(c, "b", bb, sizeof(bb)));
    for (int i = 0; i < 24; i++) xa[i] = (float)i;
    OK(trtshim_context_execute(c));
    CHECK(y[1] == (float)(0 * 8 + 1 * 9 + 2 * 10 + 3 * 11 + 4 * 12 + 5 * 13 + 6 * 14 + 7 * 15), "a a^T [0][1] = %g", y[1]);
    trtshim_context_destroy(c);
    trtshim_network_destroy(n);
    CHECK(trtshim_build(NULL, &cfg, &e) == TRTSHIM_ERR_ARGUMENT, "null network");
    CHECK(trtshim_context_execute(NULL) == TRTSHIM_ERR_ARGUMENT, "null context");
}

/* Large enough that the row-parallel layers and the convolution split over threads: the split must not
   change a single bit. */
static void run_threads(trtshim_network *n, int threads, const float *x, uint64_t xbytes, float *y, uint64_t ybytes) {
    trtshim_build_config cfg;
    trtshim_build_config_default(&cfg);
    cfg.num_threads = threads;
    trtshim_engine *e = NULL;
    trtshim_context *c = NULL;
    OK(trtshim_build(n, &cfg, &e));
    OK(trtshim_context_create(e, &c));
    OK(trtshim_context_set_tensor(c, "a", (void *)x, xbytes));
    OK(trtshim_context_set_tensor(c, "y", y, ybytes));
    OK(trtshim_context_execute(c));
    trtshim_context_destroy(c);
    trtshim_engine_destroy(e);
}

static void test_threads_bit_identical(void) {
    int64_t d[2] = {64, 1024}, d4[4] = {1, 8, 48, 48};
    int32_t a, t;
    float *x = rand_array(64 * 1024), *y1 = malloc(64 * 1024 * 4), *y2 = malloc(64 * 1024 * 4);
    trtshim_network *n = net_with_input(2, d, &a);
    OK(trtshim_network_add_layer_norm(n, "ln", a, -1, 1e-5f, NULL, NULL, &t));
    OK(trtshim_network_add_unary(n, "gelu", t, TRTSHIM_UNARY_GELU_TANH, &t));
    OK(trtshim_network_add_softmax(n, "sm", t, -1, &t));
    OK(trtshim_network_add_rms_norm(n, "rms", t, 1e-6f, NULL, &t));
    OK(trtshim_network_mark_output(n, t, "y"));
    run_threads(n, 1, x, 64 * 1024 * 4, y1, 64 * 1024 * 4);
    run_threads(n, 2, x, 64 * 1024 * 4, y2, 64 * 1024 * 4);
    CHECK(memcmp(y1, y2, 64 * 1024 * 4) == 0, "row-parallel layers: 1 and 2 threads differ");
    trtshim_network_destroy(n);
    n = net_with_input(4, d4, &a);
    float *w = rand_array(8 * 8 * 9);
    trtshim_weights kw = f32w(w, 8 * 8 * 9);
    trtshim_conv_params p = {8, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    OK(trtshim_network_add_convolution(n, "conv", a, &p, &kw, NULL, &t));
    OK(trtshim_network_mark_output(n, t, "y"));
    run_threads(n, 1, x, 8 * 48 * 48 * 4, y1, 8 * 48 * 48 * 4);
    run_threads(n, 2, x, 8 * 48 * 48 * 4, y2, 8 * 48 * 48 * 4);
    CHECK(memcmp(y1, y2, 8 * 48 * 48 * 4) == 0, "convolution: 1 and 2 threads differ");
    trtshim_network_destroy(n);
    free(x), free(y1), free(y2), free(w);
}

int main(void) {
    test_fully_connected();
    for (int c = 0; c <= 1; c++)
        for (int ta = 0; ta <= 1; ta++)
            for (int tb = 0; tb <= 1; tb++) test_matmul(c, ta, tb);
    test_convolution(1, 1, 1, 1);
    test_convolution(2, 2, 1, 1);
    test_convolution(2, 1, 2, 2);
    test_convolution(1, 1, 0, 1);
    test_elementwise_and_unary();
    test_norms_and_softmax();
    test_reduce_and_pooling();
    test_shape_layers();
    test_validation();
    test_threads_bit_identical();
    if (failures) {
        fprintf(stderr, "layers_test: %d checks failed\n", failures);
        return 1;
    }
    printf("layers_test: ok\n");
    return 0;
}
