/* readback_test.c: trtshim_engine_weight_digests. For float32, float16, bfloat16, int8, fp8 and int4
   engines of a network with concatenated q/k/v GEMMs, a bias added by a constant, a constant packed as a
   GEMM operand and read as a tensor, convolutions with and without a folded batch norm, a layer norm and an
   integer constant: every digest equals the digest of the values given to the builder as the engine holds
   them (rounded, or quantized and dequantized), and after a refit those of the new values. A byte changed
   in a packed buffer changes that weight's digest (or fails, for a fold); a stripped engine refuses until
   it is filled; a streaming engine reports from where it runs. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "trtshim.h"
#include "engine.h"
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

enum { B = 2, IN = 40, QN = 12, HN = 36, CN = 20, CH = 3, IMG = 6, OC = 5, KC = CH * 9, NIDX = 3 };

/* How the engine holds a weight (the test knows its network). */
enum { EXACT, PACK_T, PACK_N, RAW };

typedef struct {
    const char *name;
    trtshim_role role;
    int held;
    int64_t n, k; /* PACK_*: output channels and depth */
    int64_t count;
    float *values;
} weight_case;

enum { W_Q, W_BQ, W_K, W_BK, W_V, W_H, W_CB, W_CM, W_LNS, W_LNB, W_CONV, W_CONVB, W_BNS, W_BNT, W_BNM, W_BNV, W_CONV2,
       W_CONV2B, W_IDX, NUM_CASES };

static weight_case cases[NUM_CASES] = {
    {"q", TRTSHIM_ROLE_KERNEL, PACK_T, QN, IN, QN * IN, NULL},
    {"q", TRTSHIM_ROLE_BIAS, EXACT, 0, 0, QN, NULL},
    {"k", TRTSHIM_ROLE_KERNEL, PACK_T, QN, IN, QN * IN, NULL},
    {"k", TRTSHIM_ROLE_BIAS, EXACT, 0, 0, QN, NULL},
    {"v", TRTSHIM_ROLE_KERNEL, PACK_T, QN, IN, QN * IN, NULL}, /* declared float16 */
    {"h", TRTSHIM_ROLE_KERNEL, PACK_T, HN, IN, HN * IN, NULL},
    {"hbias", TRTSHIM_ROLE_CONSTANT, EXACT, 0, 0, HN, NULL},    /* added to h: fused as its bias */
    {"cm", TRTSHIM_ROLE_CONSTANT, PACK_N, CN, IN, IN * CN, NULL}, /* [IN, CN] operand, also read as a tensor */
    {"ln", TRTSHIM_ROLE_SCALE, EXACT, 0, 0, CN, NULL},
    {"ln", TRTSHIM_ROLE_SHIFT, EXACT, 0, 0, CN, NULL},
    {"conv", TRTSHIM_ROLE_KERNEL, EXACT, 0, 0, OC * KC, NULL}, /* batch norm folded: the retained copy */
    {"conv", TRTSHIM_ROLE_BIAS, EXACT, 0, 0, OC, NULL},
    {"bn", TRTSHIM_ROLE_SCALE, EXACT, 0, 0, OC, NULL},
    {"bn", TRTSHIM_ROLE_SHIFT, EXACT, 0, 0, OC, NULL},
    {"bn", TRTSHIM_ROLE_MEAN, EXACT, 0, 0, OC, NULL},
    {"bn", TRTSHIM_ROLE_VARIANCE, EXACT, 0, 0, OC, NULL},
    {"conv2", TRTSHIM_ROLE_KERNEL, PACK_T, OC, KC, OC * KC, NULL},
    {"conv2", TRTSHIM_ROLE_BIAS, EXACT, 0, 0, OC, NULL},
    {"idx", TRTSHIM_ROLE_CONSTANT, RAW, 0, 0, NIDX, NULL},
};
static const int32_t idx_values[NIDX] = {0, 39, -1};

static float value(unsigned seed, int64_t i) {
    uint32_t h = (uint32_t)(seed * 2654435761u) ^ (uint32_t)(i * 2246822519u);
    h ^= h >> 15, h *= 0x2c1b3c6du, h ^= h >> 12;
    return (float)(h >> 8) / 16777216.0f - 0.5f;
}

/* Fresh values for every float weight; v rounded to float16 (it is declared float16). */
static void fill(unsigned seed) {
    for (int c = 0; c < NUM_CASES; c++) {
        if (cases[c].held == RAW) continue;
        free(cases[c].values);
        cases[c].values = malloc(sizeof(float) * (size_t)cases[c].count);
        for (int64_t i = 0; i < cases[c].count; i++) cases[c].values[i] = value(seed * 31 + (unsigned)c, i);
        if (c == W_BNV)
            for (int64_t i = 0; i < cases[c].count; i++) cases[c].values[i] = 0.5f + fabsf(cases[c].values[i]);
    }
    /* a column of zeros in q (a zero scale) and a large value in h (an int4 group's scale) */
    for (int64_t k = 0; k < IN; k++) cases[W_Q].values[3 * IN + k] = 0.0f;
    cases[W_H].values[5] = 3.0f;
    uint16_t half[QN * IN];
    trtshim_convert_from_f32(cases[W_V].values, TRTSHIM_FLOAT16, half, QN * IN);
    trtshim_convert_to_f32(TRTSHIM_FLOAT16, half, cases[W_V].values, QN * IN);
}

static trtshim_weights f32(int c) { return (trtshim_weights){TRTSHIM_FLOAT32, cases[c].values, cases[c].count}; }

static uint16_t v_half[QN * IN];
static trtshim_weights v_weights(void) {
    trtshim_convert_from_f32(cases[W_V].values, TRTSHIM_FLOAT16, v_half, QN * IN);
    return (trtshim_weights){TRTSHIM_FLOAT16, v_half, QN * IN};
}

static trtshim_network *make_network(void) {
    trtshim_network *net;
    int32_t x, z, img, q, k, v, h, cb, hb, cm, mm, mul, ln, conv, bn, relu, conv2, idx, g;
    OK(trtshim_network_create(&net));
    int64_t xd[2] = {B, IN}, zd[2] = {IN, CN}, id[4] = {1, CH, IMG, IMG}, hd[1] = {HN}, nd[1] = {NIDX};
    trtshim_network_add_input(net, "x", TRTSHIM_FLOAT32, 2, xd, &x);
    trtshim_network_add_input(net, "z", TRTSHIM_FLOAT32, 2, zd, &z);
    trtshim_network_add_input(net, "img", TRTSHIM_FLOAT32, 4, id, &img);
    trtshim_weights wq = f32(W_Q), wbq = f32(W_BQ), wk = f32(W_K), wbk = f32(W_BK), wv = v_weights(), wh = f32(W_H);
    OK(trtshim_network_add_fully_connected(net, "q", x, QN, &wq, &wbq, &q));
    OK(trtshim_network_add_fully_connected(net, "k", x, QN, &wk, &wbk, &k));
    OK(trtshim_network_add_fully_connected(net, "v", x, QN, &wv, NULL, &v));
    OK(trtshim_network_add_fully_connected(net, "h", x, HN, &wh, NULL, &h));
    trtshim_weights wcb = f32(W_CB), wcm = f32(W_CM);
    OK(trtshim_network_add_constant(net, "hbias", 1, hd, &wcb, &cb));
    OK(trtshim_network_add_elementwise(net, "hadd", h, cb, TRTSHIM_ELEMENTWISE_ADD, &hb));
    OK(trtshim_network_add_constant(net, "cm", 2, zd, &wcm, &cm));
    OK(trtshim_network_add_matrix_multiply(net, "mm", x, 0, cm, 0, &mm));
    OK(trtshim_network_add_elementwise(net, "mul", cm, z, TRTSHIM_ELEMENTWISE_MUL, &mul));
    trtshim_weights wls = f32(W_LNS), wlb = f32(W_LNB);
    OK(trtshim_network_add_layer_norm(net, "ln", mm, -1, 1e-5f, &wls, &wlb, &ln));
    trtshim_conv_params cp = {OC, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    trtshim_weights wc = f32(W_CONV), wcbias = f32(W_CONVB), wc2 = f32(W_CONV2), wc2b = f32(W_CONV2B);
    OK(trtshim_network_add_convolution(net, "conv", img, &cp, &wc, &wcbias, &conv));
    trtshim_weights s = f32(W_BNS), t = f32(W_BNT), mu = f32(W_BNM), var = f32(W_BNV);
    OK(trtshim_network_add_batch_norm(net, "bn", conv, 1e-5f, &s, &t, &mu, &var, &bn));
    OK(trtshim_network_add_unary(net, "relu", bn, TRTSHIM_UNARY_RELU, &relu));
    OK(trtshim_network_add_convolution(net, "conv2", img, &cp, &wc2, &wc2b, &conv2));
    trtshim_weights wi = {TRTSHIM_INT32, idx_values, NIDX};
    OK(trtshim_network_add_constant(net, "idx", 1, nd, &wi, &idx));
    OK(trtshim_network_add_gather(net, "g", x, idx, 1, &g));
    const int32_t outs[] = {q, k, v, hb, mul, ln, relu, conv2, g};
    const char *names[] = {"oq", "ok", "ov", "oh", "omul", "oln", "oconv", "oconv2", "og"};
    for (int i = 0; i < 9; i++) OK(trtshim_network_mark_output(net, outs[i], names[i]));
    return net;
}

typedef struct {
    const char *label;
    trtshim_dtype precision;
    trtshim_weight_format format;
    int group;
} config_case;

static gemm_quant_format quant_of(const config_case *cc) {
    gemm_quant_format f = {(gemm_quant_kind)cc->format, cc->format == TRTSHIM_WEIGHT_FORMAT_INT4 ? cc->group : 0};
    return f;
}

static trtshim_engine *build(const config_case *cc, int strip, int streaming) {
    trtshim_network *net = make_network();
    trtshim_build_config config;
    trtshim_build_config_default(&config);
    config.weight_precision = cc->precision;
    config.gemm_weight_format = cc->format;
    config.conv_weight_format = cc->format;
    config.int4_group_size = cc->group;
    config.strip_weights = strip;
    config.weight_streaming = streaming;
    config.num_threads = 2;
    trtshim_engine *e = NULL;
    OK(trtshim_build(net, &config, &e));
    trtshim_network_destroy(net);
    return e;
}

static float e4m3(uint8_t code) {
    int exponent = (code >> 3) & 15, mantissa = code & 7;
    float m = exponent == 0 ? ldexpf((float)mantissa, -9) : ldexpf(1.0f + (float)mantissa / 8.0f, exponent - 7);
    return code & 0x80 ? -m : m;
}

/* The values the engine should hold for case c: rounded to the precision, or quantized and dequantized
   with the library's quantizer, for a packed kernel; as given otherwise. */
static void held_values_of(const config_case *cc, const weight_case *w, float *out) {
    memcpy(out, w->values, sizeof(float) * (size_t)w->count);
    if (w->held != PACK_T && w->held != PACK_N) return;
    if (!cc->format) {
        if (cc->precision == TRTSHIM_FLOAT32) return;
        uint16_t *tmp = malloc(2 * (size_t)w->count);
        trtshim_convert_from_f32(w->values, cc->precision, tmp, (uint64_t)w->count);
        trtshim_convert_to_f32(cc->precision, tmp, out, (uint64_t)w->count);
        free(tmp);
        return;
    }
    gemm_quant_format f = quant_of(cc);
    int t = w->held == PACK_T;
    int64_t groups = gemm_quant_groups(f, w->k);
    uint8_t *q = malloc((size_t)w->count);
    float *scales = malloc(sizeof(float) * (size_t)(w->n * groups));
    CHECK(gemm_quant_quantize(f, w->values, t, t ? w->k : w->n, w->k, w->n, q, t ? w->k : w->n, scales) == TRTSHIM_OK, "%s", w->name);
    for (int64_t j = 0; j < w->n; j++)
        for (int64_t k = 0; k < w->k; k++) {
            int64_t at = t ? j * w->k + k : k * w->n + j, g = f.kind == GEMM_QUANT_INT4 ? k / f.group_size : 0;
            float s = scales[t ? j * groups + g : g * w->n + j];
            float v = f.kind == GEMM_QUANT_FP8_E4M3 ? e4m3(q[at]) : (float)(int8_t)q[at];
            out[at] = v * s;
        }
    free(q), free(scales);
}

static void held_values(const config_case *cc, int c, float *out) { held_values_of(cc, &cases[c], out); }

/* Weights of several 1 MiB digest chunks whose rows straddle the chunk boundaries: a [700, 1000] fully
   connected kernel, a [1000, 700] constant operand, and a [40, 48, 5, 5] convolution of 2 groups. */
static void test_large(const config_case *cc) {
    enum { LK = 1000, LN = 700, LB = 2 };
    weight_case big[3] = {{"big", TRTSHIM_ROLE_KERNEL, PACK_T, LN, LK, LN * LK, NULL},
                          {"bigc", TRTSHIM_ROLE_CONSTANT, PACK_N, LN, LK, LK * LN, NULL},
                          {"bigconv", TRTSHIM_ROLE_KERNEL, PACK_T, 40, 24 * 25, 40 * 24 * 25, NULL}};
    for (int c = 0; c < 3; c++) {
        big[c].values = malloc(sizeof(float) * (size_t)big[c].count);
        for (int64_t i = 0; i < big[c].count; i++) big[c].values[i] = value(77 + (unsigned)c, i);
    }
    trtshim_network *net;
    int32_t x, y, cm, z, img, conv;
    OK(trtshim_network_create(&net));
    int64_t xd[2] = {LB, LK}, cd[2] = {LK, LN}, id[4] = {1, 48, 7, 7};
    trtshim_network_add_input(net, "x", TRTSHIM_FLOAT32, 2, xd, &x);
    trtshim_network_add_input(net, "img", TRTSHIM_FLOAT32, 4, id, &img);
    trtshim_weights wb = {TRTSHIM_FLOAT32, big[0].values, big[0].count}, wc = {TRTSHIM_FLOAT32, big[1].values, big[1].count};
    trtshim_weights wv = {TRTSHIM_FLOAT32, big[2].values, big[2].count};
    OK(trtshim_network_add_fully_connected(net, "big", x, LN, &wb, NULL, &y));
    OK(trtshim_network_add_constant(net, "bigc", 2, cd, &wc, &cm));
    OK(trtshim_network_add_matrix_multiply(net, "mmbig", x, 0, cm, 0, &z));
    trtshim_conv_params cp = {40, 5, 5, 1, 1, 2, 2, 2, 2, 1, 1, 2};
    OK(trtshim_network_add_convolution(net, "bigconv", img, &cp, &wv, NULL, &conv));
    trtshim_network_mark_output(net, y, "y");
    trtshim_network_mark_output(net, z, "z");
    trtshim_network_mark_output(net, conv, "conv");
    trtshim_build_config config;
    trtshim_build_config_default(&config);
    config.weight_precision = cc->precision;
    config.gemm_weight_format = cc->format;
    config.conv_weight_format = cc->format;
    config.int4_group_size = cc->group;
    trtshim_engine *e = NULL;
    OK(trtshim_build(net, &config, &e));
    trtshim_network_destroy(net);
    if (e) {
        for (int threads = 1; threads <= 3; threads += 2) {
            uint64_t got[6];
            OK(trtshim_engine_weight_digests(e, got, threads));
            for (int c = 0; c < 3; c++) {
                float *held = malloc(sizeof(float) * (size_t)big[c].count);
                held_values_of(cc, &big[c], held);
                uint64_t want[2];
                OK(trtshim_digest(held, 4 * (uint64_t)big[c].count, TRTSHIM_UINT8, 2, want, NULL));
                CHECK(want[0] == got[2 * c] && want[1] == got[2 * c + 1], "%s: large weight '%s', %d threads", cc->label,
                      big[c].name, threads);
                free(held);
            }
        }
    }
    trtshim_engine_destroy(e);
    for (int c = 0; c < 3; c++) free(big[c].values);
}

/* Index of case c among the engine's weights. */
static int32_t index_of(const trtshim_engine *e, int c) {
    trtshim_engine_info info;
    trtshim_engine_get_info(e, &info);
    for (int32_t i = 0; i < info.num_weights; i++) {
        const char *name;
        trtshim_role role;
        trtshim_engine_weight(e, i, &name, &role, NULL, NULL, NULL, NULL);
        if (strcmp(name, cases[c].name) == 0 && role == cases[c].role) return i;
    }
    return -1;
}

/* Every digest equals the digest of the held values; returns the number of mismatches. */
static int compare_all(const config_case *cc, trtshim_engine *e, const char *when) {
    trtshim_engine_info info;
    OK(trtshim_engine_get_info(e, &info));
    CHECK(info.num_weights == NUM_CASES, "%s: %d weights", cc->label, info.num_weights);
    uint64_t *got = calloc(2 * (size_t)info.num_weights, sizeof(uint64_t));
    OK(trtshim_engine_weight_digests(e, got, 0));
    int bad = 0;
    for (int c = 0; c < NUM_CASES; c++) {
        int32_t i = index_of(e, c);
        CHECK(i >= 0, "%s: no weight %s", cc->label, cases[c].name);
        if (i < 0) continue;
        uint64_t want[2];
        if (cases[c].held == RAW) {
            OK(trtshim_digest(idx_values, sizeof(idx_values), TRTSHIM_UINT8, 1, want, NULL));
        } else {
            float *held = malloc(sizeof(float) * (size_t)cases[c].count);
            held_values(cc, c, held);
            OK(trtshim_digest(held, 4 * (uint64_t)cases[c].count, TRTSHIM_UINT8, 1, want, NULL));
            free(held);
        }
        int same = want[0] == got[2 * i] && want[1] == got[2 * i + 1];
        CHECK(same, "%s %s: weight '%s' %d: digest differs from the held values", cc->label, when, cases[c].name,
              (int)cases[c].role);
        bad += !same;
    }
    free(got);
    return bad;
}

static void refit_all(trtshim_engine *e) {
    trtshim_refitter *r;
    OK(trtshim_refitter_create(e, &r));
    trtshim_weights w[NUM_CASES];
    for (int c = 0; c < NUM_CASES; c++) {
        w[c] = c == W_V ? v_weights() : c == W_IDX ? (trtshim_weights){TRTSHIM_INT32, idx_values, NIDX} : f32(c);
        OK(trtshim_refitter_set_weights(r, cases[c].name, cases[c].role, &w[c]));
    }
    OK(trtshim_refitter_apply(r));
    trtshim_refitter_destroy(r);
}

/* The packed buffer of the step whose first layer is `layer`. */
static unsigned char *packed_of(trtshim_engine *e, const char *layer) {
    for (int32_t i = 0; i < e->num_steps; i++)
        if (e->steps[i].packed_buffer >= 0 && strcmp(e->net->layers[e->steps[i].layer].name, layer) == 0)
            return e->buffers[e->steps[i].packed_buffer].data;
    return NULL;
}

static void test_config(const config_case *cc) {
    fill(1);
    trtshim_engine *e = build(cc, 0, 0);
    if (!e) return;
    compare_all(cc, e, "after build");

    /* trtshim_engine_weight_held says which weights are read back from packed operands, and how. */
    for (int c = 0; c < NUM_CASES; c++) {
        int32_t packed = -1, transposed = -1;
        int64_t channels = -1, depth = -1;
        OK(trtshim_engine_weight_held(e, index_of(e, c), &packed, &transposed, &channels, &depth));
        int want = cases[c].held == PACK_T || cases[c].held == PACK_N;
        CHECK(packed == want && transposed == (cases[c].held == PACK_T) && channels == (want ? cases[c].n : 0) &&
              depth == (want ? cases[c].k : 0), "%s: weight '%s' %d held as packed %d transposed %d, %lld x %lld",
              cc->label, cases[c].name, (int)cases[c].role, packed, transposed, (long long)channels, (long long)depth);
    }
    CHECK(trtshim_engine_weight_held(e, NUM_CASES, NULL, NULL, NULL, NULL) == TRTSHIM_ERR_ARGUMENT, "index out of range");

    /* Refit with new values: the digests follow them. */
    fill(2);
    refit_all(e);
    compare_all(cc, e, "after refit");

    /* A byte of q's packed kernel (column 0, row 0) changed: q's digest changes, the others do not. */
    trtshim_engine_info info;
    trtshim_engine_get_info(e, &info);
    uint64_t *before = calloc(2 * (size_t)info.num_weights, sizeof(uint64_t));
    uint64_t *after = calloc(2 * (size_t)info.num_weights, sizeof(uint64_t));
    OK(trtshim_engine_weight_digests(e, before, 1));
    unsigned char *qp = packed_of(e, "q");
    CHECK(qp != NULL, "%s: no packed buffer for q", cc->label);
    if (qp) {
        qp[0] ^= 0x01;
        OK(trtshim_engine_weight_digests(e, after, 2));
        int32_t iq = index_of(e, W_Q);
        for (int32_t i = 0; i < info.num_weights; i++) {
            int same = before[2 * i] == after[2 * i] && before[2 * i + 1] == after[2 * i + 1];
            CHECK(same == (i != iq), "%s: weight %d %s after a byte of q's packing changed", cc->label, i,
                  same ? "kept its digest" : "changed its digest");
        }
        qp[0] ^= 0x01;
    }
    /* The constant read back from its packing is checked against its float32 copy. */
    unsigned char *cp = packed_of(e, "mm");
    CHECK(cp != NULL, "%s: no packed buffer for mm", cc->label);
    if (cp) {
        cp[0] ^= 0x01;
        CHECK(trtshim_engine_weight_digests(e, after, 2) == TRTSHIM_ERR_VALIDATION, "%s: a packed constant unlike its copy",
              cc->label);
        CHECK(strstr(trtshim_last_error(), "'cm'") != NULL, "%s: message names the weight", cc->label);
        cp[0] ^= 0x01;
    }
    /* A byte of the folded convolution changed: the fold no longer matches, and the call says so. */
    unsigned char *fp = packed_of(e, "conv");
    CHECK(fp != NULL, "%s: no packed buffer for conv", cc->label);
    if (fp) {
        fp[0] ^= 0x01;
        uint64_t *out = calloc(2 * (size_t)info.num_weights, sizeof(uint64_t));
        CHECK(trtshim_engine_weight_digests(e, out, 2) == TRTSHIM_ERR_VALIDATION, "%s: a corrupt fold", cc->label);
        CHECK(strstr(trtshim_last_error(), "'conv'") != NULL && strstr(trtshim_last_error(), "'bn'") != NULL,
              "%s: message names the layers", cc->label);
        int untouched = 1;
        for (int32_t i = 0; i < 2 * info.num_weights; i++) untouched &= out[i] == 0;
        CHECK(untouched, "%s: a failed call wrote digests", cc->label);
        free(out);
        fp[0] ^= 0x01;
        OK(trtshim_engine_weight_digests(e, after, 2));
    }
    /* The fold's bias buffer changed: refused too. */
    for (int32_t i = 0; i < e->num_steps; i++)
        if (e->steps[i].kind == STEP_CONV && e->steps[i].members[0].bn_layer >= 0) {
            float *bias = e->buffers[e->steps[i].bias_buffer].data;
            float keep = bias[1];
            bias[1] = keep + 1.0f;
            CHECK(trtshim_engine_weight_digests(e, after, 2) == TRTSHIM_ERR_VALIDATION, "%s: a corrupt fold bias", cc->label);
            bias[1] = keep;
        }
    /* A weight read straight from a float32 buffer: a changed bias changes its digest. */
    for (int32_t i = 0; i < e->num_steps; i++)
        if (e->steps[i].kind == STEP_CONV && e->steps[i].members[0].bn_layer < 0) {
            float *bias = e->buffers[e->steps[i].bias_buffer].data;
            bias[0] += 1.0f;
            OK(trtshim_engine_weight_digests(e, after, 2));
            int32_t ib = index_of(e, W_CONV2B);
            CHECK(after[2 * ib] != before[2 * ib], "%s: conv2 bias digest unchanged", cc->label);
            bias[0] -= 1.0f;
        }
    free(before), free(after);

    /* Through an engine file (retained copies travel with it), and stripped: refused until filled. */
    uint64_t size;
    OK(trtshim_engine_serialized_size(e, 1, &size));
    uint8_t *file = malloc(size);
    OK(trtshim_engine_serialize(e, 1, file, size, &size));
    trtshim_engine *loaded = NULL;
    OK(trtshim_engine_deserialize(file, size, &loaded));
    if (loaded) compare_all(cc, loaded, "after deserialize");
    trtshim_engine_destroy(loaded);
    OK(trtshim_engine_serialized_size(e, 0, &size));
    file = realloc(file, size);
    OK(trtshim_engine_serialize(e, 0, file, size, &size));
    trtshim_engine *stripped = NULL;
    OK(trtshim_engine_deserialize(file, size, &stripped));
    if (stripped) {
        uint64_t out[2 * NUM_CASES];
        CHECK(trtshim_engine_weight_digests(stripped, out, 0) == TRTSHIM_ERR_STATE, "%s: a stripped engine reported", cc->label);
        CHECK(strstr(trtshim_last_error(), "weight '") != NULL, "%s: message names a weight", cc->label);
        refit_all(stripped);
        compare_all(cc, stripped, "after filling a stripped engine");
    }
    trtshim_engine_destroy(stripped);
    free(file);
    trtshim_engine_destroy(e);

    /* Built stripped: refused, then filled by a refit. */
    trtshim_engine *s = build(cc, 1, 0);
    if (s) {
        uint64_t out[2 * NUM_CASES];
        CHECK(trtshim_engine_weight_digests(s, out, 0) == TRTSHIM_ERR_STATE, "%s: a stripped build reported", cc->label);
        refit_all(s);
        compare_all(cc, s, "after filling a stripped build");
    }
    trtshim_engine_destroy(s);
}

/* A streaming engine under a budget that keeps some kernels resident: digests are read where a run reads
   them (the resident arena, filled by a run), so a changed host copy of a resident kernel does not show,
   and a changed arena copy does. */
static void test_streaming(void) {
    config_case cc = {"streaming fp16", TRTSHIM_FLOAT16, TRTSHIM_WEIGHT_FORMAT_AS_PRECISION, 128};
    fill(3);
    trtshim_engine *e = build(&cc, 0, 1);
    if (!e) return;
    compare_all(&cc, e, "streaming, before a run");
    uint64_t total;
    OK(trtshim_engine_streamable_weights_size(e, &total));
    OK(trtshim_engine_set_weight_streaming_budget(e, total));
    static float x[B * IN], z[IN * CN], img[CH * IMG * IMG], outs[9][4096];
    trtshim_context *c;
    OK(trtshim_context_create(e, &c));
    trtshim_context_set_tensor(c, "x", x, sizeof(x));
    trtshim_context_set_tensor(c, "z", z, sizeof(z));
    trtshim_context_set_tensor(c, "img", img, sizeof(img));
    const char *names[] = {"oq", "ok", "ov", "oh", "omul", "oln", "oconv", "oconv2", "og"};
    const uint64_t bytes[] = {B * QN, B * QN, B * QN, B * HN, IN * CN, B * CN, OC * IMG * IMG, OC * IMG * IMG, B * NIDX};
    for (int i = 0; i < 9; i++) OK(trtshim_context_set_tensor(c, names[i], outs[i], 4 * bytes[i]));
    OK(trtshim_context_execute(c));
    trtshim_context_destroy(c);
    compare_all(&cc, e, "streaming, resident after a run");
    uint64_t before[2 * NUM_CASES], after[2 * NUM_CASES];
    OK(trtshim_engine_weight_digests(e, before, 0));
    unsigned char *host = packed_of(e, "conv2");
    host[0] ^= 1;
    OK(trtshim_engine_weight_digests(e, after, 0));
    int32_t i2 = index_of(e, W_CONV2);
    CHECK(after[2 * i2] == before[2 * i2], "streaming: a resident kernel read from host storage");
    host[0] ^= 1;
    /* Budget 0: everything streams from host storage, which is then what is read. */
    OK(trtshim_engine_set_weight_streaming_budget(e, 0));
    host[0] ^= 1;
    OK(trtshim_engine_weight_digests(e, after, 0));
    CHECK(after[2 * i2] != before[2 * i2], "streaming: a streamed kernel not read from host storage");
    host[0] ^= 1;
    compare_all(&cc, e, "streaming, budget 0");
    /* Loaded from a file, the streamable kernels live in the mapped file: read from there. */
    char path[] = "/tmp/readback_test_XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0, "mkstemp");
    if (fd >= 0) {
        close(fd);
        OK(trtshim_engine_save(e, path, 1));
        trtshim_engine *loaded = NULL;
        OK(trtshim_engine_load(path, &loaded));
        if (loaded) {
            CHECK(loaded->file_map != NULL, "a loaded streaming engine maps its file");
            compare_all(&cc, loaded, "streaming, loaded from a file");
            fill(4);
            refit_all(loaded);
            compare_all(&cc, loaded, "streaming, loaded from a file and refitted");
        }
        trtshim_engine_destroy(loaded);
        unlink(path);
    }
    trtshim_engine_destroy(e);
}

int main(void) {
    const config_case configs[] = {
        {"float32", TRTSHIM_FLOAT32, TRTSHIM_WEIGHT_FORMAT_AS_PRECISION, 128},
        {"float16", TRTSHIM_FLOAT16, TRTSHIM_WEIGHT_FORMAT_AS_PRECISION, 128},
        {"bfloat16", TRTSHIM_BFLOAT16, TRTSHIM_WEIGHT_FORMAT_AS_PRECISION, 128},
        {"int8", TRTSHIM_FLOAT32, TRTSHIM_WEIGHT_FORMAT_INT8, 128},
        {"fp8", TRTSHIM_FLOAT32, TRTSHIM_WEIGHT_FORMAT_FP8_E4M3, 128},
        {"int4/32", TRTSHIM_FLOAT32, TRTSHIM_WEIGHT_FORMAT_INT4, 32},
        {"int4/128 on bfloat16", TRTSHIM_BFLOAT16, TRTSHIM_WEIGHT_FORMAT_INT4, 128},
    };
    for (size_t i = 0; i < sizeof(configs) / sizeof(configs[0]); i++) test_config(&configs[i]);
    for (size_t i = 0; i < sizeof(configs) / sizeof(configs[0]); i++) test_large(&configs[i]);
    test_streaming();
    {
        trtshim_engine_info info;
        uint64_t out[2];
        CHECK(trtshim_engine_weight_digests(NULL, out, 0) == TRTSHIM_ERR_ARGUMENT, "null engine");
        (void)info;
    }
    for (int c = 0; c < NUM_CASES; c++) free(cases[c].values);
    if (failures) fprintf(stderr, "readback_test: %d failures\n", failures);
    else printf("readback_test: ok\n");
    return failures ? 1 : 0;
}
