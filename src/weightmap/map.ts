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
import { provenanceSources, type Provenance } from '../trace/provenance.js';
import type { Segment } from '../partition/index.js';
import { lowerContext, lowerSegment } from '../network/lower.js';
import { networkWeights, type WeightRole } from '../network/types.js';
import { exprSources, ExprCodec, simplify, type Expr, type CastTarget } from './expr.js';
import type { F32Tensor } from './evaluate.js';
import { CheckpointIndex, isAmbiguity, isDegenerate, normalizeName, type Evidence, type EvidenceKind, type Match, type MatchMethod, WRAPPER_PREFIXES } from './match.js';
import { legacyScope, type NodeScopes } from './scopes.js';
import type { TensorStore } from './store.js';
import { isUntiedCopy, untiedBase } from './untie.js';
import { combineDigests, scanCache, valueDigest } from './digest.js';
import { deriveGatherByValue, settleDerived } from './derive.js';

/** The matcher's rules, recorded with every cached weight map. Change it with any rule that can change
 *  what a map says, so that a cache entry mapped by the old rules is mapped again instead of reused. */
export const MATCHER_REVISION = 'weightmap-2026-12-04';

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

/** A choice among equal-valued checkpoint tensors, and the evidence that settled it. */
export interface Tie {
  /** The initializer use (or target id) the choice was made for. */
  readonly target: string;
  readonly chosen: string;
  readonly alternatives: readonly string[];
  /** What decided it (absent in maps written before evidence was recorded). */
  readonly evidence?: EvidenceKind;
}

/**
 * A checkpoint tensor that is the source of no weight, recorded with its digest at build: the exported
 * graph baked its value in (a zero bias the exporter dropped, parameters merged because they were equal)
 * or does not read it. A refit whose checkpoint changes it is refused. A `tied` tensor is another copy of
 * `twin` (a tied parameter stored twice): it must keep equal to its twin instead.
 */
export interface PinnedTensor {
  readonly name: string;
  readonly kind: 'dropped' | 'unread' | 'tied';
  readonly reason: string;
  /** Digest of its values as float32 at build (valueDigest). */
  readonly digest: string;
  readonly twin?: string;
}

export interface WeightMap {
  readonly version: 1;
  /** Checkpoint tensors the map reads, as the build checkpoint had them. */
  readonly sources: readonly SourceInfo[];
  readonly targets: readonly MapTarget[];
  /** Checkpoint tensors of the build checkpoint that map to nothing (e.g. num_batches_tracked). */
  readonly unused: readonly string[];
  /** Values equal in several checkpoint tensors, and the evidence that chose among them. */
  readonly ties: readonly Tie[];
  /** Checkpoint tensors feeding several targets. */
  readonly tied: readonly { readonly source: string; readonly targets: readonly string[] }[];
  /** Float checkpoint tensors that are no weight's source (absent in maps of older versions). */
  readonly pinned?: readonly PinnedTensor[];
}

const Shape = t.readonlyArray(t.number);
const SourceInfoCodec = t.type({ name: t.string, dtype: t.string, shape: Shape });
const RoleCodec = t.keyof({ kernel: null, bias: null, scale: null, shift: null, constant: null, mean: null, variance: null });
const MethodCodec = t.keyof({ name: null, 'normalized-name': null, value: null, transpose: null, rows: null, 'bn-fold': null, 'name-only': null, 'map-file': null, gather: null });
const EvidenceCodec = t.keyof({ name: null, alias: null, scope: null, 'module-order': null, tied: null, 'map-file': null });
const PinnedCodec = t.intersection([
  t.type({ name: t.string, kind: t.keyof({ dropped: null, unread: null, tied: null }), reason: t.string, digest: t.string }),
  t.partial({ twin: t.string }),
]);
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
export const WeightMapCodec: t.Type<WeightMap> = t.intersection([
  t.type({
    version: t.literal(1),
    sources: t.readonlyArray(SourceInfoCodec),
    targets: t.readonlyArray(MapTargetCodec),
    unused: t.readonlyArray(t.string),
    ties: t.readonlyArray(t.intersection([t.type({ target: t.string, chosen: t.string, alternatives: t.readonlyArray(t.string) }), t.partial({ evidence: EvidenceCodec })])),
    tied: t.readonlyArray(t.type({ source: t.string, targets: t.readonlyArray(t.string) })),
  }),
  t.partial({ pinned: t.readonlyArray(PinnedCodec) }),
]) as unknown as t.Type<WeightMap>;

/** An engine or fallback weight whose value several checkpoint tensors hold, with nothing to tell them apart. */
export interface AmbiguousWeight {
  readonly id: string;
  /** The graph value (initializer use) that could not be matched. */
  readonly initializer: string;
  readonly candidates: readonly string[];
}

export type WeightMapErrorDetail =
  | { readonly _tag: 'UnmappedWeights'; readonly weights: readonly { readonly id: string; readonly reason: string }[]; readonly unaccounted?: readonly string[] }
  | { readonly _tag: 'AmbiguousWeights'; readonly weights: readonly AmbiguousWeight[] }
  | { readonly _tag: 'MapFileMismatch'; readonly entry: string; readonly reason: string }
  /** Checkpoint tensors no weight reads although other parameters of their module feed weights, with values
   *  that are not a fill: the graph dropped them, so it was exported from other weights (or bakes them in). */
  | { readonly _tag: 'CheckpointDisagrees'; readonly tensors: readonly string[] }
  | { readonly _tag: 'LowerFailed'; readonly segment: number; readonly reason: string };

export const describeAmbiguity = (weights: readonly AmbiguousWeight[]): string =>
  `${weights.length} weight(s) hold values that several checkpoint tensors hold equally, and neither names nor module scopes tell which: `
  + weights.map((w) => `${w.id} (initializer '${w.initializer}'): one of ${w.candidates.join(', ')}`).join('; ')
  + '. Settle each with a map file (--map FILE / the `map` option: {"<engine weight id or initializer>": "<checkpoint tensor>"})';

export const describeWeightMapError = (e: WeightMapErrorDetail): string => {
  switch (e._tag) {
    case 'UnmappedWeights':
      return `${e.weights.length} refittable weight(s) have no checkpoint source: ${e.weights.map((w) => `${w.id} (${w.reason})`).join('; ')}`
        + (e.unaccounted !== undefined && e.unaccounted.length > 0 ? `; and checkpoint tensor(s) ${e.unaccounted.join(', ')} feed no weight: the map missed how they relate (a map file can say it)` : '');
    case 'AmbiguousWeights': return describeAmbiguity(e.weights);
    case 'MapFileMismatch': return `map file entry '${e.entry}': ${e.reason}`;
    case 'CheckpointDisagrees':
      return `checkpoint tensor(s) ${e.tensors.join(', ')} feed no weight, although other parameters of their module do, and hold values the exporter would not have dropped: `
        + 'the checkpoint is not the one the model was exported with. Compile with the checkpoint the ONNX file was exported from, then refit to this one';
    case 'LowerFailed': return `engine segment ${e.segment} could not be lowered: ${e.reason}`;
  }
};

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
  /**
   * Settles what evidence cannot: engine weight id (`engine/<segment>/<layer>/<role>`,
   * `fallback/<segment>/<tensor>`) or initializer name (a use `<name>@use<k>`, an Identity alias, or an
   * unshared initializer) -> checkpoint tensor. The tensor must hold the graph's value.
   */
  readonly map?: Readonly<Record<string, string>>;
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
        case 'Gather': {
          // Constant indices (a graph constant, recorded by value as input1) are embedded in the expression.
          const { axis, indicesShape, input1: indices } = p.params;
          if (typeof axis !== 'number' || !Array.isArray(indicesShape) || !Array.isArray(indices)) return { kind: 'fail', reason: `Gather (${p.node}) without resolved axis and indices` };
          if (indices.length > 1 << 16) return { kind: 'fail', reason: `Gather (${p.node}) has ${indices.length} indices, too many to embed` };
          return one({ op: 'gather', axis, indicesShape: indicesShape as number[], indices: indices as number[], x: exprs[0] });
        }
        case 'Expand':
          return Array.isArray(shape) ? one({ op: 'expand', shape: shape as number[], x: exprs[0] }) : { kind: 'fail', reason: 'Expand without a resolved shape' };
        case 'Slice': {
          const { inputShape, sliceStart, sliceStep, sliceCount } = p.params as Record<string, readonly number[] | undefined>;
          if (![inputShape, sliceStart, sliceStep, sliceCount].every(Array.isArray)) return { kind: 'fail', reason: `Slice (${p.node}) without resolved bounds` };
          // One slice per cut axis (a gather of the picked indices where the step is not 1).
          let expr = exprs[0];
          inputShape!.forEach((dim, axis) => {
            const [start, step, count] = [sliceStart![axis], sliceStep![axis], sliceCount![axis]];
            if (step === 1 && start === 0 && count === dim) return;
            expr = step === 1
              ? { op: 'slice', axis, start, end: start + count, x: expr }
              : { op: 'gather', axis, indicesShape: [count], indices: Array.from({ length: count }, (_, i) => start + i * step), x: expr };
          });
          return one(expr);
        }
        default: return { kind: 'fail', reason: `folded ${p.opType} (${p.node}) has no expression form` };
      }
    }
  }
};

// ---- the map ------------------------------------------------------------------------------------

const push = (m: Map<string, string[]>, key: string, value: string): void => {
  const list = m.get(key);
  if (list) list.push(value);
  else m.set(key, [value]);
};

const reasonOf = (e: Expr): string => (e.op === 'constant' ? e.reason : '');

export const buildWeightMap = (input: WeightMapInput, options: WeightMapOptions = {}): E.Either<WeightMapErrorDetail, WeightMap> => {
  const collected = collectTargets(input);
  if (E.isLeft(collected)) return collected;
  const { analyzed, checkpoint } = input;
  const prefixes = options.prefixes ?? WRAPPER_PREFIXES;
  const index = new CheckpointIndex(checkpoint, prefixes);
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
  /** Output names of the Identity nodes that alias a tensor (the legacy exporter's way of naming the
   *  other parameters that share one initializer), following chains. */
  const aliasesOf = (tensor: string, seen = new Set<string>()): string[] => {
    if (seen.has(tensor)) return [];
    seen.add(tensor);
    return (readers.get(tensor) ?? []).filter((n) => n.opType === 'Identity').flatMap((n) => [n.outputs[0], ...aliasesOf(n.outputs[0], seen)]);
  };
  // The name of a shared initializer belongs to one of its uses only when exactly one use reads it
  // directly: the legacy exporter names the others through Identity aliases. The dynamo exporter reads it
  // directly from every use, so its name tells none of them apart.
  const directUses = new Map<string, string[]>();
  for (const name of analyzed.constants.keys()) {
    if (isUntiedCopy(name) && (readers.get(name) ?? []).some((n) => n.opType !== 'Identity')) push(directUses, untiedBase(name), name);
  }
  // Names that identify some use by its own evidence: unshared initializers, the direct use of a shared one
  // the legacy exporter named, Identity aliases. Normalized like checkpoint names.
  const claimed = new Set<string>();
  for (const name of analyzed.constants.keys()) {
    const direct = directUses.get(untiedBase(name));
    if (!isUntiedCopy(name)) claimed.add(normalizeName(name, prefixes));
    else if (direct !== undefined && direct.length === 1 && direct[0] === name) claimed.add(normalizeName(untiedBase(name), prefixes));
  }
  for (const n of analyzed.graph.nodes) if (n.opType === 'Identity') claimed.add(normalizeName(n.outputs[0], prefixes));
  const evidenceOf = (name: string, extraScopes: readonly string[]): Evidence => {
    const base = untiedBase(name);
    const direct = directUses.get(base);
    const names = !isUntiedCopy(name) ? [name] : direct !== undefined && direct.length === 1 && direct[0] === name ? [base] : [];
    return { names, aliases: aliasesOf(name), scopes: [...new Set([...readerScopes(name), ...extraScopes])] };
  };

  const { digest: digestOf } = scanCache(checkpoint);
  const ties: Tie[] = [];
  const record = (target: string, match: Match): void => {
    for (const s of match.settled ?? []) ties.push({ target, chosen: s.chosen, alternatives: s.candidates.filter((c) => c !== s.chosen), evidence: s.by });
  };
  const mapFile = options.map ?? {};
  const usedEntries = new Set<string>();
  let mapError: WeightMapErrorDetail | undefined;
  /** A map file's binding of a graph value to a checkpoint tensor, checked against the value. */
  const fromMapFile = (entry: string, value: F32Tensor): Match | undefined => {
    usedEntries.add(entry);
    const name = mapFile[entry];
    const t = index.get(name);
    const fail = (reason: string) => {
      mapError ??= { _tag: 'MapFileMismatch', entry, reason };
      return undefined;
    };
    if (t === undefined) return fail(`the checkpoint has no float tensor '${name}'`);
    if (t.data.length !== value.data.length) return fail(`checkpoint tensor '${name}' [${t.shape}] has ${t.data.length} values; the graph's value [${value.shape}] has ${value.data.length}`);
    const reshaped = (e: Expr, from: readonly number[], to: readonly number[]): Expr => (from.join() === to.join() ? e : { op: 'reshape', shape: [...to], x: e });
    if (t.data.every((x, i) => Object.is(x, value.data[i]) || x === value.data[i])) {
      ties.push({ target: entry, chosen: name, alternatives: [], evidence: 'map-file' });
      return { expr: reshaped({ op: 'source', name }, t.shape, value.shape), method: 'map-file', alternatives: [] };
    }
    if (value.shape.length === 2) {
      const [r, c] = value.shape;
      let equal = true;
      for (let i = 0; i < r && equal; i++) for (let j = 0; j < c && equal; j++) equal = t.data[j * r + i] === value.data[i * c + j];
      if (equal) {
        ties.push({ target: entry, chosen: name, alternatives: [], evidence: 'map-file' });
        return { expr: { op: 'transpose', perm: [1, 0], x: reshaped({ op: 'source', name }, t.shape, [c, r]) }, method: 'map-file', alternatives: [] };
      }
    }
    return fail(`checkpoint tensor '${name}' does not hold the graph's value (nor its transpose)`);
  };

  const ambiguousLeaves = new Map<string, readonly string[]>();
  const leaves = new Map<string, LeafResult>();
  const matchLeaf = (name: string, suffix: string | undefined, extraScopes: readonly string[]): LeafResult => {
    const cached = leaves.get(name);
    if (cached) return cached;
    const constant = analyzed.constants.get(name);
    let result: LeafResult;
    const value = constant && isFloat(constant.tensor.dtype) ? f32(constant.tensor) : undefined;
    if (constant === undefined) result = { kind: 'unmapped', reason: `no initializer '${name}'` };
    else if (value === undefined) result = { kind: 'constant', reason: `${constant.tensor.dtype} data (indices, shapes, masks)` };
    else {
      const evidence = evidenceOf(name, extraScopes);
      const entry = [name, ...evidence.aliases, ...evidence.names].find((n) => mapFile[n] !== undefined);
      const folded = entry === undefined ? matchFoldedBias(name, value) : undefined;
      const found = entry !== undefined ? fromMapFile(entry, value) : folded ?? index.match({ name: untiedBase(name), value, byName: !isUntiedCopy(name), evidence, claimed, ...(suffix !== undefined ? { suffix } : {}) });
      if (isAmbiguity(found)) {
        if (value.data.length <= 1) result = { kind: 'constant', reason: 'a scalar written by the exporter' };
        else {
          ambiguousLeaves.set(name, found.candidates);
          result = { kind: 'unmapped', reason: `several checkpoint tensors hold its value: ${found.candidates.join(', ')}` };
        }
      } else if (found && found.method === 'name-only' && index.nameOnlyDoubt(found, value) !== undefined) {
        // The checkpoint holds other values under this name: the ONNX file was exported from other weights,
        // or the exporter transformed the parameter and kept its name. Building from the checkpoint would be
        // a guess between the two.
        result = {
          kind: 'unmapped',
          reason: `checkpoint tensor '${exprSources(found.expr)[0]}' holds other values than initializer '${untiedBase(name)}' and ${index.nameOnlyDoubt(found, value)}: compile with the checkpoint the model was exported with, then refit to this one`,
        };
      } else if (found) {
        record(name, found);
        result = { kind: 'mapped', match: found };
      } else {
        const reason = graphConstantReason(value);
        // A table the exporter gathered from one checkpoint tensor and folded (T5's relative attention bias).
        const derived = reason === undefined ? settleDerived(deriveGatherByValue(value, checkpoint), evidence.scopes) : undefined;
        result = reason !== undefined ? { kind: 'constant', reason }
          : derived !== undefined ? { kind: 'mapped', match: { expr: derived.expr, method: 'gather', alternatives: [] } }
          : { kind: 'unmapped', reason: `no checkpoint tensor matches initializer '${untiedBase(name)}' [${value.shape}] by name or value` };
      }
    }
    leaves.set(name, result);
    return result;
  };
  /** A convolution bias the exporter folded a BatchNorm into: found through the same node's weight. */
  const matchFoldedBias = (name: string, value: F32Tensor): Match | undefined => {
    for (const via of [name, ...aliasesOf(name)]) for (const reader of readers.get(via) ?? []) {
      if (reader.opType !== 'Conv' || reader.inputs[2] !== via) continue;
      const weight = matchLeaf(reader.inputs[1], 'weight', [scopeOf(reader.name)].filter((s): s is string => s !== undefined));
      const fold = weight.kind === 'mapped' ? index.foldOf(weight.match.expr) : undefined;
      const expr = fold && index.foldBias(value, fold);
      if (expr) return { expr, method: 'bn-fold', alternatives: [] };
    }
    return undefined;
  };

  const ambiguous: AmbiguousWeight[] = [];
  const targets: MapTarget[] = [];
  for (const p of collected.right) {
    const base = { id: p.id, kind: p.kind, segment: p.segment, ...(p.layer !== undefined ? { layer: p.layer, role: p.role } : { tensor: p.tensor }), dtype: p.value.dtype, shape: [...p.value.shape] };
    const vd = valueDigest(p.value.data);
    const suffix = roleSuffix(p.role);
    const nodeScopes = p.nodes.map(scopeOf).filter((s): s is string => s !== undefined);
    const own = f32(p.value);
    let composed: Composed;
    if (mapFile[p.id] !== undefined && own !== undefined) {
      const m = fromMapFile(p.id, own);
      composed = m ? { kind: 'expr', expr: m.expr, methods: [m.method] } : { kind: 'fail', reason: 'map file entry does not fit' };
    } else {
      composed = isFloat(p.value.dtype) ? compose(p.provenance, (name) => matchLeaf(name, suffix, nodeScopes)) : { kind: 'constant', reason: `${p.value.dtype} data (indices, shapes, masks)` };
    }
    if (composed.kind === 'fail') {
      const unsettled = provenanceSources(p.provenance).filter((n) => ambiguousLeaves.has(n));
      if (unsettled.length > 0) {
        for (const n of unsettled) ambiguous.push({ id: p.id, initializer: n, candidates: ambiguousLeaves.get(n)! });
      } else if (own !== undefined) {
        // The provenance has no expression form: match the weight's own value instead.
        const m = index.match({ name: p.tensor ?? p.layer ?? p.id, value: own, byName: false, evidence: { names: [], aliases: [], scopes: nodeScopes }, ...(suffix !== undefined ? { suffix } : {}) });
        if (isAmbiguity(m)) ambiguous.push({ id: p.id, initializer: p.tensor ?? p.layer ?? p.id, candidates: m.candidates });
        else if (m) {
          record(p.id, m);
          composed = { kind: 'expr', expr: m.expr, methods: [m.method] };
        } else {
          const reason = graphConstantReason(own);
          if (reason !== undefined) composed = { kind: 'constant', reason };
        }
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
  if (mapError !== undefined) return E.left(mapError);
  const unknownEntries = Object.keys(mapFile).filter((k) => !usedEntries.has(k)).sort();
  if (unknownEntries.length > 0) return E.left({ _tag: 'MapFileMismatch', entry: unknownEntries[0], reason: 'it names no engine weight, fallback weight or initializer use that needed settling in this model (see `inspect` for weight ids)' });
  if (ambiguous.length > 0) return E.left({ _tag: 'AmbiguousWeights', weights: ambiguous });

  const users = new Map<string, string[]>();
  for (const x of targets) for (const s of exprSources(x.expr)) push(users, s, x.id);

  // Every float checkpoint tensor is a source, a tied copy of one, or pinned with the reason why.
  const pinned: PinnedTensor[] = [];
  const unaccounted: string[] = [];
  for (const name of [...checkpoint.tensors.keys()].sort()) {
    if (users.has(name)) continue;
    const value = index.get(name);
    if (value === undefined) continue; // not float: step counters, ids
    const degenerate = isDegenerate(value.data);
    const twin = degenerate ? undefined : index.equalTensors(value).find((n) => users.has(n));
    if (twin !== undefined) pinned.push({ name, kind: 'tied', twin, digest: valueDigest(value.data), reason: `a second copy of '${twin}' (a tied parameter: the graph holds one); it must stay equal to it` });
    else if (degenerate) {
      const zero = value.data.every((x) => x === 0);
      pinned.push({
        name, kind: 'dropped', digest: valueDigest(value.data),
        reason: zero
          ? 'zero at export: the exporter dropped it from the graph (or folded its value in), so no engine weight reads it'
          : `a fill of ${value.data[0]} at export: the exporter folded its value into the graph (parameters merged because they were equal), so no engine weight reads it`,
      });
    } else unaccounted.push(name);
  }
  // A module whose weight feeds the engines but whose non-degenerate bias (or BatchNorm shift) feeds nothing:
  // the exporter only drops zeros, so this checkpoint is not the one the graph was exported from.
  const moduleOf = (n: string) => n.slice(0, Math.max(0, n.lastIndexOf('.')));
  const usedModules = new Set([...users.keys()].map(moduleOf));
  const disagreeing = unaccounted.filter((n) => moduleOf(n) !== '' && usedModules.has(moduleOf(n)));
  if (disagreeing.length > 0 && !options.allowUnmapped) return E.left({ _tag: 'CheckpointDisagrees', tensors: disagreeing });
  let finalTargets = targets;
  const unmapped = targets.filter((x) => x.status === 'unmapped');
  if (unmapped.length > 0 && unaccounted.length === 0) {
    // Every checkpoint tensor is accounted for: what no tensor explains was computed by the exporter from
    // something the checkpoint does not hold (rotary tables from a buffer, masks). It stays as exported.
    finalTargets = targets.map((x) => (x.status !== 'unmapped' ? x : {
      ...x, status: 'constant' as const,
      expr: { op: 'constant' as const, reason: `no checkpoint tensor explains it and every checkpoint tensor is accounted for: a table the exporter computed from values the checkpoint does not hold (${reasonOf(x.expr)})` },
    }));
  } else if (unmapped.length > 0 && !options.allowUnmapped) {
    return E.left({ _tag: 'UnmappedWeights', weights: unmapped.map((x) => ({ id: x.id, reason: reasonOf(x.expr) })), unaccounted });
  }
  for (const name of unaccounted) pinned.push({ name, kind: 'unread', digest: valueDigest(index.get(name)!.data), reason: 'the exported graph does not read it, so no engine weight depends on it' });

  const sources = [...users.keys()].sort().map((name) => {
    const info = checkpoint.tensors.get(name)!;
    return { name, dtype: info.dtype, shape: [...info.shape] };
  });
  return E.right({
    version: 1,
    sources,
    targets: finalTargets,
    unused: [...checkpoint.tensors.keys()].filter((n) => !users.has(n)).sort(),
    ties: ties.sort((a, b) => (a.target < b.target ? -1 : a.target > b.target ? 1 : 0)),
    tied: [...users].filter(([, ids]) => ids.length > 1).map(([source, ids]) => ({ source, targets: ids })).sort((a, b) => (a.source < b.source ? -1 : 1)),
    pinned: pinned.sort((a, b) => (a.name < b.name ? -1 : 1)),
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
