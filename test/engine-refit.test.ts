/**
 * Refit guarantees on random networks: refit equals rebuild bit for bit (every precision, tactic search on
 * and off), partial refits equal a rebuild with the merged weights, and a refit that fails validation
 * changes nothing and names the weight.
 */
import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { buildEngine, Engine, NativeError, type WeightPrecision } from '../ffi/index.js';
import { networkWeights, type NetworkDefinition, type Weights } from '../src/network/types.js';
import { allUpdates, anyNetwork, families, firstDifference, randomWeights, reweight, rng, rerollWeight, withWeights } from './support/networks.js';

const runs = (n: number) => (process.env.TRT_REFIT_FUZZ === '1' ? n * 20 : n);
const seed = fc.integer({ min: 0, max: 0x7fffffff });

const refitAll = (engine: Engine, net: NetworkDefinition) => engine.refit(allUpdates(net).map(({ layer, role, weights }) => ({ layer, role, weights })));

/** The error thrown by fn (fails the test when none is). */
const errorOf = (fn: () => unknown): NativeError => {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(NativeError);
    return e as NativeError;
  }
  return expect.fail('expected a NativeError');
};

describe('refit(build(net, A), B) == build(net, B), bit for bit', () => {
  for (const precision of ['float32', 'float16', 'bfloat16'] as WeightPrecision[]) {
    for (const tacticSearch of [false, true]) {
      test.prop([anyNetwork(), seed], { numRuns: runs(tacticSearch ? 20 : 40) })(`${precision}, tacticSearch ${tacticSearch}`, (c, seedB) => {
        const netB = reweight(c.net, seedB);
        using refitted = buildEngine(c.net, { weightPrecision: precision, tacticSearch });
        refitAll(refitted, netB);
        using rebuilt = buildEngine(netB, { weightPrecision: precision, tacticSearch });
        expect(firstDifference(refitted.run(c.inputs), rebuilt.run(c.inputs))).toBeUndefined();
      });
    }
  }
  test.prop([anyNetwork({ weightDType: 'float16' }), seed], { numRuns: runs(10) })('float16 weights supplied as float16', (c, seedB) => {
    const netB = reweight(c.net, seedB);
    using refitted = buildEngine(c.net);
    refitAll(refitted, netB);
    using rebuilt = buildEngine(netB);
    expect(firstDifference(refitted.run(c.inputs), rebuilt.run(c.inputs))).toBeUndefined();
  });
  test.prop([anyNetwork(), seed], { numRuns: runs(20) })('a context created before the refit sees the new weights', (c, seedB) => {
    const netB = reweight(c.net, seedB);
    using engine = buildEngine(c.net);
    using context = engine.createContext();
    context.run(c.inputs);
    refitAll(engine, netB);
    using rebuilt = buildEngine(netB);
    expect(firstDifference(context.run(c.inputs), rebuilt.run(c.inputs))).toBeUndefined();
  });
  test.prop([anyNetwork(), seed], { numRuns: runs(20) })('a refitted engine serializes to one that runs like build(net, B)', (c, seedB) => {
    const netB = reweight(c.net, seedB);
    using engine = buildEngine(c.net);
    refitAll(engine, netB);
    using loaded = Engine.deserialize(engine.serialize());
    using rebuilt = buildEngine(netB);
    expect(firstDifference(loaded.run(c.inputs), rebuilt.run(c.inputs))).toBeUndefined();
  });
  test.prop([families.conv(), seed], { numRuns: runs(10) })('refitting back to A restores build(net, A) exactly', (c, seedB) => {
    using engine = buildEngine(c.net);
    const before = engine.run(c.inputs);
    refitAll(engine, reweight(c.net, seedB));
    refitAll(engine, c.net);
    expect(firstDifference(engine.run(c.inputs), before)).toBeUndefined();
  });
});

describe('partial refit == rebuild with merged weights', () => {
  const buildOptions = fc.record({ weightPrecision: fc.constantFrom('float32', 'float16', 'bfloat16' as const), tacticSearch: fc.boolean() });
  test.prop([anyNetwork(), seed, seed, buildOptions], { numRuns: runs(80) })('a random subset of weights, missing() filled from A', (c, seedB, pick, options) => {
    const all = networkWeights(c.net).filter((w) => w.weights.dtype !== 'int32' && w.weights.dtype !== 'int64');
    if (all.length === 0) return;
    const choose = rng(pick);
    const chosen = new Set(all.filter(() => choose() < 0.5).map((w) => `${w.layer}/${w.role}`));
    if (chosen.size === 0) chosen.add(`${all[0].layer}/${all[0].role}`);
    const rand = rng(seedB);
    const merged = withWeights(c.net, (layer, role, w) => (chosen.has(`${layer}/${role}`) ? rerollWeight(rand, w) : w));
    using engine = buildEngine(c.net, options);
    {
      using refitter = engine.createRefitter();
      for (const w of networkWeights(merged)) if (chosen.has(`${w.layer}/${w.role}`)) refitter.setWeights(w.layer, w.role, w.weights);
      // Weights fused with the staged ones that the engine keeps no copy of: supply their current values.
      for (const m of refitter.missing()) {
        const current = networkWeights(merged).find((w) => w.layer === m.layer && w.role === m.role);
        expect(current, `missing() names ${m.layer}/${m.role}, which the network does not have`).toBeDefined();
        refitter.setWeights(m.layer, m.role, current!.weights);
      }
      expect(refitter.missing()).toEqual([]);
      refitter.apply();
    }
    using rebuilt = buildEngine(merged, options);
    expect(firstDifference(engine.run(c.inputs), rebuilt.run(c.inputs))).toBeUndefined();
  });
  test.prop([families.conv(), seed], { numRuns: runs(15) })("only a batch norm's scale", (c, seedB) => {
    const bn = c.net.layers.find((l) => l.kind === 'batchNorm');
    if (bn === undefined) return;
    const rand = rng(seedB);
    const merged = withWeights(c.net, (layer, role, w) => (layer === bn.name && role === 'scale' ? rerollWeight(rand, w) : w));
    const scale = networkWeights(merged).find((w) => w.layer === bn.name && w.role === 'scale')!;
    using engine = buildEngine(c.net);
    {
      using refitter = engine.createRefitter();
      refitter.setWeights(bn.name, 'scale', scale.weights);
      for (const m of refitter.missing()) refitter.setWeights(m.layer, m.role, networkWeights(merged).find((w) => w.layer === m.layer && w.role === m.role)!.weights);
      refitter.apply();
    }
    using rebuilt = buildEngine(merged);
    expect(firstDifference(engine.run(c.inputs), rebuilt.run(c.inputs))).toBeUndefined();
  });
});

type Fault = 'shape' | 'dtype' | 'name' | 'role' | 'nan-at-set' | 'nan-at-apply';
const faults: Fault[] = ['shape', 'dtype', 'name', 'role', 'nan-at-set', 'nan-at-apply'];

/** A bad variant of weight `w` for fault `f`, and the name the error must mention. */
const corrupt = (f: Fault, layer: string, role: string, w: Weights): { layer: string; role: string; weights: Weights; names: string } => {
  const n = w.data.length;
  switch (f) {
    case 'shape':
      return { layer, role, weights: { dtype: 'float32', shape: [n + 1], data: new Float32Array(n + 1) }, names: layer };
    case 'dtype':
      return { layer, role, weights: { dtype: 'int32', shape: w.shape, data: new Int32Array(n) }, names: layer };
    case 'name':
      return { layer: `${layer}_no_such_layer`, role, weights: w, names: `${layer}_no_such_layer` };
    case 'role': {
      // a role this layer does not have (no layer has both 'constant' and 'variance')
      return { layer, role: role === 'constant' ? 'variance' : 'constant', weights: w, names: layer };
    }
    case 'nan-at-set':
    case 'nan-at-apply': {
      const data = new Float32Array(n).fill(0.5);
      data[n >> 1] = n % 2 === 0 ? NaN : Infinity;
      return { layer, role, weights: { dtype: 'float32', shape: w.shape, data }, names: layer };
    }
  }
};

describe('a failed refit changes nothing and names the weight', () => {
  test.prop([anyNetwork(), seed, fc.constantFrom(...faults), fc.nat()], { numRuns: runs(120) })('one bad weight among good ones', (c, seedB, fault, which) => {
    const good = allUpdates(reweight(c.net, seedB)).filter((u) => u.weights.dtype === 'float32');
    if (good.length === 0) return;
    const target = good[which % good.length];
    const bad = corrupt(fault, target.layer, target.role, target.weights);
    using engine = buildEngine(c.net);
    const before = engine.run(c.inputs);
    using refitter = engine.createRefitter();
    if (fault === 'nan-at-set') refitter.setCheckFinite(true);
    for (const u of good) if (u !== target) refitter.setWeights(u.layer, u.role, u.weights);
    let error: NativeError;
    if (fault === 'nan-at-apply') {
      refitter.setWeights(bad.layer, bad.role as never, bad.weights);
      refitter.setCheckFinite(true); // finiteness is checked on everything staged at apply
      error = errorOf(() => refitter.apply());
    } else {
      error = errorOf(() => refitter.setWeights(bad.layer, bad.role as never, bad.weights));
      // the good weights are still staged; dispose without apply must not change the engine either
    }
    expect(['Validation', 'Argument', 'NotFound']).toContain(error.kind);
    expect(error.message).toContain(bad.names);
    expect(firstDifference(engine.run(c.inputs), before)).toBeUndefined();
  });
  test.prop([families.mlp(), seed], { numRuns: runs(10) })('apply after a rejected weight applies only the accepted ones', (c, seedB) => {
    const netB = reweight(c.net, seedB);
    const good = allUpdates(netB);
    using engine = buildEngine(c.net);
    {
      using refitter = engine.createRefitter();
      for (const u of good) refitter.setWeights(u.layer, u.role, u.weights);
      const first = good[0];
      const wrongCount = first.weights.data.length + 1;
      errorOf(() => refitter.setWeights(first.layer, first.role, { dtype: 'float32', shape: [wrongCount], data: new Float32Array(wrongCount) }));
      refitter.apply();
    }
    using rebuilt = buildEngine(netB);
    expect(firstDifference(engine.run(c.inputs), rebuilt.run(c.inputs))).toBeUndefined();
  });
  test.prop([anyNetwork(), seed, fc.nat()], { numRuns: runs(30) })('validate checks what apply checks, changes nothing and keeps the staged weights', (c, seedB, which) => {
    const netB = reweight(c.net, seedB);
    const good = allUpdates(netB).filter((u) => u.weights.dtype === 'float32');
    if (good.length === 0) return;
    using engine = buildEngine(c.net);
    const before = engine.run(c.inputs);
    using refitter = engine.createRefitter();
    for (const u of good) refitter.setWeights(u.layer, u.role, u.weights);
    // a non-finite value staged without the check, then the check turned on: validate must refuse it
    const target = good[which % good.length];
    const bad = corrupt('nan-at-apply', target.layer, target.role, target.weights);
    refitter.setWeights(target.layer, target.role, bad.weights);
    refitter.setCheckFinite(true);
    const error = errorOf(() => refitter.validate());
    expect(error.message).toContain(target.layer);
    expect(firstDifference(engine.run(c.inputs), before)).toBeUndefined();
    // restage the good value: validate passes, still changes nothing, and apply then gives build(net, B)
    refitter.setWeights(target.layer, target.role, target.weights);
    refitter.validate();
    expect(firstDifference(engine.run(c.inputs), before)).toBeUndefined();
    refitter.apply();
    using rebuilt = buildEngine(netB);
    expect(firstDifference(engine.run(c.inputs), rebuilt.run(c.inputs))).toBeUndefined();
  });
  it('validate on a stripped engine with a weight missing fails, names it, and keeps what was staged', () => {
    const c = fc.sample(families.conv(), { numRuns: 1, seed: 9 })[0];
    using engine = buildEngine(c.net, { stripWeights: true });
    const updates = allUpdates(c.net);
    using refitter = engine.createRefitter();
    for (const u of updates.slice(1)) refitter.setWeights(u.layer, u.role, u.weights);
    expect(errorOf(() => refitter.validate()).message).toContain(updates[0].layer);
    expect(refitter.missing()).toEqual([{ layer: updates[0].layer, role: updates[0].role }]);
    refitter.setWeights(updates[0].layer, updates[0].role, updates[0].weights);
    refitter.validate();
    expect(engine.info().hasWeights).toBe(false);
    refitter.apply();
    using full = buildEngine(c.net);
    expect(firstDifference(engine.run(c.inputs), full.run(c.inputs))).toBeUndefined();
  });
  it('missing weights on a stripped engine: apply fails, names one, and the engine still refuses to run', () => {
    const c = fc.sample(families.conv(), { numRuns: 1, seed: 7 })[0];
    using engine = buildEngine(c.net, { stripWeights: true });
    expect(engine.info().hasWeights).toBe(false);
    const updates = allUpdates(c.net);
    using refitter = engine.createRefitter();
    expect(refitter.missing().length).toBe(updates.length);
    for (const u of updates.slice(1)) refitter.setWeights(u.layer, u.role, u.weights);
    expect(refitter.missing()).toEqual([{ layer: updates[0].layer, role: updates[0].role }]);
    const error = errorOf(() => refitter.apply());
    expect(error.message).toContain(updates[0].layer);
    expect(errorOf(() => engine.run(c.inputs)).kind).toBe('State');
    expect(engine.info().hasWeights).toBe(false);
  });
});

describe('refit and execution exclude each other', () => {
  it('apply during an execution fails with State and the run completes with the old weights', async () => {
    // Large enough that a run usually outlasts the few calls between its start and the refit (the loop below
    // needs no more than that; a run that ends first costs one more attempt).
    const width = 1024;
    const layers = 4;
    const rows = 1024;
    const net = (seedW: number) => {
      const r = rng(seedW);
      const ls = Array.from({ length: layers }, (_, i) => ({
        kind: 'fullyConnected' as const,
        name: `fc${i}`,
        output: `h${i}`,
        input: i === 0 ? 'x' : `h${i - 1}`,
        outFeatures: width,
        kernel: randomWeights(r, 'float32', [width, width], -1 / 32, 1 / 32),
      }));
      return { inputs: [{ name: 'x', dtype: 'float32' as const, shape: [rows, width] }], layers: ls, outputs: [{ tensor: `h${layers - 1}`, name: 'y' }] };
    };
    const netA = net(1);
    const netB = net(2);
    const x = new Float32Array(rows * width).map((_, i) => Math.sin(i));
    using engine = buildEngine(netA);
    const expectedA = engine.run({ x });
    using context = engine.createContext();
    const y = new Float32Array(rows * width);
    context.setTensor('x', x);
    context.setTensor('y', y);
    using rebuiltB = buildEngine(netB);
    const expectedB = rebuiltB.run({ x });
    // No sleeps: each attempt starts a run and at once refits to netB. A refit that meets the run in flight
    // is refused (the property under test: the run then completes with the old weights). Otherwise the
    // refit came first: either the run met the refit being applied and was refused itself (writing
    // nothing), or it ran before or after the refit, so its output is all of A or all of B, never a mix.
    // Then netA goes back in and the next attempt starts.
    let error: unknown;
    let attempts = 0;
    for (; attempts < 50 && error === undefined; attempts++) {
      y.fill(Number.NaN);
      const running = context.executeAsync();
      try {
        engine.refit(allUpdates(netB));
      } catch (e) {
        error = e;
      }
      let runError: unknown;
      await running.catch((e: unknown) => {
        runError = e;
      });
      if (error !== undefined) {
        expect(runError).toBeUndefined();
        break;
      }
      if (runError !== undefined) {
        expect(runError).toBeInstanceOf(NativeError);
        expect((runError as NativeError).kind).toBe('State');
        expect(y.every(Number.isNaN), 'a refused run wrote no output').toBe(true);
      } else {
        const whole = firstDifference({ y }, expectedA) === undefined || firstDifference({ y }, expectedB) === undefined;
        expect(whole, 'a refit that went through beside a run left a mix of old and new weights in its output').toBe(true);
      }
      engine.refit(allUpdates(netA));
    }
    expect(error, `no refit met a run in flight in ${attempts} attempts`).toBeInstanceOf(NativeError);
    expect((error as NativeError).kind).toBe('State');
    expect(firstDifference({ y }, expectedA)).toBeUndefined();
    // once it has finished, the refit goes through
    engine.refit(allUpdates(netB));
    expect(firstDifference(engine.run({ x }), expectedB)).toBeUndefined();
  });
});

