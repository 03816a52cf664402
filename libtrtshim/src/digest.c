/* digest.c: content digests of tensor bytes, for telling changed weights from unchanged ones, with a
 * count of non-finite elements taken in the same pass (one read of the bytes serves both the plan's
 * digest and its NaN/infinity check).
 *
 * The hash is this project's own, non-cryptographic, 128 bits: it guards against accidental equality
 * (a fine-tuned tensor whose digest happens to match), not against someone crafting a collision. Its
 * step is a 64x64->128-bit multiply folded to 64 bits ("mix"), four independent lanes of 16 bytes each
 * per 64-byte block, so it runs at memory speed on one core.
 *
 * The result does not depend on the thread count: the bytes are cut into fixed 1 MiB chunks, each chunk
 * is hashed on its own (in parallel), and the list of chunk digests is hashed again. A single chunk is
 * its own digest. src/weightmap/digest.ts has a TypeScript reference of the same function; tests check
 * that both agree. */
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "threadpool.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#define DIGEST_SSE2 1
#endif

#define DIGEST_CHUNK ((uint64_t)1 << 20)
#define DIGEST_TOP_INDEX UINT64_MAX /* chunk index of the list of chunk digests */

static const uint64_t K[8] = {
    0x9c3f6a51e2d84b17ull, 0x51d7a3c90be6f285ull, 0xe84b2f1d7c5a3961ull, 0x2b6e9d4f18a7c3d5ull,
    0xc71a5e3b9f2d6087ull, 0x7f48b1e6d3a5c209ull, 0x3ad5c7e81b9f4e63ull, 0xb5e2497a6c1d8f3bull,
};

static inline uint64_t mix(uint64_t a, uint64_t b) {
    unsigned __int128 p = (unsigned __int128)a * b;
    return (uint64_t)p ^ (uint64_t)(p >> 64);
}

static inline uint64_t load64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v; /* little-endian hosts only (x86-64, aarch64), as the rest of libtrtshim */
}

/* Non-finite elements in one little-endian 64-bit word of values whose exponent field is `mask` in each
   of its 64/`bits` lanes (exponent all ones: NaN or infinity). Branch-free, so the loops vectorize. */
static inline __attribute__((always_inline)) uint64_t nonfinite_in(uint64_t w, const int bits) {
    if (bits == 32) {
        uint64_t x = (w & 0x7f8000007f800000ull) ^ 0x7f8000007f800000ull;
        return (uint64_t)((uint32_t)x == 0) + (uint64_t)((x >> 32) == 0);
    }
    if (bits == 16) { /* float16 */
        uint64_t x = (w & 0x7c007c007c007c00ull) ^ 0x7c007c007c007c00ull;
        return (uint64_t)((x & 0xffff) == 0) + (uint64_t)((x & 0xffff0000ull) == 0) + (uint64_t)((x & 0xffff00000000ull) == 0) +
               (uint64_t)((x >> 48) == 0);
    }
    if (bits == 15) { /* bfloat16 (16 bits; its own mask) */
        uint64_t x = (w & 0x7f807f807f807f80ull) ^ 0x7f807f807f807f80ull;
        return (uint64_t)((x & 0xffff) == 0) + (uint64_t)((x & 0xffff0000ull) == 0) + (uint64_t)((x & 0xffff00000000ull) == 0) +
               (uint64_t)((x >> 48) == 0);
    }
    if (bits == 64) return (uint64_t)((w & 0x7ff0000000000000ull) == 0x7ff0000000000000ull);
    return 0;
}

#ifdef DIGEST_SSE2
/* The same count, 16 bytes at a time (SSE2 is part of every x86-64), over the first n & ~15 bytes.
   Lane counts stay far below overflow: a chunk is at most 1 MiB. */
static inline __attribute__((always_inline)) uint64_t count_sse2(const unsigned char *p, uint64_t n, const int bits) {
    __m128i sum = _mm_setzero_si128();
    if (bits == 32) {
        const __m128i mask = _mm_set1_epi32(0x7f800000);
        for (uint64_t j = 0; j + 16 <= n; j += 16) {
            __m128i v = _mm_and_si128(_mm_loadu_si128((const __m128i *)(p + j)), mask);
            sum = _mm_sub_epi32(sum, _mm_cmpeq_epi32(v, mask)); /* -1 per non-finite lane */
        }
    } else {
        const __m128i mask = _mm_set1_epi16(bits == 16 ? 0x7c00 : 0x7f80), one = _mm_set1_epi16(1);
        for (uint64_t j = 0; j + 16 <= n; j += 16) {
            __m128i v = _mm_and_si128(_mm_loadu_si128((const __m128i *)(p + j)), mask);
            __m128i hit = _mm_srli_epi16(_mm_cmpeq_epi16(v, mask), 15); /* 1 per non-finite lane */
            sum = _mm_add_epi32(sum, _mm_madd_epi16(hit, one));      /* pairs of lanes into 32 bits */
        }
    }
    uint32_t lanes[4];
    _mm_storeu_si128((__m128i *)lanes, sum);
    return (uint64_t)lanes[0] + lanes[1] + lanes[2] + lanes[3];
}
#endif

static int lane_bits(trtshim_dtype dtype) {
    switch (dtype) {
    case TRTSHIM_FLOAT32: return 32;
    case TRTSHIM_FLOAT16: return 16;
    case TRTSHIM_BFLOAT16: return 15;
    case TRTSHIM_FLOAT64: return 64;
    default: return 0;
    }
}

static inline __attribute__((always_inline)) void absorb(uint64_t s[4], const unsigned char *block) {
    s[0] = mix(load64(block) ^ K[0], load64(block + 8) ^ s[0]);
    s[1] = mix(load64(block + 16) ^ K[1], load64(block + 24) ^ s[1]);
    s[2] = mix(load64(block + 32) ^ K[2], load64(block + 40) ^ s[2]);
    s[3] = mix(load64(block + 48) ^ K[3], load64(block + 56) ^ s[3]);
}

/* One chunk of n bytes: its 128-bit digest (the chunk's index and length mixed in) when `hash`, and its
   count of non-finite elements for lane width `bits` (0: none). Written once, specialized per call site. */
static inline __attribute__((always_inline)) uint64_t chunk(const unsigned char *p, uint64_t n, uint64_t index,
                                                            uint64_t out[2], const int hash, const int bits) {
    uint64_t s[4], count = 0;
    if (hash)
        for (int i = 0; i < 4; i++) s[i] = K[4 + i] ^ mix(n ^ K[i], index ^ K[7 - i]);
    uint64_t i = 0;
    if (bits) {
        uint64_t j = 0;
#ifdef DIGEST_SSE2
        if (bits != 64) count = count_sse2(p, n, bits), j = n & ~(uint64_t)15;
#endif
        for (; j + 8 <= n; j += 8) count += nonfinite_in(load64(p + j), bits);
    }
    if (hash)
        for (; i + 64 <= n; i += 64) absorb(s, p + i);
    else
        i = n & ~(uint64_t)63;
    if (i < n) {
        unsigned char tail[64] = {0}; /* the length in the seed tells padding from data; zeros are finite */
        memcpy(tail, p + i, (size_t)(n - i));
        if (hash) absorb(s, tail);
        if (bits)
            for (uint64_t j = (n - i) & ~(uint64_t)7; j < n - i; j += 8) count += nonfinite_in(load64(tail + j), bits);
    }
    if (hash) {
        uint64_t x = mix(s[0] ^ K[4], s[1] ^ K[5]);
        uint64_t y = mix(s[2] ^ K[6], s[3] ^ K[7]);
        out[0] = mix(x ^ K[0], y ^ K[1]);
        out[1] = mix(y ^ K[2], x ^ K[3]);
    }
    return count;
}

static uint64_t hash_chunk_only(const unsigned char *p, uint64_t n, uint64_t index, uint64_t out[2]) {
    return chunk(p, n, index, out, 1, 0);
}

/* For readback.c: chunk `index` of a byte stream (n <= 1 MiB bytes) and the digest of a list of chunk
   digests, so a caller producing the bytes chunk by chunk gets what trtshim_digest gives for the whole. */
uint64_t digest_chunk_bytes(void) { return DIGEST_CHUNK; }
void digest_chunk(const void *data, uint64_t n, uint64_t index, uint64_t out[2]) {
    hash_chunk_only(n ? (const unsigned char *)data : (const unsigned char *)"", n, index, out);
}
void digest_combine(const uint64_t *chunk_digests, uint64_t chunks, uint64_t out[2]) {
    if (chunks == 1) {
        out[0] = chunk_digests[0], out[1] = chunk_digests[1];
        return;
    }
    hash_chunk_only((const unsigned char *)chunk_digests, 16 * chunks, DIGEST_TOP_INDEX, out);
}

typedef struct {
    const unsigned char *data;
    uint64_t size;
    int bits; /* lane width of the non-finite count, 0 for none */
    int want_digest;
    uint64_t *digests; /* [2 * chunks] */
    uint64_t *counts;  /* [chunks] */
} digest_job;

static void digest_chunks(void *context, int64_t begin, int64_t end) {
    digest_job *job = context;
    for (int64_t c = begin; c < end; c++) {
        uint64_t offset = (uint64_t)c * DIGEST_CHUNK;
        uint64_t n = job->size - offset < DIGEST_CHUNK ? job->size - offset : DIGEST_CHUNK;
        const unsigned char *p = job->data + offset;
        uint64_t *out = job->digests + 2 * c, k = (uint64_t)c, count = 0;
        if (job->want_digest) {
            switch (job->bits) {
            case 32: count = chunk(p, n, k, out, 1, 32); break;
            case 16: count = chunk(p, n, k, out, 1, 16); break;
            case 15: count = chunk(p, n, k, out, 1, 15); break;
            case 64: count = chunk(p, n, k, out, 1, 64); break;
            default: count = chunk(p, n, k, out, 1, 0); break;
            }
        } else {
            switch (job->bits) {
            case 32: count = chunk(p, n, k, out, 0, 32); break;
            case 16: count = chunk(p, n, k, out, 0, 16); break;
            case 15: count = chunk(p, n, k, out, 0, 15); break;
            case 64: count = chunk(p, n, k, out, 0, 64); break;
            default: break;
            }
        }
        job->counts[c] = count;
    }
}

trtshim_status trtshim_digest(const void *data, uint64_t size, trtshim_dtype dtype, int32_t num_threads,
                              uint64_t *digest, uint64_t *nonfinite) {
    if (!data && size > 0) return set_error(TRTSHIM_ERR_ARGUMENT, "digest: data is null for %llu bytes", (unsigned long long)size);
    if (!dtype_valid((int)dtype)) return set_error(TRTSHIM_ERR_ARGUMENT, "digest: unknown dtype %d", (int)dtype);
    int bits = nonfinite ? lane_bits(dtype) : 0;
    if (bits) {
        uint64_t element = dtype == TRTSHIM_FLOAT32 ? 4 : dtype == TRTSHIM_FLOAT64 ? 8 : 2;
        if (size % element != 0)
            return set_error(TRTSHIM_ERR_ARGUMENT, "digest: %llu bytes are not a whole number of %s elements",
                             (unsigned long long)size, dtype_name(dtype));
    }
    if (nonfinite) *nonfinite = 0;
    if (!digest && !nonfinite) return TRTSHIM_OK;
    const unsigned char *bytes = data ? data : (const unsigned char *)"";
    uint64_t chunks = size == 0 ? 1 : (size + DIGEST_CHUNK - 1) / DIGEST_CHUNK;
    digest_job job = {bytes, size, bits, digest != NULL, NULL, NULL};
    uint64_t one_digest[2], one_count = 0;
    if (chunks == 1) {
        job.digests = one_digest;
        job.counts = &one_count;
        digest_chunks(&job, 0, 1);
    } else {
        job.digests = malloc(sizeof(uint64_t) * 3 * chunks);
        if (!job.digests) return set_error(TRTSHIM_ERR_MEMORY, "digest: out of memory for %llu chunk digests", (unsigned long long)chunks);
        job.counts = job.digests + 2 * chunks;
        int threads = num_threads <= 0 ? cpu_count() : num_threads;
        parallel_for((int64_t)chunks, threads, digest_chunks, &job);
    }
    if (nonfinite) {
        uint64_t total = 0;
        for (uint64_t c = 0; c < chunks; c++) total += job.counts[c];
        *nonfinite = total;
    }
    if (digest) {
        if (chunks == 1) {
            digest[0] = one_digest[0];
            digest[1] = one_digest[1];
        } else {
            hash_chunk_only((const unsigned char *)job.digests, 16 * chunks, DIGEST_TOP_INDEX, digest);
        }
    }
    if (chunks > 1) free(job.digests);
    return TRTSHIM_OK;
}
