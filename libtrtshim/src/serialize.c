/* serialize.c: engine files.
 *
 * Layout (little-endian):
 *   header   magic "TRTSHENG", u32 version, u32 flags, u32 section count, u32 0, u64 file size
 *   table    per section: u32 id, u32 0, u64 offset, u64 size, u64 checksum
 *   sections CONFIG (precision, flags, kernel formats: gemm, conv, int4 group size (version 2), tactic per step), NETWORK (inputs and layers in tensor order, then
 *            outputs: the structure without weight values), WEIGHTS (the network-level weight table),
 *            BLOBS (kernel-format buffers, each at a 64-byte aligned file offset; absent when stripped),
 *            RETAINED (float32 copies of batch-norm-fold members; absent when stripped)
 *   trailer  u64 checksum of every byte before it
 * Checksums are four interleaved FNV-1a lanes over 64-bit words, folded, then the tail (written here).
 * A reader checks sizes and checksums first, then replays the network through the same validation as the
 * network API, then checks every table against the engine that the replay plans.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine.h"

#define FORMAT_VERSION 2 /* 2: kernel formats (quantized weights) in CONFIG */
#define HEADER_BYTES 32
#define ENTRY_BYTES 32
#define MAX_SECTIONS 16

enum { SEC_CONFIG = 1, SEC_NETWORK = 2, SEC_WEIGHTS = 3, SEC_BLOBS = 4, SEC_RETAINED = 5 };
enum { FLAG_REFITTABLE = 1, FLAG_WEIGHTS = 2, FLAG_STREAMING = 4 };

static const char MAGIC[8] = {'T', 'R', 'T', 'S', 'H', 'E', 'N', 'G'};

static uint64_t checksum(const uint8_t *p, uint64_t n) {
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

/* ---- writer: counts when buf is NULL ---------------------------------------------------------- */

typedef struct {
    uint8_t *buf;
    uint64_t pos;
} writer;

static void w_bytes(writer *w, const void *p, uint64_t n) {
    if (w->buf && n) memcpy(w->buf + w->pos, p, (size_t)n);
    w->pos += n;
}
static void w_u32(writer *w, uint32_t v) { w_bytes(w, &v, 4); }
static void w_i64(writer *w, int64_t v) { w_bytes(w, &v, 8); }
static void w_u64(writer *w, uint64_t v) { w_bytes(w, &v, 8); }
static void w_str(writer *w, const char *s) {
    uint32_t n = (uint32_t)strlen(s);
    w_u32(w, n);
    w_bytes(w, s, n);
}
static void w_align(writer *w, uint64_t a) {
    while (w->pos % a) {
        if (w->buf) w->buf[w->pos] = 0;
        w->pos++;
    }
}

typedef struct {
    uint32_t id;
    uint64_t offset, size;
} section;

/* Writes (or measures) the whole file; returns its size. */
static uint64_t write_engine(const trtshim_engine *e, int include, uint8_t *buf) {
    writer w = {buf, 0};
    const trtshim_network *net = e->net;
    int with_weights = include && e->has_weights;
    int with_retained = with_weights && e->retained_valid;
    int has_retained = 0;
    for (int32_t i = 0; i < e->num_weights; i++) has_retained |= e->weights[i].retained != NULL;
    with_retained = with_retained && has_retained;
    uint32_t nsec = 3 + (uint32_t)with_weights + (uint32_t)with_retained;
    section secs[MAX_SECTIONS];
    uint32_t ns = 0;

    w_bytes(&w, MAGIC, 8);
    w_u32(&w, FORMAT_VERSION);
    w_u32(&w, (e->refittable ? FLAG_REFITTABLE : 0) | (with_weights ? FLAG_WEIGHTS : 0) |
                  (e->weight_streaming ? FLAG_STREAMING : 0));
    w_u32(&w, nsec);
    w_u32(&w, 0);
    w_u64(&w, 0); /* file size, patched below */
    uint64_t table = w.pos;
    w.pos += (uint64_t)nsec * ENTRY_BYTES;
    if (buf) memset(buf + table, 0, (size_t)nsec * ENTRY_BYTES);

    secs[ns] = (section){SEC_CONFIG, w.pos, 0};
    w_u32(&w, (uint32_t)e->precision);
    w_u32(&w, (uint32_t)e->refittable);
    w_u32(&w, (uint32_t)e->tactic_search);
    w_u32(&w, (uint32_t)e->config_threads);
    w_u32(&w, (uint32_t)e->gemm_format);
    w_u32(&w, (uint32_t)e->conv_format);
    w_u32(&w, (uint32_t)e->int4_group_size);
    w_u32(&w, (uint32_t)e->num_steps);
    for (int32_t i = 0; i < e->num_steps; i++) w_u32(&w, (uint32_t)e->steps[i].tactic);
    secs[ns].size = w.pos - secs[ns].offset;
    ns++;

    secs[ns] = (section){SEC_NETWORK, w.pos, 0};
    w_u32(&w, (uint32_t)net->num_tensors);
    w_u32(&w, (uint32_t)net->num_outputs);
    for (int32_t t = 0; t < net->num_tensors; t++) {
        const tensor_info *ti = &net->tensors[t];
        if (ti->producer_layer < 0) {
            w_u32(&w, 0);
            w_str(&w, net->inputs[ti->input_index].name);
            w_u32(&w, (uint32_t)ti->desc.dtype);
            w_u32(&w, (uint32_t)ti->desc.rank);
            for (int32_t i = 0; i < ti->desc.rank; i++) w_i64(&w, ti->desc.dims[i]);
        } else {
            const layer *l = &net->layers[ti->producer_layer];
            w_u32(&w, 1);
            w_u32(&w, (uint32_t)l->kind);
            w_str(&w, l->name);
            w_u32(&w, (uint32_t)l->num_inputs);
            for (int32_t i = 0; i < l->num_inputs; i++) w_u32(&w, (uint32_t)l->inputs[i]);
            for (int i = 0; i < MAX_PARAMS; i++) w_i64(&w, l->params[i]);
            uint32_t eps;
            memcpy(&eps, &l->epsilon, 4);
            w_u32(&w, eps);
            for (int i = 0; i < MAX_LAYER_WEIGHTS; i++) {
                w_u32(&w, (uint32_t)l->weights[i].present);
                w_u32(&w, (uint32_t)l->weights[i].dtype);
                w_i64(&w, l->weights[i].count);
            }
        }
    }
    for (int32_t i = 0; i < net->num_outputs; i++) {
        w_u32(&w, (uint32_t)net->outputs[i].tensor);
        w_str(&w, net->outputs[i].name);
    }
    secs[ns].size = w.pos - secs[ns].offset;
    ns++;

    secs[ns] = (section){SEC_WEIGHTS, w.pos, 0};
    w_u32(&w, (uint32_t)e->num_weights);
    for (int32_t i = 0; i < e->num_weights; i++) {
        const engine_weight *ew = &e->weights[i];
        w_str(&w, ew->name);
        w_u32(&w, (uint32_t)ew->role);
        w_u32(&w, (uint32_t)ew->dtype);
        w_u32(&w, (uint32_t)ew->rank);
        for (int32_t d = 0; d < ew->rank; d++) w_i64(&w, ew->dims[d]);
        w_u64(&w, ew->bytes);
    }
    secs[ns].size = w.pos - secs[ns].offset;
    ns++;

    if (with_weights) {
        secs[ns] = (section){SEC_BLOBS, w.pos, 0};
        w_u32(&w, (uint32_t)e->num_buffers);
        w_u32(&w, 0);
        uint64_t entries = w.pos;
        w.pos += (uint64_t)e->num_buffers * 16;
        for (int32_t i = 0; i < e->num_buffers; i++) {
            w_align(&w, 64);
            uint64_t at = w.pos;
            w_bytes(&w, e->buffers[i].data, e->buffers[i].bytes);
            if (buf) {
                memcpy(buf + entries + (uint64_t)i * 16, &at, 8);
                memcpy(buf + entries + (uint64_t)i * 16 + 8, &e->buffers[i].bytes, 8);
            }
        }
        secs[ns].size = w.pos - secs[ns].offset;
        ns++;
    }
    if (with_retained) {
        secs[ns] = (section){SEC_RETAINED, w.pos, 0};
        uint32_t count = 0;
        for (int32_t i = 0; i < e->num_weights; i++) count += e->weights[i].retained != NULL;
        w_u32(&w, count);
        for (int32_t i = 0; i < e->num_weights; i++) {
            if (!e->weights[i].retained) continue;
            w_u32(&w, (uint32_t)i);
            w_u64(&w, (uint64_t)e->weights[i].count);
            w_bytes(&w, e->weights[i].retained, (uint64_t)e->weights[i].count * 4);
        }
        secs[ns].size = w.pos - secs[ns].offset;
        ns++;
    }
    uint64_t total = w.pos + 8;
    if (buf) {
        memcpy(buf + 24, &total, 8);
        for (uint32_t i = 0; i < ns; i++) {
            uint8_t *entry = buf + table + (uint64_t)i * ENTRY_BYTES;
            uint64_t sum = checksum(buf + secs[i].offset, secs[i].size);
            memcpy(entry, &secs[i].id, 4);
            memcpy(entry + 8, &secs[i].offset, 8);
            memcpy(entry + 16, &secs[i].size, 8);
            memcpy(entry + 24, &sum, 8);
        }
        uint64_t whole = checksum(buf, w.pos);
        memcpy(buf + w.pos, &whole, 8);
    }
    return total;
}

trtshim_status trtshim_engine_serialized_size(const trtshim_engine *e, int32_t include_weights, uint64_t *size) {
    if (!e) return set_error(TRTSHIM_ERR_ARGUMENT, "engine_serialized_size: engine is null");
    if (!size) return set_error(TRTSHIM_ERR_ARGUMENT, "engine_serialized_size: size is null");
    *size = write_engine(e, include_weights, NULL);
    return TRTSHIM_OK;
}

trtshim_status trtshim_engine_serialize(const trtshim_engine *e, int32_t include_weights, void *buffer,
                                        uint64_t capacity, uint64_t *written) {
    if (!e) return set_error(TRTSHIM_ERR_ARGUMENT, "engine_serialize: engine is null");
    if (!buffer) return set_error(TRTSHIM_ERR_ARGUMENT, "engine_serialize: buffer is null");
    /* Sized and written under one hold, so a refit cannot change the size (stripped -> filled) between. */
    trtshim_status st = engine_begin_read((trtshim_engine *)e, "engine_serialize");
    if (st) return st;
    uint64_t need = write_engine(e, include_weights, NULL);
    if (capacity >= need) write_engine(e, include_weights, buffer);
    engine_end_read((trtshim_engine *)e);
    if (capacity < need)
        return set_error(TRTSHIM_ERR_ARGUMENT, "engine_serialize: buffer holds %llu bytes, the engine needs %llu",
                         (unsigned long long)capacity, (unsigned long long)need);
    if (written) *written = need;
    return TRTSHIM_OK;
}

/* ---- reader: every read is bounds-checked; a failed read sets `bad` ---------------------------- */

typedef struct {
    const uint8_t *p;
    uint64_t pos, end;
    int bad;
} reader;

static int r_bytes(reader *r, void *out, uint64_t n) {
    if (r->bad || n > r->end - r->pos) {
        r->bad = 1;
        if (out && n <= 64) memset(out, 0, (size_t)n);
        return 0;
    }
    if (out) memcpy(out, r->p + r->pos, (size_t)n);
    r->pos += n;
    return 1;
}
static uint32_t r_u32(reader *r) {
    uint32_t v = 0;
    r_bytes(r, &v, 4);
    return v;
}
static int64_t r_i64(reader *r) {
    int64_t v = 0;
    r_bytes(r, &v, 8);
    return v;
}
static uint64_t r_u64(reader *r) {
    uint64_t v = 0;
    r_bytes(r, &v, 8);
    return v;
}
/* A length-prefixed string copied into buf (capacity MAX_NAME). */
static int r_str(reader *r, char *buf) {
    uint32_t n = r_u32(r);
    if (r->bad || n == 0 || n >= MAX_NAME) {
        r->bad = 1;
        buf[0] = 0;
        return 0;
    }
    if (!r_bytes(r, buf, n)) {
        buf[0] = 0;
        return 0;
    }
    buf[n] = 0;
    if (strlen(buf) != n) r->bad = 1; /* an embedded NUL */
    return !r->bad;
}

static trtshim_status corrupt(const char *what) {
    return set_error(TRTSHIM_ERR_CORRUPT, "engine file: %s", what);
}

/* Replays the NETWORK section into a structure-only network. */
static trtshim_status read_network(reader *r, trtshim_network **out) {
    trtshim_network *net;
    trtshim_status st = trtshim_network_create(&net);
    if (st) return st;
    char *name = malloc(MAX_NAME);
    int32_t *inputs = NULL;
    if (!name) {
        trtshim_network_destroy(net);
        return set_error(TRTSHIM_ERR_MEMORY, "engine file: out of memory");
    }
    uint32_t num_tensors = r_u32(r), num_outputs = r_u32(r);
    if (r->bad || num_tensors > (r->end - r->pos) / 8 || num_outputs > (r->end - r->pos) / 8) {
        st = corrupt("network section: counts exceed the section");
        goto fail;
    }
    for (uint32_t t = 0; t < num_tensors; t++) {
        uint32_t type = r_u32(r);
        int32_t id = -1;
        char msg[1100];
        if (type == 0) {
            r_str(r, name);
            uint32_t dtype = r_u32(r), rank = r_u32(r);
            int64_t dims[MAX_RANK] = {0};
            if (rank > MAX_RANK) r->bad = 1;
            for (uint32_t i = 0; i < rank && !r->bad; i++) dims[i] = r_i64(r);
            if (r->bad) {
                st = corrupt("network section: truncated input record");
                goto fail;
            }
            st = network_add_input_impl(net, name, (trtshim_dtype)dtype, (int32_t)rank, dims, &id);
        } else if (type == 1) {
            layer_request q;
            memset(&q, 0, sizeof(q));
            uint32_t kind = r_u32(r);
            r_str(r, name);
            uint32_t n_in = r_u32(r);
            if (r->bad || kind >= LK_COUNT || n_in > 65536 || n_in > (r->end - r->pos) / 4) {
                st = corrupt("network section: bad layer record");
                goto fail;
            }
            free(inputs);
            inputs = malloc(sizeof(int32_t) * (n_in ? n_in : 1));
            if (!inputs) {
                st = set_error(TRTSHIM_ERR_MEMORY, "engine file: out of memory");
                goto fail;
            }
            for (uint32_t i = 0; i < n_in; i++) inputs[i] = (int32_t)r_u32(r);
            for (int i = 0; i < MAX_PARAMS; i++) q.params[i] = r_i64(r);
            uint32_t eps = r_u32(r);
            memcpy(&q.epsilon, &eps, 4);
            trtshim_weights w[MAX_LAYER_WEIGHTS];
            for (int i = 0; i < MAX_LAYER_WEIGHTS; i++) {
                uint32_t present = r_u32(r), dtype = r_u32(r);
                int64_t count = r_i64(r);
                if (present > 1) r->bad = 1;
                w[i] = (trtshim_weights){(trtshim_dtype)dtype, NULL, count};
                q.weights[i] = present ? &w[i] : NULL;
            }
            if (r->bad) {
                st = corrupt("network section: truncated layer record");
                goto fail;
            }
            q.kind = (layer_kind)kind;
            q.name = name;
            q.num_inputs = (int32_t)n_in;
            q.inputs = inputs;
            st = network_add_layer(net, &q, 0, &id);
        } else {
            st = corrupt("network section: unknown record type");
            goto fail;
        }
        if (st || id != (int32_t)t) {
            snprintf(msg, sizeof(msg), "network section: record %u does not replay: %s", t,
                     st ? trtshim_last_error() : "tensor id out of order");
            st = corrupt(msg);
            goto fail;
        }
    }
    for (uint32_t i = 0; i < num_outputs; i++) {
        int32_t tensor = (int32_t)r_u32(r);
        r_str(r, name);
        if (r->bad) {
            st = corrupt("network section: truncated output record");
            goto fail;
        }
        if ((st = network_mark_output_impl(net, tensor, name))) {
            char msg[1100];
            snprintf(msg, sizeof(msg), "network section: output %u: %s", i, trtshim_last_error());
            st = corrupt(msg);
            goto fail;
        }
    }
    if (r->pos != r->end) {
        st = corrupt("network section: trailing bytes");
        goto fail;
    }
    free(name);
    free(inputs);
    *out = net;
    return TRTSHIM_OK;
fail:
    free(name);
    free(inputs);
    trtshim_network_destroy(net);
    return st;
}

static trtshim_status check_weight_table(reader *r, const trtshim_engine *e) {
    char *name = malloc(MAX_NAME);
    if (!name) return set_error(TRTSHIM_ERR_MEMORY, "engine file: out of memory");
    trtshim_status st = TRTSHIM_OK;
    if (r_u32(r) != (uint32_t)e->num_weights) st = corrupt("weight table: count differs from the network");
    for (int32_t i = 0; i < e->num_weights && !st; i++) {
        const engine_weight *ew = &e->weights[i];
        r_str(r, name);
        uint32_t role = r_u32(r), dtype = r_u32(r), rank = r_u32(r);
        int same = !r->bad && strcmp(name, ew->name) == 0 && role == (uint32_t)ew->role && dtype == (uint32_t)ew->dtype &&
                   rank == (uint32_t)ew->rank;
        for (uint32_t d = 0; d < rank && d < MAX_RANK && same; d++) same = r_i64(r) == ew->dims[d];
        same = same && r_u64(r) == ew->bytes && !r->bad;
        if (!same) st = corrupt("weight table: an entry differs from the network");
    }
    if (!st && r->pos != r->end) st = corrupt("weight table: trailing bytes");
    free(name);
    return st;
}

static trtshim_status read_blobs(reader *r, trtshim_engine *e, uint64_t section_offset) {
    if (r_u32(r) != (uint32_t)e->num_buffers) return corrupt("blobs: buffer count differs from the planned engine");
    r_u32(r);
    if (r->bad || (uint64_t)e->num_buffers > (r->end - r->pos) / 16) return corrupt("blobs: truncated table");
    const uint8_t *base = r->p; /* r->p points at the section start; offsets are absolute in the file */
    uint64_t section_end = section_offset + r->end;
    uint64_t prev_end = section_offset + r->pos + (uint64_t)e->num_buffers * 16;
    for (int32_t i = 0; i < e->num_buffers; i++) {
        uint64_t at = r_u64(r), bytes = r_u64(r);
        if (r->bad || bytes != e->buffers[i].bytes || at % 64 || at < prev_end || at > section_end ||
            bytes > section_end - at)
            return corrupt("blobs: a buffer's offset or size is wrong");
        /* A streaming engine loaded from a file keeps its streamable weights in the mapping. */
        if (e->buffers[i].external) e->buffers[i].data = (void *)(base + (at - section_offset));
        else memcpy(e->buffers[i].data, base + (at - section_offset), (size_t)bytes);
        prev_end = at + bytes;
    }
    return TRTSHIM_OK;
}

static trtshim_status read_retained(reader *r, trtshim_engine *e) {
    uint32_t count = r_u32(r), expected = 0;
    for (int32_t i = 0; i < e->num_weights; i++) expected += e->weights[i].retained != NULL;
    if (r->bad || count != expected) return corrupt("retained copies: count differs from the planned engine");
    int32_t prev = -1;
    for (uint32_t k = 0; k < count; k++) {
        uint32_t w = r_u32(r);
        uint64_t n = r_u64(r);
        if (r->bad || w >= (uint32_t)e->num_weights || (int32_t)w <= prev || !e->weights[w].retained ||
            n != (uint64_t)e->weights[w].count || !r_bytes(r, e->weights[w].retained, n * 4))
            return corrupt("retained copies: a bad entry");
        prev = (int32_t)w;
    }
    if (r->pos != r->end) return corrupt("retained copies: trailing bytes");
    return TRTSHIM_OK;
}

/* mapped: `data` is a file mapping the engine may keep as host storage for streamable weights (it then
   sets e->file_map, and the caller must not unmap it). */
static trtshim_status deserialize(const void *data, uint64_t size, int mapped, trtshim_engine **out) {
    if (!data) return set_error(TRTSHIM_ERR_ARGUMENT, "engine_deserialize: data is null");
    if (!out) return set_error(TRTSHIM_ERR_ARGUMENT, "engine_deserialize: out is null");
    *out = NULL;
    const uint8_t *p = data;
    if (size < HEADER_BYTES + 8) return corrupt("shorter than a header");
    if (memcmp(p, MAGIC, 8) != 0) return corrupt("bad magic (not an engine file)");
    uint32_t version, flags, nsec;
    uint64_t total;
    memcpy(&version, p + 8, 4);
    memcpy(&flags, p + 12, 4);
    memcpy(&nsec, p + 16, 4);
    memcpy(&total, p + 24, 8);
    if (total != size) {
        char msg[128];
        snprintf(msg, sizeof(msg), "size is %llu bytes, the header says %llu (truncated?)", (unsigned long long)size,
                 (unsigned long long)total);
        return corrupt(msg);
    }
    uint64_t whole;
    memcpy(&whole, p + size - 8, 8);
    if (checksum(p, size - 8) != whole) return corrupt("checksum mismatch");
    if (version != FORMAT_VERSION)
        return set_error(TRTSHIM_ERR_VERSION, "engine file: format version %u, this library reads version %d", version,
                         FORMAT_VERSION);
    if (nsec < 3 || nsec > MAX_SECTIONS || HEADER_BYTES + (uint64_t)nsec * ENTRY_BYTES > size - 8)
        return corrupt("bad section count");
    uint64_t body_start = HEADER_BYTES + (uint64_t)nsec * ENTRY_BYTES, body_end = size - 8;
    reader sec[6];
    uint64_t sec_offset[6] = {0};
    memset(sec, 0, sizeof(sec));
    int seen[6] = {0};
    for (uint32_t i = 0; i < nsec; i++) {
        const uint8_t *entry = p + HEADER_BYTES + (uint64_t)i * ENTRY_BYTES;
        uint32_t id;
        uint64_t off, len, sum;
        memcpy(&id, entry, 4);
        memcpy(&off, entry + 8, 8);
        memcpy(&len, entry + 16, 8);
        memcpy(&sum, entry + 24, 8);
        if (id < SEC_CONFIG || id > SEC_RETAINED || seen[id]) return corrupt("bad or repeated section id");
        if (off < body_start || off > body_end || len > body_end - off) return corrupt("a section lies outside the file");
        if (checksum(p + off, len) != sum) return corrupt("section checksum mismatch");
        seen[id] = 1;
        sec[id] = (reader){p + off, 0, len, 0};
        sec_offset[id] = off;
    }
    if (!seen[SEC_CONFIG] || !seen[SEC_NETWORK] || !seen[SEC_WEIGHTS]) return corrupt("a required section is missing");
    int with_weights = (flags & FLAG_WEIGHTS) != 0;
    if ((flags & ~7u) || with_weights != seen[SEC_BLOBS] || (seen[SEC_RETAINED] && !with_weights))
        return corrupt("flags disagree with the sections present");

    reader *cr = &sec[SEC_CONFIG];
    uint32_t precision = r_u32(cr), refittable = r_u32(cr), search = r_u32(cr), threads = r_u32(cr);
    uint32_t gemm_format = r_u32(cr), conv_format = r_u32(cr), group = r_u32(cr), nsteps = r_u32(cr);
    if (cr->bad || (precision != TRTSHIM_FLOAT32 && precision != TRTSHIM_FLOAT16 && precision != TRTSHIM_BFLOAT16) ||
        gemm_format > TRTSHIM_WEIGHT_FORMAT_INT4 || conv_format > TRTSHIM_WEIGHT_FORMAT_INT4 ||
        (group != 32 && group != 64 && group != 128) ||
        refittable > 1 || search > 1 || threads > 1024 || refittable != ((flags & FLAG_REFITTABLE) != 0) ||
        nsteps != (cr->end - cr->pos) / 4 || (cr->end - cr->pos) % 4)
        return corrupt("bad config section");
    int32_t *tactics = malloc(sizeof(int32_t) * (nsteps ? nsteps : 1));
    if (!tactics) return set_error(TRTSHIM_ERR_MEMORY, "engine file: out of memory");
    for (uint32_t i = 0; i < nsteps; i++) tactics[i] = (int32_t)r_u32(cr);

    trtshim_network *net = NULL;
    trtshim_status st = read_network(&sec[SEC_NETWORK], &net);
    if (st) {
        free(tactics);
        return st;
    }
    if (net->num_outputs == 0) {
        free(tactics);
        trtshim_network_destroy(net);
        return corrupt("the network has no outputs");
    }
    trtshim_engine *e;
    st = engine_new(net, (trtshim_dtype)precision, (int32_t)refittable, (int32_t)search, (int32_t)threads, &e);
    if (st) {
        free(tactics);
        trtshim_network_destroy(net);
        return st;
    }
    e->weight_streaming = (flags & FLAG_STREAMING) != 0;
    e->gemm_format = (int32_t)gemm_format;
    e->conv_format = (int32_t)conv_format;
    e->int4_group_size = (int32_t)group;
    st = engine_plan(e, tactics, (int32_t)nsteps);
    free(tactics);
    if (st == TRTSHIM_ERR_ARGUMENT) st = TRTSHIM_ERR_CORRUPT;
    if (!st) st = check_weight_table(&sec[SEC_WEIGHTS], e);
    int keep_mapping = !st && mapped && with_weights && e->weight_streaming;
    for (int32_t i = 0; keep_mapping && i < e->num_steps; i++) {
        const step *s = &e->steps[i];
        if ((s->kind == STEP_GEMM || s->kind == STEP_CONV) && s->packed_buffer >= 0) e->buffers[s->packed_buffer].external = 1;
    }
    if (!st) st = engine_alloc_buffers(e);
    if (!st) st = engine_alloc_retained(e);
    if (!st && with_weights) st = read_blobs(&sec[SEC_BLOBS], e, sec_offset[SEC_BLOBS]);
    if (!st && seen[SEC_RETAINED]) st = read_retained(&sec[SEC_RETAINED], e);
    if (!st) st = stream_init(e);
    if (st) {
        engine_release(e);
        return st;
    }
    e->has_weights = with_weights;
    int has_retained = 0;
    for (int32_t i = 0; i < e->num_weights; i++) has_retained |= e->weights[i].retained != NULL;
    e->retained_valid = with_weights && (seen[SEC_RETAINED] || !has_retained);
    if (keep_mapping) {
        e->file_map = (void *)data;
        e->file_map_bytes = size;
    }
    *out = e;
    return TRTSHIM_OK;
}

trtshim_status trtshim_engine_deserialize(const void *data, uint64_t size, trtshim_engine **out) {
    return deserialize(data, size, 0, out);
}

/* ---- files ---------------------------------------------------------------------------------- */

trtshim_status trtshim_engine_save(const trtshim_engine *e, const char *path, int32_t include_weights) {
    if (!e) return set_error(TRTSHIM_ERR_ARGUMENT, "engine_save: engine is null");
    if (!path || !*path) return set_error(TRTSHIM_ERR_ARGUMENT, "engine_save: path is null or empty");
    trtshim_status held = engine_begin_read((trtshim_engine *)e, "engine_save");
    if (held) return held;
    uint64_t size = write_engine(e, include_weights, NULL);
    uint8_t *buf = malloc((size_t)size);
    if (buf) write_engine(e, include_weights, buf);
    engine_end_read((trtshim_engine *)e);
    if (!buf) return set_error(TRTSHIM_ERR_MEMORY, "engine_save: out of memory for %llu bytes", (unsigned long long)size);
    size_t plen = strlen(path);
    char *tmp = malloc(plen + 16);
    if (!tmp) {
        free(buf);
        return set_error(TRTSHIM_ERR_MEMORY, "engine_save: out of memory");
    }
    snprintf(tmp, plen + 16, "%s.tmp.XXXXXX", path);
    int fd = mkstemp(tmp);
    if (fd < 0) {
        trtshim_status st = set_error(TRTSHIM_ERR_IO, "engine_save '%s': cannot create a temporary file: %s", path, strerror(errno));
        free(buf), free(tmp);
        return st;
    }
    trtshim_status st = TRTSHIM_OK;
    uint64_t done = 0;
    while (done < size && !st) {
        ssize_t n = write(fd, buf + done, (size_t)(size - done > (1u << 30) ? (1u << 30) : size - done));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) st = set_error(TRTSHIM_ERR_IO, "engine_save '%s': write failed: %s", path, strerror(errno));
        else done += (uint64_t)n;
    }
    if (!st) (void)fchmod(fd, 0644); /* mkstemp makes 0600; an engine file is ordinary data */
    if (!st && fsync(fd) != 0) st = set_error(TRTSHIM_ERR_IO, "engine_save '%s': fsync failed: %s", path, strerror(errno));
    if (close(fd) != 0 && !st) st = set_error(TRTSHIM_ERR_IO, "engine_save '%s': close failed: %s", path, strerror(errno));
    if (!st && rename(tmp, path) != 0) st = set_error(TRTSHIM_ERR_IO, "engine_save '%s': rename failed: %s", path, strerror(errno));
    if (st) unlink(tmp);
    free(buf);
    free(tmp);
    return st;
}

/* Maps the file read-only (no copy of it in anonymous memory; the engine copies what it keeps), or reads
   it where mapping is refused. */
trtshim_status trtshim_engine_load(const char *path, trtshim_engine **out) {
    if (!path) return set_error(TRTSHIM_ERR_ARGUMENT, "engine_load: path is null");
    if (!out) return set_error(TRTSHIM_ERR_ARGUMENT, "engine_load: out is null");
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return set_error(errno == ENOENT ? TRTSHIM_ERR_NOT_FOUND : TRTSHIM_ERR_IO, "engine_load '%s': %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return set_error(TRTSHIM_ERR_IO, "engine_load '%s': not a regular file", path);
    }
    uint64_t size = (uint64_t)sb.st_size;
    void *map = size ? mmap(NULL, (size_t)size, PROT_READ, MAP_PRIVATE, fd, 0) : MAP_FAILED;
    uint8_t *buf = NULL;
    if (map == MAP_FAILED) {
        buf = malloc(size ? (size_t)size : 1);
        if (!buf) {
            close(fd);
            return set_error(TRTSHIM_ERR_MEMORY, "engine_load '%s': out of memory for %llu bytes", path, (unsigned long long)size);
        }
        uint64_t done = 0;
        while (done < size) {
            ssize_t n = read(fd, buf + done, (size_t)(size - done > (1u << 30) ? (1u << 30) : size - done));
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) break;
            done += (uint64_t)n;
        }
        if (done != size) {
            close(fd);
            free(buf);
            return set_error(TRTSHIM_ERR_IO, "engine_load '%s': read %llu of %llu bytes", path, (unsigned long long)done,
                             (unsigned long long)size);
        }
    }
    close(fd);
    trtshim_status st = deserialize(buf ? (const void *)buf : map, size, buf == NULL, out);
    /* A streaming engine that kept the mapping refits its streamed weights in place there: private
       copy-on-write pages, the file itself is never written. */
    if (!st && (*out)->file_map && mprotect(map, (size_t)size, PROT_READ | PROT_WRITE) != 0) {
        trtshim_engine_destroy(*out);
        *out = NULL;
        return set_error(TRTSHIM_ERR_IO, "engine_load '%s': cannot make the mapped weights writable: %s", path, strerror(errno));
    }
    if (st) {
        char msg[1100];
        snprintf(msg, sizeof(msg), "%s", trtshim_last_error());
        set_error(st, "engine_load '%s': %s", path, msg);
    }
    if (buf) free(buf);
    else if (st || !(*out)->file_map) munmap(map, (size_t)size);
    return st;
}
