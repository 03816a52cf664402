/**
 * Command-line options for weight streaming, for the compile and run commands to register:
 *   compile ... --weight-streaming                 build engines whose weights can stream under a budget
 *   run ...     --weight-budget BYTES|PERCENT%|auto the budget to run under (split over engine segments in
 *                                                  proportion to their streamable bytes)
 * A bad budget is a commander usage error (exit code 2 through main's CommanderError handling).
 */
import { InvalidArgumentError, type Command } from 'commander';
import * as E from 'fp-ts/lib/Either.js';
import { describeStreamingError } from '../streaming/streaming.js';
import { parseBudget, type Budget } from '../streaming/budget.js';

export interface StreamingCliOptions {
  /** --weight-streaming: build engines with weight streaming. */
  readonly weightStreaming: boolean;
  /** --weight-budget: undefined when not given (engines keep their budget: nothing streamed). */
  readonly weightBudget: Budget | undefined;
}

/** commander's argument parser for --weight-budget. */
export const parseWeightBudgetOption = (value: string): Budget => {
  const r = parseBudget(value);
  if (E.isLeft(r)) throw new InvalidArgumentError(describeStreamingError(r.left));
  return r.right;
};

/** Adds --weight-streaming (for compile). */
export const registerWeightStreamingOption = (command: Command): Command =>
  command.option('--weight-streaming', 'build engines whose weights can be streamed under a memory budget (see --weight-budget of run)');

/** Adds --weight-budget (for run). */
export const registerWeightBudgetOption = (command: Command): Command =>
  command.option(
    '--weight-budget <budget>',
    "weight memory budget: BYTES (e.g. 536870912 or 512MiB), PERCENT% of the streamable weights, or 'auto'; engines built with --weight-streaming stream what does not fit",
    parseWeightBudgetOption,
  );

/** Registers the streaming options a command takes: `compile` adds --weight-streaming, `run` adds
 *  --weight-budget (both by default). */
export const registerStreamingOptions = (command: Command, which: { readonly compile?: boolean; readonly run?: boolean } = { compile: true, run: true }): Command => {
  if (which.compile === true) registerWeightStreamingOption(command);
  if (which.run === true) registerWeightBudgetOption(command);
  return command;
};

/** The streaming options from a command's parsed options (`command.opts()`). */
export const streamingOptionsOf = (options: { readonly weightStreaming?: unknown; readonly weightBudget?: unknown }): StreamingCliOptions => ({
  weightStreaming: options.weightStreaming === true,
  weightBudget: options.weightBudget as Budget | undefined,
});
