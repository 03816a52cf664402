/* quant_test.c: engines with quantized kernels (int8, fp8 e4m3, int4 groups): refit from float weights
   equals a build bit for bit, the pre-quantized refit (values and scales from gemm_quant_quantize, int4
   packed two per byte) equals the re-quantizing one, mismatches are refused naming the weight and change
   nothing, and a streamed quantized engine runs as a resident one. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "trtshim.h"
#include "gemm.h"

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

enum { BATCH = 3, IN = 100, HID = 40, OUT = 7, IMG = 6, CH = 4, OC = 8 };

static float value(unsigned seed, int64_t i) {
    uint32_t h = (uint32_t)(seed * 2654435761u) ^ (uint32_t)(i * 2246822519u);
    h ^= h >> 15, h *= 0x2c1b3c6du, h ^= h >> 12;
    return (float)(h >> 8) / 16777216.0f - 0.5f;
}

typedef struct {
    float fc0[HID * IN], b0[HID], fc1[OUT * HID], conv[OC * CH * 9], bn[4][OC];
} model_weights;

static void fill(model_weights *m, unsigned seed) {
    for (int i = 0; i < HID * IN; i++) m->fc0[i] = value(seed, i);
    for (int i = 0; i < HID; i++) m->b0[i] = value(seed + 1, i);
    for (int i = 0; i < OUT * HID; i++) m->fc1[i] = value(seed + 2, i);
    for (int i = 0; i < OC * CH * 9; i++) m->conv[i] = value(seed + 3, i);
    for (int k = 0; k < 4; k++)
        for (int i = 0; i < OC; i++) m->bn[k][i] = k == 3 ? 0.5f + fabsf(value(seed + 4, i)) : value(seed + 5 + k, i);
}

static trtshim_weights f32(const float *p, int64_t n) { return (trtshim_weights){TRTSHIM_FLOAT32, p, n}; }

/* x [3, 100] -> fc0 (+bias) -> relu -> fc1 -> y;  img [1, 4, 6, 6] -> conv 3x3 -> batch norm -> relu -> z. */
static trtshim_network *make_network(const model_weights *m) {
    trtshim_network *net;
    int32_t x, h, r, y, img, c, b, z;
    trtshim_network_create(&net);
    int64_t xd[2] = {BATCH, IN}, id[4] = {1, CH, IMG, IMG};
    trtshim_network_add_input(net, "x", TRTSHIM_FLOAT32, 2, xd, &x);
    trtshim_weights k0 = f32(m->fc0, HID * IN), b0 = f32(m->b0, HID), k1 = f32(m->fc1, OUT * HID), kc = f32(m->conv, OC * CH * 9);
    trtshim_network_add_fully_connected(net, "fc0", x, HID, &k0, &b0, &h);
    trtshim_network_add_unary(net, "relu0", h, TRTSHIM_UNARY_RELU, &r);
    trtshim_network_add_fully_connected(net, "fc1", r, OUT, &k1, NULL, &y);
    trtshim_network_mark_output(net, y, "y");
    trtshim_network_add_input(net, "img", TRTSHIM_FLOAT32, 4, id, &img);
    trtshim_conv_params cp = {OC, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    trtshim_network_add_convolution(net, "conv", img, &cp, &kc, NULL, &c);
    trtshim_weights s = f32(m->bn[0], OC), t = f32(m->bn[1], OC), mu = f32(m->bn[2], OC), var = f32(m->bn[3], OC);
    trtshim_network_add_batch_norm(net, "bn", c, 1e-5f, &s, &t, &mu, &var, &b);
    trtshim_network_add_unary(net, "relu1", b, TRTSHIM_UNARY_RELU, &z);
    trtshim_network_mark_output(net, z, "z");
    return net;
}

static trtshim_engine *build(const model_weights *m, trtshim_weight_format format, int group, int streaming) {
    trtshim_network *net = make_network(m);
    trtshim_build_config config;
    trtshim_build_config_default(&config);
    config.gemm_weight_format = format;
    config.conv_weight_format = format;
    config.int4_group_size = group;
    config.weight_streaming = streaming;
    trtshim_engine *e = NULL;
    OK(trtshim_build(net, &config, &e));
    trtshim_network_destroy(net);
    return e;
}

static uint8_t *file_of(const trtshim_engine *e, uint64_t *size) {
    trtshim_engine_serialized_size(e, 1, size);
    uint8_t *buf = malloc(*size);
    trtshim_engine_serialize(e, 1, buf, *size, NULL);
    return buf;
}

static int same_file(const trtshim_engine *a, const trtshim_engine *b) {
    uint64_t na, nb;
    uint8_t *fa = file_of(a, &na), *fb = file_of(b, &nb);
    int same = na == nb && memcmp(fa, fb, na) == 0;
    free(fa), free(fb);
    return same;
}

static void run(trtshim_engine *e, float *y, float *z) {
    static float x[BATCH * IN], img[CH * IMG * IMG];
    for (int i = 0; i < BATCH * IN; i++) x[i] = value(99, i);
    for (int i = 0; i < CH * IMG * IMG; i++) img[i] = value(98, i);
    trtshim_context *c;
    OK(trtshim_context_create(e, &c));
    trtshim_context_set_tensor(c, "x", x, sizeof(x));
    trtshim_context_set_tensor(c, "img", img, sizeof(img));
    trtshim_context_set_tensor(c, "y", y, sizeof(float) * BATCH * OUT);
    trtshim_context_set_tensor(c, "z", z, sizeof(float) * OC * IMG * IMG);
    OK(trtshim_context_execute(c));
    trtshim_context_destroy(c);
}

static void refit_float(trtshim_engine *e, const model_weights *m) {
    trtshim_refitter *r;
    OK(trtshim_refitter_create(e, &r));
    trtshim_weights k0 = f32(m->fc0, HID * IN), b0 = f32(m->b0, HID), k1 = f32(m->fc1, OUT * HID), kc = f32(m->conv, OC * CH * 9);
    OK(trtshim_refitter_set_weights(r, "fc0", TRTSHIM_ROLE_KERNEL, &k0));
    OK(trtshim_refitter_set_weights(r, "fc0", TRTSHIM_ROLE_BIAS, &b0));
    OK(trtshim_refitter_set_weights(r, "fc1", TRTSHIM_ROLE_KERNEL, &k1));
    OK(trtshim_refitter_set_weights(r, "conv", TRTSHIM_ROLE_KERNEL, &kc));
    const trtshim_role roles[4] = {TRTSHIM_ROLE_SCALE, TRTSHIM_ROLE_SHIFT, TRTSHIM_ROLE_MEAN, TRTSHIM_ROLE_VARIANCE};
    for (int k = 0; k < 4; k++) {
        trtshim_weights w = f32(m->bn[k], OC);
        OK(trtshim_refitter_set_weights(r, "bn", roles[k], &w));
    }
    OK(trtshim_refitter_apply(r));
    trtshim_refitter_destroy(r);
}

/* Quantizes an [n, k] torch-layout weight with the library's quantizer; int4 packed two per byte along K. */
static void quantize_checkpoint(gemm_quant_format f, const float *w, int64_t n, int64_t k, void *values, float *scales) {
    int8_t *q = malloc((size_t)(n * k));
    OK(gemm_quant_quantize(f, w, 1, k, k, n, q, k, scales));
    if (f.kind != GEMM_QUANT_INT4) memcpy(values, q, (size_t)(n * k));
    else {
        int64_t half = (k + 1) / 2;
        uint8_t *packed = values;
        memset(packed, 0, (size_t)(n * half));
        for (int64_t j = 0; j < n; j++)
            for (int64_t i = 0; i < k; i++) packed[j * half + i / 2] |= (uint8_t)(((q[j * k + i] + 8) & 15) << (4 * (i & 1)));
    }
    free(q);
}

static void test_format(trtshim_weight_format format, gemm_quant_kind kind, int group) {
    model_weights *a = malloc(sizeof(*a)), *b = malloc(sizeof(*b));
    fill(a, 1), fill(b, 2);
    trtshim_engine *refitted = build(a, format, group, 0), *rebuilt = build(b, format, group, 0);
    refit_float(refitted, b);
    CHECK(same_file(refitted, rebuilt), "format %d: refit from float weights == build", (int)format);

    /* Pre-quantized fc0 / fc1 (the convolution is folded with its batch norm: floats). */
    gemm_quant_format f = {kind, kind == GEMM_QUANT_INT4 ? group : 0};
    trtshim_engine *pre = build(a, format, group, 0);
    static uint8_t v0[HID * IN], v1[OUT * HID];
    static float s0[HID * 4], s1[OUT * 4];
    quantize_checkpoint(f, b->fc0, HID, IN, v0, s0);
    quantize_checkpoint(f, b->fc1, OUT, HID, v1, s1);
    trtshim_dtype vd = kind == GEMM_QUANT_INT8 ? TRTSHIM_INT8 : kind == GEMM_QUANT_FP8_E4M3 ? TRTSHIM_FP8_E4M3 : TRTSHIM_UINT8;
    int64_t n0 = kind == GEMM_QUANT_INT4 ? HID * (IN / 2) : HID * IN, n1 = kind == GEMM_QUANT_INT4 ? OUT * (HID / 2) : OUT * HID;
    trtshim_weights q0 = {vd, v0, n0}, q1 = {vd, v1, n1};
    trtshim_weights sc0 = f32(s0, HID * gemm_quant_groups(f, IN)), sc1 = f32(s1, OUT * gemm_quant_groups(f, HID));
    int8_t zeros[HID * 4] = {0};
    trtshim_weights zp = {TRTSHIM_INT8, zeros, sc0.count};
    trtshim_refitter *r;
    OK(trtshim_refitter_create(pre, &r));
    OK(trtshim_refitter_set_quantized_weights(r, "fc0", TRTSHIM_ROLE_KERNEL, f.group_size, &q0, &sc0, &zp));
    OK(trtshim_refitter_set_quantized_weights(r, "fc1", TRTSHIM_ROLE_KERNEL, f.group_size, &q1, &sc1, NULL));
    trtshim_weights kc = f32(b->conv, OC * CH * 9);
    CHECK(trtshim_refitter_set_quantized_weights(r, "conv", TRTSHIM_ROLE_KERNEL, f.group_size, &q0, &sc0, NULL) ==
              TRTSHIM_ERR_UNSUPPORTED && strstr(trtshim_last_error(), "weight 'conv' kernel: a batch norm is folded"),
          "a folded convolution refuses pre-quantized values");
    OK(trtshim_refitter_set_weights(r, "conv", TRTSHIM_ROLE_KERNEL, &kc));
    trtshim_weights b0 = f32(b->b0, HID);
    OK(trtshim_refitter_set_weights(r, "fc0", TRTSHIM_ROLE_BIAS, &b0));
    const trtshim_role roles[4] = {TRTSHIM_ROLE_SCALE, TRTSHIM_ROLE_SHIFT, TRTSHIM_ROLE_MEAN, TRTSHIM_ROLE_VARIANCE};
    for (int k = 0; k < 4; k++) {
        trtshim_weights w = f32(b->bn[k], OC);
        OK(trtshim_refitter_set_weights(r, "bn", roles[k], &w));
    }
    OK(trtshim_refitter_apply(r));
    CHECK(same_file(pre, rebuilt), "format %d: pre-quantized refit == build", (int)format);

    /* Mismatches name the weight; a bad scale fails at apply and changes nothing. */
    trtshim_weights wrong = {kind == GEMM_QUANT_INT8 ? TRTSHIM_UINT8 : TRTSHIM_INT8, v0, n0};
    CHECK(trtshim_refitter_set_quantized_weights(r, "fc0", TRTSHIM_ROLE_KERNEL, f.group_size, &wrong, &sc0, NULL) ==
              TRTSHIM_ERR_ARGUMENT && strstr(trtshim_last_error(), "weight 'fc0' kernel"), "wrong dtype");
    trtshim_weights short_scales = f32(s0, sc0.count - 1);
    CHECK(trtshim_refitter_set_quantized_weights(r, "fc0", TRTSHIM_ROLE_KERNEL, f.group_size, &q0, &short_scales, NULL) ==
              TRTSHIM_ERR_ARGUMENT && strstr(trtshim_last_error(), "weight 'fc0' kernel: expected float32 scales"), "wrong scale count");
    zeros[3] = 1;
    CHECK(trtshim_refitter_set_quantized_weights(r, "fc0", TRTSHIM_ROLE_KERNEL, f.group_size, &q0, &sc0, &zp) ==
              TRTSHIM_ERR_UNSUPPORTED && strstr(trtshim_last_error(), "zero point 3 is not 0"), "asymmetric refused");
    float saved = s1[2];
    s1[2] = -1.0f;
    OK(trtshim_refitter_set_quantized_weights(r, "fc1", TRTSHIM_ROLE_KERNEL, f.group_size, &q1, &sc1, NULL));
    CHECK(trtshim_refitter_apply(r) == TRTSHIM_ERR_VALIDATION && strstr(trtshim_last_error(), "weight 'fc1' kernel: scale 2 is -1"),
          "negative scale refused");
    s1[2] = saved;
    CHECK(same_file(pre, rebuilt), "a failed apply changed nothing");
    trtshim_refitter_destroy(r);

    /* A streamed quantized engine (budget 0: every kernel through the window) runs as the resident one. */
    trtshim_engine *streamed = build(b, format, group, 1);
    OK(trtshim_engine_set_weight_streaming_budget(streamed, 0));
    static float y0[BATCH * OUT], z0[OC * IMG * IMG], y1[BATCH * OUT], z1[OC * IMG * IMG];
    run(rebuilt, y0, z0);
    run(streamed, y1, z1);
    CHECK(memcmp(y0, y1, sizeof(y0)) == 0 && memcmp(z0, z1, sizeof(z0)) == 0, "format %d: streamed == resident", (int)format);
    trtshim_weight_format wf;
    int32_t gs;
    OK(trtshim_engine_weight_format(rebuilt, 0, &wf, &gs));
    CHECK(wf == format && gs == (kind == GEMM_QUANT_INT4 ? group : 0), "fc0 kernel format %d group %d", (int)wf, gs);
    OK(trtshim_engine_weight_format(rebuilt, 1, &wf, &gs));
    CHECK(wf == TRTSHIM_WEIGHT_FORMAT_AS_PRECISION, "a bias is not quantized");

    trtshim_engine_destroy(streamed);
    trtshim_engine_destroy(pre);
    trtshim_engine_destroy(refitted);
    trtshim_engine_destroy(rebuilt);
    free(a), free(b);
}

int main(void) {
    test_format(TRTSHIM_WEIGHT_FORMAT_INT8, GEMM_QUANT_INT8, 128);
    test_format(TRTSHIM_WEIGHT_FORMAT_FP8_E4M3, GEMM_QUANT_FP8_E4M3, 128);
    test_format(TRTSHIM_WEIGHT_FORMAT_INT4, GEMM_QUANT_INT4, 32);
    test_format(TRTSHIM_WEIGHT_FORMAT_INT4, GEMM_QUANT_INT4, 64);
    if (failures) fprintf(stderr, "quant_test: %d failures\n", failures);
    else printf("quant_test: ok\n");
    return failures ? 1 : 0;
}
