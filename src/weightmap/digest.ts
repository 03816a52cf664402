/**
 * Content digests. A checkpoint tensor's digest covers its name, dtype, shape and bytes; a weight's source
 * digest combines the digests of the tensors its expression reads, in order, so a refit can tell unchanged
 * weights without evaluating anything.
 *
 * The bytes are hashed with libtrtshim's trtshim_digest (128 bits, not cryptographic: it tells changed
 * tensors from unchanged ones, it does not resist a crafted collision), which runs at memory speed on every
 * core and counts NaN and infinite elements in the same pass, so a plan reads each source once for both its
 * digest and its finiteness check. `referenceDigest` is the same function in TypeScript (tests compare
 * them; it also serves when the loaded libtrtshim has no digest section).
 *
 * Digests are prefixed `c1:`. Older weight maps hold sha256 digests (64 hex digits, no prefix): those never
 * equal a new digest, so the first refit of an old model moves every weight once (safe), and records new ones.
 *
 * Scans of memory-mapped tensors are memoized process-wide by the file's identity (device, inode, size,
 * modification and change times, taken from the open mapping) and the tensor's byte range, so planning
 * again over an unchanged file reads nothing, and the effect's finiteness check of a tensor the plan
 * already scanned is free.
 */
import { createHash } from 'node:crypto';
import { digestAvailable, mappedRangeOf, nativeDigest } from '../../ffi/mapping.js';
import type { TensorStore } from './store.js';

export const DIGEST_PREFIX = 'c1:';

// ---- the hash, in TypeScript (reference of libtrtshim/src/digest.c) --------------------------------

const M64 = (1n << 64n) - 1n;
const CHUNK = 1 << 20;
const K = [
  0x9c3f6a51e2d84b17n, 0x51d7a3c90be6f285n, 0xe84b2f1d7c5a3961n, 0x2b6e9d4f18a7c3d5n,
  0xc71a5e3b9f2d6087n, 0x7f48b1e6d3a5c209n, 0x3ad5c7e81b9f4e63n, 0xb5e2497a6c1d8f3bn,
] as const;

const mix = (a: bigint, b: bigint): bigint => {
  const p = a * b;
  return (p & M64) ^ (p >> 64n);
};

const chunkDigest = (bytes: Uint8Array, index: bigint): [bigint, bigint] => {
  const n = BigInt(bytes.length);
  const s = [0, 1, 2, 3].map((i) => K[4 + i] ^ mix(n ^ K[i], index ^ K[7 - i]));
  const absorb = (block: DataView, at: number) => {
    for (let l = 0; l < 4; l++) s[l] = mix(block.getBigUint64(at + 16 * l, true) ^ K[l], block.getBigUint64(at + 16 * l + 8, true) ^ s[l]);
  };
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let i = 0;
  for (; i + 64 <= bytes.length; i += 64) absorb(view, i);
  if (i < bytes.length) {
    const tail = new Uint8Array(64);
    tail.set(bytes.subarray(i));
    absorb(new DataView(tail.buffer), 0);
  }
  const x = mix(s[0] ^ K[4], s[1] ^ K[5]);
  const y = mix(s[2] ^ K[6], s[3] ^ K[7]);
  return [mix(x ^ K[0], y ^ K[1]), mix(y ^ K[2], x ^ K[3])];
};

const hex64 = (x: bigint): string => x.toString(16).padStart(16, '0');

/** trtshim_digest's 128 bits as 32 hex digits, computed in TypeScript (slow: BigInt arithmetic). */
export const referenceDigest = (bytes: Uint8Array): string => {
  const chunks = Math.max(1, Math.ceil(bytes.length / CHUNK));
  if (chunks === 1) return chunkDigest(bytes, 0n).map(hex64).join('');
  const list = new Uint8Array(16 * chunks);
  const listView = new DataView(list.buffer);
  for (let c = 0; c < chunks; c++) {
    const [a, b] = chunkDigest(bytes.subarray(c * CHUNK, Math.min(bytes.length, (c + 1) * CHUNK)), BigInt(c));
    listView.setBigUint64(16 * c, a, true);
    listView.setBigUint64(16 * c + 8, b, true);
  }
  return chunkDigest(list, M64).map(hex64).join('');
};

/** libtrtshim dtype codes of the safetensors dtypes whose non-finite elements trtshim_digest counts. */
const floatCodes: Readonly<Record<string, number>> = { F32: 0, F16: 1, BF16: 2, F64: 10 };
const UINT8 = 6;

/** 128-bit digest of bytes, 32 hex digits: native where the library has it, else the reference. */
export const hash128 = (bytes: Uint8Array): string => (digestAvailable() ? nativeDigest(bytes, UINT8).hex : referenceDigest(bytes));

// ---- tensor scans: digest and non-finite count in one read ------------------------------------------

export interface TensorScan {
  /** Digest of the tensor's bytes alone (32 hex digits). */
  readonly bytesDigest: string;
  /** NaN and infinite values (as float32: an F64 beyond float32's range counts too); 0 for non-float dtypes. */
  readonly nonFinite: number;
}

/** Scans of mapped ranges, by file identity and range; least recently used first. */
const scans = new Map<string, TensorScan>();
const MAX_SCANS = 1 << 16;
let hits = 0;
let misses = 0;

const remember = (key: string, scan: TensorScan): void => {
  scans.set(key, scan);
  if (scans.size > MAX_SCANS) scans.delete(scans.keys().next().value as string);
};

/** Counters of the process-wide scan cache (tests and benchmarks). */
export const scanCacheStats = (): { readonly entries: number; readonly hits: number; readonly misses: number } => ({ entries: scans.size, hits, misses });
export const clearScanCache = (): void => {
  scans.clear();
  hits = 0;
  misses = 0;
};

/** The cache key of bytes that view an open mapped file, or undefined. */
const keyOf = (bytes: Uint8Array, dtype: string): string | undefined => {
  const at = mappedRangeOf(bytes);
  const identity = at?.mapping.identity;
  return at === undefined || identity === undefined ? undefined : `${identity}|${at.offset}|${at.length}|${dtype}`;
};

const countNonFinite = (values: Float32Array): number => {
  let bad = 0;
  for (let i = 0; i < values.length; i++) if (!Number.isFinite(values[i])) bad++;
  return bad;
};

/** Digest and non-finite count of a store's tensor; `toFloat32` is the store's conversion (for the
 *  dtypes the native count does not cover exactly). */
const scanBytes = (bytes: Uint8Array, dtype: string, toFloat32: () => Float32Array): TensorScan => {
  const key = keyOf(bytes, dtype);
  if (key !== undefined) {
    const known = scans.get(key);
    if (known !== undefined) {
      hits++;
      scans.delete(key); // most recently used last
      scans.set(key, known);
      return known;
    }
    misses++;
    const at = mappedRangeOf(bytes)!;
    // One call reads the range in and maps its pages. On a file dropped from the page cache this read at
    // 2.0 GB/s against 0.9 GB/s faulting page by page (a C driver over trtshim_digest, 1 GiB); on a warm
    // file it changes nothing measurable (bench/safetensors-read.ts native_scan_* figures).
    at.mapping.advise(at.offset, at.length, 'populate');
  }
  const code = floatCodes[dtype];
  let scan: TensorScan;
  if (digestAvailable()) {
    const native = nativeDigest(bytes, code ?? UINT8);
    // float64 values beyond float32's range become infinities when converted: count as the converted values.
    scan = { bytesDigest: native.hex, nonFinite: dtype === 'F64' ? countNonFinite(toFloat32()) : native.nonFinite };
  } else {
    scan = { bytesDigest: referenceDigest(bytes), nonFinite: code === undefined ? 0 : countNonFinite(toFloat32()) };
  }
  if (key !== undefined) remember(key, scan);
  return scan;
};

/** Scans (digest + non-finite count) of a store's tensors. */
export const scanTensor = (store: TensorStore, name: string): TensorScan | undefined => {
  const info = store.tensors.get(name);
  if (info === undefined) return undefined;
  return scanBytes(store.bytes(name), info.dtype, () => store.toFloat32(name));
};

/**
 * Non-finite values of float32 data: memoized like scans when the data views a mapped file (so a tensor
 * the plan scanned costs nothing here), else counted natively on every core.
 */
export const nonFiniteCount = (data: Float32Array): number => {
  const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  const key = keyOf(bytes, 'F32');
  if (key !== undefined) return scanBytes(bytes, 'F32', () => data).nonFinite;
  return digestAvailable() ? nativeDigest(bytes, floatCodes.F32, { digest: false }).nonFinite : countNonFinite(data);
};

const tensorDigestOf = (name: string, dtype: string, shape: readonly number[], bytesDigest: string): string =>
  DIGEST_PREFIX + hash128(new TextEncoder().encode(`${name}\n${dtype}\n${shape.join(',')}\n${bytesDigest}`));

export const tensorDigest = (store: TensorStore, name: string): string => {
  const info = store.tensors.get(name);
  if (info === undefined) return DIGEST_PREFIX + hash128(new TextEncoder().encode(`missing\n${name}`));
  return tensorDigestOf(name, info.dtype, info.shape, scanTensor(store, name)!.bytesDigest);
};

export const combineDigests = (digests: readonly string[]): string =>
  digests.length === 1 ? digests[0] : createHash('sha256').update(digests.join('\n')).digest('hex');

/** Tensor scans and digests, memoized per store (tied tensors and folds read the same tensor several times). */
export const scanCache = (store: TensorStore): { readonly scan: (name: string) => TensorScan | undefined; readonly digest: (name: string) => string } => {
  const scanned = new Map<string, TensorScan | undefined>();
  const digests = new Map<string, string>();
  const scan = (name: string): TensorScan | undefined => {
    if (!scanned.has(name)) scanned.set(name, scanTensor(store, name));
    return scanned.get(name);
  };
  const digest = (name: string): string => {
    let d = digests.get(name);
    if (d === undefined) {
      const info = store.tensors.get(name);
      d = info === undefined ? tensorDigest(store, name) : tensorDigestOf(name, info.dtype, info.shape, scan(name)!.bytesDigest);
      digests.set(name, d);
    }
    return d;
  };
  return { scan, digest };
};

/** Digests of tensors, memoized per store. */
export const digestCache = (store: TensorStore): ((name: string) => string) => scanCache(store).digest;

export const valueDigest = (data: ArrayBufferView): string => DIGEST_PREFIX + hash128(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
