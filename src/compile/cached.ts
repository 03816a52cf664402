/**
 * The engine cache inside the compile step. The key is taken from the compile plan (the lowered engine
 * networks and the fallback segments, structure only, with the build configuration, backend and device);
 * the entry holds every engine segment's stripped engine, the canonical names of the networks that built
 * them, and the weight map.
 *
 *   miss: build each engine as compile always does, keep its stripped engine file, insert the entry
 *   hit:  load each stripped engine and refit it with the plan's network weights, every one of them: the
 *         build checkpoint's values through the weight map (compile.ts withCheckpointValues substitutes
 *         them before the key is taken; graph constants keep the graph's values), so a hit holds exactly
 *         what a fresh build with the same checkpoint would, bit for bit
 *
 * A hit is served only when the cached engine's layer and tensor names are the current network's: the
 * compiled model addresses engine weights and I/O by those names (its weight map, its refits, its runs).
 * An entry built from a model with other names is refused by the loader, which the driver treats as a
 * damaged entry: removed and rebuilt. The structure phase runs on a hit too (the key needs the lowered
 * networks). The weight map is not made again when the entry records (blob 'source.json') that it was
 * made from the same ONNX bytes, mapping options and prepared graph: the entry's map is reused, the given
 * checkpoint is checked against it, and every mapped weight is set from the given checkpoint through it.
 * The prepared graph depends on the build checkpoint (zero biases the exporter dropped come back only where
 * that checkpoint's are zero), so the entry records prepareForRefit's rewrites as a patch, and a compile
 * with another checkpoint finds the entry by the ONNX digest and replays the patch (sourceCandidates).
 */
import type { BuildOptions, Engine } from '../../ffi/engine.js';
import { Engine as NativeEngine } from '../../ffi/engine.js';
import { networkWeights } from '../network/types.js';
import { bindingsBlob, bindingsOf, engineBlobName, nativeKey, type NativeCacheContext } from '../cache/engines.js';
import type { CacheKey, CanonicalNames, SegmentStructure } from '../cache/key.js';
import { CacheStore, type Blob, type CacheEntry } from '../cache/store.js';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import { stableJson } from '../cache/key.js';
import { WeightMapCodec, type WeightMap } from '../weightmap/map.js';
import type { CompilePlan, EngineBuilder } from './compile.js';

export const WEIGHT_MAP_BLOB = 'weightmap.json';
/** What the entry's weight map was made from (SourceRecord): a later compile of the same ONNX bytes with
 *  the same mapping options reuses the map instead of mapping again. */
export const SOURCE_BLOB = 'source.json';

/** Where compile keeps engines: a directory (with an optional byte budget), an open store, or none. */
export type CompileCacheOption = false | { readonly dir: string; readonly maxBytes?: number } | CacheStore;

export const cacheStoreOf = (option: CompileCacheOption | undefined): CacheStore | undefined =>
  option === undefined || option === false ? undefined
  : option instanceof CacheStore ? option
  : new CacheStore({ root: option.dir, ...(option.maxBytes !== undefined ? { maxBytes: option.maxBytes } : {}) });

/** What the key reads of a plan (the structure phase gives it before the weight map). */
export type KeyedPlan = Pick<CompilePlan, 'analyzed' | 'segments'>;

/** The plan's live segments as the key sees them, in run order. */
export const planStructures = (plan: KeyedPlan): SegmentStructure[] =>
  plan.segments.map(({ segment, lowered }): SegmentStructure => {
    if (lowered !== undefined) return { kind: 'engine', network: lowered.network };
    const typed = (name: string) => ({ name, type: plan.analyzed.types.get(name)! });
    return { kind: 'fallback', opset: plan.analyzed.graph.opset, nodes: segment.nodes, inputs: segment.inputs.map(typed), outputs: segment.outputs, constants: segment.constants.map(typed) };
  });

/** The cache key of a compile plan built with `options`. */
export const planKey = (plan: KeyedPlan, options: BuildOptions, context: NativeCacheContext = {}): CacheKey => nativeKey(planStructures(plan), options, context);

/** segment.index -> position in the key (and in the entry's blob names). */
export const segmentPositions = (plan: KeyedPlan): ReadonlyMap<number, number> => new Map(plan.segments.map((s, i) => [s.segment.index, i]));

const position = (positions: ReadonlyMap<number, number>, segment: number): number => {
  const p = positions.get(segment);
  if (p === undefined) throw new Error(`segment ${segment} is not a live segment of the plan`);
  return p;
};

/** A builder that builds with `inner` and keeps each engine's stripped file as a blob. */
export const recordingBuilder = (inner: EngineBuilder, positions: ReadonlyMap<number, number>, blobs: Blob[]): EngineBuilder => (network, segment, options) => {
  const engine = inner(network, segment, options);
  try {
    blobs.push({ name: engineBlobName(position(positions, segment)), data: engine.serialize({ includeWeights: false }) });
  } catch (e) {
    engine[Symbol.dispose]();
    throw e;
  }
  return engine;
};

/** The blobs besides the engines: the canonical names (what a hit checks), the weight map, and what the
 *  map was made from (when known). */
export const entryBlobs = (key: CacheKey, plan: CompilePlan, source?: SourceRecord): Blob[] => [
  bindingsBlob(key.names),
  { name: WEIGHT_MAP_BLOB, data: new TextEncoder().encode(JSON.stringify(plan.weightMap)) },
  ...(source !== undefined ? [{ name: SOURCE_BLOB, data: new TextEncoder().encode(stableJson(source)) }] : []),
];

// ---- reusing an entry's weight map -------------------------------------------------------------------

/**
 * The rewrites prepareForRefit made to the decoded graph, as a patch that replays them without the
 * checkpoint (compile.ts preparePatch / applyPreparePatch). Nodes of the prepared graph in order: an index
 * (the decoded graph's node, unchanged), a decoded node with other inputs and outputs, or a new node (no
 * attributes). Initializers in order: an index (unchanged), float32 zeros (a restored bias), or another
 * name for a decoded initializer's tensor (an untied use).
 */
export interface PreparePatch {
  readonly nodes: readonly (number | { readonly at: number; readonly inputs: readonly string[]; readonly outputs: readonly string[] } | { readonly node: { readonly name: string; readonly opType: string; readonly domain: string; readonly inputs: readonly string[]; readonly outputs: readonly string[] } })[];
  readonly initializers: readonly (number | { readonly name: string; readonly zeros: readonly number[] } | { readonly name: string; readonly copyOf: number })[];
}

/** The options a weight map depends on besides the ONNX bytes and the prepared graph. */
export interface MappingOptions {
  readonly allowUnmapped: boolean;
  readonly map: Readonly<Record<string, string>> | null;
  readonly minSegmentSize: number | null;
  readonly forcedFallback: readonly string[] | null;
}

/** The entry's blob 'source.json'. */
export interface SourceRecord {
  readonly format: 1;
  /** The matcher's rules the map was made by (MATCHER_REVISION): a map made by other rules is not reused. */
  readonly matcher?: string;
  /** sha256 of the ONNX file's bytes and of the external data its decode read. */
  readonly onnx: string;
  readonly options: MappingOptions;
  /** The checkpoint-dependent rewrites of the graph the map was made for (null: not expressible). */
  readonly prepared: PreparePatch | null;
}

const parseSource = (bytes: Uint8Array | undefined): SourceRecord | undefined => {
  if (bytes === undefined) return undefined;
  try {
    const v = JSON.parse(new TextDecoder().decode(bytes)) as SourceRecord;
    return typeof v === 'object' && v !== null && v.format === 1 && typeof v.onnx === 'string' && typeof v.options === 'object' ? v : undefined;
  } catch {
    return undefined;
  }
};

/** The entry's weight map when it was made from `source` (same ONNX bytes, mapping options and prepared
 *  graph), else why not. */
export const reusableMap = (entry: CacheEntry, source: SourceRecord): E.Either<string, WeightMap> => {
  const recorded = parseSource(entry.blobs.get(SOURCE_BLOB));
  if (recorded === undefined) return E.left('the entry does not record its ONNX source');
  if (recorded.onnx !== source.onnx) return E.left('the entry was built from other ONNX bytes');
  if (recorded.matcher !== source.matcher) return E.left(`the entry's weight map was made by other matching rules (${recorded.matcher ?? 'unrecorded'}, now ${source.matcher})`);
  if (stableJson(recorded.options) !== stableJson(source.options)) return E.left('the entry was mapped with other options');
  if (recorded.prepared === null || source.prepared === null || stableJson(recorded.prepared) !== stableJson(source.prepared)) return E.left('the entry was built from a graph prepared otherwise');
  const bytes = entry.blobs.get(WEIGHT_MAP_BLOB);
  if (bytes === undefined) return E.left('the entry has no weight map');
  try {
    const decoded = WeightMapCodec.decode(JSON.parse(new TextDecoder().decode(bytes)));
    return E.isRight(decoded) ? E.right(decoded.right) : E.left('its weight map does not decode');
  } catch (e) {
    return E.left(`its weight map does not parse: ${(e as Error).message}`);
  }
};

/**
 * Entries that record the same ONNX bytes and mapping options but another prepared graph (the build
 * checkpoint restored other zero biases): digest and patch, read unverified (the caller replays the patch,
 * recomputes the key and verifies the entry through the store before using it).
 */
export const sourceCandidates = async (store: CacheStore, source: SourceRecord): Promise<{ readonly key: string; readonly prepared: PreparePatch }[]> => {
  let names: string[];
  try {
    names = (await readdir(store.entriesDir)).filter((n) => /^[0-9a-f]{64}$/.test(n)).sort();
  } catch {
    return [];
  }
  const options = stableJson(source.options);
  const own = source.prepared === null ? undefined : stableJson(source.prepared);
  const found: { key: string; prepared: PreparePatch }[] = [];
  for (const key of names) {
    let bytes: Uint8Array;
    try {
      bytes = await readFile(join(store.entryDir(key), 'blobs', SOURCE_BLOB));
    } catch {
      continue;
    }
    const r = parseSource(bytes);
    if (r === undefined || r.onnx !== source.onnx || r.prepared === null || stableJson(r.options) !== options || stableJson(r.prepared) === own) continue;
    found.push({ key, prepared: r.prepared });
  }
  return found;
};

const sameNames = (a: readonly string[], b: readonly string[]): boolean => a.length === b.length && a.every((n, i) => n === b[i]);

/** Why an entry's engine cannot serve the current network, or undefined when it can. */
export const namesDiffer = (cached: CanonicalNames, current: CanonicalNames): string | undefined =>
  !sameNames(cached.layers, current.layers) ? 'its layers are named differently'
  : !sameNames(cached.inputs, current.inputs) ? 'its inputs are named differently'
  : !sameNames(cached.outputs, current.outputs) ? 'its outputs are named differently'
  : undefined;

/** A builder that loads each engine from a verified entry and refits it with the network's weights. */
export const loadingBuilder = (entry: CacheEntry, key: CacheKey, positions: ReadonlyMap<number, number>): EngineBuilder => {
  const bindings = bindingsOf(entry);
  return (network, segment) => {
    const at = position(positions, segment);
    const cachedNames = bindings.segments[at];
    const plan = entry.blobs.get(engineBlobName(at));
    if (cachedNames === undefined || plan === undefined) throw new Error(`cache entry ${entry.key.slice(0, 12)} has no engine for segment ${segment}`);
    const differ = namesDiffer(cachedNames, key.names[at]);
    if (differ !== undefined) throw new Error(`cache entry ${entry.key.slice(0, 12)}: the engine of segment ${segment} was built from a model whose network has the same structure but ${differ}`);
    const engine: Engine = NativeEngine.deserialize(plan);
    try {
      engine.refit(networkWeights(network).map((w) => ({ layer: w.layer, role: w.role, weights: w.weights })));
      return engine;
    } catch (e) {
      engine[Symbol.dispose]();
      throw e;
    }
  };
};
