/**
 * Engines, execution contexts and refitters: typed, disposable wrappers of libtrtshim's handles.
 *
 * Every wrapper owns one native handle; after [Symbol.dispose]() its methods throw instead of calling into
 * C. The C side reference-counts engines (contexts and refitters hold theirs), so wrappers may be disposed
 * in any order. A FinalizationRegistry destroys handles whose wrappers were dropped without dispose.
 */
import { readFileSync } from 'node:fs';
import type { NetworkDefinition, Weights, WeightRole } from '../src/network/types.js';
import { call, check, DType, dtypeName, MAX_RANK, native, NativeError, Role, roleName, Status, type NativeFunctionName } from './library.js';
import { lowerNetwork, nativeWeights } from './network.js';
import type { HeldForm } from '../src/verify/expected.js';

export type HostTensor = Float32Array | Int32Array | BigInt64Array;
export type WeightPrecision = 'float32' | 'float16' | 'bfloat16';

export interface BuildOptions {
  weightPrecision?: WeightPrecision; // default float32
  refittable?: boolean; // default true
  stripWeights?: boolean; // default false
  weightStreaming?: boolean; // default false
  tacticSearch?: boolean; // default false
  numThreads?: number; // default 0 = one per core
  /** Quantized kernel format of GEMM and convolution weights (default: weightPrecision). Norms, embeddings
   *  and other constants stay in full precision. */
  weightFormat?: KernelFormat;
  /** Convolution kernels only (default: weightFormat); 'asPrecision' keeps them in weightPrecision. */
  convWeightFormat?: KernelFormat | 'asPrecision';
  /** Rows of K per int4 scale (default 128). */
  int4GroupSize?: 32 | 64 | 128;
}

/** Quantized kernel formats (trtshim_weight_format). */
export type KernelFormat = 'int8' | 'fp8_e4m3' | 'int4';
export const KernelFormatCode = { asPrecision: 0, int8: 1, fp8_e4m3: 2, int4: 3 } as const;
const kernelFormatName = (code: number): KernelFormat | 'asPrecision' => {
  const entry = Object.entries(KernelFormatCode).find(([, v]) => v === code);
  if (entry === undefined) throw new NativeError('weight format', Status.ARGUMENT, 'Argument', `unknown weight format code ${code}`);
  return entry[0] as KernelFormat | 'asPrecision';
};

/** The kernel format an engine holds a weight in. */
export interface WeightKernelFormat {
  layer: string;
  role: WeightRole;
  format: KernelFormat | 'asPrecision';
  /** int4 group size; 0 otherwise. */
  groupSize: number;
}

/** An already-quantized kernel (a compressed-tensors / vLLM checkpoint's weight + weight_scale), in the
 *  layouts trtshim_refitter_set_quantized_weights describes: int8 / fp8 one value per element, int4 two per
 *  byte along K (offset binary, low nibble first). */
export interface QuantizedWeights {
  format: KernelFormat;
  /** int4: the checkpoint's group size; ignored otherwise. */
  groupSize?: number;
  values: Int8Array | Uint8Array;
  scales: Float32Array;
  zeroPoints?: Int8Array | Int32Array;
}

export interface EngineWeight {
  layer: string;
  role: WeightRole;
  dtype: string;
  shape: number[];
  bytes: number;
}
export interface IoDesc {
  name: string;
  isInput: boolean;
  dtype: string;
  shape: number[];
}
export interface EngineInfo {
  numLayers: number;
  numKernels: number;
  numWeights: number;
  refittable: boolean;
  hasWeights: boolean;
  weightPrecision: string;
  weightBytes: number;
  scratchBytes: number;
}
/** An engine's own accounting of weight memory that stands for device memory (bytes; see trtshim.h). */
export interface WeightStreamingStats {
  streamableBytes: number;
  budgetBytes: number;
  /** Streamable weights kept in the resident arena (at most the budget). */
  residentBytes: number;
  /** Streamable weights copied into the window on every run. */
  streamedBytes: number;
  /** One run's double-buffered window. */
  windowBytes: number;
  /** Arena and windows allocated now. */
  allocatedBytes: number;
  /** The most allocatedBytes has been since the budget was last set. */
  peakBytes: number;
  copiedBytes: number;
  runs: number;
}
export interface WeightUpdate {
  layer: string;
  role: WeightRole;
  weights: Weights;
}

type Destroyer = 'trtshim_engine_destroy' | 'trtshim_context_destroy' | 'trtshim_refitter_destroy';

// Safety net: destroy handles whose wrappers were garbage-collected without dispose.
const leaked = new FinalizationRegistry<{ destroy: Destroyer; handle: unknown }>(({ destroy, handle }) => {
  native(destroy)(handle);
});

/** One native handle, destroyed once; `get` throws after dispose. */
class Handle {
  #value: unknown;
  constructor(
    value: unknown,
    private readonly destroy: Destroyer,
    private readonly what: string,
    owner: object,
  ) {
    this.#value = value;
    leaked.register(owner, { destroy, handle: value }, this);
  }
  get(): unknown {
    if (this.#value === null) throw new Error(`${this.what} used after dispose`);
    return this.#value;
  }
  get disposed(): boolean {
    return this.#value === null;
  }
  release(): void {
    if (this.#value === null) return;
    leaked.unregister(this);
    native(this.destroy)(this.#value);
    this.#value = null;
  }
}

const num = (v: unknown): number => (typeof v === 'bigint' ? Number(v) : (v as number));

const createHandle = (fn: NativeFunctionName, ...args: unknown[]): unknown => {
  const out: unknown[] = [null];
  call(fn, ...args, out);
  return out[0];
};

const bytesOf = (t: HostTensor): number => t.byteLength;

/** The current build configuration with `options` applied over libtrtshim's defaults. */
export const buildConfig = (options: BuildOptions = {}) => {
  const config: Record<string, number> = {};
  native('trtshim_build_config_default')(config);
  if (options.weightPrecision !== undefined) config.weight_precision = DType[options.weightPrecision];
  if (options.refittable !== undefined) config.refittable = options.refittable ? 1 : 0;
  else config.refittable = 1;
  if (options.stripWeights !== undefined) config.strip_weights = options.stripWeights ? 1 : 0;
  if (options.weightStreaming !== undefined) config.weight_streaming = options.weightStreaming ? 1 : 0;
  if (options.tacticSearch !== undefined) config.tactic_search = options.tacticSearch ? 1 : 0;
  if (options.numThreads !== undefined) config.num_threads = options.numThreads;
  if (options.weightFormat !== undefined) {
    config.gemm_weight_format = KernelFormatCode[options.weightFormat];
    config.conv_weight_format = KernelFormatCode[options.weightFormat];
  }
  if (options.convWeightFormat !== undefined) config.conv_weight_format = KernelFormatCode[options.convWeightFormat];
  if (options.int4GroupSize !== undefined) config.int4_group_size = options.int4GroupSize;
  return config;
};

/** Compiles a network into an engine. Throws NativeError (or NetworkLoweringError for a bad definition). */
export const buildEngine = (net: NetworkDefinition, options: BuildOptions = {}): Engine => {
  using network = lowerNetwork(net);
  return new Engine(createHandle('trtshim_build', network.handle, buildConfig(options)));
};

export class Engine implements Disposable {
  readonly #handle: Handle;

  /** Wraps a native engine handle (takes ownership). Prefer buildEngine, deserialize or load. */
  constructor(handle: unknown) {
    this.#handle = new Handle(handle, 'trtshim_engine_destroy', 'Engine', this);
  }

  static deserialize(bytes: Uint8Array): Engine {
    // koffi passes an empty typed array as NULL; give C a valid pointer so it reports the short file.
    const data = bytes.byteLength === 0 ? new Uint8Array(1) : bytes;
    return new Engine(createHandle('trtshim_engine_deserialize', data, bytes.byteLength));
  }

  static load(path: string): Engine {
    return new Engine(createHandle('trtshim_engine_load', path));
  }

  /** @internal the native handle (throws after dispose). */
  get nativeHandle(): unknown {
    return this.#handle.get();
  }

  get disposed(): boolean {
    return this.#handle.disposed;
  }

  info(): EngineInfo {
    const info: Record<string, unknown> = {};
    call('trtshim_engine_get_info', this.#handle.get(), info);
    return {
      numLayers: num(info.num_layers),
      numKernels: num(info.num_kernels),
      numWeights: num(info.num_weights),
      refittable: num(info.refittable) !== 0,
      hasWeights: num(info.has_weights) !== 0,
      weightPrecision: dtypeName(num(info.weight_precision)),
      weightBytes: num(info.weight_bytes),
      scratchBytes: num(info.scratch_bytes),
    };
  }

  io(): IoDesc[] {
    const h = this.#handle.get();
    const raw: Record<string, unknown> = {};
    call('trtshim_engine_get_info', h, raw);
    const out: IoDesc[] = [];
    for (let i = 0; i < num(raw.num_io); i++) {
      const name: unknown[] = [null];
      const isInput = [0];
      const dtype = [0];
      const rank = [0];
      const dims = new BigInt64Array(MAX_RANK);
      call('trtshim_engine_io', h, i, name, isInput, dtype, rank, dims);
      out.push({ name: String(name[0]), isInput: isInput[0] !== 0, dtype: dtypeName(dtype[0]), shape: Array.from(dims.subarray(0, rank[0]), Number) });
    }
    return out;
  }

  weights(): EngineWeight[] {
    const h = this.#handle.get();
    const out: EngineWeight[] = [];
    for (let i = 0; i < this.info().numWeights; i++) {
      const name: unknown[] = [null];
      const role = [0];
      const dtype = [0];
      const rank = [0];
      const dims = new BigInt64Array(MAX_RANK);
      const bytes: unknown[] = [0];
      call('trtshim_engine_weight', h, i, name, role, dtype, rank, dims, bytes);
      out.push({ layer: String(name[0]), role: roleName(role[0]), dtype: dtypeName(dtype[0]), shape: Array.from(dims.subarray(0, rank[0]), Number), bytes: num(bytes[0]) });
    }
    return out;
  }

  /** The kernel format of every refittable weight (quantized for the kernels of quantized GEMMs and
   *  convolutions, 'asPrecision' for the rest). */
  kernelFormats(): WeightKernelFormat[] {
    const h = this.#handle.get();
    return this.weights().map((w, i) => {
      const format = [0];
      const groupSize = [0];
      call('trtshim_engine_weight_format', h, i, format, groupSize);
      return { layer: w.layer, role: w.role, format: kernelFormatName(format[0]), groupSize: groupSize[0] };
    });
  }

  /** Read-back verification: per refittable weight, keyed `${layer}\u0000${role}`, the digest ('c1:' and 32
   *  hex digits, as valueDigest formats one) of the network-level values the engine's kernels hold, read
   *  back from the buffers they run with: packed kernels unpacked (float16/bfloat16 widened, int8/fp8/int4
   *  dequantized), float32 for everything else, an integer constant's raw bytes. heldValueDigest
   *  (src/verify/expected.ts) gives the digest expected for given values. Throws NativeError: STATE for a
   *  stripped engine not yet filled (or fold copies not kept), VALIDATION when a folded batch norm or a
   *  second copy of a weight does not match what is read, naming the weight or layer. */
  weightDigests(options: { numThreads?: number; only?: ReadonlySet<string> } = {}): Map<string, string> {
    const h = this.#handle.get();
    const list = this.weights();
    const out = new BigUint64Array(Math.max(1, 2 * list.length));
    const keyOf = (w: { layer: string; role: string }) => `${w.layer}\u0000${w.role}`;
    const only = options.only;
    if (only === undefined) call('trtshim_engine_weight_digests', h, out, options.numThreads ?? 0);
    else call('trtshim_engine_weight_digests_selected', h, Uint8Array.from(list.map((w) => (only.has(keyOf(w)) ? 1 : 0))), out, options.numThreads ?? 0);
    const hex = (x: bigint) => x.toString(16).padStart(16, '0');
    const digests = new Map<string, string>();
    list.forEach((w, i) => {
      if (only === undefined || only.has(keyOf(w))) digests.set(keyOf(w), `c1:${hex(out[2 * i])}${hex(out[2 * i + 1])}`);
    });
    return digests;
  }

  /** How the engine holds every refittable weight (keyed like weightDigests): the `held` argument of
   *  heldValueDigest (src/verify/expected.ts), so the digest expected for given network-level values can be
   *  told from the engine alone: precision, kernel format, and for a weight read back from a packed GEMM or
   *  convolution operand its layout (trtshim_engine_weight_held). */
  heldForms(): Map<string, HeldForm> {
    const h = this.#handle.get();
    const precision = this.info().weightPrecision as WeightPrecision;
    return new Map(
      this.kernelFormats().map((kernel, i): [string, HeldForm] => {
        const packed = [0];
        const transposed = [0];
        const channels: unknown[] = [0];
        const depth: unknown[] = [0];
        call('trtshim_engine_weight_held', h, i, packed, transposed, channels, depth);
        const layout = packed[0] !== 0 ? { packed: { transposed: transposed[0] !== 0, channels: num(channels[0]), depth: num(depth[0]) } } : {};
        return [`${kernel.layer}\u0000${kernel.role}`, { precision, kernel, ...layout }];
      }),
    );
  }

  describe(): unknown {
    const h = this.#handle.get();
    let buffer = new Uint8Array(1 << 16);
    const length: unknown[] = [0];
    call('trtshim_engine_describe', h, buffer, buffer.byteLength, length);
    if (num(length[0]) >= buffer.byteLength) {
      buffer = new Uint8Array(num(length[0]) + 1);
      call('trtshim_engine_describe', h, buffer, buffer.byteLength, length);
    }
    return JSON.parse(new TextDecoder().decode(buffer.subarray(0, num(length[0]))));
  }

  serialize(options: { includeWeights?: boolean } = {}): Uint8Array {
    const h = this.#handle.get();
    const include = options.includeWeights === false ? 0 : 1;
    const size: unknown[] = [0];
    call('trtshim_engine_serialized_size', h, include, size);
    const buffer = new Uint8Array(num(size[0]));
    const written: unknown[] = [0];
    call('trtshim_engine_serialize', h, include, buffer, buffer.byteLength, written);
    return buffer.subarray(0, num(written[0]));
  }

  save(path: string, options: { includeWeights?: boolean } = {}): void {
    call('trtshim_engine_save', this.#handle.get(), path, options.includeWeights === false ? 0 : 1);
  }

  createContext(): ExecutionContext {
    return new ExecutionContext(createHandle('trtshim_context_create', this.#handle.get()), this.io());
  }

  createRefitter(): Refitter {
    return new Refitter(createHandle('trtshim_refitter_create', this.#handle.get()));
  }

  // ---- weight streaming (engines built with weightStreaming) ----

  /** Bytes of weights that can be streamed (0 for an engine built without weightStreaming). */
  streamableWeightBytes(): number {
    return this.#u64('trtshim_engine_streamable_weights_size');
  }

  /** The current weight streaming budget in bytes (a new engine's is its streamable total). */
  weightStreamingBudget(): number {
    return this.#u64('trtshim_engine_weight_streaming_budget');
  }

  /** Sets the budget, 0 .. streamableWeightBytes(). Throws a NativeError of status STATE while a run is in
   *  flight (and for an engine built without streaming); the budget is then unchanged. */
  setWeightStreamingBudget(bytes: number): void {
    if (!Number.isSafeInteger(bytes) || bytes < 0) {
      throw new NativeError('trtshim_engine_set_weight_streaming_budget', Status.ARGUMENT, 'Argument', `budget must be a whole number of bytes >= 0, got ${bytes}`);
    }
    call('trtshim_engine_set_weight_streaming_budget', this.#handle.get(), BigInt(bytes));
  }

  /** The engine's own choice of budget from the memory the system reports available. */
  automaticWeightStreamingBudget(): number {
    return this.#u64('trtshim_engine_weight_streaming_automatic_budget');
  }

  /** Memory a run needs beyond the budget at the current budget (the window). */
  weightStreamingScratchBytes(): number {
    return this.#u64('trtshim_engine_weight_streaming_scratch_size');
  }

  weightStreamingStats(): WeightStreamingStats {
    const raw: Record<string, unknown> = {};
    call('trtshim_engine_weight_streaming_stats', this.#handle.get(), raw);
    return {
      streamableBytes: num(raw.streamable_bytes),
      budgetBytes: num(raw.budget_bytes),
      residentBytes: num(raw.resident_bytes),
      streamedBytes: num(raw.streamed_bytes),
      windowBytes: num(raw.window_bytes),
      allocatedBytes: num(raw.allocated_bytes),
      peakBytes: num(raw.peak_bytes),
      copiedBytes: num(raw.copied_bytes),
      runs: num(raw.runs),
    };
  }

  #u64(fn: NativeFunctionName): number {
    const out: unknown[] = [0];
    call(fn, this.#handle.get(), out);
    return num(out[0]);
  }

  /** Runs once on a fresh context. */
  run(inputs: Record<string, HostTensor>): Record<string, Float32Array> {
    using context = this.createContext();
    return context.run(inputs);
  }

  /** Stages every update and applies them together (all or nothing). */
  refit(updates: ReadonlyArray<WeightUpdate>): void {
    using refitter = this.createRefitter();
    for (const u of updates) refitter.setWeights(u.layer, u.role, u.weights);
    refitter.apply();
  }

  [Symbol.dispose](): void {
    this.#handle.release();
  }
}

export class ExecutionContext implements Disposable {
  readonly #handle: Handle;
  readonly #io: readonly IoDesc[];
  // Buffers bound with setTensor: C keeps their pointers, so they must stay reachable.
  readonly #bound = new Map<string, HostTensor>();
  #running = 0;

  /** @internal use Engine.createContext. */
  constructor(handle: unknown, io: readonly IoDesc[]) {
    this.#handle = new Handle(handle, 'trtshim_context_destroy', 'ExecutionContext', this);
    this.#io = io;
  }

  setTensor(name: string, data: HostTensor): void {
    call('trtshim_context_set_tensor', this.#handle.get(), name, data, bytesOf(data));
    this.#bound.set(name, data);
  }

  execute(): void {
    call('trtshim_context_execute', this.#handle.get());
  }

  /** Executes on a worker thread; the bound buffers stay referenced here until it settles. Disposing the
   *  context before the promise settles is not allowed (it throws). */
  executeAsync(): Promise<void> {
    const handle = this.#handle.get();
    this.#running++;
    return new Promise<void>((resolve, reject) => {
      native('trtshim_context_execute').async(handle, (err: unknown, status: number) => {
        this.#running--;
        if (err) reject(err);
        else {
          try {
            check('trtshim_context_execute', status);
            resolve();
          } catch (e) {
            reject(e);
          }
        }
      });
    });
  }

  /** Binds the inputs and fresh output buffers, executes, and returns the outputs by name. */
  run(inputs: Record<string, HostTensor>): Record<string, Float32Array> {
    this.#handle.get();
    for (const [name, data] of Object.entries(inputs)) this.setTensor(name, data);
    const outputs: Record<string, Float32Array> = {};
    for (const d of this.#io) {
      if (d.isInput) continue;
      const buffer = new Float32Array(d.shape.reduce((a, b) => a * b, 1));
      this.setTensor(d.name, buffer);
      outputs[d.name] = buffer;
    }
    this.execute();
    return outputs;
  }

  [Symbol.dispose](): void {
    if (this.#running > 0) throw new Error('ExecutionContext disposed while an executeAsync is running');
    this.#handle.release();
    this.#bound.clear();
  }
}

export class Refitter implements Disposable {
  readonly #handle: Handle;
  // Staged values: C stores the pointers without copying until apply returns or the refitter dies.
  readonly #staged = new Map<string, ArrayBufferView>();

  /** @internal use Engine.createRefitter. */
  constructor(handle: unknown) {
    this.#handle = new Handle(handle, 'trtshim_refitter_destroy', 'Refitter', this);
  }

  setWeights(layer: string, role: WeightRole, weights: Weights): void {
    call('trtshim_refitter_set_weights', this.#handle.get(), layer, Role[role], nativeWeights(weights));
    this.#staged.set(`${layer}\u0000${role}`, weights.data);
  }

  /** Stages an already-quantized kernel: checked against the engine's format now, packed by apply without
   *  re-quantizing. Throws NativeError naming the weight on a mismatch (nothing is staged then). */
  setQuantizedWeights(layer: string, role: WeightRole, q: QuantizedWeights): void {
    const valuesDType = q.format === 'int8' ? DType.int8 : q.format === 'fp8_e4m3' ? DType.fp8_e4m3 : DType.uint8;
    // A typed array of the other signedness is viewed, not converted: the bytes are the codes.
    const values = { dtype: valuesDType, values: q.values.length === 0 ? new Uint8Array(1) : q.values, count: q.values.length };
    const scales = { dtype: DType.float32, values: q.scales.length === 0 ? new Float32Array(1) : q.scales, count: q.scales.length };
    const zeroPoints =
      q.zeroPoints === undefined ? null : { dtype: q.zeroPoints instanceof Int8Array ? DType.int8 : DType.int32, values: q.zeroPoints, count: q.zeroPoints.length };
    call('trtshim_refitter_set_quantized_weights', this.#handle.get(), layer, Role[role], q.format === 'int4' ? (q.groupSize ?? 0) : 0, values, scales, zeroPoints);
    this.#staged.set(`${layer}\u0000${role}`, q.values);
    this.#staged.set(`${layer}\u0000${role}\u0000scales`, q.scales);
  }

  setCheckFinite(check: boolean): void {
    call('trtshim_refitter_set_check_finite', this.#handle.get(), check ? 1 : 0);
  }

  missing(): Array<{ layer: string; role: WeightRole }> {
    const h = this.#handle.get();
    const count = [0];
    call('trtshim_refitter_missing_count', h, count);
    const out: Array<{ layer: string; role: WeightRole }> = [];
    for (let i = 0; i < count[0]; i++) {
      const name: unknown[] = [null];
      const role = [0];
      call('trtshim_refitter_missing', h, i, name, role);
      out.push({ layer: String(name[0]), role: roleName(role[0]) });
    }
    return out;
  }

  /** Runs every check apply would run on what is staged; changes nothing and keeps the staged weights
   *  (so a model of several engines can validate all before applying any). */
  validate(): void {
    call('trtshim_refitter_validate', this.#handle.get());
  }

  apply(): void {
    try {
      call('trtshim_refitter_apply', this.#handle.get());
    } finally {
      this.#staged.clear(); // C clears its staged pointers whether or not apply succeeded
    }
  }

  [Symbol.dispose](): void {
    this.#handle.release();
    this.#staged.clear();
  }
}

/** Reads an engine file into memory and deserializes it (Engine.load maps the file in C instead). */
export const readEngineFile = (path: string): Engine => Engine.deserialize(new Uint8Array(readFileSync(path)));

/** True for the error a refit or execute raises when the engine state forbids it. */
export const isStateError = (e: unknown): boolean => e instanceof NativeError && e.status === Status.STATE;
