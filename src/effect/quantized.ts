/**
 * A quantized checkpoint in the effect: which engine kernel each target refits (from the engines
 * themselves), and the copies decided before anything changes.
 */
import * as E from 'fp-ts/lib/Either.js';
import type { Engine, QuantizedWeights, WeightKernelFormat } from '../../ffi/engine.js';
import type { MapTarget } from '../weightmap/map.js';
import type { RefitModel } from '../model/model.js';
import type { QuantizedEntry, TensorSource } from '../quant/checkpoint.js';
import { describeQuantIssue, QuantError, type QuantIssue } from '../quant/errors.js';
import { mappedPathOf, stagedQuantized } from '../quant/mapped.js';
import { foldedLayers } from '../quant/reload.js';
import { companionsOf } from '../quant/store.js';

export type KernelInfo = (target: MapTarget) => { readonly kernel: WeightKernelFormat | undefined; readonly folded: boolean };

/** Kernel formats and folded batch norms of the model's engines, per target (fallback targets: none). */
export const kernelInfoOf = (model: RefitModel): KernelInfo => {
  const bySegment = new Map<number, { formats: Map<string, WeightKernelFormat>; folded: Set<string> }>();
  const of = (segment: number) => {
    let known = bySegment.get(segment);
    if (known === undefined) {
      const stage = model.stage(segment);
      if (stage === undefined || stage.kind !== 'engine') return undefined;
      const engine = stage.engine as Engine;
      known = {
        formats: new Map(engine.kernelFormats().map((k) => [`${k.layer}\u0000${k.role}`, k])),
        folded: foldedLayers(engine.describe(), engine.weights()),
      };
      bySegment.set(segment, known);
    }
    return known;
  };
  return (target) => {
    if (target.kind !== 'engine' || target.layer === undefined) return { kernel: undefined, folded: false };
    const known = of(target.segment);
    return { kernel: known?.formats.get(`${target.layer}\u0000${target.role}`), folded: known?.folded.has(target.layer) ?? false };
  };
};

/** A copy target's staged values (views of the checkpoint where they can be), or the issue naming the
 *  tensor: decided for every copy target before any engine changes. */
export const decideCopy = (
  target: MapTarget,
  quantized: ReadonlyMap<string, QuantizedEntry>,
  recorded: ReadonlyMap<string, readonly number[]>,
  kernels: KernelInfo,
  source: TensorSource,
): E.Either<QuantIssue, { readonly weights: QuantizedWeights; readonly reads: readonly string[] } | undefined> => {
  const k = kernels(target);
  const path = mappedPathOf(target, quantized, (n) => recorded.get(n), k.kernel, k.folded);
  if (E.isLeft(path)) return path;
  if (path.right.path !== 'copy') return E.right(undefined);
  try {
    return E.right({ weights: stagedQuantized(source, path.right, target.layer!), reads: companionsOf(path.right.entry) });
  } catch (e) {
    if (e instanceof QuantError) return E.left(e.issue);
    return E.left({ _tag: 'RefitFailed', tensor: path.right.tensor, detail: e instanceof Error ? e.message : String(e) });
  }
};

export { describeQuantIssue };
