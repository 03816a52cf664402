/**
 * A traced model (analyzed graph) compiled with the cache: engine segments on the native engine, fallback
 * segments on ONNX Runtime (their sessions are made from the current graph either way; only engines are
 * cached). The key covers every live segment, engine and fallback, and their wiring.
 */
import * as E from 'fp-ts/lib/Either.js';
import type { BuildOptions } from '../../ffi/engine.js';
import type { AnalyzedGraph } from '../trace/analyze.js';
import { partitionGraph, PartitionError, type PartitionOptions, type Segment } from '../partition/index.js';
import { compileModel, type CompiledModel, type EngineRunner } from '../partition/compiled.js';
import { lowerContext, lowerSegment, LowerError } from '../network/lower.js';
import type { NetworkDefinition } from '../network/types.js';
import type { CacheStore, Blob } from './store.js';
import { compileWithCache, type CompileResult } from './compile.js';
import type { CacheKey, SegmentStructure } from './key.js';
import { bindingsBlob, buildStripped, engineBlobName, loadAndRefit, nativeKey, type CachedEngine, type NativeCacheContext } from './engines.js';

export interface ModelCacheOptions extends PartitionOptions, NativeCacheContext {
  readonly build?: BuildOptions;
}

/** The live segments (results read by someone), lowered, in run order, as the key sees them. */
export const modelStructure = (analyzed: AnalyzedGraph, options: PartitionOptions = {}): { segments: Segment[]; structures: SegmentStructure[]; networks: Map<number, NetworkDefinition> } => {
  const ctx = lowerContext(analyzed);
  const parted = partitionGraph(analyzed, options, ctx);
  if (E.isLeft(parted)) throw new PartitionError(parted.left);
  const segments = parted.right.segments.filter((s) => s.outputs.length > 0);
  const networks = new Map<number, NetworkDefinition>();
  const structures = segments.map((segment): SegmentStructure => {
    if (segment.kind === 'engine') {
      const lowered = lowerSegment(ctx, segment);
      if (E.isLeft(lowered)) throw new LowerError(lowered.left);
      networks.set(segment.index, lowered.right.network);
      return { kind: 'engine', network: lowered.right.network };
    }
    const typeOf = (name: string) => ({ name, type: analyzed.types.get(name)! });
    return { kind: 'fallback', opset: analyzed.graph.opset, nodes: segment.nodes, inputs: segment.inputs.map(typeOf), outputs: segment.outputs, constants: segment.constants.map(typeOf) };
  });
  return { segments, structures, networks };
};

export interface CachedModel extends Disposable {
  readonly model: CompiledModel;
  readonly engines: readonly CachedEngine[];
}

/** Compiles `analyzed` with the cache (undefined: no cache). On a hit every engine segment is a stripped
 *  engine from the cache refitted with this graph's weights. */
export const compileModelWithCache = (analyzed: AnalyzedGraph, cache: CacheStore | undefined, options: ModelCacheOptions = {}): Promise<CompileResult<CachedModel>> => {
  const build = options.build ?? {};
  // Lowering and hashing happen in the key step, so the hit's timings include them.
  let state: { key: CacheKey; position: Map<number, number> } | undefined;
  const keyed = () => {
    if (state !== undefined) return state;
    const structure = modelStructure(analyzed, options);
    // Position of each live segment in the key (segment.index counts dead segments too).
    state = { key: nativeKey(structure.structures, build, options), position: new Map(structure.segments.map((s, i) => [s.index, i])) };
    return state;
  };
  const compileWith = async (engineFor: (network: NetworkDefinition, index: number) => CachedEngine): Promise<CachedModel> => {
    const engines: CachedEngine[] = [];
    try {
      const model = await compileModel(analyzed, {
        ...options,
        engine: (network, segment): EngineRunner => {
          const e = engineFor(network, keyed().position.get(segment.index)!);
          engines.push(e);
          return e;
        },
      });
      return { model, engines, [Symbol.dispose]: () => model[Symbol.dispose]() };
    } catch (e) {
      engines.forEach((x) => x[Symbol.dispose]());
      throw e;
    }
  };
  return compileWithCache(cache, {
    key: () => keyed().key,
    build: async () => {
      const blobs: Blob[] = [];
      const value = await compileWith((network, i) => {
        const built = buildStripped(network, build);
        blobs.push({ name: engineBlobName(i), data: built.plan });
        return built.engine;
      });
      blobs.push(bindingsBlob(keyed().key.names));
      return { value, blobs };
    },
    load: (entry) => compileWith((network, i) => loadAndRefit(entry, i, network, keyed().key.names[i])),
  });
};
