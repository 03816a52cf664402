/**
 * The public API's one error union and class. It wraps the stages' own tagged details (compile, model
 * file, checkpoint, adapter, effect, run) and adds what only the API layer says (aborted, disposed).
 * `TrtRefitError._tag` is the innermost tag (UnmappedWeights, ModelFileInvalid, PlanHasErrors, ...), so a
 * caller can switch on it without unwrapping; `stage` names the wrapper.
 */
import { describeRefitFilesError, type RefitFilesErrorDetail } from '../effect/files.js';
import type { ModelRunErrorDetail } from '../model/model.js';

export type ApiErrorDetail =
  | RefitFilesErrorDetail
  | { readonly _tag: 'Run'; readonly detail: ModelRunErrorDetail }
  | { readonly _tag: 'RunFailed'; readonly detail: string }
  | { readonly _tag: 'Aborted'; readonly operation: 'compile' | 'load' | 'refit' }
  | { readonly _tag: 'Disposed' };

const runMessage = (d: ModelRunErrorDetail): string =>
  d._tag === 'MissingModelInput' ? `no value for model input '${d.input}'`
  : d._tag === 'InputMismatch' ? `model input '${d.input}': expected ${d.expected}, found ${d.found}`
  : 'the model was disposed';

export const describeApiError = (e: ApiErrorDetail): string =>
  e._tag === 'Run' ? runMessage(e.detail)
  : e._tag === 'RunFailed' ? `running the model failed: ${e.detail}`
  : e._tag === 'Aborted' ? `${e.operation} aborted; nothing was changed`
  : e._tag === 'Disposed' ? 'the model was disposed'
  : describeRefitFilesError(e);

export class TrtRefitError extends Error {
  override readonly name = 'TrtRefitError';
  /** The innermost tag: what went wrong. */
  readonly _tag: string;
  /** The outer tag: which step (Compile, ModelFile, Checkpoint, Adapter, Effect, Tensors, Run, RunFailed, Aborted, Disposed). */
  readonly stage: ApiErrorDetail['_tag'];
  constructor(readonly detail: ApiErrorDetail) {
    super(describeApiError(detail));
    this.stage = detail._tag;
    this._tag = 'detail' in detail && typeof detail.detail === 'object' ? detail.detail._tag : detail._tag;
  }
}
