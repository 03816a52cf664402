/**
 * The compile step: an ONNX file and its build checkpoint -> a RefitModel (src/model), ready to run,
 * refit and save as a .trtr file.
 *
 *   read ONNX + checkpoint -> prepareForRefit (restore dropped zero biases; untie shared initializers)
 *   -> analyze -> partition -> weight map against the build checkpoint (unmapped refittable weights are an
 *   error unless allowed) -> every mapped weight set to its expression over the build checkpoint
 *   (withCheckpointValues: engines and fallbacks hold the checkpoint's values, not the ONNX file's, and the
 *   report lists where the two differ) -> lower and build each engine segment natively (or load and refit
 *   it from the cache), encode and open each fallback segment -> record the source digests every target
 *   holds.
 *
 * The pure part (`planCompile`) ends at the lowered segments and the map, in two phases: the structure
 * (`planStructure`: decode, prepare, analyze, partition, lower: everything the cache key reads) and the
 * weight map (`mapStructure`). `compileTE` adds the files and the native library. With a cache, a hit whose
 * entry was made from the same ONNX bytes, mapping options and prepared graph reuses the entry's map
 * (cached.ts) instead of the mapping phase; the given checkpoint is checked against it and sets every
 * mapped weight through it. Engines are built with an EngineBuilder capability (tests substitute it).
 */
import { createHash } from 'node:crypto';
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
import { legacyScope, nodeScopes, type NodeScopes } from '../weightmap/scopes.js';
import { buildWeightMap, describeWeightMapError, MATCHER_REVISION, type AmbiguousWeight, type WeightMap, type WeightMapErrorDetail } from '../weightmap/map.js';
import type { TensorStore } from '../weightmap/store.js';
import { networkWeights, type Layer, type NetworkDefinition, type WeightRole, type Weights } from '../network/types.js';
import { elementCount, tensorOf, type DType, type Graph, type Initializer, type Node, type Tensor, type TensorData } from '../trace/ir.js';
import { evaluateExpr, type F32Tensor, type SourceLookup } from '../weightmap/evaluate.js';
import { exprSources, type Expr } from '../weightmap/expr.js';
import type { MatchMethod } from '../weightmap/match.js';
import { valueDigest } from '../weightmap/digest.js';
import { fromFloat32, toFloat32 } from '../safetensors/convert.js';
import type { Dtype as StDtype } from '../safetensors/dtypes.js';
import { quantizedIn, tensorSourceOf } from '../quant/store.js';
import { dequantizedSource } from '../quant/mapped.js';
import { describeQuantIssue } from '../quant/errors.js';
import { defaultTransform } from '../effect/capabilities.js';
import { FallbackRunner, openOrtSession, type SessionOpener } from '../model/fallback.js';
import { engineReadback, type ReadbackMismatch } from '../verify/readback.js';
import { RefitModel, type Stage } from '../model/model.js';
import type { BuildInfo, PartitionReport, TensorDesc } from '../model/format.js';
import { compileWithCacheTE } from '../cache/compile.js';
import type { CacheKey } from '../cache/key.js';
import type { Blob, CacheEntry, CacheStore, Lookup } from '../cache/store.js';
import { describeProblem, planRefit } from '../plan/plan.js';
import { formatWeightFormat, weightFormatOptions, type WeightFormat } from '../quant/format.js';
import { cacheStoreOf, entryBlobs, loadingBuilder, planKey, recordingBuilder, reusableMap, segmentPositions, sourceCandidates, type CompileCacheOption, type MappingOptions, type PreparePatch, type SourceRecord } from './cached.js';

export type WeightPrecision = 'float32' | 'float16' | 'bfloat16';

export interface CompileOptions extends PartitionOptions {
  /** Build even when refittable weights have no checkpoint source (they keep their built values). */
  readonly allowUnmapped?: boolean;
  /** Settles equal-valued weights that names and scopes cannot (`--map FILE`): engine weight id or
   *  initializer name -> checkpoint tensor (see WeightMapOptions.map). */
  readonly map?: Readonly<Record<string, string>>;
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
  | { readonly _tag: 'UnmappedWeights'; readonly weights: readonly { readonly id: string; readonly reason: string }[]; readonly unaccounted?: readonly string[] }
  | { readonly _tag: 'AmbiguousWeights'; readonly weights: readonly AmbiguousWeight[] }
  | { readonly _tag: 'MapFileMismatch'; readonly entry: string; readonly reason: string }
  | { readonly _tag: 'CheckpointDisagrees'; readonly tensors: readonly string[] }
  /** An engine does not hold what it was built with (an internal error: exit 3). */
  | { readonly _tag: 'ReadbackMismatch'; readonly segment: number; readonly weights: readonly ReadbackMismatch[] }
  | { readonly _tag: 'WeightMapFailed'; readonly detail: string }
  | { readonly _tag: 'ConstantOutput'; readonly output: string }
  | { readonly _tag: 'BuildFailed'; readonly segment: number; readonly detail: string }
  | { readonly _tag: 'CacheFailed'; readonly step: string; readonly detail: string }
  | { readonly _tag: 'ConflictingOptions'; readonly detail: string }
  /** A cache hit reusing its entry's weight map: checkpoint tensors the map reads are missing or of
   *  other shapes or dtypes than the map was made with. */
  | { readonly _tag: 'CheckpointMismatch'; readonly tensors: readonly { readonly name: string; readonly detail: string }[] }
  /** A cache hit reusing its entry's weight map: checkpoint tensors no weight reads (the exported graph
   *  baked their build values in) hold other values than the map's build checkpoint, or tied copies differ. */
  | { readonly _tag: 'PinnedChanged'; readonly tensors: readonly { readonly name: string; readonly detail: string }[] }
  /** Weights the engines or fallbacks would hold with NaN values (a damaged file or checkpoint). */
  | { readonly _tag: 'NaNWeights'; readonly weights: readonly NaNWeight[] };

export interface NaNWeight {
  /** The weight-map target. */
  readonly id: string;
  /** The checkpoint tensors it is computed from (none for a graph constant). */
  readonly sources: readonly string[];
  readonly count: number;
  readonly elements: number;
}

export const describeCompileError = (e: CompileErrorDetail): string => {
  switch (e._tag) {
    case 'ModelUnreadable': return `${e.path}: cannot read the ONNX model: ${e.detail}`;
    case 'CheckpointUnreadable': return `${e.path}: cannot read the build checkpoint: ${e.detail}`;
    case 'TraceFailed': return `${e.path}: ${e.detail}`;
    case 'PartitionFailed': return `partition: ${e.detail}`;
    case 'LowerFailed': return `engine segment ${e.segment} cannot be lowered: ${e.detail}`;
    case 'UnmappedWeights': return `${describeWeightMapError(e)} (pass allowUnmapped / --allow-unmapped to build anyway)`;
    case 'AmbiguousWeights': return describeWeightMapError(e);
    case 'MapFileMismatch': return describeWeightMapError(e);
    case 'CheckpointDisagrees': return describeWeightMapError(e);
    case 'ReadbackMismatch': return `engine segment ${e.segment}: read-back verification failed (an internal error; nothing was written): ${e.weights.slice(0, 5).map((w) => `${w.weight} holds ${w.found}, expected ${w.expected}`).join('; ')}${e.weights.length > 5 ? ` (and ${e.weights.length - 5} more)` : ''}`;
    case 'WeightMapFailed': return `weight map: ${e.detail}`;
    case 'ConstantOutput': return `model output '${e.output}' is a constant of the graph; a compiled model needs every output computed`;
    case 'BuildFailed': return `engine segment ${e.segment}: the engine build failed: ${e.detail}`;
    case 'CacheFailed': return `engine cache: ${e.step} failed: ${e.detail}`;
    case 'ConflictingOptions': return `compile options: ${e.detail}`;
    case 'CheckpointMismatch': return `the checkpoint does not fit the weight map of the cached model built from this ONNX file: ${e.tensors.map((t) => t.detail).join('; ')}`;
    case 'NaNWeights': return `${e.weights.length} weight(s) hold NaN values, which no engine can compute with (a damaged ONNX file or checkpoint): ${e.weights.slice(0, 5).map((w) => `${w.id}${w.sources.length > 0 ? ` (from checkpoint ${w.sources.map((n) => `'${n}'`).join(', ')})` : ' (a constant of the ONNX graph)'}: ${w.count} of ${w.elements}`).join('; ')}${e.weights.length > 5 ? ` (and ${e.weights.length - 5} more)` : ''}`;
    case 'PinnedChanged': return `the checkpoint changes tensor(s) ${e.tensors.map((t) => `'${t.name}'`).join(', ')}, which the engines cannot take: ${e.tensors.map((t) => t.detail).join('; ')}`;
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
  /** Live segments in run order: engine segments lowered, fallback segments with the initializers their
   *  models are written with (absent: the graph's). */
  readonly segments: readonly { readonly segment: Segment; readonly lowered?: LoweredSegment; readonly initializers?: ReadonlyMap<string, Tensor> }[];
  readonly weightMap: WeightMap;
  readonly partition: PartitionReport;
  readonly tensors: readonly TensorDesc[];
  /** Set by withCheckpointValues: the source digests each mapped target holds ('' for none; absent: the
   *  weight map's build digests). */
  readonly current?: Readonly<Record<string, string>>;
  /** Set by withCheckpointValues: mapped weights whose checkpoint value is not the ONNX file's. */
  readonly differs?: readonly WeightDifference[];
  /** Set by withCheckpointValues: what could not be taken from the build checkpoint. */
  readonly warnings?: readonly string[];
}

const weightMapFailure = (e: WeightMapErrorDetail): CompileErrorDetail =>
  e._tag === 'LowerFailed' ? { _tag: 'LowerFailed', segment: e.segment, detail: e.reason } : e;

// ---- planning, in two phases ---------------------------------------------------------------------

/** The decoded ONNX file, before the rewrites for refit. */
export interface DecodedSource {
  readonly path: string;
  readonly graph: Graph;
  readonly scopes: NodeScopes;
  /** sha256 of the ONNX bytes and of every external-data range the decode read (location, range, bytes). */
  readonly digest: string;
}

/** Decodes an ONNX file's bytes, digesting them with the external data the decode reads. */
export const decodeSource = (path: string, onnx: Uint8Array): E.Either<CompileErrorDetail, DecodedSource> => {
  const hash = createHash('sha256').update('trt-refit onnx source\n').update(onnx);
  const resolve = directoryResolver(dirname(path));
  const decoded = decodeOnnx(onnx, (location, range) => {
    const r = resolve(location, range);
    if (E.isRight(r)) hash.update(`\nexternal ${JSON.stringify(location)} ${range.offset} ${range.length} ${r.right.byteLength}\n`).update(r.right);
    return r;
  });
  if (E.isLeft(decoded)) return E.left({ _tag: 'TraceFailed', path, detail: describeTraceError(decoded.left) });
  return E.right({ path, graph: decoded.right, scopes: nodeScopes(onnx), digest: hash.digest('hex') });
};

/** The structure phase's result: everything the cache key reads (the lowered engine networks, the
 *  fallback segments), and what the weight map is made from. */
export interface CompileStructure extends Omit<CompilePlan, 'weightMap' | 'current' | 'differs' | 'warnings'> {
  /** Every segment of the partition (dead ones too), as the weight map reads them. */
  readonly partitionSegments: readonly Segment[];
  readonly scopes: NodeScopes;
  /** The ONNX source digest (decodeSource). */
  readonly sourceDigest: string;
  /** prepareForRefit's rewrites of the decoded graph as a patch (undefined: not expressible as one). */
  readonly prepared: PreparePatch | undefined;
}

const sameStrings = (a: readonly string[], b: readonly string[]): boolean => a.length === b.length && a.every((x, i) => x === b[i]);

/** Replays a prepare patch on the decoded graph (the same ONNX bytes the patch was made from). */
export const applyPreparePatch = (graph: Graph, patch: PreparePatch): E.Either<string, Graph> => {
  const nodes: Node[] = [];
  for (const step of patch.nodes) {
    if (typeof step === 'number') {
      const n = graph.nodes[step];
      if (n === undefined) return E.left(`node ${step} is not in the graph`);
      nodes.push(n);
    } else if ('at' in step) {
      const n = graph.nodes[step.at];
      if (n === undefined) return E.left(`node ${step.at} is not in the graph`);
      nodes.push({ ...n, inputs: [...step.inputs], outputs: [...step.outputs] });
    } else nodes.push({ ...step.node, inputs: [...step.node.inputs], outputs: [...step.node.outputs], attributes: {} });
  }
  const initializers: Initializer[] = [];
  for (const step of patch.initializers) {
    if (typeof step === 'number') {
      const i = graph.initializers[step];
      if (i === undefined) return E.left(`initializer ${step} is not in the graph`);
      initializers.push(i);
    } else if ('zeros' in step) {
      initializers.push({ name: step.name, tensor: tensorOf('float32', step.zeros, new Float32Array(elementCount(step.zeros))) });
    } else {
      const i = graph.initializers[step.copyOf];
      if (i === undefined) return E.left(`initializer ${step.copyOf} is not in the graph`);
      initializers.push({ name: step.name, tensor: i.tensor });
    }
  }
  return E.right({ ...graph, nodes, initializers });
};

const isZeroF32 = (t: Tensor): boolean => t.dtype === 'float32' && (t.data as Float32Array).every((v) => v === 0);

/** `prepared` (prepareForRefit of `graph`) as a patch of `graph`, verified by replaying it; undefined when
 *  the rewrites cannot be written as one (new nodes with attributes, new initializers of other values). */
export const preparePatch = (graph: Graph, prepared: Graph): PreparePatch | undefined => {
  if (prepared.name !== graph.name || prepared.opset !== graph.opset || prepared.inputs !== graph.inputs || prepared.outputs !== graph.outputs) return undefined;
  const nodeIndex = new Map(graph.nodes.map((n, i) => [n, i] as const));
  const nodeByName = new Map(graph.nodes.map((n, i) => [n.name, i] as const));
  const nodes: PreparePatch['nodes'][number][] = [];
  for (const n of prepared.nodes) {
    const same = nodeIndex.get(n);
    if (same !== undefined) {
      nodes.push(same);
      continue;
    }
    const at = nodeByName.get(n.name);
    if (at !== undefined) {
      const base = graph.nodes[at];
      if (base.opType !== n.opType || base.domain !== n.domain || base.attributes !== n.attributes) return undefined;
      nodes.push({ at, inputs: [...n.inputs], outputs: [...n.outputs] });
    } else {
      if (Object.keys(n.attributes).length > 0) return undefined;
      nodes.push({ node: { name: n.name, opType: n.opType, domain: n.domain, inputs: [...n.inputs], outputs: [...n.outputs] } });
    }
  }
  const initIndex = new Map(graph.initializers.map((x, i) => [x, i] as const));
  const tensorIndex = new Map<Tensor, number>();
  graph.initializers.forEach((x, i) => {
    if (!tensorIndex.has(x.tensor)) tensorIndex.set(x.tensor, i);
  });
  const initializers: PreparePatch['initializers'][number][] = [];
  for (const x of prepared.initializers) {
    const same = initIndex.get(x);
    if (same !== undefined) initializers.push(same);
    else if (tensorIndex.has(x.tensor)) initializers.push({ name: x.name, copyOf: tensorIndex.get(x.tensor)! });
    else if (isZeroF32(x.tensor)) initializers.push({ name: x.name, zeros: [...x.tensor.shape] });
    else return undefined;
  }
  const patch: PreparePatch = { nodes, initializers };
  // The replay must give the prepared graph exactly.
  const replayed = applyPreparePatch(graph, patch);
  if (E.isLeft(replayed)) return undefined;
  const r = replayed.right;
  if (r.nodes.length !== prepared.nodes.length || r.initializers.length !== prepared.initializers.length) return undefined;
  const nodesAgree = r.nodes.every((n, i) => {
    const p = prepared.nodes[i];
    return n.name === p.name && n.opType === p.opType && n.domain === p.domain && sameStrings(n.inputs, p.inputs) && sameStrings(n.outputs, p.outputs)
      && (n.attributes === p.attributes || (Object.keys(n.attributes).length === 0 && Object.keys(p.attributes).length === 0));
  });
  const initializersAgree = r.initializers.every((x, i) => {
    const p = prepared.initializers[i];
    return x.name === p.name && (x.tensor === p.tensor || (isZeroF32(p.tensor) && x.tensor.dtype === p.tensor.dtype && sameStrings(x.tensor.shape.map(String), p.tensor.shape.map(String))));
  });
  return nodesAgree && initializersAgree ? patch : undefined;
};

/**
 * The structure phase: prepare (restore dropped zero biases, untie), analyze, partition and lower. The
 * restorations read the checkpoint (a bias comes back only where the checkpoint's is zero); `replay`
 * prepares the graph with a recorded patch instead (the rewrites an earlier compile of the same ONNX bytes
 * made with its own build checkpoint), reading no checkpoint.
 */
export const planStructure = (source: DecodedSource, checkpoint: TensorStore, options: CompileOptions = {}, replay?: PreparePatch): E.Either<CompileErrorDetail, CompileStructure> => {
  const { path, scopes } = source;
  let graph: Graph;
  let prepared: PreparePatch | undefined;
  if (replay !== undefined) {
    const r = applyPreparePatch(source.graph, replay);
    if (E.isLeft(r)) return E.left({ _tag: 'TraceFailed', path, detail: `the recorded rewrites for refit do not apply: ${r.left}` });
    graph = r.right;
    prepared = replay;
  } else {
    graph = prepareForRefit(source.graph, checkpoint, (node) => scopes.get(node) ?? legacyScope(node));
    prepared = preparePatch(source.graph, graph);
  }
  const analyzedOr = analyzeGraph(graph);
  if (E.isLeft(analyzedOr)) return E.left({ _tag: 'TraceFailed', path, detail: describeTraceError(analyzedOr.left) });
  const analyzed = analyzedOr.right;
  const ctx = lowerContext(analyzed);
  const parted = partitionGraph(analyzed, options, ctx);
  if (E.isLeft(parted)) return E.left({ _tag: 'PartitionFailed', detail: `${parted.left.option}: ${parted.left.reason}` });
  for (const output of analyzed.graph.outputs) if (analyzed.constants.has(output)) return E.left({ _tag: 'ConstantOutput', output });
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
  return E.right({ analyzed, segments, partition, tensors, partitionSegments: parted.right.segments, scopes, sourceDigest: source.digest, prepared });
};

/** The compile plan of a structure and a weight map. */
const planOf = (structure: CompileStructure, weightMap: WeightMap): CompilePlan => {
  const { analyzed, segments, partition, tensors } = structure;
  return { analyzed, segments, partition, tensors, weightMap };
};

/** The mapping phase: the weight map of a structure against its build checkpoint. */
export const mapStructure = (structure: CompileStructure, checkpoint: TensorStore, options: CompileOptions = {}): E.Either<CompileErrorDetail, CompilePlan> => {
  const map = buildWeightMap({ analyzed: structure.analyzed, segments: structure.partitionSegments, checkpoint, scopes: structure.scopes }, { allowUnmapped: options.allowUnmapped ?? false, ...(options.map !== undefined ? { map: options.map } : {}) });
  if (E.isLeft(map)) return E.left(weightMapFailure(map.left));
  return E.right(planOf(structure, map.right));
};

/** The options a weight map depends on besides the graph (recorded with a cache entry). */
export const mappingOptionsOf = (options: CompileOptions): MappingOptions => ({
  allowUnmapped: options.allowUnmapped ?? false,
  map: options.map ?? null,
  minSegmentSize: options.minSegmentSize ?? null,
  forcedFallback: options.forcedFallback ?? null,
});

/** What a cache entry records about the source of a structure's weight map. */
export const sourceRecordOf = (structure: CompileStructure, options: CompileOptions): SourceRecord => ({
  format: 1, matcher: MATCHER_REVISION, onnx: structure.sourceDigest, options: mappingOptionsOf(options), prepared: structure.prepared ?? null,
});

/** Trace (prepared for refit), partition, lower and map: pure, ONNX bytes and checkpoint in. */
export const planCompile = (path: string, onnx: Uint8Array, checkpoint: TensorStore, options: CompileOptions = {}): E.Either<CompileErrorDetail, CompilePlan> =>
  pipe(
    decodeSource(path, onnx),
    E.chain((source) => planStructure(source, checkpoint, options)),
    E.chain((structure) => mapStructure(structure, checkpoint, options)),
  );

// ---- the build checkpoint's values --------------------------------------------------------------

/** Evaluates a weight-map expression over checkpoint tensors (the effect's evaluator by default, so a
 *  compile holds bit for bit what a refit to the same checkpoint would put in). */
export type ExprEvaluator = (expr: Expr, lookup: SourceLookup) => E.Either<unknown, F32Tensor>;

/** A mapped weight whose value from the build checkpoint is not the value the ONNX file holds (a
 *  name-only match, a BatchNorm fold recomputed, a file exported from other weights). The engines hold
 *  the checkpoint's value. */
export interface WeightDifference {
  readonly id: string;
  /** How the checkpoint part was found (name-only, bn-fold, ...). */
  readonly methods: readonly MatchMethod[];
  /** Checkpoint tensors the expression reads. */
  readonly sources: readonly string[];
  /** Elements that differ, of `elements`. */
  readonly differing: number;
  readonly elements: number;
  /** Largest absolute difference (NaN where a value is NaN on one side only). */
  readonly maxAbsDiff: number;
}

/** The 16- and 64-bit float dtypes a value can be written back as. */
const safetensorsFloat: Readonly<Record<string, StDtype>> = { float32: 'F32', float16: 'F16', bfloat16: 'BF16', float64: 'F64' };

/** `values` in a tensor's own dtype (float32, float64, float16 and bfloat16 bit patterns), or undefined. */
const inDtype = (dtype: string, values: Float32Array): Float32Array | Float64Array | Uint16Array | undefined => {
  if (dtype === 'float32') return values;
  if (dtype === 'float64') return Float64Array.from(values);
  if (dtype === 'float16' || dtype === 'bfloat16') {
    const bytes = fromFloat32(values, dtype === 'float16' ? 'F16' : 'BF16');
    return new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2);
  }
  return undefined;
};

const viewBytes = (d: ArrayBufferView): Uint8Array => new Uint8Array(d.buffer, d.byteOffset, d.byteLength);

const sameBytes = (a: ArrayBufferView, b: ArrayBufferView): boolean => Buffer.from(viewBytes(a)).equals(Buffer.from(viewBytes(b)));

/** How `next` (as float32) differs from `previous` in dtype `dtype`. */
const differenceOf = (dtype: string, previous: ArrayBufferView, next: Float32Array): { differing: number; maxAbsDiff: number } => {
  const st = safetensorsFloat[dtype];
  const old = st === 'F32' ? new Float32Array(previous.buffer, previous.byteOffset, previous.byteLength / 4) : toFloat32(st!, viewBytes(previous));
  let differing = 0;
  let maxAbsDiff = 0;
  for (let i = 0; i < next.length; i++) {
    const a = old[i];
    const b = next[i];
    if (a === b || (Number.isNaN(a) && Number.isNaN(b))) continue;
    differing++;
    const d = Math.abs(a - b);
    maxAbsDiff = Number.isNaN(d) || Number.isNaN(maxAbsDiff) ? NaN : Math.max(maxAbsDiff, d);
  }
  return { differing, maxAbsDiff };
};

const roleField: Readonly<Record<WeightRole, string>> = { kernel: 'kernel', bias: 'bias', scale: 'scale', shift: 'shift', mean: 'mean', variance: 'variance', constant: 'weights' };

/** A network whose weights `values` (by `layer\0role`) replace; every other weight stays. */
const withWeights = (network: NetworkDefinition, values: ReadonlyMap<string, Weights>): NetworkDefinition => ({
  ...network,
  layers: network.layers.map((layer): Layer => {
    let out: Record<string, unknown> | undefined;
    for (const [role, field] of Object.entries(roleField)) {
      const value = values.get(`${layer.name}\u0000${role}`);
      if (value === undefined || (layer as unknown as Record<string, unknown>)[field] === undefined) continue;
      out ??= { ...layer };
      out[field] = value;
    }
    return (out ?? layer) as unknown as Layer;
  }),
});

/** The build checkpoint as the effect reads it: float32 views of aligned F32 tensors, other dtypes
 *  converted, quantized weights (`<m>.weight` + `<m>.weight_scale`) dequantized into the layout the
 *  weight map recorded. `problems` collects why a tensor could not be read. */
const checkpointLookup = (checkpoint: TensorStore, weightMap: WeightMap): { lookup: (name: string, problems: string[], buffers: Set<ArrayBufferLike>) => F32Tensor | undefined; quantizedIssue?: string } => {
  const found = quantizedIn(checkpoint);
  const quantized = E.isRight(found) ? found.right : new Map();
  const recorded = new Map(weightMap.sources.map((s) => [s.name, s.shape] as const));
  const source = tensorSourceOf(checkpoint);
  return {
    ...(E.isLeft(found) ? { quantizedIssue: describeQuantIssue(found.left) } : {}),
    lookup: (name, problems, buffers) => {
      const entry = quantized.get(name);
      if (entry !== undefined) {
        const d = dequantizedSource(source, entry, recorded.get(name) ?? entry.valuesShape);
        if (E.isLeft(d)) {
          problems.push(`quantized tensor '${name}': ${describeQuantIssue(d.left)}`);
          return undefined;
        }
        return d.right;
      }
      const info = checkpoint.tensors.get(name);
      if (info === undefined) return undefined;
      try {
        if (info.dtype === 'F32') {
          const bytes = checkpoint.bytes(name);
          if (bytes.byteOffset % 4 === 0) {
            buffers.add(bytes.buffer);
            return { shape: info.shape, data: new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4) };
          }
        }
        const data = checkpoint.toFloat32(name);
        buffers.add(data.buffer);
        return { shape: info.shape, data };
      } catch (e) {
        problems.push(`reading '${name}': ${(e as Error).message}`);
        return undefined;
      }
    },
  };
};

/**
 * The plan with every mapped engine weight and every mapped fallback constant set to its weight-map
 * expression evaluated over `checkpoint` (graph constants, status 'constant', and unmapped weights keep
 * the graph's values), so a miss builds with the checkpoint's values and a hit refits with them. Lists the
 * weights whose checkpoint value differs from the ONNX file's. Pure when `evaluate` is (the default,
 * evaluateExpr, is; compileTE passes the effect's evaluator).
 *
 * A target that cannot be evaluated is an error (WeightMapFailed), except over a quantized build
 * checkpoint, where it keeps the graph's value with a warning and is recorded as holding no checkpoint
 * value (a later refit moves it).
 */
export const withCheckpointValues = (plan: CompilePlan, checkpoint: TensorStore, evaluate: ExprEvaluator = evaluateExpr): E.Either<CompileErrorDetail, CompilePlan> => {
  const reader = checkpointLookup(checkpoint, plan.weightMap);
  const quantizedCheckpoint = [...checkpoint.tensors.keys()].some((n) => n.endsWith('.weight_scale'));
  const warnings: string[] = reader.quantizedIssue !== undefined ? [`the build checkpoint's quantized tensors: ${reader.quantizedIssue}`] : [];
  const differs: WeightDifference[] = [];
  const notHeld = new Set<string>();
  const engineValues = new Map<number, Map<string, Weights>>();
  const fallbackValues = new Map<number, Map<string, Tensor>>();
  const valueDigests = new Map<string, string>();
  // Each engine segment's network weights by `layer\0role`.
  const built = new Map(plan.segments.flatMap((s) => (s.lowered === undefined ? [] : [[s.segment.index, new Map(networkWeights(s.lowered.network).map((w) => [`${w.layer}\u0000${w.role}`, w.weights]))] as const])));
  const fail = (id: string, detail: string): E.Either<CompileErrorDetail, never> | undefined => {
    if (!quantizedCheckpoint) return E.left({ _tag: 'WeightMapFailed', detail: `${id}: its value over the build checkpoint cannot be computed: ${detail}` });
    warnings.push(`${id}: keeps the ONNX file's value (its value over the quantized build checkpoint cannot be computed: ${detail}); a refit sets it`);
    notHeld.add(id);
    return undefined;
  };
  for (const t of plan.weightMap.targets) {
    if (t.status !== 'mapped') continue;
    // The graph's value the target would otherwise hold.
    const previous: { readonly dtype: string; readonly data: ArrayBufferView } | undefined = t.kind === 'engine'
      ? built.get(t.segment)?.get(`${t.layer}\u0000${t.role}`)
      : t.tensor === undefined ? undefined : plan.analyzed.constants.get(t.tensor)?.tensor;
    if (previous === undefined) {
      const r = fail(t.id, 'the compile plan has no such weight');
      if (r) return r;
      continue;
    }
    const problems: string[] = [];
    const buffers = new Set<ArrayBufferLike>();
    let value: E.Either<unknown, F32Tensor>;
    try {
      value = evaluate(t.expr, (name) => reader.lookup(name, problems, buffers));
    } catch (e) {
      value = E.left((e as Error).message);
    }
    if (E.isLeft(value) || value.right.data.length !== elementCount(t.shape)) {
      const detail = E.isLeft(value) ? `${typeof value.left === 'string' ? value.left : JSON.stringify(value.left)}${problems.length > 0 ? ` (${problems.join('; ')})` : ''}` : `${value.right.data.length} values for [${t.shape}]`;
      const r = fail(t.id, detail);
      if (r) return r;
      continue;
    }
    // A view of the checkpoint's memory is copied: the checkpoint is closed after the compile.
    const computed = value.right.data;
    const f32 = buffers.has(computed.buffer) ? computed.slice() : computed;
    const data = inDtype(previous.dtype, f32);
    if (data === undefined) {
      const r = fail(t.id, `the graph holds it as ${previous.dtype}`);
      if (r) return r;
      continue;
    }
    if (!sameBytes(previous.data, data)) {
      const { differing, maxAbsDiff } = differenceOf(previous.dtype, previous.data, f32);
      differs.push({ id: t.id, methods: t.methods, sources: exprSources(t.expr), differing, elements: f32.length, maxAbsDiff });
    }
    valueDigests.set(t.id, valueDigest(data));
    if (t.kind === 'engine') {
      let m = engineValues.get(t.segment);
      if (m === undefined) engineValues.set(t.segment, (m = new Map()));
      m.set(`${t.layer}\u0000${t.role}`, { dtype: previous.dtype as Weights['dtype'], shape: [...t.shape], data: data as Weights['data'] });
    } else {
      let m = fallbackValues.get(t.segment);
      if (m === undefined) fallbackValues.set(t.segment, (m = new Map()));
      m.set(t.tensor!, { dtype: previous.dtype as DType, shape: [...t.shape], data: data as TensorData });
    }
  }
  const segments = plan.segments.map((s) => {
    if (s.lowered !== undefined) {
      const values = engineValues.get(s.segment.index);
      return values === undefined ? s : { ...s, lowered: { ...s.lowered, network: withWeights(s.lowered.network, values) } };
    }
    const values = fallbackValues.get(s.segment.index);
    if (values === undefined) return s;
    const base = s.initializers ?? new Map(s.segment.constants.map((c) => [c, plan.analyzed.constants.get(c)!.tensor]));
    return { ...s, initializers: new Map([...base].map(([name, t]) => [name, values.get(name) ?? t])) };
  });
  const weightMap: WeightMap = {
    ...plan.weightMap,
    targets: plan.weightMap.targets.map((t) => {
      const vd = valueDigests.get(t.id);
      return vd === undefined || vd === t.built.valueDigest ? t : { ...t, built: { ...t.built, valueDigest: vd } };
    }),
  };
  const current: Record<string, string> = {};
  for (const t of weightMap.targets) if (t.status === 'mapped') current[t.id] = notHeld.has(t.id) ? '' : t.built.sourceDigest;
  return E.right({ ...plan, segments, weightMap, current, differs, warnings });
};

const isNaN16 = (bits: number, dtype: string): boolean => (dtype === 'float16' ? (bits & 0x7c00) === 0x7c00 && (bits & 0x03ff) !== 0 : (bits & 0x7f80) === 0x7f80 && (bits & 0x007f) !== 0);

/** NaN values in a float weight (float32/64 values, float16/bfloat16 bit patterns); 0 for other dtypes. */
const nanCount = (dtype: string, data: ArrayBufferView): number => {
  let n = 0;
  if (data instanceof Float32Array || data instanceof Float64Array) {
    for (let i = 0; i < data.length; i++) if (Number.isNaN(data[i])) n++;
  } else if ((dtype === 'float16' || dtype === 'bfloat16') && data instanceof Uint16Array) {
    for (let i = 0; i < data.length; i++) if (isNaN16(data[i], dtype)) n++;
  }
  return n;
};

/**
 * The weights a compile would build with NaN in them: a NaN weight poisons every output it reaches, so it
 * is a damaged file, never a model. Infinities pass (attention masks use them), and so does a one-element
 * constant (a NaN sentinel some graphs compare against).
 */
export const nanWeights = (plan: CompilePlan): NaNWeight[] => {
  const engineValues = new Map(plan.segments.flatMap((s) => (s.lowered === undefined ? [] : [[s.segment.index, new Map(networkWeights(s.lowered.network).map((w) => [`${w.layer}\u0000${w.role}`, w.weights]))] as const])));
  const fallbackValue = (segment: number, tensor: string): Tensor | undefined =>
    plan.segments.find((s) => s.segment.index === segment)?.initializers?.get(tensor) ?? plan.analyzed.constants.get(tensor)?.tensor;
  const out: NaNWeight[] = [];
  for (const t of plan.weightMap.targets) {
    const value = t.kind === 'engine' ? engineValues.get(t.segment)?.get(`${t.layer}\u0000${t.role}`) : t.tensor === undefined ? undefined : fallbackValue(t.segment, t.tensor);
    if (value === undefined || elementCount(value.shape) <= 1) continue;
    const count = nanCount(value.dtype, value.data);
    if (count > 0) out.push({ id: t.id, sources: t.status === 'mapped' ? exprSources(t.expr) : [], count, elements: elementCount(value.shape) });
  }
  return out;
};

/** Builds one engine segment's network (the native library by default). */
export type EngineBuilder = (network: NetworkDefinition, segment: number, options: BuildOptions) => Engine;
export const nativeBuilder: EngineBuilder = (network, _segment, options) => buildEngine(network, options);

export interface CompileCapabilities {
  readonly buildEngine?: EngineBuilder;
  readonly openSession?: SessionOpener;
  /** Evaluates the weight map over the build checkpoint (default: the effect's evaluator). */
  readonly transform?: ExprEvaluator;
  /** Read every engine back after its build or cache load and compare with the values it was given
   *  (default true; false only for engines that cannot report, e.g. test doubles). */
  readonly readback?: boolean;
}

/** An engine built or loaded in `realize` that does not hold what it was given. */
class ReadbackFailed extends Error {
  constructor(readonly segment: number, readonly weights: readonly ReadbackMismatch[]) {
    super(`read-back of engine segment ${segment} failed`);
  }
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

/** Builds the engines and opens the fallbacks of a compile plan, with the weight values the plan holds:
 *  the build checkpoint's after withCheckpointValues (as compileTE does), the ONNX file's before it. */
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
  for (const { segment, lowered, initializers: given } of plan.segments) {
    const base = { index: segment.index, inputs: [...segment.inputs], outputs: [...segment.outputs] };
    try {
      if (lowered !== undefined) {
        const engine = build(lowered.network, segment.index, buildOptions);
        let context;
        try {
          // Read-back: the engine's kernels must hold exactly the values it was built (or, on a cache hit,
          // refitted) with, before the compile reports success.
          if (caps.readback !== false) {
            const wrong = engineReadback(engine, lowered.network);
            if (wrong.length > 0) throw new ReadbackFailed(segment.index, wrong);
          }
          context = engine.createContext();
        } catch (e) {
          engine[Symbol.dispose]();
          throw e;
        }
        stages.push({ kind: 'engine', record: { kind: 'engine', ...base, layers: lowered.network.layers.length, weights: lowered.weights.length }, engine, context, origin: undefined });
      } else {
        const initializers = given ?? new Map(segment.constants.map((c) => [c, analyzed.constants.get(c)!.tensor]));
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
      if (e instanceof ReadbackFailed) return E.left({ _tag: 'ReadbackMismatch', segment: e.segment, weights: e.weights });
      return E.left({ _tag: 'BuildFailed', segment: segment.index, detail: (e as Error).message });
    }
  }
  const current: Record<string, string> = { ...plan.current };
  if (plan.current === undefined) for (const t of plan.weightMap.targets) if (t.status === 'mapped') current[t.id] = t.built.sourceDigest;
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
  /** Decode, prepare, trace, partition and lowering (the structure phase, again for each recorded
   *  preparation tried), the weight map (built, or decoded from a cache entry and checked against the
   *  checkpoint), and the checkpoint's values (withCheckpointValues). */
  readonly planMs: number;
  /** The cache key, of each structure tried (0 without a cache). */
  readonly hashMs: number;
  /** Looking keys up, verifying the entries' checksums, and looking for entries of the same ONNX bytes
   *  (0 without a cache). */
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
  /** Mapped weights whose value from the build checkpoint differs from the value the ONNX file holds (a
   *  name-only match, a BatchNorm fold recomputed, a file exported from other weights). The engines and
   *  fallbacks hold the checkpoint's values, hit or miss. */
  readonly differs: readonly WeightDifference[];
  /** What could not be taken from the build checkpoint (a quantized build checkpoint only): those weights
   *  keep the ONNX file's values and are recorded as holding none, so a refit sets them. */
  readonly warnings: readonly string[];
  /** The weight map came from a cache entry made from the same ONNX bytes with the same mapping options
   *  (a hit, or a rebuild of an entry whose engines could not serve) instead of mapping the graph again
   *  against the given checkpoint; every mapped weight still holds the given checkpoint's values. */
  readonly mapReused: boolean;
  /** Why a cache entry of this ONNX file could not give its weight map (the graph was mapped again). */
  readonly mapReuseDetail?: string;
  readonly timings: CompileTimings;
}

const since = (start: bigint): number => Number(process.hrtime.bigint() - start) / 1e6;

/** The entry's weight map when it was made from this structure's source and fits the structure (every
 *  engine weight and fallback constant it names is the structure's), else why not. */
const reusableFor = (structure: CompileStructure, entry: CacheEntry, options: CompileOptions): E.Either<string, WeightMap> => {
  const m = reusableMap(entry, sourceRecordOf(structure, options));
  if (E.isLeft(m)) return m;
  const weights = new Set(structure.segments.flatMap((s) => (s.lowered === undefined ? [] : networkWeights(s.lowered.network).map((w) => `${s.segment.index}\u0000${w.layer}\u0000${w.role}`))));
  const constants = new Set(structure.segments.flatMap((s) => (s.lowered === undefined ? s.segment.constants.map((c) => `${s.segment.index}\u0000${c}`) : [])));
  const live = new Set(structure.segments.map((s) => s.segment.index));
  const engineTargets = new Set(m.right.targets.filter((t) => t.kind === 'engine' && live.has(t.segment)).map((t) => `${t.segment}\u0000${t.layer}\u0000${t.role}`));
  const fits = engineTargets.size === weights.size && [...weights].every((w) => engineTargets.has(w))
    && m.right.targets.every((t) => t.kind === 'engine' || t.status !== 'mapped' || constants.has(`${t.segment}\u0000${t.tensor}`));
  return fits ? m : E.left('its weight map does not name the weights of this structure');
};

/**
 * The given checkpoint against a weight map made from another (a reused cache entry's): the refit plan's
 * checks (every source present, with the shape and a float dtype the map was made with; pinned tensors,
 * which no weight reads because the graph baked their build values in, unchanged; tied copies equal), and
 * the source digest of what each mapped target holds from this checkpoint (what a plan compares with).
 */
export const checkpointAgainstMap = (map: WeightMap, checkpoint: TensorStore): E.Either<CompileErrorDetail, Record<string, string>> => {
  const plan = planRefit(map, checkpoint, { checkFinite: false });
  const detailOf = (p: (typeof plan.problems)[number]) => ({ name: p.source, detail: describeProblem(p) });
  const mismatch = plan.problems.filter((p) => p._tag === 'MissingSource' || p._tag === 'ShapeMismatch' || p._tag === 'NotFloat');
  if (mismatch.length > 0) return E.left({ _tag: 'CheckpointMismatch', tensors: mismatch.map(detailOf) });
  const pinned = plan.problems.filter((p) => p._tag === 'PinnedChanged' || p._tag === 'TiedDiverged');
  if (pinned.length > 0) return E.left({ _tag: 'PinnedChanged', tensors: pinned.map(detailOf) });
  return E.right(Object.fromEntries(plan.entries.map((e) => [e.target, e.sourceDigest])));
};

/** Realizes a plan through the cache: load and refit on a hit, build and insert on a miss. */
const realizeCached = async (
  plan: CompilePlan, store: CacheStore | undefined, options: CompileOptions, caps: CompileCapabilities, source: string,
  prefetched?: { readonly key: CacheKey; readonly lookup: Lookup }, record?: SourceRecord,
): Promise<E.Either<CompileErrorDetail, Omit<CompileReport, 'timings' | 'differs' | 'warnings' | 'mapReused'> & { timings: Omit<CompileTimings, 'readMs' | 'planMs'> }>> => {
  const buildOptions = engineBuildOptions(options);
  const positions = segmentPositions(plan);
  let key: CacheKey | undefined = prefetched?.key;
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
      return { value, blobs: store === undefined ? [] : [...blobs, ...entryBlobs(keyOf(), plan, record)] };
    },
    load: async (entry) => orThrow(await realize(plan, options, { ...caps, buildEngine: loadingBuilder(entry, keyOf(), positions) }, source)),
    ...(prefetched !== undefined ? { lookup: (k: CacheKey) => (k.digest === prefetched.key.digest ? prefetched.lookup : store!.get(k)) } : {}),
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
    const store = cacheStoreOf(options.cache);
    let planMs = 0;
    let hashMs = 0;
    let lookupMs = 0;
    let t = process.hrtime.bigint();
    const decoded = decodeSource(onnxPath, onnx);
    if (E.isLeft(decoded)) return decoded;
    const first = planStructure(decoded.right, checkpoint, options);
    if (E.isLeft(first)) return first;
    planMs += since(t);
    let structure = first.right;
    // With a cache: the entry of this structure, or of the same ONNX bytes prepared as an earlier build
    // checkpoint had it, gives its weight map when it was made from the same source (reuse below).
    let prefetched: { key: CacheKey; lookup: Lookup } | undefined;
    /** This compile's own structure's key and lookup (prefetched may become a recorded preparation's). */
    let own: typeof prefetched;
    let reused: WeightMap | undefined;
    let reuseDetail: string | undefined;
    if (store !== undefined) {
      const buildOptions = engineBuildOptions(options);
      const keyed = (s: CompileStructure): E.Either<CompileErrorDetail, CacheKey> => {
        const t0 = process.hrtime.bigint();
        try {
          return E.right(planKey(s, buildOptions));
        } catch (e) {
          return E.left({ _tag: 'CacheFailed', step: 'key', detail: (e as Error).message });
        } finally {
          hashMs += since(t0);
        }
      };
      const look = async (key: CacheKey): Promise<E.Either<CompileErrorDetail, Lookup>> => {
        const t0 = process.hrtime.bigint();
        try {
          return E.right(await store.get(key));
        } catch (e) {
          return E.left({ _tag: 'CacheFailed', step: 'lookup', detail: (e as Error).message });
        } finally {
          lookupMs += since(t0);
        }
      };
      const key = keyed(structure);
      if (E.isLeft(key)) return key;
      const lookup = await look(key.right);
      if (E.isLeft(lookup)) return lookup;
      prefetched = { key: key.right, lookup: lookup.right };
      own = prefetched;
      if (lookup.right._tag === 'hit') {
        const m = reusableFor(structure, lookup.right.entry, options);
        if (E.isRight(m)) reused = m.right;
        else reuseDetail = m.left;
      }
      if (reused === undefined) {
        t = process.hrtime.bigint();
        const candidates = await sourceCandidates(store, sourceRecordOf(structure, options));
        lookupMs += since(t);
        for (const c of candidates) {
          t = process.hrtime.bigint();
          const other = planStructure(decoded.right, checkpoint, options, c.prepared);
          planMs += since(t);
          if (E.isLeft(other)) continue;
          const otherKey = keyed(other.right);
          if (E.isLeft(otherKey) || otherKey.right.digest !== c.key) continue;
          const otherLookup = await look(otherKey.right);
          if (E.isLeft(otherLookup) || otherLookup.right._tag !== 'hit') continue;
          const m = reusableFor(other.right, otherLookup.right.entry, options);
          if (E.isLeft(m)) continue;
          structure = other.right;
          prefetched = { key: otherKey.right, lookup: otherLookup.right };
          reused = m.right;
          reuseDetail = undefined;
          break;
        }
      }
    }
    t = process.hrtime.bigint();
    let planned: CompilePlan;
    let held: Readonly<Record<string, string>> | undefined;
    // The map was made against the entry's build checkpoint: the given one must fit it (its tensors,
    // shapes and dtypes; pinned tensors unchanged), and what each weight holds is digested from it.
    const checked = reused === undefined ? undefined : checkpointAgainstMap(reused, checkpoint);
    if (reused !== undefined && checked !== undefined && E.isRight(checked)) {
      held = checked.right;
      planned = planOf(structure, reused);
    } else {
      // No reusable map, or the checkpoint does not fit it: map this compile's own structure against the
      // checkpoint, as without a cache (the cache never refuses what a compile without it accepts). When
      // that fails too, the misfit is the answer: it names the tensors.
      if (checked !== undefined && E.isLeft(checked)) {
        structure = first.right;
        prefetched = own;
        reused = undefined;
        reuseDetail = describeCompileError(checked.left);
      }
      const mapped = mapStructure(structure, checkpoint, options);
      if (E.isLeft(mapped)) return checked !== undefined && E.isLeft(checked) ? checked : mapped;
      planned = mapped.right;
    }
    // The engines (built on a miss, refitted on a hit) and fallbacks hold the build checkpoint's values.
    const valued = withCheckpointValues(planned, checkpoint, caps.transform ?? defaultTransform());
    if (E.isLeft(valued)) return valued;
    let plan = valued.right;
    const nan = nanWeights(plan);
    if (nan.length > 0) return E.left({ _tag: 'NaNWeights', weights: nan });
    if (held !== undefined) {
      // withCheckpointValues records the map's build digests; a reused map's are another checkpoint's.
      const current: Record<string, string> = {};
      for (const [id, digest] of Object.entries(plan.current ?? {})) current[id] = digest === '' ? '' : (held[id] ?? '');
      plan = { ...plan, current };
    }
    planMs += since(t);
    const realized = await realizeCached(plan, store, options, caps, onnxPath, prefetched, sourceRecordOf(structure, options));
    if (E.isLeft(realized)) return realized;
    const r = realized.right;
    return E.right({
      ...r, differs: plan.differs ?? [], warnings: plan.warnings ?? [],
      mapReused: reused !== undefined,
      ...(reuseDetail !== undefined ? { mapReuseDetail: reuseDetail } : {}),
      timings: { readMs, planMs, ...r.timings, hashMs: hashMs + r.timings.hashMs, lookupMs: lookupMs + r.timings.lookupMs, totalMs: since(start) },
    });
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
