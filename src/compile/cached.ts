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
 * damaged entry: removed and rebuilt. Tracing and mapping run on a hit too (the key needs the lowered
 * networks, and the weight map depends on the current weight values); a hit saves the build.
 */
import type { BuildOptions, Engine } from '../../ffi/engine.js';
import { Engine as NativeEngine } from '../../ffi/engine.js';
import { networkWeights } from '../network/types.js';
import { bindingsBlob, bindingsOf, engineBlobName, nativeKey, type NativeCacheContext } from '../cache/engines.js';
import type { CacheKey, CanonicalNames, SegmentStructure } from '../cache/key.js';
import { CacheStore, type Blob, type CacheEntry } from '../cache/store.js';
import type { CompilePlan, EngineBuilder } from './compile.js';

export const WEIGHT_MAP_BLOB = 'weightmap.json';

/** Where compile keeps engines: a directory (with an optional byte budget), an open store, or none. */
export type CompileCacheOption = false | { readonly dir: string; readonly maxBytes?: number } | CacheStore;

export const cacheStoreOf = (option: CompileCacheOption | undefined): CacheStore | undefined =>
  option === undefined || option === false ? undefined
  : option instanceof CacheStore ? option
  : new CacheStore({ root: option.dir, ...(option.maxBytes !== undefined ? { maxBytes: option.maxBytes } : {}) });

/** The plan's live segments as the key sees them, in run order. */
export const planStructures = (plan: CompilePlan): SegmentStructure[] =>
  plan.segments.map(({ segment, lowered }): SegmentStructure => {
    if (lowered !== undefined) return { kind: 'engine', network: lowered.network };
    const typed = (name: string) => ({ name, type: plan.analyzed.types.get(name)! });
    return { kind: 'fallback', opset: plan.analyzed.graph.opset, nodes: segment.nodes, inputs: segment.inputs.map(typed), outputs: segment.outputs, constants: segment.constants.map(typed) };
  });

/** The cache key of a compile plan built with `options`. */
export const planKey = (plan: CompilePlan, options: BuildOptions, context: NativeCacheContext = {}): CacheKey => nativeKey(planStructures(plan), options, context);

/** segment.index -> position in the key (and in the entry's blob names). */
export const segmentPositions = (plan: CompilePlan): ReadonlyMap<number, number> => new Map(plan.segments.map((s, i) => [s.segment.index, i]));

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

/** The blobs besides the engines: the canonical names (what a hit checks) and the weight map. */
export const entryBlobs = (key: CacheKey, plan: CompilePlan): Blob[] => [
  bindingsBlob(key.names),
  { name: WEIGHT_MAP_BLOB, data: new TextEncoder().encode(JSON.stringify(plan.weightMap)) },
];

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
