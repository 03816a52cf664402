/**
 * Read-back verification (Engine.weightDigests) against the TypeScript oracle (heldValueDigest): on random
 * networks at every precision and kernel format the engine reports the digests of the values it was built
 * with as it holds them, then those of the refitted values; a stripped engine refuses until it is filled;
 * a streaming engine reports the same digests at any budget; Engine.heldForms() agrees with the layouts
 * packedLayouts(net) derives from the network; kernels staged already quantized read back dequantized.
 */
import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { buildEngine, Engine, NativeError, Status, type BuildOptions, type WeightPrecision } from '../ffi/index.js';
import type { KernelFormat, QuantizedWeights } from '../ffi/engine.js';
import { networkWeights, type NetworkDefinition } from '../src/network/types.js';
import { expectedHeldDigests, heldQuantizedDigest, heldValueDigest, networkValues, packedLayouts } from '../src/verify/expected.js';
import { packInt4, quantize } from '../src/quant/reference.js';
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

describe('heldForms(): how the engine holds each weight', () => {
  test.prop([anyNetwork(), fc.constantFrom(...configs)], { numRuns: runs(40) })('agrees with packedLayouts(net) and gives the digests read back', (n, c) => {
    using engine = buildEngine(n.net, optionsOf(c));
    const forms = engine.heldForms();
    const layouts = packedLayouts(n.net);
    for (const [k, form] of forms) expect([k, form.packed]).toEqual([k, layouts.get(k)]);
    expect(forms.size).toBe(networkWeights(n.net).length);
    const fromEngine = new Map(networkWeights(n.net).map((w) => [key(w.layer, w.role), heldValueDigest(networkValues(w.weights), forms.get(key(w.layer, w.role))!)]));
    expect(sorted(engine.weightDigests())).toEqual(sorted(fromEngine));
  });
});

describe('kernels staged already quantized', () => {
  const formats = fc.constantFrom(...configs.filter((c) => c.format !== undefined));
  test.prop([families.mlp(), formats, seed], { numRuns: runs(20) })('read back as value(q) * scale', (n, c, seedB) => {
    using engine = buildEngine(n.net, optionsOf(c));
    const forms = engine.heldForms();
    const netB = reweight(n.net, seedB);
    const staged = new Map<string, QuantizedWeights>();
    {
      using refitter = engine.createRefitter();
      for (const w of networkWeights(netB)) {
        const form = forms.get(key(w.layer, w.role))!;
        if (form.packed === undefined) {
          refitter.setWeights(w.layer, w.role, w.weights);
          continue;
        }
        const g = { channels: form.packed.channels, depth: form.packed.depth, transposed: form.packed.transposed };
        const format = { kind: c.format!, groupSize: c.group ?? 128 } as const;
        const q = quantize(format, floatValues(w.weights), g);
        const values = c.format === 'int4' ? packInt4(q.values as Int8Array, g) : q.values;
        const qw: QuantizedWeights = { format: c.format!, groupSize: c.group ?? 128, values, scales: q.scales };
        refitter.setQuantizedWeights(w.layer, w.role, qw);
        staged.set(key(w.layer, w.role), qw);
      }
      refitter.apply();
    }
    expect(staged.size).toBeGreaterThan(0);
    const digests = engine.weightDigests();
    for (const [k, qw] of staged) expect([k, digests.get(k)]).toEqual([k, heldQuantizedDigest(qw, forms.get(k)!)]);
    // dequantize(quantize(w)) is what a float refit of the same values holds too
    expect(sorted(digests)).toEqual(sorted(expectedDigests(engine, netB, c.precision)));
  });
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

describe('read-back of selected weights', () => {
  it('digests only the weights asked for, each equal to the full read-back; a corrupt fold is still caught through any member', async () => {
    const { compile } = await import('../src/compile/compile.js');
    const { join } = await import('node:path');
    const { fixturesDir } = await import('./support/safetensors.js');
    for (const name of ['gpt2_tiny', 'cnn_bn']) {
      using model = await compile(join(fixturesDir, name, 'model_legacy.onnx').replace('gpt2_tiny/model_legacy', 'gpt2_tiny/model_dynamo'), join(fixturesDir, name, 'weights_v1.safetensors'));
      for (const stage of model.engineStages()) {
        const all = stage.engine.weightDigests();
        const keys = [...all.keys()].filter((_, i) => i % 3 === 1);
        const some = stage.engine.weightDigests({ only: new Set(keys) });
        expect([...some.keys()].sort()).toEqual([...keys].sort());
        for (const k of keys) expect(some.get(k)).toBe(all.get(k));
      }
    }
  });
});
