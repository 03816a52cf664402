/**
 * The weight map: for every weight of every engine segment and every constant of every fallback segment,
 * an expression over checkpoint tensors. Each weight's provenance (an expression over ONNX initializers,
 * recorded by trace and lowering) is composed with the match of each initializer to checkpoint tensors
 * (match.ts). Computed once, against the build checkpoint; the result is plain data (WeightMapCodec) stored
 * with the compiled model, so a refit needs neither the ONNX file nor any search.
 */
import * as E from 'fp-ts/lib/Either.js';
import * as t from 'io-ts';
import type { AnalyzedGraph } from '../trace/analyze.js';
import { isFloat, toBytes, type Node, type Tensor } from '../trace/ir.js';
import type { Provenance } from '../trace/provenance.js';
import type { Segment } from '../partition/index.js';
import { lowerContext, lowerSegment } from '../network/lower.js';
import { networkWeights, type WeightRole } from '../network/types.js';
import { exprSources, ExprCodec, simplify, type Expr, type CastTarget } from './expr.js';
import type { F32Tensor } from './evaluate.js';
import { CheckpointIndex, type Match, type MatchMethod, WRAPPER_PREFIXES } from './match.js';
import { legacyScope, type NodeScopes } from './scopes.js';
import type { TensorStore } from './store.js';
import { isUntiedCopy, untiedBase } from './untie.js';
import { combineDigests, digestCache, valueDigest } from './digest.js';

export type TargetStatus = 'mapped' | 'constant' | 'unmapped';

export interface MapTarget {
  /** `engine/<segment>/<layer>/<role>` or `fallback/<segment>/<tensor>`. */
  readonly id: string;
  readonly kind: 'engine' | 'fallback';
  readonly segment: number;
  readonly layer?: string;
  readonly role?: WeightRole;
  readonly tensor?: string;
  /** The target's dtype as the engine or fallback holds it (float32, int64, ...). */
  readonly dtype: string;
  readonly shape: readonly number[];
  readonly status: TargetStatus;
  /** For constant and unmapped targets: a `constant` expression giving the reason. */
  readonly expr: Expr;
  /** How each checkpoint part was found. */
  readonly methods: readonly MatchMethod[];
  /** Digests at build: of the checkpoint tensors the expression reads, and of the value the target holds. */
  readonly built: { readonly sourceDigest: string; readonly valueDigest: string };
}

export interface SourceInfo {
  readonly name: string;
  readonly dtype: string;
  readonly shape: readonly number[];
}

export interface Tie {
  readonly target: string;
  readonly chosen: string;
  readonly alternatives: readonly string[];
}

export interface WeightMap {
  readonly version: 1;
  /** Checkpoint tensors the map reads, as the build checkpoint had them. */
  readonly sources: readonly SourceInfo[];
  readonly targets: readonly MapTarget[];
  /** Checkpoint tensors of the build checkpoint that map to nothing (e.g. num_batches_tracked). */
  readonly unused: readonly string[];
  /** Values equal in several checkpoint tensors, and the choice made by name similarity. */
  readonly ties: readonly Tie[];
  /** Checkpoint tensors feeding several targets. */
  readonly tied: readonly { readonly source: string; readonly targets: readonly string[] }[];
}

const Shape = t.readonlyArray(t.number);
const SourceInfoCodec = t.type({ name: t.string, dtype: t.string, shape: Shape });
const RoleCodec = t.keyof({ kernel: null, bias: null, scale: null, shift: null, constant: null, mean: null, variance: null });
const MethodCodec = t.keyof({ name: null, 'normalized-name': null, value: null, transpose: null, rows: null, 'bn-fold': null, 'name-only': null });
export const MapTargetCodec = t.intersection([
  t.type({
    id: t.string,
    kind: t.keyof({ engine: null, fallback: null }),
    segment: t.number,
    dtype: t.string,
    shape: Shape,
    status: t.keyof({ mapped: null, constant: null, unmapped: null }),
    expr: ExprCodec,
    methods: t.readonlyArray(MethodCodec),
    built: t.type({ sourceDigest: t.string, valueDigest: t.string }),
  }),
  t.partial({ layer: t.string, role: RoleCodec, tensor: t.string }),
]);
export const WeightMapCodec: t.Type<WeightMap> = t.type({
  version: t.literal(1),
  sources: t.readonlyArray(SourceInfoCodec),
  targets: t.readonlyArray(MapTargetCodec),
  unused: t.readonlyArray(t.string),
  ties: t.readonlyArray(t.type({ target: t.string, chosen: t.string, alternatives: t.readonlyArray(t.string) })),
  tied: t.readonlyArray(t.type({ source: t.string, targets: t.readonlyArray(t.string) })),
}) as unknown as t.Type<WeightMap>;

export type WeightMapErrorDetail =
  | { readonly _tag: 'UnmappedWeights'; readonly weights: readonly { readonly id: string; readonly reason: string }[] }
  | { readonly _tag: 'LowerFailed'; readonly segment: number; readonly reason: string };

export const describeWeightMapError = (e: WeightMapErrorDetail): string =>
  e._tag === 'UnmappedWeights'
    ? `${e.weights.length} refittable weight(s) have no checkpoint source: ${e.weights.map((w) => `${w.id} (${w.reason})`).join('; ')}`
    : `engine segment ${e.segment} could not be lowered: ${e.reason}`;

export class WeightMapError extends Error {
  override readonly name = 'WeightMapError';
  readonly _tag: WeightMapErrorDetail['_tag'];
  constructor(readonly detail: WeightMapErrorDetail) {
    super(describeWeightMapError(detail));
    this._tag = detail._tag;
  }
}

export interface WeightMapInput {
  readonly analyzed: AnalyzedGraph;
  readonly segments: readonly Segment[];
  readonly checkpoint: TensorStore;
  /** Module scope per ONNX node name (scopes.ts); legacy-style node names are read without it. */
  readonly scopes?: NodeScopes;
}

export interface WeightMapOptions {
  /** Build the map even when refittable weights have no checkpoint source (they stay as built). */
  readonly allowUnmapped?: boolean;
  readonly prefixes?: readonly string[];
}

// ---- targets ------------------------------------------------------------------------------------

interface PendingTarget {
  readonly id: string;
  readonly kind: 'engine' | 'fallback';
  readonly segment: number;
  readonly layer?: string;
  readonly role?: WeightRole;
  readonly tensor?: string;
  readonly value: Tensor;
  readonly provenance: Provenance;
  /** Graph nodes whose scope names the target (the layer's node, or the constant's readers). */
  readonly nodes: readonly string[];
}

const roleSuffix = (role: WeightRole | undefined): string | undefined =>
  role === 'kernel' || role === 'scale' ? 'weight' : role === 'bias' || role === 'shift' ? 'bias' : role === 'mean' ? 'running_mean' : role === 'variance' ? 'running_var' : undefined;

const f32 = (t: Tensor): F32Tensor | undefined => {
  if (t.dtype === 'float32') return { shape: t.shape, data: t.data as Float32Array };
  if (t.dtype === 'float64') return { shape: t.shape, data: Float32Array.from(t.data as Float64Array) };
  return undefined;
};

const collectTargets = (input: WeightMapInput): E.Either<WeightMapErrorDetail, PendingTarget[]> => {
  const { analyzed } = input;
  const ctx = lowerContext(analyzed);
  const readers = readersOf(analyzed.graph.nodes);
  const out: PendingTarget[] = [];
  for (const segment of input.segments) {
    if (segment.outputs.length === 0) continue; // dead code: never run (CompiledModel skips it too)
    if (segment.kind === 'engine') {
      const lowered = lowerSegment(ctx, segment);
      if (E.isLeft(lowered)) return E.left({ _tag: 'LowerFailed', segment: segment.index, reason: JSON.stringify(lowered.left) });
      const values = new Map(networkWeights(lowered.right.network).map((w) => [`${w.layer}\u0000${w.role}`, w.weights]));
      for (const w of lowered.right.weights) {
        const v = values.get(`${w.layer}\u0000${w.role}`)!;
        const tensorName = w.layer.startsWith('const:') ? w.layer.slice('const:'.length) : undefined;
        out.push({
          id: `engine/${segment.index}/${w.layer}/${w.role}`, kind: 'engine', segment: segment.index, layer: w.layer, role: w.role,
          value: { dtype: v.dtype, shape: v.shape, data: v.data },
          provenance: w.provenance,
          nodes: tensorName !== undefined ? (readers.get(tensorName) ?? []).map((n) => n.name) : [w.layer.replace(/\/(matmul|split\d+)$/, '')],
        });
      }
    } else {
      for (const c of segment.constants) {
        const constant = analyzed.constants.get(c)!;
        out.push({
          id: `fallback/${segment.index}/${c}`, kind: 'fallback', segment: segment.index, tensor: c,
          value: constant.tensor, provenance: constant.provenance, nodes: (readers.get(c) ?? []).map((n) => n.name),
        });
      }
    }
  }
  return E.right(out);
};

const readersOf = (nodes: readonly Node[]): Map<string, Node[]> => {
  const readers = new Map<string, Node[]>();
  for (const n of nodes) {
    for (const i of n.inputs) {
      if (i === '') continue;
      const list = readers.get(i);
      if (list) list.push(n);
      else readers.set(i, [n]);
    }
  }
  return readers;
};

// ---- leaves and composition ---------------------------------------------------------------------

type LeafResult =
  | { readonly kind: 'mapped'; readonly match: Match }
  | { readonly kind: 'constant'; readonly reason: string }
  | { readonly kind: 'unmapped'; readonly reason: string };

/** Exporters lift Python scalars and masks into initializers; no checkpoint tensor backs them. */
const graphConstantReason = (v: F32Tensor): string | undefined => {
  if (v.data.length <= 1) return 'a scalar written by the exporter';
  const distinct = new Set<number>();
  for (const x of v.data) {
    distinct.add(x);
    if (distinct.size > 2) return undefined;
  }
  return `a fill or mask of ${distinct.size} distinct value(s)`;
};

type Composed = { readonly kind: 'expr'; readonly expr: Expr; readonly methods: MatchMethod[] } | { readonly kind: 'constant'; readonly reason: string } | { readonly kind: 'fail'; readonly reason: string };

const castTargets: ReadonlySet<string> = new Set(['float32', 'float16', 'bfloat16']);

const compose = (p: Provenance, leaf: (name: string) => LeafResult): Composed => {
  switch (p.kind) {
    case 'literal': return { kind: 'constant', reason: `written in the graph (node ${p.node})` };
    case 'shape': return { kind: 'constant', reason: `computed from the shape of ${p.tensor}` };
    case 'initializer': {
      const r = leaf(p.name);
      return r.kind === 'mapped' ? { kind: 'expr', expr: r.match.expr, methods: [r.match.method] } : r.kind === 'constant' ? r : { kind: 'fail', reason: r.reason };
    }
    case 'op': {
      const inputs = p.inputs.map((q) => compose(q, leaf));
      const failed = inputs.find((i) => i.kind === 'fail');
      if (failed) return failed;
      if (inputs.every((i) => i.kind === 'constant')) return inputs[0] ?? { kind: 'constant', reason: `${p.opType} of nothing` };
      if (inputs.some((i) => i.kind === 'constant')) return { kind: 'fail', reason: `${p.opType} (${p.node}) mixes graph constants and weights` };
      const exprs = inputs.map((i) => (i as { expr: Expr }).expr);
      const methods = inputs.flatMap((i) => (i as { methods: MatchMethod[] }).methods);
      const one = (expr: Expr): Composed => ({ kind: 'expr', expr, methods });
      const shape = p.params['shape'];
      switch (p.opType) {
        case 'Identity': return one(exprs[0]);
        case 'Reshape': case 'Flatten': case 'Squeeze': case 'Unsqueeze':
          return Array.isArray(shape) ? one({ op: 'reshape', shape: shape as number[], x: exprs[0] }) : { kind: 'fail', reason: `${p.opType} without a resolved shape` };
        case 'Transpose': {
          const perm = p.params['perm'];
          return Array.isArray(perm) ? one({ op: 'transpose', perm: perm as number[], x: exprs[0] }) : { kind: 'fail', reason: 'Transpose without perm' };
        }
        case 'Cast': {
          const to = String(p.params['to']);
          return castTargets.has(to) ? one(to === 'float32' ? exprs[0] : { op: 'cast', to: to as CastTarget, x: exprs[0] }) : { kind: 'fail', reason: `Cast to ${to}` };
        }
        case 'Concat': {
          const axis = p.params['axis'];
          return typeof axis === 'number' && axis >= 0 ? one({ op: 'concat', axis, xs: exprs }) : { kind: 'fail', reason: 'Concat with a negative axis' };
        }
        default: return { kind: 'fail', reason: `folded ${p.opType} (${p.node}) has no expression form` };
      }
    }
  }
};

// ---- the map ------------------------------------------------------------------------------------

export const buildWeightMap = (input: WeightMapInput, options: WeightMapOptions = {}): E.Either<WeightMapErrorDetail, WeightMap> => {
  const collected = collectTargets(input);
  if (E.isLeft(collected)) return collected;
  const { analyzed, checkpoint } = input;
  const index = new CheckpointIndex(checkpoint, options.prefixes ?? WRAPPER_PREFIXES);
  const nodes = new Map(analyzed.graph.nodes.map((n) => [n.name, n]));
  const readers = readersOf(analyzed.graph.nodes);
  const scopeOf = (node: string): string | undefined => input.scopes?.get(node) ?? legacyScope(node);
  /** Scopes of the nodes that read a tensor, looking through folded nodes to their readers. */
  const readerScopes = (tensor: string, seen = new Set<string>()): string[] => {
    if (seen.has(tensor)) return [];
    seen.add(tensor);
    return (readers.get(tensor) ?? []).flatMap((n) => [
      ...(scopeOf(n.name) !== undefined ? [scopeOf(n.name)!] : []),
      ...(analyzed.folded.has(n.name) ? n.outputs.flatMap((o) => readerScopes(o, seen)) : []),
    ]);
  };
  const digestOf = digestCache(checkpoint);
  const ties: Tie[] = [];
  const leaves = new Map<string, LeafResult>();
  const matchLeaf = (name: string, suffix: string | undefined, extraHints: readonly string[]): LeafResult => {
    const cached = leaves.get(name);
    if (cached) return cached;
    const constant = analyzed.constants.get(name);
    let result: LeafResult;
    const value = constant && isFloat(constant.tensor.dtype) ? f32(constant.tensor) : undefined;
    if (constant === undefined) result = { kind: 'unmapped', reason: `no initializer '${name}'` };
    else if (value === undefined) result = { kind: 'constant', reason: `${constant.tensor.dtype} data (indices, shapes, masks)` };
    else {
      const base = untiedBase(name);
      const scopes = readerScopes(name);
      const hints = isUntiedCopy(name) ? [scopes, extraHints, [base]] : [[base], scopes, extraHints];
      const found = index.match({ name: base, value, byName: !isUntiedCopy(name), hints, ...(suffix !== undefined ? { suffix } : {}) });
      // A name match with other values may be a bias the exporter folded a BatchNorm into (keeping the name).
      const match = found === undefined || found.method === 'name-only' ? matchFoldedBias(name, value) ?? found : found;
      if (match) {
        if (match.alternatives.length > 0) ties.push({ target: name, chosen: exprSources(match.expr)[0] ?? '', alternatives: match.alternatives });
        result = { kind: 'mapped', match };
      } else {
        const reason = graphConstantReason(value);
        result = reason !== undefined ? { kind: 'constant', reason } : { kind: 'unmapped', reason: `no checkpoint tensor matches initializer '${base}' [${value.shape}] by name or value` };
      }
    }
    leaves.set(name, result);
    return result;
  };
  /** A convolution bias the exporter folded a BatchNorm into: found through the same node's weight. */
  const matchFoldedBias = (name: string, value: F32Tensor): Match | undefined => {
    for (const reader of readers.get(name) ?? []) {
      if (reader.opType !== 'Conv' || reader.inputs[2] !== name) continue;
      const weight = matchLeaf(reader.inputs[1], 'weight', []);
      const fold = weight.kind === 'mapped' ? index.foldOf(weight.match.expr) : undefined;
      const expr = fold && index.foldBias(value, fold);
      if (expr) return { expr, method: 'bn-fold', alternatives: [] };
    }
    return undefined;
  };

  const targets: MapTarget[] = [];
  for (const p of collected.right) {
    const base = { id: p.id, kind: p.kind, segment: p.segment, ...(p.layer !== undefined ? { layer: p.layer, role: p.role } : { tensor: p.tensor }), dtype: p.value.dtype, shape: [...p.value.shape] };
    const vd = valueDigest(p.value.data);
    const suffix = roleSuffix(p.role);
    const nodeScopes = p.nodes.map(scopeOf).filter((s): s is string => s !== undefined);
    let composed: Composed = isFloat(p.value.dtype) ? compose(p.provenance, (name) => matchLeaf(name, suffix, nodeScopes)) : { kind: 'constant', reason: `${p.value.dtype} data (indices, shapes, masks)` };
    if (composed.kind === 'fail') {
      // The provenance has no expression form: match the weight's own value instead.
      const value = f32(p.value);
      const m = value && index.match({ name: p.tensor ?? p.layer ?? p.id, value, byName: false, hints: [nodeScopes], ...(suffix !== undefined ? { suffix } : {}) });
      if (m) composed = { kind: 'expr', expr: m.expr, methods: [m.method] };
      else {
        const reason = value && graphConstantReason(value);
        if (reason !== undefined) composed = { kind: 'constant', reason };
      }
    }
    if (composed.kind === 'expr') {
      const expr = simplify(composed.expr);
      targets.push({ ...base, status: 'mapped', expr, methods: [...new Set(composed.methods)], built: { sourceDigest: combineDigests(exprSources(expr).map(digestOf)), valueDigest: vd } });
    } else {
      const reason = composed.reason;
      targets.push({ ...base, status: composed.kind === 'constant' ? 'constant' : 'unmapped', expr: { op: 'constant', reason }, methods: [], built: { sourceDigest: '', valueDigest: vd } });
    }
  }
  const unmapped = targets.filter((x) => x.status === 'unmapped');
  if (unmapped.length > 0 && !options.allowUnmapped) {
    return E.left({ _tag: 'UnmappedWeights', weights: unmapped.map((x) => ({ id: x.id, reason: (x.expr as { reason: string }).reason })) });
  }
  const users = new Map<string, string[]>();
  for (const x of targets) {
    for (const s of exprSources(x.expr)) {
      const list = users.get(s);
      if (list) list.push(x.id);
      else users.set(s, [x.id]);
    }
  }
  const sources = [...users.keys()].sort().map((name) => {
    const info = checkpoint.tensors.get(name)!;
    return { name, dtype: info.dtype, shape: [...info.shape] };
  });
  return E.right({
    version: 1,
    sources,
    targets,
    unused: [...checkpoint.tensors.keys()].filter((n) => !users.has(n)).sort(),
    ties: ties.sort((a, b) => (a.target < b.target ? -1 : a.target > b.target ? 1 : 0)),
    tied: [...users].filter(([, ids]) => ids.length > 1).map(([source, ids]) => ({ source, targets: ids })).sort((a, b) => (a.source < b.source ? -1 : 1)),
  });
};

// ---- coverage -----------------------------------------------------------------------------------

export interface Coverage {
  readonly mapped: number;
  readonly constant: number;
  readonly unmapped: readonly string[];
  readonly constants: readonly { readonly id: string; readonly reason: string }[];
}

export const coverage = (map: WeightMap): Coverage => ({
  mapped: map.targets.filter((x) => x.status === 'mapped').length,
  constant: map.targets.filter((x) => x.status === 'constant').length,
  unmapped: map.targets.filter((x) => x.status === 'unmapped').map((x) => x.id),
  constants: map.targets.filter((x) => x.status === 'constant').map((x) => ({ id: x.id, reason: (x.expr as { reason: string }).reason })),
});

/** Bytes of a tensor's data, for digests of current values. */
export const tensorBytes = (t: Tensor): Uint8Array => toBytes(t.data);
