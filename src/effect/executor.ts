/**
 * The executor of a plan's steps. It decides nothing: what to stage with what is the plan's (entries and
 * their `restage` lists); undo is the transaction's.
 *
 * - Fallback segments: each segment's new values are evaluated and its new model bytes built and a session
 *   opened on them (every check happens there); the transaction holds them until commit.
 * - Engine steps, in run order: a changed target with the members of its fused groups the plan restages.
 *   Values are staged into refitters in batches of at most `stagingBytes` (default: twice the largest step),
 *   because a refitter keeps pointers to staged values until apply; a step is never split across batches.
 *   Values that are views of the checkpoint (identity, reshape) or of tensors already in memory count
 *   nothing. A batch is checked against the refitters' `missing()` (a weight the plan did not stage with it
 *   is an internal error, PlanIncomplete: nothing is added behind the plan's back), validated on every engine
 *   it touches, each engine's state is kept for undo before its first apply, then applied. When everything
 *   fits one batch, every engine is validated before any is applied. Extra memory is the batch plus one
 *   tensor being evaluated.
 * - Read-back: while a value is staged, the digest its engine should report for it is noted; after the last
 *   apply every engine reports what it holds and each staged weight must match (ReadbackMismatch).
 */
import type { QuantizedWeights } from '../../ffi/engine.js';
import type { EngineStage, FallbackStage, RefitModel } from '../model/model.js';
import type { WeightRole } from '../network/types.js';
import type { PlanEntry, RefitPlan } from '../plan/plan.js';
import type { EffectCapabilities, ReadbackCapability, RefitterLike, StagedValue } from './capabilities.js';
import { fail, messageOf } from './errors.js';
import type { Transaction } from './transaction.js';
import type { TargetValues } from './values.js';

/** One engine step: a changed target and the members of its fused groups staged with it. */
export interface EngineStep {
  readonly segment: number;
  readonly entry: PlanEntry;
  readonly restage: readonly PlanEntry[];
  /** Bytes of the entry and its restaged members. */
  readonly bytes: number;
}

/** The plan's engine work in the model's run order (then by target), with restage lists resolved to the
 *  plan's own entries (PlanMismatch when one names no engine target of the same segment). */
export const engineSteps = (model: RefitModel, plan: RefitPlan): EngineStep[] => {
  const order = new Map(model.stages.map((s, i) => [s.record.index, i]));
  const byId = new Map(plan.entries.map((e) => [e.target, e]));
  return plan.entries
    .filter((e) => e.changed && e.kind === 'engine')
    .sort((a, b) => order.get(a.segment)! - order.get(b.segment)! || (a.target < b.target ? -1 : 1))
    .map((entry) => {
      const restage = (entry.restage ?? []).map((id) => {
        const member = byId.get(id);
        if (member === undefined || member.kind !== 'engine' || member.segment !== entry.segment) {
          return fail({ _tag: 'PlanMismatch', target: entry.target, reason: `it restages '${id}', which is no engine weight of segment ${entry.segment} in the plan` });
        }
        return member;
      });
      return { segment: entry.segment, entry, restage, bytes: entry.bytes + restage.reduce((s, m) => s + m.bytes, 0) };
    });
};

const keyOf = (layer: string, role: string) => `${layer}\u0000${role}`;

export interface ReadbackResult {
  /** Weights compared. */
  readonly targets: number;
  /** Time spent on the check: expected digests of staged values, engines' digests, comparison. */
  readonly milliseconds: number;
}

export class Executor implements Disposable {
  readonly #model: RefitModel;
  readonly #values: TargetValues;
  readonly #tx: Transaction;
  readonly #caps: EffectCapabilities;
  readonly #readback: ReadbackCapability | undefined;
  /** Refitters of the open batch, by segment, with the weights staged in each. */
  readonly #open = new Map<number, { readonly refitter: RefitterLike; readonly staged: Map<string, string> }>();
  /** Per engine, per staged weight: its target and the digest expected after apply. */
  readonly #expected = new Map<number, Map<string, { readonly target: string; readonly digest: string | undefined }>>();
  #staged = 0;
  #readbackMs = 0;
  batches = 0;
  peakStagedBytes = 0;
  /** Bytes staged for restaged members (beyond the changed targets). */
  restagedBytes = 0;

  constructor(model: RefitModel, values: TargetValues, tx: Transaction, caps: EffectCapabilities, readback: ReadbackCapability | undefined) {
    this.#model = model;
    this.#values = values;
    this.#tx = tx;
    this.#caps = caps;
    this.#readback = readback;
  }

  // ---- fallbacks ----

  /** Evaluates each fallback segment's changed tensors and prepares its new state (held by the transaction). */
  async prepareFallbacks(entries: readonly PlanEntry[], checkAbort: () => void, onDone: (e: PlanEntry) => void): Promise<void> {
    for (const segment of [...new Set(entries.map((e) => e.segment))]) {
      const updates = new Map<string, Float32Array>();
      for (const e of entries.filter((x) => x.segment === segment)) {
        checkAbort();
        updates.set(e.tensor!, this.#values.evaluate(e.target, e.expr, e.shape));
        onDone(e);
      }
      const stage = this.#model.stage(segment) as FallbackStage;
      try {
        this.#tx.prepareFallback(segment, await stage.runner.prepare(updates, this.#caps.openSession));
      } catch (e) {
        fail({ _tag: 'FallbackRefitFailed', segment, detail: messageOf(e) });
      }
    }
  }

  // ---- engines ----

  /** Runs the engine steps in bounded batches. `undoLast`: keep undo state for the model's very last apply
   *  too (needed when a check follows it, as the read-back does when it compares anything; otherwise a
   *  failed last apply changes nothing by itself). */
  async runEngineSteps(steps: readonly EngineStep[], options: { readonly stagingBytes?: number; readonly undoLast: boolean; readonly checkAbort: () => void; readonly onDone: (e: PlanEntry) => void }): Promise<void> {
    const budget = options.stagingBytes ?? 2 * Math.max(0, ...steps.map((s) => s.bytes));
    for (const step of steps) {
      options.checkAbort();
      const pending = [step.entry, ...step.restage].filter((e) => !this.#isStaged(e));
      const bytes = pending.reduce((s, e) => s + e.bytes, 0);
      if (this.#staged > 0 && this.#staged + bytes > budget) await this.#flush(false, options.undoLast);
      for (const e of [step.entry, ...step.restage]) {
        if (this.#isStaged(e)) continue;
        this.#stageTarget(e);
        if (e !== step.entry) this.restagedBytes += e.bytes;
      }
      options.onDone(step.entry);
    }
    options.checkAbort();
    await this.#flush(true, options.undoLast);
  }

  #isStaged(e: PlanEntry): boolean {
    return this.#open.get(e.segment)?.staged.has(keyOf(e.layer!, e.role!)) ?? false;
  }

  #refitterFor(segment: number): { readonly refitter: RefitterLike; readonly staged: Map<string, string> } {
    let open = this.#open.get(segment);
    if (open === undefined) {
      const stage = this.#model.stage(segment) as EngineStage;
      let refitter: RefitterLike;
      try {
        refitter = this.#caps.refitter(segment, stage.engine);
        // Checked once, by TargetValues.evaluate: the native check would scan every value again in
        // set_weights, validate and apply.
        refitter.setCheckFinite(false);
      } catch (e) {
        return fail({ _tag: 'EngineRefitFailed', segment, detail: messageOf(e) });
      }
      open = { refitter, staged: new Map() };
      this.#open.set(segment, open);
    }
    return open;
  }

  /** Stages one target: a decided quantized copy as it is, anything else evaluated over the checkpoint. */
  #stageTarget(e: PlanEntry): void {
    const layer = e.layer!;
    const role = e.role as WeightRole;
    const copy = this.#values.copyOf(e.target);
    if (copy !== undefined) this.#stageCopy(e, layer, role, copy);
    else this.#stageFloat(e, layer, role, this.#values.evaluate(e.target, e.expr, e.shape));
  }

  #stageCopy(e: PlanEntry, layer: string, role: WeightRole, q: QuantizedWeights): void {
    const { refitter, staged } = this.#refitterFor(e.segment);
    if (refitter.setQuantizedWeights === undefined) return fail({ _tag: 'EngineRefitFailed', segment: e.segment, detail: 'this refitter cannot take quantized weights' });
    try {
      refitter.setQuantizedWeights(layer, role, q);
    } catch (x) {
      fail({ _tag: 'EngineRefitFailed', segment: e.segment, detail: messageOf(x) });
    }
    staged.set(keyOf(layer, role), e.target);
    this.#noteExpected(e, { kind: 'quantized', layer, role, weights: q });
    // Values are views of the checkpoint; scales (and converted zero points) are small copies.
    this.#count(q.scales.byteLength);
  }

  #stageFloat(e: PlanEntry, layer: string, role: WeightRole, data: Float32Array): void {
    const { refitter, staged } = this.#refitterFor(e.segment);
    try {
      refitter.setWeights(layer, role, { dtype: 'float32', shape: e.shape, data });
    } catch (x) {
      fail({ _tag: 'EngineRefitFailed', segment: e.segment, detail: messageOf(x) });
    }
    staged.set(keyOf(layer, role), e.target);
    this.#noteExpected(e, { kind: 'float', layer, role, shape: e.shape, data });
    // Views of the checkpoint (or of merged tensors already in memory) cost nothing to keep staged.
    this.#count(this.#values.isView(data) ? 0 : data.byteLength);
  }

  #count(bytes: number): void {
    this.#staged += bytes;
    this.peakStagedBytes = Math.max(this.peakStagedBytes, this.#staged);
  }

  /** The digest the engine should report for a staged value, computed while the value is in memory. */
  #noteExpected(e: PlanEntry, value: StagedValue): void {
    if (this.#readback === undefined) return;
    const started = this.#caps.clock();
    const engine = (this.#model.stage(e.segment) as EngineStage).engine;
    let digest: string | undefined;
    try {
      digest = this.#readback.expectedDigest(e.segment, engine, value);
    } catch (x) {
      return fail({ _tag: 'EngineRefitFailed', segment: e.segment, detail: `cannot compute the digest expected of ${e.target}: ${messageOf(x)}` });
    } finally {
      this.#readbackMs += this.#caps.clock() - started;
    }
    let perEngine = this.#expected.get(e.segment);
    if (perEngine === undefined) this.#expected.set(e.segment, (perEngine = new Map()));
    perEngine.set(keyOf(value.layer, value.role), { target: e.target, digest });
  }

  /** Staged engine weights whose expected digest could not be told (not compared by the read-back). */
  get unverifiable(): number {
    let n = 0;
    for (const perEngine of this.#expected.values()) for (const { digest } of perEngine.values()) if (digest === undefined) n++;
    return n;
  }

  async #flush(last: boolean, undoLast: boolean): Promise<void> {
    if (this.#open.size === 0) return;
    this.batches++;
    // The plan staged every weight fused with a staged one; a refitter that still misses some means the plan
    // was made without this engine's fused groups.
    for (const [segment, { refitter, staged }] of this.#open) {
      let missing: Array<{ layer: string; role: WeightRole }>;
      try {
        missing = refitter.missing();
      } catch (e) {
        return fail({ _tag: 'EngineRefitFailed', segment, detail: messageOf(e) });
      }
      if (missing.length > 0) {
        fail({ _tag: 'PlanIncomplete', segment, weights: missing.map((m) => `${m.layer} (${m.role})`), staged: [...staged.values()] });
      }
    }
    for (const [segment, { refitter }] of this.#open) {
      try {
        refitter.validate();
      } catch (e) {
        fail({ _tag: 'EngineRefitFailed', segment, detail: messageOf(e) });
      }
    }
    // Keep what each engine holds before its first apply. The model's very last apply needs no undo of its
    // own (a failed apply changes nothing), unless a check may still reject the whole refit.
    const segments = [...this.#open.keys()];
    const checked = undoLast || [...this.#expected.values()].some((m) => [...m.values()].some((x) => x.digest !== undefined));
    const lastApply = last && !checked ? segments[segments.length - 1] : undefined;
    for (const segment of segments) if (segment !== lastApply) await this.#tx.keep(segment);
    for (const [segment, { refitter }] of this.#open) {
      try {
        refitter.apply();
      } catch (e) {
        // A failed apply leaves its engine as it was; engines applied before it are undone.
        fail({ _tag: 'EngineRefitFailed', segment, detail: messageOf(e) });
      }
      this.#tx.applied(segment);
    }
    this.#closeOpen();
  }

  #closeOpen(): void {
    for (const { refitter } of this.#open.values()) refitter[Symbol.dispose]();
    this.#open.clear();
    this.#staged = 0;
  }

  // ---- read-back ----

  /** Every engine reports the digests of what it holds; each weight staged must hold what was staged. */
  checkReadback(): ReadbackResult {
    const readback = this.#readback;
    if (readback === undefined) return { targets: 0, milliseconds: 0 };
    const started = this.#caps.clock();
    let targets = 0;
    try {
      for (const [segment, expected] of this.#expected) {
        const engine = (this.#model.stage(segment) as EngineStage).engine;
        let held: ReadonlyMap<string, string> | undefined;
        let why = 'the engine reports no digests';
        try {
          // Only the weights this refit staged are read back: a refit that changes a few weights pays for those.
          held = readback.engineDigests(segment, engine, new Set(expected.keys()));
        } catch (e) {
          why = `the engine cannot report digests: ${messageOf(e)}`;
        }
        if ([...expected.values()].every((x) => x.digest === undefined)) continue;
        for (const [key, { target, digest }] of expected) {
          if (digest === undefined) continue;
          const found = held?.get(key);
          if (found !== digest) fail({ _tag: 'ReadbackMismatch', segment, target, expected: digest, found: found ?? (held === undefined ? `none (${why})` : 'none (the engine reports no such weight)') });
          targets++;
        }
      }
    } finally {
      this.#readbackMs += this.#caps.clock() - started;
    }
    return { targets, milliseconds: this.#readbackMs };
  }

  /** Drops refitters of a batch not applied (on failure). */
  [Symbol.dispose](): void {
    this.#closeOpen();
  }
}
