/* engine_test.c: the engine core: every layer kind runs, refit equals rebuild bit for bit, a failed
   refit changes nothing, engine files round-trip and damaged files are refused without crashing. */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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

/* ---- deterministic weights: a value per (seed, name, role, index) ----------------------------- */

static uint64_t mix(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    return x ^ (x >> 33);
}
static uint64_t hash_name(const char *s) {
    uint64_t h = 1469598103934665603ull;
    while (*s) h = (h ^ (uint8_t)*s++) * 1099511628211ull;
    return h;
}
static float value_at(uint64_t seed, const char *name, int role, int64_t i) {
    uint64_t h = mix(seed * 0x9e3779b97f4a7c15ull ^ hash_name(name) ^ ((uint64_t)role << 56) ^ (uint64_t)i * 0x632be59bd9b4e019ull);
    float u = (float)(h >> 40) / (float)(1 << 24); /* [0, 1) */
    if (role == TRTSHIM_ROLE_VARIANCE) return 0.5f + u;
    if (role == TRTSHIM_ROLE_SCALE) return 0.5f + u;
    return u - 0.5f;
}

/* float32 -> float16 bits, round to nearest even (test-side, independent of the library). */
static uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, exp = (x >> 23) & 0xff, man = x & 0x7fffff;
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00 | (man ? 0x200 : 0));
    int e = (int)exp - 127 + 15;
    if (e >= 31) return (uint16_t)(sign | 0x7c00);
    if (e <= 0) {
        if (e < -10) return (uint16_t)sign;
        man |= 0x800000;
        int shift = 14 - e;
        uint32_t half = man >> shift, rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = ((uint32_t)e << 10) | (man >> 13), rem = man & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) half++;
    return (uint16_t)(sign | half);
}

/* Weights for the network under construction; kept alive until the network is destroyed. */
typedef struct {
    uint64_t seed;
    trtshim_dtype dtype; /* declared dtype of float weights */
    void *allocs[256];
    int n;
} weight_source;

static trtshim_weights make_weights(weight_source *ws, const char *name, int role, int64_t count) {
    trtshim_weights w = {ws->dtype, NULL, count};
    if (ws->dtype == TRTSHIM_FLOAT16) {
        uint16_t *v = malloc(sizeof(uint16_t) * (size_t)count);
        for (int64_t i = 0; i < count; i++) v[i] = f32_to_f16(value_at(ws->seed, name, role, i));
        w.values = v;
    } else {
        float *v = malloc(sizeof(float) * (size_t)count);
        for (int64_t i = 0; i < count; i++) v[i] = value_at(ws->seed, name, role, i);
        w.values = v;
    }
    ws->allocs[ws->n++] = (void *)w.values;
    return w;
}
static void free_weights(weight_source *ws) {
    for (int i = 0; i < ws->n; i++) free(ws->allocs[i]);
    ws->n = 0;
}

/* ---- the refit test network ------------------------------------------------------------------ */

/* conv+bn+relu, global pool, q/k/v siblings, fc+bias+gelu, fc + added constant bias + relu. */
static trtshim_network *fusion_net(weight_source *ws) {
    trtshim_network *n;
    OK(trtshim_network_create(&n));
    int32_t x, t, c, q, k, v, h, f2, o;
    int64_t dims[4] = {2, 3, 6, 6};
    OK(trtshim_network_add_input(n, "x", TRTSHIM_FLOAT32, 4, dims, &x));
    trtshim_conv_params cp = {8, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    trtshim_weights ck = make_weights(ws, "conv1", TRTSHIM_ROLE_KERNEL, 8 * 3 * 9);
    trtshim_weights cb = make_weights(ws, "conv1", TRTSHIM_ROLE_BIAS, 8);
    OK(trtshim_network_add_convolution(n, "conv1", x, &cp, &ck, &cb, &t));
    trtshim_weights s = make_weights(ws, "bn1", TRTSHIM_ROLE_SCALE, 8), sh = make_weights(ws, "bn1", TRTSHIM_ROLE_SHIFT, 8);
    trtshim_weights m = make_weights(ws, "bn1", TRTSHIM_ROLE_MEAN, 8), va = make_weights(ws, "bn1", TRTSHIM_ROLE_VARIANCE, 8);
    OK(trtshim_network_add_batch_norm(n, "bn1", t, 1e-5f, &s, &sh, &m, &va, &t));
    OK(trtshim_network_add_unary(n, "relu1", t, TRTSHIM_UNARY_RELU, &t));
    trtshim_conv_params cp2 = {8, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 2}; /* grouped 1x1 */
    trtshim_weights ck2 = make_weights(ws, "conv2", TRTSHIM_ROLE_KERNEL, 8 * 4);
    OK(trtshim_network_add_convolution(n, "conv2", t, &cp2, &ck2, NULL, &t));
    trtshim_pool_params pp = {2, 2, 2, 2, 0, 0, 0, 0, 0};
    OK(trtshim_network_add_pooling(n, "pool", t, TRTSHIM_POOL_AVERAGE, &pp, &t));
    int64_t flat[2] = {2, -1};
    OK(trtshim_network_add_reshape(n, "flat", t, 2, flat, &c)); /* [2, 72] */
    trtshim_weights qk = make_weights(ws, "q", TRTSHIM_ROLE_KERNEL, 16 * 72), qb = make_weights(ws, "q", TRTSHIM_ROLE_BIAS, 16);
    trtshim_weights kk = make_weights(ws, "k", TRTSHIM_ROLE_KERNEL, 16 * 72);
    trtshim_weights vk = make_weights(ws, "v", TRTSHIM_ROLE_KERNEL, 24 * 72), vb = make_weights(ws, "v", TRTSHIM_ROLE_BIAS, 24);
    OK(trtshim_network_add_fully_connected(n, "q", c, 16, &qk, &qb, &q));
    OK(trtshim_network_add_fully_connected(n, "k", c, 16, &kk, NULL, &k));
    OK(trtshim_network_add_fully_connected(n, "v", c, 24, &vk, &vb, &v));
    trtshim_weights hk = make_weights(ws, "fc1", TRTSHIM_ROLE_KERNEL, 32 * 72), hb = make_weights(ws, "fc1", TRTSHIM_ROLE_BIAS, 32);
    OK(trtshim_network_add_fully_connected(n, "fc1", c, 32, &hk, &hb, &h));
    OK(trtshim_network_add_unary(n, "gelu1", h, TRTSHIM_UNARY_GELU_ERF, &h));
    trtshim_weights f2k = make_weights(ws, "fc2", TRTSHIM_ROLE_KERNEL, 16 * 32);
    OK(trtshim_network_add_fully_connected(n, "fc2", h, 16, &f2k, NULL, &f2));
    int64_t bd[2] = {1, 16};
    trtshim_weights f2b = make_weights(ws, "fc2_bias", TRTSHIM_ROLE_CONSTANT, 16);
    int32_t bc;
    OK(trtshim_network_add_constant(n, "fc2_bias", 2, bd, &f2b, &bc));
    OK(trtshim_network_add_elementwise(n, "fc2_add", f2, bc, TRTSHIM_ELEMENTWISE_ADD, &f2));
    OK(trtshim_network_add_unary(n, "fc2_relu", f2, TRTSHIM_UNARY_TANH, &f2));
    int32_t parts[4] = {q, k, v, f2};
    OK(trtshim_network_add_concatenation(n, "cat", 4, parts, 1, &o));
    OK(trtshim_network_add_layer_norm(n, "ln", o, -1, 1e-5f, NULL, NULL, &o));
    OK(trtshim_network_mark_output(n, o, "y"));
    return n;
}

static float *input_values(int64_t count, uint64_t seed) {
    float *x = malloc(sizeof(float) * (size_t)count);
    for (int64_t i = 0; i < count; i++) x[i] = value_at(seed, "input", 0, i) * 4.0f;
    return x;
}

/* Runs an engine with one float32 input "x" and one output "y". */
static int run1(trtshim_engine *e, const float *x, uint64_t xbytes, float *y, uint64_t ybytes) {
    trtshim_context *c;
    if (trtshim_context_create(e, &c)) return -1;
    int st = trtshim_context_set_tensor(c, "x", (void *)x, xbytes);
    if (!st) st = trtshim_context_set_tensor(c, "y", y, ybytes);
    if (!st) st = trtshim_context_execute(c);
    trtshim_context_destroy(c);
    return st;
}

#define XN (2 * 3 * 6 * 6)
#define YN (2 * 72)

static trtshim_engine *build_with(uint64_t seed, trtshim_dtype declared, trtshim_dtype precision, int strip) {
    weight_source ws = {seed, declared, {0}, 0};
    trtshim_network *n = fusion_net(&ws);
    trtshim_build_config cfg;
    trtshim_build_config_default(&cfg);
    cfg.weight_precision = precision;
    cfg.strip_weights = strip;
    cfg.num_threads = 2;
    trtshim_engine *e = NULL;
    OK(trtshim_build(n, &cfg, &e));
    trtshim_network_destroy(n);
    free_weights(&ws);
    return e;
}

/* Stages every weight of the engine whose (name) passes `filter`, with values of `seed`. */
static int stage(trtshim_refitter *r, trtshim_engine *e, uint64_t seed, trtshim_dtype declared, const char *only,
                 weight_source *ws) {
    trtshim_engine_info info;
    trtshim_engine_get_info(e, &info);
    int staged = 0;
    for (int32_t i = 0; i < info.num_weights; i++) {
        const char *name;
        trtshim_role role;
        trtshim_dtype dtype;
        int32_t rank;
        int64_t dims[8];
        uint64_t bytes;
        OK(trtshim_engine_weight(e, i, &name, &role, &dtype, &rank, dims, &bytes));
        if (only && strcmp(only, name) != 0) continue;
        int64_t count = 1;
        for (int32_t d = 0; d < rank; d++) count *= dims[d];
        ws->dtype = dtype == TRTSHIM_FLOAT16 ? TRTSHIM_FLOAT16 : TRTSHIM_FLOAT32;
        ws->seed = seed;
        trtshim_weights w = make_weights(ws, name, role, count);
        CHECK(dtype == declared, "declared dtype of %s", name);
        OK(trtshim_refitter_set_weights(r, name, role, &w));
        staged++;
    }
    return staged;
}

static void test_refit_equals_rebuild(trtshim_dtype declared, trtshim_dtype precision) {
    float *x = input_values(XN, 7);
    float ya[YN], yb[YN], yr[YN];
    trtshim_engine *ea = build_with(1, declared, precision, 0), *eb = build_with(2, declared, precision, 0);
    if (!ea || !eb) return;
    CHECK(run1(ea, x, sizeof(float) * XN, ya, sizeof(ya)) == 0, "run A");
    CHECK(run1(eb, x, sizeof(float) * XN, yb, sizeof(yb)) == 0, "run B");
    CHECK(memcmp(ya, yb, sizeof(ya)) != 0, "different weights give different outputs");
    for (int i = 0; i < YN; i++) CHECK(isfinite(ya[i]), "finite output %d", i);

    /* Fusions happened: conv+bn+relu in one step, q/k/v in one GEMM, fc2+add+tanh in one step. */
    char desc[8192];
    uint64_t len;
    OK(trtshim_engine_describe(ea, desc, sizeof(desc), &len));
    CHECK(strstr(desc, "\"layers\":[\"conv1\",\"bn1\",\"relu1\"]") != NULL, "conv+bn+relu fused: %s", desc);
    CHECK(strstr(desc, "\"layers\":[\"q\",\"k\",\"v\"]") != NULL, "q/k/v concatenated: %s", desc);
    CHECK(strstr(desc, "\"layers\":[\"fc1\",\"gelu1\"]") != NULL, "fc+gelu fused: %s", desc);
    CHECK(strstr(desc, "\"layers\":[\"fc2\",\"fc2_add\",\"fc2_relu\"]") != NULL, "fc+add+act fused: %s", desc);

    /* Full refit A -> B equals a build with B. */
    trtshim_refitter *r;
    weight_source ws = {0, declared, {0}, 0};
    OK(trtshim_refitter_create(ea, &r));
    stage(r, ea, 2, declared, NULL, &ws);
    OK(trtshim_refitter_apply(r));
    free_weights(&ws);
    CHECK(run1(ea, x, sizeof(float) * XN, yr, sizeof(yr)) == 0, "run refitted");
    CHECK(memcmp(yr, yb, sizeof(yr)) == 0, "refit(A->B) == build(B), precision %d", (int)precision);

    /* Partial refits through the retained fold copies and column ranges: back to A one layer at a time. */
    const char *layers[] = {"bn1", "conv1", "k", "q", "v", "fc1", "fc2", "fc2_bias", "conv2"};
    for (int i = 0; i < 9; i++) {
        stage(r, ea, 1, declared, layers[i], &ws);
        int32_t missing = -1;
        OK(trtshim_refitter_missing_count(r, &missing));
        CHECK(missing == 0, "nothing missing with retained copies (%s)", layers[i]);
        OK(trtshim_refitter_apply(r));
        free_weights(&ws);
    }
    CHECK(run1(ea, x, sizeof(float) * XN, yr, sizeof(yr)) == 0, "run refitted back");
    CHECK(memcmp(yr, ya, sizeof(yr)) == 0, "layer-by-layer refit(B->A) == build(A)");

    /* A failed refit (one weight non-finite, checked) leaves the engine exactly as it was. */
    OK(trtshim_refitter_set_check_finite(r, 1));
    OK(trtshim_refitter_set_check_finite(r, 0));
    stage(r, ea, 2, declared, NULL, &ws);
    OK(trtshim_refitter_set_check_finite(r, 1));
    weight_source bad = {3, TRTSHIM_FLOAT32, {0}, 0};
    trtshim_weights nanw = make_weights(&bad, "fc1", TRTSHIM_ROLE_BIAS, 32);
    if (declared == TRTSHIM_FLOAT16) {
        uint16_t *h = malloc(64);
        for (int i = 0; i < 32; i++) h[i] = i == 5 ? 0x7e00 : 0x3c00;
        nanw.values = h, nanw.dtype = TRTSHIM_FLOAT16;
        bad.allocs[bad.n++] = h;
    } else {
        ((float *)nanw.values)[5] = NAN;
    }
    CHECK(trtshim_refitter_set_weights(r, "fc1", TRTSHIM_ROLE_BIAS, &nanw) == TRTSHIM_ERR_VALIDATION, "NaN refused at set");
    OK(trtshim_refitter_set_check_finite(r, 0));
    OK(trtshim_refitter_set_weights(r, "fc1", TRTSHIM_ROLE_BIAS, &nanw));
    OK(trtshim_refitter_set_check_finite(r, 1));
    CHECK(trtshim_refitter_validate(r) == TRTSHIM_ERR_VALIDATION, "validate refuses NaN");
    CHECK(trtshim_refitter_validate(r) == TRTSHIM_ERR_VALIDATION, "validate keeps the staged weights");
    CHECK(trtshim_refitter_apply(r) == TRTSHIM_ERR_VALIDATION, "apply refuses NaN");
    CHECK(strstr(trtshim_last_error(), "fc1") != NULL, "message names the weight: %s", trtshim_last_error());
    free_weights(&ws);
    free_weights(&bad);
    CHECK(run1(ea, x, sizeof(float) * XN, yr, sizeof(yr)) == 0, "run after failed refit");
    CHECK(memcmp(yr, ya, sizeof(yr)) == 0, "failed refit left the outputs identical");

    /* Wrong dtype / count / name are refused at set_weights with a message. */
    float small[4] = {0};
    trtshim_weights wrong = {TRTSHIM_FLOAT32, small, 4};
    CHECK(trtshim_refitter_set_weights(r, "q", TRTSHIM_ROLE_KERNEL, &wrong) == TRTSHIM_ERR_ARGUMENT, "count refused");
    CHECK(strstr(trtshim_last_error(), "expected") != NULL, "message: %s", trtshim_last_error());
    CHECK(trtshim_refitter_set_weights(r, "nope", TRTSHIM_ROLE_KERNEL, &wrong) == TRTSHIM_ERR_NOT_FOUND, "name refused");
    CHECK(trtshim_refitter_set_weights(r, "k", TRTSHIM_ROLE_BIAS, &wrong) == TRTSHIM_ERR_NOT_FOUND, "role refused");
    trtshim_refitter_destroy(r);

    /* Stripped engine: lists weights, refuses to run, and after a full refit equals the full engine. */
    trtshim_engine *es = build_with(99, declared, precision, 1);
    trtshim_engine_info info;
    OK(trtshim_engine_get_info(es, &info));
    CHECK(info.has_weights == 0 && info.num_weights > 10, "stripped info");
    CHECK(run1(es, x, sizeof(float) * XN, yr, sizeof(yr)) == TRTSHIM_ERR_STATE, "stripped refuses to run");
    OK(trtshim_refitter_create(es, &r));
    int32_t missing = 0;
    OK(trtshim_refitter_missing_count(r, &missing));
    CHECK(missing == info.num_weights, "every weight missing: %d of %d", missing, info.num_weights);
    stage(r, es, 2, declared, "q", &ws);
    CHECK(trtshim_refitter_validate(r) == TRTSHIM_ERR_VALIDATION, "validate: partial refit of stripped refused");
    CHECK(trtshim_refitter_apply(r) == TRTSHIM_ERR_VALIDATION, "partial refit of stripped refused");
    free_weights(&ws);
    CHECK(run1(es, x, sizeof(float) * XN, yr, sizeof(yr)) == TRTSHIM_ERR_STATE, "still refuses to run");
    stage(r, es, 2, declared, NULL, &ws);
    OK(trtshim_refitter_missing_count(r, &missing));
    CHECK(missing == 0, "nothing missing after staging all");
    OK(trtshim_refitter_validate(r));
    OK(trtshim_refitter_apply(r));
    free_weights(&ws);
    trtshim_refitter_destroy(r);
    CHECK(run1(es, x, sizeof(float) * XN, yr, sizeof(yr)) == 0, "stripped runs after refit");
    CHECK(memcmp(yr, yb, sizeof(yr)) == 0, "stripped + full refit == build(B)");

    trtshim_engine_destroy(es);
    trtshim_engine_destroy(ea);
    trtshim_engine_destroy(eb);
    free(x);
}

/* ---- refit while executing ------------------------------------------------------------------- */

typedef struct {
    trtshim_engine *engine;
    const float *x, *ya, *yb;
    int runs, refused, wrong, other;
} runner_state;

static void *runner(void *arg) {
    runner_state *s = arg;
    trtshim_context *c;
    float y[YN];
    if (trtshim_context_create(s->engine, &c)) return NULL;
    trtshim_context_set_tensor(c, "x", (void *)s->x, sizeof(float) * XN);
    trtshim_context_set_tensor(c, "y", y, sizeof(y));
    /* A refused execute returns at once, so count attempts generously and stop after enough real runs. */
    for (int i = 0; i < 5000000 && s->runs < 200; i++) {
        int st = trtshim_context_execute(c);
        if (st == TRTSHIM_ERR_STATE) s->refused++;
        else if (st != TRTSHIM_OK) s->other++;
        else if (memcmp(y, s->ya, sizeof(y)) != 0 && memcmp(y, s->yb, sizeof(y)) != 0) s->wrong++;
        else s->runs++;
    }
    trtshim_context_destroy(c);
    return NULL;
}

/* Each execute sees the weights of A or of B, never a mix; a refit during a run is refused, not torn. */
static void test_refit_during_execute(void) {
    float *x = input_values(XN, 13);
    float ya[YN], yb[YN];
    trtshim_engine *e = build_with(1, TRTSHIM_FLOAT32, TRTSHIM_FLOAT32, 0), *eb = build_with(2, TRTSHIM_FLOAT32, TRTSHIM_FLOAT32, 0);
    if (!e || !eb) return;
    CHECK(run1(e, x, sizeof(float) * XN, ya, sizeof(ya)) == 0, "run A");
    CHECK(run1(eb, x, sizeof(float) * XN, yb, sizeof(yb)) == 0, "run B");
    runner_state s = {e, x, ya, yb, 0, 0, 0, 0};
    pthread_t thread;
    pthread_create(&thread, NULL, runner, &s);
    trtshim_refitter *r;
    OK(trtshim_refitter_create(e, &r));
    weight_source ws = {0, TRTSHIM_FLOAT32, {0}, 0};
    int applied = 0, refused = 0;
    for (int i = 0; i < 60; i++) {
        stage(r, e, 1 + (uint64_t)(i % 2 == 0), TRTSHIM_FLOAT32, NULL, &ws);
        int st = trtshim_refitter_apply(r);
        free_weights(&ws);
        if (st == TRTSHIM_OK) applied++;
        else if (st == TRTSHIM_ERR_STATE) refused++;
        else CHECK(0, "apply gave status %d", st);
    }
    pthread_join(thread, NULL);
    stage(r, e, 2, TRTSHIM_FLOAT32, NULL, &ws);
    OK(trtshim_refitter_apply(r)); /* nothing executing now: it must go through */
    free_weights(&ws);
    trtshim_refitter_destroy(r);
    CHECK(s.wrong == 0 && s.other == 0, "%d runs saw mixed weights, %d failed otherwise", s.wrong, s.other);
    CHECK(s.runs > 0, "some runs went through: %d", s.runs);
    printf("refit during execute: %d refits applied, %d refused; %d runs, %d refused\n", applied, refused, s.runs, s.refused);
    trtshim_engine_destroy(e);
    trtshim_engine_destroy(eb);
    free(x);
}

/* The file format's checksum (four FNV-1a lanes over 64-bit words, folded, then the tail), so a test
   can forge a damaged
   file whose checksums are right and reach the parser's own checks. */
static uint64_t file_checksum(const uint8_t *p, uint64_t n) {
    /* Four independent FNV-1a lanes over 64-bit words (lane = word index mod 4), folded in order, then
       the tail bytes: each step is a bijection of the state, so any change of one word changes the sum. */
    const uint64_t prime = 0x100000001b3ull;
    uint64_t lane[4] = {0xcbf29ce484222325ull, 0x84222325cbf29ce4ull, 0xcbf29ce4ull, 0x84222325ull};
    uint64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        uint64_t w[4];
        memcpy(w, p + i, 32);
        for (int j = 0; j < 4; j++) lane[j] = (lane[j] ^ w[j]) * prime;
    }
    uint64_t h = 0xcbf29ce484222325ull;
    for (int j = 0; j < 4; j++) h = (h ^ lane[j]) * prime;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        h = (h ^ w) * prime;
    }
    for (; i < n; i++) h = (h ^ p[i]) * prime;
    return h;
}

static void fix_checksums(uint8_t *buf, uint64_t size) {
    uint32_t nsec;
    memcpy(&nsec, buf + 16, 4);
    for (uint32_t i = 0; i < nsec && i < 16; i++) {
        uint8_t *entry = buf + 32 + i * 32;
        uint64_t off, len;
        memcpy(&off, entry + 8, 8);
        memcpy(&len, entry + 16, 8);
        if (off > size || len > size - off) continue;
        uint64_t sum = file_checksum(buf + off, len);
        memcpy(entry + 24, &sum, 8);
    }
    uint64_t whole = file_checksum(buf, size - 8);
    memcpy(buf + size - 8, &whole, 8);
}

/* Damaged files with correct checksums: the parser's own checks must refuse them or yield an engine
   that runs; never a crash. */
static void fuzz_forged(uint8_t *buf, uint64_t size, const float *x) {
    uint8_t *copy = malloc(size);
    float y[YN];
    int loaded = 0, every = getenv("TRT_REFIT_FUZZ") != NULL;
    uint64_t step = every || size < 8000 ? 1 : size / 8000 + 1;
    for (uint64_t i = 8; i + 8 < size; i += step)
        for (int v = 0; v < 2; v++) {
            memcpy(copy, buf, size);
            copy[i] = v ? (uint8_t)(copy[i] + 1) : 0xff;
            fix_checksums(copy, size);
            trtshim_engine *f = NULL;
            int st = trtshim_engine_deserialize(copy, size, &f);
            if (st == TRTSHIM_OK) {
                loaded++;
                trtshim_engine_info info;
                trtshim_engine_get_info(f, &info);
                if (info.has_weights) run1(f, x, sizeof(float) * XN, y, sizeof(y));
            }
            CHECK(st == TRTSHIM_OK || st == TRTSHIM_ERR_CORRUPT || st == TRTSHIM_ERR_VERSION ||
                      st == TRTSHIM_ERR_UNSUPPORTED || st == TRTSHIM_ERR_MEMORY,
                  "forged flip at %llu gave status %d", (unsigned long long)i, st);
            trtshim_engine_destroy(f);
        }
    printf("forged flips: %d of the damaged files still loaded (a changed weight value, say)\n", loaded);
    free(copy);
}

/* ---- serialization -------------------------------------------------------------------------- */

static void test_serialize(void) {
    float *x = input_values(XN, 11);
    float y0[YN], y1[YN];
    trtshim_engine *e = build_with(5, TRTSHIM_FLOAT32, TRTSHIM_BFLOAT16, 0);
    if (!e) return;
    CHECK(run1(e, x, sizeof(float) * XN, y0, sizeof(y0)) == 0, "run");
    for (int include = 1; include >= 0; include--) {
        uint64_t size = 0, written = 0;
        OK(trtshim_engine_serialized_size(e, include, &size));
        uint8_t *buf = malloc(size);
        CHECK(trtshim_engine_serialize(e, include, buf, size - 1, &written) == TRTSHIM_ERR_ARGUMENT, "small buffer");
        OK(trtshim_engine_serialize(e, include, buf, size, &written));
        CHECK(written == size, "written %llu of %llu", (unsigned long long)written, (unsigned long long)size);
        trtshim_engine *d = NULL;
        OK(trtshim_engine_deserialize(buf, size, &d));
        if (d && include) {
            CHECK(run1(d, x, sizeof(float) * XN, y1, sizeof(y1)) == 0, "run deserialized");
            CHECK(memcmp(y0, y1, sizeof(y0)) == 0, "deserialized engine is bit-identical");
            /* its retained copies came along: a partial refit works and matches the original's */
            trtshim_refitter *r;
            weight_source ws = {0, TRTSHIM_FLOAT32, {0}, 0};
            OK(trtshim_refitter_create(d, &r));
            stage(r, d, 6, TRTSHIM_FLOAT32, "bn1", &ws);
            int32_t missing = -1;
            OK(trtshim_refitter_missing_count(r, &missing));
            CHECK(missing == 0, "retained copies survive serialization");
            trtshim_refitter_destroy(r);
            free_weights(&ws);
            uint64_t size2 = 0;
            OK(trtshim_engine_serialized_size(d, 1, &size2));
            uint8_t *buf2 = malloc(size2);
            OK(trtshim_engine_serialize(d, 1, buf2, size2, &written));
            CHECK(size2 == size && memcmp(buf, buf2, size) == 0, "re-serialization is byte-identical");
            free(buf2);
        }
        if (d && !include) {
            trtshim_engine_info info;
            OK(trtshim_engine_get_info(d, &info));
            CHECK(info.has_weights == 0, "stripped file has no weights");
            trtshim_refitter *r;
            weight_source ws = {0, TRTSHIM_FLOAT32, {0}, 0};
            OK(trtshim_refitter_create(d, &r));
            stage(r, d, 5, TRTSHIM_FLOAT32, NULL, &ws);
            OK(trtshim_refitter_apply(r));
            trtshim_refitter_destroy(r);
            free_weights(&ws);
            CHECK(run1(d, x, sizeof(float) * XN, y1, sizeof(y1)) == 0, "run refitted stripped file");
            CHECK(memcmp(y0, y1, sizeof(y0)) == 0, "stripped file + refit == full engine");
        }
        trtshim_engine_destroy(d);

        /* Every single-byte flip and every truncation is refused as corrupt. For large files, a stride
           keeps it fast; set TRT_REFIT_FUZZ=1 for every offset. */
        int every = getenv("TRT_REFIT_FUZZ") != NULL;
        uint64_t step = every || size < 20000 ? 1 : size / 20000 + 1;
        int bad_status = 0;
        printf("engine file (%s): %llu bytes\n", include ? "with weights" : "stripped", (unsigned long long)size);
        for (uint64_t i = 0; i < size; i += (i < 4096 ? 1 : step)) {
            buf[i] ^= 0x5a;
            trtshim_engine *f = NULL;
            int st = trtshim_engine_deserialize(buf, size, &f);
            if (st != TRTSHIM_ERR_CORRUPT) bad_status++;
            trtshim_engine_destroy(f);
            buf[i] ^= 0x5a;
        }
        CHECK(bad_status == 0, "%d byte flips not reported as corrupt", bad_status);
        bad_status = 0;
        for (uint64_t n = 0; n < size; n += (n < 4096 ? 1 : step)) {
            trtshim_engine *f = NULL;
            if (trtshim_engine_deserialize(buf, n, &f) != TRTSHIM_ERR_CORRUPT) bad_status++;
            trtshim_engine_destroy(f);
        }
        CHECK(bad_status == 0, "%d truncations not reported as corrupt", bad_status);
        fuzz_forged(buf, size, x);
        free(buf);
    }

    /* save / load through a file */
    char path[] = "/tmp/trtshim_engine_test_XXXXXX";
    int fd = mkstemp(path);
    if (fd >= 0) close(fd);
    OK(trtshim_engine_save(e, path, 1));
    trtshim_engine *l = NULL;
    OK(trtshim_engine_load(path, &l));
    if (l) {
        CHECK(run1(l, x, sizeof(float) * XN, y1, sizeof(y1)) == 0, "run loaded");
        CHECK(memcmp(y0, y1, sizeof(y0)) == 0, "loaded engine is bit-identical");
    }
    trtshim_engine_destroy(l);
    unlink(path);
    CHECK(trtshim_engine_load("/nonexistent/dir/engine.bin", &l) == TRTSHIM_ERR_NOT_FOUND, "missing file");
    trtshim_engine_destroy(e);
    free(x);
}

int main(void) {
    test_refit_equals_rebuild(TRTSHIM_FLOAT32, TRTSHIM_FLOAT32);
    test_refit_equals_rebuild(TRTSHIM_FLOAT32, TRTSHIM_FLOAT16);
    test_refit_equals_rebuild(TRTSHIM_FLOAT16, TRTSHIM_FLOAT16);
    test_refit_equals_rebuild(TRTSHIM_FLOAT16, TRTSHIM_FLOAT32);
    test_serialize();
    test_refit_during_execute();
    if (failures) {
        fprintf(stderr, "engine_test: %d checks failed\n", failures);
        return 1;
    }
    printf("engine_test: ok\n");
    return 0;
}
