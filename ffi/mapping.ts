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

  /** Native address of byte `offset`, for passing to native calls. */
  address(offset: number): bigint {
    this.checkRange(offset, 0);
    return this.base + BigInt(offset);
  }

  /** A zero-copy view of `length` bytes at `offset`. */
  view(offset: number, length: number): Uint8Array {
    this.checkRange(offset, length);
    if (length === 0) return new Uint8Array(0);
    return new Uint8Array(viewOf(this.base + BigInt(offset), length));
  }

  close(): void {
    if (this.handle === null) return;
    native('trtshim_mapping_close')(this.handle);
    this.handle = null;
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

export { koffi };
