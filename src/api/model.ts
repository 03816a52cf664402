/**
 * The public API over the stages: compile, load, save, planRefit, refit, run. Thin wrappers: src/compile
 * compiles, src/model reads and writes .trtr files, src/plan plans, src/effect refits. What this layer
 * adds: one handle (`Model`, disposable both ways), one error class (TrtRefitError), AbortSignal and
 * progress on the long calls, and the TaskEither form of each call beside its Promise form.
 */
import * as E from 'fp-ts/lib/Either.js';
import * as TE from 'fp-ts/lib/TaskEither.js';
import { pipe } from 'fp-ts/lib/function.js';
import { compileTE as compileModelTE, nativeBuilder, type CompileCapabilities, type CompileOptions } from '../compile/compile.js';
import type { RefitProgress } from '../effect/capabilities.js';
import { fusedGroupsOf } from '../effect/groups.js';
import type { VerifyOptions, RefitReport } from '../effect/effect.js';
import { openWeightsTE, planFileTE, refitModelTE, type WeightsSpec } from '../effect/files.js';
import { readModelFileTE, writeModelFileTE, type WriteSummary } from '../model/file.js';
import { ModelRunError, type RefitModel } from '../model/model.js';
import type { PartitionReport, TensorDesc } from '../model/format.js';
import { planRefit as planPure, type RefitPlan } from '../plan/plan.js';
import type { Tensor, TensorData } from '../trace/ir.js';
import { coverage as mapCoverage, type Coverage, type WeightMap } from '../weightmap/map.js';
import { TrtRefitError, type ApiErrorDetail } from './errors.js';

/** Progress of a compile: after reading, after each engine segment is built, at the end. */
export interface CompileProgress {
  readonly operation: 'compile';
  readonly phase: 'read' | 'build' | 'done';
  /** Engine segments built so far. */
  readonly enginesBuilt: number;
  /** The engine segment just built (phase 'build'). */
  readonly segment?: number;
  readonly elapsedMs: number;
}

/** Progress of a refit: the effect's own events (weights and bytes staged of the changed total). */
export type RefitProgressEvent = { readonly operation: 'refit' } & RefitProgress;

export type Progress = CompileProgress | RefitProgressEvent;

/** What every long call takes. An abort leaves everything as it was and rejects with tag 'Aborted'. */
export interface LongCallOptions {
  readonly signal?: AbortSignal;
  readonly onProgress?: (progress: Progress) => void;
}

/** A checkpoint path, or a checkpoint with LoRA adapters merged on top (`{ checkpoint, lora: [{ path, weight }] }`). */
export type WeightsInput = string | WeightsSpec;

const specOf = (weights: WeightsInput): WeightsSpec => (typeof weights === 'string' ? { checkpoint: weights } : weights);

/** A compiled model in memory: engine segments on the native engine, fallback segments on ONNX Runtime. */
export class Model implements Disposable, AsyncDisposable {
  constructor(
    /** The underlying compiled model (src/model), for the stage-level functions. */
    readonly compiled: RefitModel,
  ) {}

  get inputs(): readonly TensorDesc[] {
    return this.compiled.inputs;
  }
  get outputs(): readonly string[] {
    return this.compiled.outputs;
  }
  /** Every engine weight and fallback initializer as an expression over checkpoint tensors. */
  get weightMap(): WeightMap {
    return this.compiled.weightMap;
  }
  /** Segments and why operators fell back to ONNX Runtime. */
  get partition(): PartitionReport {
    return this.compiled.description.partition;
  }
  /** How many weights are mapped, graph constants, unmapped. */
  coverage(): Coverage {
    return mapCoverage(this.compiled.weightMap);
  }
  get disposed(): boolean {
    return this.compiled.disposed;
  }

  run(inputs: Readonly<Record<string, Tensor | TensorData>>): Promise<Record<string, Tensor>> {
    return run(this, inputs);
  }
  planRefit(weights: WeightsInput): Promise<RefitPlan> {
    return planRefit(this, weights);
  }
  refit(weights: WeightsInput, options: RefitOptions = {}): Promise<RefitResult> {
    return refit(this, weights, options);
  }
  save(path: string): Promise<WriteSummary> {
    return save(this, path);
  }

  [Symbol.dispose](): void {
    this.compiled[Symbol.dispose]();
  }
  async [Symbol.asyncDispose](): Promise<void> {
    this.compiled[Symbol.dispose]();
  }
}

const rejecting = async <A>(task: TE.TaskEither<ApiErrorDetail, A>): Promise<A> => {
  const r = await task();
  if (E.isLeft(r)) throw new TrtRefitError(r.left);
  return r.right;
};

const aborted = (signal: AbortSignal | undefined): boolean => signal?.aborted === true;

// ---- compile ------------------------------------------------------------------------------------

export interface ApiCompileOptions extends CompileOptions, LongCallOptions {
  /** Substitutes for the engine builder and fallback sessions (tests; a cache wiring). */
  readonly capabilities?: CompileCapabilities;
}

/** Compiles an ONNX file with the checkpoint it was exported with. */
export const compileTE = (onnxPath: string, checkpointPath: string, options: ApiCompileOptions = {}): TE.TaskEither<ApiErrorDetail, Model> => async () => {
  const { signal, onProgress, capabilities = {}, ...compileOptions } = options;
  const started = performance.now();
  let built = 0;
  const progress = (phase: CompileProgress['phase'], segment?: number) =>
    onProgress?.({ operation: 'compile', phase, enginesBuilt: built, ...(segment !== undefined ? { segment } : {}), elapsedMs: performance.now() - started });
  if (aborted(signal)) return E.left({ _tag: 'Aborted', operation: 'compile' });
  const build = capabilities.buildEngine ?? nativeBuilder;
  let first = true;
  const result = await compileModelTE(onnxPath, checkpointPath, compileOptions, {
    ...capabilities,
    // Engines are built one segment at a time: a place to report progress and to stop.
    buildEngine: (network, segment, buildOptions) => {
      if (first) progress('read');
      first = false;
      if (aborted(signal)) throw new Error('aborted');
      const engine = build(network, segment, buildOptions);
      built++;
      progress('build', segment);
      return engine;
    },
  })();
  if (aborted(signal)) {
    if (E.isRight(result)) result.right[Symbol.dispose]();
    return E.left({ _tag: 'Aborted', operation: 'compile' });
  }
  if (E.isLeft(result)) return E.left({ _tag: 'Compile', detail: result.left });
  if (first) progress('read');
  progress('done');
  return E.right(new Model(result.right));
};

/** Compiles an ONNX file with the checkpoint it was exported with; rejects with TrtRefitError
 *  (`_tag` UnmappedWeights lists every weight without a checkpoint source; AmbiguousWeights names equal-valued
 *  candidates that evidence could not tell apart: settle them with the `map` option). */
export const compile = (onnxPath: string, checkpointPath: string, options: ApiCompileOptions = {}): Promise<Model> =>
  rejecting(compileTE(onnxPath, checkpointPath, options));

// ---- load / save --------------------------------------------------------------------------------

/** Reads a .trtr compiled model (checks every digest; builds no engine twice). */
export const loadTE = (path: string, options: { readonly signal?: AbortSignal } = {}): TE.TaskEither<ApiErrorDetail, Model> => async () => {
  if (aborted(options.signal)) return E.left({ _tag: 'Aborted', operation: 'load' });
  const read = await readModelFileTE(path)();
  if (E.isLeft(read)) return E.left({ _tag: 'ModelFile', detail: read.left });
  if (aborted(options.signal)) {
    read.right[Symbol.dispose]();
    return E.left({ _tag: 'Aborted', operation: 'load' });
  }
  return E.right(new Model(read.right));
};

/** Reads a .trtr compiled model; rejects with TrtRefitError (ModelFileUnreadable, ModelFileInvalid). */
export const load = (path: string, options: { readonly signal?: AbortSignal } = {}): Promise<Model> => rejecting(loadTE(path, options));

/** Writes a model as a .trtr file, atomically (a crash leaves the old file or the whole new one). */
export const saveTE = (model: Model, path: string): TE.TaskEither<ApiErrorDetail, WriteSummary> =>
  model.disposed ? TE.left({ _tag: 'Disposed' }) : pipe(writeModelFileTE(model.compiled, path), TE.mapLeft((detail): ApiErrorDetail => ({ _tag: 'ModelFile', detail })));

export const save = (model: Model, path: string): Promise<WriteSummary> => rejecting(saveTE(model, path));

// ---- plan ---------------------------------------------------------------------------------------

/** What a refit with `weights` would do, as data (a dry run). For a model in memory or a .trtr path
 *  (then only its header is read and no engine is built). */
export const planRefitTE = (model: Model | string, weights: WeightsInput): TE.TaskEither<ApiErrorDetail, RefitPlan> => {
  if (typeof model === 'string') return planFileTE(model, specOf(weights));
  if (model.disposed) return TE.left({ _tag: 'Disposed' });
  return pipe(
    openWeightsTE(specOf(weights)),
    TE.map((opened) => {
      try {
        return planPure(model.weightMap, opened.store, { current: model.compiled.current, fusedGroups: fusedGroupsOf(model.compiled) });
      } finally {
        opened.close();
      }
    }),
  );
};

export const planRefit = (model: Model | string, weights: WeightsInput): Promise<RefitPlan> => rejecting(planRefitTE(model, weights));

// ---- refit --------------------------------------------------------------------------------------

export interface RefitOptions extends LongCallOptions {
  /** Probe inputs run after the refit; the refit is undone unless the outputs pass the check. */
  readonly verify?: VerifyOptions;
  /** Bytes staged in refitters at once (default twice the largest changed weight). */
  readonly stagingBytes?: number;
  /** Refuse non-finite values (default true). */
  readonly checkFinite?: boolean;
}

export interface RefitResult {
  readonly plan: RefitPlan;
  readonly report: RefitReport;
}

/** Changes the model's weights in place: only weights whose checkpoint tensors changed move; all or
 *  nothing across engines and fallbacks. */
export const refitTE = (model: Model, weights: WeightsInput, options: RefitOptions = {}): TE.TaskEither<ApiErrorDetail, RefitResult> => {
  if (model.disposed) return TE.left({ _tag: 'Disposed' });
  const { onProgress, ...effect } = options;
  return refitModelTE(model.compiled, specOf(weights), {
    ...effect,
    ...(onProgress ? { capabilities: { onProgress: (p: RefitProgress) => onProgress({ operation: 'refit', ...p }) } } : {}),
  });
};

/** Refits; rejects with TrtRefitError (PlanHasErrors, Aborted, NonFiniteValues, ...) leaving the model as it was. */
export const refit = (model: Model, weights: WeightsInput, options: RefitOptions = {}): Promise<RefitResult> => rejecting(refitTE(model, weights, options));

// ---- run ----------------------------------------------------------------------------------------

/** Runs the model; inputs by name, as tensors or bare typed arrays (which take the declared shapes). */
export const runTE = (model: Model, inputs: Readonly<Record<string, Tensor | TensorData>>): TE.TaskEither<ApiErrorDetail, Record<string, Tensor>> =>
  TE.tryCatch(
    () => model.compiled.run(inputs),
    (e): ApiErrorDetail => (e instanceof ModelRunError ? { _tag: 'Run', detail: e.detail } : { _tag: 'RunFailed', detail: (e as Error).message }),
  );

export const run = (model: Model, inputs: Readonly<Record<string, Tensor | TensorData>>): Promise<Record<string, Tensor>> => rejecting(runTE(model, inputs));
