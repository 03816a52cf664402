/**
 * The plan stage's public entry points. `planRefit` is the pure core (plan.ts); `planCheckpoint` opens a
 * checkpoint and any LoRA adapters, merges them and plans (a dry run: it changes nothing).
 */
import * as E from 'fp-ts/lib/Either.js';
import * as TE from 'fp-ts/lib/TaskEither.js';
import { openCheckpointTE } from '../checkpoint/checkpoint.js';
import { describeCheckpointIssue } from '../checkpoint/errors.js';
import { mergeAdapters, describeLoraError } from '../lora/lora.js';
import { openLoraTE, type OpenedAdapter } from '../lora/open.js';
import type { WeightMap } from '../weightmap/map.js';
import { planRefit, type PlanOptions, type RefitPlan } from './plan.js';

export * from './plan.js';

export type PlanFailure =
  | { readonly _tag: 'CheckpointFailed'; readonly path: string; readonly detail: string }
  | { readonly _tag: 'AdapterFailed'; readonly path: string; readonly detail: string };

export class PlanFailureError extends Error {
  override readonly name = 'PlanFailureError';
  readonly _tag: PlanFailure['_tag'];
  constructor(readonly detail: PlanFailure) {
    super(`${detail.path}: ${detail.detail}`);
    this._tag = detail._tag;
  }
}

export interface PlanFilesOptions extends PlanOptions {
  readonly lora?: readonly { readonly path: string; readonly weight: number }[];
}

export const planCheckpointTE =
  (map: WeightMap, checkpointPath: string, options: PlanFilesOptions = {}): TE.TaskEither<PlanFailure, RefitPlan> =>
  async () => {
    const checkpoint = await openCheckpointTE(checkpointPath)();
    if (E.isLeft(checkpoint)) return E.left({ _tag: 'CheckpointFailed', path: checkpointPath, detail: describeCheckpointIssue(checkpoint.left) });
    const adapters: OpenedAdapter[] = [];
    try {
      for (const l of options.lora ?? []) {
        const a = await openLoraTE(l.path)();
        if (E.isLeft(a)) return E.left({ _tag: 'AdapterFailed', path: l.path, detail: describeLoraError(a.left) });
        adapters.push(a.right);
      }
      const merged = mergeAdapters(checkpoint.right, adapters.map((adapter, i) => ({ adapter, weight: options.lora![i].weight })));
      if (E.isLeft(merged)) return E.left({ _tag: 'AdapterFailed', path: (options.lora ?? [])[0]?.path ?? '', detail: describeLoraError(merged.left) });
      return E.right(planRefit(map, merged.right, options));
    } finally {
      for (const a of adapters) a.close();
      checkpoint.right.close();
    }
  };

/** Plans a refit from files; rejects with PlanFailureError when a file cannot be read. Problems in the
 *  checkpoint are in the plan (`problems`); `checkPlan` turns errors among them into a Left. */
export const planCheckpoint = async (map: WeightMap, checkpointPath: string, options: PlanFilesOptions = {}): Promise<RefitPlan> => {
  const r = await planCheckpointTE(map, checkpointPath, options)();
  if (E.isLeft(r)) throw new PlanFailureError(r.left);
  return r.right;
};
