/**
 * A checkpoint: one named set of tensors, from a single safetensors file or from a sharded checkpoint
 * (`model.safetensors.index.json`, whose weight_map names the shard file of every tensor). Tensors are
 * views into the mapped files, as in SafetensorsFile.
 */
import { closeSync, fstatSync, statSync } from 'node:fs';
import { stat } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import * as TE from 'fp-ts/lib/TaskEither.js';
import { PathReporter } from 'io-ts/lib/PathReporter.js';
import * as t from 'io-ts';
import type { TensorInfo } from '../safetensors/header.js';
import { openSafetensorsTE, type OpenOptions, type SafetensorsFile } from '../safetensors/reader.js';
import { CheckpointError, type CheckpointIssue } from './errors.js';
import { allowedRoots, OPEN_FAILED, openConfined, readConfinedText, relativeInside } from './confine.js';
import { issue } from '../safetensors/errors.js';

export const INDEX_FILE = 'model.safetensors.index.json';
export const SINGLE_FILE = 'model.safetensors';

export interface CheckpointTensor extends TensorInfo {
  /** The file holding the tensor. */
  readonly file: string;
}

export interface Checkpoint extends Disposable {
  readonly path: string;
  readonly files: readonly string[];
  /** The single file's __metadata__, or the index's metadata for a sharded checkpoint. */
  readonly metadata: Readonly<Record<string, unknown>> | undefined;
  readonly tensors: ReadonlyMap<string, CheckpointTensor>;
  /** Zero-copy view of a tensor's bytes. */
  bytes(name: string): Uint8Array;
  toFloat32(name: string): Float32Array;
  close(): void;
}

export const ShardIndex = t.intersection(
  [t.type({ weight_map: t.record(t.string, t.string) }), t.partial({ metadata: t.union([t.null, t.UnknownRecord]) })],
  'ShardIndex',
);
export type ShardIndex = t.TypeOf<typeof ShardIndex>;

class FilesCheckpoint implements Checkpoint {
  readonly tensors: ReadonlyMap<string, CheckpointTensor>;
  constructor(
    readonly path: string,
    private readonly opened: ReadonlyMap<string, SafetensorsFile>,
    tensorFiles: ReadonlyMap<string, string>,
    readonly metadata: Readonly<Record<string, unknown>> | undefined,
  ) {
    const tensors = new Map<string, CheckpointTensor>();
    for (const [name, file] of tensorFiles) {
      tensors.set(name, { ...(this.opened.get(file) as SafetensorsFile).info(name), file });
    }
    this.tensors = tensors;
  }
  get files(): readonly string[] {
    return [...this.opened.keys()];
  }
  private fileOf(name: string): SafetensorsFile {
    const info = this.tensors.get(name);
    // An unknown name goes to any file, whose NoSuchTensor error names it.
    return (info === undefined ? this.opened.values().next().value : this.opened.get(info.file)) as SafetensorsFile;
  }
  bytes(name: string): Uint8Array {
    return this.fileOf(name).bytes(name);
  }
  toFloat32(name: string): Float32Array {
    return this.fileOf(name).toFloat32(name);
  }
  close(): void {
    for (const file of this.opened.values()) file.close();
  }
  [Symbol.dispose](): void {
    this.close();
  }
}

const wrap = (path: string) => (issue: import('../safetensors/errors.js').SafetensorsIssue): CheckpointIssue => ({
  _tag: 'Safetensors',
  path,
  issue,
  detail: `${issue._tag}: ${issue.detail}${'tensor' in issue && issue.tensor !== undefined ? ` (tensor '${issue.tensor}')` : ''}`,
});

/**
 * Opens a safetensors file that `namer` (the index, the adapter folder, or the file itself) names: first
 * checked as a regular file whose real path lies inside `roots` (any place when undefined), then mapped,
 * and the mapped file checked to be the one that was checked (no swap between the two opens).
 */
const openSafetensorsConfined = async (file: string, namer: string, roots: readonly string[] | undefined, options: OpenOptions): Promise<E.Either<CheckpointIssue, SafetensorsFile>> => {
  const checked = openConfined(file, roots);
  if (E.isLeft(checked)) {
    // A file that cannot be opened at all (missing, no permission) is the reader's error, as it always was.
    if (checked.left.startsWith(OPEN_FAILED)) return E.left(wrap(file)(issue('FileError', file, checked.left.slice(OPEN_FAILED.length))));
    return E.left({ _tag: 'FileRefused', path: namer, file, detail: `'${file}' is refused: ${checked.left}` });
  }
  try {
    const result = await openSafetensorsTE(file, options)();
    if (E.isLeft(result)) return E.left(wrap(file)(result.left));
    const expected = fstatSync(checked.right.fd, { bigint: true });
    const identity = (result.right as unknown as { mapping?: { identity?: string } }).mapping?.identity;
    const now = identity !== undefined ? identity.split(':').slice(0, 2) : (() => {
      const s = statSync(file, { bigint: true });
      return [String(s.dev), String(s.ino)];
    })();
    if (now[0] !== String(expected.dev) || now[1] !== String(expected.ino)) {
      result.right.close();
      return E.left({ _tag: 'FileRefused', path: namer, file, detail: `'${file}' was replaced while it was opened` });
    }
    return result;
  } finally {
    closeSync(checked.right.fd);
  }
};

/**
 * A single safetensors file. `roots`: the real folders it must lie inside (an adapter's file inside the
 * adapter folder); absent for a file the user names directly. Either way a FIFO, device or other
 * non-regular file is refused before it is mapped.
 */
export const openSingleTE = (path: string, options: OpenOptions = {}, roots?: readonly string[], namer: string = path): TE.TaskEither<CheckpointIssue, Checkpoint> =>
  TE.map((file: SafetensorsFile) => {
    const files = new Map([[path, file]]);
    return new FilesCheckpoint(path, files, new Map(file.names().map((n) => [n, path])), file.metadata) as Checkpoint;
  })(() => openSafetensorsConfined(path, namer, roots, options));

/** A shard file named by an index must stay inside the index's directory (lexically; links are checked
 *  when the shard is opened). */
const shardPath = (indexPath: string, shard: string): string | undefined => {
  const relative = relativeInside(shard);
  return E.isLeft(relative) ? undefined : join(dirname(indexPath), relative.right);
};

export const openShardedTE =
  (indexPath: string, options: OpenOptions = {}): TE.TaskEither<CheckpointIssue, Checkpoint> =>
  async () => {
    let raw: unknown;
    const text = readConfinedText(indexPath, undefined);
    if (E.isLeft(text)) return E.left({ _tag: 'InvalidIndex', path: indexPath, detail: `cannot read the index: ${text.left}` });
    try {
      raw = JSON.parse(text.right);
    } catch (e) {
      return E.left({ _tag: 'InvalidIndex', path: indexPath, detail: `cannot read the index as JSON: ${(e as Error).message}` });
    }
    const decoded = ShardIndex.decode(raw);
    if (E.isLeft(decoded)) {
      return E.left({ _tag: 'InvalidIndex', path: indexPath, detail: PathReporter.report(decoded).slice(0, 3).join('; ') });
    }
    const weightMap = decoded.right.weight_map;
    const tensorFiles = new Map<string, string>();
    for (const [name, shard] of Object.entries(weightMap)) {
      const file = shardPath(indexPath, shard);
      if (file === undefined) {
        return E.left({ _tag: 'ShardOutsideDirectory', path: indexPath, shard, detail: `shard '${shard}' of tensor '${name}' is not a relative path inside the index's directory` });
      }
      tensorFiles.set(name, file);
    }
    const opened = new Map<string, SafetensorsFile>();
    const fail = (issue: CheckpointIssue) => {
      for (const f of opened.values()) f.close();
      return E.left(issue);
    };
    // Shards must really lie in the index's folder (or, for an index that is a link, as in a Hugging Face
    // cache snapshot, in the index's real folder): a shard linked elsewhere is refused.
    const roots = allowedRoots(dirname(indexPath), indexPath);
    for (const file of new Set(tensorFiles.values())) {
      const result = await openSafetensorsConfined(file, indexPath, roots, options);
      if (E.isLeft(result)) return fail(result.left);
      opened.set(file, result.right);
    }
    for (const [name, file] of tensorFiles) {
      if (!(opened.get(file) as SafetensorsFile).tensors.has(name)) {
        return fail({ _tag: 'MissingTensor', path: indexPath, tensor: name, shard: file, detail: `the weight_map puts it in '${file}', which has no such tensor` });
      }
    }
    for (const [file, st] of opened) {
      for (const name of st.names()) {
        if (tensorFiles.get(name) !== file) {
          return fail({
            _tag: 'UnlistedTensor',
            path: indexPath,
            tensor: name,
            shard: file,
            detail: tensorFiles.has(name) ? `also in '${file}', but the weight_map puts it in '${tensorFiles.get(name)}'` : `in '${file}' but not in the weight_map`,
          });
        }
      }
    }
    const metadata = decoded.right.metadata ?? undefined;
    return E.right(new FilesCheckpoint(indexPath, opened, tensorFiles, metadata));
  };

/** Opens a checkpoint: a .safetensors file, an index .json, or a directory holding either. */
export const openCheckpointTE =
  (path: string, options: OpenOptions = {}): TE.TaskEither<CheckpointIssue, Checkpoint> =>
  async () => {
    let isDirectory: boolean;
    try {
      isDirectory = (await stat(path)).isDirectory();
    } catch (e) {
      return E.left({ _tag: 'NotACheckpoint', path, detail: (e as Error).message });
    }
    if (!isDirectory) return (path.endsWith('.json') ? openShardedTE(path, options) : openSingleTE(path, options))();
    for (const [name, open] of [
      [INDEX_FILE, openShardedTE],
      [SINGLE_FILE, openSingleTE],
    ] as const) {
      const candidate = join(path, name);
      const exists = await stat(candidate).then(
        (s) => s.isFile(),
        () => false,
      );
      if (exists) return open(candidate, options)();
    }
    return E.left({ _tag: 'NotACheckpoint', path, detail: `the directory holds neither ${INDEX_FILE} nor ${SINGLE_FILE}` });
  };

export const openCheckpoint = async (path: string, options: OpenOptions = {}): Promise<Checkpoint> => {
  const result = await openCheckpointTE(path, options)();
  if (E.isLeft(result)) throw new CheckpointError(result.left);
  return result.right;
};
