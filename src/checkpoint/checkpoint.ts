/**
 * A checkpoint: one named set of tensors, from a single safetensors file or from a sharded checkpoint
 * (`model.safetensors.index.json`, whose weight_map names the shard file of every tensor). Tensors are
 * views into the mapped files, as in SafetensorsFile.
 */
import { readFile, stat } from 'node:fs/promises';
import { dirname, isAbsolute, join, normalize, sep } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import * as TE from 'fp-ts/lib/TaskEither.js';
import { PathReporter } from 'io-ts/lib/PathReporter.js';
import * as t from 'io-ts';
import type { TensorInfo } from '../safetensors/header.js';
import { openSafetensorsTE, type OpenOptions, type SafetensorsFile } from '../safetensors/reader.js';
import { CheckpointError, type CheckpointIssue } from './errors.js';

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

export const openSingleTE = (path: string, options: OpenOptions = {}): TE.TaskEither<CheckpointIssue, Checkpoint> =>
  TE.bimap(wrap(path), (file: SafetensorsFile) => {
    const files = new Map([[path, file]]);
    return new FilesCheckpoint(path, files, new Map(file.names().map((n) => [n, path])), file.metadata);
  })(openSafetensorsTE(path, options));

/** A shard file named by an index must stay inside the index's directory. */
const shardPath = (indexPath: string, shard: string): string | undefined => {
  if (shard === '' || isAbsolute(shard)) return undefined;
  const normalized = normalize(shard);
  if (normalized === '..' || normalized.startsWith(`..${sep}`)) return undefined;
  return join(dirname(indexPath), normalized);
};

export const openShardedTE =
  (indexPath: string, options: OpenOptions = {}): TE.TaskEither<CheckpointIssue, Checkpoint> =>
  async () => {
    let raw: unknown;
    try {
      raw = JSON.parse(await readFile(indexPath, 'utf8'));
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
    for (const file of new Set(tensorFiles.values())) {
      const result = await openSafetensorsTE(file, options)();
      if (E.isLeft(result)) return fail(wrap(file)(result.left));
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
