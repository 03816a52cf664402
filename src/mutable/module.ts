/**
 * MutableModule: a compiled model whose weights look like a PyTorch state dict. `set`, `loadStateDict`
 * and `mergeLora` change the state dict only; changes are tracked per tensor, and the next `run` (or an
 * explicit `refit()`) brings the engines up to date:
 *
 *   - same names, dtypes and shapes as the compiled model  -> refit: only the weights whose expressions
 *     read a changed tensor are planned, and of those only the ones whose digest differs move;
 *   - a name added or removed, or a shape or dtype changed  -> recompile through the compiler capability
 *     (the cache, where the caller wires one in), then refit the new model to the state dict.
 *
 * Each decision is reported (the `onUpdate` callback and the `update` field of a run's result). A failed
 * refit or recompile leaves the engines as they were (the effect is all or nothing; a new model is
 * dropped) and keeps the changes pending, so `discardChanges()` or another `set` can fix them.
 *
 * Sources: an ONNX file with its build checkpoint (a compile always builds from the ONNX file's own
 * weights and is then refitted: the graph fixes weight shapes, so a shape change the graph does not allow
 * is refused by the plan with the tensor named), or a network written with the network API as a function
 * of the state dict (a recompile builds the network of the current state, so shapes may change).
 */
import * as E from 'fp-ts/lib/Either.js';
import { openCheckpointTE } from '../checkpoint/checkpoint.js';
import { describeCheckpointIssue } from '../checkpoint/errors.js';
import { compile, compileNetwork, CompileError, type CompileOptions } from '../compile/index.js';
import { defaultMerge, type EffectCapabilities } from '../effect/capabilities.js';
import { fusedGroupsOf } from '../effect/groups.js';
import { describeEffectError, executePlanTE, type EffectErrorDetail, type RefitReport } from '../effect/effect.js';
import { baseWeightOf, describeLoraError } from '../lora/lora.js';
import { openLoraTE } from '../lora/open.js';
import type { RefitModel } from '../model/model.js';
import type { NetworkDefinition, WeightRole } from '../network/types.js';
import { planRefit } from '../plan/plan.js';
import type { Tensor, TensorData } from '../trace/ir.js';
import { exprSources } from '../weightmap/expr.js';
import { normalizeTensor, signatureChange, signatureOf, stateFromStore, stateStore, type StateDict, type StateErrorDetail, type StateTensor, type TensorInput } from './state.js';

export type ModuleSource =
  | {
      readonly kind: 'onnx';
      /** The ONNX file: kept, so a recompile can read it again. */
      readonly onnx: string;
      /** The checkpoint the ONNX file was exported with (the build checkpoint; the initial state dict). */
      readonly weights: string;
      readonly options?: CompileOptions;
    }
  | {
      readonly kind: 'network';
      /** The network for a state dict (its weights taken from it). */
      readonly network: (state: StateDict) => NetworkDefinition;
      /** Checkpoint name of a weight (default: PyTorch naming, `<layer>.weight` / `<layer>.bias`). */
      readonly sourceOf?: (layer: string, role: WeightRole) => string | undefined;
      readonly options?: CompileOptions;
    };

/**
 * Compiles a source for a state dict. The result may hold any weights its `current` digests describe (a
 * cache hit, the ONNX file's own weights): the module refits it to the state dict afterwards.
 */
export type ModuleCompiler = (source: ModuleSource, state: StateDict) => Promise<RefitModel>;

/** src/compile, without a cache: compile() for ONNX files, compileNetwork() for networks. Rejects with CompileError. */
export const defaultCompiler: ModuleCompiler = async (source, state) => {
  if (source.kind === 'onnx') return compile(source.onnx, source.weights, source.options ?? {});
  const built = compileNetwork(source.network(state), stateStore(state), { ...(source.options ?? {}), ...(source.sourceOf ? { sourceOf: source.sourceOf } : {}) });
  if (E.isLeft(built)) throw new CompileError(built.left);
  return built.right;
};

export type UpdateDecision = 'none' | 'refit' | 'recompile';

export interface UpdateReport {
  readonly decision: UpdateDecision;
  /** Why: the tensors that changed, or what changed in the names and shapes. */
  readonly reason: string;
  /** State dict tensors changed since the last update, sorted. */
  readonly tensors: readonly string[];
  /** Engine and fallback weights whose values moved. */
  readonly weightsMoved: number;
  readonly bytesMoved: number;
  readonly milliseconds: number;
  /** The effect's report of the refit (of the new model, after a recompile). */
  readonly refit?: RefitReport;
}

export interface ModuleRunResult {
  readonly outputs: Record<string, Tensor>;
  /** What the run did first: undefined when nothing was pending (or automatic refits are off). */
  readonly update: UpdateReport | undefined;
}

export interface MutableModuleOptions {
  /** How to compile (default: src/compile without a cache; pass one that goes through the cache). */
  readonly compiler?: ModuleCompiler;
  /** Called with every update decision. */
  readonly onUpdate?: (report: UpdateReport) => void;
  /** Bring the engines up to date before each run (default true); otherwise only refit() does. */
  readonly autoRefit?: boolean;
  /** The effect's capabilities (progress, snapshots, transforms), for tests and progress bars. */
  readonly capabilities?: Partial<EffectCapabilities>;
}

export type MutableModuleErrorDetail =
  | StateErrorDetail
  | { readonly _tag: 'UnknownTensor'; readonly name: string }
  | { readonly _tag: 'KeyMismatch'; readonly missing: readonly string[]; readonly unexpected: readonly string[] }
  | { readonly _tag: 'OpenFailed'; readonly path: string; readonly detail: string }
  | { readonly _tag: 'AdapterFailed'; readonly path: string; readonly detail: string }
  | { readonly _tag: 'CompileFailed'; readonly reason: string; readonly detail: string }
  | { readonly _tag: 'RefitFailed'; readonly decision: 'refit' | 'recompile'; readonly detail: EffectErrorDetail }
  | { readonly _tag: 'Aborted' }
  | { readonly _tag: 'Disposed' };

const list = (names: readonly string[]): string => (names.length <= 8 ? names.map((n) => `'${n}'`).join(', ') : `${names.slice(0, 8).map((n) => `'${n}'`).join(', ')} and ${names.length - 8} more`);

export const describeMutableModuleError = (e: MutableModuleErrorDetail): string => {
  switch (e._tag) {
    case 'InvalidTensor': return `tensor '${e.name}': ${e.detail}`;
    case 'UnsupportedDtype': return `tensor '${e.name}': dtype ${e.dtype} is not supported in a state dict (give float32 values)`;
    case 'UnknownTensor': return `the state dict has no tensor '${e.name}'`;
    case 'KeyMismatch': return `loadStateDict (strict): ${e.missing.length > 0 ? `missing ${list(e.missing)}` : ''}${e.missing.length > 0 && e.unexpected.length > 0 ? '; ' : ''}${e.unexpected.length > 0 ? `unexpected ${list(e.unexpected)}` : ''}`;
    case 'OpenFailed': return `${e.path}: ${e.detail}`;
    case 'AdapterFailed': return `${e.path}: ${e.detail}`;
    case 'CompileFailed': return `recompiling (${e.reason}) failed: ${e.detail}`;
    case 'RefitFailed': return `${e.decision === 'recompile' ? 'refitting the recompiled model' : 'refit'} failed; the engines keep their previous weights: ${describeEffectError(e.detail)}`;
    case 'Aborted': return 'the update was aborted; the engines keep their previous weights';
    case 'Disposed': return 'the module was disposed';
  }
};

export class MutableModuleError extends Error {
  override readonly name = 'MutableModuleError';
  readonly _tag: MutableModuleErrorDetail['_tag'];
  constructor(readonly detail: MutableModuleErrorDetail) {
    super(describeMutableModuleError(detail));
    this._tag = detail._tag;
  }
}

const orThrow = <A>(r: E.Either<MutableModuleErrorDetail, A>): A => {
  if (E.isLeft(r)) throw new MutableModuleError(r.left);
  return r.right;
};

export class MutableModule implements Disposable, AsyncDisposable {
  #model: RefitModel;
  #state: Map<string, StateTensor>;
  /** The state dict the engines hold (tensor objects are never changed in place, so references do). */
  #applied: Map<string, StateTensor>;
  /** Names, dtypes and shapes the current model was compiled for. */
  #signature: Map<string, string>;
  readonly #dirty = new Set<string>();
  #queue: Promise<unknown> = Promise.resolve();
  #disposed = false;
  readonly #compiler: ModuleCompiler;

  private constructor(
    readonly source: ModuleSource,
    model: RefitModel,
    state: Map<string, StateTensor>,
    private readonly options: MutableModuleOptions,
  ) {
    this.#model = model;
    this.#state = state;
    this.#applied = new Map(state);
    this.#signature = signatureOf(state);
    this.#compiler = options.compiler ?? defaultCompiler;
  }

  /** Compiles a source, brings it to the initial state dict (the build checkpoint for an ONNX source)
   *  and returns the module. Rejects with MutableModuleError. */
  static async open(source: ModuleSource, initial?: StateDict, options: MutableModuleOptions = {}): Promise<MutableModule> {
    let state: Map<string, StateTensor>;
    if (initial !== undefined) state = new Map([...initial].map(([name, t]) => [name, orThrow(normalizeTensor(name, t))]));
    else if (source.kind === 'onnx') {
      const opened = await openCheckpointTE(source.weights)();
      if (E.isLeft(opened)) throw new MutableModuleError({ _tag: 'OpenFailed', path: source.weights, detail: describeCheckpointIssue(opened.left) });
      try {
        state = orThrow(stateFromStore(opened.right));
      } finally {
        opened.right.close();
      }
    } else throw new MutableModuleError({ _tag: 'OpenFailed', path: 'network', detail: 'a network source needs an initial state dict' });
    const model = await MutableModule.compileFor(source, state, options.compiler ?? defaultCompiler, 'open', options.capabilities ?? {});
    return new MutableModule(source, model.model, state, options);
  }

  /** An ONNX file and the checkpoint it was exported with. */
  static fromOnnx(onnx: string, weights: string, options: MutableModuleOptions & { readonly compile?: CompileOptions } = {}): Promise<MutableModule> {
    return MutableModule.open({ kind: 'onnx', onnx, weights, ...(options.compile ? { options: options.compile } : {}) }, undefined, options);
  }

  /** A network written with the network API, as a function of the state dict. */
  static fromNetwork(
    network: (state: StateDict) => NetworkDefinition,
    state: StateDict,
    options: MutableModuleOptions & { readonly sourceOf?: (layer: string, role: WeightRole) => string | undefined; readonly compile?: CompileOptions } = {},
  ): Promise<MutableModule> {
    return MutableModule.open({ kind: 'network', network, ...(options.sourceOf ? { sourceOf: options.sourceOf } : {}), ...(options.compile ? { options: options.compile } : {}) }, state, options);
  }

  /** Compiles and refits the result to `state`; the model is disposed on failure. */
  private static async compileFor(source: ModuleSource, state: StateDict, compiler: ModuleCompiler, reason: string, caps: Partial<EffectCapabilities>, signal?: AbortSignal): Promise<{ model: RefitModel; refit: RefitReport; moved: number }> {
    let model: RefitModel;
    try {
      model = await compiler(source, state);
    } catch (e) {
      throw new MutableModuleError({ _tag: 'CompileFailed', reason, detail: (e as Error).message });
    }
    const store = stateStore(state);
    const plan = planRefit(model.weightMap, store, { current: model.current, checkFinite: false, fusedGroups: fusedGroupsOf(model) });
    const executed = await executePlanTE(model, plan, store, signal ? { signal } : {}, caps)();
    if (E.isLeft(executed)) {
      model[Symbol.dispose]();
      throw new MutableModuleError({ _tag: 'RefitFailed', decision: 'recompile', detail: executed.left });
    }
    return { model, refit: executed.right, moved: plan.totals.changed };
  }

  /** The compiled model now running (replaced by a recompile: do not keep it). */
  get model(): RefitModel {
    return this.#model;
  }
  get inputs() {
    return this.#model.inputs;
  }
  get outputs(): readonly string[] {
    return this.#model.outputs;
  }

  /** A copy of the state dict (changing it changes nothing until loadStateDict). */
  stateDict(): Map<string, StateTensor> {
    return new Map([...this.#state].map(([name, t]) => [name, { dtype: t.dtype, shape: [...t.shape], data: t.data.slice() as TensorData }]));
  }

  /** The tensors, without copies. Read them; change them through `set` (changes made in place are not tracked). */
  *parameters(): IterableIterator<[string, StateTensor]> {
    yield* this.#state;
  }

  /** One tensor (a view, as `parameters`). */
  get(name: string): StateTensor | undefined {
    return this.#state.get(name);
  }

  /** Replaces (or adds) a tensor; the values are copied. A new name or shape makes the next update recompile. */
  set(name: string, tensor: TensorInput): void {
    this.#live();
    this.#state.set(name, orThrow(normalizeTensor(name, tensor)));
    this.#dirty.add(name);
  }

  /** Removes a tensor: the next update recompiles (and fails if the model needs it). */
  delete(name: string): boolean {
    this.#live();
    const had = this.#state.delete(name);
    if (had) this.#dirty.add(name);
    return had;
  }

  /**
   * Loads tensors by name. strict (default): the names must be exactly the module's (nothing is loaded
   * otherwise); not strict: the names both have are loaded, and the others are returned. `replace`: the
   * state dict becomes `dict` (names may change; the next update recompiles).
   */
  loadStateDict(dict: ReadonlyMap<string, TensorInput> | Readonly<Record<string, TensorInput>>, options: { readonly strict?: boolean; readonly replace?: boolean } = {}): { missing: string[]; unexpected: string[] } {
    this.#live();
    const entries = dict instanceof Map ? [...(dict as ReadonlyMap<string, TensorInput>)] : Object.entries(dict as Readonly<Record<string, TensorInput>>);
    const given = new Set(entries.map(([n]) => n));
    const missing = [...this.#state.keys()].filter((n) => !given.has(n)).sort();
    const unexpected = [...given].filter((n) => !this.#state.has(n)).sort();
    if (options.replace !== true && options.strict !== false && (missing.length > 0 || unexpected.length > 0)) throw new MutableModuleError({ _tag: 'KeyMismatch', missing, unexpected });
    // Check every tensor before changing anything.
    const normalized = entries.filter(([n]) => options.replace === true || this.#state.has(n)).map(([n, t]) => [n, orThrow(normalizeTensor(n, t))] as const);
    if (options.replace === true) for (const n of missing) this.delete(n);
    for (const [n, t] of normalized) {
      this.#state.set(n, t);
      this.#dirty.add(n);
    }
    return options.replace === true ? { missing: [], unexpected: [] } : { missing, unexpected };
  }

  /** Merges a LoRA adapter (PEFT directory or Kohya file) into the state dict's base weights, scaled by
   *  `weight`; returns the names it changed. The merge is into the current state: merging twice adds twice. */
  async mergeLora(path: string, weight = 1): Promise<string[]> {
    this.#live();
    const opened = await openLoraTE(path)();
    if (E.isLeft(opened)) throw new MutableModuleError({ _tag: 'AdapterFailed', path, detail: describeLoraError(opened.left) });
    using adapter = opened.right;
    const base = stateStore(this.#state);
    const merged = defaultMerge()(base, [{ adapter, weight }]);
    if (E.isLeft(merged)) throw new MutableModuleError({ _tag: 'AdapterFailed', path, detail: `${describeLoraError(merged.left)} (is the adapter for another model?)` });
    const names = [...new Set(adapter.modules.map((m) => baseWeightOf(m, adapter.format, base)!))].sort();
    const values = names.map((n) => [n, { shape: merged.right.tensors.get(n)!.shape, data: merged.right.toFloat32(n) }] as const);
    for (const [n, t] of values) this.set(n, t);
    return names;
  }

  /** What the next update would do: the changed tensors, and why it would recompile (if it would). */
  get pending(): { readonly tensors: readonly string[]; readonly recompile: string | undefined } {
    return { tensors: [...this.#dirty].sort(), recompile: signatureChange(this.#signature, signatureOf(this.#state)) };
  }

  /** Puts back the state dict the engines hold. */
  discardChanges(): void {
    this.#state = new Map(this.#applied);
    this.#dirty.clear();
  }

  /** Brings the engines up to the state dict now (refit or recompile); rejects with MutableModuleError,
   *  leaving the engines as they were. */
  refit(options: { readonly signal?: AbortSignal } = {}): Promise<UpdateReport> {
    return this.#exclusive(() => this.#update(options.signal));
  }

  /** Runs the model, first bringing the engines up to date when automatic refits are on. */
  run(inputs: Readonly<Record<string, Tensor | TensorData>>, options: { readonly signal?: AbortSignal } = {}): Promise<ModuleRunResult> {
    return this.#exclusive(async () => {
      const pending = this.#dirty.size > 0;
      const update = pending && this.options.autoRefit !== false ? await this.#update(options.signal) : undefined;
      return { outputs: await this.#model.run(inputs), update };
    });
  }

  #live(): void {
    if (this.#disposed) throw new MutableModuleError({ _tag: 'Disposed' });
  }

  /** Updates and runs one at a time, in call order. */
  #exclusive<T>(task: () => Promise<T>): Promise<T> {
    const next = this.#queue.then(() => {
      this.#live();
      return task();
    });
    this.#queue = next.catch(() => undefined);
    return next;
  }

  #report(report: UpdateReport): UpdateReport {
    this.options.onUpdate?.(report);
    return report;
  }

  /** After a successful update of `snapshot`: names changed since the snapshot stay pending. */
  #settle(snapshot: Map<string, StateTensor>, dirty: ReadonlySet<string>): void {
    this.#applied = snapshot;
    for (const n of dirty) if (this.#state.get(n) === snapshot.get(n)) this.#dirty.delete(n);
  }

  async #update(signal?: AbortSignal): Promise<UpdateReport> {
    const started = performance.now();
    if (signal?.aborted) throw new MutableModuleError({ _tag: 'Aborted' });
    const snapshot = new Map(this.#state);
    const dirty = new Set(this.#dirty);
    const tensors = [...dirty].sort();
    const change = signatureChange(this.#signature, signatureOf(snapshot));
    if (change !== undefined) {
      const built = await MutableModule.compileFor(this.source, snapshot, this.#compiler, change, this.options.capabilities ?? {}, signal);
      const previous = this.#model;
      this.#model = built.model;
      previous[Symbol.dispose]();
      this.#signature = signatureOf(snapshot);
      this.#settle(snapshot, dirty);
      return this.#report({ decision: 'recompile', reason: change, tensors, weightsMoved: built.moved, bytesMoved: built.refit.bytesMoved, milliseconds: performance.now() - started, refit: built.refit });
    }
    if (dirty.size === 0) return this.#report({ decision: 'none', reason: 'nothing changed', tensors, weightsMoved: 0, bytesMoved: 0, milliseconds: performance.now() - started });
    const map = this.#model.weightMap;
    const targets = map.targets.filter((t) => t.status === 'mapped' && exprSources(t.expr).some((n) => dirty.has(n)));
    if (targets.length === 0) {
      this.#settle(snapshot, dirty);
      return this.#report({ decision: 'none', reason: `${list(tensors)} feed no weight of the model`, tensors, weightsMoved: 0, bytesMoved: 0, milliseconds: performance.now() - started });
    }
    const store = stateStore(snapshot);
    const plan = planRefit({ ...map, targets }, store, { current: this.#model.current, checkFinite: false, fusedGroups: fusedGroupsOf(this.#model) });
    const executed = await executePlanTE(this.#model, plan, store, signal ? { signal } : {}, this.options.capabilities ?? {})();
    if (E.isLeft(executed)) throw new MutableModuleError(executed.left._tag === 'Aborted' ? { _tag: 'Aborted' } : { _tag: 'RefitFailed', decision: 'refit', detail: executed.left });
    this.#settle(snapshot, dirty);
    return this.#report({
      decision: 'refit', reason: `${dirty.size} tensor(s) changed: ${list(tensors)}`, tensors, weightsMoved: executed.right.changed, bytesMoved: executed.right.bytesMoved,
      milliseconds: performance.now() - started, refit: executed.right,
    });
  }

  get disposed(): boolean {
    return this.#disposed;
  }

  [Symbol.dispose](): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.#model[Symbol.dispose]();
  }

  /** Waits for a running update or run, then disposes. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.#queue;
    this[Symbol.dispose]();
  }
}
