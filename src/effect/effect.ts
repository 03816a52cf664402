/**
 * The effect: executes a RefitPlan against a RefitModel. The only stage that reads checkpoint bytes and
 * changes engines.
 *
 * - Only changed targets move. Each target's value is its expression evaluated over the checkpoint
 *   (float32 tensors are zero-copy views of the mapped file; other dtypes are converted one tensor at a time).
 * - Fallback segments first: their new model bytes are built and a session opened on them (every check
 *   happens there); nothing is swapped in until all engines are refitted.
 * - Engines: values are staged into refitters in batches of at most `stagingBytes` (default: twice the
 *   largest changed weight), because a refitter keeps pointers to staged values until apply. Values that
 *   are views of the checkpoint (identity, reshape) or of tensors already in memory count nothing. A batch
 *   is completed with whatever the refitter reports missing (weights fused with a staged one), validated
 *   on every engine it touches, then applied. Extra memory is the batch plus one tensor being evaluated.
 *   When everything fits one batch, every engine is validated before any is applied.
 * - All or nothing across the model: before an engine's first apply its state is kept for undo (the .trtr
 *   blob it was read from when it is unchanged since, otherwise a snapshot file written by libtrtshim; the
 *   model's last apply needs none unless verification follows, since a failed apply changes nothing), so a
 *   failure anywhere (read, transform, validate, apply, a fallback, verification, an abort between
 *   tensors) puts every applied engine back and leaves every fallback as it was.
 * - Non-finite values are refused here, once per value (NonFiniteValues): a value that is a view of a
 *   checkpoint tensor the plan already scanned costs nothing (scans are memoized by file identity);
 *   refitters run with their own check off, which would scan every value again in set, validate and apply.
 * - Optional verification runs probe inputs after everything is in and undoes all on rejection.
 * - On success the model's recorded digests become the plan's (refitting the same weights again moves 0 bytes).
 */
import { stat } from 'node:fs/promises';
import * as E from 'fp-ts/lib/Either.js';
import * as TE from 'fp-ts/lib/TaskEither.js';
import type { WeightRole } from '../network/types.js';
import { checkPlan, describeProblem, stateAfter, type PlanEntry, type PlanProblem, type RefitPlan } from '../plan/plan.js';
import { nonFiniteCount } from '../weightmap/digest.js';
import type { F32Tensor } from '../weightmap/evaluate.js';
import type { MapTarget } from '../weightmap/map.js';
import type { TensorStore } from '../weightmap/store.js';
import type { Tensor } from '../trace/ir.js';
import { FallbackRunner, type PreparedFallback } from '../model/fallback.js';
import { sameIdentity } from '../model/file.js';
import type { EngineStage, FallbackStage, RefitModel } from '../model/model.js';
import { defaultCapabilities, type EffectCapabilities, type RefitterLike, type Snapshot } from './capabilities.js';
import type { QuantizedWeights } from '../../ffi/engine.js';
import type { QuantizedEntry } from '../quant/checkpoint.js';
import { describeQuantIssue } from '../quant/errors.js';
import { dequantizedSource } from '../quant/mapped.js';
import { quantizedIn, tensorSourceOf } from '../quant/store.js';
import { decideCopy, kernelInfoOf } from './quantized.js';

export type EffectErrorDetail =
  | { readonly _tag: 'PlanHasErrors'; readonly problems: readonly PlanProblem[] }
  | { readonly _tag: 'PlanMismatch'; readonly target: string; readonly reason: string }
  | { readonly _tag: 'ReadFailed'; readonly source: string; readonly target: string; readonly detail: string }
  | { readonly _tag: 'TransformFailed'; readonly target: string; readonly detail: string }
  | { readonly _tag: 'EngineRefitFailed'; readonly segment: number; readonly detail: string }
  | { readonly _tag: 'FallbackRefitFailed'; readonly segment: number; readonly detail: string }
  | { readonly _tag: 'NonFiniteValues'; readonly target: string; readonly count: number }
  | { readonly _tag: 'VerificationFailed'; readonly detail: string }
  | { readonly _tag: 'Aborted'; readonly after: number; readonly total: number }
  | { readonly _tag: 'RollbackFailed'; readonly cause: string; readonly detail: string }
  | { readonly _tag: 'QuantizedMismatch'; readonly tensor: string; readonly target: string; readonly detail: string };

export const describeEffectError = (e: EffectErrorDetail): string => {
  switch (e._tag) {
    case 'PlanHasErrors': return `the refit plan has ${e.problems.length} error(s): ${e.problems.map(describeProblem).join('; ')}`;
    case 'PlanMismatch': return `the plan does not fit this model: target '${e.target}': ${e.reason}`;
    case 'ReadFailed': return `reading checkpoint tensor '${e.source}' (for ${e.target}) failed: ${e.detail}`;
    case 'TransformFailed': return `computing ${e.target} failed: ${e.detail}`;
    case 'EngineRefitFailed': return `engine segment ${e.segment}: refit failed: ${e.detail}`;
    case 'FallbackRefitFailed': return `fallback segment ${e.segment}: refit failed: ${e.detail}`;
    case 'NonFiniteValues': return `${e.target}: ${e.count} non-finite value(s) (NaN or infinity)`;
    case 'VerificationFailed': return `verification on the probe inputs failed: ${e.detail}`;
    case 'Aborted': return `refit aborted after ${e.after} of ${e.total} weights; nothing was changed`;
    case 'QuantizedMismatch': return `quantized checkpoint tensor '${e.tensor}' (for ${e.target}): ${e.detail}; nothing was changed`;
    case 'RollbackFailed': return `refit failed (${e.cause}) and undoing it failed too: ${e.detail}; the model is in an unknown state, reload it`;
  }
};

export class EffectError extends Error {
  override readonly name = 'EffectError';
  readonly _tag: EffectErrorDetail['_tag'];
  constructor(readonly detail: EffectErrorDetail) {
    super(describeEffectError(detail));
    this._tag = detail._tag;
  }
}

export interface VerifyOptions {
  readonly inputs: Readonly<Record<string, Tensor>>;
  /** A reason to reject the outputs, or undefined to accept. Default: every float output is finite. */
  readonly check?: (outputs: Readonly<Record<string, Tensor>>) => string | undefined;
}

export interface EffectOptions {
  readonly signal?: AbortSignal;
  /** Bytes staged in refitters at once (default twice the largest changed engine weight). */
  readonly stagingBytes?: number;
  readonly verify?: VerifyOptions;
  /** Refuse non-finite values (NonFiniteValues, naming the target), on engines and fallbacks (default
   *  true). So a plan made with `checkFinite: false` (no scan of every source) is still safe to execute. */
  readonly checkFinite?: boolean;
}

export interface RefitReport {
  readonly changed: number;
  readonly bytesMoved: number;
  readonly sourceBytesRead: number;
  readonly engines: readonly number[];
  readonly fallbacks: readonly number[];
  readonly batches: number;
  readonly peakStagedBytes: number;
  readonly verified: boolean;
  readonly milliseconds: number;
}

class Failure {
  constructor(readonly detail: EffectErrorDetail) {}
}
const fail = (detail: EffectErrorDetail): never => {
  throw new Failure(detail);
};
const messageOf = (e: unknown): string => (e instanceof Error ? e.message : String(e));
const count = (shape: readonly number[]): number => shape.reduce((a, b) => a * b, 1);
const dtypeBytes: Readonly<Record<string, number>> = { F64: 8, I64: 8, U64: 8, F32: 4, I32: 4, U32: 4, F16: 2, BF16: 2, I16: 2, U16: 2, I8: 1, U8: 1, F8_E4M3: 1, BOOL: 1 };

/** A checkpoint tensor as float32: a zero-copy view for aligned F32 data, else converted. */
const readSource = (store: TensorStore, name: string): F32Tensor | undefined => {
  const info = store.tensors.get(name);
  if (info === undefined) return undefined;
  if (info.dtype === 'F32') {
    const bytes = store.bytes(name);
    if (bytes.byteOffset % 4 === 0) return { shape: info.shape, data: new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4) };
  }
  return { shape: info.shape, data: store.toFloat32(name) };
};

const defaultCheck = (outputs: Readonly<Record<string, Tensor>>): string | undefined => {
  for (const [name, t] of Object.entries(outputs)) {
    if (!(t.data instanceof Float32Array || t.data instanceof Float64Array)) continue;
    for (let i = 0; i < t.data.length; i++) if (!Number.isFinite(t.data[i])) return `output '${name}' has a non-finite value at ${i}`;
  }
  return undefined;
};

/** Checks that the plan was made for this model and its current state. */
const checkFits = (model: RefitModel, plan: RefitPlan): Map<string, MapTarget> => {
  const checked = checkPlan(plan);
  if (E.isLeft(checked)) fail({ _tag: 'PlanHasErrors', problems: checked.left.problems });
  const targets = new Map(model.weightMap.targets.map((t) => [t.id, t]));
  for (const e of plan.entries) {
    const t = targets.get(e.target);
    if (t === undefined || t.status !== 'mapped') fail({ _tag: 'PlanMismatch', target: e.target, reason: 'the model has no such mapped weight' });
    if (JSON.stringify(t!.expr) !== JSON.stringify(e.expr)) fail({ _tag: 'PlanMismatch', target: e.target, reason: 'its expression differs from the model\'s weight map' });
    const stage = model.stage(e.segment);
    if (stage === undefined || stage.kind !== e.kind) fail({ _tag: 'PlanMismatch', target: e.target, reason: `the model has no ${e.kind} segment ${e.segment}` });
    // A plan made against another state would skip weights that now differ.
    if (!e.changed && model.current[e.target] !== e.sourceDigest) fail({ _tag: 'PlanMismatch', target: e.target, reason: 'the plan is stale: the model changed since it was planned' });
  }
  return targets;
};

export const executePlanTE = (
  model: RefitModel,
  plan: RefitPlan,
  checkpoint: TensorStore,
  options: EffectOptions = {},
  capabilities: Partial<EffectCapabilities> = {},
): TE.TaskEither<EffectErrorDetail, RefitReport> => async () => {
  const caps = defaultCapabilities(capabilities);
  const started = caps.clock();
  const changed = plan.entries.filter((e) => e.changed);
  const total = changed.length;
  const bytesTotal = changed.reduce((s, e) => s + e.bytes, 0);
  let done = 0;
  let bytesDone = 0;
  const sourcesRead = new Set<string>();
  const progress = (phase: 'fallback' | 'engine' | 'verify' | 'done', target?: string) =>
    caps.onProgress?.({ phase, done, total, bytesDone, bytesTotal, ...(target !== undefined ? { target } : {}), elapsedMs: caps.clock() - started });
  const checkAbort = () => {
    if (options.signal?.aborted) fail({ _tag: 'Aborted', after: done, total });
  };

  /** A target's value over the checkpoint. */
  /** Buffers of the tensors the last evaluation read: a result in one of them is a view, not a new allocation. */
  let sourceBuffers = new Set<ArrayBufferLike>();
  // A quantized checkpoint (`<m>.weight` + `<m>.weight_scale`): copies into kernels of the same format
  // are decided (and checked) before anything changes; every other read of a quantized tensor gets it
  // dequantized into the layout the weight map recorded.
  const source = tensorSourceOf(checkpoint);
  let quantized: ReadonlyMap<string, QuantizedEntry> = new Map();
  const recorded = new Map(model.weightMap.sources.map((s) => [s.name, s.shape] as const));
  const copies = new Map<string, { readonly weights: QuantizedWeights; readonly reads: readonly string[] }>();
  const evaluate = (target: string, expr: PlanEntry['expr'], shape: readonly number[]): Float32Array => {
    sourceBuffers = new Set();
    const lookup = (name: string): F32Tensor | undefined => {
      const entry = quantized.get(name);
      if (entry !== undefined) {
        const d = dequantizedSource(source, entry, recorded.get(name) ?? entry.valuesShape);
        if (E.isLeft(d)) return fail({ _tag: 'QuantizedMismatch', tensor: name, target, detail: describeQuantIssue(d.left) });
        sourcesRead.add(name);
        return d.right;
      }
      try {
        const t = readSource(checkpoint, name);
        if (t !== undefined) {
          sourcesRead.add(name);
          sourceBuffers.add(t.data.buffer);
        }
        return t;
      } catch (e) {
        return fail({ _tag: 'ReadFailed', source: name, target, detail: messageOf(e) });
      }
    };
    let value: E.Either<unknown, F32Tensor>;
    try {
      value = caps.transform(expr, lookup);
    } catch (e) {
      if (e instanceof Failure) throw e;
      return fail({ _tag: 'TransformFailed', target, detail: messageOf(e) });
    }
    if (E.isLeft(value)) return fail({ _tag: 'TransformFailed', target, detail: JSON.stringify(value.left) });
    if (value.right.data.length !== count(shape)) fail({ _tag: 'TransformFailed', target, detail: `expected ${count(shape)} values for [${shape}], found ${value.right.data.length}` });
    return value.right.data;
  };

  /** evaluate, refusing non-finite values when asked. Done here for engines too (their refitters do not
   *  check): a value that is a view of a checkpoint tensor the plan scanned costs nothing (the scan is
   *  memoized by file identity), others are counted natively on every core, once. */
  const checkFinite = options.checkFinite ?? true;
  const evaluateFinite = (target: string, expr: PlanEntry['expr'], shape: readonly number[]): Float32Array => {
    const values = evaluate(target, expr, shape);
    if (checkFinite) {
      const bad = nonFiniteCount(values);
      if (bad > 0) fail({ _tag: 'NonFiniteValues', target, count: bad });
    }
    return values;
  };

  const prepared = new Map<number, PreparedFallback>();
  const committed = new Map<number, PreparedFallback>(); // previous state of committed fallbacks
  const undo = new Map<number, Snapshot>();
  const touched: number[] = [];
  const open = new Map<number, RefitterLike>();
  let batches = 0;
  let peak = 0;
  let verified = false;

  const rollback = async (cause: EffectErrorDetail): Promise<EffectErrorDetail> => {
    for (const r of open.values()) r[Symbol.dispose]();
    open.clear();
    for (const p of prepared.values()) FallbackRunner.discard(p);
    const problems: string[] = [];
    for (const [segment, previous] of committed) {
      const stage = model.stage(segment) as FallbackStage;
      FallbackRunner.discard(stage.runner.commit(previous));
    }
    for (const segment of touched) {
      const stage = model.stage(segment) as EngineStage;
      try {
        const engine = await undo.get(segment)!.restore();
        const context = engine.createContext();
        stage.context[Symbol.dispose]();
        stage.engine[Symbol.dispose]();
        stage.engine = engine;
        stage.context = context;
      } catch (e) {
        problems.push(`engine segment ${segment}: ${messageOf(e)}`);
      }
    }
    for (const s of undo.values()) await s.discard().catch(() => undefined);
    return problems.length === 0 ? cause : { _tag: 'RollbackFailed', cause: describeEffectError(cause), detail: problems.join('; ') };
  };

  try {
    const targets = checkFits(model, plan);
    const found = quantizedIn(checkpoint);
    if (E.isLeft(found)) fail({ _tag: 'QuantizedMismatch', tensor: found.left._tag === 'BadWeightFormat' ? found.left.text : found.left.tensor, target: '(checkpoint)', detail: describeQuantIssue(found.left) });
    quantized = E.isRight(found) ? found.right : new Map();
    if (quantized.size > 0) {
      // Decided against the engines themselves (not the plan's word), before anything changes.
      const kernels = kernelInfoOf(model);
      for (const e of changed.filter((x) => x.kind === 'engine')) {
        const t = targets.get(e.target)!;
        const copy = decideCopy(t, quantized, recorded, kernels, source);
        if (E.isLeft(copy)) {
          const issue = copy.left;
          fail({ _tag: 'QuantizedMismatch', tensor: issue._tag === 'BadWeightFormat' ? issue.text : issue.tensor, target: e.target, detail: describeQuantIssue(issue) });
        } else if (copy.right !== undefined) {
          if (checkFinite) {
            const bad = nonFiniteCount(copy.right.weights.scales);
            if (bad > 0) fail({ _tag: 'NonFiniteValues', target: e.target, count: bad });
          }
          copies.set(e.target, copy.right);
        }
      }
    }
    checkAbort();

    // Fallbacks: new bytes and sessions, prepared but not swapped in.
    const fallbackEntries = changed.filter((e) => e.kind === 'fallback');
    for (const segment of [...new Set(fallbackEntries.map((e) => e.segment))]) {
      const updates = new Map<string, Float32Array>();
      for (const e of fallbackEntries.filter((x) => x.segment === segment)) {
        checkAbort();
        updates.set(e.tensor!, evaluateFinite(e.target, e.expr, e.shape));
        done++;
        bytesDone += e.bytes;
        progress('fallback', e.target);
      }
      const stage = model.stage(segment) as FallbackStage;
      try {
        prepared.set(segment, await stage.runner.prepare(updates, caps.openSession));
      } catch (e) {
        fail({ _tag: 'FallbackRefitFailed', segment, detail: messageOf(e) });
      }
    }

    // Engines, in run order, in bounded batches.
    const order = new Map(model.stages.map((s, i) => [s.record.index, i]));
    const engineEntries = changed.filter((e) => e.kind === 'engine').sort((a, b) => order.get(a.segment)! - order.get(b.segment)! || (a.target < b.target ? -1 : 1));
    const budget = options.stagingBytes ?? 2 * Math.max(0, ...engineEntries.map((e) => e.bytes));
    let staged = 0;
    const stagedKeys = new Map<number, Set<string>>();
    const refitterFor = (segment: number): RefitterLike => {
      let r = open.get(segment);
      if (r === undefined) {
        const stage = model.stage(segment) as EngineStage;
        try {
          r = caps.refitter(segment, stage.engine);
          // Checked once, by evaluateFinite: the native check would scan every value again in
          // set_weights, validate and apply.
          r.setCheckFinite(false);
        } catch (e) {
          return fail({ _tag: 'EngineRefitFailed', segment, detail: messageOf(e) });
        }
        open.set(segment, r);
        stagedKeys.set(segment, new Set());
      }
      return r;
    };
    const stageCopy = (segment: number, layer: string, role: WeightRole, q: QuantizedWeights) => {
      const r = refitterFor(segment);
      if (r.setQuantizedWeights === undefined) return fail({ _tag: 'EngineRefitFailed', segment, detail: 'this refitter cannot take quantized weights' });
      try {
        r.setQuantizedWeights(layer, role, q);
      } catch (e) {
        fail({ _tag: 'EngineRefitFailed', segment, detail: messageOf(e) });
      }
      stagedKeys.get(segment)!.add(`${layer}\u0000${role}`);
      // Values are views of the checkpoint; scales (and converted zero points) are small copies.
      staged += q.scales.byteLength;
      peak = Math.max(peak, staged);
    };
    /** Stages one target: a decided copy as it is, anything else evaluated. */
    const stageTarget = (segment: number, id: string, layer: string, role: WeightRole, shape: readonly number[], expr: PlanEntry['expr']) => {
      const copy = copies.get(id);
      if (copy !== undefined) {
        copy.reads.forEach((n) => sourcesRead.add(n));
        stageCopy(segment, layer, role, copy.weights);
      } 
      else stage(segment, layer, role, shape, evaluateFinite(id, expr, shape));
    };
    const stage = (segment: number, layer: string, role: WeightRole, shape: readonly number[], data: Float32Array) => {
      const r = refitterFor(segment);
      try {
        r.setWeights(layer, role, { dtype: 'float32', shape, data });
      } catch (e) {
        fail({ _tag: 'EngineRefitFailed', segment, detail: messageOf(e) });
      }
      stagedKeys.get(segment)!.add(`${layer}\u0000${role}`);
      // Views of the checkpoint (or of merged tensors already in memory) cost nothing to keep staged.
      if (!sourceBuffers.has(data.buffer)) staged += data.byteLength;
      peak = Math.max(peak, staged);
    };
    const flush = async (last: boolean) => {
      if (open.size === 0) return;
      batches++;
      // Weights fused with staged ones whose values the engine does not keep: stage them too.
      for (const [segment, r] of open) {
        let missing: Array<{ layer: string; role: WeightRole }>;
        try {
          missing = r.missing();
        } catch (e) {
          return fail({ _tag: 'EngineRefitFailed', segment, detail: messageOf(e) });
        }
        for (const m of missing) {
          const id = `engine/${segment}/${m.layer}/${m.role}`;
          const t = targets.get(id);
          if (t === undefined || t.status !== 'mapped') fail({ _tag: 'EngineRefitFailed', segment, detail: `weight ${m.layer} (${m.role}) must be restaged with a changed weight, and it has no checkpoint source` });
          if (!copies.has(id) && quantized.size > 0) {
            // A restaged weight reading a quantized tensor: checked against the engine like the others.
            const copy = decideCopy(t!, quantized, recorded, kernelInfoOf(model), source);
            if (E.isLeft(copy)) fail({ _tag: 'QuantizedMismatch', tensor: 'tensor' in copy.left ? copy.left.tensor : '', target: id, detail: describeQuantIssue(copy.left) });
            else if (copy.right !== undefined) copies.set(id, copy.right);
          }
          stageTarget(segment, id, m.layer, m.role, t!.shape, t!.expr);
        }
      }
      for (const [segment, r] of open) {
        try {
          r.validate();
        } catch (e) {
          fail({ _tag: 'EngineRefitFailed', segment, detail: messageOf(e) });
        }
      }
      // Keep what each engine holds before its first apply.
      // The model's very last apply needs no undo of its own (a failed apply changes nothing), unless a
      // verification may still reject the whole refit.
      const segments = [...open.keys()];
      const lastApply = last && options.verify === undefined ? segments[segments.length - 1] : undefined;
      for (const segment of segments) {
        if (undo.has(segment) || segment === lastApply) continue;
        const s = model.stage(segment) as EngineStage;
        try {
          const origin = s.origin;
          const usable = origin !== undefined && sameIdentity(await stat(origin.path).then((st) => ({ dev: st.dev, ino: st.ino, size: st.size, mtimeMs: st.mtimeMs })), origin.identity);
          undo.set(segment, usable ? caps.snapshots.fromOrigin(origin!) : await caps.snapshots.save(segment, s.engine));
        } catch (e) {
          fail({ _tag: 'EngineRefitFailed', segment, detail: `cannot keep the engine's state for undo: ${messageOf(e)}` });
        }
      }
      for (const [segment, r] of open) {
        try {
          r.apply();
        } catch (e) {
          // A failed apply leaves its engine as it was; engines applied before it are undone.
          fail({ _tag: 'EngineRefitFailed', segment, detail: messageOf(e) });
        }
        if (!touched.includes(segment)) touched.push(segment);
      }
      for (const r of open.values()) r[Symbol.dispose]();
      open.clear();
      staged = 0;
    };
    for (const e of engineEntries) {
      checkAbort();
      if (staged > 0 && staged + e.bytes > budget) await flush(false);
      const already = stagedKeys.get(e.segment)?.has(`${e.layer}\u0000${e.role}`) && open.has(e.segment);
      if (!already) stageTarget(e.segment, e.target, e.layer!, e.role as WeightRole, e.shape, e.expr);
      done++;
      bytesDone += e.bytes;
      progress('engine', e.target);
    }
    checkAbort();
    await flush(true);

    for (const [segment, p] of prepared) {
      committed.set(segment, (model.stage(segment) as FallbackStage).runner.commit(p));
      prepared.delete(segment);
    }
    if (options.verify !== undefined) {
      progress('verify');
      let outputs: Record<string, Tensor>;
      try {
        outputs = await model.run(options.verify.inputs);
      } catch (e) {
        return fail({ _tag: 'VerificationFailed', detail: messageOf(e) });
      }
      const reason = (options.verify.check ?? defaultCheck)(outputs);
      if (reason !== undefined) fail({ _tag: 'VerificationFailed', detail: reason });
      verified = true;
    }
  } catch (e) {
    const cause: EffectErrorDetail = e instanceof Failure ? e.detail : { _tag: 'EngineRefitFailed', segment: -1, detail: messageOf(e) };
    return E.left(await rollback(cause));
  }

  // Success: drop the undo state, record what the targets hold now.
  for (const previous of committed.values()) FallbackRunner.discard(previous);
  for (const s of undo.values()) await s.discard().catch(() => undefined);
  for (const segment of touched) (model.stage(segment) as EngineStage).origin = undefined;
  model.setCurrent(stateAfter(plan, model.current));
  progress('done');
  const report: RefitReport = {
    changed: total,
    bytesMoved: bytesTotal,
    sourceBytesRead: [...sourcesRead].reduce((s, n) => {
      const info = checkpoint.tensors.get(n)!;
      return s + count(info.shape) * (dtypeBytes[info.dtype] ?? 4);
    }, 0),
    engines: touched,
    fallbacks: [...committed.keys()],
    batches,
    peakStagedBytes: peak,
    verified,
    milliseconds: caps.clock() - started,
  };
  return E.right(report);
};

/** Executes a plan; rejects with EffectError, leaving the model as it was. */
export const executePlan = async (
  model: RefitModel,
  plan: RefitPlan,
  checkpoint: TensorStore,
  options: EffectOptions = {},
  capabilities: Partial<EffectCapabilities> = {},
): Promise<RefitReport> => {
  const r = await executePlanTE(model, plan, checkpoint, options, capabilities)();
  if (E.isLeft(r)) throw new EffectError(r.left);
  return r.right;
};
