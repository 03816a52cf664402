/**
 * The weight map's expression language: how one engine weight (or fallback initializer) is computed from
 * checkpoint tensors. Plain JSON data with an io-ts codec, so a map is stored with the compiled model and a
 * later refit needs neither the ONNX file nor any search.
 */
import * as t from 'io-ts';

export type CastTarget = 'float32' | 'float16' | 'bfloat16';

export type Expr =
  /** A checkpoint tensor, by name. The same name in several expressions is a tied weight. */
  | { readonly op: 'source'; readonly name: string }
  | { readonly op: 'transpose'; readonly perm: readonly number[]; readonly x: Expr }
  | { readonly op: 'reshape'; readonly shape: readonly number[]; readonly x: Expr }
  /** Rounds float32 values to the target precision (values stay float32 numbers). */
  | { readonly op: 'cast'; readonly to: CastTarget; readonly x: Expr }
  /** Elements [start, end) along one axis. */
  | { readonly op: 'slice'; readonly axis: number; readonly start: number; readonly end: number; readonly x: Expr }
  | { readonly op: 'concat'; readonly axis: number; readonly xs: readonly Expr[] }
  /**
   * ONNX Gather with constant indices (a graph constant, e.g. T5's relative-position buckets): output shape
   * x.shape[:axis] + indicesShape + x.shape[axis+1:]; `indices` row-major over indicesShape, negative ones
   * counting from the end of the axis. A negative axis counts from the end of x's rank.
   */
  | { readonly op: 'gather'; readonly axis: number; readonly indicesShape: readonly number[]; readonly indices: readonly number[]; readonly x: Expr }
  /** Broadcast (numpy rules, as ONNX Expand) of x to exactly `shape`: x's dimensions align right, each 1 or equal. */
  | { readonly op: 'expand'; readonly shape: readonly number[]; readonly x: Expr }
  /** conv weight * gamma / sqrt(var + eps), per output channel (axis 0): the legacy exporter's BatchNorm fold. */
  | { readonly op: 'bnFoldWeight'; readonly weight: Expr; readonly gamma: Expr; readonly variance: Expr; readonly epsilon: number }
  /** (bias - mean) * gamma / sqrt(var + eps) + beta; a convolution without bias folds as bias 0. */
  | {
      readonly op: 'bnFoldBias';
      readonly bias?: Expr;
      readonly gamma: Expr;
      readonly beta: Expr;
      readonly mean: Expr;
      readonly variance: Expr;
      readonly epsilon: number;
    }
  /** No checkpoint source: the value written in the graph stays. Not refittable. */
  | { readonly op: 'constant'; readonly reason: string };

const numbers = t.readonlyArray(t.number);

export const ExprCodec: t.Type<Expr> = t.recursion('Expr', () =>
  t.union([
    t.type({ op: t.literal('source'), name: t.string }),
    t.type({ op: t.literal('transpose'), perm: numbers, x: ExprCodec }),
    t.type({ op: t.literal('reshape'), shape: numbers, x: ExprCodec }),
    t.type({ op: t.literal('cast'), to: t.keyof({ float32: null, float16: null, bfloat16: null }), x: ExprCodec }),
    t.type({ op: t.literal('slice'), axis: t.number, start: t.number, end: t.number, x: ExprCodec }),
    t.type({ op: t.literal('concat'), axis: t.number, xs: t.readonlyArray(ExprCodec) }),
    t.type({ op: t.literal('gather'), axis: t.number, indicesShape: numbers, indices: numbers, x: ExprCodec }),
    t.type({ op: t.literal('expand'), shape: numbers, x: ExprCodec }),
    t.type({ op: t.literal('bnFoldWeight'), weight: ExprCodec, gamma: ExprCodec, variance: ExprCodec, epsilon: t.number }),
    t.intersection([
      t.type({ op: t.literal('bnFoldBias'), gamma: ExprCodec, beta: ExprCodec, mean: ExprCodec, variance: ExprCodec, epsilon: t.number }),
      t.partial({ bias: ExprCodec }),
    ]),
    t.type({ op: t.literal('constant'), reason: t.string }),
  ]),
);

export const source = (name: string): Expr => ({ op: 'source', name });

/** Checkpoint tensor names an expression reads, in first-seen order. */
export const exprSources = (e: Expr): string[] => {
  const out: string[] = [];
  const walk = (x: Expr | undefined): void => {
    if (x === undefined) return;
    switch (x.op) {
      case 'source':
        if (!out.includes(x.name)) out.push(x.name);
        return;
      case 'transpose': case 'reshape': case 'cast': case 'slice': case 'gather': case 'expand':
        walk(x.x);
        return;
      case 'concat':
        x.xs.forEach(walk);
        return;
      case 'bnFoldWeight':
        [x.weight, x.gamma, x.variance].forEach(walk);
        return;
      case 'bnFoldBias':
        [x.bias, x.gamma, x.beta, x.mean, x.variance].forEach(walk);
        return;
      case 'constant':
        return;
    }
  };
  walk(e);
  return out;
};

/** Renames sources (used by the property tests and by prefix rewrites). */
export const mapSources = (e: Expr, f: (name: string) => string): Expr => {
  const m = (x: Expr): Expr => {
    switch (x.op) {
      case 'source': return { op: 'source', name: f(x.name) };
      case 'transpose': case 'reshape': case 'cast': case 'slice': case 'gather': case 'expand': return { ...x, x: m(x.x) };
      case 'concat': return { ...x, xs: x.xs.map(m) };
      case 'bnFoldWeight': return { ...x, weight: m(x.weight), gamma: m(x.gamma), variance: m(x.variance) };
      case 'bnFoldBias': return { ...x, ...(x.bias ? { bias: m(x.bias) } : {}), gamma: m(x.gamma), beta: m(x.beta), mean: m(x.mean), variance: m(x.variance) };
      case 'constant': return x;
    }
  };
  return m(e);
};

/** True when the expression is a pure function of checkpoint tensors (no constant part). */
export const isRefittableExpr = (e: Expr): boolean => e.op !== 'constant' && exprSources(e).length > 0;

const isIdentityPerm = (perm: readonly number[]): boolean => perm.every((p, i) => p === i);

/** Composes nested transposes and reshapes and drops identities, so equal maps print alike. */
export const simplify = (e: Expr): Expr => {
  switch (e.op) {
    case 'transpose': {
      const x = simplify(e.x);
      if (x.op === 'transpose') {
        // transpose(transpose(y, p), q)[i] = y permuted by p then q: composed perm r[i] = p[q[i]].
        const perm = e.perm.map((q) => x.perm[q]);
        return isIdentityPerm(perm) ? x.x : { op: 'transpose', perm, x: x.x };
      }
      return isIdentityPerm(e.perm) ? x : { op: 'transpose', perm: e.perm, x };
    }
    case 'reshape': {
      const x = simplify(e.x);
      return x.op === 'reshape' ? { op: 'reshape', shape: e.shape, x: x.x } : { op: 'reshape', shape: e.shape, x };
    }
    case 'cast': return { ...e, x: simplify(e.x) };
    case 'slice': return { ...e, x: simplify(e.x) };
    case 'gather': return { ...e, x: simplify(e.x) };
    case 'expand': {
      // expand(expand(y, s1), s2) = expand(y, s2): s2 broadcasts from s1, which broadcasts from y.
      const x = simplify(e.x);
      return x.op === 'expand' ? { op: 'expand', shape: e.shape, x: x.x } : { op: 'expand', shape: e.shape, x };
    }
    case 'concat': return e.xs.length === 1 ? simplify(e.xs[0]) : { ...e, xs: e.xs.map(simplify) };
    case 'bnFoldWeight': return { ...e, weight: simplify(e.weight), gamma: simplify(e.gamma), variance: simplify(e.variance) };
    case 'bnFoldBias':
      return { ...e, ...(e.bias ? { bias: simplify(e.bias) } : {}), gamma: simplify(e.gamma), beta: simplify(e.beta), mean: simplify(e.mean), variance: simplify(e.variance) };
    default: return e;
  }
};

/** Short indices as they are; longer ones as their count and a 32-bit FNV-1a hash (equal maps print alike). */
const indicesText = (indices: readonly number[]): string => {
  if (indices.length <= 8) return indices.join(',');
  let h = 0x811c9dc5;
  for (const v of indices) {
    for (const c of `${v},`) h = Math.imul(h ^ c.charCodeAt(0), 0x01000193) >>> 0;
  }
  return `${indices.length}#${h.toString(16).padStart(8, '0')}`;
};

/** A compact text form, e.g. `transpose[1,0](src:h.0.attn.c_attn.weight)`. */
export const printExpr = (e: Expr): string => {
  switch (e.op) {
    case 'source': return `src:${e.name}`;
    case 'transpose': return `transpose[${e.perm.join(',')}](${printExpr(e.x)})`;
    case 'reshape': return `reshape[${e.shape.join(',')}](${printExpr(e.x)})`;
    case 'cast': return `cast[${e.to}](${printExpr(e.x)})`;
    case 'slice': return `slice[${e.axis}:${e.start}:${e.end}](${printExpr(e.x)})`;
    case 'concat': return `concat[${e.axis}](${e.xs.map(printExpr).join(', ')})`;
    case 'gather': return `gather[${e.axis};${e.indicesShape.join('x') || 'scalar'};${indicesText(e.indices)}](${printExpr(e.x)})`;
    case 'expand': return `expand[${e.shape.join(',')}](${printExpr(e.x)})`;
    case 'bnFoldWeight': return `bnFoldWeight[eps=${e.epsilon}](${[e.weight, e.gamma, e.variance].map(printExpr).join(', ')})`;
    case 'bnFoldBias': return `bnFoldBias[eps=${e.epsilon}](${[e.bias ? printExpr(e.bias) : '0', ...[e.gamma, e.beta, e.mean, e.variance].map(printExpr)].join(', ')})`;
    case 'constant': return `constant(${e.reason})`;
  }
};
