/**
 * Opening LoRA adapters from disk (the edge; lora.ts is pure): a PEFT adapter directory
 * (adapter_config.json + adapter_model.safetensors) or a Kohya / diffusers .safetensors file.
 */
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import * as TE from 'fp-ts/lib/TaskEither.js';
import { ADAPTER_CONFIG, ADAPTER_WEIGHTS, decodeAdapterConfig } from '../checkpoint/adapter.js';
import { openSingleTE, type Checkpoint } from '../checkpoint/checkpoint.js';
import { describeCheckpointIssue } from '../checkpoint/errors.js';
import { allowedRoots, readConfinedText } from '../checkpoint/confine.js';
import { kohyaModules, LoraError, peftModules, type LoraAdapter, type LoraErrorDetail } from './lora.js';

export interface OpenedAdapter extends LoraAdapter, Disposable {
  readonly path: string;
  close(): void;
}

const opened = (path: string, format: 'peft' | 'kohya', checkpoint: Checkpoint, modules: LoraAdapter['modules'], targetModules?: LoraAdapter['targetModules']): OpenedAdapter => ({
  path, format, modules, tensors: checkpoint,
  ...(targetModules !== undefined ? { targetModules } : {}),
  close: () => checkpoint.close(),
  [Symbol.dispose]: () => checkpoint.close(),
});

export const openLoraTE =
  (path: string): TE.TaskEither<LoraErrorDetail, OpenedAdapter> =>
  async () => {
    let directory: boolean;
    try {
      directory = (await stat(path)).isDirectory();
    } catch (e) {
      return E.left({ _tag: 'InvalidAdapter', detail: `cannot open '${path}': ${(e as Error).message}` });
    }
    const file = directory ? join(path, ADAPTER_WEIGHTS) : path;
    // An adapter folder's files must really lie in it (a link to a file elsewhere is refused); a file the
    // user names directly may lie anywhere, but must be a regular file.
    const roots = directory ? allowedRoots(path) : undefined;
    let config: ReturnType<typeof decodeAdapterConfig> | undefined;
    if (directory) {
      const configPath = join(path, ADAPTER_CONFIG);
      const text = readConfinedText(configPath, roots);
      if (E.isLeft(text)) return E.left({ _tag: 'InvalidAdapter', detail: `${configPath}: the file is refused: ${text.left}` });
      try {
        config = decodeAdapterConfig(JSON.parse(text.right), configPath);
      } catch (e) {
        return E.left({ _tag: 'InvalidAdapter', detail: `${configPath}: ${(e as Error).message}` });
      }
      if (E.isLeft(config)) {
        const issue = config.left;
        return E.left(issue._tag === 'UnsupportedAdapterSetting' ? { _tag: 'UnsupportedAdapterSetting', setting: issue.setting, detail: `${issue.detail} (${issue.path})` } : { _tag: 'InvalidAdapter', detail: describeCheckpointIssue(issue) });
      }
    }
    const checkpoint = await openSingleTE(file, {}, roots, path)();
    if (E.isLeft(checkpoint)) return E.left({ _tag: 'InvalidAdapter', detail: describeCheckpointIssue(checkpoint.left) });
    const modules = config !== undefined && E.isRight(config) ? peftModules(config.right, checkpoint.right) : kohyaModules(checkpoint.right);
    if (E.isLeft(modules)) {
      checkpoint.right.close();
      return modules;
    }
    const targets = config !== undefined && E.isRight(config) ? config.right.targetModules : undefined;
    return E.right(opened(path, config !== undefined ? 'peft' : 'kohya', checkpoint.right, modules.right, targets));
  };

/** Opens a PEFT adapter directory or a Kohya .safetensors file; rejects with LoraError. */
export const openLora = async (path: string): Promise<OpenedAdapter> => {
  const r = await openLoraTE(path)();
  if (E.isLeft(r)) throw new LoraError(r.left);
  return r.right;
};

/** `DIR[:SCALE]` as the CLI takes it (the scale defaults to 1). */
export const parseLoraArgument = (arg: string): { path: string; weight: number } => {
  const m = /^(.*):(-?\d+(?:\.\d+)?(?:e-?\d+)?)$/.exec(arg);
  return m ? { path: m[1], weight: Number(m[2]) } : { path: arg, weight: 1 };
};
