/**
 * Running a fallback segment on ONNX Runtime (CPU). The segment's constants are initializers we supply,
 * so `refit` re-creates the session with new values: fallback weights are refittable like engine weights.
 */
import * as ort from 'onnxruntime-node';
import { encodeSegmentModel, type SegmentModelSpec } from './model.js';
import { elementCount, type DType, type Tensor, type TensorData } from '../trace/ir.js';

export type FallbackErrorDetail =
  | { readonly _tag: 'SessionFailed'; readonly segment: string; readonly reason: string }
  | { readonly _tag: 'MissingInput'; readonly segment: string; readonly tensor: string }
  | { readonly _tag: 'RefitMismatch'; readonly segment: string; readonly tensor: string; readonly reason: string };

export class FallbackError extends Error {
  override readonly name = 'FallbackError';
  readonly _tag: FallbackErrorDetail['_tag'];
  constructor(readonly detail: FallbackErrorDetail) {
    super(
      detail._tag === 'SessionFailed' ? `fallback segment '${detail.segment}': ONNX Runtime failed: ${detail.reason}`
      : detail._tag === 'MissingInput' ? `fallback segment '${detail.segment}': no value for input '${detail.tensor}'`
      : `fallback segment '${detail.segment}': initializer '${detail.tensor}': ${detail.reason}`,
    );
    this._tag = detail._tag;
  }
}

const ortType: Partial<Record<DType, ort.Tensor.Type>> = {
  float32: 'float32', float64: 'float64', float16: 'float16', int8: 'int8', uint8: 'uint8', int16: 'int16', uint16: 'uint16',
  int32: 'int32', uint32: 'uint32', int64: 'int64', uint64: 'uint64', bool: 'bool',
};

const toOrt = (t: Tensor): ort.Tensor => new ort.Tensor(ortType[t.dtype] ?? 'float32', t.data as never, [...t.shape]);

const fromOrt = (value: ort.Tensor, dtype: DType, shape: readonly number[]): Tensor => {
  const data = value.data as unknown as TensorData;
  // ONNX Runtime gives bool as Uint8Array already; float16 as Uint16Array of bits.
  return { dtype, shape, data: elementCount(shape) === data.length ? data : data.slice(0, elementCount(shape)) };
};

export class FallbackSession implements Disposable {
  private constructor(
    private spec: SegmentModelSpec,
    private session: ort.InferenceSession | undefined,
  ) {}

  static async create(spec: SegmentModelSpec): Promise<FallbackSession> {
    return new FallbackSession(spec, await FallbackSession.open(spec));
  }

  private static async open(spec: SegmentModelSpec): Promise<ort.InferenceSession> {
    try {
      return await ort.InferenceSession.create(encodeSegmentModel(spec), { intraOpNumThreads: 1, interOpNumThreads: 1, graphOptimizationLevel: 'all' });
    } catch (e) {
      throw new FallbackError({ _tag: 'SessionFailed', segment: spec.name, reason: (e as Error).message });
    }
  }

  get initializers(): ReadonlyMap<string, Tensor> {
    return this.spec.initializers;
  }

  async run(values: ReadonlyMap<string, Tensor>): Promise<Map<string, Tensor>> {
    const session = this.session;
    if (session === undefined) throw new FallbackError({ _tag: 'SessionFailed', segment: this.spec.name, reason: 'the session was disposed' });
    const feeds: Record<string, ort.Tensor> = {};
    for (const input of this.spec.inputs) {
      const v = values.get(input.name);
      if (v === undefined) throw new FallbackError({ _tag: 'MissingInput', segment: this.spec.name, tensor: input.name });
      feeds[input.name] = toOrt(v);
    }
    let results: ort.InferenceSession.OnnxValueMapType;
    try {
      results = await session.run(feeds);
    } catch (e) {
      throw new FallbackError({ _tag: 'SessionFailed', segment: this.spec.name, reason: (e as Error).message });
    }
    const out = new Map<string, Tensor>();
    for (const o of this.spec.outputs) out.set(o.name, fromOrt(results[o.name] as ort.Tensor, o.type.dtype, o.type.shape));
    return out;
  }

  /** Replaces initializers (same names, dtypes and shapes) and re-creates the session; all or nothing. */
  async refit(updates: ReadonlyMap<string, Tensor>): Promise<void> {
    const next = new Map(this.spec.initializers);
    for (const [name, t] of updates) {
      const old = this.spec.initializers.get(name);
      if (old === undefined) throw new FallbackError({ _tag: 'RefitMismatch', segment: this.spec.name, tensor: name, reason: 'the segment has no such initializer' });
      if (old.dtype !== t.dtype || old.shape.join() !== t.shape.join()) {
        throw new FallbackError({ _tag: 'RefitMismatch', segment: this.spec.name, tensor: name, reason: `expected ${old.dtype}[${old.shape}], found ${t.dtype}[${t.shape}]` });
      }
      next.set(name, t);
    }
    const spec = { ...this.spec, initializers: next };
    const session = await FallbackSession.open(spec);
    await this.session?.release();
    this.spec = spec;
    this.session = session;
  }

  [Symbol.dispose](): void {
    void this.session?.release();
    this.session = undefined;
  }
}
