/**
 * Opening a safetensors file: the file is memory-mapped through libtrtshim, only the header is parsed
 * (its pages are the only ones touched), and each tensor is a zero-copy view into the mapping.
 *
 * The header is read through the same mapping the views use, so the validated layout and the bytes
 * cannot come from two different files (a rename between a read and a map). A file truncated by someone
 * else while mapped is outside what any mapping reader can defend against (the OS signals SIGBUS); files
 * written by writeSafetensors are replaced by rename, which leaves open mappings intact.
 */
import * as E from 'fp-ts/lib/Either.js';
import * as TE from 'fp-ts/lib/TaskEither.js';
import { Mapping, nativeToF32Codes, nativeToFloat32 } from '../../ffi/mapping.js';
import { NativeError } from '../../ffi/library.js';
import { toFloat32 as convertToFloat32, convertibleToFloat32 } from './convert.js';
import { trtshimDtypeCode } from './dtypes.js';
import { issue, SafetensorsError, type SafetensorsIssue } from './errors.js';
import { headerLengthOf, type HeaderOptions, MAX_HEADER_LENGTH, parseHeader, type TensorInfo, type Header } from './header.js';

export type OpenOptions = HeaderOptions;

/** Views larger than this are refused (a typed array's limit in V8). */
const MAX_VIEW_BYTES = 2 ** 32;

export class SafetensorsFile implements Disposable {
  readonly tensors: ReadonlyMap<string, TensorInfo>;
  readonly metadata: Readonly<Record<string, string>> | undefined;
  readonly headerLength: number;

  constructor(
    readonly path: string,
    private readonly mapping: Mapping,
    header: Header,
  ) {
    this.tensors = new Map(header.tensors.map((info) => [info.name, info]));
    this.metadata = header.metadata;
    this.headerLength = header.headerLength;
  }

  get size(): number {
    return this.mapping.size;
  }

  get closed(): boolean {
    return this.mapping.closed;
  }

  /** Tensor names in file order. */
  names(): string[] {
    return [...this.tensors.keys()];
  }

  info(name: string): TensorInfo {
    const info = this.tensors.get(name);
    if (info === undefined) {
      throw new SafetensorsError(issue('NoSuchTensor', this.path, `no tensor of that name (the file has ${this.tensors.size})`, name));
    }
    return info;
  }

  /** The tensor's bytes: a view into the mapping, no copy. Valid (reading zeros) even after close. */
  bytes(name: string): Uint8Array {
    const info = this.info(name);
    this.checkOpen();
    if (info.byteLength > MAX_VIEW_BYTES) {
      throw new SafetensorsError(
        issue('TensorTooLarge', this.path, `${info.byteLength} bytes exceed the ${MAX_VIEW_BYTES}-byte limit of one view`, name),
      );
    }
    return this.mapping.view(info.byteOffset, info.byteLength);
  }

  /** The tensor converted to float32 (a new array), natively where libtrtshim converts the dtype. */
  toFloat32(name: string): Float32Array {
    const info = this.info(name);
    this.checkOpen();
    if (!convertibleToFloat32(info.dtype)) {
      throw new SafetensorsError(issue('NoConversion', this.path, `no conversion from ${info.dtype} to float32`, name));
    }
    const code = trtshimDtypeCode(info.dtype);
    const count = Number(info.shape.reduce((a, b) => a * BigInt(b), 1n));
    if (code !== undefined && nativeToF32Codes.has(code)) {
      return nativeToFloat32(code, this.mapping.address(info.byteOffset), count);
    }
    return convertToFloat32(info.dtype, this.bytes(name));
  }

  close(): void {
    this.mapping.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  private checkOpen(): void {
    if (this.mapping.closed) throw new SafetensorsError(issue('Closed', this.path, 'the file was closed'));
  }
}

/** Reads and validates only the header of a mapped file (never the data section). */
export const readHeader = (mapping: Mapping, file: string, options: OpenOptions = {}): E.Either<SafetensorsIssue, Header> => {
  const size = mapping.size;
  if (size < 8) return parseHeader(mapping.view(0, size), size, file, options);
  const length = headerLengthOf(mapping.view(0, 8));
  const wanted = length > BigInt(MAX_HEADER_LENGTH) ? 8 : Math.min(size, 8 + Number(length));
  return parseHeader(mapping.view(0, wanted), size, file, options);
};

export const openSafetensorsTE =
  (path: string, options: OpenOptions = {}): TE.TaskEither<SafetensorsIssue, SafetensorsFile> =>
  async () => {
    let mapping: Mapping;
    try {
      mapping = Mapping.open(path);
    } catch (e) {
      return E.left(issue('FileError', path, e instanceof NativeError ? e.detail : String(e)));
    }
    const header = readHeader(mapping, path, options);
    if (E.isLeft(header)) {
      mapping.close();
      return header;
    }
    return E.right(new SafetensorsFile(path, mapping, header.right));
  };

/** Opens a safetensors file; rejects with SafetensorsError (its _tag names the rule broken). */
export const openSafetensors = async (path: string, options: OpenOptions = {}): Promise<SafetensorsFile> => {
  const result = await openSafetensorsTE(path, options)();
  if (E.isLeft(result)) throw new SafetensorsError(result.left);
  return result.right;
};
