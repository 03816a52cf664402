/**
 * A fallback segment of a compiled model as ONNX Runtime runs it: the segment's own ONNX model bytes (its
 * nodes, boundary value infos and initializers, as src/fallback/model.ts encodes them) and a session on
 * them. Independent of the source graph, so a model read back from a .trtr file runs and refits without
 * the ONNX file.
 *
 * A refit is two-phase, so a model of several segments can be all or nothing: `prepare` builds the new
 * model bytes and opens a session on them (every check happens here; nothing changes), `commit` swaps it
 * in (cannot fail), `discard` drops it.
 */
import * as ort from 'onnxruntime-node';
import { ModelProtoType, type RawModel, type RawTensor } from '../trace/onnx-schema.js';
import { dtypeFromOnnx } from '../trace/decode.js';
import { allocate, elementCount, toBytes, type DType, type Tensor, type TensorData } from '../trace/ir.js';

export interface FallbackTensorDesc {
  readonly name: string;
  readonly dtype: DType;
  readonly shape: readonly number[];
}

export type FallbackRunErrorDetail =
  | { readonly _tag: 'SessionFailed'; readonly segment: number; readonly reason: string }
  | { readonly _tag: 'MissingInput'; readonly segment: number; readonly tensor: string }
  | { readonly _tag: 'InitializerMismatch'; readonly segment: number; readonly tensor: string; readonly reason: string };

export const describeFallbackRunError = (e: FallbackRunErrorDetail): string =>
  e._tag === 'SessionFailed' ? `fallback segment ${e.segment}: ONNX Runtime failed: ${e.reason}`
  : e._tag === 'MissingInput' ? `fallback segment ${e.segment}: no value for input '${e.tensor}'`
  : `fallback segment ${e.segment}: initializer '${e.tensor}': ${e.reason}`;

export class FallbackRunError extends Error {
  override readonly name = 'FallbackRunError';
  readonly _tag: FallbackRunErrorDetail['_tag'];
  constructor(readonly detail: FallbackRunErrorDetail) {
    super(describeFallbackRunError(detail));
    this._tag = detail._tag;
  }
}

const ortType: Partial<Record<DType, ort.Tensor.Type>> = {
  float32: 'float32', float64: 'float64', float16: 'float16', int8: 'int8', uint8: 'uint8', int16: 'int16', uint16: 'uint16',
  int32: 'int32', uint32: 'uint32', int64: 'int64', uint64: 'uint64', bool: 'bool',
};

/** Opens an ONNX Runtime session on model bytes (single-threaded: the engines own the cores). */
export type SessionOpener = (modelBytes: Uint8Array) => Promise<ort.InferenceSession>;

export const openOrtSession: SessionOpener = (bytes) =>
  ort.InferenceSession.create(bytes, { intraOpNumThreads: 1, interOpNumThreads: 1, graphOptimizationLevel: 'all' });

const dimsOf = (raw: RawTensor): number[] => (raw.dims ?? []).map((d) => (typeof d === 'number' ? d : d.toNumber()));

/** The ONNX model bytes with some float32 initializers replaced; checks names, dtypes and shapes. Pure. */
export const replaceInitializers = (
  segment: number,
  modelBytes: Uint8Array,
  updates: ReadonlyMap<string, Float32Array>,
): { bytes: Uint8Array } | { error: FallbackRunErrorDetail } => {
  const model = ModelProtoType.decode(modelBytes) as unknown as RawModel & { graph?: { initializer?: RawTensor[] } };
  const initializers = model.graph?.initializer ?? [];
  const byName = new Map(initializers.map((i) => [i.name ?? '', i]));
  for (const [name, values] of updates) {
    const raw = byName.get(name);
    if (raw === undefined) return { error: { _tag: 'InitializerMismatch', segment, tensor: name, reason: 'the segment has no such initializer' } };
    const dtype = dtypeFromOnnx(raw.dataType ?? 0);
    const shape = dimsOf(raw);
    if (dtype !== 'float32') return { error: { _tag: 'InitializerMismatch', segment, tensor: name, reason: `the initializer is ${dtype ?? `ONNX type ${raw.dataType}`}; float32 values were given` } };
    if (elementCount(shape) !== values.length) return { error: { _tag: 'InitializerMismatch', segment, tensor: name, reason: `expected ${elementCount(shape)} values for [${shape}], found ${values.length}` } };
    raw.rawData = new Uint8Array(toBytes(values));
    raw.floatData = [];
  }
  return { bytes: ModelProtoType.encode(model as never).finish() };
};

/** The float32 initializers of model bytes, by name (for digests and tests). */
export const readInitializer = (modelBytes: Uint8Array, name: string): Tensor | undefined => {
  const model = ModelProtoType.decode(modelBytes) as unknown as RawModel & { graph?: { initializer?: RawTensor[] } };
  const raw = (model.graph?.initializer ?? []).find((i) => i.name === name);
  const dtype = raw && dtypeFromOnnx(raw.dataType ?? 0);
  if (raw === undefined || dtype === undefined) return undefined;
  const shape = dimsOf(raw);
  const data = allocate(dtype, elementCount(shape));
  if (raw.rawData && raw.rawData.length > 0) toBytes(data).set(raw.rawData.subarray(0, data.byteLength));
  else if (dtype === 'float32' && raw.floatData) (data as Float32Array).set(raw.floatData);
  return { dtype, shape, data };
};

export interface PreparedFallback {
  readonly bytes: Uint8Array;
  readonly session: ort.InferenceSession;
}

export class FallbackRunner implements Disposable {
  private constructor(
    readonly segment: number,
    private modelBytes: Uint8Array,
    private session: ort.InferenceSession | undefined,
    readonly inputs: readonly FallbackTensorDesc[],
    readonly outputs: readonly FallbackTensorDesc[],
  ) {}

  static async open(segment: number, modelBytes: Uint8Array, inputs: readonly FallbackTensorDesc[], outputs: readonly FallbackTensorDesc[], opener: SessionOpener = openOrtSession): Promise<FallbackRunner> {
    return new FallbackRunner(segment, modelBytes, await FallbackRunner.openSession(segment, modelBytes, opener), inputs, outputs);
  }

  private static async openSession(segment: number, bytes: Uint8Array, opener: SessionOpener): Promise<ort.InferenceSession> {
    try {
      return await opener(bytes);
    } catch (e) {
      throw new FallbackRunError({ _tag: 'SessionFailed', segment, reason: (e as Error).message });
    }
  }

  /** The segment's ONNX model bytes as they are now (written into .trtr files). */
  get bytes(): Uint8Array {
    return this.modelBytes;
  }

  async run(values: ReadonlyMap<string, Tensor>): Promise<Map<string, Tensor>> {
    const session = this.session;
    if (session === undefined) throw new FallbackRunError({ _tag: 'SessionFailed', segment: this.segment, reason: 'the session was disposed' });
    const feeds: Record<string, ort.Tensor> = {};
    for (const input of this.inputs) {
      const v = values.get(input.name);
      if (v === undefined) throw new FallbackRunError({ _tag: 'MissingInput', segment: this.segment, tensor: input.name });
      feeds[input.name] = new ort.Tensor(ortType[v.dtype] ?? 'float32', v.data as never, [...v.shape]);
    }
    let results: ort.InferenceSession.OnnxValueMapType;
    try {
      results = await session.run(feeds);
    } catch (e) {
      throw new FallbackRunError({ _tag: 'SessionFailed', segment: this.segment, reason: (e as Error).message });
    }
    const out = new Map<string, Tensor>();
    for (const o of this.outputs) {
      const data = (results[o.name] as ort.Tensor).data as unknown as TensorData;
      const n = elementCount(o.shape);
      out.set(o.name, { dtype: o.dtype, shape: o.shape, data: data.length === n ? data : data.slice(0, n) });
    }
    return out;
  }

  /** New model bytes with `updates` in, and a session on them; changes nothing here. Rejects with FallbackRunError. */
  async prepare(updates: ReadonlyMap<string, Float32Array>, opener: SessionOpener = openOrtSession): Promise<PreparedFallback> {
    const replaced = replaceInitializers(this.segment, this.modelBytes, updates);
    if ('error' in replaced) throw new FallbackRunError(replaced.error);
    return { bytes: replaced.bytes, session: await FallbackRunner.openSession(this.segment, replaced.bytes, opener) };
  }

  /** Swaps a prepared session in; returns the previous state so a later failure can restore it. */
  commit(prepared: PreparedFallback): PreparedFallback {
    const previous = { bytes: this.modelBytes, session: this.session! };
    this.modelBytes = prepared.bytes;
    this.session = prepared.session;
    return previous;
  }

  static discard(prepared: PreparedFallback): void {
    void prepared.session.release().catch(() => undefined);
  }

  [Symbol.dispose](): void {
    void this.session?.release().catch(() => undefined);
    this.session = undefined;
  }
}
