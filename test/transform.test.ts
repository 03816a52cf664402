/**
 * Native weight transforms (ffi/transform.ts, libtrtshim/src/transform.c) against the TypeScript references:
 * evaluateExpr (src/weightmap/evaluate.ts) and mergeAdapters (src/lora/lora.ts), bit for bit (NaN payloads
 * aside), for random shapes, permutations, values, expressions and adapters, and for every thread count.
 */
import { describe, expect, it } from 'vitest';
import { test, fc } from '@fast-check/vitest';
import * as E from 'fp-ts/lib/Either.js';
import type { Expr } from '../src/weightmap/expr.js';
import { evaluateExpr, roundTo, transposeF32, type F32Tensor } from '../src/weightmap/evaluate.js';
import { mergeAdapters, type LoraAdapter, type LoraModule, type WeightedAdapter } from '../src/lora/lora.js';
import { memoryStore, readF32, type TensorStore } from '../src/weightmap/store.js';
import {
  bnFoldBiasNative,
  bnFoldWeightNative,
  castRoundNative,
  evaluateExprNative,
  loraAddNative,
  mergeLoraNative,
  permuteNative,
} from '../ffi/transform.js';
import { NativeError } from '../ffi/library.js';

const count = (shape: readonly number[]): number => shape.reduce((a, b) => a * b, 1);
/** TRT_REFIT_FUZZ=1 runs every property 20 times as long. */
const runs = (n: number): number => (process.env.TRT_REFIT_FUZZ === '1' ? n * 20 : n);

/** Index of the first element whose bits differ (NaN equals NaN), or -1. */
const firstDifference = (a: Float32Array, b: Float32Array): number => {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  const ua = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const ub = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < a.length; i++) if (ua[i] !== ub[i] && !(Number.isNaN(a[i]) && Number.isNaN(b[i]))) return i;
  return -1;
};
const expectSameBits = (got: F32Tensor, want: F32Tensor): void => {
  expect(got.shape).toEqual(want.shape);
  const at = firstDifference(got.data, want.data);
  if (at >= 0) expect.fail(`element ${at}: ${got.data[at]} (0x${bitsOf(got.data[at])}) != ${want.data[at]} (0x${bitsOf(want.data[at])})`);
};
const bitsOf = (v: number): string => new Uint32Array(Float32Array.of(v).buffer)[0].toString(16);

/** A small deterministic generator, so a tensor is described by its seed in a counterexample. */
const prng = (seed: number) => {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 2 ** 32;
  };
};
const specials = [
  0, -0, NaN, Infinity, -Infinity, 65504, 65519.99, 65520, -65520, 2 ** -24, 2 ** -25, 3 * 2 ** -26, 2.5 * 2 ** -24, 1023.5 * 2 ** -24,
  2 ** -14, 1e-40, 3.4e38, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -8, 1 + 3 * 2 ** -8,
];
/** Mostly ordinary values of several magnitudes, sometimes a special one. */
const fill = (n: number, seed: number, special = true): Float32Array => {
  const r = prng(seed);
  return Float32Array.from({ length: n }, () => {
    const u = r();
    if (special && u < 0.03) return specials[Math.floor(r() * specials.length)];
    return (r() - 0.5) * 2 ** Math.floor(r() * 40 - 20);
  });
};
const tensor = (shape: readonly number[], seed: number, special = true): F32Tensor => ({ shape, data: fill(count(shape), seed, special) });

const permutationOf = (rank: number, seed: number): number[] => {
  const r = prng(seed);
  const p = Array.from({ length: rank }, (_, i) => i);
  for (let i = rank - 1; i > 0; i--) {
    const j = Math.floor(r() * (i + 1));
    [p[i], p[j]] = [p[j], p[i]];
  }
  return p;
};

/** Shapes of rank 0 .. 6, mostly small dimensions, sometimes past a 64-element tile; at most ~200k elements. */
const shapeArb = fc
  .array(fc.oneof({ weight: 4, arbitrary: fc.integer({ min: 1, max: 6 }) }, { weight: 1, arbitrary: fc.integer({ min: 1, max: 150 }) }), { minLength: 0, maxLength: 6 })
  .filter((s) => count(s) <= 200_000);

describe('native kernels against the TypeScript reference', () => {
  test.prop([shapeArb, fc.nat(), fc.nat(), fc.constantFrom(0, 1, 2)], { numRuns: runs(150) })('permute equals transposeF32 for any shape and permutation', (shape, permSeed, dataSeed, numThreads) => {
    const x = tensor(shape, dataSeed);
    const perm = permutationOf(shape.length, permSeed);
    expectSameBits(permuteNative(x, perm, { numThreads }), transposeF32(x, perm));
  });

  it('permute of a large tensor: every thread count and misaligned buffers give the reference bits', () => {
    const shape = [3, 257, 263];
    const backing = fill(count(shape) + 3, 7);
    for (const offset of [0, 1, 3]) {
      // A view at an odd element offset: the kernel's loads and stores are not 32-byte aligned.
      const x = { shape, data: backing.subarray(offset, offset + count(shape)) };
      for (const perm of [[2, 1, 0], [0, 2, 1], [1, 2, 0]]) {
        const want = transposeF32(x, perm);
        for (const numThreads of [1, 2, 3]) expectSameBits(permuteNative(x, perm, { numThreads }), want);
      }
    }
  });

  it('ranks above the native limit (8) fall back to the reference and agree with it', () => {
    const shape = [2, 1, 2, 3, 1, 2, 2, 1, 2, 2];
    const x = tensor(shape, 11);
    const perm = permutationOf(shape.length, 5);
    expectSameBits(permuteNative(x, perm), transposeF32(x, perm));
    const into = new Float32Array(count(shape));
    expectSameBits(permuteNative(x, perm, { into }), transposeF32(x, perm));
  });

  const bitPatterns = (n: number) => fc.array(fc.integer({ min: 0, max: 0xffffffff }), { minLength: 1, maxLength: n }).map((u) => new Float32Array(Uint32Array.from(u).buffer));

  test.prop([bitPatterns(3000), fc.constantFrom('float16' as const, 'bfloat16' as const, 'float32' as const)], { numRuns: runs(100) })('cast rounding equals roundTo for arbitrary float32 bit patterns', (data, to) => {
    const want = { shape: [data.length], data: data.map(roundTo(to)) };
    expectSameBits(castRoundNative({ shape: [data.length], data }, to), want);
  });

  it('cast rounding at the float16 and bfloat16 boundaries, in place, on several threads', () => {
    const near = specials.flatMap((v) => {
      const b = new Uint32Array(Float32Array.of(v).buffer)[0];
      return [-2, -1, 0, 1, 2].map((d) => new Float32Array(Uint32Array.of((b + d) >>> 0).buffer)[0]);
    });
    const data = Float32Array.from({ length: 300_000 }, (_, i) => (i < near.length ? near[i] : near[i % near.length] * (1 + (i % 97) * 2 ** -20)));
    for (const to of ['float16', 'bfloat16'] as const) {
      // One value per call: the kernel's scalar path (vector paths take 8 at a time, the rest one by one).
      for (const v of near) expectSameBits(castRoundNative({ shape: [1], data: Float32Array.of(v) }, to), { shape: [1], data: Float32Array.of(roundTo(to)(v)) });
      const want = { shape: [data.length], data: data.map(roundTo(to)) };
      expectSameBits(castRoundNative({ shape: [data.length], data }, to, { numThreads: 2 }), want);
      const copy = Float32Array.from(data);
      castRoundNative({ shape: [copy.length], data: copy }, to, { into: copy, numThreads: 1 });
      expectSameBits({ shape: [copy.length], data: copy }, want);
    }
  });

  const foldCase = fc.record({
    channels: fc.integer({ min: 0, max: 40 }),
    rest: fc.array(fc.integer({ min: 1, max: 9 }), { maxLength: 3 }),
    seed: fc.nat(),
    epsilon: fc.constantFrom(1e-5, 1e-3, 0.1, 0, 1e-12),
    withBias: fc.boolean(),
  });

  test.prop([foldCase, fc.constantFrom(0, 1, 2)], { numRuns: runs(120) })('BatchNorm folds equal the reference (weight and bias, with and without a bias)', ({ channels, rest, seed, epsilon, withBias }, numThreads) => {
    const sources: Record<string, F32Tensor> = {
      w: tensor([channels, ...rest], seed),
      gamma: tensor([channels], seed + 1),
      // Mostly non-negative variances; a negative or special one gives NaN or infinity in both.
      variance: { shape: [channels], data: fill(channels, seed + 2).map((v, i) => (i % 7 === 3 ? v : Math.abs(v))) },
      beta: tensor([channels], seed + 3),
      mean: tensor([channels], seed + 4),
      bias: tensor([channels], seed + 5),
    };
    const src = (name: string): Expr => ({ op: 'source', name });
    const exprs: Expr[] = [
      { op: 'bnFoldWeight', weight: src('w'), gamma: src('gamma'), variance: src('variance'), epsilon },
      { op: 'bnFoldBias', ...(withBias ? { bias: src('bias') } : {}), gamma: src('gamma'), beta: src('beta'), mean: src('mean'), variance: src('variance'), epsilon },
    ];
    for (const e of exprs) {
      const want = evaluateExpr(e, (n) => sources[n]);
      const got = evaluateExprNative(e, (n) => sources[n], { numThreads });
      if (E.isLeft(want) || E.isLeft(got)) expect.fail(JSON.stringify([want, got]));
      expectSameBits(got.right, want.right);
    }
    // The kernels directly, too.
    const v = sources.variance.data;
    expectSameBits(bnFoldWeightNative(sources.w, sources.gamma.data, v, epsilon, { numThreads }), E.getOrElseW(() => expect.fail('fold'))(evaluateExpr(exprs[0], (n) => sources[n])));
    const bias = bnFoldBiasNative(withBias ? sources.bias.data : undefined, sources.gamma.data, sources.beta.data, sources.mean.data, v, epsilon);
    expectSameBits(bias, E.getOrElseW(() => expect.fail('fold'))(evaluateExpr(exprs[1], (n) => sources[n])));
  });
});

// ---- expressions ------------------------------------------------------------------------------------------

/**
 * A valid expression built step by step from a random base tensor, tracking its shape: every step is one of
 * transpose, reshape, cast, slice, concat (with a fresh source), BatchNorm weight fold, BatchNorm bias fold
 * (of a rank-1 value), so most cases evaluate to a value rather than to an error.
 */
interface Built {
  readonly expr: Expr;
  readonly sources: Map<string, F32Tensor>;
}
const stepArb = fc.record({ kind: fc.integer({ min: 0, max: 6 }), a: fc.nat(), b: fc.nat(), c: fc.nat() });
const chainArb = fc.record({
  base: fc.array(fc.integer({ min: 1, max: 7 }), { minLength: 1, maxLength: 4 }),
  steps: fc.array(stepArb, { minLength: 1, maxLength: 6 }),
  seed: fc.nat(),
});

const buildChain = ({ base, steps, seed }: { base: number[]; steps: { kind: number; a: number; b: number; c: number }[]; seed: number }): Built => {
  const sources = new Map<string, F32Tensor>();
  const fresh = (shape: readonly number[], positive = false): Expr => {
    const name = `t${sources.size}`;
    const t = tensor(shape, seed + sources.size * 7919);
    sources.set(name, positive ? { shape, data: t.data.map(Math.abs) } : t);
    return { op: 'source', name };
  };
  let expr = fresh(base);
  let shape: number[] = [...base];
  for (const { kind, a, b, c } of steps) {
    const rank = shape.length;
    switch (kind) {
      case 0: {
        const perm = permutationOf(rank, a);
        expr = { op: 'transpose', perm, x: expr };
        shape = perm.map((p) => shape[p]);
        break;
      }
      case 1: {
        // Merge two neighbours, split a dimension by a divisor, or flatten.
        const i = a % rank;
        const d = shape[i];
        const divisors = Array.from({ length: d }, (_, k) => k + 1).filter((k) => d % k === 0);
        const k = divisors[b % divisors.length];
        shape = c % 3 === 0 && i + 1 < rank ? [...shape.slice(0, i), d * shape[i + 1], ...shape.slice(i + 2)]
          : c % 3 === 1 && rank < 6 ? [...shape.slice(0, i), k, d / k, ...shape.slice(i + 1)]
          : [count(shape)];
        expr = { op: 'reshape', shape, x: expr };
        break;
      }
      case 2:
        expr = { op: 'cast', to: (['float32', 'float16', 'bfloat16'] as const)[a % 3], x: expr };
        break;
      case 3: {
        const axis = a % rank;
        const start = b % shape[axis];
        const end = start + 1 + (c % (shape[axis] - start));
        expr = { op: 'slice', axis, start, end, x: expr };
        shape = shape.map((d, i) => (i === axis ? end - start : d));
        break;
      }
      case 4: {
        const axis = a % rank;
        const other = shape.map((d, i) => (i === axis ? 1 + (b % 3) : d));
        const otherExpr = fresh(other);
        expr = { op: 'concat', axis, xs: c % 2 === 0 ? [expr, otherExpr] : [otherExpr, expr, expr] };
        shape = shape.map((d, i) => (i === axis ? (c % 2 === 0 ? d + other[i] : 2 * d + other[i]) : d));
        break;
      }
      case 5:
        expr = { op: 'bnFoldWeight', weight: expr, gamma: fresh([shape[0]]), variance: fresh([shape[0]], true), epsilon: [1e-5, 1e-3][a % 2] };
        break;
      case 6:
        if (rank === 1) {
          const channels = [shape[0]];
          expr = { op: 'bnFoldBias', ...(a % 2 === 0 ? { bias: expr } : {}), gamma: fresh(channels), beta: fresh(channels), mean: fresh(channels), variance: fresh(channels, true), epsilon: 1e-5 };
        }
        break;
    }
  }
  return { expr, sources };
};

const snapshot = (sources: Map<string, F32Tensor>) => new Map([...sources].map(([k, v]) => [k, Float32Array.from(v.data)]));

describe('evaluateExprNative', () => {
  test.prop([chainArb, fc.constantFrom(0, 1, 2)], { numRuns: runs(200) })('valid expression chains: the same value as evaluateExpr, bit for bit, and sources untouched', (chain, numThreads) => {
    const { expr, sources } = buildChain(chain);
    const before = snapshot(sources);
    const want = evaluateExpr(expr, (n) => sources.get(n));
    const got = evaluateExprNative(expr, (n) => sources.get(n), { numThreads });
    if (E.isLeft(want)) expect.fail(`the generator built an invalid expression: ${JSON.stringify(want.left)}`);
    if (E.isLeft(got)) expect.fail(JSON.stringify(got.left));
    expectSameBits(got.right, want.right);
    for (const [name, data] of before) expect(firstDifference(sources.get(name)!.data, data)).toBe(-1);
  });

  // Arbitrary expressions, mostly invalid: the same Left (tag, op and message) or the same value.
  const leaf: fc.Arbitrary<Expr> = fc.constantFrom('a', 'b', 'c', 'missing').map((name) => ({ op: 'source' as const, name }));
  const { expr: anyExpr } = fc.letrec<{ expr: Expr }>((tie) => ({
    expr: fc.oneof(
      { depthSize: 'small', withCrossShrink: true },
      leaf,
      fc.record({ op: fc.constant('transpose' as const), perm: fc.constantFrom([1, 0], [0, 1], [2, 0, 1], [0, 0], [1, 2]), x: tie('expr') }),
      fc.record({ op: fc.constant('reshape' as const), shape: fc.array(fc.integer({ min: -1, max: 8 }), { maxLength: 3 }), x: tie('expr') }),
      fc.record({ op: fc.constant('cast' as const), to: fc.constantFrom('float32' as const, 'float16' as const, 'bfloat16' as const), x: tie('expr') }),
      fc.record({ op: fc.constant('slice' as const), axis: fc.integer({ min: -1, max: 2 }), start: fc.nat(3), end: fc.nat(6), x: tie('expr') }),
      fc.record({ op: fc.constant('concat' as const), axis: fc.nat(2), xs: fc.array(tie('expr'), { minLength: 0, maxLength: 3 }) }),
      fc.record({ op: fc.constant('bnFoldWeight' as const), weight: tie('expr'), gamma: leaf, variance: leaf, epsilon: fc.constantFrom(1e-5, 1e-3) }),
      fc.record({ op: fc.constant('bnFoldBias' as const), bias: leaf, gamma: leaf, beta: leaf, mean: leaf, variance: leaf, epsilon: fc.constant(1e-5) }),
      fc.record({ op: fc.constant('constant' as const), reason: fc.string() }),
    ),
  }));
  const smallShape = fc.array(fc.integer({ min: 1, max: 4 }), { minLength: 1, maxLength: 3 });

  test.prop([anyExpr, smallShape, smallShape, fc.constantFrom([3], [2], [4]), fc.nat()], { numRuns: runs(400) })('arbitrary expressions: the same Left or the same value as evaluateExpr', (e, sa, sb, sc, seed) => {
    const sources: Record<string, F32Tensor> = { a: tensor(sa, seed), b: tensor(sb, seed + 1), c: tensor(sc, seed + 2) };
    const lookup = (n: string) => sources[n];
    let want: ReturnType<typeof evaluateExpr> | { thrown: string };
    try {
      want = evaluateExpr(e, lookup);
    } catch (x) {
      want = { thrown: (x as Error).name };
    }
    if ('thrown' in want) {
      // Whatever makes the reference throw (not a Left) must not pass silently here either.
      expect(() => evaluateExprNative(e, lookup)).toThrow();
      return;
    }
    const got = evaluateExprNative(e, lookup);
    if (E.isLeft(want)) {
      expect(got).toEqual(want);
      return;
    }
    if (E.isLeft(got)) expect.fail(`native: ${JSON.stringify(got.left)}, reference: a value of shape [${want.right.shape}]`);
    expectSameBits(got.right, want.right);
  });

  it('refuses a source whose values disagree with its shape, instead of reading past them', () => {
    const r = evaluateExprNative({ op: 'transpose', perm: [1, 0], x: { op: 'source', name: 'x' } }, () => ({ shape: [4, 4], data: new Float32Array(3) }));
    expect(E.isLeft(r) && r.left).toMatchObject({ _tag: 'InvalidExpression', op: 'source' });
  });

  it('a BatchNorm with fewer variances than channels gives NaN past them, as the reference does', () => {
    const s: Record<string, F32Tensor> = { w: { shape: [3, 2], data: Float32Array.of(1, 2, 3, 4, 5, 6) }, g: { shape: [3], data: Float32Array.of(1, 1, 1) }, v: { shape: [2], data: Float32Array.of(1, 3) } };
    const e: Expr = { op: 'bnFoldWeight', weight: { op: 'source', name: 'w' }, gamma: { op: 'source', name: 'g' }, variance: { op: 'source', name: 'v' }, epsilon: 0 };
    const want = evaluateExpr(e, (n) => s[n]);
    const got = evaluateExprNative(e, (n) => s[n]);
    if (E.isLeft(want) || E.isLeft(got)) expect.fail('fold failed');
    expect(Number.isNaN(got.right.data[5])).toBe(true);
    expectSameBits(got.right, want.right);
  });

  it('bad arguments to a kernel come back as NativeError naming the problem', () => {
    expect(() => permuteNative({ shape: [2, 2], data: new Float32Array(4) }, [0, 0])).toThrow(NativeError);
    expect(() => permuteNative({ shape: [2, 2], data: new Float32Array(4) }, [0, 0])).toThrow(/not a permutation/);
  });
});

// ---- LoRA ------------------------------------------------------------------------------------------------

interface LoraSpec {
  readonly out: number;
  readonly inner: number;
  readonly kernel: readonly number[]; // [] for Linear, [kh, kw] for Conv2d
  readonly rank: number;
  readonly fanInFanOut: boolean;
}
const loraSpec = fc.record({
  out: fc.integer({ min: 1, max: 40 }),
  inner: fc.integer({ min: 1, max: 40 }),
  kernel: fc.constantFrom([], [], [1, 1], [3, 3], [2, 1]),
  rank: fc.integer({ min: 1, max: 8 }),
  fanInFanOut: fc.boolean(),
}).map((s): LoraSpec => (s.kernel.length > 0 ? { ...s, fanInFanOut: false } : s));

/** A base checkpoint of one weight per spec and one PEFT-style adapter per (adapter, spec) pair. */
const loraCase = fc.record({
  specs: fc.array(loraSpec, { minLength: 1, maxLength: 3 }),
  adapters: fc.array(fc.record({ weight: fc.constantFrom(1, 0.5, -1, 0, 2.75), scaling: fc.constantFrom(2, 0.125, 1 / 3, 1), sparse: fc.boolean(), covers: fc.array(fc.boolean(), { minLength: 3, maxLength: 3 }) }), { minLength: 1, maxLength: 3 }),
  seed: fc.nat(),
  special: fc.boolean(),
});

const makeLora = ({ specs, adapters, seed, special }: { specs: LoraSpec[]; adapters: { weight: number; scaling: number; sparse: boolean; covers: boolean[] }[]; seed: number; special: boolean }) => {
  const base = memoryStore(specs.map((s, k) => [`layers.${k}.proj.weight`, tensor(s.fanInFanOut ? [s.inner, s.out] : [s.out, s.inner, ...s.kernel], seed + k, special)] as const));
  const weighted: WeightedAdapter[] = adapters.map((a, j) => {
    const entries: [string, F32Tensor][] = [];
    const modules: LoraModule[] = [];
    specs.forEach((s, k) => {
      if (!a.covers[k] && !(k === 0 && j === 0)) return;
      const module = `base_model.model.layers.${k}.proj`;
      const downShape = [s.rank, s.inner, ...s.kernel];
      const upShape = s.kernel.length > 0 ? [s.out, s.rank, 1, 1] : [s.out, s.rank];
      const up = tensor(upShape, seed * 31 + j * 7 + k, special);
      // Sparse up (zero entries) meets special values in down: the reference skips zero entries of up.
      if (a.sparse) up.data.forEach((_, i) => { if (i % 3 === 0) up.data[i] = 0; });
      entries.push([`${module}.lora_A.weight`, tensor(downShape, seed * 37 + j * 11 + k, special)], [`${module}.lora_B.weight`, up]);
      modules.push({ module, down: `${module}.lora_A.weight`, up: `${module}.lora_B.weight`, rank: s.rank, scaling: a.scaling, fanInFanOut: s.fanInFanOut });
    });
    const adapter: LoraAdapter = { format: 'peft', modules, tensors: memoryStore(entries) };
    return { adapter, weight: a.weight };
  });
  return { base, weighted };
};

const expectSameStores = (got: TensorStore, want: TensorStore): void => {
  expect([...got.tensors.keys()]).toEqual([...want.tensors.keys()]);
  for (const name of want.tensors.keys()) expectSameBits(readF32(got, name)!, readF32(want, name)!);
};

describe('LoRA merge, native', () => {
  test.prop([loraCase, fc.constantFrom(0, 1, 2)], { numRuns: runs(120) })('mergeLoraNative equals mergeAdapters bit for bit (Linear, Conv1D fan_in_fan_out, Conv2d; several adapters)', (c, numThreads) => {
    const { base, weighted } = makeLora(c);
    const before = snapshot(new Map([...base.tensors.keys()].map((n) => [n, readF32(base, n)!])));
    const want = mergeAdapters(base, weighted);
    const got = mergeLoraNative(base, weighted, { numThreads });
    // Special values can overflow a merge: both refuse it the same way.
    if (E.isLeft(want)) {
      expect(want.left._tag).toBe('NonFiniteMerge');
      expect(got).toEqual(want);
      return;
    }
    if (E.isLeft(got)) expect.fail(JSON.stringify([want, got]));
    expectSameStores(got.right, want.right);
    // The base checkpoint is not written.
    for (const [name, data] of before) expect(firstDifference(readF32(base, name)!.data, data)).toBe(-1);
  });

  it('a large weight on several threads: the same bits as the reference and as one thread', () => {
    const spec: LoraSpec = { out: 300, inner: 257, kernel: [], rank: 16, fanInFanOut: false };
    for (const fanInFanOut of [false, true]) {
      const { base, weighted } = makeLora({ specs: [{ ...spec, fanInFanOut }], adapters: [{ weight: 0.7, scaling: 2, sparse: true, covers: [true, true, true] }], seed: 5, special: false });
      const want = mergeAdapters(base, weighted);
      if (E.isLeft(want)) expect.fail(JSON.stringify(want.left));
      for (const numThreads of [1, 2, 4]) {
        const got = mergeLoraNative(base, weighted, { numThreads });
        if (E.isLeft(got)) expect.fail(JSON.stringify(got.left));
        expectSameStores(got.right, want.right);
      }
    }
  });

  it('errors are the reference errors: a delta of the wrong shape, a module with no base weight', () => {
    const base = memoryStore([['m.weight', tensor([4, 3], 1)]]);
    const wrong: LoraAdapter = {
      format: 'peft',
      modules: [{ module: 'm', down: 'm.lora_A.weight', up: 'm.lora_B.weight', rank: 2, scaling: 1, fanInFanOut: false }],
      tensors: memoryStore([['m.lora_A.weight', tensor([2, 5], 2)], ['m.lora_B.weight', tensor([4, 2], 3)]]),
    };
    expect(mergeLoraNative(base, [{ adapter: wrong, weight: 1 }])).toEqual(mergeAdapters(base, [{ adapter: wrong, weight: 1 }]));
    expect(E.isLeft(mergeLoraNative(base, [{ adapter: wrong, weight: 1 }]))).toBe(true);
    const orphan: LoraAdapter = { ...wrong, modules: [{ ...wrong.modules[0], module: 'nothing.here' }] };
    const r = mergeLoraNative(base, [{ adapter: orphan, weight: 1 }]);
    expect(r).toEqual(mergeAdapters(base, [{ adapter: orphan, weight: 1 }]));
    expect(E.isLeft(r) && r.left._tag).toBe('NoBaseWeight');
    expect(mergeLoraNative(base, [])).toEqual(E.right(base));
  });

  it('loraAddNative refuses buffers of the wrong size before calling into C', () => {
    expect(() => loraAddNative(new Float32Array(6), new Float32Array(2), new Float32Array(3), { outFeatures: 2, inFeatures: 3, rank: 2 }, 1, false)).toThrow(RangeError);
  });
});

// ---- speed sanity ------------------------------------------------------------------------------------------

const bestMs = (repeats: number, fn: () => unknown): number => {
  fn();
  let best = Infinity;
  for (let i = 0; i < repeats; i++) {
    const start = performance.now();
    fn();
    best = Math.min(best, performance.now() - start);
  }
  return best;
};

describe('speed sanity', () => {
  it('permute of 2048 x 2048 float32 is faster than the TypeScript loop', () => {
    const n = 2048;
    const x = { shape: [n, n], data: fill(n * n, 3, false) };
    const target = new Float32Array(n * n);
    const copy = bestMs(5, () => target.set(x.data));
    const native = bestMs(5, () => permuteNative(x, [1, 0], { into: target }));
    const fresh = bestMs(3, () => permuteNative(x, [1, 0]));
    const reference = bestMs(1, () => transposeF32(x, [1, 0]));
    const gbs = (ms: number) => ((4 * n * n) / ms / 1e6).toFixed(2);
    console.info(`permute ${n}x${n}: native ${native.toFixed(1)} ms (${gbs(native)} GB/s; ${fresh.toFixed(1)} ms into a fresh array), copy ${copy.toFixed(1)} ms (${gbs(copy)} GB/s), TypeScript ${reference.toFixed(1)} ms`);
    expect(firstDifference(target, transposeF32(x, [1, 0]).data)).toBe(-1);
    // Only a loose bound against the TypeScript loop: this machine is shared, and the copy ratio goes to the report.
    expect(native).toBeLessThan(reference / 2);
  });

  it('a rank-16 LoRA merge into 1024 x 1024 is faster than the TypeScript merge', () => {
    const { base, weighted } = makeLora({ specs: [{ out: 1024, inner: 1024, kernel: [], rank: 16, fanInFanOut: false }], adapters: [{ weight: 1, scaling: 2, sparse: false, covers: [true, true, true] }], seed: 9, special: false });
    const native = bestMs(3, () => mergeLoraNative(base, weighted));
    const reference = bestMs(1, () => mergeAdapters(base, weighted));
    console.info(`LoRA merge 1024x1024 rank 16: native ${native.toFixed(1)} ms, TypeScript ${reference.toFixed(1)} ms`);
    expect(native).toBeLessThan(reference);
  });
});
