/**
 * Reloading a checkpoint (full precision or quantized) into an engine, layer by layer.
 *
 * planReload (pure) pairs every checkpoint tensor with the engine weight it sets and decides how:
 *   copy        a quantized tensor into a kernel the engine holds in that format: values and scales are
 *               handed over as views of the checkpoint (no copy) and packed without re-quantizing;
 *   dequantize  a quantized tensor into a float kernel: w = q * scale (q - zero_point, for asymmetric ones);
 *   float       a float tensor, as is (a quantized engine quantizes it itself).
 * reloadCheckpoint runs the plan one layer at a time: every layer is first staged and validated (nothing
 * changes), then staged again and applied, layer by layer. Host memory beyond the engine and the mapped
 * checkpoint is one reusable float32 buffer for the largest layer that needs converting (dequantized or
 * non-float32 values), so a reload never holds a second copy of the model. A stripped engine needs every
 * weight at once: it is filled in one apply (all or nothing), with a buffer for everything converted.
 */
import * as E from 'fp-ts/lib/Either.js';
import * as TE from 'fp-ts/lib/TaskEither.js';
import type { Engine, EngineWeight, KernelFormat, QuantizedWeights, Refitter, WeightKernelFormat } from '../../ffi/engine.js';
import { DType, native, NativeError } from '../../ffi/library.js';
import type { WeightRole } from '../network/types.js';
import { findQuantized, type QuantizedEntry, type TensorSource } from './checkpoint.js';
import { QuantError, type QuantIssue } from './errors.js';
import { e4m3ToFloat, groupsOf, type Geometry, type QuantFormat } from './reference.js';

interface TargetBase {
  readonly layer: string;
  readonly role: WeightRole;
  readonly tensor: string;
}
export type ReloadTarget =
  | (TargetBase & { readonly mode: 'copy'; readonly entry: QuantizedEntry; readonly format: QuantFormat; readonly geometry: Geometry })
  | (TargetBase & { readonly mode: 'dequantize'; readonly entry: QuantizedEntry; readonly format: QuantFormat; readonly geometry: Geometry })
  | (TargetBase & { readonly mode: 'float'; readonly dtype: string; readonly count: number });

export interface ReloadPlan {
  /** Targets grouped by engine layer, in the engine's weight order. */
  readonly layers: ReadonlyArray<{ readonly layer: string; readonly targets: readonly ReloadTarget[] }>;
  /** Engine weights the checkpoint does not set (left as they are). */
  readonly untouched: ReadonlyArray<{ readonly layer: string; readonly role: WeightRole }>;
}

export interface ReloadOptions {
  /** The engine layer of a checkpoint module (`<m>` of `<m>.weight`); default: the same name. */
  readonly layerOf?: (module: string) => string;
  /** The group size of int4 checkpoints being dequantized, where it cannot be told from the shapes. */
  readonly int4GroupSize?: number;
}

/** Layers whose quantized kernels the engine computes from other weights too (a convolution with a batch
 *  norm folded into it): a quantized checkpoint reaches them dequantized, and the engine quantizes after
 *  the fold. From the engine's describe() and weight list. */
export const foldedLayers = (described: unknown, weights: readonly EngineWeight[]): Set<string> => {
  const batchNorms = new Set(weights.filter((w) => w.role === 'mean').map((w) => w.layer));
  const steps = (described as { steps?: Array<{ kind: string; layers: string[] }> }).steps ?? [];
  return new Set(steps.filter((s) => s.kind === 'conv' && s.layers.some((l) => batchNorms.has(l))).map((s) => s.layers[0]));
};

/** Engine roles a state-dict parameter name may stand for, in order of preference (torch naming:
 *  Linear/Conv weight and bias, norm weight and bias, BatchNorm running statistics). */
const rolesOfParam: Record<string, readonly WeightRole[] | undefined> = {
  weight: ['kernel', 'scale'],
  bias: ['bias', 'shift'],
  running_mean: ['mean'],
  running_var: ['variance'],
};
const shapeText = (s: readonly number[]) => `[${s.join(', ')}]`;
const product = (s: readonly number[]) => s.reduce((a, b) => a * b, 1);
const kindText = (f: QuantFormat) => (f.kind === 'int4' ? `int4 (groups of ${f.groupSize})` : f.kind);

/** The kernel as a checkpoint holds it: channels (out features) by K, in torch layout. */
const kernelGeometry = (w: EngineWeight): Geometry => ({ channels: w.shape[0], depth: product(w.shape.slice(1)), transposed: true });

/** The int4 group size of a checkpoint with `groups` scales per row of `depth` values. */
export const int4GroupSize = (depth: number, groups: number, hint: number | undefined): number | undefined => {
  if (groups === 1) return Math.max(depth, 1); // one group over the whole row, whatever it was called
  for (const g of [hint, 32, 64, 128, 16, 256]) if (g !== undefined && Math.ceil(depth / g) === groups) return g;
  return undefined;
};

const checkQuantized = (entry: QuantizedEntry, w: EngineWeight, f: WeightKernelFormat, folded: boolean, options: ReloadOptions): E.Either<QuantIssue, ReloadTarget> => {
  const g = kernelGeometry(w);
  const valuesCount = entry.kind === 'int4' ? g.channels * Math.ceil(g.depth / 2) : g.channels * g.depth;
  if (w.role !== 'kernel' || w.shape.length < 2) {
    return E.left({ _tag: 'FormatMismatch', tensor: entry.weight, layer: w.layer, engine: `a ${w.role} of shape ${shapeText(w.shape)}`, checkpoint: `quantized ${entry.kind} values` });
  }
  if (entry.valuesShape[0] !== g.channels || product(entry.valuesShape) !== valuesCount) {
    const expected = entry.kind === 'int4' ? `[${g.channels}, ${Math.ceil(g.depth / 2)}] (int4, two per byte along K)` : `[${g.channels}, ${g.depth}] or ${shapeText(w.shape)}`;
    return E.left({ _tag: 'ShapeMismatch', tensor: entry.weight, expected, found: shapeText(entry.valuesShape) });
  }
  const scaleCount = product(entry.scaleShape);
  const base = { layer: w.layer, role: w.role, tensor: entry.weight, entry, geometry: g } as const;
  if (f.format === 'asPrecision' || folded) {
    if (w.dtype !== 'float32') return E.left({ _tag: 'FormatMismatch', tensor: entry.weight, layer: w.layer, engine: `${w.dtype} weights`, checkpoint: `${entry.kind} (dequantized to float32)` });
    if (entry.kind !== 'int4') return E.right({ ...base, mode: 'dequantize', format: { kind: entry.kind } });
    const groups = scaleCount === 1 ? 1 : scaleCount / g.channels;
    const groupSize = int4GroupSize(g.depth, groups, options.int4GroupSize);
    if (groupSize === undefined) return E.left({ _tag: 'GroupSizeMismatch', tensor: entry.scale, expected: `a group size that splits K = ${g.depth} into ${groups} groups`, found: shapeText(entry.scaleShape) });
    return E.right({ ...base, mode: 'dequantize', format: { kind: 'int4', groupSize } });
  }
  const format: QuantFormat = f.format === 'int4' ? { kind: 'int4', groupSize: f.groupSize } : { kind: f.format };
  if (f.format !== entry.kind) return E.left({ _tag: 'FormatMismatch', tensor: entry.weight, layer: w.layer, engine: kindText(format), checkpoint: entry.kind });
  const groups = groupsOf(format, g.depth);
  if (scaleCount !== 1 && scaleCount !== g.channels * groups) {
    const expected = format.kind === 'int4' ? `[${g.channels}, ${groups}] (groups of ${f.groupSize} along K = ${g.depth})` : `[${g.channels}] or [${g.channels}, 1]`;
    return E.left({ _tag: format.kind === 'int4' ? 'GroupSizeMismatch' : 'ShapeMismatch', tensor: entry.scale, expected, found: shapeText(entry.scaleShape) });
  }
  return E.right({ ...base, mode: 'copy', format });
};

/** Pairs checkpoint tensors with engine weights. Pure: reads only names, dtypes and shapes. */
export const planReload = (
  source: TensorSource,
  weights: readonly EngineWeight[],
  formats: readonly WeightKernelFormat[],
  options: ReloadOptions = {},
  folded: ReadonlySet<string> = new Set(),
): E.Either<QuantIssue, ReloadPlan> => {
  const found = findQuantized(source);
  if (E.isLeft(found)) return found;
  const layerOf = options.layerOf ?? ((m: string) => m);
  const byKey = new Map(weights.map((w, i) => [`${w.layer}\u0000${w.role}`, i]));
  const quantizedNames = new Set(found.right.flatMap((e) => [e.weight, e.scale, ...(e.zeroPoint === undefined ? [] : [e.zeroPoint])]));
  const targets = new Map<number, ReloadTarget>();
  for (const entry of found.right) {
    const i = byKey.get(`${layerOf(entry.module)}\u0000kernel`);
    if (i === undefined) continue; // a checkpoint may hold more than one engine uses
    const target = checkQuantized(entry, weights[i], formats[i], folded.has(weights[i].layer), options);
    if (E.isLeft(target)) return target;
    targets.set(i, target.right);
  }
  for (const name of source.names()) {
    if (quantizedNames.has(name)) continue;
    const dot = name.lastIndexOf('.');
    const roles = dot < 0 ? undefined : rolesOfParam[name.slice(dot + 1)];
    const layer = layerOf(name.slice(0, dot));
    const i = roles?.map((role) => byKey.get(`${layer}\u0000${role}`)).find((x) => x !== undefined);
    if (i === undefined) continue;
    const w = weights[i];
    const info = source.info(name);
    const count = product(info.shape);
    if (count !== product(w.shape)) return E.left({ _tag: 'ShapeMismatch', tensor: name, expected: `${shapeText(w.shape)} (layer '${w.layer}' ${w.role})`, found: shapeText(info.shape) });
    const convertible = w.dtype === 'float32' && ['F32', 'F16', 'BF16', 'F64'].includes(info.dtype);
    if (!convertible) return E.left({ _tag: 'BadQuantizedTensor', tensor: name, expected: `float values for ${w.dtype} weight '${w.layer}' ${w.role}`, found: info.dtype });
    targets.set(i, { layer: w.layer, role: w.role, tensor: name, mode: 'float', dtype: info.dtype, count });
  }
  const layers: Array<{ layer: string; targets: ReloadTarget[] }> = [];
  const untouched: Array<{ layer: string; role: WeightRole }> = [];
  weights.forEach((w, i) => {
    const target = targets.get(i);
    if (target === undefined) return untouched.push({ layer: w.layer, role: w.role });
    const last = layers[layers.length - 1];
    if (last !== undefined && last.layer === w.layer) last.targets.push(target);
    else layers.push({ layer: w.layer, targets: [target] });
  });
  return E.right({ layers, untouched });
};

// ---- effects ----------------------------------------------------------------------------------------

/** Float32 elements a target needs in the conversion buffer (0 when it is handed over as a view). */
const bufferNeed = (source: TensorSource, t: ReloadTarget): number => {
  if (t.mode === 'dequantize') return t.geometry.channels * t.geometry.depth;
  if (t.mode === 'float') return t.dtype === 'F32' && source.bytes(t.tensor).byteOffset % 4 === 0 ? 0 : t.count;
  return 0;
};

const floatView = (bytes: Uint8Array): Float32Array | undefined =>
  bytes.byteOffset % 4 === 0 ? new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4) : undefined;

const nativeDtype: Record<string, number | undefined> = { F32: DType.float32, F16: DType.float16, BF16: DType.bfloat16, F64: DType.float64 };

/** A float tensor as float32: a view where it is float32 and aligned, else converted into `out`. */
const toFloat32Into = (source: TensorSource, name: string, dtype: string, out: Float32Array): Float32Array => {
  const bytes = source.bytes(name);
  if (dtype === 'F32') {
    const view = floatView(bytes);
    if (view !== undefined) return view;
  }
  const status = native('trtshim_convert_to_f32')(nativeDtype[dtype], bytes, out, out.length) as number;
  if (status !== 0) throw new QuantError({ _tag: 'RefitFailed', tensor: name, detail: `cannot convert ${dtype} to float32` });
  return out;
};

/** Scales as float32, one per (channel, group): a per-tensor scale repeated. */
const scalesOf = (source: TensorSource, t: { entry: QuantizedEntry; format: QuantFormat; geometry: Geometry }): Float32Array => {
  const count = product(t.entry.scaleShape);
  const raw = toFloat32Into(source, t.entry.scale, t.entry.scaleDtype, new Float32Array(count));
  const want = t.geometry.channels * groupsOf(t.format, t.geometry.depth);
  return count === 1 && want !== 1 ? new Float32Array(want).fill(raw[0]) : raw;
};

const zeroPointsOf = (source: TensorSource, entry: QuantizedEntry, want: number): Int32Array | undefined => {
  if (entry.zeroPoint === undefined) return undefined;
  const bytes = source.bytes(entry.zeroPoint);
  const values = entry.zeroPointDtype === 'I8' ? Int32Array.from(new Int8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength)) : new Int32Array(bytes.slice().buffer);
  return values.length === 1 && want !== 1 ? new Int32Array(want).fill(values[0]) : values;
};

/** w = (q - zero) * scale of a quantized entry ([channels, depth], torch layout) into `out`, reading int4
 *  nibbles straight from the packed bytes. */
export const dequantizeEntry = (source: TensorSource, entry: QuantizedEntry, format: QuantFormat, geometry: Geometry, out: Float32Array): Float32Array => {
  const { channels, depth } = geometry;
  const bytes = source.bytes(entry.weight);
  const scales = scalesOf(source, { entry, format, geometry });
  const zeros = zeroPointsOf(source, entry, scales.length);
  const groups = scales.length / channels;
  const rows = Math.ceil(depth / groups);
  const half = Math.ceil(depth / 2);
  const f32 = Math.fround;
  for (let j = 0; j < channels; j++)
    for (let k = 0; k < depth; k++) {
      let v: number;
      if (format.kind === 'int4') v = ((bytes[j * half + (k >> 1)] >> (4 * (k & 1))) & 15) - 8;
      else if (format.kind === 'int8') v = (bytes[j * depth + k] << 24) >> 24;
      else v = e4m3ToFloat(bytes[j * depth + k]);
      const s = j * groups + (format.kind === 'int4' ? Math.floor(k / (format.groupSize ?? rows)) : 0);
      out[j * depth + k] = f32((zeros === undefined ? v : v - zeros[s]) * scales[s]);
    }
  return out.subarray(0, channels * depth);
};

const dequantizeInto = (source: TensorSource, t: Extract<ReloadTarget, { mode: 'dequantize' }>, out: Float32Array): Float32Array =>
  dequantizeEntry(source, t.entry, t.format, t.geometry, out);

/** A copy target's values and scales as the refitter takes them (views of the checkpoint where they can be). */
export const quantizedOf = (source: TensorSource, t: { readonly layer: string; readonly entry: QuantizedEntry; readonly format: QuantFormat; readonly geometry: Geometry }): QuantizedWeights => {
  const bytes = source.bytes(t.entry.weight);
  const scales = scalesOf(source, t);
  const zeros = zeroPointsOf(source, t.entry, scales.length);
  if (zeros !== undefined && zeros.some((z) => z !== 0)) throw new QuantError({ _tag: 'AsymmetricUnsupported', tensor: t.entry.zeroPoint!, layer: t.layer });
  const values = t.format.kind === 'int8' ? new Int8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength) : bytes;
  return { format: t.format.kind as KernelFormat, groupSize: t.format.groupSize, values, scales };
};

/** Stages one layer's targets; conversions go into `buffer` (which must hold them all). */
const stageLayer = (refitter: Refitter, source: TensorSource, targets: readonly ReloadTarget[], buffer: Float32Array): void => {
  let used = 0;
  const take = (n: number) => buffer.subarray(used, (used += n));
  for (const t of targets) {
    try {
      if (t.mode === 'copy') refitter.setQuantizedWeights(t.layer, t.role, quantizedOf(source, t));
      else if (t.mode === 'dequantize') {
        const data = dequantizeInto(source, t, take(t.geometry.channels * t.geometry.depth));
        refitter.setWeights(t.layer, t.role, { dtype: 'float32', shape: [data.length], data });
      } else {
        const data = toFloat32Into(source, t.tensor, t.dtype, buffer.subarray(used, used + t.count));
        if (data.buffer === buffer.buffer) used += t.count;
        refitter.setWeights(t.layer, t.role, { dtype: 'float32', shape: [data.length], data });
      }
    } catch (e) {
      if (e instanceof NativeError) throw new QuantError({ _tag: 'RefitFailed', tensor: t.tensor, detail: e.message });
      throw e;
    }
  }
};

const layerNeed = (source: TensorSource, targets: readonly ReloadTarget[]): number => targets.reduce((sum, t) => sum + bufferNeed(source, t), 0);

export interface ReloadSummary {
  readonly layers: number;
  readonly copied: number;
  readonly dequantized: number;
  readonly float: number;
  readonly untouched: number;
  /** Float32 elements of the conversion buffer (the reload's own host memory). */
  readonly bufferFloats: number;
}

const withRefitter = <T>(engine: Engine, fn: (r: Refitter) => T): T => {
  using refitter = engine.createRefitter();
  return fn(refitter);
};

const failed = (e: unknown, what: string): never => {
  if (e instanceof NativeError) throw new QuantError({ _tag: 'RefitFailed', tensor: what, detail: e.message });
  throw e;
};

/** Reloads `source` into `engine` layer by layer (see the module comment). Throws QuantError. */
export const reloadCheckpoint = (engine: Engine, source: TensorSource, options: ReloadOptions = {}): ReloadSummary => {
  const weights = engine.weights();
  const plan = planReload(source, weights, engine.kernelFormats(), options, foldedLayers(engine.describe(), weights));
  if (E.isLeft(plan)) throw new QuantError(plan.left);
  const { layers, untouched } = plan.right;
  const all = layers.flatMap((l) => l.targets);
  const count = (mode: ReloadTarget['mode']) => all.filter((t) => t.mode === mode).length;
  const summary = (bufferFloats: number): ReloadSummary => ({ layers: layers.length, copied: count('copy'), dequantized: count('dequantize'), float: count('float'), untouched: untouched.length, bufferFloats });
  if (!engine.info().hasWeights) {
    // A stripped engine runs only once every weight is set: one all-or-nothing apply.
    const need = layers.reduce((s, l) => s + layerNeed(source, l.targets), 0);
    const buffer = new Float32Array(Math.max(need, 1));
    withRefitter(engine, (r) => {
      let offset = 0;
      for (const l of layers) {
        const n = layerNeed(source, l.targets);
        stageLayer(r, source, l.targets, buffer.subarray(offset, offset + n));
        offset += n;
      }
      try {
        r.apply();
      } catch (e) {
        failed(e, 'the checkpoint');
      }
    });
    return summary(need);
  }
  const need = layers.reduce((m, l) => Math.max(m, layerNeed(source, l.targets)), 0);
  const buffer = new Float32Array(Math.max(need, 1));
  // First every layer is checked, changing nothing; then each is applied.
  for (const l of layers)
    withRefitter(engine, (r) => {
      stageLayer(r, source, l.targets, buffer);
      try {
        r.validate();
      } catch (e) {
        failed(e, l.targets[0].tensor);
      }
    });
  for (const l of layers)
    withRefitter(engine, (r) => {
      stageLayer(r, source, l.targets, buffer);
      try {
        r.apply();
      } catch (e) {
        failed(e, l.targets[0].tensor);
      }
    });
  return summary(need);
};

export const reloadCheckpointTE = (engine: Engine, source: TensorSource, options: ReloadOptions = {}): TE.TaskEither<QuantError, ReloadSummary> =>
  TE.tryCatch(
    async () => reloadCheckpoint(engine, source, options),
    (e) => (e instanceof QuantError ? e : new QuantError({ _tag: 'RefitFailed', tensor: 'the checkpoint', detail: e instanceof Error ? e.message : String(e) })),
  );
