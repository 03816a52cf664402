/**
 * Reading and writing .trtr files (format.ts has the layout). Writes go to a temporary name beside the
 * target, are fsynced, renamed over it and the directory fsynced (as src/safetensors's writer does): a
 * crash leaves the old file or the complete new one. Reads check everything: magic, version, the header's
 * digest and codec, blob bounds and every blob's digest; a damaged file is one clear ModelFileError.
 * Blobs are read one at a time, so reading holds at most one segment's bytes beside the built model.
 */
import { randomBytes } from 'node:crypto';
import { type FileHandle, open, rename, stat, unlink } from 'node:fs/promises';
import { basename, dirname } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import * as TE from 'fp-ts/lib/TaskEither.js';
import { Engine } from '../../ffi/engine.js';
import { FallbackRunner, type SessionOpener, openOrtSession } from './fallback.js';
import { align, decodeHeader, decodePreamble, encodePreamble, PREAMBLE_BYTES, sha256, type BlobRef, type ModelHeader } from './format.js';
import { RefitModel, type EngineOrigin, type Stage } from './model.js';

export type ModelFileErrorDetail =
  | { readonly _tag: 'ModelFileUnreadable'; readonly path: string; readonly detail: string }
  | { readonly _tag: 'ModelFileInvalid'; readonly path: string; readonly detail: string }
  | { readonly _tag: 'ModelWriteFailed'; readonly path: string; readonly detail: string };

export const describeModelFileError = (e: ModelFileErrorDetail): string =>
  e._tag === 'ModelFileUnreadable' ? `${e.path}: cannot read the compiled model: ${e.detail}`
  : e._tag === 'ModelFileInvalid' ? `${e.path}: invalid compiled model: ${e.detail}`
  : `${e.path}: cannot write the compiled model: ${e.detail}`;

export class ModelFileError extends Error {
  override readonly name = 'ModelFileError';
  readonly _tag: ModelFileErrorDetail['_tag'];
  constructor(readonly detail: ModelFileErrorDetail) {
    super(describeModelFileError(detail));
    this._tag = detail._tag;
  }
}

class Invalid {
  constructor(readonly detail: string) {}
}

const readExactly = async (handle: FileHandle, position: number, length: number): Promise<Uint8Array> => {
  const buffer = new Uint8Array(length);
  for (let done = 0; done < length; ) {
    const { bytesRead } = await handle.read(buffer, done, Math.min(length - done, 1 << 30), position + done);
    if (bytesRead === 0) throw new Invalid(`the file ends at ${position + done}; ${length - done} more bytes were expected`);
    done += bytesRead;
  }
  return buffer;
};

const writeAll = async (handle: FileHandle, bytes: Uint8Array, position: number): Promise<void> => {
  for (let done = 0; done < bytes.byteLength; ) {
    const { bytesWritten } = await handle.write(bytes, done, Math.min(bytes.byteLength - done, 1 << 26), position + done);
    done += bytesWritten;
  }
};

type Identity = EngineOrigin['identity'];
const identityOf = (s: { dev: number; ino: number; size: number; mtimeMs: number }): Identity => ({ dev: s.dev, ino: s.ino, size: s.size, mtimeMs: s.mtimeMs });
export const sameIdentity = (a: Identity, b: Identity): boolean => a.dev === b.dev && a.ino === b.ino && a.size === b.size && a.mtimeMs === b.mtimeMs;

const readHeaderFrom = async (handle: FileHandle, size: number): Promise<ModelHeader> => {
  const preamble = decodePreamble(await readExactly(handle, 0, Math.min(size, PREAMBLE_BYTES)), size);
  if (E.isLeft(preamble)) throw new Invalid(preamble.left);
  const { headerOffset, headerLength, headerSha256 } = preamble.right;
  const header = decodeHeader(await readExactly(handle, headerOffset, headerLength), headerSha256, headerOffset);
  if (E.isLeft(header)) throw new Invalid(header.left);
  return header.right;
};

const failure = (path: string, e: unknown): ModelFileErrorDetail =>
  e instanceof Invalid ? { _tag: 'ModelFileInvalid', path, detail: e.detail }
  : e instanceof ModelFileError ? e.detail
  : (e as { code?: string }).code !== undefined ? { _tag: 'ModelFileUnreadable', path, detail: (e as Error).message }
  : { _tag: 'ModelFileInvalid', path, detail: (e as Error).message };

/** Reads only the header (no engine is built): enough for a plan. */
export const readModelHeaderTE = (path: string): TE.TaskEither<ModelFileErrorDetail, ModelHeader> => async () => {
  let handle: FileHandle | undefined;
  try {
    handle = await open(path, 'r');
    return E.right(await readHeaderFrom(handle, (await handle.stat()).size));
  } catch (e) {
    return E.left(failure(path, e));
  } finally {
    await handle?.close();
  }
};

/** A blob's bytes, checked against its digest. */
export const readBlob = async (path: string, blob: BlobRef, expected?: Identity): Promise<Uint8Array> => {
  const handle = await open(path, 'r');
  try {
    if (expected !== undefined && !sameIdentity(identityOf(await handle.stat()), expected)) throw new Invalid('the file changed since the model was read from it');
    const bytes = await readExactly(handle, blob.offset, blob.length);
    if (sha256(bytes) !== blob.sha256) throw new Invalid(`the blob at ${blob.offset} (${blob.length} bytes) does not match its sha256 (the file is damaged)`);
    return bytes;
  } finally {
    await handle.close();
  }
};

export interface ReadOptions {
  /** Opens fallback sessions (tests substitute it). */
  readonly openSession?: SessionOpener;
}

/** Reads a compiled model: header, then each segment (engines deserialized, fallback sessions opened). */
export const readModelFileTE = (path: string, options: ReadOptions = {}): TE.TaskEither<ModelFileErrorDetail, RefitModel> => async () => {
  const stages: Stage[] = [];
  let handle: FileHandle | undefined;
  try {
    handle = await open(path, 'r');
    const st = await handle.stat();
    const identity = identityOf(st);
    const header = await readHeaderFrom(handle, st.size);
    for (const record of header.segments) {
      const bytes = await readExactly(handle, record.blob.offset, record.blob.length);
      if (sha256(bytes) !== record.blob.sha256) throw new Invalid(`segment ${record.index}: its ${record.kind} blob does not match its sha256 (the file is damaged)`);
      const { blob, ...rest } = record;
      if (rest.kind === 'engine') {
        let engine: Engine;
        try {
          engine = Engine.deserialize(bytes);
        } catch (e) {
          throw new Invalid(`segment ${record.index}: engine: ${(e as Error).message}`);
        }
        try {
          stages.push({ kind: 'engine', record: rest, engine, context: engine.createContext(), origin: { path, blob, identity } });
        } catch (e) {
          engine[Symbol.dispose]();
          throw e;
        }
      } else {
        const types = new Map(header.tensors.map((t) => [t.name, t]));
        const desc = (name: string) => {
          const t = types.get(name);
          if (t === undefined) throw new Invalid(`segment ${record.index}: tensor '${name}' has no type in the header`);
          return t;
        };
        const runner = await FallbackRunner.open(record.index, bytes, rest.inputs.map(desc), rest.outputs.map(desc), options.openSession ?? openOrtSession);
        stages.push({ kind: 'fallback', record: rest, runner });
      }
    }
    const { current, segments: _segments, format: _format, version: _version, ...description } = header;
    return E.right(new RefitModel(description, current, stages));
  } catch (e) {
    for (const s of stages) {
      if (s.kind === 'engine') {
        s.context[Symbol.dispose]();
        s.engine[Symbol.dispose]();
      } else s.runner[Symbol.dispose]();
    }
    return E.left(failure(path, e));
  } finally {
    await handle?.close();
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

export interface WriteSummary {
  readonly path: string;
  readonly bytes: number;
  readonly segments: number;
}

/**
 * Writes the model atomically. Engines are serialized one at a time (the file holds at most one engine's
 * bytes in memory beside the model). Afterwards every engine's origin is the new file.
 */
export const writeModelFileTE = (model: RefitModel, path: string): TE.TaskEither<ModelFileErrorDetail, WriteSummary> => async () => {
  const temporary = `${path}.tmp-${process.pid}-${randomBytes(6).toString('hex')}`;
  let handle: FileHandle | undefined;
  try {
    handle = await open(temporary, 'wx');
    const blobs: BlobRef[] = [];
    let end = PREAMBLE_BYTES;
    for (const s of model.stages) {
      // One segment's bytes at a time.
      const bytes = s.kind === 'engine' ? s.engine.serialize() : s.runner.bytes;
      const offset = align(end);
      await writeAll(handle, bytes, offset);
      blobs.push({ offset, length: bytes.byteLength, sha256: sha256(bytes) });
      end = offset + bytes.byteLength;
    }
    const header = new TextEncoder().encode(JSON.stringify(model.header(new Map(model.stages.map((s, i) => [s.record.index, blobs[i]])))));
    await writeAll(handle, header, end);
    await writeAll(handle, encodePreamble(end, header), 0);
    end += header.byteLength;
    await handle.truncate(end);
    await handle.sync();
    await handle.close();
    handle = undefined;
    await rename(temporary, path);
    await syncDirectory(dirname(path));
    const identity = identityOf(await stat(path));
    model.stages.forEach((s, i) => {
      if (s.kind === 'engine') s.origin = { path, blob: blobs[i], identity };
    });
    return E.right({ path, bytes: end, segments: model.stages.length });
  } catch (e) {
    await handle?.close().catch(() => undefined);
    await unlink(temporary).catch(() => undefined);
    return E.left({ _tag: 'ModelWriteFailed', path, detail: `writing ${basename(temporary)}: ${(e as Error).message}` });
  }
};

const rejecting = async <A>(task: TE.TaskEither<ModelFileErrorDetail, A>): Promise<A> => {
  const r = await task();
  if (E.isLeft(r)) throw new ModelFileError(r.left);
  return r.right;
};

export const readModelHeader = (path: string): Promise<ModelHeader> => rejecting(readModelHeaderTE(path));
export const readModelFile = (path: string, options: ReadOptions = {}): Promise<RefitModel> => rejecting(readModelFileTE(path, options));
export const writeModelFile = (model: RefitModel, path: string): Promise<WriteSummary> => rejecting(writeModelFileTE(model, path));
