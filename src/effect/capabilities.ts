/**
 * What the effect layer touches, passed in so tests substitute it: the transform evaluator, the native
 * refitter, fallback sessions, undo snapshots (file access), a progress sink and a clock.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import { Engine, type QuantizedWeights, type WeightKernelFormat } from '../../ffi/engine.js';
import { native } from '../../ffi/library.js';
import { evaluateExprNative, mergeLoraNative } from '../../ffi/transform.js';
import { checkAdapterTargets, mergeAdapters, type LoraErrorDetail, type WeightedAdapter } from '../lora/lora.js';
import type { TensorStore } from '../weightmap/store.js';
import type { Weights, WeightRole } from '../network/types.js';
import type { Expr } from '../weightmap/expr.js';
import { evaluateExpr, type EvalError, type F32Tensor, type SourceLookup } from '../weightmap/evaluate.js';
import { openOrtSession, type SessionOpener } from '../model/fallback.js';
import { readBlob } from '../model/file.js';
import type { EngineOrigin } from '../model/model.js';
import { heldQuantizedDigest, heldValueDigest, type HeldForm } from '../verify/expected.js';

/** The refitter calls the effect uses (ffi's Refitter has them). */
export interface RefitterLike extends Disposable {
  setWeights(layer: string, role: WeightRole, weights: Weights): void;
  setCheckFinite(check: boolean): void;
  /** Quantized values and scales for a kernel of the same format (a quantized checkpoint's copy path). */
  setQuantizedWeights?(layer: string, role: WeightRole, weights: QuantizedWeights): void;
  missing(): Array<{ layer: string; role: WeightRole }>;
  validate(): void;
  apply(): void;
}

export interface RefitProgress {
  readonly phase: 'fallback' | 'engine' | 'verify' | 'done';
  /** Targets staged so far, of `total` changed targets. */
  readonly done: number;
  readonly total: number;
  readonly bytesDone: number;
  readonly bytesTotal: number;
  readonly target?: string;
  readonly elapsedMs: number;
}

/** A saved engine state that can be read back as a new engine. */
export interface Snapshot {
  restore(): Promise<Engine>;
  discard(): Promise<void>;
}

export interface SnapshotStore {
  /** Saves an engine's state (with weights) before a refit changes it. */
  save(segment: number, engine: Engine): Promise<Snapshot>;
  /** The engine as a blob of a .trtr file holds it (when the engine still equals that blob). */
  fromOrigin(origin: EngineOrigin): Snapshot;
}

/** A value staged into an engine weight, as the read-back check sees it. */
export type StagedValue =
  | { readonly kind: 'float'; readonly layer: string; readonly role: WeightRole; readonly shape: readonly number[]; readonly data: Float32Array }
  | { readonly kind: 'quantized'; readonly layer: string; readonly role: WeightRole; readonly weights: QuantizedWeights };

/** Read-back verification: after every engine is applied, each weight the refit staged must report the
 *  digest expected for the value staged. */
export interface ReadbackCapability {
  /** Digests of the network-level values the engine's kernels hold, by `${layer}\u0000${role}` ('c1:' +
   *  hex): Engine.weightDigests(). Throws (or returns undefined) when the engine cannot report. */
  readonly engineDigests: (segment: number, engine: Engine, only?: ReadonlySet<string>) => ReadonlyMap<string, string> | undefined;
  /** The digest the engine should report once `value` is applied, at the precision and kernel format the
   *  engine holds that weight in (src/verify: heldValueDigest); undefined when that cannot be told here
   *  (the weight is then not compared, and the report says the refit was not fully verified). Called while
   *  the value is staged. */
  readonly expectedDigest: (segment: number, engine: Engine, value: StagedValue) => string | undefined;
}

/** How an engine holds a weight: what the digest it reports depends on (Engine.heldForms(): precision,
 *  kernel format, and the packed layout of GEMM and convolution operands). */
export type HeldFormat = HeldForm;

/** The digest an engine holding a weight in `held` should report once `value` is applied: packed kernels
 *  rounded to the engine's precision or quantized and dequantized by the TypeScript reference
 *  (src/verify: heldValueDigest); already-quantized copies dequantized (heldQuantizedDigest). */
export const heldDigest = (value: StagedValue, held: HeldFormat | undefined): string | undefined => {
  if (held === undefined) return undefined;
  if (value.kind === 'float') return heldValueDigest(value.data, held);
  return held.packed === undefined ? undefined : heldQuantizedDigest(value.weights, held);
};

/** Read-back on libtrtshim's engines: Engine.weightDigests() for what an engine holds, and `expected` for the
 *  digest a staged value should give as the engine holds it (default heldDigest, with the engine's
 *  heldForms()). An engine that cannot report fails the refit (ReadbackMismatch). */
export const nativeReadback = (expected: (value: StagedValue, held: HeldFormat | undefined) => string | undefined = heldDigest): ReadbackCapability => {
  const forms = new WeakMap<Engine, ReadonlyMap<string, HeldForm>>();
  const heldFormat = (engine: Engine, layer: string, role: WeightRole): HeldFormat | undefined => {
    let known = forms.get(engine);
    if (known === undefined) {
      known = engine.heldForms();
      forms.set(engine, known);
    }
    return known.get(`${layer}\u0000${role}`);
  };
  return {
    engineDigests: (_segment, engine, only) => engine.weightDigests(only !== undefined ? { only } : {}),
    expectedDigest: (_segment, engine, value) => expected(value, heldFormat(engine, value.layer, value.role)),
  };
};

export interface EffectCapabilities {
  /** Computes a target's value from checkpoint tensors. The TypeScript reference evaluator by default. */
  readonly transform: (expr: Expr, lookup: SourceLookup) => E.Either<EvalError, F32Tensor>;
  /** A refitter on an engine segment's engine. */
  readonly refitter: (segment: number, engine: Engine) => RefitterLike;
  /** Opens an ONNX Runtime session for a fallback segment's new model bytes. */
  readonly openSession: SessionOpener;
  readonly snapshots: SnapshotStore;
  readonly onProgress?: (p: RefitProgress) => void;
  /** Milliseconds, monotonic. */
  readonly clock: () => number;
  /** Read-back verification (EffectOptions.readback). Absent: the engines cannot be read back, the refit is
   *  not verified that way and the report says so (readback.verified false). */
  readonly readback?: ReadbackCapability;
}

/** Engine snapshots as engine files in a private temporary directory (written by libtrtshim itself, so
 *  no engine bytes pass through JavaScript memory). */
export const temporarySnapshots = (): SnapshotStore => ({
  save: async (segment, engine) => {
    const directory = await mkdtemp(join(tmpdir(), 'trt-refit-undo-'));
    const path = join(directory, `segment${segment}.engine`);
    try {
      engine.save(path);
    } catch (e) {
      await rm(directory, { recursive: true, force: true });
      throw e;
    }
    return {
      restore: async () => Engine.load(path),
      discard: () => rm(directory, { recursive: true, force: true }),
    };
  },
  fromOrigin: (origin) => ({
    restore: async () => Engine.deserialize(await readBlob(origin.path, origin.blob, origin.identity)),
    discard: async () => undefined,
  }),
});

/** True when the loaded libtrtshim has the transform kernels (ffi/transform.ts). */
export const nativeTransformsAvailable = (): boolean => {
  try {
    native('trtshim_transform_permute');
    return true;
  } catch {
    return false;
  }
};

/** The weight map's evaluator: libtrtshim's kernels where the library has them (the same bits as the
 *  TypeScript reference, which tests check), else the TypeScript reference itself. */
export const defaultTransform = (): EffectCapabilities['transform'] => (nativeTransformsAvailable() ? (expr, lookup) => evaluateExprNative(expr, lookup) : evaluateExpr);

/** LoRA merging, native where available (bit for bit as mergeAdapters). */
export const defaultMerge = (): ((base: TensorStore, adapters: readonly WeightedAdapter[]) => E.Either<LoraErrorDetail, TensorStore>) =>
  nativeTransformsAvailable() ? (base, adapters) => E.chain(() => mergeLoraNative(base, adapters))(checkAdapterTargets(base, adapters)) : mergeAdapters;

export const defaultCapabilities = (overrides: Partial<EffectCapabilities> = {}): EffectCapabilities => ({
  transform: defaultTransform(),
  refitter: (_segment, engine) => engine.createRefitter(),
  openSession: openOrtSession,
  snapshots: temporarySnapshots(),
  clock: () => performance.now(),
  readback: nativeReadback(),
  ...overrides,
});
