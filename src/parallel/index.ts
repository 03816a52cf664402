/**
 * Tensor-parallel ranks through the engine cache: every rank's networks share one structure, so the
 * first rank builds and inserts, and the others are hits refitted with their own slices.
 */
import * as E from 'fp-ts/lib/Either.js';
import type { BuildOptions } from '../../ffi/engine.js';
import type { CacheStore } from '../cache/store.js';
import { compileWithCache, type CompileResult } from '../cache/compile.js';
import { nativeEngineSteps, type NativeCacheContext, type NativeEngines } from '../cache/engines.js';
import { rankNetworks, shardCheckpoint, ParallelShardError, type Checkpoint, type RankRunner, type TransformerSpec } from './transformer.js';

export * from './transformer.js';

export interface ParallelModel extends Disposable {
  readonly ranks: readonly CompileResult<NativeEngines>[];
  readonly runners: readonly RankRunner[];
}

/** Compiles every rank in order (rank 0 first) with the cache. */
export const compileRanks = async (spec: TransformerSpec, checkpoint: Checkpoint, ranks: number, cache: CacheStore | undefined, options: BuildOptions = {}, context: NativeCacheContext = {}): Promise<ParallelModel> => {
  const results: CompileResult<NativeEngines>[] = [];
  const dispose = () => results.forEach((r) => r.value[Symbol.dispose]());
  try {
    for (let rank = 0; rank < ranks; rank++) {
      const shard = shardCheckpoint(spec, checkpoint, rank, ranks);
      if (E.isLeft(shard)) throw new ParallelShardError(shard.left);
      results.push(await compileWithCache(cache, nativeEngineSteps(rankNetworks(spec, shard.right, ranks), options, context)));
    }
  } catch (e) {
    dispose();
    throw e;
  }
  const runners = results.map((r): RankRunner => (index, x) => r.value.engines[index].run({ x }).partial);
  return { ranks: results, runners, [Symbol.dispose]: dispose };
};
