/**
 * The whole path as library calls over files, as the CLI uses them: compile an ONNX file into a .trtr
 * file, plan a refit (a dry run: reads only the .trtr header and the checkpoint), refit (in place or into
 * another file), and run. Promise forms reject with RefitFilesError; TaskEither forms sit beside them.
 */
import * as E from 'fp-ts/lib/Either.js';
import * as TE from 'fp-ts/lib/TaskEither.js';
import { pipe } from 'fp-ts/lib/function.js';
import { openCheckpointTE, type Checkpoint } from '../checkpoint/checkpoint.js';
import { describeCheckpointIssue } from '../checkpoint/errors.js';
import { compileTE, describeCompileError, type CompileCapabilities, type CompileErrorDetail, type CompileOptions } from '../compile/compile.js';
import { describeLoraError } from '../lora/lora.js';
import { openLoraTE, type OpenedAdapter } from '../lora/open.js';
import { planRefit, type RefitPlan } from '../plan/plan.js';
import { describeModelFileError, readModelFileTE, readModelHeaderTE, writeModelFileTE, type ModelFileErrorDetail, type WriteSummary } from '../model/file.js';
import type { RefitModel } from '../model/model.js';
import { openSafetensorsTE, writeSafetensorsTE, type Dtype } from '../safetensors/index.js';
import { fromBytes, toBytes, type DType, type Tensor } from '../trace/ir.js';
import type { TensorStore } from '../weightmap/store.js';
import { describeEffectError, executePlanTE, type EffectErrorDetail, type EffectOptions, type RefitReport } from './effect.js';
import { defaultMerge, type EffectCapabilities } from './capabilities.js';
import { kernelInfoOf } from './quantized.js';
import { fusedGroupsOf } from './groups.js';
import { quantizedIn } from '../quant/store.js';

export type RefitFilesErrorDetail =
  | { readonly _tag: 'Compile'; readonly detail: CompileErrorDetail }
  | { readonly _tag: 'ModelFile'; readonly detail: ModelFileErrorDetail }
  | { readonly _tag: 'Checkpoint'; readonly path: string; readonly detail: string }
  | { readonly _tag: 'Adapter'; readonly path: string; readonly detail: string }
  | { readonly _tag: 'Effect'; readonly detail: EffectErrorDetail }
  | { readonly _tag: 'Tensors'; readonly path: string; readonly detail: string };

export const describeRefitFilesError = (e: RefitFilesErrorDetail): string => {
  switch (e._tag) {
    case 'Compile': return describeCompileError(e.detail);
    case 'ModelFile': return describeModelFileError(e.detail);
    case 'Checkpoint': return e.detail;
    case 'Adapter': return `${e.path}: ${e.detail}`;
    case 'Effect': return describeEffectError(e.detail);
    case 'Tensors': return `${e.path}: ${e.detail}`;
  }
};

export class RefitFilesError extends Error {
  override readonly name = 'RefitFilesError';
  /** The inner tag (UnmappedWeights, ModelFileInvalid, PlanHasErrors, NoBaseWeight, ...). */
  readonly _tag: string;
  constructor(readonly detail: RefitFilesErrorDetail) {
    super(describeRefitFilesError(detail));
    this._tag = 'detail' in detail && typeof detail.detail === 'object' ? detail.detail._tag : detail._tag;
  }
}

const rejecting = async <A>(task: TE.TaskEither<RefitFilesErrorDetail, A>): Promise<A> => {
  const r = await task();
  if (E.isLeft(r)) throw new RefitFilesError(r.left);
  return r.right;
};

// ---- compile ------------------------------------------------------------------------------------

export interface CompileSummary {
  readonly written: WriteSummary;
  readonly segments: { readonly engine: number; readonly fallback: number };
  readonly weights: { readonly mapped: number; readonly constant: number; readonly unmapped: number };
}

export const compileFileTE = (onnxPath: string, checkpointPath: string, outputPath: string, options: CompileOptions = {}, caps: CompileCapabilities = {}): TE.TaskEither<RefitFilesErrorDetail, CompileSummary> =>
  pipe(
    compileTE(onnxPath, checkpointPath, options, caps),
    TE.mapLeft((detail): RefitFilesErrorDetail => ({ _tag: 'Compile', detail })),
    TE.chain((model) => async () => {
      try {
        const written = await writeModelFileTE(model, outputPath)();
        if (E.isLeft(written)) return E.left({ _tag: 'ModelFile', detail: written.left } as const);
        const targets = model.weightMap.targets;
        return E.right({
          written: written.right,
          segments: { engine: model.engineStages().length, fallback: model.fallbackStages().length },
          weights: { mapped: targets.filter((t) => t.status === 'mapped').length, constant: targets.filter((t) => t.status === 'constant').length, unmapped: targets.filter((t) => t.status === 'unmapped').length },
        });
      } finally {
        model[Symbol.dispose]();
      }
    }),
  );

export const compileFile = (onnxPath: string, checkpointPath: string, outputPath: string, options: CompileOptions = {}, caps: CompileCapabilities = {}): Promise<CompileSummary> =>
  rejecting(compileFileTE(onnxPath, checkpointPath, outputPath, options, caps));

// ---- weights: a checkpoint plus adapters ----------------------------------------------------------

export interface WeightsSpec {
  readonly checkpoint: string;
  readonly lora?: readonly { readonly path: string; readonly weight: number }[];
}

/** A checkpoint with adapters merged in, and a close for every file it holds open. */
export interface OpenedWeights extends Disposable {
  readonly store: TensorStore;
  close(): void;
}

export const openWeightsTE = (spec: WeightsSpec): TE.TaskEither<RefitFilesErrorDetail, OpenedWeights> => async () => {
  const checkpoint = await openCheckpointTE(spec.checkpoint)();
  if (E.isLeft(checkpoint)) return E.left({ _tag: 'Checkpoint', path: spec.checkpoint, detail: describeCheckpointIssue(checkpoint.left) });
  const files: Array<Checkpoint | OpenedAdapter> = [checkpoint.right];
  const closeAll = () => files.forEach((f) => f.close());
  const adapters: { adapter: OpenedAdapter; weight: number }[] = [];
  for (const l of spec.lora ?? []) {
    const a = await openLoraTE(l.path)();
    if (E.isLeft(a)) {
      closeAll();
      return E.left({ _tag: 'Adapter', path: l.path, detail: describeLoraError(a.left) });
    }
    files.push(a.right);
    adapters.push({ adapter: a.right, weight: l.weight });
  }
  const merged = defaultMerge()(checkpoint.right, adapters);
  if (E.isLeft(merged)) {
    closeAll();
    const failing = merged.left._tag === 'InvalidAdapter' ? undefined : adapters.find((a) => a.adapter.modules.some((m) => m.module === (merged.left as { module: string }).module));
    return E.left({ _tag: 'Adapter', path: failing?.adapter.path ?? spec.lora?.[0]?.path ?? '', detail: `${describeLoraError(merged.left)} (is the adapter for another model?)` });
  }
  return E.right({ store: merged.right, close: closeAll, [Symbol.dispose]: closeAll });
};

// ---- plan ---------------------------------------------------------------------------------------

/** A dry run: reads the model's header and the weights; changes nothing. */
export const planFileTE = (modelPath: string, weights: WeightsSpec): TE.TaskEither<RefitFilesErrorDetail, RefitPlan> =>
  pipe(
    readModelHeaderTE(modelPath),
    TE.mapLeft((detail): RefitFilesErrorDetail => ({ _tag: 'ModelFile', detail })),
    TE.chain((header) => pipe(openWeightsTE(weights), TE.chain((opened) => async () => {
      try {
        // A quantized checkpoint: whether a tensor is copied or dequantized depends on the engines' kernel
        // formats, so the engines are read too (still a dry run).
        const found = quantizedIn(opened.store);
        if (E.isLeft(found) || found.right.size === 0) return E.right(planRefit(header.weightMap, opened.store, { current: header.current }));
        const model = await readModelFileTE(modelPath)();
        if (E.isLeft(model)) return E.left({ _tag: 'ModelFile', detail: model.left } as const);
        using m = model.right;
        return E.right(planRefit(header.weightMap, opened.store, { current: header.current, kernels: kernelInfoOf(m) }));
      } finally {
        opened.close();
      }
    })),
  ));

export const planFile = (modelPath: string, weights: WeightsSpec): Promise<RefitPlan> => rejecting(planFileTE(modelPath, weights));

// ---- refit --------------------------------------------------------------------------------------

/** The plan a refit executes: against the model's current digests and its engines' kernel formats and
 *  fused groups, without the plan's own scan for non-finite values (the effect refuses them while staging:
 *  one pass over the data instead of two). */
export const planForRefit = (model: RefitModel, store: TensorStore): RefitPlan =>
  planRefit(model.weightMap, store, { current: model.current, checkFinite: false, kernels: kernelInfoOf(model), fusedGroups: fusedGroupsOf(model) });

export interface RefitFileOptions extends EffectOptions {
  /** Where the refitted model goes (default: in place). */
  readonly output?: string;
  readonly capabilities?: Partial<EffectCapabilities>;
}

export interface RefitFileResult {
  readonly plan: RefitPlan;
  readonly report: RefitReport;
  readonly written: WriteSummary;
}

/** Plans and executes a refit of a .trtr file, then writes it (atomically; the old file stays on failure). */
export const refitFileTE = (modelPath: string, weights: WeightsSpec, options: RefitFileOptions = {}): TE.TaskEither<RefitFilesErrorDetail, RefitFileResult> => async () => {
  const model = await readModelFileTE(modelPath, options.capabilities?.openSession ? { openSession: options.capabilities.openSession } : {})();
  if (E.isLeft(model)) return E.left({ _tag: 'ModelFile', detail: model.left });
  using _model = model.right;
  const opened = await openWeightsTE(weights)();
  if (E.isLeft(opened)) return opened;
  using _weights = opened.right;
  const plan = planForRefit(model.right, opened.right.store);
  const report = await executePlanTE(model.right, plan, opened.right.store, options, options.capabilities ?? {})();
  if (E.isLeft(report)) return E.left({ _tag: 'Effect', detail: report.left });
  const written = await writeModelFileTE(model.right, options.output ?? modelPath)();
  if (E.isLeft(written)) return E.left({ _tag: 'ModelFile', detail: written.left });
  return E.right({ plan, report: report.right, written: written.right });
};

export const refitFile = (modelPath: string, weights: WeightsSpec, options: RefitFileOptions = {}): Promise<RefitFileResult> => rejecting(refitFileTE(modelPath, weights, options));

/** Plans and executes a refit of a model in memory (library users holding a model). */
export const refitModelTE = (model: RefitModel, weights: WeightsSpec, options: EffectOptions & { readonly capabilities?: Partial<EffectCapabilities> } = {}): TE.TaskEither<RefitFilesErrorDetail, { plan: RefitPlan; report: RefitReport }> => async () => {
  const opened = await openWeightsTE(weights)();
  if (E.isLeft(opened)) return opened;
  using _weights = opened.right;
  const plan = planForRefit(model, opened.right.store);
  const report = await executePlanTE(model, plan, opened.right.store, options, options.capabilities ?? {})();
  return E.isLeft(report) ? E.left({ _tag: 'Effect', detail: report.left }) : E.right({ plan, report: report.right });
};

export const refitModel = (model: RefitModel, weights: WeightsSpec, options: EffectOptions & { readonly capabilities?: Partial<EffectCapabilities> } = {}): Promise<{ plan: RefitPlan; report: RefitReport }> =>
  rejecting(refitModelTE(model, weights, options));

// ---- run ----------------------------------------------------------------------------------------

const toIr: Readonly<Record<string, DType>> = { F32: 'float32', F64: 'float64', F16: 'float16', BF16: 'bfloat16', I8: 'int8', U8: 'uint8', I16: 'int16', U16: 'uint16', I32: 'int32', U32: 'uint32', I64: 'int64', U64: 'uint64', BOOL: 'bool' };
const fromIr: Readonly<Record<DType, Dtype>> = { float32: 'F32', float64: 'F64', float16: 'F16', bfloat16: 'BF16', int8: 'I8', uint8: 'U8', int16: 'I16', uint16: 'U16', int32: 'I32', uint32: 'U32', int64: 'I64', uint64: 'U64', bool: 'BOOL' };

/** Reads every tensor of a safetensors file (copies: inputs are small). */
export const readTensorsTE = (path: string): TE.TaskEither<RefitFilesErrorDetail, Record<string, Tensor>> => async () => {
  const file = await openSafetensorsTE(path)();
  if (E.isLeft(file)) return E.left({ _tag: 'Tensors', path, detail: `${file.left._tag}: ${file.left.detail}` });
  try {
    const out: Record<string, Tensor> = {};
    for (const [name, info] of file.right.tensors) {
      const dtype = toIr[info.dtype];
      if (dtype === undefined) return E.left({ _tag: 'Tensors', path, detail: `tensor '${name}': dtype ${info.dtype} is not supported as a model input` });
      out[name] = { dtype, shape: info.shape.map(Number), data: fromBytes(dtype, file.right.bytes(name)) };
    }
    return E.right(out);
  } finally {
    file.right.close();
  }
};

/** Runs a .trtr model on a safetensors file of inputs; writes the outputs, named as the graph's outputs. */
export const runFileTE = (modelPath: string, inputsPath: string, outputPath: string): TE.TaskEither<RefitFilesErrorDetail, { outputs: Record<string, { dtype: string; shape: readonly number[] }> }> => async () => {
  const inputs = await readTensorsTE(inputsPath)();
  if (E.isLeft(inputs)) return inputs;
  const model = await readModelFileTE(modelPath)();
  if (E.isLeft(model)) return E.left({ _tag: 'ModelFile', detail: model.left });
  using m = model.right;
  let outputs: Record<string, Tensor>;
  try {
    outputs = await m.run(inputs.right);
  } catch (e) {
    return E.left({ _tag: 'Tensors', path: inputsPath, detail: (e as Error).message });
  }
  const written = await writeSafetensorsTE(outputPath, Object.entries(outputs).map(([name, t]) => ({ name, dtype: fromIr[t.dtype], shape: t.shape, data: toBytes(t.data) })))();
  if (E.isLeft(written)) return E.left({ _tag: 'Tensors', path: outputPath, detail: `${written.left._tag}: ${written.left.detail}` });
  return E.right({ outputs: Object.fromEntries(Object.entries(outputs).map(([name, t]) => [name, { dtype: t.dtype, shape: t.shape }])) });
};

export const runFile = (modelPath: string, inputsPath: string, outputPath: string) => rejecting(runFileTE(modelPath, inputsPath, outputPath));
