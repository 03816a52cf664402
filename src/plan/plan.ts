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
}

export type RefitPath = 'float' | 'quantized-copy' | 'dequantize';

export type PlanProblem =
  | { readonly _tag: 'MissingSource'; readonly severity: 'error'; readonly source: string; readonly targets: readonly string[] }
  | { readonly _tag: 'ShapeMismatch'; readonly severity: 'error'; readonly source: string; readonly expected: readonly number[]; readonly found: readonly number[] }
  | { readonly _tag: 'NotFloat'; readonly severity: 'error'; readonly source: string; readonly dtype: string }
  | { readonly _tag: 'LossyCast'; readonly severity: 'warning'; readonly source: string; readonly from: string; readonly to: string }
  | { readonly _tag: 'NonFinite'; readonly severity: 'error'; readonly source: string; readonly count: number }
  | { readonly _tag: 'UnusedTensor'; readonly severity: 'warning'; readonly source: string }
  | { readonly _tag: 'QuantizedMismatch'; readonly severity: 'error'; readonly source: string; readonly detail: string };

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
  t.partial({ layer: t.string, role: t.string, tensor: t.string, path: t.keyof({ float: null, 'quantized-copy': null, dequantize: null }) }),
]);
const ProblemCodec = t.union([
  t.type({ _tag: t.literal('MissingSource'), severity: t.literal('error'), source: t.string, targets: t.readonlyArray(t.string) }),
  t.type({ _tag: t.literal('ShapeMismatch'), severity: t.literal('error'), source: t.string, expected: Shape, found: Shape }),
  t.type({ _tag: t.literal('NotFloat'), severity: t.literal('error'), source: t.string, dtype: t.string }),
  t.type({ _tag: t.literal('LossyCast'), severity: t.literal('warning'), source: t.string, from: t.string, to: t.string }),
  t.type({ _tag: t.literal('NonFinite'), severity: t.literal('error'), source: t.string, count: t.number }),
  t.type({ _tag: t.literal('UnusedTensor'), severity: t.literal('warning'), source: t.string }),
  t.type({ _tag: t.literal('QuantizedMismatch'), severity: t.literal('error'), source: t.string, detail: t.string }),
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
    case 'QuantizedMismatch': return `quantized checkpoint tensor '${p.source}': ${p.detail}`;
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
    });
  }
  for (const [source, ids] of missingFor) add({ _tag: 'MissingSource', severity: 'error', source, targets: ids });
  for (const name of [...checkpoint.tensors.keys()].sort(compare)) if (!used.has(name)) add({ _tag: 'UnusedTensor', severity: 'warning', source: name });
  const sortedProblems = [...problems.values()].sort((a, b) => compare(problemKey(a), problemKey(b)));
  const changed = entries.filter((e) => e.changed);
  const sourceBytes = new Map<string, number>();
  const storedBytes = (dtype: string): number => (dtype === 'F64' ? 8 : dtype === 'F16' || dtype === 'BF16' ? 2 : dtype === 'I8' || dtype === 'U8' || dtype === 'F8_E4M3' ? 1 : 4);
  for (const e of changed) for (const s of e.sources) if (s.dtype !== 'missing') sourceBytes.set(s.name, count(s.shape) * storedBytes(s.dtype));
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

/** A one-screen summary for `trt-refit plan` without --json. */
export const summarizePlan = (plan: RefitPlan): string => {
  const t = plan.totals;
  const lines = [
    `${t.targets} weights: ${t.changed} changed, ${t.unchanged} unchanged, ${t.constant} graph constants`,
    `${t.bytesToMove} of ${t.bytesTotal} bytes move; ${t.sourceBytesToRead} checkpoint bytes to read`,
    ...pathLines(plan),
    ...plan.problems.map((p) => `${p.severity}: ${describeProblem(p)}`),
  ];
  return lines.join('\n');
};
