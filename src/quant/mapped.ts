/**
 * Quantized checkpoint tensors met through the weight map (for the refit plan and effect; not wired there
 * yet): which path each engine target takes, and what each path stages.
 *
 *   copy        the target's expression is the quantized tensor itself (source, or a reshape of it; or a
 *               transpose of it when the checkpoint already holds it in the engine's [out, in] layout),
 *               the engine holds that kernel in the same format (and group size), nothing is folded into
 *               it: values and scales are staged as they are (setQuantizedWeights), never re-quantized.
 *   dequantize  anything else reading a quantized tensor (a float engine weight, a batch norm folded into
 *               the kernel, real arithmetic): the tensor is dequantized, w = (q - zero_point) * scale,
 *               into the weight map's source layout, and the normal float path evaluates the expression.
 *   float       the expression reads no quantized tensor.
 * Pure, but for reading tensor bytes through TensorSource in the staging helpers.
 */
import * as E from 'fp-ts/lib/Either.js';
import type { QuantizedWeights, WeightKernelFormat } from '../../ffi/engine.js';
import type { Expr } from '../weightmap/expr.js';
import type { MapTarget } from '../weightmap/map.js';
import type { F32Tensor } from '../weightmap/evaluate.js';
import type { QuantizedEntry, TensorSource } from './checkpoint.js';
import type { QuantIssue } from './errors.js';
import { dequantizeEntry, int4GroupSize, quantizedOf } from './reload.js';
import { groupsOf, type Geometry, type QuantFormat } from './reference.js';

export type MappedPath =
  | { readonly path: 'float' }
  | { readonly path: 'copy'; readonly tensor: string; readonly entry: QuantizedEntry; readonly format: QuantFormat; readonly geometry: Geometry }
  | { readonly path: 'dequantize'; readonly tensors: readonly string[] };

const product = (s: readonly number[]) => s.reduce((a, b) => a * b, 1);
const shapeText = (s: readonly number[]) => `[${s.join(', ')}]`;
const kindText = (f: QuantFormat) => (f.kind === 'int4' ? `int4 (groups of ${f.groupSize})` : f.kind);

const sourcesOf = (e: Expr): string[] => {
  switch (e.op) {
    case 'source': return [e.name];
    case 'constant': return [];
    case 'concat': return e.xs.flatMap(sourcesOf);
    case 'bnFoldWeight': return [e.weight, e.gamma, e.variance].flatMap(sourcesOf);
    default: return Object.values(e).flatMap((v) => (typeof v === 'object' && v !== null && 'op' in v ? sourcesOf(v as Expr) : []));
  }
};

/** The quantized tensor a target copies, when its expression only relabels one: source, reshape(source),
 *  or a 2-D transpose of a source the checkpoint holds transposed already. */
const copiedSource = (e: Expr): { name: string; transposed: boolean } | undefined => {
  if (e.op === 'reshape') return copiedSource(e.x);
  if (e.op === 'source') return { name: e.name, transposed: false };
  if (e.op === 'transpose' && e.perm.length === 2 && e.perm[0] === 1 && e.x.op === 'source') return { name: e.x.name, transposed: true };
  return undefined;
};

/** Which path a target takes. `quantized`: the checkpoint's quantized entries by weight name; `sourceShape`:
 *  the shape the weight map recorded for a source; `kernel`: the engine weight's kernel format; `folded`: a
 *  batch norm is folded into it inside the engine. A mismatch is a QuantIssue naming the tensor. */
export const mappedPathOf = (
  target: MapTarget,
  quantized: ReadonlyMap<string, QuantizedEntry>,
  sourceShape: (name: string) => readonly number[] | undefined,
  kernel: WeightKernelFormat | undefined,
  folded: boolean,
): E.Either<QuantIssue, MappedPath> => {
  if (target.status !== 'mapped') return E.right({ path: 'float' });
  const reads = [...new Set(sourcesOf(target.expr))].filter((n) => quantized.has(n));
  if (reads.length === 0) return E.right({ path: 'float' });
  const dequantize = E.right<QuantIssue, MappedPath>({ path: 'dequantize', tensors: reads });
  const copied = copiedSource(target.expr);
  if (target.kind !== 'engine' || target.role !== 'kernel' || kernel === undefined || kernel.format === 'asPrecision' || folded || copied === undefined) return dequantize;
  const entry = quantized.get(copied.name)!;
  const channels = target.shape[0];
  const depth = product(target.shape.slice(1));
  const format: QuantFormat = kernel.format === 'int4' ? { kind: 'int4', groupSize: kernel.groupSize } : { kind: kernel.format };
  if (entry.kind !== kernel.format) return E.left({ _tag: 'FormatMismatch', tensor: entry.weight, layer: target.layer!, engine: kindText(format), checkpoint: entry.kind });
  const rows = entry.valuesShape[0];
  const valuesCount = entry.kind === 'int4' ? channels * Math.ceil(depth / 2) : channels * depth;
  if (rows !== channels || product(entry.valuesShape) !== valuesCount) {
    // A transpose whose checkpoint tensor is in the source's own layout is quantized along the wrong axis
    // for this engine: it can only come in dequantized.
    const recorded = sourceShape(copied.name);
    if (copied.transposed && entry.kind !== 'int4' && recorded !== undefined && shapeText(recorded) === shapeText(entry.valuesShape)) return dequantize;
    const expected = entry.kind === 'int4' ? `[${channels}, ${Math.ceil(depth / 2)}] (int4, two per byte along K)` : `[${channels}, ${depth}]`;
    return E.left({ _tag: 'ShapeMismatch', tensor: entry.weight, expected, found: shapeText(entry.valuesShape) });
  }
  const scaleCount = product(entry.scaleShape);
  const groups = groupsOf(format, depth);
  if (scaleCount !== 1 && scaleCount !== channels * groups) {
    const expected = format.kind === 'int4' ? `[${channels}, ${groups}] (groups of ${format.groupSize} along K = ${depth})` : `[${channels}] or [${channels}, 1]`;
    return E.left({ _tag: format.kind === 'int4' ? 'GroupSizeMismatch' : 'ShapeMismatch', tensor: entry.scale, expected, found: shapeText(entry.scaleShape) });
  }
  return E.right({ path: 'copy', tensor: entry.weight, entry, format, geometry: { channels, depth, transposed: true } });
};

/** What a copy target stages: the checkpoint's values and scales (views where they can be). */
export const stagedQuantized = (source: TensorSource, p: Extract<MappedPath, { path: 'copy' }>, layer: string): QuantizedWeights =>
  quantizedOf(source, { layer, entry: p.entry, format: p.format, geometry: p.geometry });

/** A quantized checkpoint tensor dequantized into the layout the weight map recorded for it (`shape`):
 *  as stored, or transposed back when the checkpoint holds a 2-D source transposed. Left names the tensor. */
export const dequantizedSource = (source: TensorSource, entry: QuantizedEntry, shape: readonly number[], int4Hint?: number): E.Either<QuantIssue, F32Tensor> => {
  const channels = entry.valuesShape[0];
  const depth = entry.kind === 'int4' ? product(shape) / channels : product(entry.valuesShape.slice(1));
  const scaleCount = product(entry.scaleShape);
  let format: QuantFormat = { kind: entry.kind };
  if (entry.kind === 'int4') {
    const groupSize = int4GroupSize(depth, scaleCount === 1 ? 1 : scaleCount / channels, int4Hint);
    if (groupSize === undefined || !Number.isInteger(depth)) return E.left({ _tag: 'GroupSizeMismatch', tensor: entry.scale, expected: `a group size that splits K = ${depth} into ${scaleCount / channels} groups`, found: shapeText(entry.scaleShape) });
    format = { kind: 'int4', groupSize };
  }
  const stored = channels * depth === product(shape) && shape[0] === channels ? 'same' : shape.length === 2 && shape[1] === channels && shape[0] === depth ? 'transposed' : undefined;
  if (stored === undefined) return E.left({ _tag: 'ShapeMismatch', tensor: entry.weight, expected: `${shapeText(shape)} (or its transpose) as the weight map recorded it`, found: shapeText(entry.valuesShape) });
  const values = dequantizeEntry(source, entry, format, { channels, depth, transposed: true }, new Float32Array(channels * depth));
  if (stored === 'same') return E.right({ shape: [...shape], data: values });
  const out = new Float32Array(values.length);
  for (let j = 0; j < channels; j++) for (let k = 0; k < depth; k++) out[k * channels + j] = values[j * depth + k];
  return E.right({ shape: [...shape], data: out });
};
