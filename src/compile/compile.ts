/**
 * The compile step: an ONNX file and its build checkpoint -> a RefitModel (src/model), ready to run,
 * refit and save as a .trtr file.
 *
 *   read ONNX + checkpoint -> prepareForRefit (restore dropped zero biases; untie shared initializers)
 *   -> analyze -> partition -> weight map against the build checkpoint (unmapped refittable weights are an
 *   error unless allowed) -> lower and build each engine segment natively, encode and open each fallback
 *   segment -> record the source digests every target holds.
 *
 * The pure part (`planCompile`) ends at the lowered segments and the map; `compileTE` adds the files and
 * the native library. Engines are built with an EngineBuilder capability (tests substitute it).
 */
import { readFile } from 'node:fs/promises';
import { dirname } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import * as TE from 'fp-ts/lib/TaskEither.js';
import { pipe } from 'fp-ts/lib/function.js';
import { buildEngine, type BuildOptions, type Engine } from '../../ffi/engine.js';
import { openCheckpointTE, type Checkpoint } from '../checkpoint/checkpoint.js';
import { describeCheckpointIssue } from '../checkpoint/errors.js';
import { decodeOnnx } from '../trace/decode.js';
import { directoryResolver } from '../trace/load.js';
import { analyzeGraph, type AnalyzedGraph } from '../trace/analyze.js';
import { describeTraceError } from '../trace/errors.js';
import { partitionGraph, type PartitionOptions, type Segment } from '../partition/index.js';
import { lowerContext, lowerSegment, type LoweredSegment } from '../network/lower.js';
import { encodeSegmentModel } from '../fallback/model.js';
import { prepareForRefit } from '../weightmap/prepare.js';
import { nodeScopes } from '../weightmap/scopes.js';
import { buildWeightMap, describeWeightMapError, type WeightMap, type WeightMapErrorDetail } from '../weightmap/map.js';
import type { TensorStore } from '../weightmap/store.js';
import type { NetworkDefinition } from '../network/types.js';
import { FallbackRunner, openOrtSession, type SessionOpener } from '../model/fallback.js';
import { RefitModel, type Stage } from '../model/model.js';
import type { BuildInfo, PartitionReport, TensorDesc } from '../model/format.js';
import { compileWithCacheTE } from '../cache/compile.js';
import type { CacheKey } from '../cache/key.js';
import type { Blob, CacheStore } from '../cache/store.js';
import { formatWeightFormat, weightFormatOptions, type WeightFormat } from '../quant/format.js';
import { cacheStoreOf, entryBlobs, loadingBuilder, planKey, recordingBuilder, segmentPositions, type CompileCacheOption } from './cached.js';

export type WeightPrecision = 'float32' | 'float16' | 'bfloat16';

export interface CompileOptions extends PartitionOptions {
  /** Build even when refittable weights have no checkpoint source (they keep their built values). */
  readonly allowUnmapped?: boolean;
  /** Precision of float weights: every weight when no quantized weightFormat is given, else the weights
   *  that stay float (norms, embeddings, biases). Default float32. */
  readonly weightPrecision?: WeightPrecision;
  /** Format of GEMM and convolution kernels (`--weight-format`): fp32 / fp16 / bf16 are the float
   *  precisions (the same as weightPrecision, which must then agree or be absent); int8, fp8 and
   *  int4 quantize those kernels inside the engine, and refits re-quantize them. Default fp32. */
  readonly weightFormat?: WeightFormat;
  /** Convolution kernels only: 'float' keeps them in weightPrecision while GEMMs take weightFormat.
   *  Default: as weightFormat. */
  readonly convWeightFormat?: 'same' | 'float';
  readonly tacticSearch?: boolean;
  readonly numThreads?: number;
  /** Build engines whose weights can stream under a memory budget (src/streaming; `run --weight-budget`). */
  readonly weightStreaming?: boolean;
  /** The engine cache (cached.ts): a directory, an open store, or false / absent for none. */
  readonly cache?: CompileCacheOption;
}

export type CompileErrorDetail =
  | { readonly _tag: 'ModelUnreadable'; readonly path: string; readonly detail: string }
  | { readonly _tag: 'CheckpointUnreadable'; readonly path: string; readonly detail: string }
  | { readonly _tag: 'TraceFailed'; readonly path: string; readonly detail: string }
  | { readonly _tag: 'PartitionFailed'; readonly detail: string }
  | { readonly _tag: 'LowerFailed'; readonly segment: number; readonly detail: string }
  | { readonly _tag: 'UnmappedWeights'; readonly weights: readonly { readonly id: string; readonly reason: string }[] }
  | { readonly _tag: 'WeightMapFailed'; readonly detail: string }
  | { readonly _tag: 'ConstantOutput'; readonly output: string }
  | { readonly _tag: 'BuildFailed'; readonly segment: number; readonly detail: string }
  | { readonly _tag: 'CacheFailed'; readonly step: string; readonly detail: string }
  | { readonly _tag: 'ConflictingOptions'; readonly detail: string };

export const describeCompileError = (e: CompileErrorDetail): string => {
  switch (e._tag) {
    case 'ModelUnreadable': return `${e.path}: cannot read the ONNX model: ${e.detail}`;
    case 'CheckpointUnreadable': return `${e.path}: cannot read the build checkpoint: ${e.detail}`;
    case 'TraceFailed': return `${e.path}: ${e.detail}`;
    case 'PartitionFailed': return `partition: ${e.detail}`;
    case 'LowerFailed': return `engine segment ${e.segment} cannot be lowered: ${e.detail}`;
    case 'UnmappedWeights': return `${describeWeightMapError({ _tag: 'UnmappedWeights', weights: e.weights })} (pass allowUnmapped / --allow-unmapped to build anyway)`;
    case 'WeightMapFailed': return `weight map: ${e.detail}`;
    case 'ConstantOutput': return `model output '${e.output}' is a constant of the graph; a compiled model needs every output computed`;
    case 'BuildFailed': return `engine segment ${e.segment}: the engine build failed: ${e.detail}`;
    case 'CacheFailed': return `engine cache: ${e.step} failed: ${e.detail}`;
    case 'ConflictingOptions': return `compile options: ${e.detail}`;
  }
};

export class CompileError extends Error {
  override readonly name = 'CompileError';
  readonly _tag: CompileErrorDetail['_tag'];
  constructor(readonly detail: CompileErrorDetail) {
    super(describeCompileError(detail));
    this._tag = detail._tag;
  }
}

/** What the pure part of the compile step produces. */
export interface CompilePlan {
  readonly analyzed: AnalyzedGraph;
  readonly segments: readonly { readonly segment: Segment; readonly lowered?: LoweredSegment }[];
  readonly weightMap: WeightMap;
  readonly partition: PartitionReport;
  readonly tensors: readonly TensorDesc[];
}

const weightMapFailure = (e: WeightMapErrorDetail): CompileErrorDetail =>
  e._tag === 'UnmappedWeights' ? e : { _tag: 'LowerFailed', segment: e.segment, detail: e.reason };

/** Trace (prepared for refit), partition, lower and map: pure, ONNX bytes and checkpoint in. */
export const planCompile = (path: string, onnx: Uint8Array, checkpoint: TensorStore, options: CompileOptions = {}): E.Either<CompileErrorDetail, CompilePlan> => {
  const decoded = decodeOnnx(onnx, directoryResolver(dirname(path)));
  if (E.isLeft(decoded)) return E.left({ _tag: 'TraceFailed', path, detail: describeTraceError(decoded.left) });
  const analyzedOr = analyzeGraph(prepareForRefit(decoded.right, checkpoint));
  if (E.isLeft(analyzedOr)) return E.left({ _tag: 'TraceFailed', path, detail: describeTraceError(analyzedOr.left) });
  const analyzed = analyzedOr.right;
  const ctx = lowerContext(analyzed);
  const parted = partitionGraph(analyzed, options, ctx);
  if (E.isLeft(parted)) return E.left({ _tag: 'PartitionFailed', detail: `${parted.left.option}: ${parted.left.reason}` });
  for (const output of analyzed.graph.outputs) if (analyzed.constants.has(output)) return E.left({ _tag: 'ConstantOutput', output });
  const map = buildWeightMap({ analyzed, segments: parted.right.segments, checkpoint, scopes: nodeScopes(onnx) }, { allowUnmapped: options.allowUnmapped ?? false });
  if (E.isLeft(map)) return E.left(weightMapFailure(map.left));
  const live = parted.right.segments.filter((s) => s.outputs.length > 0); // dead segments never run
  const segments: { segment: Segment; lowered?: LoweredSegment }[] = [];
  for (const segment of live) {
    if (segment.kind === 'fallback') {
      segments.push({ segment });
      continue;
    }
    const lowered = lowerSegment(ctx, segment);
    if (E.isLeft(lowered)) return E.left({ _tag: 'LowerFailed', segment: segment.index, detail: JSON.stringify(lowered.left) });
    segments.push({ segment, lowered: lowered.right });
  }
  const boundary = new Set<string>([...analyzed.graph.inputs.map((i) => i.name), ...analyzed.graph.outputs, ...live.flatMap((s) => [...s.inputs, ...s.outputs])]);
  const tensors = [...boundary].sort().map((name) => {
    const type = analyzed.types.get(name)!;
    return { name, dtype: type.dtype, shape: [...type.shape] };
  });
  const partition: PartitionReport = {
    segments: live.map((s) => ({ index: s.index, kind: s.kind, nodes: s.nodes.length, opTypes: [...new Set(s.nodes.map((n) => n.opType))] })),
    folded: parted.right.folded.length,
    fallbackReasons: [...parted.right.fallbackReasons].map(([node, reason]) => ({ node, reason })),
  };
  return E.right({ analyzed, segments, weightMap: map.right, partition, tensors });
};

/** Builds one engine segment's network (the native library by default). */
export type EngineBuilder = (network: NetworkDefinition, segment: number, options: BuildOptions) => Engine;
export const nativeBuilder: EngineBuilder = (network, _segment, options) => buildEngine(network, options);

export interface CompileCapabilities {
  readonly buildEngine?: EngineBuilder;
  readonly openSession?: SessionOpener;
}

const floatFormatOf: Readonly<Record<WeightPrecision, WeightFormat>> = { float32: { kind: 'fp32' }, float16: { kind: 'fp16' }, bfloat16: { kind: 'bf16' } };
const precisionOfFloat = { fp32: 'float32', fp16: 'float16', bf16: 'bfloat16' } as const;

/** The weight settings a compile builds with, one story for weightPrecision and weightFormat: a float
 *  weightFormat is a precision, so a different weightPrecision beside it is a conflict; a quantized one
 *  leaves weightPrecision to the weights that stay float. */
export interface WeightSettings {
  readonly weightPrecision: WeightPrecision;
  readonly weightFormat: WeightFormat;
  readonly convWeightFormat: 'same' | 'float';
}

export const weightSettingsOf = (options: CompileOptions = {}): E.Either<CompileErrorDetail, WeightSettings> => {
  const format = options.weightFormat;
  const conv = options.convWeightFormat ?? 'same';
  if (format === undefined || format.kind === 'fp32' || format.kind === 'fp16' || format.kind === 'bf16') {
    const fromFormat = format === undefined ? undefined : precisionOfFloat[format.kind];
    if (fromFormat !== undefined && options.weightPrecision !== undefined && options.weightPrecision !== fromFormat) {
      return E.left({ _tag: 'ConflictingOptions', detail: `weight format ${formatWeightFormat(format!)} is precision ${fromFormat}, but weightPrecision (--precision) says ${options.weightPrecision}` });
    }
    const precision = fromFormat ?? options.weightPrecision ?? 'float32';
    return E.right({ weightPrecision: precision, weightFormat: floatFormatOf[precision], convWeightFormat: conv });
  }
  return E.right({ weightPrecision: options.weightPrecision ?? 'float32', weightFormat: format, convWeightFormat: conv });
};

const isQuantized = (f: WeightFormat): boolean => f.kind === 'int8' || f.kind === 'fp8' || f.kind === 'int4';

const settingsOrThrow = (options: CompileOptions): WeightSettings => {
  const s = weightSettingsOf(options);
  if (E.isLeft(s)) throw new CompileError(s.left);
  return s.right;
};

/** The engine build options a compile uses (they are part of the cache key). Throws CompileError on
 *  conflicting weight options (compileTE checks them first and answers Left). */
export const engineBuildOptions = (options: CompileOptions = {}): BuildOptions => {
  const settings = settingsOrThrow(options);
  const quantized = isQuantized(settings.weightFormat);
  return {
    refittable: true,
    ...(settings.weightPrecision !== 'float32' ? { weightPrecision: settings.weightPrecision } : {}),
    ...(quantized ? weightFormatOptions(settings.weightFormat) : {}),
    ...(quantized && settings.convWeightFormat === 'float' ? { convWeightFormat: 'asPrecision' as const } : {}),
    ...(options.tacticSearch !== undefined ? { tacticSearch: options.tacticSearch } : {}),
    ...(options.numThreads !== undefined ? { numThreads: options.numThreads } : {}),
    ...(options.weightStreaming === true ? { weightStreaming: true } : {}),
  };
};

/** What a .trtr records about how its engines were built. */
export const buildInfoOf = (options: CompileOptions, source: string): BuildInfo => {
  const settings = settingsOrThrow(options);
  return {
    weightPrecision: settings.weightPrecision, tacticSearch: options.tacticSearch ?? false, allowUnmapped: options.allowUnmapped ?? false, source,
    weightFormat: formatWeightFormat(settings.weightFormat),
    ...(isQuantized(settings.weightFormat) && settings.convWeightFormat === 'float' ? { convWeightFormat: 'float' as const } : {}),
    ...(options.weightStreaming === true ? { weightStreaming: true } : {}),
  };
};

/** Builds the engines and opens the fallbacks of a compile plan. */
export const realize = async (plan: CompilePlan, options: CompileOptions = {}, caps: CompileCapabilities = {}, source = ''): Promise<E.Either<CompileErrorDetail, RefitModel>> => {
  const settings = weightSettingsOf(options);
  if (E.isLeft(settings)) return settings;
  const build = caps.buildEngine ?? nativeBuilder;
  const buildOptions = engineBuildOptions(options);
  const { analyzed } = plan;
  const desc = (name: string): TensorDesc => {
    const type = analyzed.types.get(name)!;
    return { name, dtype: type.dtype, shape: [...type.shape] };
  };
  const stages: Stage[] = [];
  const release = () => {
    for (const s of stages) {
      if (s.kind === 'engine') {
        s.context[Symbol.dispose]();
        s.engine[Symbol.dispose]();
      } else s.runner[Symbol.dispose]();
    }
  };
  for (const { segment, lowered } of plan.segments) {
    const base = { index: segment.index, inputs: [...segment.inputs], outputs: [...segment.outputs] };
    try {
      if (lowered !== undefined) {
        const engine = build(lowered.network, segment.index, buildOptions);
        let context;
        try {
          context = engine.createContext();
        } catch (e) {
          engine[Symbol.dispose]();
          throw e;
        }
        stages.push({ kind: 'engine', record: { kind: 'engine', ...base, layers: lowered.network.layers.length, weights: lowered.weights.length }, engine, context, origin: undefined });
      } else {
        const initializers = new Map(segment.constants.map((c) => [c, analyzed.constants.get(c)!.tensor]));
        const bytes = encodeSegmentModel({
          name: `segment${segment.index}`, opset: analyzed.graph.opset, nodes: segment.nodes,
          inputs: segment.inputs.map((name) => ({ name, type: analyzed.types.get(name)! })),
          outputs: segment.outputs.map((name) => ({ name, type: analyzed.types.get(name)! })),
          initializers,
        });
        const runner = await FallbackRunner.open(segment.index, bytes, segment.inputs.map(desc), segment.outputs.map(desc), caps.openSession ?? openOrtSession);
        const inits = [...initializers].map(([name, t]) => ({ name, dtype: t.dtype, shape: [...t.shape] }));
        stages.push({ kind: 'fallback', record: { kind: 'fallback', ...base, initializers: inits }, runner });
      }
    } catch (e) {
      release();
      return E.left({ _tag: 'BuildFailed', segment: segment.index, detail: (e as Error).message });
    }
  }
  const current: Record<string, string> = {};
  for (const t of plan.weightMap.targets) if (t.status === 'mapped') current[t.id] = t.built.sourceDigest;
  const description = {
    inputs: analyzed.graph.inputs.map((i) => desc(i.name)),
    outputs: [...analyzed.graph.outputs],
    tensors: plan.tensors,
    partition: plan.partition,
    build: buildInfoOf(options, source),
    weightMap: plan.weightMap,
  } as const;
  return E.right(new RefitModel(description, current, stages));
};

const readOnnx = (path: string): TE.TaskEither<CompileErrorDetail, Uint8Array> =>
  TE.tryCatch(async () => new Uint8Array(await readFile(path)), (e) => ({ _tag: 'ModelUnreadable', path, detail: (e as Error).message }));

const openBuildCheckpoint = (path: string): TE.TaskEither<CompileErrorDetail, Checkpoint> =>
  pipe(openCheckpointTE(path), TE.mapLeft((issue) => ({ _tag: 'CheckpointUnreadable', path, detail: describeCheckpointIssue(issue) })));

/** Milliseconds each step of a compile took. */
export interface CompileTimings {
  /** Reading the ONNX file and opening the checkpoint. */
  readonly readMs: number;
  /** Trace, partition, weight map and lowering (planCompile). */
  readonly planMs: number;
  /** The cache key (0 without a cache). */
  readonly hashMs: number;
  /** Looking the key up, verifying the entry's checksums (0 without a cache). */
  readonly lookupMs: number;
  /** Hit: loading the stripped engines and refitting them, and opening the fallbacks. */
  readonly loadMs?: number;
  /** Miss: building the engines and opening the fallbacks. */
  readonly buildMs?: number;
  /** Miss: writing the entry. */
  readonly insertMs?: number;
  readonly totalMs: number;
}

/** A compiled model and how it was made. */
export interface CompileReport {
  readonly model: RefitModel;
  /** 'off': compiled without a cache. */
  readonly cache: 'hit' | 'miss' | 'off';
  /** The cache key's digest (with a cache). */
  readonly key?: string;
  /** Why a miss missed: absent, damaged, mismatch, or unloadable (the entry's engines could not serve). */
  readonly missReason?: string;
  readonly detail?: string;
  readonly timings: CompileTimings;
}

const since = (start: bigint): number => Number(process.hrtime.bigint() - start) / 1e6;

/** Realizes a plan through the cache: load and refit on a hit, build and insert on a miss. */
const realizeCached = async (plan: CompilePlan, store: CacheStore | undefined, options: CompileOptions, caps: CompileCapabilities, source: string): Promise<E.Either<CompileErrorDetail, Omit<CompileReport, 'timings'> & { timings: Omit<CompileTimings, 'readMs' | 'planMs'> }>> => {
  const buildOptions = engineBuildOptions(options);
  const positions = segmentPositions(plan);
  let key: CacheKey | undefined;
  const keyOf = () => (key ??= planKey(plan, buildOptions));
  // realize answers Left; the driver wants a throw, so a Left travels inside this and comes out again.
  class Failed extends Error {
    constructor(readonly detail: CompileErrorDetail) {
      super(describeCompileError(detail));
    }
  }
  const orThrow = (r: E.Either<CompileErrorDetail, RefitModel>): RefitModel => {
    if (E.isLeft(r)) throw new Failed(r.left);
    return r.right;
  };
  const r = await compileWithCacheTE<RefitModel>(store, {
    key: keyOf,
    build: async () => {
      const blobs: Blob[] = [];
      const builder = store === undefined ? (caps.buildEngine ?? nativeBuilder) : recordingBuilder(caps.buildEngine ?? nativeBuilder, positions, blobs);
      const value = orThrow(await realize(plan, options, { ...caps, buildEngine: builder }, source));
      return { value, blobs: store === undefined ? [] : [...blobs, ...entryBlobs(keyOf(), plan)] };
    },
    load: async (entry) => orThrow(await realize(plan, options, { ...caps, buildEngine: loadingBuilder(entry, keyOf(), positions) }, source)),
  })();
  if (E.isLeft(r)) {
    const { step, error } = r.left;
    if (error instanceof Failed) return E.left(error.detail);
    return E.left({ _tag: 'CacheFailed', step, detail: error instanceof Error ? error.message : String(error) });
  }
  const { value, cache, missReason, detail, timings } = r.right;
  return E.right({
    model: value, cache,
    ...(key !== undefined && cache !== 'off' ? { key: key.digest } : {}),
    ...(missReason !== undefined ? { missReason } : {}),
    ...(detail !== undefined ? { detail } : {}),
    timings: {
      hashMs: timings.hashMs, lookupMs: timings.lookupMs, totalMs: timings.totalMs,
      ...(timings.loadMs !== undefined ? { loadMs: timings.loadMs } : {}),
      ...(timings.buildMs !== undefined ? { buildMs: timings.buildMs } : {}),
      ...(timings.insertMs !== undefined ? { insertMs: timings.insertMs } : {}),
    },
  });
};

/** Compiles an ONNX file with its build checkpoint into a RefitModel, through the engine cache when
 *  `options.cache` names one, and says how (hit, miss or off) and how long each step took. */
export const compileWithReportTE = (onnxPath: string, checkpointPath: string, options: CompileOptions = {}, caps: CompileCapabilities = {}): TE.TaskEither<CompileErrorDetail, CompileReport> => async () => {
  const start = process.hrtime.bigint();
  const settings = weightSettingsOf(options);
  if (E.isLeft(settings)) return settings;
  const read = await pipe(
    TE.Do,
    TE.bind('onnx', () => readOnnx(onnxPath)),
    TE.bind('checkpoint', () => openBuildCheckpoint(checkpointPath)),
  )();
  if (E.isLeft(read)) return read;
  const readMs = since(start);
  const { onnx, checkpoint } = read.right;
  try {
    const t0 = process.hrtime.bigint();
    const plan = planCompile(onnxPath, onnx, checkpoint, options);
    if (E.isLeft(plan)) return plan;
    const planMs = since(t0);
    const realized = await realizeCached(plan.right, cacheStoreOf(options.cache), options, caps, onnxPath);
    return E.isLeft(realized) ? realized : E.right({ ...realized.right, timings: { readMs, planMs, ...realized.right.timings, totalMs: since(start) } });
  } finally {
    checkpoint.close();
  }
};

export const compileWithReport = async (onnxPath: string, checkpointPath: string, options: CompileOptions = {}, caps: CompileCapabilities = {}): Promise<CompileReport> => {
  const r = await compileWithReportTE(onnxPath, checkpointPath, options, caps)();
  if (E.isLeft(r)) throw new CompileError(r.left);
  return r.right;
};

/** Compiles an ONNX file with its build checkpoint into a RefitModel (in memory; see writeModelFile). */
export const compileTE = (onnxPath: string, checkpointPath: string, options: CompileOptions = {}, caps: CompileCapabilities = {}): TE.TaskEither<CompileErrorDetail, RefitModel> =>
  pipe(compileWithReportTE(onnxPath, checkpointPath, options, caps), TE.map((r) => r.model));

/** Compiles; rejects with CompileError (UnmappedWeights lists every weight without a source). */
export const compile = async (onnxPath: string, checkpointPath: string, options: CompileOptions = {}, caps: CompileCapabilities = {}): Promise<RefitModel> => {
  const r = await compileTE(onnxPath, checkpointPath, options, caps)();
  if (E.isLeft(r)) throw new CompileError(r.left);
  return r.right;
};
