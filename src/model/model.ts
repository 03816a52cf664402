/**
 * A compiled model in memory: its segments in run order (native engines with one execution context each,
 * and ONNX Runtime fallbacks), the weight map, and the source digests its targets hold now. Made by
 * src/compile (from an ONNX file) or read from a .trtr file (src/model/file.ts); refitted by src/effect.
 */
import type { Engine, ExecutionContext, HostTensor } from '../../ffi/engine.js';
import { elementCount, type Tensor, type TensorData } from '../trace/ir.js';
import type { WeightMap } from '../weightmap/map.js';
import type { FallbackRunner } from './fallback.js';
import type { BlobRef, BuildInfo, ModelHeader, PartitionReport, SegmentRecord, TensorDesc } from './format.js';

/** Where an engine's current state can be read back from: a blob of a .trtr file, as it was when read. */
export interface EngineOrigin {
  readonly path: string;
  readonly blob: BlobRef;
  /** The file's identity when the blob was read or written: a replaced or changed file is no origin. */
  readonly identity: { readonly dev: number; readonly ino: number; readonly size: number; readonly mtimeMs: number };
}

export type EngineSegmentRecord = Extract<SegmentRecord, { kind: 'engine' }>;
export type FallbackSegmentRecord = Extract<SegmentRecord, { kind: 'fallback' }>;

export interface EngineStage {
  readonly kind: 'engine';
  readonly record: Omit<EngineSegmentRecord, 'blob'>;
  engine: Engine;
  context: ExecutionContext;
  /** Set while the engine equals a blob of a file; cleared by a refit. */
  origin: EngineOrigin | undefined;
}

export interface FallbackStage {
  readonly kind: 'fallback';
  readonly record: Omit<FallbackSegmentRecord, 'blob'>;
  readonly runner: FallbackRunner;
}

export type Stage = EngineStage | FallbackStage;

export type ModelRunErrorDetail =
  | { readonly _tag: 'MissingModelInput'; readonly input: string }
  | { readonly _tag: 'InputMismatch'; readonly input: string; readonly expected: string; readonly found: string }
  | { readonly _tag: 'ModelDisposed' };

export class ModelRunError extends Error {
  override readonly name = 'ModelRunError';
  readonly _tag: ModelRunErrorDetail['_tag'];
  constructor(readonly detail: ModelRunErrorDetail) {
    super(
      detail._tag === 'MissingModelInput' ? `no value for model input '${detail.input}'`
      : detail._tag === 'InputMismatch' ? `model input '${detail.input}': expected ${detail.expected}, found ${detail.found}`
      : 'the model was disposed',
    );
    this._tag = detail._tag;
  }
}

/** The typed arrays that hold each dtype (float16 and bfloat16 are 16-bit patterns; bool one byte). */
const arraysOf: Readonly<Record<string, readonly string[]>> = {
  float32: ['Float32Array'], float64: ['Float64Array'], float16: ['Uint16Array'], bfloat16: ['Uint16Array'],
  int8: ['Int8Array'], uint8: ['Uint8Array'], bool: ['Uint8Array'], int16: ['Int16Array'], uint16: ['Uint16Array'],
  int32: ['Int32Array'], uint32: ['Uint32Array'], int64: ['BigInt64Array'], uint64: ['BigUint64Array'],
};

/** Undefined when `data` is a typed array that holds `dtype`; else what was expected and found. */
export const typedArrayMismatch = (dtype: string, data: unknown): { readonly expected: string; readonly found: string } | undefined => {
  const found = ArrayBuffer.isView(data) ? (data as { constructor: { name: string } }).constructor.name : data === null ? 'null' : typeof data;
  const holders = arraysOf[dtype] ?? [];
  return ArrayBuffer.isView(data) && holders.includes(found) ? undefined : { expected: `${dtype} (${holders.length > 0 ? holders.join(' or ') : 'a typed array'})`, found };
};

export interface ModelDescription {
  readonly inputs: readonly TensorDesc[];
  readonly outputs: readonly string[];
  readonly tensors: readonly TensorDesc[];
  readonly partition: PartitionReport;
  readonly build: BuildInfo;
  readonly weightMap: WeightMap;
  readonly current: Readonly<Record<string, string>>;
}

export class RefitModel implements Disposable {
  #current: Readonly<Record<string, string>>;
  #disposed = false;
  readonly #tensors: ReadonlyMap<string, TensorDesc>;

  constructor(
    readonly description: Omit<ModelDescription, 'current'>,
    current: Readonly<Record<string, string>>,
    readonly stages: readonly Stage[],
  ) {
    this.#current = current;
    this.#tensors = new Map(description.tensors.map((t) => [t.name, t]));
  }

  get weightMap(): WeightMap {
    return this.description.weightMap;
  }
  get inputs(): readonly TensorDesc[] {
    return this.description.inputs;
  }
  get outputs(): readonly string[] {
    return this.description.outputs;
  }
  /** Source digests the targets hold now (a plan's `current`). */
  get current(): Readonly<Record<string, string>> {
    return this.#current;
  }
  /** @internal the effect layer records what a successful refit put in. */
  setCurrent(next: Readonly<Record<string, string>>): void {
    this.#current = { ...next };
  }

  engineStages(): EngineStage[] {
    return this.stages.filter((s): s is EngineStage => s.kind === 'engine');
  }
  fallbackStages(): FallbackStage[] {
    return this.stages.filter((s): s is FallbackStage => s.kind === 'fallback');
  }
  stage(segment: number): Stage | undefined {
    return this.stages.find((s) => s.record.index === segment);
  }

  /** The header of a file holding this model, given where each segment's blob goes. */
  header(blobs: ReadonlyMap<number, BlobRef>): ModelHeader {
    const d = this.description;
    return {
      format: 'trt-refit-model', version: 1, inputs: d.inputs, outputs: d.outputs, tensors: d.tensors,
      segments: this.stages.map((s) => ({ ...s.record, blob: blobs.get(s.record.index)! }) as SegmentRecord),
      partition: d.partition, build: d.build, weightMap: d.weightMap, current: this.#current,
    };
  }

  /** Runs the model; inputs by name, as tensors or bare typed arrays (which take the declared shapes). */
  async run(inputs: Readonly<Record<string, Tensor | TensorData>>): Promise<Record<string, Tensor>> {
    if (this.#disposed) throw new ModelRunError({ _tag: 'ModelDisposed' });
    const values = new Map<string, Tensor>();
    for (const input of this.description.inputs) {
      const given = inputs[input.name];
      if (given === undefined) throw new ModelRunError({ _tag: 'MissingModelInput', input: input.name });
      const tensor: Tensor = ArrayBuffer.isView(given) ? { dtype: input.dtype, shape: input.shape, data: given as TensorData } : (given as Tensor);
      // A typed array whose element type is not the input's would be reinterpreted bit for bit: refused.
      const wrongArray = typedArrayMismatch(tensor.dtype, tensor.data);
      if (wrongArray !== undefined) {
        throw new ModelRunError({ _tag: 'InputMismatch', input: input.name, expected: wrongArray.expected, found: ArrayBuffer.isView(given) ? wrongArray.found : `a ${tensor.dtype} tensor holding ${wrongArray.found}` });
      }
      if (tensor.dtype !== input.dtype || tensor.data.length !== elementCount(input.shape)) {
        throw new ModelRunError({ _tag: 'InputMismatch', input: input.name, expected: `${input.dtype}[${input.shape}]`, found: `${tensor.dtype} with ${tensor.data.length} elements` });
      }
      values.set(input.name, { ...tensor, shape: input.shape });
    }
    for (const stage of this.stages) {
      if (stage.kind === 'engine') {
        const feeds: Record<string, HostTensor> = {};
        for (const name of stage.record.inputs) feeds[name] = values.get(name)!.data as HostTensor;
        const outputs = stage.context.run(feeds);
        for (const name of stage.record.outputs) {
          values.set(name, { dtype: 'float32', shape: this.#tensors.get(name)?.shape ?? [outputs[name].length], data: outputs[name] });
        }
      } else {
        for (const [name, t] of await stage.runner.run(values)) values.set(name, t);
      }
    }
    const result: Record<string, Tensor> = {};
    for (const name of this.description.outputs) result[name] = values.get(name)!;
    return result;
  }

  get disposed(): boolean {
    return this.#disposed;
  }

  [Symbol.dispose](): void {
    if (this.#disposed) return;
    this.#disposed = true;
    for (const s of this.stages) {
      if (s.kind === 'engine') {
        s.context[Symbol.dispose]();
        s.engine[Symbol.dispose]();
      } else s.runner[Symbol.dispose]();
    }
  }
}
