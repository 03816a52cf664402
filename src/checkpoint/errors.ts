/** The checkpoint stage's one error union: a checkpoint is a named set of tensors over one or more files. */
import type { SafetensorsIssue } from '../safetensors/errors.js';

export type CheckpointIssue =
  | { readonly _tag: 'NotACheckpoint'; readonly path: string; readonly detail: string }
  | { readonly _tag: 'InvalidIndex'; readonly path: string; readonly detail: string }
  | { readonly _tag: 'ShardOutsideDirectory'; readonly path: string; readonly shard: string; readonly detail: string }
  | { readonly _tag: 'MissingTensor'; readonly path: string; readonly tensor: string; readonly shard: string; readonly detail: string }
  | { readonly _tag: 'UnlistedTensor'; readonly path: string; readonly tensor: string; readonly shard: string; readonly detail: string }
  | { readonly _tag: 'InvalidAdapterConfig'; readonly path: string; readonly detail: string }
  /** A PEFT setting that changes what the adapter does beyond a plain LoRA merge (use_dora,
   *  layers_to_transform, modules_to_save, bias, target_modules matching nothing): refused, never ignored. */
  | { readonly _tag: 'UnsupportedAdapterSetting'; readonly path: string; readonly setting: string; readonly detail: string }
  | { readonly _tag: 'InvalidAdapterTensors'; readonly path: string; readonly tensor?: string; readonly detail: string }
  /** A file opened on behalf of the input at `path` (a shard, an adapter file) was refused: not a regular
   *  file, or its real path leaves the folder of the file that names it. */
  | { readonly _tag: 'FileRefused'; readonly path: string; readonly file: string; readonly detail: string }
  | { readonly _tag: 'Safetensors'; readonly path: string; readonly issue: SafetensorsIssue; readonly detail: string };

export type CheckpointTag = CheckpointIssue['_tag'];

export const describeCheckpointIssue = (issue: CheckpointIssue): string =>
  `${issue.path}${'tensor' in issue && issue.tensor !== undefined ? `: tensor '${issue.tensor}'` : ''}: ${issue._tag}: ${issue.detail}`;

export class CheckpointError extends Error {
  override readonly name = 'CheckpointError';
  readonly _tag: CheckpointTag;
  constructor(readonly issue: CheckpointIssue) {
    super(describeCheckpointIssue(issue));
    this._tag = issue._tag;
  }
}
