/**
 * Tensor-parallel shards of a transformer, as Megatron splits it: in each block, q/k/v and the first MLP
 * linear are column-parallel (each rank holds a slice of the output features: whole heads, a slice of
 * the hidden MLP width), the attention output and second MLP linear are row-parallel (each rank holds the
 * matching slice of the input features and produces a partial sum). Summing the partial sums over ranks
 * (the all-reduce) and adding the row-parallel biases once gives the unsplit model's result.
 *
 * Every rank's networks have identical structure (only weight values differ), so rank 0 builds and every
 * other rank is a cache hit refitted with its own slices. Which slice a rank holds is a weight-map
 * expression (`slice` over the checkpoint tensor), evaluated against the unsplit checkpoint.
 *
 * Per block a rank runs two networks, split where the all-reduces are: attention (layer norm, q/k/v,
 * attention over its heads, partial output projection) and MLP (layer norm, partial MLP).
 */
import * as E from 'fp-ts/lib/Either.js';
import type { Layer, NetworkDefinition, Weights } from '../network/types.js';
import { evaluateExpr, type F32Tensor } from '../weightmap/evaluate.js';
import { source, type Expr } from '../weightmap/expr.js';

export interface TransformerSpec {
  readonly layers: number;
  readonly hidden: number;
  readonly heads: number;
  readonly ffn: number;
  readonly seq: number;
}

/** Checkpoint tensors by name (torch.nn.Linear layout: weight [out, in]). */
export type Checkpoint = ReadonlyMap<string, F32Tensor>;

export type ParallelError =
  | { readonly _tag: 'IndivisibleShape'; readonly what: string; readonly size: number; readonly ranks: number }
  | { readonly _tag: 'MissingTensor'; readonly name: string; readonly detail: string };

export class ParallelShardError extends Error {
  override readonly name = 'ParallelShardError';
  readonly _tag: ParallelError['_tag'];
  constructor(readonly detail: ParallelError) {
    super(detail._tag === 'IndivisibleShape' ? `${detail.what} (${detail.size}) does not split into ${detail.ranks} ranks` : `checkpoint tensor '${detail.name}': ${detail.detail}`);
    this._tag = detail._tag;
  }
}

const p = (l: number, name: string) => `h.${l}.${name}`;

/** Names and shapes of the unsplit checkpoint. */
export const checkpointShapes = (s: TransformerSpec): Array<[string, number[]]> => {
  const out: Array<[string, number[]]> = [];
  for (let l = 0; l < s.layers; l++) {
    out.push([p(l, 'ln1.weight'), [s.hidden]], [p(l, 'ln1.bias'), [s.hidden]]);
    for (const m of ['q', 'k', 'v', 'o']) out.push([p(l, `attn.${m}.weight`), [s.hidden, s.hidden]], [p(l, `attn.${m}.bias`), [s.hidden]]);
    out.push([p(l, 'ln2.weight'), [s.hidden]], [p(l, 'ln2.bias'), [s.hidden]]);
    out.push([p(l, 'mlp.fc1.weight'), [s.ffn, s.hidden]], [p(l, 'mlp.fc1.bias'), [s.ffn]]);
    out.push([p(l, 'mlp.fc2.weight'), [s.hidden, s.ffn]], [p(l, 'mlp.fc2.bias'), [s.hidden]]);
  }
  return out;
};

/** How rank `rank` of `ranks` computes each of its weights from the unsplit checkpoint. */
export const shardExpressions = (s: TransformerSpec, rank: number, ranks: number): E.Either<ParallelError, Map<string, Expr>> => {
  if (s.heads % ranks !== 0) return E.left({ _tag: 'IndivisibleShape', what: 'heads', size: s.heads, ranks });
  if (s.ffn % ranks !== 0) return E.left({ _tag: 'IndivisibleShape', what: 'ffn', size: s.ffn, ranks });
  if (s.hidden % s.heads !== 0) return E.left({ _tag: 'IndivisibleShape', what: 'hidden over heads', size: s.hidden, ranks: s.heads });
  const h = s.hidden / ranks;
  const f = s.ffn / ranks;
  const slice = (name: string, axis: number, width: number): Expr => ({ op: 'slice', axis, start: rank * width, end: (rank + 1) * width, x: source(name) });
  const out = new Map<string, Expr>();
  for (let l = 0; l < s.layers; l++) {
    for (const n of ['ln1.weight', 'ln1.bias', 'ln2.weight', 'ln2.bias']) out.set(p(l, n), source(p(l, n)));
    for (const m of ['q', 'k', 'v']) {
      out.set(p(l, `attn.${m}.weight`), slice(p(l, `attn.${m}.weight`), 0, h)); // column-parallel
      out.set(p(l, `attn.${m}.bias`), slice(p(l, `attn.${m}.bias`), 0, h));
    }
    out.set(p(l, 'attn.o.weight'), slice(p(l, 'attn.o.weight'), 1, h)); // row-parallel
    out.set(p(l, 'mlp.fc1.weight'), slice(p(l, 'mlp.fc1.weight'), 0, f));
    out.set(p(l, 'mlp.fc1.bias'), slice(p(l, 'mlp.fc1.bias'), 0, f));
    out.set(p(l, 'mlp.fc2.weight'), slice(p(l, 'mlp.fc2.weight'), 1, f));
  }
  return E.right(out);
};

/** Rank `rank`'s own checkpoint: the shard expressions evaluated on the unsplit one. */
export const shardCheckpoint = (s: TransformerSpec, checkpoint: Checkpoint, rank: number, ranks: number): E.Either<ParallelError, Map<string, F32Tensor>> => {
  const exprs = shardExpressions(s, rank, ranks);
  if (E.isLeft(exprs)) return exprs;
  const out = new Map<string, F32Tensor>();
  for (const [name, expr] of exprs.right) {
    const v = evaluateExpr(expr, (n) => checkpoint.get(n));
    if (E.isLeft(v)) return E.left({ _tag: 'MissingTensor', name, detail: JSON.stringify(v.left) });
    out.set(name, v.right);
  }
  return E.right(out);
};

const w = (t: F32Tensor | undefined, name: string): Weights => {
  if (t === undefined) throw new ParallelShardError({ _tag: 'MissingTensor', name, detail: 'not in the checkpoint' });
  return { dtype: 'float32', shape: t.shape, data: t.data };
};

/** A small builder of named layers. */
class Layers {
  readonly list: Layer[] = [];
  add<L extends Layer>(layer: L): string {
    this.list.push(layer);
    return layer.output;
  }
}

/** The networks of one rank for `ranks` ranks (ranks = 1: the block's networks without any split):
 *  per block, attention then MLP, each producing the block's partial sum `partial`. Inputs: `x`
 *  [1, seq, hidden]. Row-parallel biases are not in them (added once, after the sum). */
export const rankNetworks = (s: TransformerSpec, shard: Checkpoint, ranks: number): NetworkDefinition[] => {
  const hd = s.hidden / s.heads;
  const heads = s.heads / ranks;
  const h = s.hidden / ranks;
  const nets: NetworkDefinition[] = [];
  const x = { name: 'x', dtype: 'float32' as const, shape: [1, s.seq, s.hidden] };
  for (let l = 0; l < s.layers; l++) {
    const g = (n: string) => w(shard.get(p(l, n)), p(l, n));
    const a = new Layers();
    const ln = a.add({ kind: 'layerNorm', name: 'ln1', output: 'ln1', input: 'x', axis: -1, epsilon: 1e-5, scale: g('ln1.weight'), shift: g('ln1.bias') });
    const split = (m: string) => {
      const y = a.add({ kind: 'fullyConnected', name: m, output: m, input: ln, outFeatures: h, kernel: g(`attn.${m}.weight`), bias: g(`attn.${m}.bias`) });
      const r = a.add({ kind: 'reshape', name: `${m}_split`, output: `${m}_split`, input: y, shape: [1, s.seq, heads, hd] });
      return a.add({ kind: 'transpose', name: `${m}_heads`, output: `${m}_heads`, input: r, perm: [0, 2, 1, 3] });
    };
    const q = split('q');
    const k = split('k');
    const v = split('v');
    const scores = a.add({ kind: 'matrixMultiply', name: 'scores', output: 'scores', a: q, transposeA: false, b: k, transposeB: true });
    const scale = a.add({ kind: 'constant', name: 'scale', output: 'scale', weights: { dtype: 'float32', shape: [1], data: Float32Array.of(1 / Math.sqrt(hd)) } });
    const scaled = a.add({ kind: 'elementwise', name: 'scaled', output: 'scaled', a: scores, b: scale, op: 'mul' });
    const probs = a.add({ kind: 'softmax', name: 'probs', output: 'probs', input: scaled, axis: -1 });
    const ctx = a.add({ kind: 'matrixMultiply', name: 'ctx', output: 'ctx', a: probs, transposeA: false, b: v, transposeB: false });
    const merged = a.add({ kind: 'transpose', name: 'merge', output: 'merge', input: ctx, perm: [0, 2, 1, 3] });
    const flat = a.add({ kind: 'reshape', name: 'flat', output: 'flat', input: merged, shape: [1, s.seq, h] });
    const o = a.add({ kind: 'fullyConnected', name: 'o', output: 'o', input: flat, outFeatures: s.hidden, kernel: g('attn.o.weight') });
    nets.push({ inputs: [x], layers: a.list, outputs: [{ tensor: o, name: 'partial' }] });

    const m = new Layers();
    const ln2 = m.add({ kind: 'layerNorm', name: 'ln2', output: 'ln2', input: 'x', axis: -1, epsilon: 1e-5, scale: g('ln2.weight'), shift: g('ln2.bias') });
    const fc1 = m.add({ kind: 'fullyConnected', name: 'fc1', output: 'fc1', input: ln2, outFeatures: s.ffn / ranks, kernel: g('mlp.fc1.weight'), bias: g('mlp.fc1.bias') });
    const act = m.add({ kind: 'unary', name: 'gelu', output: 'gelu', input: fc1, op: 'gelu_erf' });
    const fc2 = m.add({ kind: 'fullyConnected', name: 'fc2', output: 'fc2', input: act, outFeatures: s.hidden, kernel: g('mlp.fc2.weight') });
    nets.push({ inputs: [x], layers: m.list, outputs: [{ tensor: fc2, name: 'partial' }] });
  }
  return nets;
};

/** Something that runs network `index` of a rank on its input. */
export type RankRunner = (index: number, x: Float32Array) => Float32Array;

/** Runs the model over ranks: each block's partial sums are summed over ranks (the all-reduce), the
 *  row-parallel bias added once, and the residual added. Returns the final hidden states. */
export const runParallel = (s: TransformerSpec, checkpoint: Checkpoint, ranks: readonly RankRunner[], x: Float32Array): Float32Array => {
  let hidden = Float32Array.from(x);
  for (let l = 0; l < s.layers; l++) {
    for (const [part, bias] of [[0, 'attn.o.bias'], [1, 'mlp.fc2.bias']] as const) {
      const sum = new Float32Array(hidden.length);
      for (const run of ranks) {
        const partial = run(2 * l + part, hidden);
        for (let i = 0; i < sum.length; i++) sum[i] += partial[i];
      }
      const b = checkpoint.get(p(l, bias));
      if (b === undefined) throw new ParallelShardError({ _tag: 'MissingTensor', name: p(l, bias), detail: 'not in the checkpoint' });
      const next = new Float32Array(hidden.length);
      for (let i = 0; i < next.length; i++) next[i] = hidden[i] + sum[i] + b.data[i % s.hidden];
      hidden = next;
    }
  }
  return hidden;
};

/** The unsplit model as one network (an independent construction, for checking the shards). */
export const fullNetwork = (s: TransformerSpec, checkpoint: Checkpoint): NetworkDefinition => {
  const layers: Layer[] = [];
  let x = 'x';
  const g = (l: number, n: string) => w(checkpoint.get(p(l, n)), p(l, n));
  const add = (layer: Layer) => {
    layers.push(layer);
    return layer.output;
  };
  const block = rankNetworks(s, checkpoint, 1);
  for (let l = 0; l < s.layers; l++) {
    // Reuse the unsplit attention and MLP bodies, renamed per block, then add bias and residual in-graph.
    for (const [i, bias] of [[0, 'attn.o.bias'], [1, 'mlp.fc2.bias']] as const) {
      const net = block[2 * l + i];
      const rename = (t: string) => (t === 'x' ? x : `b${l}p${i}_${t}`);
      for (const layer of net.layers) {
        const copy: Record<string, unknown> = { ...layer, name: rename(layer.name), output: rename(layer.output) };
        for (const k of ['input', 'a', 'b']) if (k in layer) copy[k] = rename((layer as unknown as Record<string, string>)[k]);
        add(copy as unknown as Layer);
      }
      const partial = rename(net.outputs[0].tensor);
      const biasLayer = add({ kind: 'constant', name: `b${l}p${i}_bias`, output: `b${l}p${i}_bias`, weights: g(l, bias) });
      const biased = add({ kind: 'elementwise', name: `b${l}p${i}_biased`, output: `b${l}p${i}_biased`, a: partial, b: biasLayer, op: 'add' });
      x = add({ kind: 'elementwise', name: `b${l}p${i}_residual`, output: `b${l}p${i}_residual`, a: x, b: biased, op: 'add' });
    }
  }
  return { inputs: [{ name: 'x', dtype: 'float32', shape: [1, s.seq, s.hidden] }], layers, outputs: [{ tensor: x, name: 'y' }] };
};

/** A seeded random checkpoint of the spec's shapes. */
export const randomCheckpoint = (s: TransformerSpec, seed: number): Map<string, F32Tensor> => {
  let state = seed >>> 0 || 1;
  const next = () => {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    return (state >>> 0) / 4294967296;
  };
  const out = new Map<string, F32Tensor>();
  for (const [name, shape] of checkpointShapes(s)) {
    const n = shape.reduce((a, b) => a * b, 1);
    const data = new Float32Array(n);
    const isNormScale = name.endsWith('ln1.weight') || name.endsWith('ln2.weight');
    const r = shape.length === 2 ? 1 / Math.sqrt(shape[1]) : 0.1;
    for (let i = 0; i < n; i++) data[i] = isNormScale ? 0.8 + 0.4 * next() : (2 * next() - 1) * r;
    out.set(name, { shape, data });
  }
  return out;
};
