/** Compile with the cache: a second compile of a model with other weights is a hit whose outputs equal a
 *  fresh build with those weights (every fixture, and random networks renamed and reordered); a hit the
 *  loader refuses is rebuilt, never served. */
import { readFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import * as E from 'fp-ts/lib/Either.js';
import { CacheStore } from '../src/cache/store.js';
import { compileWithCache } from '../src/cache/compile.js';
import { nativeEngineSteps } from '../src/cache/engines.js';
import { compileModelWithCache } from '../src/cache/model.js';
import { decodeOnnx } from '../src/trace/decode.js';
import { directoryResolver } from '../src/trace/load.js';
import { analyzeGraph } from '../src/trace/analyze.js';
import { isFloat, type Graph, type Tensor } from '../src/trace/ir.js';
import { buildEngine } from '../ffi/index.js';
import { anyNetwork, firstDifference, reweight, rng } from './support/networks.js';
import { renameInternals, reorderLayers, temporaryCache } from './support/cache.js';
import { fixtureInputs } from './support/cache-fixtures.js';
import { fixtureModels, originalFixtures } from './support/weightmap.js';

const runs = (n: number) => (process.env.TRT_REFIT_FUZZ === '1' ? n * 20 : n);
const seed = fc.integer({ min: 0, max: 0x7fffffff });

/** The graph with every float initializer scaled by a seeded factor per element: "other weights". */
const otherWeights = (graph: Graph, s: number): Graph => {
  const rand = rng(s);
  return {
    ...graph,
    initializers: graph.initializers.map((init) => {
      if (init.tensor.dtype !== 'float32' || !isFloat(init.tensor.dtype)) return init;
      const data = Float32Array.from(init.tensor.data as Float32Array, (v) => v * (0.9 + 0.2 * rand()));
      return { ...init, tensor: { ...init.tensor, data } as Tensor };
    }),
  };
};

const analyze = (graph: Graph) => {
  const a = analyzeGraph(graph);
  if (E.isLeft(a)) throw new Error(JSON.stringify(a.left));
  return a.right;
};

describe('every fixture: a second compile with other weights is a hit that equals a fresh build', () => {
  it.each(fixtureModels(originalFixtures).map((f) => [`${f.model}/${f.file}`, f] as const))('%s', async (_, f) => {
    using dir = temporaryCache();
    const cache = new CacheStore({ root: dir.path });
    const decoded = decodeOnnx(new Uint8Array(readFileSync(f.path)), directoryResolver(dirname(f.path)));
    if (E.isLeft(decoded)) throw new Error('decode');
    const inputs = await fixtureInputs(f.model);
    const first = await compileModelWithCache(analyze(decoded.right), cache);
    first.value[Symbol.dispose]();
    expect(first.cache).toBe('miss');
    const other = otherWeights(decoded.right, 11);
    const second = await compileModelWithCache(analyze(other), cache);
    using hit = second.value;
    expect(second.cache).toBe('hit');
    expect(second.timings.loadMs).toBeDefined();
    using fresh = (await compileModelWithCache(analyze(other), undefined)).value;
    const got = await hit.model.run(inputs);
    const want = await fresh.model.run(inputs);
    for (const name of Object.keys(want)) {
      expect(Buffer.from(got[name].data.buffer, got[name].data.byteOffset, got[name].data.byteLength).equals(Buffer.from(want[name].data.buffer, want[name].data.byteOffset, want[name].data.byteLength)), name).toBe(true);
    }
    // And the weights really changed the outputs (so the hit did not serve the first model's weights).
    using original = (await compileModelWithCache(analyze(decoded.right), undefined)).value;
    const before = await original.model.run(inputs);
    expect(Object.keys(want).some((name) => !Buffer.from(before[name].data.buffer).equals(Buffer.from(want[name].data.buffer)))).toBe(true);
  });
});

describe('random networks', () => {
  test.prop([anyNetwork(), seed, seed], { numRuns: runs(25) })('renamed, reordered, reweighted: a hit whose outputs equal a fresh build', async (c, s1, s2) => {
    using dir = temporaryCache();
    const cache = new CacheStore({ root: dir.path });
    const first = await compileWithCache(cache, nativeEngineSteps([c.net]));
    first.value[Symbol.dispose]();
    expect(first.cache).toBe('miss');
    const other = reorderLayers(renameInternals(reweight(c.net, s1), s2), s2 + 1);
    const second = await compileWithCache(cache, nativeEngineSteps([other]));
    using engines = second.value;
    expect(second.cache).toBe('hit');
    using fresh = buildEngine(other);
    expect(firstDifference(engines.engines[0].run(c.inputs), fresh.run(c.inputs))).toBeUndefined();
  });

  it('a hit the loader refuses is removed and rebuilt, not served', async () => {
    using dir = temporaryCache();
    const cache = new CacheStore({ root: dir.path });
    const c = fc.sample(anyNetwork(), { numRuns: 1, seed: 3 })[0];
    const steps = nativeEngineSteps([c.net]);
    (await compileWithCache(cache, steps)).value[Symbol.dispose]();
    // Same key, but a payload the engine cannot load (blobs pass their checksums: the loader refuses).
    const key = steps.keyValue();
    await cache.remove(key.digest);
    await cache.put(key, [{ name: 'engine-0.plan', data: new Uint8Array([1, 2, 3]) }, { name: 'bindings.json', data: new TextEncoder().encode('{"version":1,"segments":[]}') }]);
    const r = await compileWithCache(cache, nativeEngineSteps([c.net]));
    using engines = r.value;
    expect(r.cache).toBe('miss');
    expect(r.missReason).toBe('unloadable');
    using fresh = buildEngine(c.net);
    expect(firstDifference(engines.engines[0].run(c.inputs), fresh.run(c.inputs))).toBeUndefined();
    const again = await compileWithCache(cache, nativeEngineSteps([c.net]));
    again.value[Symbol.dispose]();
    expect(again.cache).toBe('hit');
  });

  it('without a cache it builds and says off', async () => {
    const c = fc.sample(anyNetwork(), { numRuns: 1, seed: 5 })[0];
    const r = await compileWithCache(undefined, nativeEngineSteps([c.net]));
    r.value[Symbol.dispose]();
    expect(r.cache).toBe('off');
    expect(r.timings.buildMs).toBeGreaterThan(0);
  });
});
