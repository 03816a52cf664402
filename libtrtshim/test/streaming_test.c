/* streaming_test.c: weight streaming. Outputs are bit-identical to an engine without streaming at every
   budget; the engine's accounting keeps resident weight memory within budget + window; a budget change
   during a run is refused and changes nothing; refit of a streaming engine (built, or loaded with its
   file mapped) equals a rebuild; and, in a fresh process, the process's anonymous memory grows by no more
   than budget + window (+ what is not streamable) when a big streaming engine is loaded and run. */
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

static uint64_t mix(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    return x ^ (x >> 33);
}
static void fill(float *v, int64_t n, uint64_t seed, float scale) {
    for (int64_t i = 0; i < n; i++) v[i] = ((float)(mix(seed * 0x9e3779b97f4a7c15ull + (uint64_t)i) >> 40) / (float)(1 << 24) - 0.5f) * scale;
}

/* An MLP: input [rows, dims[0]], then fully connected layers to dims[1..n] (bias, relu between), plus a
   convolution branch when `conv` is set (a small image through conv + batch norm). Weights from
   `seed`. */
typedef struct {
    int rows, num_fc, conv;
    const int *dims;
} mlp_shape;

static trtshim_network *make_net(const mlp_shape *m, uint64_t seed) {
    trtshim_network *net;
    if (trtshim_network_create(&net)) return NULL;
    int64_t in_dims[2] = {m->rows, m->dims[0]};
    int32_t t;
    OK(trtshim_network_add_input(net, "x", TRTSHIM_FLOAT32, 2, in_dims, &t));
    for (int i = 0; i < m->num_fc; i++) {
        int64_t in = m->dims[i], out = m->dims[i + 1];
        float *k = malloc(sizeof(float) * (size_t)(in * out)), *b = malloc(sizeof(float) * (size_t)out);
        fill(k, in * out, seed * 131 + (uint64_t)i, 2.0f / (float)in);
        fill(b, out, seed * 131 + 1000 + (uint64_t)i, 0.2f);
        trtshim_weights kw = {TRTSHIM_FLOAT32, k, in * out}, bw = {TRTSHIM_FLOAT32, b, out};
        char name[32];
        snprintf(name, sizeof(name), "fc%d", i);
        OK(trtshim_network_add_fully_connected(net, name, t, out, &kw, &bw, &t));
        free(k), free(b);
        if (i + 1 < m->num_fc) {
            snprintf(name, sizeof(name), "relu%d", i);
            OK(trtshim_network_add_unary(net, name, t, TRTSHIM_UNARY_RELU, &t));
        }
    }
    OK(trtshim_network_mark_output(net, t, "y"));
    if (m->conv) {
        int64_t img[4] = {1, 3, 8, 8};
        int32_t c;
        OK(trtshim_network_add_input(net, "img", TRTSHIM_FLOAT32, 4, img, &c));
        trtshim_conv_params p = {8, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1};
        float k[8 * 3 * 9], sc[8], sh[8], mean[8], var[8];
        fill(k, 8 * 3 * 9, seed + 77, 0.5f);
        fill(sc, 8, seed + 78, 0.5f), fill(sh, 8, seed + 79, 0.5f), fill(mean, 8, seed + 80, 0.5f), fill(var, 8, seed + 81, 0.5f);
        for (int i = 0; i < 8; i++) sc[i] += 1.0f, var[i] += 1.0f;
        trtshim_weights kw = {TRTSHIM_FLOAT32, k, 8 * 3 * 9}, s1 = {TRTSHIM_FLOAT32, sc, 8}, s2 = {TRTSHIM_FLOAT32, sh, 8},
                        s3 = {TRTSHIM_FLOAT32, mean, 8}, s4 = {TRTSHIM_FLOAT32, var, 8};
        OK(trtshim_network_add_convolution(net, "conv", c, &p, &kw, NULL, &c));
        OK(trtshim_network_add_batch_norm(net, "bn", c, 1e-5f, &s1, &s2, &s3, &s4, &c));
        OK(trtshim_network_mark_output(net, c, "z"));
    }
    return net;
}

static trtshim_engine *build(const mlp_shape *m, uint64_t seed, int streaming, int threads) {
    trtshim_network *net = make_net(m, seed);
    trtshim_build_config cfg;
    trtshim_build_config_default(&cfg);
    cfg.weight_streaming = streaming;
    cfg.num_threads = threads;
    trtshim_engine *e = NULL;
    OK(trtshim_build(net, &cfg, &e));
    trtshim_network_destroy(net);
    return e;
}

typedef struct {
    float *x, *img, *y, *z;
    int64_t nx, ny;
} io;

static io io_new(const mlp_shape *m) {
    io b = {0};
    b.nx = (int64_t)m->rows * m->dims[0];
    b.ny = (int64_t)m->rows * m->dims[m->num_fc];
    b.x = malloc(sizeof(float) * (size_t)b.nx);
    b.y = calloc((size_t)b.ny, sizeof(float));
    b.img = malloc(sizeof(float) * 192);
    b.z = calloc(512, sizeof(float));
    fill(b.x, b.nx, 4242, 2.0f);
    fill(b.img, 192, 4343, 2.0f);
    return b;
}
static void io_free(io *b) { free(b->x), free(b->y), free(b->img), free(b->z); }

static trtshim_status run(trtshim_context *c, const mlp_shape *m, io *b) {
    trtshim_status st = trtshim_context_set_tensor(c, "x", b->x, (uint64_t)b->nx * 4);
    if (!st) st = trtshim_context_set_tensor(c, "y", b->y, (uint64_t)b->ny * 4);
    if (!st && m->conv) st = trtshim_context_set_tensor(c, "img", b->img, 192 * 4);
    if (!st && m->conv) st = trtshim_context_set_tensor(c, "z", b->z, 512 * 4);
    if (!st) st = trtshim_context_execute(c);
    return st;
}

static int same(const io *a, const io *b, int conv) {
    return memcmp(a->y, b->y, (size_t)a->ny * 4) == 0 && (!conv || memcmp(a->z, b->z, 512 * 4) == 0);
}

static trtshim_weight_streaming_stats stats_of(trtshim_engine *e) {
    trtshim_weight_streaming_stats s;
    OK(trtshim_engine_weight_streaming_stats(e, &s));
    return s;
}

/* Every budget gives the reference outputs, and the accounting stays within budget + window. */
static void test_budgets(void) {
    static const int dims[] = {48, 96, 40, 200, 64, 17};
    mlp_shape m = {5, 5, 1, dims};
    for (int threads = 1; threads <= 2; threads++) {
        trtshim_engine *ref = build(&m, 1, 0, threads), *e = build(&m, 1, 1, threads);
        io want = io_new(&m), got = io_new(&m);
        trtshim_context *rc, *c;
        OK(trtshim_context_create(ref, &rc));
        OK(trtshim_context_create(e, &c));
        OK(run(rc, &m, &want));
        uint64_t total = 0, budget = 0, scratch = 0;
        OK(trtshim_engine_streamable_weights_size(e, &total));
        OK(trtshim_engine_weight_streaming_budget(e, &budget));
        CHECK(total > 0 && budget == total, "a new engine streams nothing: total %llu budget %llu", (unsigned long long)total,
              (unsigned long long)budget);
        uint64_t ref_total = 1;
        OK(trtshim_engine_streamable_weights_size(ref, &ref_total));
        CHECK(ref_total == 0, "an engine built without streaming has nothing streamable (%llu)", (unsigned long long)ref_total);
        CHECK(trtshim_engine_set_weight_streaming_budget(ref, 0) == TRTSHIM_ERR_STATE, "non-streaming engine refuses a budget");
        CHECK(trtshim_engine_set_weight_streaming_budget(e, total + 1) == TRTSHIM_ERR_ARGUMENT, "budget over the total");
        for (int k = 0; k <= 40; k++) {
            uint64_t b = k == 0 ? 0 : k == 40 ? total : mix((uint64_t)k * 7 + (uint64_t)threads) % (total + 1);
            OK(trtshim_engine_set_weight_streaming_budget(e, b));
            OK(trtshim_engine_weight_streaming_budget(e, &budget));
            CHECK(budget == b, "budget %llu read back as %llu", (unsigned long long)b, (unsigned long long)budget);
            for (int rep = 0; rep < 2; rep++) {
                memset(got.y, 0, (size_t)got.ny * 4);
                OK(run(c, &m, &got));
                CHECK(same(&got, &want, 1), "budget %llu of %llu: outputs differ from the engine without streaming",
                      (unsigned long long)b, (unsigned long long)total);
            }
            trtshim_weight_streaming_stats s = stats_of(e);
            OK(trtshim_engine_weight_streaming_scratch_size(e, &scratch));
            CHECK(s.resident_bytes <= b && s.resident_bytes + s.streamed_bytes == total,
                  "resident %llu streamed %llu budget %llu total %llu", (unsigned long long)s.resident_bytes,
                  (unsigned long long)s.streamed_bytes, (unsigned long long)b, (unsigned long long)total);
            CHECK(s.window_bytes == scratch, "scratch %llu is the window %llu", (unsigned long long)scratch,
                  (unsigned long long)s.window_bytes);
            CHECK(s.peak_bytes <= b + s.window_bytes && s.allocated_bytes <= s.peak_bytes,
                  "peak %llu allocated %llu over budget %llu + window %llu", (unsigned long long)s.peak_bytes,
                  (unsigned long long)s.allocated_bytes, (unsigned long long)b, (unsigned long long)s.window_bytes);
            CHECK(s.copied_bytes <= 2 * s.streamed_bytes && (s.streamed_bytes == 0 || s.copied_bytes > 0) && s.runs == 2,
                  "two runs copy the streamed bytes twice: copied %llu streamed %llu runs %llu",
                  (unsigned long long)s.copied_bytes, (unsigned long long)s.streamed_bytes, (unsigned long long)s.runs);
            if (b == 0) CHECK(s.resident_bytes == 0 && s.window_bytes > 0, "budget 0 streams everything");
            if (b == total) CHECK(s.window_bytes == 0 && s.copied_bytes == 0, "the full budget streams nothing");
        }
        uint64_t autob = 0;
        OK(trtshim_engine_weight_streaming_automatic_budget(e, &autob));
        CHECK(autob <= total, "automatic budget %llu within 0..%llu", (unsigned long long)autob, (unsigned long long)total);
        trtshim_context_destroy(rc), trtshim_context_destroy(c);
        trtshim_engine_destroy(ref), trtshim_engine_destroy(e);
        io_free(&want), io_free(&got);
    }
}

/* Runs on a thread while the main thread changes the budget: a change is refused (ERR_STATE, budget
   unchanged) exactly while a run is in flight, and every run gives the reference outputs. */
typedef struct {
    trtshim_engine *e;
    const mlp_shape *m;
    const io *want;
    int runs, bad;
    volatile int done;
} runner;

static void *run_many(void *arg) {
    runner *r = arg;
    trtshim_context *c;
    if (trtshim_context_create(r->e, &c)) {
        r->bad = r->runs;
        return NULL;
    }
    io got = io_new(r->m);
    for (int i = 0; i < r->runs; i++) {
        if (run(c, r->m, &got) || !same(&got, r->want, 0)) r->bad++;
        usleep(200); /* room for budget changes between runs */
    }
    io_free(&got);
    trtshim_context_destroy(c);
    __atomic_store_n(&r->done, 1, __ATOMIC_SEQ_CST);
    return NULL;
}

static void test_change_during_run(void) {
    static const int dims[] = {64, 256, 256, 256, 32};
    mlp_shape m = {4, 4, 0, dims};
    trtshim_engine *ref = build(&m, 2, 0, 1), *e = build(&m, 2, 1, 1);
    io want = io_new(&m);
    trtshim_context *rc;
    OK(trtshim_context_create(ref, &rc));
    OK(run(rc, &m, &want));
    uint64_t total;
    OK(trtshim_engine_streamable_weights_size(e, &total));
    runner r = {e, &m, &want, 300, 0, 0};
    pthread_t th;
    pthread_create(&th, NULL, run_many, &r);
    int refused = 0, applied = 0;
    for (int i = 0; !__atomic_load_n(&r.done, __ATOMIC_SEQ_CST); i++) {
        uint64_t before, after, b = mix((uint64_t)i) % (total + 1);
        OK(trtshim_engine_weight_streaming_budget(e, &before));
        trtshim_status st = trtshim_engine_set_weight_streaming_budget(e, b);
        OK(trtshim_engine_weight_streaming_budget(e, &after));
        if (st == TRTSHIM_ERR_STATE) {
            refused++;
            CHECK(after == before, "a refused change left the budget at %llu, was %llu", (unsigned long long)after,
                  (unsigned long long)before);
            CHECK(strstr(trtshim_last_error(), "running") != NULL, "the message says why: %s", trtshim_last_error());
        } else {
            CHECK(st == TRTSHIM_OK && after == b, "budget change to %llu: status %d, now %llu", (unsigned long long)b, (int)st,
                  (unsigned long long)after);
            applied++;
        }
    }
    pthread_join(th, NULL);
    CHECK(refused > 0 && applied > 0, "changes were both refused (during runs) and applied (between them)");
    CHECK(r.bad == 0, "%d of %d runs failed or differed while the budget changed between runs", r.bad, r.runs);
    printf("budget changes during runs: %d applied, %d refused; %d runs ok\n", applied, refused, r.runs - r.bad);
    trtshim_context_destroy(rc);
    trtshim_engine_destroy(ref), trtshim_engine_destroy(e);
    io_free(&want);
}

/* Stages every weight of the network built with `seed` into a refitter and applies it. */
static trtshim_status refit_to(trtshim_engine *e, const mlp_shape *m, uint64_t seed) {
    trtshim_refitter *r;
    trtshim_status st = trtshim_refitter_create(e, &r);
    if (st) return st;
    float *bufs[64];
    int nb = 0;
    for (int i = 0; i < m->num_fc && !st; i++) {
        int64_t in = m->dims[i], out = m->dims[i + 1];
        float *k = bufs[nb++] = malloc(sizeof(float) * (size_t)(in * out)), *b = bufs[nb++] = malloc(sizeof(float) * (size_t)out);
        fill(k, in * out, seed * 131 + (uint64_t)i, 2.0f / (float)in);
        fill(b, out, seed * 131 + 1000 + (uint64_t)i, 0.2f);
        trtshim_weights kw = {TRTSHIM_FLOAT32, k, in * out}, bw = {TRTSHIM_FLOAT32, b, out};
        char name[32];
        snprintf(name, sizeof(name), "fc%d", i);
        st = trtshim_refitter_set_weights(r, name, TRTSHIM_ROLE_KERNEL, &kw);
        if (!st) st = trtshim_refitter_set_weights(r, name, TRTSHIM_ROLE_BIAS, &bw);
    }
    if (!st) st = trtshim_refitter_apply(r);
    trtshim_refitter_destroy(r);
    for (int i = 0; i < nb; i++) free(bufs[i]);
    return st;
}

static uint64_t file_hash(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    uint64_t h = 1469598103934665603ull;
    int ch;
    while ((ch = fgetc(f)) != EOF) h = (h ^ (uint64_t)ch) * 1099511628211ull;
    fclose(f);
    return h;
}

/* refit(streaming build A, B) == build B, at budgets that keep some weights resident and stream others,
   before and after the arena was filled; the same for an engine loaded from a file (weights in the
   mapping), whose file is not changed by the refit. */
static void test_refit(void) {
    static const int dims[] = {32, 80, 24, 120, 16};
    mlp_shape m = {3, 4, 0, dims};
    trtshim_engine *rebuilt = build(&m, 9, 0, 1);
    io want = io_new(&m), got = io_new(&m);
    trtshim_context *rc;
    OK(trtshim_context_create(rebuilt, &rc));
    OK(run(rc, &m, &want));
    char path[] = "/tmp/streaming_test_XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    for (int loaded = 0; loaded <= 1; loaded++)
        for (int k = 0; k <= 4; k++) {
            trtshim_engine *e = build(&m, 8, 1, 1);
            if (loaded) {
                OK(trtshim_engine_save(e, path, 1));
                trtshim_engine_destroy(e);
                e = NULL;
                OK(trtshim_engine_load(path, &e));
                if (!e) continue;
            }
            uint64_t hash_before = loaded ? file_hash(path) : 0;
            uint64_t total;
            OK(trtshim_engine_streamable_weights_size(e, &total));
            CHECK(total > 0, "a loaded engine keeps streaming");
            OK(trtshim_engine_set_weight_streaming_budget(e, total * (uint64_t)k / 4));
            trtshim_context *c;
            OK(trtshim_context_create(e, &c));
            if (k % 2) OK(run(c, &m, &got)); /* arena filled before the refit */
            OK(refit_to(e, &m, 9));
            memset(got.y, 0, (size_t)got.ny * 4);
            OK(run(c, &m, &got));
            CHECK(same(&got, &want, 0), "loaded %d, budget %d/4: refit differs from a rebuild", loaded, k);
            OK(trtshim_engine_set_weight_streaming_budget(e, total * (uint64_t)(4 - k) / 4));
            memset(got.y, 0, (size_t)got.ny * 4);
            OK(run(c, &m, &got));
            CHECK(same(&got, &want, 0), "loaded %d: after moving the budget, the refitted weights stay", loaded);
            if (loaded) CHECK(file_hash(path) == hash_before, "a refit of a loaded engine left its file as it was");
            trtshim_context_destroy(c);
            trtshim_engine_destroy(e);
        }
    unlink(path);
    trtshim_context_destroy(rc);
    trtshim_engine_destroy(rebuilt);
    io_free(&want), io_free(&got);
}

/* ---- process memory (a fresh process per measurement) ---------------------------------------- */

static const int big_dims[] = {1024, 2048, 2048, 2048, 2048, 2048, 2048, 1024}; /* about 86 MB of weights */
static const mlp_shape big = {4, 7, 0, big_dims};

static uint64_t rss_anon(void) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return 0;
    char line[256];
    unsigned long long kb = 0;
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "RssAnon: %llu kB", &kb) == 1) break;
    fclose(f);
    return (uint64_t)kb * 1024;
}

/* Child: loads `path`, sets budget = total * permille / 1000, runs twice, checks the growth of its
   anonymous memory against budget + window + slack, prints it. */
static int rss_child(const char *path, int permille) {
    io b = io_new(&big);
    uint64_t before = rss_anon();
    trtshim_engine *e = NULL;
    OK(trtshim_engine_load(path, &e));
    if (!e) return 1;
    uint64_t total;
    OK(trtshim_engine_streamable_weights_size(e, &total));
    uint64_t budget = total * (uint64_t)permille / 1000;
    OK(trtshim_engine_set_weight_streaming_budget(e, budget));
    trtshim_context *c;
    OK(trtshim_context_create(e, &c));
    OK(run(c, &big, &b));
    OK(run(c, &big, &b));
    uint64_t after = rss_anon();
    trtshim_weight_streaming_stats s = stats_of(e);
    trtshim_engine_info info;
    OK(trtshim_engine_get_info(e, &info));
    /* Slack: what is not streamable (biases), activations, thread stacks and allocator overhead. */
    uint64_t slack = (info.weight_bytes - total) + info.scratch_bytes + (16u << 20);
    uint64_t growth = after > before ? after - before : 0;
    printf("rss: budget %llu MB of %llu MB, window %llu MB: anonymous memory grew %llu MB\n",
           (unsigned long long)(budget >> 20), (unsigned long long)(total >> 20), (unsigned long long)(s.window_bytes >> 20),
           (unsigned long long)(growth >> 20));
    CHECK(growth <= budget + s.window_bytes + slack, "process memory grew %llu bytes, bound %llu + %llu + %llu",
          (unsigned long long)growth, (unsigned long long)budget, (unsigned long long)s.window_bytes, (unsigned long long)slack);
    if (permille == 1000) CHECK(growth >= total - total / 10, "the measure sees the arena: grew %llu of %llu", (unsigned long long)growth,
                                (unsigned long long)total);
    trtshim_context_destroy(c);
    trtshim_engine_destroy(e);
    io_free(&b);
    return failures ? 1 : 0;
}

static void test_process_memory(void) {
    char path[] = "/tmp/streaming_big_XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    trtshim_engine *e = build(&big, 3, 1, 1);
    OK(trtshim_engine_save(e, path, 1));
    trtshim_engine_destroy(e);
    static const int permilles[] = {0, 100, 500, 1000};
    for (int i = 0; i < 4; i++) {
        char cmd[512];
        snprintf(cmd, sizeof(cmd), "/proc/%d/exe --rss %s %d", (int)getpid(), path, permilles[i]);
        int rc = system(cmd);
        CHECK(rc == 0, "the process memory check at %d permille failed (exit %d)", permilles[i], rc);
    }
    unlink(path);
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "--rss") == 0) return rss_child(argv[2], atoi(argv[3]));
    test_budgets();
    test_change_during_run();
    test_refit();
    test_process_memory();
    if (failures) {
        fprintf(stderr, "streaming_test: %d failures\n", failures);
        return 1;
    }
    printf("streaming_test: ok\n");
    return 0;
}
