/**
 * The refit's undo log: all or nothing across a model's engines and fallbacks.
 *
 * - Fallbacks: new model bytes and sessions are prepared (every check happens there) and held here; they are
 *   swapped in only by `commitFallbacks`, after every engine is in, and swapped back by a rollback.
 * - Engines: before an engine's first apply its state is kept (`keep`): the .trtr blob it was read from when
 *   the engine is unchanged since, otherwise a snapshot file written by libtrtshim. A rollback restores every
 *   engine applied since (`applied`), with a fresh execution context.
 * - A rollback that cannot restore an engine turns the cause into RollbackFailed (the model is then in an
 *   unknown state). On success `finish` drops the undo state and clears the origins of changed engines.
 */
import { stat } from 'node:fs/promises';
import { FallbackRunner, type PreparedFallback } from '../model/fallback.js';
import { sameIdentity } from '../model/file.js';
import type { EngineStage, FallbackStage, RefitModel } from '../model/model.js';
import type { Snapshot, SnapshotStore } from './capabilities.js';
import { describeEffectError, fail, messageOf, type EffectErrorDetail } from './errors.js';

export class Transaction {
  readonly #model: RefitModel;
  readonly #snapshots: SnapshotStore;
  /** Fallbacks prepared, not swapped in yet. */
  readonly #prepared = new Map<number, PreparedFallback>();
  /** Previous state of committed fallbacks. */
  readonly #committed = new Map<number, PreparedFallback>();
  readonly #undo = new Map<number, Snapshot>();
  /** Engines applied, in order. */
  readonly #touched: number[] = [];

  constructor(model: RefitModel, snapshots: SnapshotStore) {
    this.#model = model;
    this.#snapshots = snapshots;
  }

  get engines(): readonly number[] {
    return this.#touched;
  }
  get fallbacks(): readonly number[] {
    return [...this.#committed.keys()];
  }

  /** Holds a fallback's prepared state until commit (or discards it on rollback). */
  prepareFallback(segment: number, prepared: PreparedFallback): void {
    this.#prepared.set(segment, prepared);
  }

  /** True when the engine's state before the refit is kept already. */
  kept(segment: number): boolean {
    return this.#undo.has(segment);
  }

  /** Keeps an engine's state for undo, once, before its first apply (EngineRefitFailed when it cannot). */
  async keep(segment: number): Promise<void> {
    if (this.#undo.has(segment)) return;
    const s = this.#model.stage(segment) as EngineStage;
    try {
      const origin = s.origin;
      const usable = origin !== undefined && sameIdentity(await stat(origin.path).then((st) => ({ dev: st.dev, ino: st.ino, size: st.size, mtimeMs: st.mtimeMs })), origin.identity);
      this.#undo.set(segment, usable ? this.#snapshots.fromOrigin(origin!) : await this.#snapshots.save(segment, s.engine));
    } catch (e) {
      fail({ _tag: 'EngineRefitFailed', segment, detail: `cannot keep the engine's state for undo: ${messageOf(e)}` });
    }
  }

  /** Records that an engine was changed (a rollback restores it). */
  applied(segment: number): void {
    if (!this.#touched.includes(segment)) this.#touched.push(segment);
  }

  /** Swaps every prepared fallback in, keeping the previous state for a rollback. */
  commitFallbacks(): void {
    for (const [segment, p] of this.#prepared) {
      this.#committed.set(segment, (this.#model.stage(segment) as FallbackStage).runner.commit(p));
      this.#prepared.delete(segment);
    }
  }

  /** Puts everything back; the cause, or RollbackFailed when an engine could not be restored. */
  async rollback(cause: EffectErrorDetail): Promise<EffectErrorDetail> {
    for (const p of this.#prepared.values()) FallbackRunner.discard(p);
    this.#prepared.clear();
    for (const [segment, previous] of this.#committed) {
      const stage = this.#model.stage(segment) as FallbackStage;
      FallbackRunner.discard(stage.runner.commit(previous));
    }
    this.#committed.clear();
    const problems: string[] = [];
    for (const segment of this.#touched) {
      const stage = this.#model.stage(segment) as EngineStage;
      const snapshot = this.#undo.get(segment);
      try {
        if (snapshot === undefined) throw new Error('its state was not kept');
        const engine = await snapshot.restore();
        const context = engine.createContext();
        stage.context[Symbol.dispose]();
        stage.engine[Symbol.dispose]();
        stage.engine = engine;
        stage.context = context;
      } catch (e) {
        problems.push(`engine segment ${segment}: ${messageOf(e)}`);
      }
    }
    this.#touched.length = 0;
    await this.#discardUndo();
    return problems.length === 0 ? cause : { _tag: 'RollbackFailed', cause: describeEffectError(cause), detail: problems.join('; ') };
  }

  /** Success: drops the undo state; changed engines no longer equal the blobs they were read from. */
  async finish(): Promise<void> {
    for (const previous of this.#committed.values()) FallbackRunner.discard(previous);
    await this.#discardUndo();
    for (const segment of this.#touched) (this.#model.stage(segment) as EngineStage).origin = undefined;
  }

  async #discardUndo(): Promise<void> {
    for (const s of this.#undo.values()) await s.discard().catch(() => undefined);
    this.#undo.clear();
  }
}
