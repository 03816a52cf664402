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
import { combineDigests, scanCache } from '../weightmap/digest.js';
import { isFloatDtype, type TensorStore } from '../weightmap/store.js';

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
}

export type PlanProblem =
  | { readonly _tag: 'MissingSource'; readonly severity: 'error'; readonly source: string; readonly targets: readonly string[] }
  | { readonly _tag: 'ShapeMismatch'; readonly severity: 'error'; readonly source: string; readonly expected: readonly number[]; readonly found: readonly number[] }
  | { readonly _tag: 'NotFloat'; readonly severity: 'error'; readonly source: string; readonly dtype: string }
  | { readonly _tag: 'LossyCast'; readonly severity: 'warning'; readonly source: string; readonly from: string; readonly to: string }
  | { readonly _tag: 'NonFinite'; readonly severity: 'error'; readonly source: string; readonly count: number }
  | { readonly _tag: 'UnusedTensor'; readonly severity: 'warning'; readonly source: string };

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
  t.partial({ layer: t.string, role: t.string, tensor: t.string }),
]);
const ProblemCodec = t.union([
  t.type({ _tag: t.literal('MissingSource'), severity: t.literal('error'), source: t.string, targets: t.readonlyArray(t.string) }),
  t.type({ _tag: t.literal('ShapeMismatch'), severity: t.literal('error'), source: t.string, expected: Shape, found: Shape }),
  t.type({ _tag: t.literal('NotFloat'), severity: t.literal('error'), source: t.string, dtype: t.string }),
  t.type({ _tag: t.literal('LossyCast'), severity: t.literal('warning'), source: t.string, from: t.string, to: t.string }),
  t.type({ _tag: t.literal('NonFinite'), severity: t.literal('error'), source: t.string, count: t.number }),
  t.type({ _tag: t.literal('UnusedTensor'), severity: t.literal('warning'), source: t.string }),
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
}

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
  /** Checks a source once; false when the target cannot be refitted from it. */
  const checkSource = (name: string, target: string, targetDtype: string): boolean => {
    const info = checkpoint.tensors.get(name);
    if (info === undefined) {
      missingFor.set(name, [...(missingFor.get(name) ?? []), target]);
      return false;
    }
    const known = sourceOk.get(name);
    if (known !== undefined) return known;
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
  for (const target of targets) {
    if (target.status !== 'mapped') {
      constants.push(target.id);
      continue;
    }
    const names = exprSources(target.expr);
    names.forEach((n) => used.add(n));
    const ok = names.map((n) => checkSource(n, target.id, target.dtype)).every(Boolean);
    const sourceDigest = ok ? combineDigests(names.map(digestOf)) : '';
    const now = options.current?.[target.id] ?? target.built.sourceDigest;
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
    });
  }
  for (const [source, ids] of missingFor) add({ _tag: 'MissingSource', severity: 'error', source, targets: ids });
  for (const name of [...checkpoint.tensors.keys()].sort(compare)) if (!used.has(name)) add({ _tag: 'UnusedTensor', severity: 'warning', source: name });
  const sortedProblems = [...problems.values()].sort((a, b) => compare(problemKey(a), problemKey(b)));
  const changed = entries.filter((e) => e.changed);
  const sourceBytes = new Map<string, number>();
  for (const e of changed) for (const s of e.sources) if (s.dtype !== 'missing') sourceBytes.set(s.name, count(s.shape) * (s.dtype === 'F64' ? 8 : s.dtype === 'F16' || s.dtype === 'BF16' ? 2 : 4));
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

/** A one-screen summary for `trt-refit plan` without --json. */
export const summarizePlan = (plan: RefitPlan): string => {
  const t = plan.totals;
  const lines = [
    `${t.targets} weights: ${t.changed} changed, ${t.unchanged} unchanged, ${t.constant} graph constants`,
    `${t.bytesToMove} of ${t.bytesTotal} bytes move; ${t.sourceBytesToRead} checkpoint bytes to read`,
    ...plan.problems.map((p) => `${p.severity}: ${describeProblem(p)}`),
  ];
  return lines.join('\n');
};
