/**
 * The pure parts of weight streaming: budget parsing and its io-ts codec, largest-remainder apportionment
 * (sums exactly, within one of each quota, never over a part's weight), the model's budget split, and
 * the CLI options.
 */
import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { Command } from 'commander';
import * as E from 'fp-ts/lib/Either.js';
import { apportion, BudgetCodec, formatBudget, parseBudget, percentOf, planWeightBudget, type Budget } from '../src/streaming/index.js';
import { registerStreamingOptions, streamingOptionsOf } from '../src/cli/streaming.js';

const runs = (n: number) => (process.env.TRT_REFIT_FUZZ === '1' ? n * 20 : n);

describe('apportion (largest remainder)', () => {
  const weights = fc.array(fc.bigInt({ min: 0n, max: 1n << 70n }), { minLength: 1, maxLength: 12 });
  test.prop([weights, fc.bigInt({ min: 0n, max: 1n << 72n })], { numRuns: runs(300) })('sums exactly; each share within 1 of its quota and at most its weight', (w, t) => {
    const sum = w.reduce((a, b) => a + b, 0n);
    fc.pre(sum > 0n);
    const total = t % (sum + 1n); // 0 .. sum
    const shares = apportion(total, w);
    expect(shares.reduce((a, b) => a + b, 0n)).toBe(total);
    shares.forEach((s, i) => {
      // |s - total * w / sum| < 1, in integers: |s * sum - total * w| < sum
      const diff = s * sum - total * w[i];
      expect(diff < sum && -diff < sum).toBe(true);
      expect(s <= w[i]).toBe(true);
      expect(s >= 0n).toBe(true);
    });
  });
  test.prop([fc.integer({ min: 1, max: 50 }), fc.bigInt({ min: 1n, max: 1n << 40n }), fc.bigInt({ min: 0n, max: 1n << 50n })], { numRuns: runs(100) })(
    'equal weights get shares that differ by at most one, larger ones first',
    (n, weight, t) => {
      const total = t % (weight * BigInt(n) + 1n);
      const shares = apportion(total, Array.from({ length: n }, () => weight));
      const max = shares.reduce((a, b) => (a > b ? a : b));
      const min = shares.reduce((a, b) => (a < b ? a : b));
      expect(max - min <= 1n).toBe(true);
      expect([...shares].sort((a, b) => (a > b ? -1 : a < b ? 1 : 0))).toEqual(shares); // ties go to the earlier part
    },
  );
  it('zero weights', () => {
    expect(apportion(0, [0, 0])).toEqual([0n, 0n]);
    expect(() => apportion(1, [0, 0])).toThrow(RangeError);
    expect(apportion(5, [0, 3, 0])).toEqual([0n, 5n, 0n]);
  });
  it('a worked example: 10 over 1, 1, 1 is 4, 3, 3', () => {
    expect(apportion(10, [1, 1, 1])).toEqual([4n, 3n, 3n]);
    expect(apportion(7, [5, 3, 2])).toEqual([4n, 2n, 1n]); // quotas 3.5, 2.1, 1.4: remainders .5 then .4
  });
});

describe('budgets', () => {
  it('parses BYTES, units, PERCENT% and auto', () => {
    expect(parseBudget('1073741824')).toEqual(E.right({ kind: 'bytes', bytes: 1073741824 }));
    expect(parseBudget('512MiB')).toEqual(E.right({ kind: 'bytes', bytes: 512 * 1024 * 1024 }));
    expect(parseBudget('2GB')).toEqual(E.right({ kind: 'bytes', bytes: 2e9 }));
    expect(parseBudget('25%')).toEqual(E.right({ kind: 'percent', percent: 25 }));
    expect(parseBudget(' 12.5% ')).toEqual(E.right({ kind: 'percent', percent: 12.5 }));
    expect(parseBudget('AUTO')).toEqual(E.right({ kind: 'auto' }));
    for (const bad of ['', '-1', '101%', '1.5', '3 apples', '%', '10 %%', '99999999999999999999']) {
      expect(E.isLeft(parseBudget(bad)), bad).toBe(true);
    }
  });
  const budget: fc.Arbitrary<Budget> = fc.oneof(
    fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }).map((bytes) => ({ kind: 'bytes' as const, bytes })),
    fc.integer({ min: 0, max: 10000 }).map((k) => ({ kind: 'percent' as const, percent: k / 100 })),
    fc.constant({ kind: 'auto' as const }),
  );
  test.prop([budget], { numRuns: runs(200) })('the codec round-trips through its text', (b) => {
    expect(BudgetCodec.decode(BudgetCodec.encode(b))).toEqual(E.right(b));
    expect(BudgetCodec.is(b)).toBe(true);
    expect(BudgetCodec.decode(formatBudget(b))).toEqual(E.right(b));
  });
  it('the codec refuses what is not a budget', () => {
    for (const bad of [null, {}, -3, 1.5, '200%', true]) expect(E.isLeft(BudgetCodec.decode(bad)), String(bad)).toBe(true);
  });
  test.prop([fc.integer({ min: 0, max: 2 ** 40 }), fc.integer({ min: 0, max: 10000 })], { numRuns: runs(200) })('percentOf is floor(total * percent / 100) exactly', (total, hundredths) => {
    expect(percentOf(total, hundredths / 100)).toBe(Number((BigInt(total) * BigInt(hundredths)) / 10000n));
  });
});

describe('a model budget split over engine segments', () => {
  const engines = fc.array(fc.record({ streamable: fc.integer({ min: 0, max: 2 ** 36 }), automatic: fc.integer({ min: 0, max: 2 ** 36 }) }), { minLength: 1, maxLength: 6 }).map((es) =>
    es.map((e) => ({ streamable: e.streamable, automatic: Math.min(e.automatic, e.streamable) })),
  );
  test.prop([engines, fc.integer({ min: 0, max: 10000 })], { numRuns: runs(200) })('shares sum exactly to the request and stay within each engine', (es, k) => {
    const total = es.reduce((a, e) => a + e.streamable, 0);
    const bytes = Math.floor((total * k) / 10000);
    for (const request of [bytes, `${k / 100}%`]) {
      const r = planWeightBudget(request, es);
      expect(E.isRight(r)).toBe(true);
      if (E.isLeft(r)) return;
      expect(r.right.reduce((a, b) => a + b, 0)).toBe(typeof request === 'number' ? bytes : Number((BigInt(total) * BigInt(k)) / 10000n));
      r.right.forEach((b, i) => expect(b).toBeLessThanOrEqual(es[i].streamable));
    }
  });
  test.prop([engines], { numRuns: runs(100) })("'auto' is everything when it all fits, else the smallest estimate of an engine that does not fit", (es) => {
    const r = planWeightBudget('auto', es);
    if (E.isLeft(r)) return expect.fail('auto failed');
    const total = es.reduce((a, e) => a + e.streamable, 0);
    const short = es.filter((e) => e.automatic < e.streamable).map((e) => e.automatic);
    expect(r.right.reduce((a, b) => a + b, 0)).toBe(short.length === 0 ? total : Math.min(total, ...short));
  });
  it('over the total is out of range', () => {
    expect(planWeightBudget(11, [{ streamable: 4, automatic: 4 }, { streamable: 6, automatic: 6 }])).toEqual(E.left({ _tag: 'BudgetOutOfRange', bytes: 11, streamable: 10 }));
  });
});

describe('CLI options', () => {
  const parse = (args: string[]) => {
    const command = registerStreamingOptions(new Command('run').exitOverride().configureOutput({ writeErr: () => undefined }));
    command.action(() => undefined);
    command.parse(args, { from: 'user' });
    return streamingOptionsOf(command.opts());
  };
  it('--weight-streaming and --weight-budget', () => {
    expect(parse([])).toEqual({ weightStreaming: false, weightBudget: undefined });
    expect(parse(['--weight-streaming', '--weight-budget', '25%'])).toEqual({ weightStreaming: true, weightBudget: { kind: 'percent', percent: 25 } });
    expect(parse(['--weight-budget', 'auto']).weightBudget).toEqual({ kind: 'auto' });
    expect(parse(['--weight-budget=64MiB']).weightBudget).toEqual({ kind: 'bytes', bytes: 64 << 20 });
  });
  it('a bad budget is a usage error naming the forms', () => {
    expect(() => parse(['--weight-budget', 'half'])).toThrow(/BYTES.*PERCENT%.*auto/);
  });
});
