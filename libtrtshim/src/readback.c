/* readback.c: read-back verification. Digests of the network-level values an engine's kernels hold,
   recovered from the buffers the kernels read (packed kernels unpacked and widened or dequantized, fused
   biases taken out of their bias buffers), so a compile, a refit or a cache hit can be checked against the
   digests a plan expects.

   The digest of a weight is trtshim_digest of its float32 values (raw bytes for integers), which cuts the
   bytes into 1 MiB chunks, hashes each, and hashes the list. The work here is one task per chunk of every
   weight, spread over the engine's threads: a packed weight is unpacked one chunk at a time into a buffer
   of the thread's that stays in cache and hashed there, so every weight is read from memory once. Checks
   that some weights need (a batch norm fold run again, a second copy of a weight compared with the first)
   are tasks of their own. */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "threadpool.h"

#define PANEL 32 /* columns per panel of the packed layout (gemm.c) */

/* A packed GEMM or convolution weight as its unit wrote it: element (k, c) of block g (a convolution group)
   at block g's panel c / 32, row k, lane c % 32. */
typedef struct {
    const unsigned char *data;
    size_t block_bytes;
    int64_t K, N;          /* rows and columns of a block */
    int64_t col, n;        /* the weight's columns in each block */
    int64_t blocks;
    int transposed;        /* the weight is declared [blocks * n, K]; else [K, n] */
    trtshim_dtype dtype;   /* FLOAT32, FLOAT16 or BFLOAT16 when quant.kind is 0 */
    gemm_quant_format quant;
    size_t row_bytes;      /* quantized: bytes of one panel row */
    size_t scales_offset;  /* quantized: where a block's float32 scales start */
    int64_t groups;        /* quantized: scales per column */
} packed_view;

enum { FORM_PACKED, FORM_BYTES };

/* How one weight is read back: from a packed buffer, or from contiguous bytes (a float32 copy: plain,
   bias columns, retained fold member; or an integer constant's raw bytes). */
typedef struct {
    int form;
    const unit *primary;   /* the unit that wrote what is read; NULL for a retained copy */
    packed_view view;
    const unsigned char *bytes_data;
    uint64_t bytes;        /* bytes of the digested stream */
    uint64_t first_chunk, chunks;
} held_weight;

typedef enum { TASK_CHUNK, TASK_FOLD, TASK_COPY } task_kind;

typedef struct {
    task_kind kind;
    int32_t weight;        /* CHUNK, COPY */
    int64_t chunk;         /* CHUNK: index within the weight */
    const unit *u;         /* FOLD: the fold; COPY: the second holder of the weight */
} task;

typedef struct {
    trtshim_engine *e;
    const held_weight *held;
    const task *tasks;
    int32_t num_tasks;
    atomic_int next;
    int8_t *failed;        /* per task */
    uint64_t *chunk_digests;
} job;

/* ---- widening ------------------------------------------------------------------------------------ */

static float bits_to_float(uint32_t u) {
    float x;
    memcpy(&x, &u, 4);
    return x;
}

static float half_value(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000 | (mantissa << 13));
    if (exponent == 0) {
        float m = (float)mantissa * (1.0f / 16777216.0f); /* exact */
        return sign ? -m : m;
    }
    return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

static float bfloat_value(uint16_t h) { return bits_to_float((uint32_t)h << 16); }

static float e4m3_value(uint8_t code) {
    uint32_t exponent = (code >> 3) & 15, mantissa = code & 7;
    float m;
    if ((code & 0x7f) == 0x7f) m = bits_to_float(0x7fc00000);
    else if (exponent == 0) m = (float)mantissa * (1.0f / 512.0f);
    else m = bits_to_float(((exponent + 120) << 23) | (mantissa << 20));
    return code & 0x80 ? -m : m;
}

static float e4m3_table[256];
static pthread_once_t e4m3_once = PTHREAD_ONCE_INIT;
static void e4m3_fill(void) {
    for (int i = 0; i < 256; i++) e4m3_table[i] = e4m3_value((uint8_t)i);
}

/* ---- unpacking ----------------------------------------------------------------------------------- */

static trtshim_status view_of(trtshim_engine *e, const unit *u, const void *data, packed_view *v) {
    const step *s = &e->steps[u->step];
    memset(v, 0, sizeof(*v));
    v->data = data;
    v->K = s->K;
    v->N = s->N;
    v->dtype = e->precision;
    v->quant = s->quant;
    v->block_bytes = step_block_bytes(e, s);
    if (u->kind == UNIT_PACK_GEMM) {
        const step_member *m = &s->members[u->member];
        v->col = m->col;
        v->n = m->n;
        v->blocks = 1;
        v->transposed = m->kernel_transposed;
    } else {
        v->col = 0;
        v->n = s->N;
        v->blocks = e->net->layers[s->layer].params[11];
        v->transposed = 1;
    }
    uint64_t panels = (uint64_t)((v->N + PANEL - 1) / PANEL);
    if (v->quant.kind) {
        v->row_bytes = v->quant.kind == GEMM_QUANT_INT4 ? 16 : 32;
        v->groups = gemm_quant_groups(v->quant, v->K);
        v->scales_offset = (panels * (uint64_t)v->K * v->row_bytes + 63) / 64 * 64;
        if (v->scales_offset + panels * PANEL * (uint64_t)v->groups * 4 != v->block_bytes) v->block_bytes = 0;
    }
    const engine_weight *w = &e->weights[u->sources[0]];
    if ((w->count > 0 && !v->block_bytes) || v->blocks * v->n * v->K != w->count ||
        (uint64_t)v->blocks * v->block_bytes > e->buffers[u->buffer].bytes)
        return set_error(TRTSHIM_ERR_CORRUPT, "weight '%s' %s: its packed buffer does not have the layout the engine "
                         "plans for it", w->name, role_name(w->role));
    return TRTSHIM_OK;
}

static inline float value_at(const packed_view *v, const unsigned char *block, int64_t k, int64_t c) {
    size_t panel_row = (size_t)(c / PANEL) * (size_t)v->K + (size_t)k;
    int lane = (int)(c % PANEL);
    if (!v->quant.kind) {
        size_t i = panel_row * PANEL + (size_t)lane;
        if (v->dtype == TRTSHIM_FLOAT16) return half_value(((const uint16_t *)block)[i]);
        if (v->dtype == TRTSHIM_BFLOAT16) return bfloat_value(((const uint16_t *)block)[i]);
        return ((const float *)block)[i];
    }
    const unsigned char *row = block + panel_row * v->row_bytes;
    float q;
    int64_t g = 0;
    if (v->quant.kind == GEMM_QUANT_INT4) {
        int nibble = (row[lane % 16] >> (lane >= 16 ? 4 : 0)) & 15;
        q = (float)((nibble ^ 8) - 8);
        g = k / v->quant.group_size;
    } else if (v->quant.kind == GEMM_QUANT_INT8) {
        q = (float)(int8_t)row[lane];
    } else {
        q = e4m3_value(row[lane]);
    }
    const float *scales = (const float *)(block + v->scales_offset);
    return q * scales[((size_t)(c / PANEL) * (size_t)v->groups + (size_t)g) * PANEL + (size_t)lane];
}

#if defined(__x86_64__) && !defined(TRTSHIM_GEMM_PORTABLE)
#include <immintrin.h>
__attribute__((target("avx,f16c"))) static void halves_f16c(const uint16_t *h, float *out) {
    for (int i = 0; i < PANEL; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
}
static int has_f16c(void) {
    static int known = -1;
    if (known < 0) known = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
    return known;
}
/* out[l * ld + t] = rows[t][l] for an 8 x 8 block (rows 32 floats apart). */
__attribute__((target("avx"))) static void transpose8_avx(const float *rows, float *out, int64_t ld) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(rows + i * PANEL);
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        r[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
        r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
    }
    for (int i = 0; i < 4; i++) {
        _mm256_storeu_ps(out + i * ld, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
        _mm256_storeu_ps(out + (i + 4) * ld, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
    }
}
static int has_avx(void) {
    static int known = -1;
    if (known < 0) known = __builtin_cpu_supports("avx");
    return known;
}
#else
static void halves_f16c(const uint16_t *h, float *out) { (void)h, (void)out; }
static int has_f16c(void) { return 0; }
static void transpose8_avx(const float *rows, float *out, int64_t ld) { (void)rows, (void)out, (void)ld; }
static int has_avx(void) { return 0; }
#endif

/* Row k of panel p of a block, all 32 lanes, as float32 (lanes past N hold zeros, or scale 0). */
static void panel_row(const packed_view *v, const unsigned char *block, int64_t p, int64_t k, float *out) {
    size_t panel_row = (size_t)p * (size_t)v->K + (size_t)k;
    if (!v->quant.kind) {
        if (v->dtype == TRTSHIM_FLOAT32) {
            memcpy(out, (const float *)block + panel_row * PANEL, sizeof(float) * PANEL);
        } else if (v->dtype == TRTSHIM_BFLOAT16) {
            const uint16_t *h = (const uint16_t *)block + panel_row * PANEL;
            uint32_t u[PANEL];
            for (int l = 0; l < PANEL; l++) u[l] = (uint32_t)h[l] << 16;
            memcpy(out, u, sizeof(u));
        } else if (has_f16c()) {
            halves_f16c((const uint16_t *)block + panel_row * PANEL, out);
        } else {
            const uint16_t *h = (const uint16_t *)block + panel_row * PANEL;
            for (int l = 0; l < PANEL; l++) out[l] = half_value(h[l]);
        }
        return;
    }
    const unsigned char *row = block + panel_row * v->row_bytes;
    int64_t g = v->quant.kind == GEMM_QUANT_INT4 ? k / v->quant.group_size : 0;
    const float *scale = (const float *)(block + v->scales_offset) + ((size_t)p * (size_t)v->groups + (size_t)g) * PANEL;
    if (v->quant.kind == GEMM_QUANT_INT8) {
        for (int l = 0; l < PANEL; l++) out[l] = (float)(int8_t)row[l] * scale[l];
    } else if (v->quant.kind == GEMM_QUANT_INT4) {
        for (int l = 0; l < 16; l++) {
            out[l] = (float)((((row[l] & 15) ^ 8) - 8)) * scale[l];
            out[l + 16] = (float)((((row[l] >> 4) ^ 8) - 8)) * scale[l + 16];
        }
    } else {
        pthread_once(&e4m3_once, e4m3_fill);
        for (int l = 0; l < PANEL; l++) out[l] = e4m3_table[row[l]] * scale[l];
    }
}

#define KBLOCK 128

/* Elements [begin, end) of the weight in its declared layout, as float32. Whole rows of a transposed
   weight go a panel at a time, KBLOCK panel rows (widened when they are not float32) transposed in 8 x 8
   blocks, 8 output rows at a time so the stores run along rows. */
static void unpack_range(const packed_view *v, int64_t begin, int64_t end, float *out) {
    float rows[KBLOCK][PANEL];
    int vector = has_avx();
    int64_t i = begin;
    while (i < end) {
        if (v->transposed) { /* [blocks * n, K]: row r is column col + r % n of block r / n */
            int64_t r = i / v->K, k0 = i % v->K;
            const unsigned char *block = v->data + (size_t)(r / v->n) * v->block_bytes;
            int64_t c = v->col + r % v->n;
            if (k0 != 0 || end - i < v->K) { /* a part of a row */
                int64_t k1 = v->K - k0 > end - i ? k0 + (end - i) : v->K;
                for (int64_t k = k0; k < k1; k++) out[k - k0] = value_at(v, block, k, c);
                out += k1 - k0;
                i += k1 - k0;
                continue;
            }
            /* whole rows r .. r + nr: columns c .. c + nr of one panel of one block */
            int64_t nr = (end - i) / v->K, lane0 = c % PANEL, p = c / PANEL;
            if (nr > PANEL - lane0) nr = PANEL - lane0;
            if (nr > v->n - r % v->n) nr = v->n - r % v->n;
            int direct = !v->quant.kind && v->dtype == TRTSHIM_FLOAT32;
            for (int64_t k = 0; k < v->K; k += KBLOCK) {
                int64_t kb = v->K - k < KBLOCK ? v->K - k : KBLOCK;
                const float *src = (const float *)block + ((size_t)p * (size_t)v->K + (size_t)k) * PANEL;
                if (!direct) {
                    for (int64_t t = 0; t < kb; t++) panel_row(v, block, p, k + t, rows[t]);
                    src = rows[0];
                }
                int64_t l = 0;
                if (vector && kb % 8 == 0)
                    for (; l + 8 <= nr; l += 8)
                        for (int64_t t = 0; t < kb; t += 8) transpose8_avx(src + t * PANEL + lane0 + l, out + l * v->K + k + t, v->K);
                for (; l < nr; l++)
                    for (int64_t t = 0; t < kb; t++) out[l * v->K + k + t] = src[t * PANEL + lane0 + l];
            }
            out += nr * v->K;
            i += nr * v->K;
        } else { /* [K, n]: row k holds columns col .. col + n of the one block */
            int64_t k = i / v->n, j0 = i % v->n, j1 = v->n;
            if (j1 - j0 > end - i) j1 = j0 + (end - i);
            for (int64_t j = j0; j < j1;) {
                int64_t c = v->col + j, lane0 = c % PANEL, take = PANEL - lane0;
                if (take > j1 - j) take = j1 - j;
                panel_row(v, v->data, c / PANEL, k, rows[0]);
                memcpy(out + (j - j0), rows[0] + lane0, sizeof(float) * (size_t)take);
                j += take;
            }
            out += j1 - j0;
            i += j1 - j0;
        }
    }
}

/* ---- checks -------------------------------------------------------------------------------------- */

static const char *layer_name(const trtshim_engine *e, int32_t l) { return e->net->layers[l].name; }

/* Runs a batch norm fold again from the retained copies and compares it with what the convolution reads. */
static trtshim_status check_fold(trtshim_engine *e, const unit *u) {
    const step *s = &e->steps[u->step];
    const float *src[6] = {0};
    for (int32_t k = 0; k < u->num_sources; k++)
        if (u->sources[k] >= 0) src[k] = e->weights[u->sources[k]].retained;
    uint64_t packed_bytes = e->buffers[u->buffer].bytes, bias_bytes = e->buffers[u->buffer2].bytes;
    int64_t scratch_floats = unit_scratch_floats(e, u);
    float *scratch = malloc(sizeof(float) * (size_t)(scratch_floats ? scratch_floats : 1));
    unsigned char *packed = aligned_zalloc(packed_bytes ? packed_bytes : 1);
    float *bias = aligned_zalloc(bias_bytes ? bias_bytes : 4);
    if (!scratch || !packed || !bias) {
        free(scratch), free(packed), free(bias);
        return set_error(TRTSHIM_ERR_MEMORY, "engine_weight_digests: out of memory running the batch norm fold of "
                         "layer '%s' again", layer_name(e, s->layer));
    }
    unit_fold_into(e, u, src, scratch, packed, bias);
    int kernel_differs = memcmp(packed, stream_buffer_source(e, u->buffer), (size_t)packed_bytes) != 0;
    int bias_differs = memcmp(bias, e->buffers[u->buffer2].data, (size_t)bias_bytes) != 0;
    free(scratch), free(packed), free(bias);
    if (!kernel_differs && !bias_differs) return TRTSHIM_OK;
    return set_error(TRTSHIM_ERR_VALIDATION, "layer '%s' (batch norm '%s' folded into it): the %s%s%s the engine "
                     "runs with differ%s from the fold of its weights", layer_name(e, s->layer),
                     layer_name(e, s->members[0].bn_layer), kernel_differs ? "packed kernel" : "",
                     kernel_differs && bias_differs ? " and the " : "", bias_differs ? "bias" : "",
                     kernel_differs && bias_differs ? "" : "s");
}

/* Float32 bytes of a copy held by a PLAIN or BIAS unit. */
static const float *float_copy_of(const trtshim_engine *e, const unit *u) {
    if (u->kind == UNIT_PLAIN) return e->buffers[u->buffer].data;
    const step *s = &e->steps[u->step];
    return (const float *)e->buffers[u->buffer].data + (s->kind == STEP_GEMM ? s->members[u->member].col : 0);
}

/* A weight held twice (a constant packed as a GEMM operand and read as a tensor, packed by two GEMMs, or
   added as the bias of two): the second holder must hold what the first does. For a float32 copy beside a
   packed one, the copy is packed again into scratch and compared after unpacking. */
static trtshim_status check_copy(trtshim_engine *e, int32_t w, const held_weight *h, const unit *second) {
    const engine_weight *ew = &e->weights[w];
    size_t bytes = (size_t)ew->count * 4;
    float *first = malloc(bytes ? bytes : 4), *other = malloc(bytes ? bytes : 4);
    unsigned char *repacked = NULL;
    trtshim_status st = TRTSHIM_OK;
    if (!first || !other) {
        st = set_error(TRTSHIM_ERR_MEMORY, "engine_weight_digests: out of memory comparing the copies of weight '%s' %s",
                       ew->name, role_name(ew->role));
        goto done;
    }
    if (h->form == FORM_PACKED) unpack_range(&h->view, 0, ew->count, first);
    else memcpy(first, h->bytes_data, bytes);
    if (second->kind == UNIT_PACK_GEMM || second->kind == UNIT_PACK_CONV) {
        packed_view v;
        st = view_of(e, second, stream_buffer_source(e, second->buffer), &v);
        if (st) goto done;
        if (h->form == FORM_PACKED && (v.quant.kind || h->view.quant.kind) &&
            (v.transposed != h->view.transposed || v.quant.kind != h->view.quant.kind)) {
            st = set_error(TRTSHIM_ERR_UNSUPPORTED, "weight '%s' %s: quantized by two GEMMs in different layouts; it "
                           "cannot be read back as one value", ew->name, role_name(ew->role));
            goto done;
        }
        unpack_range(&v, 0, ew->count, other);
    } else if (h->form == FORM_PACKED) {
        const unit *p = h->primary;
        const step *s = &e->steps[p->step];
        const step_member *m = &s->members[p->member];
        if (p->kind != UNIT_PACK_GEMM) {
            st = set_error(TRTSHIM_ERR_UNSUPPORTED, "weight '%s' %s: a convolution kernel with a second copy",
                           ew->name, role_name(ew->role));
            goto done;
        }
        uint64_t buffer_bytes = e->buffers[p->buffer].bytes;
        repacked = aligned_zalloc(buffer_bytes ? buffer_bytes : 1);
        if (!repacked) {
            st = set_error(TRTSHIM_ERR_MEMORY, "engine_weight_digests: out of memory packing weight '%s' %s again",
                           ew->name, role_name(ew->role));
            goto done;
        }
        const float *copy = float_copy_of(e, second);
        int64_t ldb = m->kernel_transposed ? s->K : m->n;
        if (s->quant.kind) {
            if (gemm_quant_pack_columns(s->quant, copy, m->kernel_transposed, ldb, s->K, s->N, m->col, m->n, repacked)) {
                st = set_error(TRTSHIM_ERR_VALIDATION, "weight '%s' %s: its float32 copy cannot be quantized (a value "
                               "is not finite) but the engine holds it quantized too", ew->name, role_name(ew->role));
                goto done;
            }
        } else {
            gemm_pack_columns(s->tactic, copy, m->kernel_transposed, ldb, s->K, s->N, m->col, m->n, e->precision, repacked);
        }
        packed_view v = h->view;
        v.data = repacked;
        unpack_range(&v, 0, ew->count, other);
    } else {
        memcpy(other, float_copy_of(e, second), bytes);
    }
    if (memcmp(first, other, bytes) != 0)
        st = set_error(TRTSHIM_ERR_VALIDATION, "weight '%s' %s: the engine holds it twice and the copies differ",
                       ew->name, role_name(ew->role));
done:
    free(first), free(other), free(repacked);
    return st;
}

/* ---- tasks --------------------------------------------------------------------------------------- */

static trtshim_status run_task(job *jb, const task *t, float *scratch) {
    trtshim_engine *e = jb->e;
    if (t->kind == TASK_FOLD) return check_fold(e, t->u);
    const held_weight *h = &jb->held[t->weight];
    if (t->kind == TASK_COPY) return check_copy(e, t->weight, h, t->u);
    uint64_t chunk = digest_chunk_bytes(), begin = (uint64_t)t->chunk * chunk;
    uint64_t n = h->bytes - begin < chunk ? h->bytes - begin : chunk;
    if (h->bytes == 0) n = 0;
    uint64_t *out = jb->chunk_digests + 2 * (h->first_chunk + (uint64_t)t->chunk);
    if (h->form == FORM_BYTES) {
        digest_chunk(h->bytes_data + begin, n, (uint64_t)t->chunk, out);
    } else {
        unpack_range(&h->view, (int64_t)(begin / 4), (int64_t)((begin + n) / 4), scratch);
        digest_chunk(scratch, n, (uint64_t)t->chunk, out);
    }
    return TRTSHIM_OK;
}

static void run_slots(void *context, int64_t begin, int64_t end) {
    job *jb = context;
    float *scratch = malloc((size_t)digest_chunk_bytes());
    for (int64_t slot = begin; slot < end; slot++)
        for (int i = atomic_fetch_add(&jb->next, 1); i < jb->num_tasks; i = atomic_fetch_add(&jb->next, 1))
            jb->failed[i] = !scratch || run_task(jb, &jb->tasks[i], scratch) != TRTSHIM_OK;
    free(scratch);
}

/* ---- planning ------------------------------------------------------------------------------------ */

static int reads_weight(const unit *u, int32_t w) {
    for (int32_t k = 0; k < u->num_sources; k++)
        if (u->sources[k] == w) return 1;
    return 0;
}

/* Chooses where weight w is read from; appends the checks its other holders need. */
/* The first fold, pack and float32 (or raw) copy unit that read weight w. */
static void holders_of(const trtshim_engine *e, int32_t w, const unit **fold, const unit **pack, const unit **copy) {
    *fold = *pack = *copy = NULL;
    for (int32_t i = 0; i < e->num_units; i++) {
        const unit *u = &e->units[i];
        if (!reads_weight(u, w)) continue;
        if (u->kind == UNIT_FOLD) {
            if (!*fold) *fold = u;
        } else if (u->kind == UNIT_PACK_GEMM || u->kind == UNIT_PACK_CONV) {
            if (!*pack) *pack = u;
        } else if (!*copy) {
            *copy = u;
        }
    }
}

static trtshim_status plan_weight(trtshim_engine *e, int32_t w, held_weight *h, task *tasks, int32_t *num_tasks) {
    const engine_weight *ew = &e->weights[w];
    const unit *fold, *pack, *copy;
    holders_of(e, w, &fold, &pack, &copy);
    memset(h, 0, sizeof(*h));
    if (fold) {
        if (!e->retained_valid || !ew->retained)
            return set_error(TRTSHIM_ERR_STATE, "weight '%s' %s: folded into layer '%s', and the engine keeps no valid "
                             "copy of the fold's weights to read back (loaded without them); refit the fold's weights",
                             ew->name, role_name(ew->role), layer_name(e, e->steps[fold->step].layer));
        h->form = FORM_BYTES;
        h->bytes_data = (const unsigned char *)ew->retained;
        h->bytes = (uint64_t)ew->count * 4;
    } else if (pack) {
        trtshim_status st = view_of(e, pack, stream_buffer_source(e, pack->buffer), &h->view);
        if (st) return st;
        h->form = FORM_PACKED;
        h->primary = pack;
        h->bytes = (uint64_t)ew->count * 4;
    } else if (copy) {
        h->form = FORM_BYTES;
        h->primary = copy;
        h->bytes_data = (const unsigned char *)float_copy_of(e, copy);
        h->bytes = copy->kind == UNIT_PLAIN ? e->buffers[copy->buffer].bytes : (uint64_t)ew->count * 4;
    } else {
        return set_error(TRTSHIM_ERR_UNSUPPORTED, "weight '%s' %s: the engine holds no copy of it (no kernel reads it), "
                         "so it cannot be read back", ew->name, role_name(ew->role));
    }
    /* Every other holder is checked against the one read (folds once each, from their kernel). */
    for (int32_t i = 0; i < e->num_units; i++) {
        const unit *u = &e->units[i];
        if (!reads_weight(u, w) || u == h->primary) continue;
        if (u->kind == UNIT_FOLD) {
            if (u->sources[0] == w) tasks[(*num_tasks)++] = (task){TASK_FOLD, -1, 0, u};
            continue;
        }
        tasks[(*num_tasks)++] = (task){TASK_COPY, w, 0, u};
    }
    return TRTSHIM_OK;
}

/* select: NULL for every weight, else one flag per weight; a selected member of a batch norm fold brings
   the fold's check with it (through its kernel weight, which is then digested too). */
static trtshim_status weight_digests(trtshim_engine *e, const uint8_t *select, uint64_t *digests, int32_t num_threads) {
    int32_t nw = e->num_weights;
    uint8_t *wanted = malloc((size_t)nw + 1);
    if (!wanted) return set_error(TRTSHIM_ERR_MEMORY, "engine_weight_digests: out of memory");
    for (int32_t w = 0; w < nw; w++) wanted[w] = select ? select[w] != 0 : 1;
    for (int32_t i = 0; select && i < e->num_units; i++) {
        const unit *u = &e->units[i];
        if (u->kind != UNIT_FOLD) continue;
        for (int32_t k = 0; k < u->num_sources; k++)
            if (u->sources[k] >= 0 && wanted[u->sources[k]]) wanted[u->sources[0]] = 1;
    }
    pthread_mutex_lock(&e->lock);
    int has_weights = e->has_weights;
    pthread_mutex_unlock(&e->lock);
    if (!has_weights)
        return set_error(TRTSHIM_ERR_STATE, "weight '%s' %s: the engine has no weights to read back (stripped, not yet "
                         "filled by a refit)", e->weights[0].name, role_name(e->weights[0].role));
    uint64_t chunk = digest_chunk_bytes(), total_chunks = 0;
    held_weight *held = calloc((size_t)nw, sizeof(held_weight));
    task *checks = malloc(sizeof(task) * (size_t)(e->num_units + 1));
    task *tasks = NULL;
    int8_t *failed = NULL;
    uint64_t *chunk_digests = NULL;
    int32_t num_checks = 0;
    trtshim_status st = TRTSHIM_OK;
    if (!held || !checks) {
        st = set_error(TRTSHIM_ERR_MEMORY, "engine_weight_digests: out of memory");
        goto done;
    }
    for (int32_t w = 0; w < nw && !st; w++) {
        held[w].first_chunk = total_chunks;
        if (!wanted[w]) continue;
        st = plan_weight(e, w, &held[w], checks, &num_checks);
        held[w].first_chunk = total_chunks;
        held[w].chunks = held[w].bytes ? (held[w].bytes + chunk - 1) / chunk : 1;
        total_chunks += held[w].chunks;
    }
    if (st) goto done;
    int64_t num_tasks = (int64_t)total_chunks + num_checks;
    if (num_tasks > INT32_MAX) {
        st = set_error(TRTSHIM_ERR_UNSUPPORTED, "engine_weight_digests: too many weight chunks");
        goto done;
    }
    tasks = malloc(sizeof(task) * (size_t)num_tasks);
    failed = calloc((size_t)num_tasks, 1);
    chunk_digests = malloc(sizeof(uint64_t) * 2 * (size_t)total_chunks);
    if (!tasks || !failed || !chunk_digests) {
        st = set_error(TRTSHIM_ERR_MEMORY, "engine_weight_digests: out of memory for %lld tasks", (long long)num_tasks);
        goto done;
    }
    /* Checks first: they are the longest tasks, and a failure there is reported before any digest. */
    int32_t n = 0;
    for (int32_t i = 0; i < num_checks; i++) tasks[n++] = checks[i];
    for (int32_t w = 0; w < nw; w++)
        for (uint64_t c = 0; wanted[w] && c < held[w].chunks; c++) tasks[n++] = (task){TASK_CHUNK, w, (int64_t)c, NULL};
    job jb = {e, held, tasks, n, 0, failed, chunk_digests};
    atomic_init(&jb.next, 0);
    int threads = num_threads > 0 ? num_threads : e->num_threads;
    if (threads < 1) threads = 1;
    if (threads > n) threads = n;
    parallel_for(threads, threads, run_slots, &jb);
    /* A failed task runs again here, so its message is this thread's last error (and a transient
       failure, such as memory, may pass now). */
    float *scratch = NULL;
    for (int32_t i = 0; i < n && !st; i++) {
        if (!failed[i]) continue;
        if (!scratch && !(scratch = malloc((size_t)chunk))) {
            st = set_error(TRTSHIM_ERR_MEMORY, "engine_weight_digests: out of memory");
            break;
        }
        st = run_task(&jb, &tasks[i], scratch);
    }
    free(scratch);
    if (st) goto done;
    for (int32_t w = 0; w < nw; w++)
        if (wanted[w] && (!select || select[w])) digest_combine(chunk_digests + 2 * held[w].first_chunk, held[w].chunks, digests + 2 * w);
done:
    free(held), free(checks), free(tasks), free(failed), free(chunk_digests), free(wanted);
    return st;
}

trtshim_status trtshim_engine_weight_digests(const trtshim_engine *engine, uint64_t *digests, int32_t num_threads) {
    if (!engine) return set_error(TRTSHIM_ERR_ARGUMENT, "engine_weight_digests: engine is null");
    trtshim_engine *e = (trtshim_engine *)engine;
    int32_t nw = e->refittable ? e->num_weights : 0;
    if (nw == 0) return TRTSHIM_OK;
    if (!digests) return set_error(TRTSHIM_ERR_ARGUMENT, "engine_weight_digests: digests is null");
    trtshim_status st = engine_begin_read(e, "engine_weight_digests");
    if (st) return st;
    st = weight_digests(e, NULL, digests, num_threads);
    engine_end_read(e);
    return st;
}

trtshim_status trtshim_engine_weight_digests_selected(const trtshim_engine *engine, const uint8_t *select,
                                                      uint64_t *digests, int32_t num_threads) {
    if (!engine) return set_error(TRTSHIM_ERR_ARGUMENT, "engine_weight_digests_selected: engine is null");
    trtshim_engine *e = (trtshim_engine *)engine;
    int32_t nw = e->refittable ? e->num_weights : 0;
    if (nw == 0) return TRTSHIM_OK;
    if (!digests || !select) return set_error(TRTSHIM_ERR_ARGUMENT, "engine_weight_digests_selected: digests or select is null");
    trtshim_status st = engine_begin_read(e, "engine_weight_digests_selected");
    if (st) return st;
    st = weight_digests(e, select, digests, num_threads);
    engine_end_read(e);
    return st;
}

trtshim_status trtshim_engine_weight_held(const trtshim_engine *engine, int32_t index, int32_t *packed,
                                         int32_t *transposed, int64_t *channels, int64_t *depth) {
    if (!engine) return set_error(TRTSHIM_ERR_ARGUMENT, "engine_weight_held: engine is null");
    trtshim_engine *e = (trtshim_engine *)engine;
    int32_t n = e->refittable ? e->num_weights : 0;
    if (index < 0 || index >= n)
        return set_error(TRTSHIM_ERR_ARGUMENT, "engine_weight_held: index %d out of range (the engine has %d refittable "
                         "weights)", index, n);
    const unit *fold, *pack, *copy;
    holders_of(e, index, &fold, &pack, &copy);
    int is_packed = !fold && pack;
    packed_view v;
    memset(&v, 0, sizeof(v));
    if (is_packed) {
        trtshim_status st = view_of(e, pack, e->buffers[pack->buffer].data, &v);
        if (st) return st;
    }
    if (packed) *packed = is_packed;
    if (transposed) *transposed = is_packed ? v.transposed : 0;
    if (channels) *channels = is_packed ? v.blocks * v.n : 0;
    if (depth) *depth = is_packed ? v.K : 0;
    return TRTSHIM_OK;
}
