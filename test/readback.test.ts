/**
 * Read-back verification (Engine.weightDigests) against the TypeScript oracle (heldValueDigest): on random
 * networks at every precision and kernel format the engine reports the digests of the values it was built
 * with as it holds them, then those of the refitted values; a stripped engine refuses until it is filled;
 * a streaming engine reports the same digests at any budget.
 */
import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { buildEngine, Engine, NativeError, Status, type BuildOptions, type WeightPrecision } from '../ffi/index.js';
import type { KernelFormat } from '../ffi/engine.js';
import { networkWeights, type NetworkDefinition } from '../src/network/types.js';
import { expectedHeldDigests } from '../src/verify/expected.js';
import { valueDigest } from '../src/weightmap/digest.js';
import { allUpdates, anyNetwork, families, floatValues, reweight } from './support/networks.js';

const runs = (n: number) => (process.env.TRT_REFIT_FUZZ === '1' ? n * 20 : n);
const seed = fc.integer({ min: 0, max: 0x7fffffff });
const key = (layer: string, role: string) => `${layer}\u0000${role}`;

/** The digests heldValueDigest expects for every weight of `net` in `engine`. */
const expectedDigests = (engine: Engine, net: NetworkDefinition, precision: WeightPrecision): Map<string, string> =>
  expectedHeldDigests(net, precision, engine.kernelFormats());

const sorted = (m: Map<string, string>) => [...m.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));

const configs: ReadonlyArray<{ label: string; precision: WeightPrecision; format?: KernelFormat; group?: 32 | 64 | 128 }> = [
  { label: 'float32', precision: 'float32' },
  { label: 'float16', precision: 'float16' },
  { label: 'bfloat16', precision: 'bfloat16' },
  { label: 'int8', precision: 'float32', format: 'int8' },
  { label: 'fp8_e4m3', precision: 'float32', format: 'fp8_e4m3' },
  { label: 'int4/32', precision: 'float32', format: 'int4', group: 32 },
  { label: 'int4/128 on float16', precision: 'float16', format: 'int4', group: 128 },
];

const optionsOf = (c: (typeof configs)[number], extra: BuildOptions = {}): BuildOptions => ({
  weightPrecision: c.precision,
  ...(c.format !== undefined ? { weightFormat: c.format } : {}),
  ...(c.group !== undefined ? { int4GroupSize: c.group } : {}),
  ...extra,
});

describe('weightDigests() == heldValueDigest of the values built with, then refitted', () => {
  for (const c of configs) {
    test.prop([anyNetwork(), seed], { numRuns: runs(25) })(c.label, (n, seedB) => {
      using engine = buildEngine(n.net, optionsOf(c));
      expect(sorted(engine.weightDigests())).toEqual(sorted(expectedDigests(engine, n.net, c.precision)));
      const netB = reweight(n.net, seedB);
      engine.refit(allUpdates(netB));
      expect(sorted(engine.weightDigests())).toEqual(sorted(expectedDigests(engine, netB, c.precision)));
    });
  }
  test.prop([anyNetwork({ weightDType: 'float16' }), seed, fc.constantFrom(...configs)], { numRuns: runs(20) })('weights declared float16', (n, seedB, c) => {
    using engine = buildEngine(n.net, optionsOf(c));
    expect(sorted(engine.weightDigests())).toEqual(sorted(expectedDigests(engine, n.net, c.precision)));
    const netB = reweight(n.net, seedB);
    engine.refit(allUpdates(netB));
    expect(sorted(engine.weightDigests())).toEqual(sorted(expectedDigests(engine, netB, c.precision)));
  });
  test.prop([anyNetwork(), seed, fc.constantFrom(...configs), fc.double({ min: 0, max: 1, noNaN: true })], { numRuns: runs(20) })(
    'a streaming engine at any budget',
    (n, seedB, c, fraction) => {
      using engine = buildEngine(n.net, optionsOf(c, { weightStreaming: true }));
      engine.setWeightStreamingBudget(Math.floor(fraction * engine.streamableWeightBytes()));
      engine.run(n.inputs); // fills the resident arena, which is then what is read
      expect(sorted(engine.weightDigests())).toEqual(sorted(expectedDigests(engine, n.net, c.precision)));
      const netB = reweight(n.net, seedB);
      engine.refit(allUpdates(netB));
      expect(sorted(engine.weightDigests())).toEqual(sorted(expectedDigests(engine, netB, c.precision)));
    },
  );
});

describe('a stripped engine', () => {
  test.prop([anyNetwork(), seed, fc.constantFrom(...configs)], { numRuns: runs(15) })('refuses to report until a refit fills it', (n, seedB, c) => {
    using built = buildEngine(n.net, optionsOf(c));
    using stripped = Engine.deserialize(built.serialize({ includeWeights: false }));
    let error: unknown;
    try {
      stripped.weightDigests();
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(NativeError);
    expect((error as NativeError).status).toBe(Status.STATE);
    expect((error as NativeError).message).toMatch(/weight '/);
    const netB = reweight(n.net, seedB);
    stripped.refit(networkWeights(netB).map(({ layer, role, weights }) => ({ layer, role, weights })));
    expect(sorted(stripped.weightDigests())).toEqual(sorted(expectedDigests(stripped, netB, c.precision)));
  });
});

describe('the oracle', () => {
  it('tells held values from the values given where the engine rounds or quantizes', () => {
    const [m] = fc.sample(families.mlp(), { numRuns: 1, seed: 5 });
    const kernel = networkWeights(m.net).find((w) => w.role === 'kernel')!;
    const k = key(kernel.layer, kernel.role);
    const given = valueDigest(floatValues(kernel.weights));
    for (const c of configs) {
      using engine = buildEngine(m.net, optionsOf(c));
      const got = engine.weightDigests().get(k);
      expect(got).toBe(expectedDigests(engine, m.net, c.precision).get(k));
      expect(got === given).toBe(c.precision === 'float32' && c.format === undefined);
    }
  });
  it('reports digests in the format of valueDigest, one per refittable weight', () => {
    const [q] = fc.sample(families.qkv(), { numRuns: 1, seed: 7 });
    using engine = buildEngine(q.net);
    const digests = engine.weightDigests();
    expect(digests.size).toBe(engine.weights().length);
    for (const d of digests.values()) expect(d).toMatch(/^c1:[0-9a-f]{32}$/);
    for (const w of networkWeights(q.net)) expect(digests.get(key(w.layer, w.role))).toBe(valueDigest(floatValues(w.weights)));
  });
});
