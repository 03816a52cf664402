/**
 * Running a model under a weight streaming budget. A model is one or several engines (segments); a budget
 * for the model is split over them in proportion to their streamable bytes (largest remainder, so the
 * shares sum exactly to the request). Budgets change only when no run is in flight; a change that the
 * engine refuses rolls back the engines already changed, so a model never ends up half changed.
 *
 *   planWeightBudget      pure: budget + what each engine reports -> bytes per engine
 *   applyWeightBudget     sets them, returning a disposable handle that restores the previous budgets
 *   acquireWeightBudget   the same as a Promise (TaskEither form beside it)
 *   withWeightStreaming   runs fn under a budget and restores the previous budgets exactly, also on throw
 */
import * as E from 'fp-ts/lib/Either.js';
import * as TE from 'fp-ts/lib/TaskEither.js';
import { pipe } from 'fp-ts/lib/function.js';
import { apportionBytes } from './apportion.js';
import { budgetFromInput, formatBudget, percentOf, type Budget, type BudgetInput, type InvalidBudget } from './budget.js';

/** What streaming needs of an engine (ffi's Engine has these methods). */
export interface StreamableEngine {
  streamableWeightBytes(): number;
  weightStreamingBudget(): number;
  setWeightStreamingBudget(bytes: number): void;
  automaticWeightStreamingBudget(): number;
}

/** A model: one engine, several, or anything that lists its engine stages (RefitModel does). */
export type StreamingTarget =
  | StreamableEngine
  | readonly StreamableEngine[]
  | { engineStages(): ReadonlyArray<{ readonly engine: StreamableEngine }> }
  | { streamingEngines(): readonly StreamableEngine[] };

export type StreamingErrorDetail =
  | InvalidBudget
  | { readonly _tag: 'BudgetOutOfRange'; readonly bytes: number; readonly streamable: number }
  | { readonly _tag: 'BudgetChangeRefused'; readonly segment: number; readonly detail: string }
  | { readonly _tag: 'RestoreFailed'; readonly segment: number; readonly detail: string };

export const describeStreamingError = (e: StreamingErrorDetail): string => {
  switch (e._tag) {
    case 'InvalidBudget':
      return `invalid weight budget '${e.text}': ${e.reason}`;
    case 'BudgetOutOfRange':
      return `weight budget of ${e.bytes} bytes exceeds the ${e.streamable} streamable bytes of the model`;
    case 'BudgetChangeRefused':
      return `the weight budget of engine segment ${e.segment} cannot change now (budgets change only when no run is in flight); no budget was changed: ${e.detail}`;
    case 'RestoreFailed':
      return `could not restore the previous weight budget of engine segment ${e.segment}: ${e.detail}`;
  }
};

export class WeightStreamingError extends Error {
  override readonly name = 'WeightStreamingError';
  readonly _tag: StreamingErrorDetail['_tag'];
  constructor(
    readonly detail: StreamingErrorDetail,
    options?: { cause?: unknown },
  ) {
    super(describeStreamingError(detail), options);
    this._tag = detail._tag;
  }
}

export const streamingEngines = (target: StreamingTarget): readonly StreamableEngine[] => {
  if (Array.isArray(target)) return target as readonly StreamableEngine[];
  if ('engineStages' in target) return target.engineStages().map((s) => s.engine);
  if ('streamingEngines' in target) return target.streamingEngines();
  return [target as StreamableEngine];
};

/** What an engine reports, for the pure plan. */
export interface EngineReport {
  readonly streamable: number;
  readonly automatic: number;
}

/** The model's budget in bytes: BYTES as given (0 .. total), PERCENT% of the total (rounded down), and
 *  'auto': everything when every engine's automatic budget is its total (it all fits), otherwise the
 *  smallest automatic budget among the engines that do not fit (each estimates the same available memory,
 *  less its own window; the smallest is the safest) capped at the total. */
export const modelBudgetBytes = (budget: Budget, engines: readonly EngineReport[]): E.Either<StreamingErrorDetail, number> => {
  const total = engines.reduce((a, e) => a + e.streamable, 0);
  switch (budget.kind) {
    case 'bytes':
      return budget.bytes <= total ? E.right(budget.bytes) : E.left({ _tag: 'BudgetOutOfRange', bytes: budget.bytes, streamable: total });
    case 'percent':
      return E.right(percentOf(total, budget.percent));
    case 'auto': {
      const short = engines.filter((e) => e.automatic < e.streamable).map((e) => e.automatic);
      return E.right(short.length === 0 ? total : Math.min(total, ...short));
    }
  }
};

/** Bytes per engine for `budget`: shares in proportion to streamable bytes, summing exactly to the
 *  model's budget. Pure. */
export const planWeightBudget = (budget: BudgetInput, engines: readonly EngineReport[]): E.Either<StreamingErrorDetail, number[]> =>
  pipe(
    budgetFromInput(budget),
    E.chainW((b) => modelBudgetBytes(b, engines)),
    E.map((bytes) => (engines.length === 0 ? [] : apportionBytes(bytes, engines.map((e) => e.streamable)))),
  );

const report = (e: StreamableEngine): EngineReport => {
  const streamable = e.streamableWeightBytes();
  return { streamable, automatic: streamable === 0 ? 0 : e.automaticWeightStreamingBudget() };
};

const messageOf = (e: unknown): string => (e instanceof Error ? e.message : String(e));

/** Sets each engine's budget (engines with nothing streamable are left alone); on a refusal, puts back
 *  the engines already changed and reports which segment refused. */
const setBudgets = (engines: readonly StreamableEngine[], budgets: readonly number[], tag: 'BudgetChangeRefused' | 'RestoreFailed'): E.Either<StreamingErrorDetail, void> => {
  const changed: Array<{ engine: StreamableEngine; previous: number }> = [];
  for (let i = 0; i < engines.length; i++) {
    const engine = engines[i];
    if (engine.streamableWeightBytes() === 0) continue;
    const previous = engine.weightStreamingBudget();
    if (previous === budgets[i]) continue;
    try {
      engine.setWeightStreamingBudget(budgets[i]);
      changed.push({ engine, previous });
    } catch (error) {
      for (const c of changed.reverse()) {
        try {
          c.engine.setWeightStreamingBudget(c.previous);
        } catch {
          // It was set a moment ago under the same conditions; nothing better to do than report the first error.
        }
      }
      return E.left({ _tag: tag, segment: i, detail: messageOf(error) });
    }
  }
  return E.right(undefined);
};

/** The budgets in force while it lives; dispose (or restore) puts back the budgets found when it was made. */
export class WeightBudgetHandle implements Disposable {
  #restored = false;
  /** @internal use applyWeightBudget / acquireWeightBudget. */
  constructor(
    private readonly engines: readonly StreamableEngine[],
    /** Bytes per engine now in force. */
    readonly budgets: readonly number[],
    /** Bytes per engine before. */
    readonly previous: readonly number[],
    readonly budget: Budget,
  ) {}

  get restored(): boolean {
    return this.#restored;
  }

  /** Restores the previous budgets; Left when an engine refuses (a run is in flight); then it can be
   *  retried once the run ends. Idempotent. */
  restoreE(): E.Either<StreamingErrorDetail, void> {
    if (this.#restored) return E.right(undefined);
    const r = setBudgets(this.engines, this.previous, 'RestoreFailed');
    if (E.isRight(r)) this.#restored = true;
    return r;
  }

  restore(): void {
    const r = this.restoreE();
    if (E.isLeft(r)) throw new WeightStreamingError(r.left);
  }

  [Symbol.dispose](): void {
    this.restore();
  }

  toString(): string {
    return `weight budget ${formatBudget(this.budget)}: ${this.budgets.join(' + ')} bytes`;
  }
}

/** Sets `budget` on the model now (synchronously); Left, with nothing changed, when it is invalid, out of
 *  range or refused because a run is in flight. */
export const applyWeightBudget = (target: StreamingTarget, budget: BudgetInput): E.Either<StreamingErrorDetail, WeightBudgetHandle> => {
  const engines = streamingEngines(target);
  const parsed = budgetFromInput(budget);
  if (E.isLeft(parsed)) return parsed;
  const previous = engines.map((e) => (e.streamableWeightBytes() === 0 ? 0 : e.weightStreamingBudget()));
  return pipe(
    planWeightBudget(parsed.right, engines.map(report)),
    E.chainFirst((budgets) => setBudgets(engines, budgets, 'BudgetChangeRefused')),
    E.map((budgets) => new WeightBudgetHandle(engines, budgets, previous, parsed.right)),
  );
};

export const acquireWeightBudgetTE = (target: StreamingTarget, budget: BudgetInput): TE.TaskEither<StreamingErrorDetail, WeightBudgetHandle> => async () =>
  applyWeightBudget(target, budget);

/** `using handle = await acquireWeightBudget(model, '25%')`. Rejects with WeightStreamingError. */
export const acquireWeightBudget = async (target: StreamingTarget, budget: BudgetInput): Promise<WeightBudgetHandle> => {
  const r = applyWeightBudget(target, budget);
  if (E.isLeft(r)) throw new WeightStreamingError(r.left);
  return r.right;
};

/** Runs fn with the model under `budget`, then restores every engine's previous budget exactly, whether fn
 *  returned or threw. If fn threw and the restore also failed, the rejection is a RestoreFailed error whose
 *  cause is fn's error. */
export const withWeightStreaming = async <A>(target: StreamingTarget, budget: BudgetInput, fn: (handle: WeightBudgetHandle) => A | Promise<A>): Promise<A> => {
  const handle = await acquireWeightBudget(target, budget);
  let result: A;
  try {
    result = await fn(handle);
  } catch (error) {
    const restored = handle.restoreE();
    if (E.isLeft(restored)) throw new WeightStreamingError(restored.left, { cause: error });
    throw error;
  }
  handle.restore();
  return result;
};

/** TaskEither form: fn's own failure is its Left. */
export const withWeightStreamingTE = <L, A>(
  target: StreamingTarget,
  budget: BudgetInput,
  fn: (handle: WeightBudgetHandle) => TE.TaskEither<L, A>,
): TE.TaskEither<StreamingErrorDetail | L, A> =>
  pipe(
    acquireWeightBudgetTE(target, budget),
    TE.chainW((handle) => async () => {
      let r: E.Either<L, A>;
      try {
        r = await fn(handle)();
      } catch (error) {
        const restored = handle.restoreE();
        if (E.isLeft(restored)) throw new WeightStreamingError(restored.left, { cause: error });
        throw error;
      }
      const restored = handle.restoreE();
      return E.isLeft(restored) ? E.left<StreamingErrorDetail | L, A>(restored.left) : r;
    }),
  );
