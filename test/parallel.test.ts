/** Tensor-parallel shards (Megatron column/row-parallel linears): for N = 2 and 4 ranks, one build and
 *  N-1 cache hits, and the ranks' combined outputs equal the unsplit model's. */
import { describe, expect, it } from 'vitest';
import * as E from 'fp-ts/lib/Either.js';
import { buildEngine } from '../ffi/index.js';
import { CacheStore } from '../src/cache/store.js';
import { networksKey } from '../src/cache/key.js';
import { compileRanks, fullNetwork, randomCheckpoint, rankNetworks, runParallel, shardCheckpoint, shardExpressions, type TransformerSpec } from '../src/parallel/index.js';
import { evaluate } from '../src/reference/index.js';
import { temporaryCache } from './support/cache.js';
import { rng } from './support/networks.js';

const spec: TransformerSpec = { layers: 2, hidden: 32, heads: 4, ffn: 64, seq: 5 };

const input = (seed: number): Float32Array => {
  const r = rng(seed);
  return Float32Array.from({ length: spec.seq * spec.hidden }, () => 2 * r() - 1);
};

const maxError = (a: Float32Array, b: Float32Array): number => {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]) / (1e-3 + Math.abs(b[i])));
  return m;
};

describe('tensor-parallel ranks', () => {
  const checkpoint = randomCheckpoint(spec, 1234);
  const x = input(99);
  const want = (() => {
    using unsplit = buildEngine(fullNetwork(spec, checkpoint));
    return unsplit.run({ x }).y;
  })();

  it('the unsplit network agrees with the reference evaluator (the baseline is right)', () => {
    const ref = evaluate(fullNetwork(spec, checkpoint), { x }).y;
    expect(maxError(want, ref)).toBeLessThan(1e-4);
  });

  it.each([2, 4])('N = %i: rank 0 builds, the other ranks are hits, and the combined outputs equal the unsplit model', async (n) => {
    using dir = temporaryCache();
    const cache = new CacheStore({ root: dir.path });
    using model = await compileRanks(spec, checkpoint, n, cache);
    expect(model.ranks.map((r) => r.cache)).toEqual(['miss', ...Array(n - 1).fill('hit')]);
    expect((await cache.ls()).length).toBe(1);
    const got = runParallel(spec, checkpoint, model.runners, x);
    expect(maxError(got, want)).toBeLessThan(1e-4);
    // Each rank really holds different weights: rank outputs differ.
    const partials = model.runners.map((run) => run(0, x));
    expect(Buffer.from(partials[0].buffer).equals(Buffer.from(partials[1].buffer))).toBe(false);
  });

  it('rank networks have one structure; the split changes it (N = 2 and N = 4 differ)', () => {
    const context = { build: {}, backend: { name: 't', version: '1', abi: 1 }, device: { kind: 'cpu', model: 'm', features: [] } };
    const key = (n: number, rank: number) => {
      const shard = shardCheckpoint(spec, checkpoint, rank, n);
      if (E.isLeft(shard)) throw new Error('shard');
      const k = networksKey(rankNetworks(spec, shard.right, n), context);
      if (E.isLeft(k)) throw new Error('key');
      return k.right.digest;
    };
    expect(new Set([0, 1, 2, 3].map((r) => key(4, r))).size).toBe(1);
    expect(key(2, 0)).not.toBe(key(4, 0));
  });

  it('refuses a split that does not divide the heads', () => {
    const r = shardExpressions({ ...spec, heads: 3, hidden: 30 }, 0, 2);
    expect(E.isLeft(r) && r.left._tag).toBe('IndivisibleShape');
  });
});
