/**
 * A compiled model: the partitioned graph with every engine segment lowered to a network and given to
 * an engine, and every fallback segment opened on ONNX Runtime. `run` executes the segments in order,
 * passing tensors between them by name.
 *
 * The engine is a parameter (`engine`): the native engine (libtrtshim, refittable engines) by default;
 * the reference evaluator (`referenceEngine`) plugs in with the same shape, for tests.
 */
import * as E from 'fp-ts/lib/Either.js';
import type { AnalyzedGraph } from '../trace/analyze.js';
import { elementCount, type Tensor, type TensorData } from '../trace/ir.js';
import { typedArrayMismatch } from '../model/model.js';
import { partitionGraph, PartitionError, type Partition, type PartitionOptions, type Segment, type SegmentKind } from './index.js';
import { lowerContext, lowerSegment, LowerError, type LoweredSegment } from '../network/lower.js';
import type { NetworkDefinition } from '../network/types.js';
import { FallbackSession } from '../fallback/session.js';
import { evaluate } from '../reference/index.js';
import { nativeEngine } from './native.js';

export type EngineInput = Float32Array | Int32Array | BigInt64Array;

export interface EngineRunner {
  run(inputs: Record<string, EngineInput>): Record<string, Float32Array>;
  [Symbol.dispose]?(): void;
}
export type EngineFactory = (network: NetworkDefinition, segment: Segment) => EngineRunner;

/** The reference evaluator as an engine: plain loops, for tests and as a portable default. */
export const referenceEngine: EngineFactory = (network) => ({ run: (inputs) => evaluate(network, inputs) });

export interface CompileOptions extends PartitionOptions {
  /** Builds each engine segment; default `nativeEngine()` (libtrtshim, refittable, default options). */
  readonly engine?: EngineFactory;
}

export interface SegmentReport {
  readonly index: number;
  readonly kind: SegmentKind;
  readonly nodes: number;
  readonly opTypes: readonly string[];
  readonly inputs: readonly string[];
  readonly outputs: readonly string[];
  /** Engine segments: layers of the lowered network and its weights; fallback: initializers supplied. */
  readonly layers?: number;
  readonly weights: number;
}

export class CompileError extends Error {
  override readonly name = 'CompileError';
  readonly _tag = 'MissingModelInput' as const;
}

type Stage =
  | { readonly kind: 'engine'; readonly segment: Segment; readonly lowered: LoweredSegment; readonly runner: EngineRunner }
  | { readonly kind: 'fallback'; readonly segment: Segment; readonly session: FallbackSession };

export class CompiledModel implements Disposable {
  private constructor(
    readonly analyzed: AnalyzedGraph,
    readonly partition: Partition,
    private readonly stages: readonly Stage[],
  ) {}

  static async compile(analyzed: AnalyzedGraph, options: CompileOptions = {}): Promise<CompiledModel> {
    const ctx = lowerContext(analyzed);
    const parted = partitionGraph(analyzed, options, ctx);
    if (E.isLeft(parted)) throw new PartitionError(parted.left);
    const engine = options.engine ?? nativeEngine();
    const stages: Stage[] = [];
    try {
      for (const segment of parted.right.segments) {
        // A segment whose results nothing reads (dead code in the graph) is not run.
        if (segment.outputs.length === 0) continue;
        if (segment.kind === 'engine') {
          const lowered = lowerSegment(ctx, segment);
          if (E.isLeft(lowered)) throw new LowerError(lowered.left);
          stages.push({ kind: 'engine', segment, lowered: lowered.right, runner: engine(lowered.right.network, segment) });
        } else {
          const typeOf = (name: string) => ({ name, type: analyzed.types.get(name)! });
          const session = await FallbackSession.create({
            name: `segment${segment.index}`,
            opset: analyzed.graph.opset,
            nodes: segment.nodes,
            inputs: segment.inputs.map(typeOf),
            outputs: segment.outputs.map(typeOf),
            initializers: new Map(segment.constants.map((c) => [c, analyzed.constants.get(c)!.tensor])),
          });
          stages.push({ kind: 'fallback', segment, session });
        }
      }
    } catch (e) {
      for (const s of stages) disposeStage(s);
      throw e;
    }
    return new CompiledModel(analyzed, parted.right, stages);
  }

  /** The live segments (those whose results are read), in run order. */
  segments(): SegmentReport[] {
    return this.stages.map((s) => ({
      index: s.segment.index,
      kind: s.kind,
      nodes: s.segment.nodes.length,
      opTypes: [...new Set(s.segment.nodes.map((n) => n.opType))],
      inputs: s.segment.inputs,
      outputs: s.segment.outputs,
      ...(s.kind === 'engine' ? { layers: s.lowered.network.layers.length, weights: s.lowered.weights.length } : { weights: s.session.initializers.size }),
    }));
  }

  /** The lowered networks with weight provenance, for the weight map. */
  lowered(): LoweredSegment[] {
    return this.stages.flatMap((s) => (s.kind === 'engine' ? [s.lowered] : []));
  }

  /** Runs the model; inputs by graph input name (typed arrays take the analyzed shapes). */
  async run(inputs: Readonly<Record<string, Tensor | TensorData>>): Promise<Record<string, Tensor>> {
    const values = new Map<string, Tensor>();
    for (const input of this.analyzed.graph.inputs) {
      const given = inputs[input.name];
      const type = this.analyzed.types.get(input.name)!;
      if (given === undefined) throw new CompileError(`no value for model input '${input.name}'`);
      const tensor: Tensor = ArrayBuffer.isView(given) ? { dtype: type.dtype, shape: type.shape, data: given as TensorData } : (given as Tensor);
      const wrongArray = typedArrayMismatch(tensor.dtype, tensor.data);
      if (wrongArray !== undefined) throw new CompileError(`model input '${input.name}': expected ${wrongArray.expected}, found ${wrongArray.found}`);
      if (tensor.dtype !== type.dtype || elementCount(type.shape) !== tensor.data.length) {
        throw new CompileError(`model input '${input.name}': expected ${type.dtype}[${type.shape}], found ${tensor.dtype} with ${tensor.data.length} elements`);
      }
      values.set(input.name, { ...tensor, shape: type.shape });
    }
    for (const stage of this.stages) {
      if (stage.kind === 'engine') {
        const feeds: Record<string, EngineInput> = {};
        for (const name of stage.segment.inputs) feeds[name] = values.get(name)!.data as EngineInput;
        const outputs = stage.runner.run(feeds);
        for (const name of stage.segment.outputs) values.set(name, { dtype: 'float32', shape: this.analyzed.types.get(name)!.shape, data: outputs[name] });
      } else {
        const outputs = await stage.session.run(values);
        for (const [name, t] of outputs) values.set(name, t);
      }
    }
    const result: Record<string, Tensor> = {};
    for (const name of this.analyzed.graph.outputs) result[name] = values.get(name) ?? this.analyzed.constants.get(name)!.tensor;
    return result;
  }

  /** New values for constants read by fallback segments (by tensor name): their sessions are re-created. */
  async refitFallback(constants: ReadonlyMap<string, Tensor>): Promise<void> {
    for (const stage of this.stages) {
      if (stage.kind !== 'fallback') continue;
      const mine = new Map([...constants].filter(([name]) => stage.session.initializers.has(name)));
      if (mine.size > 0) await stage.session.refit(mine);
    }
  }

  [Symbol.dispose](): void {
    for (const s of this.stages) disposeStage(s);
  }
}

const disposeStage = (s: Stage): void => {
  if (s.kind === 'engine') s.runner[Symbol.dispose]?.();
  else s.session[Symbol.dispose]();
};

export const compileModel = (analyzed: AnalyzedGraph, options: CompileOptions = {}): Promise<CompiledModel> => CompiledModel.compile(analyzed, options);
