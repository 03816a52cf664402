/**
 * Values of plan targets over a checkpoint, for the executor.
 *
 * - A target's value is its expression evaluated over the checkpoint: float32 tensors are zero-copy views of
 *   the mapped file; other dtypes are converted one tensor at a time. `isView` tells whether the last value
 *   is a view of a tensor already in memory (it then costs nothing to keep staged).
 * - Non-finite values are refused here, once per value (NonFiniteValues): a value that is a view of a
 *   checkpoint tensor the plan already scanned costs nothing (scans are memoized by file identity);
 *   refitters run with their own check off, which would scan every value again in set, validate and apply.
 * - A quantized checkpoint (`<m>.weight` + `<m>.weight_scale`): copies into kernels of the same format are
 *   decided (and checked) against the engines before anything changes; every other read of a quantized
 *   tensor gets it dequantized into the layout the weight map recorded.
 */
import * as E from 'fp-ts/lib/Either.js';
import type { QuantizedWeights } from '../../ffi/engine.js';
import type { PlanEntry } from '../plan/plan.js';
import type { QuantizedEntry } from '../quant/checkpoint.js';
import { describeQuantIssue } from '../quant/errors.js';
import { dequantizedSource } from '../quant/mapped.js';
import { quantizedIn, tensorSourceOf } from '../quant/store.js';
import type { RefitModel } from '../model/model.js';
import { nonFiniteCount } from '../weightmap/digest.js';
import type { F32Tensor } from '../weightmap/evaluate.js';
import type { MapTarget } from '../weightmap/map.js';
import type { TensorStore } from '../weightmap/store.js';
import type { EffectCapabilities } from './capabilities.js';
import { fail, Failure, messageOf } from './errors.js';
import { decideCopy, kernelInfoOf } from './quantized.js';

export type QuantizedCopy = { readonly weights: QuantizedWeights; readonly reads: readonly string[] };

const count = (shape: readonly number[]): number => shape.reduce((a, b) => a * b, 1);
const dtypeBytes: Readonly<Record<string, number>> = { F64: 8, I64: 8, U64: 8, F32: 4, I32: 4, U32: 4, F16: 2, BF16: 2, I16: 2, U16: 2, I8: 1, U8: 1, F8_E4M3: 1, BOOL: 1 };

/** A checkpoint tensor as float32: a zero-copy view for aligned F32 data, else converted. */
const readSource = (store: TensorStore, name: string): F32Tensor | undefined => {
  const info = store.tensors.get(name);
  if (info === undefined) return undefined;
  if (info.dtype === 'F32') {
    const bytes = store.bytes(name);
    if (bytes.byteOffset % 4 === 0) return { shape: info.shape, data: new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4) };
  }
  return { shape: info.shape, data: store.toFloat32(name) };
};

export class TargetValues {
  readonly #checkpoint: TensorStore;
  readonly #transform: EffectCapabilities['transform'];
  readonly #checkFinite: boolean;
  readonly #source;
  readonly #recorded: ReadonlyMap<string, readonly number[]>;
  #quantized: ReadonlyMap<string, QuantizedEntry> = new Map();
  readonly #copies = new Map<string, QuantizedCopy>();
  /** Buffers of the tensors the last evaluation read: a result in one of them is a view, not a new allocation. */
  #sourceBuffers = new Set<ArrayBufferLike>();
  /** Checkpoint tensors read so far. */
  readonly sourcesRead = new Set<string>();

  constructor(model: RefitModel, checkpoint: TensorStore, transform: EffectCapabilities['transform'], checkFinite: boolean) {
    this.#checkpoint = checkpoint;
    this.#transform = transform;
    this.#checkFinite = checkFinite;
    this.#source = tensorSourceOf(checkpoint);
    this.#recorded = new Map(model.weightMap.sources.map((s) => [s.name, s.shape] as const));
  }

  /** Finds the checkpoint's quantized tensors and decides, against the engines themselves (not the plan's
   *  word), which of `targets` are copies; refuses a mismatch before anything changes. */
  decideCopies(model: RefitModel, targets: readonly MapTarget[]): void {
    const found = quantizedIn(this.#checkpoint);
    if (E.isLeft(found)) fail({ _tag: 'QuantizedMismatch', tensor: found.left._tag === 'BadWeightFormat' ? found.left.text : found.left.tensor, target: '(checkpoint)', detail: describeQuantIssue(found.left) });
    this.#quantized = E.isRight(found) ? found.right : new Map();
    if (this.#quantized.size === 0) return;
    const kernels = kernelInfoOf(model);
    for (const t of targets) {
      if (t.kind !== 'engine' || this.#copies.has(t.id)) continue;
      const copy = decideCopy(t, this.#quantized, this.#recorded, kernels, this.#source);
      if (E.isLeft(copy)) {
        const issue = copy.left;
        fail({ _tag: 'QuantizedMismatch', tensor: issue._tag === 'BadWeightFormat' ? issue.text : issue.tensor, target: t.id, detail: describeQuantIssue(issue) });
      } else if (copy.right !== undefined) {
        if (this.#checkFinite) {
          const bad = nonFiniteCount(copy.right.weights.scales);
          if (bad > 0) fail({ _tag: 'NonFiniteValues', target: t.id, count: bad });
        }
        this.#copies.set(t.id, copy.right);
      }
    }
  }

  /** The decided copy of a target, if it is one (its reads are counted). */
  copyOf(target: string): QuantizedWeights | undefined {
    const copy = this.#copies.get(target);
    if (copy === undefined) return undefined;
    copy.reads.forEach((n) => this.sourcesRead.add(n));
    return copy.weights;
  }

  /** A target's value over the checkpoint, refusing non-finite values when asked. */
  evaluate(target: string, expr: PlanEntry['expr'], shape: readonly number[]): Float32Array {
    this.#sourceBuffers = new Set();
    const lookup = (name: string): F32Tensor | undefined => {
      const entry = this.#quantized.get(name);
      if (entry !== undefined) {
        const d = dequantizedSource(this.#source, entry, this.#recorded.get(name) ?? entry.valuesShape);
        if (E.isLeft(d)) return fail({ _tag: 'QuantizedMismatch', tensor: name, target, detail: describeQuantIssue(d.left) });
        this.sourcesRead.add(name);
        return d.right;
      }
      try {
        const t = readSource(this.#checkpoint, name);
        if (t !== undefined) {
          this.sourcesRead.add(name);
          this.#sourceBuffers.add(t.data.buffer);
        }
        return t;
      } catch (e) {
        return fail({ _tag: 'ReadFailed', source: name, target, detail: messageOf(e) });
      }
    };
    let value: E.Either<unknown, F32Tensor>;
    try {
      value = this.#transform(expr, lookup);
    } catch (e) {
      if (e instanceof Failure) throw e;
      return fail({ _tag: 'TransformFailed', target, detail: messageOf(e) });
    }
    if (E.isLeft(value)) return fail({ _tag: 'TransformFailed', target, detail: JSON.stringify(value.left) });
    if (value.right.data.length !== count(shape)) fail({ _tag: 'TransformFailed', target, detail: `expected ${count(shape)} values for [${shape}], found ${value.right.data.length}` });
    const values = value.right.data;
    if (this.#checkFinite) {
      const bad = nonFiniteCount(values);
      if (bad > 0) fail({ _tag: 'NonFiniteValues', target, count: bad });
    }
    return values;
  }

  /** True when `data` (the last value evaluated) is a view of a tensor already in memory. */
  isView(data: Float32Array): boolean {
    return this.#sourceBuffers.has(data.buffer);
  }

  /** Bytes of the checkpoint tensors read, as stored. */
  sourceBytesRead(): number {
    return [...this.sourcesRead].reduce((s, n) => {
      const info = this.#checkpoint.tensors.get(n)!;
      return s + count(info.shape) * (dtypeBytes[info.dtype] ?? 4);
    }, 0);
  }
}
