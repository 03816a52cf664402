/**
 * The refit plan: what a refit with a given checkpoint would do, as immutable, JSON-serializable data
 * (RefitPlanCodec). Per target weight: its source expression, dtype, shape and bytes, the digest of the
 * checkpoint tensors it reads, and whether that digest differs from what the engine holds now. Problems
 * (missing tensors, shape mismatches, lossy casts, non-finite values, tensors that map to nothing) and
 * totals. Deterministic: the same map, checkpoint contents and engine state give the same plan, whatever
 * the order of tensors in the checkpoint files.
 */
import * as E from 'fp-ts/lib/Either.js';
import * as t from 'io-ts';
import { ExprCodec, exprSources, type Expr } from '../weightmap/expr.js';
import type { WeightMap } from '../weightmap/map.js';
import { combineDigests, scanCache, valueDigest } from '../weightmap/digest.js';
import { isFloatDtype, type TensorStore } from '../weightmap/store.js';
import type { MapTarget } from '../weightmap/map.js';
import type { WeightKernelFormat } from '../../ffi/engine.js';
import { describeQuantIssue } from '../quant/errors.js';
import { mappedPathOf } from '../quant/mapped.js';
import { companionsOf, quantizedIn } from '../quant/store.js';

export interface PlanSource {
  readonly name: string;
  readonly dtype: string;
  readonly shape: readonly number[];
}

export interface PlanEntry {
  readonly target: string;
  readonly kind: 'engine' | 'fallback';
  readonly segment: number;
  readonly layer?: string;
  readonly role?: string;
  readonly tensor?: string;
  readonly expr: Expr;
  readonly dtype: string;
  readonly shape: readonly number[];
  readonly bytes: number;
  readonly sources: readonly PlanSource[];
  readonly sourceDigest: string;
  readonly changed: boolean;
  /** How the value comes in: evaluated over float tensors, copied from a quantized checkpoint tensor into
   *  a kernel of the same format, or evaluated over dequantized tensors. Absent in plans of older versions
   *  (read as 'float'). */
  readonly path?: RefitPath;
  /** Engine targets to stage in the same apply as this changed one: the other members of its fused groups
   *  (PlanOptions.fusedGroups), whose values the engine needs again to redo the fusion. Evaluated over the
   *  checkpoint like any target (an unchanged member gets the value it holds). Absent when there are none. */
  readonly restage?: readonly string[];
}

/** Engine weights fused inside one engine: staging any member needs every other member staged in the same
 *  apply (a batch norm folded into a convolution when the engine keeps no copy of the members' network-level
 *  values; every weight of a stripped engine). Read from the engines (src/effect/groups.ts, fusedGroupsOf). */
export interface FusedGroup {
  readonly segment: number;
  readonly members: readonly { readonly layer: string; readonly role: string }[];
}

export type RefitPath = 'float' | 'quantized-copy' | 'dequantize';

export type PlanProblem =
  | { readonly _tag: 'MissingSource'; readonly severity: 'error'; readonly source: string; readonly targets: readonly string[] }
  | { readonly _tag: 'ShapeMismatch'; readonly severity: 'error'; readonly source: string; readonly expected: readonly number[]; readonly found: readonly number[] }
  | { readonly _tag: 'NotFloat'; readonly severity: 'error'; readonly source: string; readonly dtype: string }
  | { readonly _tag: 'LossyCast'; readonly severity: 'warning'; readonly source: string; readonly from: string; readonly to: string }
  | { readonly _tag: 'NonFinite'; readonly severity: 'error'; readonly source: string; readonly count: number }
  | { readonly _tag: 'UnusedTensor'; readonly severity: 'warning'; readonly source: string }
  /** A checkpoint tensor no weight reads (the exported graph baked its value in) holds other values than at
   *  build: refitting would silently ignore it. */
  | { readonly _tag: 'PinnedChanged'; readonly severity: 'error'; readonly source: string; readonly reason: string }
  /** Two checkpoint copies of one tied parameter differ: the engine holds one weight for both. */
  | { readonly _tag: 'TiedDiverged'; readonly severity: 'error'; readonly source: string; readonly twin: string }
  | { readonly _tag: 'QuantizedMismatch'; readonly severity: 'error'; readonly source: string; readonly detail: string }
  /** A changed weight is fused with an engine weight that has no checkpoint source (a graph constant or an
   *  unmapped weight): the engine cannot redo the fusion. `source` is the changed target. */
  | { readonly _tag: 'FusedWithUnmapped'; readonly severity: 'error'; readonly source: string; readonly members: readonly string[] };

export interface PlanTotals {
  readonly targets: number;
  readonly changed: number;
  readonly unchanged: number;
  /** Targets with no checkpoint source (graph constants): never touched. */
  readonly constant: number;
  readonly bytesTotal: number;
  readonly bytesToMove: number;
  /** Bytes of checkpoint tensors the changed targets read. */
  readonly sourceBytesToRead: number;
  readonly errors: number;
  readonly warnings: number;
}

export interface RefitPlan {
  readonly version: 1;
  readonly entries: readonly PlanEntry[];
  readonly constants: readonly string[];
  readonly problems: readonly PlanProblem[];
  readonly totals: PlanTotals;
}

const Shape = t.readonlyArray(t.number);
const SourceCodec = t.type({ name: t.string, dtype: t.string, shape: Shape });
const EntryCodec = t.intersection([
  t.type({
    target: t.string, kind: t.keyof({ engine: null, fallback: null }), segment: t.number, expr: ExprCodec, dtype: t.string, shape: Shape,
    bytes: t.number, sources: t.readonlyArray(SourceCodec), sourceDigest: t.string, changed: t.boolean,
  }),
  t.partial({ layer: t.string, role: t.string, tensor: t.string, path: t.keyof({ float: null, 'quantized-copy': null, dequantize: null }), restage: t.readonlyArray(t.string) }),
]);
const ProblemCodec = t.union([
  t.type({ _tag: t.literal('MissingSource'), severity: t.literal('error'), source: t.string, targets: t.readonlyArray(t.string) }),
  t.type({ _tag: t.literal('ShapeMismatch'), severity: t.literal('error'), source: t.string, expected: Shape, found: Shape }),
  t.type({ _tag: t.literal('NotFloat'), severity: t.literal('error'), source: t.string, dtype: t.string }),
  t.type({ _tag: t.literal('LossyCast'), severity: t.literal('warning'), source: t.string, from: t.string, to: t.string }),
  t.type({ _tag: t.literal('NonFinite'), severity: t.literal('error'), source: t.string, count: t.number }),
  t.type({ _tag: t.literal('UnusedTensor'), severity: t.literal('warning'), source: t.string }),
  t.type({ _tag: t.literal('PinnedChanged'), severity: t.literal('error'), source: t.string, reason: t.string }),
  t.type({ _tag: t.literal('TiedDiverged'), severity: t.literal('error'), source: t.string, twin: t.string }),
  t.type({ _tag: t.literal('QuantizedMismatch'), severity: t.literal('error'), source: t.string, detail: t.string }),
  t.type({ _tag: t.literal('FusedWithUnmapped'), severity: t.literal('error'), source: t.string, members: t.readonlyArray(t.string) }),
]);
const TotalsCodec = t.type({
  targets: t.number, changed: t.number, unchanged: t.number, constant: t.number, bytesTotal: t.number, bytesToMove: t.number,
  sourceBytesToRead: t.number, errors: t.number, warnings: t.number,
});
export const RefitPlanCodec: t.Type<RefitPlan> = t.type({
  version: t.literal(1),
  entries: t.readonlyArray(EntryCodec),
  constants: t.readonlyArray(t.string),
  problems: t.readonlyArray(ProblemCodec),
  totals: TotalsCodec,
}) as unknown as t.Type<RefitPlan>;

export type PlanErrorDetail = { readonly _tag: 'PlanHasErrors'; readonly problems: readonly PlanProblem[] };

export const describeProblem = (p: PlanProblem): string => {
  switch (p._tag) {
    case 'MissingSource': return `checkpoint tensor '${p.source}' is missing (needed by ${p.targets.join(', ')})`;
    case 'ShapeMismatch': return `checkpoint tensor '${p.source}': expected shape [${p.expected}], found [${p.found}]`;
    case 'NotFloat': return `checkpoint tensor '${p.source}' is ${p.dtype}; a float weight is expected`;
    case 'LossyCast': return `checkpoint tensor '${p.source}' is ${p.from}; the engine holds ${p.to} (precision is lost)`;
    case 'NonFinite': return `checkpoint tensor '${p.source}' has ${p.count} non-finite value(s)`;
    case 'UnusedTensor': return `checkpoint tensor '${p.source}' maps to no weight`;
    case 'PinnedChanged': return `checkpoint tensor '${p.source}' changed, but it is pinned: ${p.reason}. The engines cannot take it: re-export the model from weights where it is not degenerate (e.g. a non-zero bias), then compile again`;
    case 'TiedDiverged': return `checkpoint tensors '${p.source}' and '${p.twin}' were one tied parameter at build and now differ; the engines hold one weight for both (untie them in the model and re-export, or make them equal)`;
    case 'QuantizedMismatch': return `quantized checkpoint tensor '${p.source}': ${p.detail}`;
    case 'FusedWithUnmapped': return `${p.source} is fused in its engine with ${p.members.join(', ')}, which no checkpoint tensor sets: the engine cannot redo the fusion`;
  }
};

export class PlanError extends Error {
  override readonly name = 'PlanError';
  readonly _tag = 'PlanHasErrors' as const;
  constructor(readonly detail: PlanErrorDetail) {
    super(`the refit plan has ${detail.problems.length} error(s): ${detail.problems.map(describeProblem).join('; ')}`);
  }
}

export interface PlanOptions {
  /**
   * Source digests of what each target holds now, by target id (after an earlier refit). Targets not
   * listed hold what they were built with (the map's built digests).
   */
  readonly current?: Readonly<Record<string, string>>;
  /** Scan every source for NaN and infinities (default true). */
  readonly checkFinite?: boolean;
  /** The engine kernel a target refits and whether a batch norm is folded into it (from the engines);
   *  decides whether a quantized checkpoint tensor is copied or dequantized. Without it every target
   *  reading a quantized tensor is planned as 'dequantize'. */
  readonly kernels?: (target: MapTarget) => { readonly kernel: WeightKernelFormat | undefined; readonly folded: boolean };
  /** The engines' fused groups (from the engines: src/effect/groups.ts, fusedGroupsOf). A changed member
   *  gets the others as `restage`. Without it no entry restages anything, and the effect refuses a batch
   *  an engine needs more weights for (PlanIncomplete). */
  readonly fusedGroups?: readonly FusedGroup[];
}

/** For each engine target, the other members of every fused group it is in (target ids, sorted), and those
 *  members that are no mapped target. */
const restageOf = (map: WeightMap, groups: readonly FusedGroup[]): ((target: MapTarget) => { readonly ids: readonly string[]; readonly unmapped: readonly string[] }) => {
  const keyOf = (segment: number, layer: string, role: string) => `${segment}\u0000${layer}\u0000${role}`;
  const byKey = new Map(map.targets.filter((t) => t.kind === 'engine' && t.layer !== undefined).map((t) => [keyOf(t.segment, t.layer!, t.role ?? ''), t] as const));
  const others = new Map<string, Set<string>>();
  for (const g of groups) {
    const keys = g.members.map((m) => keyOf(g.segment, m.layer, m.role));
    for (const k of keys) {
      const set = others.get(k) ?? new Set<string>();
      keys.filter((o) => o !== k).forEach((o) => set.add(o));
      others.set(k, set);
    }
  }
  const none = { ids: [], unmapped: [] };
  return (target) => {
    if (target.kind !== 'engine' || target.layer === undefined) return none;
    const members = others.get(keyOf(target.segment, target.layer, target.role ?? ''));
    if (members === undefined || members.size === 0) return none;
    const ids: string[] = [];
    const unmapped: string[] = [];
    for (const k of members) {
      const t = byKey.get(k);
      if (t !== undefined && t.status === 'mapped') ids.push(t.id);
      else unmapped.push(t?.id ?? k.split('\u0000').slice(1).join(' '));
    }
    return { ids: ids.sort(compare), unmapped: unmapped.sort(compare) };
  };
};

const bytesPer = (dtype: string): number => (dtype === 'float64' || dtype === 'int64' ? 8 : dtype === 'float16' || dtype === 'bfloat16' ? 2 : dtype === 'int8' || dtype === 'uint8' || dtype === 'bool' ? 1 : 4);
const count = (shape: readonly number[]): number => shape.reduce((a, b) => a * b, 1);

/** Precision order of float dtypes, for lossy-cast warnings (F16 and BF16 lose against each other). */
const precision: Readonly<Record<string, number>> = { F64: 3, float64: 3, F32: 2, float32: 2, F16: 1, float16: 1, BF16: 1, bfloat16: 1 };
const lossy = (from: string, to: string): boolean =>
  (precision[from] ?? 0) > (precision[to] ?? 0) || (precision[from] === 1 && precision[to] === 1 && from.toLowerCase()[0] !== to.toLowerCase()[0]);

const compare = (a: string, b: string): number => (a < b ? -1 : a > b ? 1 : 0);
const problemKey = (p: PlanProblem): string => `${p.source}\u0000${p._tag}`;

export const planRefit = (map: WeightMap, checkpoint: TensorStore, options: PlanOptions = {}): RefitPlan => {
  const checkFinite = options.checkFinite ?? true;
  // One read of each source gives both its digest and its count of non-finite values.
  const { scan, digest: digestOf } = scanCache(checkpoint);
  const expected = new Map(map.sources.map((s) => [s.name, s]));
  const problems = new Map<string, PlanProblem>();
  const add = (p: PlanProblem) => problems.set(problemKey(p), p);
  const sourceOk = new Map<string, boolean>();
  const missingFor = new Map<string, string[]>();
  // A quantized checkpoint: `<m>.weight` quantized with `<m>.weight_scale` (src/quant); such weights are
  // checked against the engine's kernel (mappedPathOf), not as float sources.
  const found = quantizedIn(checkpoint);
  if (E.isLeft(found)) add({ _tag: 'QuantizedMismatch', severity: 'error', source: found.left._tag === 'BadWeightFormat' ? found.left.text : found.left.tensor, detail: describeQuantIssue(found.left) });
  const quantized = E.isRight(found) ? found.right : new Map();
  const recorded = new Map(map.sources.map((s) => [s.name, s.shape] as const));
  /** Checks a source once; false when the target cannot be refitted from it. */
  const checkSource = (name: string, target: string, targetDtype: string): boolean => {
    const info = checkpoint.tensors.get(name);
    if (info === undefined) {
      missingFor.set(name, [...(missingFor.get(name) ?? []), target]);
      return false;
    }
    const known = sourceOk.get(name);
    if (known !== undefined) return known;
    if (quantized.has(name)) return true;
    let ok = true;
    const want = expected.get(name);
    if (want !== undefined && want.shape.join() !== info.shape.join()) {
      add({ _tag: 'ShapeMismatch', severity: 'error', source: name, expected: want.shape, found: info.shape });
      ok = false;
    }
    if (!isFloatDtype(info.dtype)) {
      add({ _tag: 'NotFloat', severity: 'error', source: name, dtype: info.dtype });
      ok = false;
    } else {
      if (lossy(info.dtype, targetDtype)) add({ _tag: 'LossyCast', severity: 'warning', source: name, from: info.dtype, to: targetDtype });
      if (checkFinite) {
        const bad = scan(name)!.nonFinite;
        if (bad > 0) {
          add({ _tag: 'NonFinite', severity: 'error', source: name, count: bad });
          ok = false;
        }
      }
    }
    sourceOk.set(name, ok);
    return ok;
  };

  const entries: PlanEntry[] = [];
  const constants: string[] = [];
  const used = new Set<string>();
  const targets = [...map.targets].sort((a, b) => compare(a.id, b.id));
  const restage = options.fusedGroups !== undefined && options.fusedGroups.length > 0 ? restageOf(map, options.fusedGroups) : undefined;
  for (const target of targets) {
    if (target.status !== 'mapped') {
      constants.push(target.id);
      continue;
    }
    const names = exprSources(target.expr);
    names.forEach((n) => used.add(n));
    // A quantized weight's values are its codes and its scales (and zero points): all are read and digested.
    const read = names.flatMap((n) => (quantized.has(n) ? companionsOf(quantized.get(n)!) : [n]));
    read.forEach((n) => used.add(n));
    let ok = names.map((n) => checkSource(n, target.id, target.dtype)).every(Boolean);
    const kernel = quantized.size > 0 ? options.kernels?.(target) : undefined;
    const mapped = mappedPathOf(target, quantized, (n) => recorded.get(n), kernel?.kernel, kernel?.folded ?? false);
    if (E.isLeft(mapped)) {
      const issue = mapped.left;
      add({ _tag: 'QuantizedMismatch', severity: 'error', source: issue._tag === 'BadWeightFormat' ? issue.text : issue.tensor, detail: describeQuantIssue(issue) });
      ok = false;
    }
    // Only a copy can mismatch (format, shape, group size): such a target is planned as a refused copy.
    const path: RefitPath = E.isLeft(mapped) ? 'quantized-copy' : ({ float: 'float', copy: 'quantized-copy', dequantize: 'dequantize' } as const)[mapped.right.path];
    const sourceDigest = ok ? combineDigests(read.map(digestOf)) : '';
    const now = options.current?.[target.id] ?? target.built.sourceDigest;
    const fused = restage !== undefined && (!ok || sourceDigest !== now) ? restage(target) : undefined;
    if (fused !== undefined && fused.unmapped.length > 0) add({ _tag: 'FusedWithUnmapped', severity: 'error', source: target.id, members: fused.unmapped });
    entries.push({
      target: target.id, kind: target.kind, segment: target.segment,
      ...(target.layer !== undefined ? { layer: target.layer } : {}), ...(target.role !== undefined ? { role: target.role } : {}), ...(target.tensor !== undefined ? { tensor: target.tensor } : {}),
      expr: target.expr, dtype: target.dtype, shape: target.shape, bytes: count(target.shape) * bytesPer(target.dtype),
      sources: names.map((n) => {
        const info = checkpoint.tensors.get(n) ?? expected.get(n);
        return { name: n, dtype: info?.dtype ?? 'missing', shape: info ? [...info.shape] : [] };
      }),
      sourceDigest,
      changed: !ok || sourceDigest !== now,
      path,
      ...(fused !== undefined && fused.ids.length > 0 ? { restage: fused.ids } : {}),
    });
  }
  for (const [source, ids] of missingFor) add({ _tag: 'MissingSource', severity: 'error', source, targets: ids });
  // Pinned tensors: the graph baked their build values in, so they must hold those values still; a tied
  // copy must hold its twin's values. A pinned tensor the checkpoint lacks changes nothing.
  const pinned = new Set<string>();
  const pinnedValue = (name: string): string | undefined => {
    const info = checkpoint.tensors.get(name);
    if (info === undefined || !isFloatDtype(info.dtype)) return undefined;
    const bytes = info.dtype === 'F32' ? checkpoint.bytes(name) : undefined;
    return bytes !== undefined && bytes.byteOffset % 4 === 0 ? valueDigest(new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4)) : valueDigest(checkpoint.toFloat32(name));
  };
  for (const p of map.pinned ?? []) {
    pinned.add(p.name);
    const now = pinnedValue(p.name);
    if (now === undefined) continue;
    if (p.kind === 'tied' && p.twin !== undefined) {
      const twin = pinnedValue(p.twin);
      if (twin !== undefined && twin !== now) add({ _tag: 'TiedDiverged', severity: 'error', source: p.name, twin: p.twin });
    } else if (now !== p.digest) add({ _tag: 'PinnedChanged', severity: 'error', source: p.name, reason: p.reason });
  }
  for (const name of [...checkpoint.tensors.keys()].sort(compare)) if (!used.has(name) && !pinned.has(name)) add({ _tag: 'UnusedTensor', severity: 'warning', source: name });
  const sortedProblems = [...problems.values()].sort((a, b) => compare(problemKey(a), problemKey(b)));
  const changed = entries.filter((e) => e.changed);
  const sourceBytes = new Map<string, number>();
  const storedBytes = (dtype: string): number => (dtype === 'F64' ? 8 : dtype === 'F16' || dtype === 'BF16' ? 2 : dtype === 'I8' || dtype === 'U8' || dtype === 'F8_E4M3' ? 1 : 4);
  // Restaged members are read too.
  const byId = new Map(entries.map((e) => [e.target, e]));
  const read = [...new Set([...changed, ...changed.flatMap((e) => (e.restage ?? []).map((id) => byId.get(id)!))])];
  for (const e of read) for (const s of e.sources) if (s.dtype !== 'missing') sourceBytes.set(s.name, count(s.shape) * storedBytes(s.dtype));
  return {
    version: 1,
    entries,
    constants,
    problems: sortedProblems,
    totals: {
      targets: entries.length,
      changed: changed.length,
      unchanged: entries.length - changed.length,
      constant: constants.length,
      bytesTotal: entries.reduce((s, e) => s + e.bytes, 0),
      bytesToMove: changed.reduce((s, e) => s + e.bytes, 0),
      sourceBytesToRead: [...sourceBytes.values()].reduce((a, b) => a + b, 0),
      errors: sortedProblems.filter((p) => p.severity === 'error').length,
      warnings: sortedProblems.filter((p) => p.severity === 'warning').length,
    },
  };
};

/** Right: the plan, when it has no errors (warnings allowed); Left: its errors. */
export const checkPlan = (plan: RefitPlan): E.Either<PlanErrorDetail, RefitPlan> => {
  const errors = plan.problems.filter((p) => p.severity === 'error');
  return errors.length === 0 ? E.right(plan) : E.left({ _tag: 'PlanHasErrors', problems: errors });
};

/** The source digests a set of engines holds after executing `plan` (the next plan's `current`). */
export const stateAfter = (plan: RefitPlan, before: Readonly<Record<string, string>> = {}): Record<string, string> => {
  const next: Record<string, string> = { ...before };
  for (const e of plan.entries) if (e.sourceDigest !== '') next[e.target] = e.sourceDigest;
  return next;
};

/** Per path, how many weights take it, naming those that are not plain float (a quantized checkpoint). */
const pathLines = (plan: RefitPlan): string[] => {
  const special = plan.entries.filter((e) => (e.path ?? 'float') !== 'float');
  if (special.length === 0) return [];
  const counts = new Map<RefitPath, number>();
  for (const e of plan.entries) counts.set(e.path ?? 'float', (counts.get(e.path ?? 'float') ?? 0) + 1);
  return [
    `paths: ${[...counts].map(([p, n]) => `${n} ${p}`).join(', ')}`,
    ...special.map((e) => `  ${e.path} ${e.target} <- ${e.sources.map((s) => s.name).join(', ')}`),
  ];
};

/** Weights restaged with changed ones (fused groups), when there are any. */
const restageLines = (plan: RefitPlan): string[] => {
  const fused = plan.entries.filter((e) => e.restage !== undefined && e.restage.length > 0);
  if (fused.length === 0) return [];
  const members = new Set(fused.flatMap((e) => e.restage!));
  return [
    `restage: ${members.size} weight(s) fused with ${fused.length} changed weight(s) are staged again with them`,
    ...fused.map((e) => `  ${e.target} + ${e.restage!.join(', ')}`),
  ];
};

/** A one-screen summary for `trt-refit plan` without --json. */
export const summarizePlan = (plan: RefitPlan): string => {
  const t = plan.totals;
  const lines = [
    `${t.targets} weights: ${t.changed} changed, ${t.unchanged} unchanged, ${t.constant} graph constants`,
    `${t.bytesToMove} of ${t.bytesTotal} bytes move; ${t.sourceBytesToRead} checkpoint bytes to read`,
    ...pathLines(plan),
    ...restageLines(plan),
    ...plan.problems.map((p) => `${p.severity}: ${describeProblem(p)}`),
  ];
  return lines.join('\n');
};
