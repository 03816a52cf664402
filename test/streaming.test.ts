/**
 * Weight streaming through the engine API: outputs bit-identical at every budget on random networks, the
 * engine's accounting within budget + window, budget changes refused during a run (and a model's other
 * engines rolled back), scoped budgets restored exactly (also when fn throws), and refit of a streaming
 * engine equal to a rebuild.
 */
import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { buildEngine, Engine, NativeError } from '../ffi/index.js';
import type { NetworkDefinition } from '../src/network/types.js';
import { acquireWeightBudget, applyWeightBudget, withWeightStreaming, WeightStreamingError } from '../src/streaming/index.js';
import { allUpdates, anyNetwork, families, firstDifference, randomWeights, reweight, rng } from './support/networks.js';

const runs = (n: number) => (process.env.TRT_REFIT_FUZZ === '1' ? n * 20 : n);
const seed = fc.integer({ min: 0, max: 0x7fffffff });
const permille = fc.integer({ min: 0, max: 1000 });
const share = (total: number, k: number) => Math.floor((total * k) / 1000);

/** Budgets worth trying for an engine: none, all, and random points in between. */
const budgetsFor = (total: number, picks: readonly number[]) => [0, total, ...picks.map((k) => share(total, k))];

const expectWithinAccounting = (engine: Engine, budget: number) => {
  const s = engine.weightStreamingStats();
  expect(s.budgetBytes).toBe(budget);
  expect(s.residentBytes).toBeLessThanOrEqual(budget);
  expect(s.residentBytes + s.streamedBytes).toBe(s.streamableBytes);
  expect(s.peakBytes).toBeLessThanOrEqual(budget + s.windowBytes);
  expect(s.allocatedBytes).toBeLessThanOrEqual(s.peakBytes);
  expect(engine.weightStreamingScratchBytes()).toBe(s.windowBytes);
};

describe('outputs do not depend on the budget', () => {
  test.prop([anyNetwork(), fc.array(permille, { minLength: 1, maxLength: 4 })], { numRuns: runs(40) })('random networks, random budgets', (c, picks) => {
    using reference = buildEngine(c.net);
    using engine = buildEngine(c.net, { weightStreaming: true });
    const want = reference.run(c.inputs);
    const total = engine.streamableWeightBytes();
    expect(engine.weightStreamingBudget()).toBe(total); // a new engine streams nothing
    using context = engine.createContext();
    for (const budget of budgetsFor(total, picks)) {
      engine.setWeightStreamingBudget(budget);
      expect(firstDifference(context.run(c.inputs), want), `budget ${budget} of ${total}`).toBeUndefined();
      expect(firstDifference(context.run(c.inputs), want), `second run, budget ${budget} of ${total}`).toBeUndefined();
      expectWithinAccounting(engine, budget);
    }
  });

  test.prop([families.mlp(), permille], { numRuns: runs(10) })('float16 and bfloat16 weights, several threads', (c, k) => {
    for (const weightPrecision of ['float16', 'bfloat16'] as const) {
      using reference = buildEngine(c.net, { weightPrecision, numThreads: 2 });
      using engine = buildEngine(c.net, { weightPrecision, numThreads: 2, weightStreaming: true });
      engine.setWeightStreamingBudget(share(engine.streamableWeightBytes(), k));
      expect(firstDifference(engine.run(c.inputs), reference.run(c.inputs))).toBeUndefined();
    }
  });

  test.prop([anyNetwork(), permille], { numRuns: runs(15) })('a streaming engine survives serialization', (c, k) => {
    using engine = buildEngine(c.net, { weightStreaming: true });
    using loaded = Engine.deserialize(engine.serialize());
    expect(loaded.streamableWeightBytes()).toBe(engine.streamableWeightBytes());
    loaded.setWeightStreamingBudget(share(loaded.streamableWeightBytes(), k));
    expect(firstDifference(loaded.run(c.inputs), engine.run(c.inputs))).toBeUndefined();
  });

  it('an engine built without streaming has nothing to stream and refuses a budget', () => {
    const net = families.mlp();
    const [c] = fc.sample(net, { numRuns: 1, seed: 7 });
    using engine = buildEngine(c.net);
    expect(engine.streamableWeightBytes()).toBe(0);
    expect(() => engine.setWeightStreamingBudget(0)).toThrow(NativeError);
    using streaming = buildEngine(c.net, { weightStreaming: true });
    const total = streaming.streamableWeightBytes();
    expect(total).toBeGreaterThan(0);
    expect(() => streaming.setWeightStreamingBudget(total + 1)).toThrow(/exceeds the streamable total/);
    expect(streaming.weightStreamingBudget()).toBe(total);
    const automatic = streaming.automaticWeightStreamingBudget();
    expect(automatic).toBeGreaterThanOrEqual(0);
    expect(automatic).toBeLessThanOrEqual(total);
  });

  it('at budget 0 every run copies all streamable weights; at the full budget none', () => {
    const [c] = fc.sample(families.mlp(), { numRuns: 1, seed: 11 });
    using engine = buildEngine(c.net, { weightStreaming: true });
    const total = engine.streamableWeightBytes();
    engine.setWeightStreamingBudget(0);
    engine.run(c.inputs);
    engine.run(c.inputs);
    let s = engine.weightStreamingStats();
    expect(s.runs).toBe(2);
    expect(s.streamedBytes).toBe(total);
    expect(s.residentBytes).toBe(0);
    expect(s.windowBytes).toBeGreaterThan(0);
    expect(s.copiedBytes).toBeGreaterThan(0);
    expect(s.copiedBytes).toBeLessThanOrEqual(2 * total);
    engine.setWeightStreamingBudget(total);
    engine.run(c.inputs);
    s = engine.weightStreamingStats();
    expect(s.copiedBytes).toBe(0);
    expect(s.windowBytes).toBe(0);
    expect(s.peakBytes).toBe(total);
  });
});

/** An engine whose single run takes tens of milliseconds, so a run can be caught in flight. */
const slowNetwork = (seedValue: number): { net: NetworkDefinition; x: Float32Array } => {
  const rows = 96;
  const width = 512;
  const r = rng(seedValue);
  const layers = Array.from({ length: 6 }, (_, i) => ({
    kind: 'fullyConnected' as const,
    name: `h${i}`,
    output: `h${i}`,
    input: i === 0 ? 'x' : `h${i - 1}`,
    outFeatures: width,
    kernel: randomWeights(r, 'float32', [width, width], -1 / 32, 1 / 32),
  }));
  const net = { inputs: [{ name: 'x', dtype: 'float32' as const, shape: [rows, width] }], layers, outputs: [{ tensor: 'h5', name: 'y' }] };
  return { net, x: new Float32Array(rows * width).map((_, i) => Math.sin(i)) };
};

/**
 * Runs `engine` on a worker thread (executeAsync) and calls `change` once the run is known to be in flight,
 * with no sleeps or timing guesses: the engine's streaming counter `runs` moves when a run begins (after
 * the engine marks itself executing; it unmarks only when the run ends). So `change` meets a run that has
 * begun: either it is refused (the run is in flight) and that error is returned, or it went through, which
 * can only mean the run had already ended; then the attempt proves nothing and another run is started.
 */
const changeDuringRun = async (engine: Engine, x: Float32Array, change: () => void, maxAttempts = 50) => {
  for (let attempt = 1; attempt <= maxAttempts; attempt++) {
    using context = engine.createContext();
    const y = new Float32Array(x.length);
    context.setTensor('x', x);
    context.setTensor('y', y);
    const begunBefore = engine.weightStreamingStats().runs;
    const running = context.executeAsync();
    // The run starts on a worker thread while this one waits; the guard only turns a hang into a failure.
    const guard = Date.now() + 60_000;
    while (engine.weightStreamingStats().runs === begunBefore) {
      if (Date.now() > guard) throw new Error('the run did not begin within 60 s');
    }
    let error: unknown;
    try {
      change();
    } catch (e) {
      error = e;
    }
    await running;
    if (error !== undefined) return { error, y, attempts: attempt };
  }
  throw new Error(`every one of ${maxAttempts} runs ended before the change reached the engine`);
};

describe('a budget changes only when no run is in flight', () => {
  it('setWeightStreamingBudget during executeAsync is refused and changes nothing', async () => {
    const { net, x } = slowNetwork(1);
    using engine = buildEngine(net, { weightStreaming: true });
    using reference = buildEngine(net);
    const want = reference.run({ x });
    const total = engine.streamableWeightBytes();
    let lastSet = engine.weightStreamingBudget();
    let i = 0;
    const { error, y } = await changeDuringRun(engine, x, () => {
      const b = i++ % 2 === 0 ? Math.floor(total / 3) : Math.floor(total / 2);
      engine.setWeightStreamingBudget(b);
      lastSet = b;
    });
    expect(error).toBeInstanceOf(NativeError);
    expect((error as NativeError).kind).toBe('State');
    expect((error as NativeError).message).toMatch(/running/);
    expect(engine.weightStreamingBudget()).toBe(lastSet);
    expect(firstDifference({ y }, want)).toBeUndefined();
    engine.setWeightStreamingBudget(0); // once the run is over, it goes through
    expect(engine.weightStreamingBudget()).toBe(0);
    expect(firstDifference(engine.run({ x }), want)).toBeUndefined();
  });

  it('a model whose second engine is running keeps every engine as it was', async () => {
    const { net, x } = slowNetwork(2);
    using first = buildEngine(net, { weightStreaming: true });
    using second = buildEngine(net, { weightStreaming: true });
    const firstBefore = first.weightStreamingBudget();
    const secondBefore = second.weightStreamingBudget();
    let refused: unknown;
    const { error } = await changeDuringRun(second, x, () => {
      const r = applyWeightBudget([first, second], '10%');
      if (r._tag === 'Left') {
        refused = r.left;
        throw new WeightStreamingError(r.left);
      }
      // It went through, so the run had ended and none is in flight: the restore cannot be refused.
      r.right.restore();
    });
    expect(error).toBeInstanceOf(WeightStreamingError);
    expect(refused).toMatchObject({ _tag: 'BudgetChangeRefused', segment: 1 });
    expect(first.weightStreamingBudget()).toBe(firstBefore); // rolled back
    expect(second.weightStreamingBudget()).toBe(secondBefore);
    expect(secondBefore).toBe(second.streamableWeightBytes());
  });
});

describe('scoped budgets restore exactly', () => {
  const model = fc.array(anyNetwork(), { minLength: 1, maxLength: 3 });
  const budget = fc.oneof(
    permille.map((k) => `${k / 10}%`),
    fc.constant('auto'),
    fc.constant('0%'),
    fc.constant('100%'),
  );
  test.prop([model, fc.array(permille, { minLength: 3, maxLength: 3 }), budget, fc.boolean()], { numRuns: runs(30) })(
    'withWeightStreaming, returning or throwing',
    async (cases, initial, requested, throws) => {
      const engines = cases.map((c) => buildEngine(c.net, { weightStreaming: true }));
      try {
        engines.forEach((e, i) => e.setWeightStreamingBudget(share(e.streamableWeightBytes(), initial[i])));
        const before = engines.map((e) => e.weightStreamingBudget());
        const total = engines.reduce((a, e) => a + e.streamableWeightBytes(), 0);
        const body = async () => {
          const inside = engines.map((e) => e.weightStreamingBudget());
          expect(inside.every((b, i) => b <= engines[i].streamableWeightBytes())).toBe(true);
          // k per mille exactly: the shares sum to floor(total * k / 1000)
          if (requested.endsWith('%')) expect(inside.reduce((a, b) => a + b, 0)).toBe(Math.floor((total * Math.round(Number(requested.slice(0, -1)) * 10)) / 1000));
          cases.forEach((c, i) => engines[i].run(c.inputs));
          if (throws) throw new Error('fn failed');
          return inside;
        };
        const outcome = withWeightStreaming(engines, requested, body);
        if (throws) await expect(outcome).rejects.toThrow('fn failed');
        else await outcome;
        expect(engines.map((e) => e.weightStreamingBudget())).toEqual(before);
      } finally {
        engines.forEach((e) => e[Symbol.dispose]());
      }
    },
  );

  test.prop([anyNetwork(), permille, permille], { numRuns: runs(20) })('a disposable handle, nested', async (c, outerK, innerK) => {
    using engine = buildEngine(c.net, { weightStreaming: true });
    const total = engine.streamableWeightBytes();
    const start = engine.weightStreamingBudget();
    {
      using outer = await acquireWeightBudget(engine, share(total, outerK));
      expect(engine.weightStreamingBudget()).toBe(share(total, outerK));
      {
        using inner = await acquireWeightBudget(engine, `${innerK / 10}%`);
        expect(engine.weightStreamingBudget()).toBe(inner.budgets[0]);
      }
      expect(engine.weightStreamingBudget()).toBe(outer.budgets[0]);
    }
    expect(engine.weightStreamingBudget()).toBe(start);
  });

  it('a bad budget changes nothing and says why', async () => {
    const [c] = fc.sample(families.mlp(), { numRuns: 1, seed: 3 });
    using engine = buildEngine(c.net, { weightStreaming: true });
    const total = engine.streamableWeightBytes();
    engine.setWeightStreamingBudget(1);
    await expect(acquireWeightBudget(engine, total + 1)).rejects.toMatchObject({ _tag: 'BudgetOutOfRange' });
    await expect(acquireWeightBudget(engine, '101%')).rejects.toMatchObject({ _tag: 'InvalidBudget' });
    await expect(acquireWeightBudget(engine, 'lots')).rejects.toThrow(/BYTES/);
    expect(engine.weightStreamingBudget()).toBe(1);
  });
});

describe('refit on a streaming engine equals a rebuild', () => {
  test.prop([anyNetwork(), seed, permille, fc.boolean()], { numRuns: runs(40) })('random networks, random budgets', (c, seedB, k, runFirst) => {
    const netB = reweight(c.net, seedB);
    using engine = buildEngine(c.net, { weightStreaming: true });
    engine.setWeightStreamingBudget(share(engine.streamableWeightBytes(), k));
    using context = engine.createContext();
    if (runFirst) context.run(c.inputs); // resident copies exist before the refit
    engine.refit(allUpdates(netB));
    using rebuilt = buildEngine(netB);
    const want = rebuilt.run(c.inputs);
    expect(firstDifference(context.run(c.inputs), want)).toBeUndefined();
    engine.setWeightStreamingBudget(share(engine.streamableWeightBytes(), 1000 - k));
    expect(firstDifference(context.run(c.inputs), want)).toBeUndefined();
  });
});
