/**
 * Running a compiled model under a weight streaming budget: the budget is split over the model's engine
 * segments in proportion to their streamable bytes (src/streaming), set for the run, and the previous
 * budgets are put back afterwards, also when the run fails. Outputs do not depend on the budget.
 */
import * as E from 'fp-ts/lib/Either.js';
import * as TE from 'fp-ts/lib/TaskEither.js';
import type { Tensor, TensorData } from '../trace/ir.js';
import { describeStreamingError, withWeightStreaming, WeightStreamingError, type StreamingErrorDetail } from '../streaming/streaming.js';
import { budgetFromInput, formatBudget, type BudgetInput } from '../streaming/budget.js';
import type { RefitModel } from './model.js';

export interface RunOptions {
  /** A weight budget for this run (BYTES, 'PERCENT%' or 'auto'); absent: the engines keep theirs. */
  readonly weightBudget?: BudgetInput;
}

export type RunBudgetErrorDetail = StreamingErrorDetail | { readonly _tag: 'NotStreaming'; readonly budget: string };

export const describeRunBudgetError = (e: RunBudgetErrorDetail): string =>
  e._tag === 'NotStreaming'
    ? `a weight budget (${e.budget}) was given, but no engine of the model streams its weights (compile it with --weight-streaming / weightStreaming: true)`
    : describeStreamingError(e);

export class RunBudgetError extends Error {
  override readonly name = 'RunBudgetError';
  readonly _tag: RunBudgetErrorDetail['_tag'];
  constructor(readonly detail: RunBudgetErrorDetail) {
    super(describeRunBudgetError(detail));
    this._tag = detail._tag;
  }
}

/** Bytes the model's engines can stream in all (0: none was built with weight streaming). */
export const streamableBytes = (model: RefitModel): number => model.engineStages().reduce((sum, s) => sum + s.engine.streamableWeightBytes(), 0);

/** The budget a run was made under. */
export interface RunBudgetReport {
  readonly requested: string;
  /** Bytes per engine segment in force during the run (summing to the model's budget). */
  readonly engineBytes: readonly number[];
  readonly streamableBytes: number;
}

/** Runs the model, under `options.weightBudget` when given, and says which budget was in force. Rejects
 *  with RunBudgetError when the budget is invalid, out of range, or the model has nothing to stream; with
 *  the model's own errors otherwise. */
export const runModelWithReport = async (
  model: RefitModel,
  inputs: Readonly<Record<string, Tensor | TensorData>>,
  options: RunOptions = {},
): Promise<{ readonly outputs: Record<string, Tensor>; readonly budget?: RunBudgetReport }> => {
  if (options.weightBudget === undefined) return { outputs: await model.run(inputs) };
  const budget = budgetFromInput(options.weightBudget);
  if (E.isLeft(budget)) throw new RunBudgetError(budget.left);
  const streamable = streamableBytes(model);
  if (streamable === 0) throw new RunBudgetError({ _tag: 'NotStreaming', budget: formatBudget(budget.right) });
  try {
    return await withWeightStreaming(model, budget.right, async (handle) => ({
      outputs: await model.run(inputs),
      budget: { requested: formatBudget(budget.right), engineBytes: [...handle.budgets], streamableBytes: streamable },
    }));
  } catch (e) {
    // The budget's own failures (out of range, refused) become this module's error; the run's pass through.
    if (e instanceof WeightStreamingError) throw new RunBudgetError(e.detail);
    throw e;
  }
};

/** runModelWithReport's outputs. */
export const runModel = async (model: RefitModel, inputs: Readonly<Record<string, Tensor | TensorData>>, options: RunOptions = {}): Promise<Record<string, Tensor>> =>
  (await runModelWithReport(model, inputs, options)).outputs;

/** TaskEither form: the budget's failures, or the run's own failure as RunFailed. */
export const runModelTE = (
  model: RefitModel,
  inputs: Readonly<Record<string, Tensor | TensorData>>,
  options: RunOptions = {},
): TE.TaskEither<RunBudgetErrorDetail | { readonly _tag: 'RunFailed'; readonly detail: string }, Record<string, Tensor>> =>
  TE.tryCatch(
    () => runModel(model, inputs, options),
    (e) => (e instanceof RunBudgetError ? e.detail : { _tag: 'RunFailed' as const, detail: e instanceof Error ? e.message : String(e) }),
  );
