/**
 * A read-only memory map of a whole file (trtshim_mapping_*), and the native element conversions
 * (trtshim_convert_*).
 *
 * Views are Uint8Arrays over the mapped pages: nothing is copied into the JavaScript heap. Closing the
 * mapping does not invalidate views already handed out (they cannot be revoked): libtrtshim replaces the
 * file's pages with zero pages at the same address, so a stale view reads zeros and never crashes.
 * Views are made per range, so a file over 4 GiB works as long as each requested range fits a typed array.
 */
import { call, koffi, NativeError, native, Status, viewOf } from './library.js';

/** Read-ahead advice (trtshim_advice). `populate` maps the range's pages in one call, so a first read
 *  takes no page faults; `willneed` starts reading the file into the page cache; `sequential` tunes
 *  read-ahead for one pass in order. */
export type Advice = 'willneed' | 'sequential' | 'populate';
const adviceCodes: Readonly<Record<Advice, number>> = { willneed: 0, sequential: 1, populate: 2 };

/** Where a view handed out by Mapping.view lies: its ArrayBuffer -> the mapping and the buffer's offset. */
const mappedBuffers = new WeakMap<ArrayBufferLike, { readonly mapping: Mapping; readonly offset: number }>();

/**
 * The open mapping a typed array views, and the file offset of its first byte; undefined for memory that
 * is not a mapped file or whose mapping was closed (its pages then read zeros, not the file). Lets caches
 * key what they compute from a tensor by the file's identity (Mapping.identity) and the range.
 */
export const mappedRangeOf = (data: ArrayBufferView): { readonly mapping: Mapping; readonly offset: number; readonly length: number } | undefined => {
  const at = mappedBuffers.get(data.buffer);
  if (at === undefined || at.mapping.closed) return undefined;
  return { mapping: at.mapping, offset: at.offset + data.byteOffset, length: data.byteLength };
};

const toNumber = (value: unknown): number => (typeof value === 'bigint' ? Number(value) : (value as number));

export class Mapping implements Disposable {
  private handle: unknown;
  private constructor(
    handle: unknown,
    /** Address of the first byte (0n for an empty file). */
    private readonly base: bigint,
    readonly size: number,
    readonly path: string,
  ) {
    this.handle = handle;
  }

  /** Maps `path` read-only. Throws NativeError (kind 'Io') when the file cannot be opened or mapped. */
  static open(path: string): Mapping {
    const out: unknown[] = [null];
    call('trtshim_mapping_open', path, out);
    const data: unknown[] = [null];
    const size: unknown[] = [null];
    try {
      call('trtshim_mapping_data', out[0], data, size);
    } catch (e) {
      native('trtshim_mapping_close')(out[0]);
      throw e;
    }
    const base = data[0] === null ? 0n : BigInt(data[0] as bigint);
    return new Mapping(out[0], base, toNumber(size[0]), path);
  }

  get closed(): boolean {
    return this.handle === null;
  }

  #identity: string | undefined;
  /**
   * The mapped file as it was when mapped: "device:inode:size:mtime-ns:ctime-ns" (fstat of the open file,
   * so a rename of another file over the path afterwards does not change it). Undefined when the loaded
   * libtrtshim predates trtshim_mapping_identity.
   */
  get identity(): string | undefined {
    if (this.#identity === undefined && this.handle !== null && digestAvailable()) {
      const out = new BigUint64Array(5);
      call('trtshim_mapping_identity', this.handle, out);
      this.#identity = [...out].join(':');
    }
    return this.#identity;
  }

  /** Read-ahead advice for [offset, offset+length). Advice only: refused advice (an old libtrtshim, an
   *  old kernel) changes nothing and is not an error. */
  advise(offset: number, length: number, advice: Advice): void {
    this.checkRange(offset, length);
    if (length === 0 || !digestAvailable()) return;
    native('trtshim_mapping_advise')(this.handle, offset, length, adviceCodes[advice]);
  }

  /** Native address of byte `offset`, for passing to native calls. */
  address(offset: number): bigint {
    this.checkRange(offset, 0);
    return this.base + BigInt(offset);
  }

  /** A zero-copy view of `length` bytes at `offset`. */
  view(offset: number, length: number): Uint8Array {
    this.checkRange(offset, length);
    if (length === 0) return new Uint8Array(0);
    const key = `${offset}:${length}`;
    let buffer = this.#views.get(key);
    if (buffer === undefined) {
      buffer = viewOf(this.base + BigInt(offset), length);
      this.#views.set(key, buffer);
      mappedBuffers.set(buffer, { mapping: this, offset });
    }
    return new Uint8Array(buffer);
  }

  /**
   * ArrayBuffers over ranges already viewed, kept until close: V8 counts each new external buffer's
   * length as freshly allocated memory and answers a few tens of MiB of them with a full garbage
   * collection, so making a new one per read of a large tensor (a plan, then a refit) costs a collection
   * every few tensors. They hold address space only, never memory.
   */
  readonly #views = new Map<string, ArrayBuffer>();

  close(): void {
    if (this.handle === null) return;
    native('trtshim_mapping_close')(this.handle);
    this.handle = null;
    this.#views.clear();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  private checkRange(offset: number, length: number): void {
    if (this.handle === null) {
      throw new NativeError('mapping', Status.STATE, 'State', `mapping of '${this.path}' is closed`);
    }
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new NativeError(
        'mapping',
        Status.ARGUMENT,
        'Argument',
        `range [${offset}, ${offset}+${length}) outside '${this.path}' (${this.size} bytes)`,
      );
    }
  }
}

/** trtshim dtype codes that trtshim_convert_to_f32 accepts. */
export const nativeToF32Codes: ReadonlySet<number> = new Set([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);

/** Native conversion of `count` elements of dtype `code` at `source` (an address or a byte array) to float32. */
export const nativeToFloat32 = (code: number, source: bigint | Uint8Array, count: number): Float32Array => {
  const out = new Float32Array(count);
  if (count > 0) call('trtshim_convert_to_f32', code, source, out, count);
  return out;
};

/** Native conversion of float32 values to dtype `code` (float32, float16 or bfloat16), little-endian bytes. */
export const nativeFromFloat32 = (values: Float32Array, code: number): Uint8Array => {
  const size = Number(native('trtshim_dtype_size')(code));
  const out = new Uint8Array(values.length * size);
  call('trtshim_convert_from_f32', values, code, out, values.length);
  return out;
};

let hasDigest: boolean | undefined;
/** True when the loaded libtrtshim has the digest section (trtshim_digest, mapping identity and advice). */
export const digestAvailable = (): boolean => {
  if (hasDigest === undefined) {
    try {
      native('trtshim_digest');
      hasDigest = true;
    } catch {
      hasDigest = false;
    }
  }
  return hasDigest;
};

export interface NativeDigest {
  /** 128 bits as 32 hex digits (the two 64-bit halves, each most significant digit first). */
  readonly hex: string;
  /** NaN and infinite elements when dtype code is a float dtype (float32, float16, bfloat16, float64), else 0. */
  readonly nonFinite: number;
}

const hex64 = (x: bigint): string => x.toString(16).padStart(16, '0');

/** trtshim_digest over `data` (a view or a native address and size); `digest: false` counts only. */
export const nativeDigest = (data: Uint8Array, dtypeCode: number, options: { readonly digest?: boolean; readonly numThreads?: number } = {}): NativeDigest => {
  const out = new BigUint64Array(2);
  const nonFinite = new BigUint64Array(1);
  const wantDigest = options.digest ?? true;
  // An empty array is passed as a 1-byte one: koffi passes a zero-length buffer as null, which is fine
  // for size 0 too, but this keeps the call's arguments plain.
  call('trtshim_digest', data.byteLength === 0 ? new Uint8Array(1) : data, data.byteLength, dtypeCode, options.numThreads ?? 0, wantDigest ? out : null, nonFinite);
  return { hex: wantDigest ? hex64(out[0]) + hex64(out[1]) : '', nonFinite: Number(nonFinite[0]) };
};

export { koffi };
