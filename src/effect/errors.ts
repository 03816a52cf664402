/**
 * The effect's tagged errors, and the internal `fail` the transaction and the executor throw with (caught
 * once, by executePlanTE, which undoes everything and returns the detail).
 */
import { describeProblem, type PlanProblem } from '../plan/plan.js';

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
  | { readonly _tag: 'QuantizedMismatch'; readonly tensor: string; readonly target: string; readonly detail: string }
  /** Internal error: an engine's refitter needs weights the plan does not stage with the batch (a fused
   *  group the plan was not told about). The effect never adds weights of its own. */
  | { readonly _tag: 'PlanIncomplete'; readonly segment: number; readonly weights: readonly string[]; readonly staged: readonly string[] }
  /** After apply, an engine reports holding other values than were staged (or cannot report at all). */
  | { readonly _tag: 'ReadbackMismatch'; readonly segment: number; readonly target: string; readonly expected: string; readonly found: string };

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
    case 'PlanIncomplete':
      return `internal error: engine segment ${e.segment} needs ${e.weights.join(', ')} staged too (fused with ${e.staged.join(', ')}), and the plan does not restage them ` +
        `(was it made without the engines' fused groups? plan with planForRefit, or pass fusedGroupsOf(model) to planRefit); nothing was changed`;
    case 'ReadbackMismatch':
      return `engine segment ${e.segment}: after the refit, ${e.target} holds values with digest ${e.found}; ${e.expected} was staged; the refit was undone`;
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

/** @internal thrown inside the effect; executePlanTE turns it into a Left after undoing everything. */
export class Failure {
  constructor(readonly detail: EffectErrorDetail) {}
}
/** @internal */
export const fail = (detail: EffectErrorDetail): never => {
  throw new Failure(detail);
};
/** @internal */
export const messageOf = (e: unknown): string => (e instanceof Error ? e.message : String(e));
