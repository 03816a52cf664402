/**
 * trt-refit: compile a model into inference engines once, then change the engines' weights in place.
 *
 * ```ts
 * import { compile, load } from 'trt-refit';
 * await using model = await compile('model.onnx', 'weights_v1.safetensors');
 * const outputs = await model.run({ x });
 * await model.refit('weights_v2.safetensors');                       // only changed weights move
 * await model.refit({ checkpoint: 'weights_v1.safetensors', lora: [{ path: 'lora/', weight: 1 }] });
 * await model.save('model.trtr');                                    // later: await load('model.trtr')
 * ```
 *
 * Every Promise-returning call rejects with {@link TrtRefitError} (its `_tag` says what went wrong); each
 * has a TaskEither form beside it (`compileTE`, `loadTE`, ...) whose Left is the tagged detail. Handles
 * are disposable (`using` / `await using`). Long calls (compile, refit) take an AbortSignal and an
 * onProgress callback.
 *
 * @packageDocumentation
 */

// ---- the model lifecycle --------------------------------------------------------------------------

export {
  /** A compiled model in memory: run it, refit it, save it; dispose it with `using` or `await using`. */
  Model,
  /** Compiles an ONNX file with the checkpoint it was exported with into a {@link Model}. */
  compile,
  /** {@link compile} as a TaskEither: Left is the tagged {@link ApiErrorDetail}. */
  compileTE,
  /** Reads a `.trtr` compiled model written by {@link save} or the CLI. */
  load,
  /** {@link load} as a TaskEither. */
  loadTE,
  /** Writes a model as a `.trtr` file, atomically. */
  save,
  /** {@link save} as a TaskEither. */
  saveTE,
  /** What a refit would do, as data (a dry run): per weight, changed or not; problems; totals. */
  planRefit,
  /** {@link planRefit} as a TaskEither. */
  planRefitTE,
  /** Changes a model's weights in place from a checkpoint (plus LoRA adapters): all or nothing. */
  refit,
  /** {@link refit} as a TaskEither. */
  refitTE,
  /** Runs a model on named inputs. */
  run,
  /** {@link run} as a TaskEither. */
  runTE,
  /** Options of {@link compile}: partition, precision, tactic search, AbortSignal, progress. */
  type ApiCompileOptions,
  /** A compile's progress event. */
  type CompileProgress,
  /** What long calls take: an AbortSignal and a progress callback. */
  type LongCallOptions,
  /** A compile or refit progress event. */
  type Progress,
  /** A refit's progress event. */
  type RefitProgressEvent,
  /** Options of {@link refit}: verification inputs, staging budget, finiteness checks, abort, progress. */
  type RefitOptions,
  /** A refit's plan and the effect's report. */
  type RefitResult,
  /** A checkpoint path, or `{ checkpoint, lora: [{ path, weight }] }`. */
  type WeightsInput,
} from './api/model.js';

export {
  /** The error every Promise of this API rejects with: `_tag` is what went wrong, `stage` where. */
  TrtRefitError,
  /** Describes an {@link ApiErrorDetail} in one line. */
  describeApiError,
  /** The tagged details of {@link TrtRefitError} (the TaskEither forms' Left). */
  type ApiErrorDetail,
} from './api/errors.js';

// ---- MutableModule: a compiled model as a state dict ------------------------------------------------

export {
  /** A compiled model whose weights are a state dict: set / loadStateDict / mergeLora, refit or recompile on the next run. */
  MutableModule,
  /** The error MutableModule rejects and throws with. */
  MutableModuleError,
  /** Compiles a module source without a cache (src/compile). */
  defaultCompiler,
  /** Describes a {@link MutableModuleErrorDetail} in one line. */
  describeMutableModuleError,
  /** How a MutableModule compiles (pass one that goes through the engine cache). */
  type ModuleCompiler,
  /** What a MutableModule is compiled from: an ONNX file, or a network function of the state dict. */
  type ModuleSource,
  /** A MutableModule run's outputs and the update it made first. */
  type ModuleRunResult,
  /** The tagged details of {@link MutableModuleError}. */
  type MutableModuleErrorDetail,
  /** Options of a MutableModule: compiler, onUpdate, autoRefit, effect capabilities. */
  type MutableModuleOptions,
  /** 'none' | 'refit' | 'recompile'. */
  type UpdateDecision,
  /** What an update did and why. */
  type UpdateReport,
} from './mutable/module.js';

export {
  /** Tensors by name, as PyTorch's state_dict() holds them. */
  type StateDict,
  /** One tensor of a state dict. */
  type StateTensor,
  /** A tensor, or float32 values with a shape. */
  type TensorInput,
} from './mutable/state.js';

// ---- stage-level building blocks --------------------------------------------------------------------

export {
  /** Compiles a network written with the network API (one engine segment) against a checkpoint. */
  compileNetwork,
  /** PyTorch weight naming for compileNetwork: `<layer>.weight`, `<layer>.bias`, running stats. */
  torchNaming,
  /** The compile stage's error class (tags: UnmappedWeights, TraceFailed, BuildFailed, ...). */
  CompileError,
  /** Options of the compile stage. */
  type CompileOptions,
  /** The compile stage's tagged errors. */
  type CompileErrorDetail,
} from './compile/index.js';

export {
  /** The compiled model the stage functions work on (Model.compiled). */
  RefitModel,
  /** Errors running a compiled model (missing or mismatched inputs). */
  ModelRunError,
  /** Errors reading or writing `.trtr` files. */
  ModelFileError,
  /** A tensor's name, dtype and shape in a compiled model. */
  type TensorDesc,
} from './model/index.js';

export {
  /** Errors of the refit effect (PlanHasErrors, NonFiniteValues, Aborted, RollbackFailed, ...). */
  EffectError,
  /** Errors of the file-level calls (compileFile, refitFile, ...). */
  RefitFilesError,
  /** A checkpoint path plus LoRA adapters. */
  type WeightsSpec,
  /** What a refit did: weights changed, bytes moved, engines and fallbacks touched, time. */
  type RefitReport,
  /** Probe inputs and a check run after a refit. */
  type VerifyOptions,
} from './effect/index.js';

export {
  /** The io-ts codec of a refit plan (plans are JSON: save, diff, execute later). */
  RefitPlanCodec,
  /** Right: a plan without errors; Left: its errors. */
  checkPlan,
  /** One line per plan problem. */
  describeProblem,
  /** A one-screen summary of a plan. */
  summarizePlan,
  /** A refit plan. */
  type RefitPlan,
  /** One weight of a refit plan. */
  type PlanEntry,
  /** A problem a plan found in a checkpoint. */
  type PlanProblem,
} from './plan/plan.js';

export {
  /** Counts of mapped, constant and unmapped weights of a weight map. */
  coverage,
  /** The io-ts codec of a weight map. */
  WeightMapCodec,
  /** A weight map's coverage. */
  type Coverage,
  /** Every engine weight and fallback initializer as an expression over checkpoint tensors. */
  type WeightMap,
  /** One weight of a weight map. */
  type MapTarget,
} from './weightmap/map.js';

// ---- the network-builder path (native engines) ------------------------------------------------------

export {
  /** Builds a native engine from a NetworkDefinition. */
  buildEngine,
  /** A native engine: run, serialize, refit, weight streaming. */
  Engine,
  /** An engine's execution context. */
  ExecutionContext,
  /** An all-or-nothing refitter of one engine. */
  Refitter,
  /** Engine build options (precision, refittable, tactic search, threads, weight streaming, quantized formats). */
  type BuildOptions,
  /** A host buffer the engine reads or writes. */
  type HostTensor,
} from '../ffi/engine.js';

export {
  /** A libtrtshim call failed: status and message. */
  NativeError,
  /** libtrtshim could not be loaded or has another ABI version. */
  LibraryLoadError,
} from '../ffi/library.js';

export type {
  /** A network as plain data: inputs, layers in topological order, outputs. */
  NetworkDefinition,
  /** One layer of a NetworkDefinition. */
  Layer,
  /** Weight values (float16/bfloat16 as raw bits). */
  Weights,
  /** kernel, bias, scale, shift, constant, mean, variance. */
  WeightRole,
} from './network/types.js';

export {
  /** Writes ONNX-shaped graphs in code (tests, hand-made models). */
  GraphBuilder,
} from './trace/builder.js';

export type {
  /** A tensor: dtype, shape, typed-array data. */
  Tensor,
  /** A tensor's typed array. */
  TensorData,
  /** Tensor element types. */
  DType,
} from './trace/ir.js';

// ---- checkpoints, safetensors, LoRA ------------------------------------------------------------------

export {
  /** Opens a safetensors file, zero-copy (mapped), validated as the reference implementation does. */
  openSafetensors,
  /** Writes a safetensors file crash-safely (temporary file, fsync, rename). */
  writeSafetensors,
  /** An open safetensors file. */
  SafetensorsFile,
  /** Errors reading or writing safetensors files. */
  SafetensorsError,
  /** A tensor to write. */
  type TensorToWrite,
} from './safetensors/index.js';

export {
  /** Opens a checkpoint: one safetensors file, a sharded index, or a directory holding either. */
  openCheckpoint,
  /** Errors opening checkpoints and adapter configs. */
  CheckpointError,
  /** An open checkpoint. */
  type Checkpoint,
} from './checkpoint/index.js';

export {
  /** Parses the CLI's `DIR[:SCALE]` adapter argument. */
  parseLoraArgument,
  /** Opens a PEFT adapter directory or a Kohya .safetensors file. */
  openLora,
  /** Merges adapters into a checkpoint's tensors (W + scale * B @ A). */
  mergeAdapters,
  /** LoRA errors (InvalidAdapter, NoBaseWeight, DeltaShapeMismatch). */
  LoraError,
  /** An opened adapter. */
  type OpenedAdapter,
} from './lora/index.js';
