/**
 * Content digests (src/weightmap/digest.ts, libtrtshim/src/digest.c): the native hash against its
 * TypeScript reference, independence of the thread count, sensitivity to any change, the non-finite count
 * fused into the same pass, and the scan cache keyed by mapped-file identity.
 */
import { mkdtempSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { Mapping, mappedRangeOf, nativeDigest } from '../ffi/mapping.js';
import { openCheckpoint } from '../src/checkpoint/index.js';
import { bf16ToF32Bits, f16ToF32Bits } from '../src/safetensors/convert.js';
import { writeSafetensors } from '../src/safetensors/index.js';
import {
  clearScanCache, DIGEST_PREFIX, nonFiniteCount, referenceDigest, scanCacheStats, scanTensor, tensorDigest,
} from '../src/weightmap/digest.js';
import { memoryStore } from '../src/weightmap/store.js';

const dir = mkdtempSync(join(tmpdir(), 'trt-refit-digest-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const MiB = 1 << 20;
const bytesArb = fc.oneof(
  fc.uint8Array({ minLength: 0, maxLength: 300 }),
  // Across chunk boundaries (the native side hashes 1 MiB chunks in parallel, then their list).
  fc.tuple(fc.integer({ min: MiB - 70, max: 2 * MiB + 70 }), fc.integer()).map(([n, seed]) => {
    const out = new Uint8Array(n);
    let s = seed >>> 0 || 1;
    for (let i = 0; i < n; i++) {
      s ^= s << 13;
      s ^= s >>> 17;
      s ^= s << 5;
      out[i] = s & 0xff;
    }
    return out;
  }),
);

describe('trtshim_digest', () => {
  test.prop([bytesArb], { numRuns: 12 })('equals the TypeScript reference, for any thread count', (bytes) => {
    const reference = referenceDigest(bytes);
    expect(reference).toMatch(/^[0-9a-f]{32}$/);
    for (const numThreads of [1, 2, 3]) expect(nativeDigest(bytes, 6, { numThreads }).hex).toBe(reference);
  });

  test.prop([fc.uint8Array({ minLength: 1, maxLength: 4096 }), fc.nat(), fc.integer({ min: 0, max: 7 })], { numRuns: 200 })(
    'changes when any one bit changes',
    (bytes, at, bit) => {
      const flipped = Uint8Array.from(bytes);
      flipped[at % bytes.length] ^= 1 << bit;
      expect(nativeDigest(flipped, 6).hex).not.toBe(nativeDigest(bytes, 6).hex);
    },
  );

  test.prop([fc.integer({ min: 2, max: 64 }), fc.nat(), fc.nat(), fc.integer()], { numRuns: 100 })(
    'changes when two different 64-byte rows trade places, and when the data grows by a zero byte',
    (rows, a, b, seed) => {
      const bytes = new Uint8Array(rows * 64);
      for (let i = 0; i < bytes.length; i++) bytes[i] = (Math.imul(i + 1, seed | 1) >>> 13) & 0xff;
      const i = a % rows;
      const j = b % rows;
      const rowI = bytes.slice(i * 64, i * 64 + 64);
      const rowJ = bytes.slice(j * 64, j * 64 + 64);
      const swapped = Uint8Array.from(bytes);
      swapped.set(rowJ, i * 64);
      swapped.set(rowI, j * 64);
      if (rowI.some((x, k) => x !== rowJ[k])) expect(nativeDigest(swapped, 6).hex).not.toBe(nativeDigest(bytes, 6).hex);
      const longer = new Uint8Array(bytes.length + 1);
      longer.set(bytes);
      expect(nativeDigest(longer, 6).hex).not.toBe(nativeDigest(bytes, 6).hex);
    },
  );

  const specials = fc.constantFrom(NaN, Infinity, -Infinity);
  test.prop([fc.array(fc.oneof(fc.float({ noNaN: true, noDefaultInfinity: true }), specials), { maxLength: 3000 })], { numRuns: 60 })(
    'counts NaN and infinities of float32, float16, bfloat16 and float64 data as their float32 values would',
    (values) => {
      const f32 = Float32Array.from(values);
      const expected = values.filter((v) => !Number.isFinite(v)).length;
      expect(nativeDigest(new Uint8Array(f32.buffer), 0).nonFinite).toBe(expected);
      expect(nonFiniteCount(f32)).toBe(expected);
      // 16-bit patterns: every bit pattern of the upper halves, counted through the float32 conversions.
      const halves = new Uint16Array(f32.buffer);
      const bits = new Float32Array(1);
      const u = new Uint32Array(bits.buffer);
      const countAs = (toBits: (h: number) => number) => [...halves].filter((h) => ((u[0] = toBits(h)), !Number.isFinite(bits[0]))).length;
      expect(nativeDigest(new Uint8Array(halves.buffer), 1).nonFinite).toBe(countAs(f16ToF32Bits));
      expect(nativeDigest(new Uint8Array(halves.buffer), 2).nonFinite).toBe(countAs(bf16ToF32Bits));
      // float64, and integers (which count none).
      expect(nativeDigest(new Uint8Array(Float64Array.from(values).buffer), 10).nonFinite).toBe(expected);
      expect(nativeDigest(new Uint8Array(f32.buffer), 3).nonFinite).toBe(0);
    },
  );

  it('the count is the same across chunk boundaries and thread counts', () => {
    const data = new Float32Array(3 * (MiB / 4) + 5);
    const at = [0, MiB / 4 - 1, MiB / 4, 2 * (MiB / 4) + 7, data.length - 1];
    for (const i of at) data[i] = NaN;
    for (const numThreads of [1, 2]) expect(nativeDigest(new Uint8Array(data.buffer), 0, { numThreads }).nonFinite).toBe(at.length);
  });

  it('refuses a float count over bytes that are not whole elements, naming the dtype', () => {
    expect(() => nativeDigest(new Uint8Array(6), 0)).toThrow(/6 bytes are not a whole number of float32 elements/);
    expect(nativeDigest(new Uint8Array(6), 6).hex).toBe(referenceDigest(new Uint8Array(6)));
  });
});

describe('tensor digests', () => {
  it('cover the name, dtype, shape and bytes, and are prefixed (never equal to an older sha256 digest)', () => {
    const data = new Float32Array([1, 2, 3, 4]);
    const store = memoryStore([['a', { shape: [4], data }], ['b', { shape: [4], data }], ['c', { shape: [2, 2], data }], ['d', { shape: [4], data: new Float32Array([1, 2, 3, 5]) }]]);
    const ds = ['a', 'b', 'c', 'd'].map((n) => tensorDigest(store, n));
    expect(new Set(ds).size).toBe(4);
    for (const d of ds) expect(d).toMatch(new RegExp(`^${DIGEST_PREFIX}[0-9a-f]{32}$`));
    expect(tensorDigest(store, 'a')).toBe(tensorDigest(memoryStore([['a', { shape: [4], data: Float32Array.from(data) }]]), 'a'));
  });
});

describe('scans of mapped files', () => {
  const weights = (v: number) => [
    { name: 'w', dtype: 'F32' as const, shape: [1000], data: () => new Uint8Array(new Float32Array(1000).fill(v).buffer) },
    { name: 'bad', dtype: 'F32' as const, shape: [3], data: () => new Uint8Array(new Float32Array([1, NaN, Infinity]).buffer) },
  ];

  it('are read once per file identity: the same file mapped again reads nothing; a file replaced by rename is read again', async () => {
    clearScanCache();
    const path = join(dir, 'a.safetensors');
    await writeSafetensors(path, weights(1));
    let first: string;
    {
      using c = await openCheckpoint(path);
      first = tensorDigest(c, 'w');
      expect(scanTensor(c, 'bad')!.nonFinite).toBe(2);
      expect(scanCacheStats()).toMatchObject({ hits: 0, misses: 2 });
    }
    {
      // Opened again (a new mapping of the same file): hits, and the same digest.
      using c = await openCheckpoint(path);
      expect(tensorDigest(c, 'w')).toBe(first);
      expect(scanCacheStats().misses).toBe(2);
      expect(scanCacheStats().hits).toBeGreaterThanOrEqual(1);
    }
    // Replaced by rename (a new inode), other values: read again, another digest.
    await writeSafetensors(path, weights(2));
    {
      using c = await openCheckpoint(path);
      expect(tensorDigest(c, 'w')).not.toBe(first);
      expect(scanCacheStats().misses).toBe(3);
    }
  });

  it('a file changed in place (same inode, new mtime) is read again', () => {
    clearScanCache();
    const path = join(dir, 'raw.bin');
    writeFileSync(path, new Uint8Array(4096).fill(1));
    let before: string;
    {
      using m = Mapping.open(path);
      const view = m.view(0, 4096);
      expect(mappedRangeOf(view.subarray(8))).toMatchObject({ offset: 8, length: 4088 });
      before = m.identity!;
      expect(nonFiniteCount(new Float32Array(view.buffer))).toBe(0);
      expect(nonFiniteCount(new Float32Array(m.view(0, 4096).buffer))).toBe(0);
      expect(scanCacheStats()).toMatchObject({ hits: 1, misses: 1 });
    }
    writeFileSync(path, new Uint8Array(4096).fill(0xff)); // NaN patterns, same size, same inode
    utimesSync(path, new Date(), new Date(Date.now() + 5000));
    using m = Mapping.open(path);
    expect(m.identity).not.toBe(before);
    expect(nonFiniteCount(new Float32Array(m.view(0, 4096).buffer))).toBe(1024);
  });

  it('a view of a closed mapping is not taken for the file (it reads zeros now)', () => {
    const path = join(dir, 'closed.bin');
    writeFileSync(path, new Uint8Array(64).fill(0xff));
    const m = Mapping.open(path);
    const view = m.view(0, 64);
    m.close();
    expect(mappedRangeOf(view)).toBeUndefined();
    expect(nonFiniteCount(new Float32Array(view.buffer))).toBe(0);
  });

  it('advice on a range outside the mapping is refused', () => {
    const path = join(dir, 'advise.bin');
    writeFileSync(path, new Uint8Array(10000));
    using m = Mapping.open(path);
    for (const advice of ['willneed', 'sequential', 'populate'] as const) m.advise(100, 9000, advice);
    expect(() => m.advise(5000, 6000, 'populate')).toThrow(/outside/);
  });
});
