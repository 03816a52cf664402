/**
 * The effect: executes a RefitPlan against a RefitModel. The only stage that reads checkpoint bytes and
 * changes engines. It executes the plan's steps and decides nothing the plan decides (targets, what is
 * restaged with what); it refuses a plan that does not fit the model.
 *
 * executePlanTE composes three parts:
 * - TargetValues (values.ts): targets' values over the checkpoint, quantized copies decided against the
 *   engines before anything changes, non-finite values refused once per value.
 * - Executor (executor.ts): fallback segments prepared, engine steps staged in bounded batches, checked
 *   against the refitters' `missing()` (PlanIncomplete), validated, applied; then the read-back check.
 * - Transaction (transaction.ts): the undo log. Engines' states kept before their first apply, fallbacks
 *   swapped in only at commit, everything put back on any failure (read, transform, validate, apply, a
 *   fallback, read-back, verification, an abort between tensors); RollbackFailed when undoing fails.
 *
 * Order: fit checks and copy decisions; fallbacks prepared; engines applied; read-back (every staged engine
 * weight reports the digest expected of the value staged, EffectOptions.readback, default on); fallbacks
 * committed; optional verification on probe inputs. On success the model's recorded digests become the
 * plan's (refitting the same weights again moves 0 bytes).
 */
import * as E from 'fp-ts/lib/Either.js';
import type * as TE from 'fp-ts/lib/TaskEither.js';
import { checkPlan, stateAfter, type RefitPlan } from '../plan/plan.js';
import type { MapTarget } from '../weightmap/map.js';
import type { TensorStore } from '../weightmap/store.js';
import type { Tensor } from '../trace/ir.js';
import type { RefitModel } from '../model/model.js';
import { defaultCapabilities, type EffectCapabilities } from './capabilities.js';
import { EffectError, fail, Failure, messageOf, type EffectErrorDetail } from './errors.js';
import { engineSteps, Executor } from './executor.js';
import { Transaction } from './transaction.js';
import { TargetValues } from './values.js';

export { describeEffectError, EffectError, type EffectErrorDetail } from './errors.js';

export interface VerifyOptions {
  readonly inputs: Readonly<Record<string, Tensor>>;
  /** A reason to reject the outputs, or undefined to accept. Default: every float output is finite. */
  readonly check?: (outputs: Readonly<Record<string, Tensor>>) => string | undefined;
}

export interface EffectOptions {
  readonly signal?: AbortSignal;
  /** Bytes staged in refitters at once (default twice the largest changed engine weight with the weights
   *  it restages). */
  readonly stagingBytes?: number;
  readonly verify?: VerifyOptions;
  /** Refuse non-finite values (NonFiniteValues, naming the target), on engines and fallbacks (default
   *  true). So a plan made with `checkFinite: false` (no scan of every source) is still safe to execute. */
  readonly checkFinite?: boolean;
  /** After every engine is applied, check that each engine weight the refit staged reports the digest
   *  expected of the value staged; a mismatch undoes everything (ReadbackMismatch). Default true; it runs
   *  where the capabilities can read engines back (EffectCapabilities.readback), and the report says
   *  whether it ran. */
  readonly readback?: boolean;
}

export interface ReadbackReport {
  /** True when every engine weight staged was read back and matched. */
  readonly verified: boolean;
  /** Engine weights compared. */
  readonly targets: number;
  /** Engine weights staged but not compared: their expected digest cannot be told (ReadbackCapability). */
  readonly unverifiable: number;
  /** Milliseconds spent on it: expected digests of the staged values, engines' digests, comparison. */
  readonly milliseconds: number;
}

export interface RefitReport {
  readonly changed: number;
  /** Bytes of the changed targets, plus those of fused members restaged with them. */
  readonly bytesMoved: number;
  readonly sourceBytesRead: number;
  readonly engines: readonly number[];
  readonly fallbacks: readonly number[];
  readonly batches: number;
  readonly peakStagedBytes: number;
  /** Verified on the probe inputs (EffectOptions.verify). */
  readonly verified: boolean;
  readonly readback: ReadbackReport;
  readonly milliseconds: number;
}

const defaultCheck = (outputs: Readonly<Record<string, Tensor>>): string | undefined => {
  for (const [name, t] of Object.entries(outputs)) {
    if (!(t.data instanceof Float32Array || t.data instanceof Float64Array)) continue;
    for (let i = 0; i < t.data.length; i++) if (!Number.isFinite(t.data[i])) return `output '${name}' has a non-finite value at ${i}`;
  }
  return undefined;
};

/** Checks that the plan was made for this model and its current state; the model's targets by id. */
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
  const progress = (phase: 'fallback' | 'engine' | 'verify' | 'done', target?: string) =>
    caps.onProgress?.({ phase, done, total, bytesDone, bytesTotal, ...(target !== undefined ? { target } : {}), elapsedMs: caps.clock() - started });
  const checkAbort = () => {
    if (options.signal?.aborted) fail({ _tag: 'Aborted', after: done, total });
  };
  const readback = options.readback === false ? undefined : caps.readback;

  const values = new TargetValues(model, checkpoint, caps.transform, options.checkFinite ?? true);
  const tx = new Transaction(model, caps.snapshots);
  using executor = new Executor(model, values, tx, caps, readback);
  let verified = false;
  let readbackReport: ReadbackReport = { verified: false, targets: 0, unverifiable: 0, milliseconds: 0 };

  try {
    const targets = checkFits(model, plan);
    const steps = engineSteps(model, plan);
    // Copies into quantized kernels, decided against the engines before anything changes (restaged
    // members included).
    values.decideCopies(model, [...new Set(steps.flatMap((s) => [s.entry, ...s.restage]))].map((e) => targets.get(e.target)!));
    checkAbort();

    await executor.prepareFallbacks(changed.filter((e) => e.kind === 'fallback'), checkAbort, (e) => {
      done++;
      bytesDone += e.bytes;
      progress('fallback', e.target);
    });
    await executor.runEngineSteps(steps, {
      ...(options.stagingBytes !== undefined ? { stagingBytes: options.stagingBytes } : {}),
      undoLast: options.verify !== undefined,
      checkAbort,
      onDone: (e) => {
        done++;
        bytesDone += e.bytes;
        progress('engine', e.target);
      },
    });
    if (readback !== undefined) {
      const r = executor.checkReadback();
      const unverifiable = executor.unverifiable;
      readbackReport = { verified: unverifiable === 0, unverifiable, ...r };
    }

    tx.commitFallbacks();
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
    executor[Symbol.dispose]();
    return E.left(await tx.rollback(cause));
  }

  // Success: drop the undo state, record what the targets hold now.
  await tx.finish();
  model.setCurrent(stateAfter(plan, model.current));
  progress('done');
  return E.right({
    changed: total,
    bytesMoved: bytesTotal + executor.restagedBytes,
    sourceBytesRead: values.sourceBytesRead(),
    engines: tx.engines,
    fallbacks: tx.fallbacks,
    batches: executor.batches,
    peakStagedBytes: executor.peakStagedBytes,
    verified,
    readback: readbackReport,
    milliseconds: caps.clock() - started,
  });
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
