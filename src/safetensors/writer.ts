/**
 * Writing safetensors files, streaming: the header is computed from the tensors' descriptions, then the
 * data goes out tensor by tensor (a tensor's bytes may be produced lazily, so at most one tensor is held
 * at a time). The file is written under a temporary name beside the target, fsynced, renamed over the
 * target and the directory fsynced: a crash leaves either the previous file or the complete new one.
 *
 * Layout and header bytes follow the Python/Rust reference writer, so a file it wrote is reproduced byte
 * for byte: tensors sorted by dtype (the reference enum, descending) then name (UTF-8 bytes), header JSON
 * without spaces ("__metadata__" first, then tensors in data order, fields dtype, shape, data_offsets),
 * padded with spaces to a multiple of 8. Metadata keys are written sorted (the reference's order is its
 * hash map's).
 */
import { randomBytes } from 'node:crypto';
import { type FileHandle, open, rename, unlink } from 'node:fs/promises';
import { crashPoint } from '../crash-point.js';
import { basename, dirname } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import * as TE from 'fp-ts/lib/TaskEither.js';
import { byteSize, type Dtype, dtypeOrder, isDtype } from './dtypes.js';
import { issue, SafetensorsError, type SafetensorsIssue } from './errors.js';
import { METADATA_KEY } from './header.js';

export interface TensorToWrite {
  readonly name: string;
  readonly dtype: Dtype;
  readonly shape: readonly number[];
  /** The bytes (little-endian), or a function producing them when the writer reaches this tensor. */
  readonly data: Uint8Array | (() => Uint8Array | Promise<Uint8Array>);
}

export interface PlannedTensor {
  readonly name: string;
  readonly dtype: Dtype;
  readonly shape: readonly number[];
  readonly dataOffsets: readonly [number, number];
}

export interface WriteSummary {
  readonly path: string;
  readonly bytes: number;
  readonly tensors: number;
}

const utf8 = new TextEncoder();
const compareUtf8 = (a: string, b: string): number => Buffer.compare(Buffer.from(a, 'utf8'), Buffer.from(b, 'utf8'));
const loneSurrogate = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;

/** Checks descriptions and lays them out as the reference writer would. Pure. */
export const planLayout = (
  tensors: readonly Omit<TensorToWrite, 'data'>[],
  file: string,
): E.Either<SafetensorsIssue, readonly PlannedTensor[]> => {
  const seen = new Set<string>();
  const sized: { t: Omit<TensorToWrite, 'data'>; bytes: number }[] = [];
  for (const t of tensors) {
    const bad = (detail: string) => E.left(issue('InvalidTensor', file, detail, t.name));
    if (typeof t.name !== 'string' || t.name === METADATA_KEY || loneSurrogate.test(t.name)) {
      return bad(`a tensor name must be a well-formed string other than ${METADATA_KEY}`);
    }
    if (seen.has(t.name)) return bad('the name appears more than once');
    seen.add(t.name);
    if (!isDtype(t.dtype)) return bad(`unknown dtype '${String(t.dtype)}'`);
    if (!Array.isArray(t.shape) || !t.shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      return bad(`shape [${String(t.shape)}] must be non-negative integers`);
    }
    const size = byteSize(t.dtype, t.shape);
    if (typeof size !== 'bigint' || size > BigInt(Number.MAX_SAFE_INTEGER)) {
      return bad(`shape [${t.shape.join(', ')}] of ${t.dtype} has no whole, representable byte size (${String(size)})`);
    }
    sized.push({ t, bytes: Number(size) });
  }
  sized.sort((a, b) => dtypeOrder(b.t.dtype) - dtypeOrder(a.t.dtype) || compareUtf8(a.t.name, b.t.name));
  let offset = 0;
  return E.right(
    sized.map(({ t, bytes }) => {
      const planned: PlannedTensor = { name: t.name, dtype: t.dtype, shape: [...t.shape], dataOffsets: [offset, offset + bytes] };
      offset += bytes;
      return planned;
    }),
  );
};

/** The 8-byte length and the padded JSON header for a layout. Pure. */
export const serializeHeader = (layout: readonly PlannedTensor[], metadata?: Readonly<Record<string, string>>): Uint8Array => {
  const parts: string[] = [];
  if (metadata !== undefined) {
    const keys = Object.keys(metadata).sort(compareUtf8);
    parts.push(`${JSON.stringify(METADATA_KEY)}:{${keys.map((k) => `${JSON.stringify(k)}:${JSON.stringify(metadata[k])}`).join(',')}}`);
  }
  for (const t of layout) {
    parts.push(
      `${JSON.stringify(t.name)}:{"dtype":${JSON.stringify(t.dtype)},"shape":[${t.shape.join(',')}],"data_offsets":[${t.dataOffsets[0]},${t.dataOffsets[1]}]}`,
    );
  }
  const json = utf8.encode(`{${parts.join(',')}}`);
  const padded = Math.ceil(json.length / 8) * 8;
  const out = new Uint8Array(8 + padded).fill(0x20, 8 + json.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(padded), true);
  out.set(json, 8);
  return out;
};

const CHUNK = 64 * 1024 * 1024;
const writeAll = async (handle: FileHandle, bytes: Uint8Array): Promise<void> => {
  for (let offset = 0; offset < bytes.length; ) {
    const { bytesWritten } = await handle.write(bytes, offset, Math.min(CHUNK, bytes.length - offset));
    offset += bytesWritten;
  }
};

const collect = async (tensors: Iterable<TensorToWrite> | AsyncIterable<TensorToWrite>): Promise<TensorToWrite[]> => {
  const out: TensorToWrite[] = [];
  for await (const t of tensors) out.push(t);
  return out;
};

const validMetadata = (metadata: unknown): metadata is Readonly<Record<string, string>> =>
  typeof metadata === 'object' &&
  metadata !== null &&
  Object.entries(metadata).every(([k, v]) => typeof v === 'string' && !loneSurrogate.test(k) && !loneSurrogate.test(v));

export const writeSafetensorsTE =
  (
    path: string,
    tensors: Iterable<TensorToWrite> | AsyncIterable<TensorToWrite>,
    metadata?: Readonly<Record<string, string>>,
  ): TE.TaskEither<SafetensorsIssue, WriteSummary> =>
  async () => {
    if (metadata !== undefined && !validMetadata(metadata)) {
      return E.left(issue('InvalidTensor', path, 'metadata must be an object of well-formed strings', METADATA_KEY));
    }
    const all = await collect(tensors);
    const layout = planLayout(all, path);
    if (E.isLeft(layout)) return layout;
    const byName = new Map(all.map((t) => [t.name, t]));
    const header = serializeHeader(layout.right, metadata);
    const temporary = `${path}.tmp-${process.pid}-${randomBytes(6).toString('hex')}`;
    let handle: FileHandle | undefined;
    let current: string | undefined;
    try {
      handle = await open(temporary, 'wx');
      await writeAll(handle, header);
      crashPoint('safetensors.opened');
      for (const planned of layout.right) {
        current = planned.name;
        const source = (byName.get(planned.name) as TensorToWrite).data;
        const bytes = typeof source === 'function' ? await source() : source;
        const expected = planned.dataOffsets[1] - planned.dataOffsets[0];
        if (!(bytes instanceof Uint8Array) || bytes.length !== expected) {
          throw new SafetensorsError(
            issue('InvalidTensor', path, `expected ${expected} bytes of data, found ${bytes instanceof Uint8Array ? bytes.length : typeof bytes}`, planned.name),
          );
        }
        await writeAll(handle, bytes);
        crashPoint('safetensors.tensor');
      }
      current = undefined;
      await handle.sync();
      await handle.close();
      handle = undefined;
      crashPoint('safetensors.synced');
      await rename(temporary, path);
      crashPoint('safetensors.renamed');
      await syncDirectory(dirname(path));
      const last = layout.right[layout.right.length - 1];
      return E.right({ path, bytes: header.length + (last === undefined ? 0 : last.dataOffsets[1]), tensors: layout.right.length });
    } catch (e) {
      await handle?.close().catch(() => undefined);
      await unlink(temporary).catch(() => undefined);
      if (e instanceof SafetensorsError) return E.left(e.issue);
      return E.left(issue('WriteFailed', path, `writing ${basename(temporary)}: ${(e as Error).message}`, current));
    }
  };

const syncDirectory = async (directory: string): Promise<void> => {
  const handle = await open(directory, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
};

/** Writes a safetensors file atomically (temporary name, fsync, rename); rejects with SafetensorsError. */
export const writeSafetensors = async (
  path: string,
  tensors: Iterable<TensorToWrite> | AsyncIterable<TensorToWrite>,
  metadata?: Readonly<Record<string, string>>,
): Promise<WriteSummary> => {
  const result = await writeSafetensorsTE(path, tensors, metadata)();
  if (E.isLeft(result)) throw new SafetensorsError(result.left);
  return result.right;
};
