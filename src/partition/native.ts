/**
 * The native engine (libtrtshim through ffi/) as a CompiledModel engine: each engine segment's network
 * is built into a refittable engine with one execution context kept for the model's life.
 */
import { buildEngine, type BuildOptions, type Engine, type ExecutionContext } from '../../ffi/engine.js';
import type { EngineFactory, EngineRunner } from './compiled.js';
import { formatWeightFormat, weightFormatOptions, type WeightFormat } from '../quant/format.js';

export interface NativeEngineOptions {
  /** Search GEMM tactics at build time (slower builds, sometimes faster runs). Default false. */
  readonly tacticSearch?: boolean;
  /** Precision the engine stores weights in. Default float32. */
  readonly weightPrecision?: BuildOptions['weightPrecision'];
  /** Worker threads per engine (0: one per core). */
  readonly numThreads?: number;
  /** Kernel format of GEMM and convolution weights (src/quant/format.ts; `--weight-format`). Default: the
   *  weight precision. A float format sets the precision (and must agree with weightPrecision if given). */
  readonly weightFormat?: WeightFormat;
}

/** A built engine segment: owns its engine and context, and exposes both for refits. */
export class NativeEngineRunner implements EngineRunner, Disposable {
  constructor(
    readonly engine: Engine,
    private readonly context: ExecutionContext,
  ) {}

  run(inputs: Parameters<EngineRunner['run']>[0]): Record<string, Float32Array> {
    return this.context.run(inputs);
  }

  [Symbol.dispose](): void {
    this.context[Symbol.dispose]();
    this.engine[Symbol.dispose]();
  }
}

/** An EngineFactory that builds refittable native engines with the given options. */
export const nativeEngine = (options: NativeEngineOptions = {}): EngineFactory => {
  const format = options.weightFormat === undefined ? {} : weightFormatOptions(options.weightFormat);
  if (format.weightPrecision !== undefined && options.weightPrecision !== undefined && format.weightPrecision !== options.weightPrecision) {
    throw new Error(`nativeEngine: weight format ${formatWeightFormat(options.weightFormat!)} is precision ${format.weightPrecision}, but weightPrecision is ${options.weightPrecision}`);
  }
  const buildOptions: BuildOptions = {
    refittable: true,
    ...(options.tacticSearch !== undefined ? { tacticSearch: options.tacticSearch } : {}),
    ...(options.weightPrecision !== undefined ? { weightPrecision: options.weightPrecision } : {}),
    ...(options.numThreads !== undefined ? { numThreads: options.numThreads } : {}),
    ...format,
  };
  return (network) => buildRunner(network, buildOptions);
};

const buildRunner = (network: Parameters<EngineFactory>[0], buildOptions: BuildOptions): NativeEngineRunner => {
  const engine = buildEngine(network, buildOptions);
  try {
    return new NativeEngineRunner(engine, engine.createContext());
  } catch (e) {
    engine[Symbol.dispose]();
    throw e;
  }
};
