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
      case 'transpose': case 'reshape': case 'cast': case 'slice':
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
      case 'transpose': case 'reshape': case 'cast': case 'slice': return { ...x, x: m(x.x) };
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
    case 'concat': return e.xs.length === 1 ? simplify(e.xs[0]) : { ...e, xs: e.xs.map(simplify) };
    case 'bnFoldWeight': return { ...e, weight: simplify(e.weight), gamma: simplify(e.gamma), variance: simplify(e.variance) };
    case 'bnFoldBias':
      return { ...e, ...(e.bias ? { bias: simplify(e.bias) } : {}), gamma: simplify(e.gamma), beta: simplify(e.beta), mean: simplify(e.mean), variance: simplify(e.variance) };
    default: return e;
  }
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
    case 'bnFoldWeight': return `bnFoldWeight[eps=${e.epsilon}](${[e.weight, e.gamma, e.variance].map(printExpr).join(', ')})`;
    case 'bnFoldBias': return `bnFoldBias[eps=${e.epsilon}](${[e.bias ? printExpr(e.bias) : '0', ...[e.gamma, e.beta, e.mean, e.variance].map(printExpr)].join(', ')})`;
    case 'constant': return `constant(${e.reason})`;
  }
};
