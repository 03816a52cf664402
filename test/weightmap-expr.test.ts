import { describe, expect, it } from 'vitest';
import { test, fc } from '@fast-check/vitest';
import * as E from 'fp-ts/lib/Either.js';
import { ExprCodec, exprSources, printExpr, simplify, type Expr } from '../src/weightmap/expr.js';
import { evaluateExpr, type F32Tensor } from '../src/weightmap/evaluate.js';
import { fingerprint, hashRange } from '../src/weightmap/fingerprint.js';
import { legacyScope, parseNameScopes } from '../src/weightmap/scopes.js';
import { untieSharedInitializers, untiedBase } from '../src/weightmap/untie.js';
import { restoreDroppedBiases } from '../src/weightmap/prepare.js';
import { memoryStore } from '../src/weightmap/store.js';
import { GraphBuilder } from '../src/trace/builder.js';
import { tensorOf } from '../src/trace/ir.js';

const leaf: fc.Arbitrary<Expr> = fc.constantFrom('a', 'b.weight', 'c.bias').map((name) => ({ op: 'source' as const, name }));
const { expr: exprArb } = fc.letrec<{ expr: Expr }>((tie) => ({
  expr: fc.oneof(
    { depthSize: 'small', withCrossShrink: true },
    leaf,
    fc.record({ op: fc.constant('transpose' as const), perm: fc.constantFrom([1, 0], [0, 1], [2, 0, 1]), x: tie('expr') }),
    fc.record({ op: fc.constant('reshape' as const), shape: fc.array(fc.nat(8), { maxLength: 3 }), x: tie('expr') }),
    fc.record({ op: fc.constant('cast' as const), to: fc.constantFrom('float32' as const, 'float16' as const, 'bfloat16' as const), x: tie('expr') }),
    fc.record({ op: fc.constant('slice' as const), axis: fc.nat(2), start: fc.nat(3), end: fc.nat(6), x: tie('expr') }),
    fc.record({ op: fc.constant('concat' as const), axis: fc.nat(1), xs: fc.array(tie('expr'), { minLength: 1, maxLength: 3 }) }),
    fc.record({ op: fc.constant('bnFoldWeight' as const), weight: tie('expr'), gamma: leaf, variance: leaf, epsilon: fc.constantFrom(1e-5, 1e-3) }),
    fc.record({ op: fc.constant('bnFoldBias' as const), bias: leaf, gamma: leaf, beta: leaf, mean: leaf, variance: leaf, epsilon: fc.constant(1e-5) }),
    fc.record({ op: fc.constant('constant' as const), reason: fc.string() }),
  ),
}));

/** A random [r, c] tensor and a naive element accessor for checking layouts independently. */
const matrix = fc.record({ r: fc.integer({ min: 1, max: 5 }), c: fc.integer({ min: 1, max: 5 }) }).chain(({ r, c }) =>
  fc.array(fc.float({ noNaN: true, noDefaultInfinity: true, min: -10, max: 10 }), { minLength: r * c, maxLength: r * c }).map((v): F32Tensor => ({ shape: [r, c], data: Float32Array.from(v) })));

const run = (e: Expr, tensors: Record<string, F32Tensor>): F32Tensor => {
  const r = evaluateExpr(e, (n) => tensors[n]);
  if (E.isLeft(r)) throw new Error(JSON.stringify(r.left));
  return r.right;
};

describe('expressions', () => {
  test.prop([exprArb])('round-trip through JSON and the codec', (e) => {
    const decoded = ExprCodec.decode(JSON.parse(JSON.stringify(e)));
    expect(E.isRight(decoded) && decoded.right).toEqual(JSON.parse(JSON.stringify(e)));
  });

  it('the codec refuses what is not an expression', () => {
    expect(E.isLeft(ExprCodec.decode({ op: 'transpose', perm: [1, 0] }))).toBe(true);
    expect(E.isLeft(ExprCodec.decode({ op: 'cast', to: 'int8', x: { op: 'source', name: 'a' } }))).toBe(true);
    expect(E.isLeft(ExprCodec.decode({ op: 'unknown' }))).toBe(true);
  });

  test.prop([matrix])('transpose, slice and concat place every element where index arithmetic says', (m) => {
    const [r, c] = m.shape;
    const at = (i: number, j: number) => m.data[i * c + j];
    const t = run({ op: 'transpose', perm: [1, 0], x: { op: 'source', name: 'm' } }, { m });
    expect(t.shape).toEqual([c, r]);
    for (let i = 0; i < r; i++) for (let j = 0; j < c; j++) expect(t.data[j * r + i]).toBe(at(i, j));
    const cat = run({ op: 'concat', axis: 1, xs: [{ op: 'source', name: 'm' }, { op: 'source', name: 'm' }] }, { m });
    expect(cat.shape).toEqual([r, 2 * c]);
    for (let i = 0; i < r; i++) for (let j = 0; j < 2 * c; j++) expect(cat.data[i * 2 * c + j]).toBe(at(i, j % c));
    const sl = run({ op: 'slice', axis: 1, start: Math.floor(c / 2), end: c, x: { op: 'source', name: 'm' } }, { m });
    for (let i = 0; i < r; i++) for (let j = Math.floor(c / 2); j < c; j++) expect(sl.data[i * (c - Math.floor(c / 2)) + j - Math.floor(c / 2)]).toBe(at(i, j));
  });

  test.prop([matrix, fc.array(fc.constantFrom('t', 'r'), { maxLength: 5 })])('simplify keeps the value', (m, steps) => {
    let e: Expr = { op: 'source', name: 'm' };
    let shape = [...m.shape];
    for (const s of steps) {
      if (s === 't') {
        e = { op: 'transpose', perm: [1, 0], x: e };
        shape = [shape[1], shape[0]];
      } else {
        e = { op: 'reshape', shape: [shape[0], shape[1]], x: e };
      }
    }
    const a = run(e, { m });
    const b = run(simplify(e), { m });
    expect(b.shape).toEqual(a.shape);
    expect(Array.from(b.data)).toEqual(Array.from(a.data));
    // Transposing twice disappears.
    expect(simplify({ op: 'transpose', perm: [1, 0], x: { op: 'transpose', perm: [1, 0], x: { op: 'source', name: 'm' } } })).toEqual({ op: 'source', name: 'm' });
  });

  it('folds BatchNorm into a weight and a bias per output channel', () => {
    const w: F32Tensor = { shape: [2, 1, 1, 2], data: new Float32Array([1, 2, 3, 4]) };
    const vec = (...v: number[]): F32Tensor => ({ shape: [v.length], data: new Float32Array(v) });
    const t = { w, b: vec(1, -1), g: vec(2, 3), beta: vec(0.5, 0.25), mean: vec(1, 1), v: vec(3, 8) };
    // gamma / sqrt(var + eps) with eps 1 gives exactly 1 and 1: values easy to check by hand.
    const fw = run({ op: 'bnFoldWeight', weight: { op: 'source', name: 'w' }, gamma: { op: 'source', name: 'g' }, variance: { op: 'source', name: 'v' }, epsilon: 1 }, t);
    expect(Array.from(fw.data)).toEqual([1, 2, 3, 4]);
    const fb = run({ op: 'bnFoldBias', bias: { op: 'source', name: 'b' }, gamma: { op: 'source', name: 'g' }, beta: { op: 'source', name: 'beta' }, mean: { op: 'source', name: 'mean' }, variance: { op: 'source', name: 'v' }, epsilon: 1 }, t);
    expect(Array.from(fb.data)).toEqual([0 + 0.5, -2 + 0.25]);
  });

  it('rounds casts to float16 and bfloat16 like the formats do', () => {
    const x: F32Tensor = { shape: [5], data: new Float32Array([1 / 3, 65519, 65520, 1 + 2 ** -11, -0.1]) };
    expect(Array.from(run({ op: 'cast', to: 'float16', x: { op: 'source', name: 'x' } }, { x }).data)).toEqual([0.333251953125, 65504, Infinity, 1, Math.fround(-0.0999755859375)]);
    expect(Array.from(run({ op: 'cast', to: 'bfloat16', x: { op: 'source', name: 'x' } }, { x }).data).slice(0, 1)).toEqual([0.333984375]);
  });

  it('names the missing source and the inconsistent operation', () => {
    expect(evaluateExpr({ op: 'source', name: 'nope' }, () => undefined)).toEqual(E.left({ _tag: 'MissingSource', name: 'nope' }));
    const r = evaluateExpr({ op: 'reshape', shape: [3], x: { op: 'source', name: 'a' } }, () => ({ shape: [2], data: new Float32Array(2) }));
    expect(E.isLeft(r) && r.left._tag).toBe('InvalidExpression');
    expect(exprSources({ op: 'concat', axis: 0, xs: [{ op: 'source', name: 'a' }, { op: 'source', name: 'b' }, { op: 'source', name: 'a' }] })).toEqual(['a', 'b']);
    expect(printExpr({ op: 'transpose', perm: [1, 0], x: { op: 'source', name: 'w' } })).toBe('transpose[1,0](src:w)');
  });
});

describe('fingerprints, scopes, untying', () => {
  test.prop([fc.float32Array({ noNaN: true, minLength: 1, maxLength: 64 })])('equal values hash alike (-0 as +0); a changed element changes the hash', (a) => {
    const b = a.map((v) => (v === 0 ? -v : v));
    expect(fingerprint(b)).toBe(fingerprint(a));
    const c = Float32Array.from(a);
    c[0] = c[0] === 1 ? 2 : 1;
    expect(fingerprint(c)).not.toBe(fingerprint(a));
    expect(hashRange(a, 0, a.length)).toBe(fingerprint(a));
  });

  it('reads module scopes from both exporters', () => {
    expect(parseNameScopes("['', 'encoder', 'encoder.layer.0', 'encoder.layer.0.attention.self.query', 'linear']")).toBe('encoder.layer.0.attention.self.query');
    expect(parseNameScopes("['', 'add']")).toBeUndefined();
    expect(legacyScope('/encoder/layer.0/attention/self/query/MatMul')).toBe('encoder.layer.0.attention.self.query');
    expect(legacyScope('node_MatMul_54')).toBeUndefined();
  });

  it('gives every use of a shared float initializer its own initializer, sharing the data', () => {
    const b = new GraphBuilder('g');
    const x = b.input('x', 'float32', [1, 2]);
    const w = b.initializer('w', tensorOf('float32', [2], [1, 2]));
    const shape = b.constant('s', 'int64', [2], [1, 2]);
    const y = b.op('Add', [b.op('Mul', [x, w]), w]);
    b.output(b.op('Reshape', [b.op('Reshape', [y, shape]), shape]));
    const g = untieSharedInitializers(b.build());
    const floats = g.initializers.filter((i) => i.tensor.dtype === 'float32');
    expect(floats.map((i) => i.name).sort()).toEqual(['w@use0', 'w@use1']);
    expect(floats[0].tensor.data).toBe(floats[1].tensor.data);
    expect(floats.map((i) => untiedBase(i.name))).toEqual(['w', 'w']);
    // Shape constants stay shared.
    expect(g.initializers.filter((i) => i.name === 's').length).toBe(1);
    expect(g.nodes.flatMap((n) => n.inputs).filter((i) => i.startsWith('w')).sort()).toEqual(['w@use0', 'w@use1']);
  });

  it('gives back a zero bias the exporter dropped from a Gemm, and only a zero one', () => {
    const build = () => {
      const b = new GraphBuilder('g');
      const x = b.input('x', 'float32', [1, 2]);
      b.output(b.op('Gemm', [x, b.initializer('h.0.c_fc.weight', tensorOf('float32', [2, 3], [1, 2, 3, 4, 5, 6]))]));
      return b.build();
    };
    const weight = { shape: [2, 3], data: new Float32Array([1, 2, 3, 4, 5, 6]) };
    const zero = restoreDroppedBiases(build(), memoryStore([['module.h.0.c_fc.weight', weight], ['module.h.0.c_fc.bias', { shape: [3], data: new Float32Array(3) }]]), () => undefined).graph;
    const gemm = zero.nodes.find((n) => n.opType === 'Gemm')!;
    expect(gemm.inputs[2]).toBe('h.0.c_fc.bias');
    expect(Array.from(zero.initializers.find((i) => i.name === 'h.0.c_fc.bias')!.tensor.data as Float32Array)).toEqual([0, 0, 0]);
    const nonzero = restoreDroppedBiases(build(), memoryStore([['h.0.c_fc.weight', weight], ['h.0.c_fc.bias', { shape: [3], data: new Float32Array([0, 1, 0]) }]]), () => undefined).graph;
    expect(nonzero.nodes.find((n) => n.opType === 'Gemm')!.inputs.length).toBe(2);
  });
});
