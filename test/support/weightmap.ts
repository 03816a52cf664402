/** Helpers for the weight map, plan and LoRA tests: fixtures traced for refit, a refittable reference
 *  engine, and applying a map's expressions to a model. */
import { readFileSync, existsSync, readdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import { decodeOnnx } from '../../src/trace/decode.js';
import { directoryResolver } from '../../src/trace/load.js';
import { analyzeGraph, type AnalyzedGraph } from '../../src/trace/analyze.js';
import { partitionGraph, type Partition } from '../../src/partition/index.js';
import { compileModel, type CompiledModel, type EngineFactory, type EngineRunner } from '../../src/partition/compiled.js';
import { evaluate } from '../../src/reference/index.js';
import { networkWeights, type Layer, type NetworkDefinition, type WeightRole, type Weights } from '../../src/network/types.js';
import { lowerContext, lowerSegment } from '../../src/network/lower.js';
import type { Tensor } from '../../src/trace/ir.js';
import { untieSharedInitializers } from '../../src/weightmap/untie.js';
import { prepareForRefit } from '../../src/weightmap/prepare.js';
import { nodeScopes, type NodeScopes } from '../../src/weightmap/scopes.js';
import { buildWeightMap, type WeightMap } from '../../src/weightmap/map.js';
import { evaluateExpr, type F32Tensor } from '../../src/weightmap/evaluate.js';
import { readF32, type TensorStore } from '../../src/weightmap/store.js';
import { fixturesDir } from './safetensors.js';

export { fixturesDir };

/** Every fixture folder (one with a meta.json) under ../shared/fixtures, sorted. */
export const fixtureFolders = (): string[] =>
  readdirSync(fixturesDir, { withFileTypes: true })
    .filter((d) => d.isDirectory() && existsSync(join(fixturesDir, d.name, 'meta.json')))
    .map((d) => d.name)
    .sort();

/** The four models the fixtures folder first held; tests written for exactly these name them. */
export const originalFixtures: readonly string[] = ['mlp', 'cnn_bn', 'bert_tiny', 'gpt2_tiny'];

export interface FixtureModel {
  readonly model: string;
  readonly file: 'model_dynamo.onnx' | 'model_legacy.onnx';
  readonly exporter: 'dynamo' | 'legacy';
  /** The ONNX file. */
  readonly path: string;
  /** The fixture folder. */
  readonly dir: string;
  /** The PEFT adapter folder, where the fixture has one. */
  readonly lora: string | undefined;
}

/** The ONNX files of the given fixture folders (default: every folder with a meta.json), dynamo and
 *  legacy where present. */
export const fixtureModels = (models: readonly string[] = fixtureFolders()): FixtureModel[] =>
  models.flatMap((model) => {
    const dir = join(fixturesDir, model);
    const lora = existsSync(join(dir, 'lora')) ? join(dir, 'lora') : undefined;
    return (['dynamo', 'legacy'] as const)
      .map((exporter) => ({ model, file: `model_${exporter}.onnx` as const, exporter, path: join(dir, `model_${exporter}.onnx`), dir, lora }))
      .filter((f) => existsSync(f.path));
  });

export interface Traced {
  readonly analyzed: AnalyzedGraph;
  readonly partition: Partition;
  readonly scopes: NodeScopes;
}

const unwrap = <A>(r: E.Either<unknown, A>): A => {
  if (E.isLeft(r)) throw new Error(JSON.stringify(r.left));
  return r.right;
};

/** Decodes, prepares for refit (zero biases restored when a build checkpoint is given; shared
 *  initializers untied), analyzes and partitions an ONNX file. */
export const traceForRefit = (path: string, checkpoint?: TensorStore): Traced => {
  const bytes = new Uint8Array(readFileSync(path));
  const decoded = unwrap(decodeOnnx(bytes, directoryResolver(dirname(path))));
  const graph = checkpoint ? prepareForRefit(decoded, checkpoint) : untieSharedInitializers(decoded);
  const analyzed = unwrap(analyzeGraph(graph));
  return { analyzed, partition: unwrap(partitionGraph(analyzed)), scopes: nodeScopes(bytes) };
};

export const mapFor = (traced: Traced, checkpoint: TensorStore, allowUnmapped = false): WeightMap =>
  unwrap(buildWeightMap({ analyzed: traced.analyzed, segments: traced.partition.segments, checkpoint, scopes: traced.scopes }, { allowUnmapped }));

/** The reference evaluator as an engine whose weights can be replaced (by layer and role), per segment. */
export class RefittableReference {
  private readonly networks = new Map<number, NetworkDefinition>();
  readonly factory: EngineFactory = (network, segment) => {
    this.networks.set(segment.index, network);
    const runner: EngineRunner = { run: (inputs) => evaluate(this.networks.get(segment.index)!, inputs) };
    return runner;
  };

  refit(segment: number, updates: ReadonlyMap<string, Weights>): void {
    const net = this.networks.get(segment)!;
    const pick = (layer: string, role: WeightRole, w: Weights | undefined): Weights | undefined => updates.get(`${layer}\u0000${role}`) ?? w;
    const layers = net.layers.map((l): Layer => {
      switch (l.kind) {
        case 'fullyConnected': case 'convolution': return { ...l, kernel: pick(l.name, 'kernel', l.kernel)!, ...(l.bias ? { bias: pick(l.name, 'bias', l.bias)! } : {}) };
        case 'layerNorm': return { ...l, ...(l.scale ? { scale: pick(l.name, 'scale', l.scale)! } : {}), ...(l.shift ? { shift: pick(l.name, 'shift', l.shift)! } : {}) };
        case 'batchNorm': return { ...l, scale: pick(l.name, 'scale', l.scale)!, shift: pick(l.name, 'shift', l.shift)!, mean: pick(l.name, 'mean', l.mean)!, variance: pick(l.name, 'variance', l.variance)! };
        case 'constant': return { ...l, weights: pick(l.name, 'constant', l.weights)! };
        default: return l;
      }
    });
    this.networks.set(segment, { ...net, layers });
  }
}

export const compileRefittable = async (traced: Traced): Promise<{ model: CompiledModel; engine: RefittableReference }> => {
  const engine = new RefittableReference();
  const model = await compileModel(traced.analyzed, { engine: engine.factory });
  return { model, engine };
};

/** Evaluates every mapped target on `store` and puts the values into the model (engine and fallbacks). */
export const applyMap = async (map: WeightMap, store: TensorStore, model: CompiledModel, engine: RefittableReference): Promise<void> => {
  const lookup = (name: string): F32Tensor | undefined => readF32(store, name);
  const perSegment = new Map<number, Map<string, Weights>>();
  const fallback = new Map<string, Tensor>();
  for (const target of map.targets) {
    if (target.status !== 'mapped') continue;
    const value = unwrap(evaluateExpr(target.expr, lookup));
    if (target.kind === 'engine') {
      const updates = perSegment.get(target.segment) ?? new Map<string, Weights>();
      updates.set(`${target.layer}\u0000${target.role}`, { dtype: 'float32', shape: target.shape, data: value.data });
      perSegment.set(target.segment, updates);
    } else {
      fallback.set(target.tensor!, { dtype: 'float32', shape: target.shape, data: value.data });
    }
  }
  for (const [segment, updates] of perSegment) engine.refit(segment, updates);
  if (fallback.size > 0) await model.refitFallback(fallback);
};

/** The value every target holds as built (engine weights from the lowered networks, fallback constants). */
export const builtValues = (traced: Traced): Map<string, Tensor> => {
  const ctx = lowerContext(traced.analyzed);
  const out = new Map<string, Tensor>();
  for (const segment of traced.partition.segments) {
    if (segment.outputs.length === 0) continue;
    if (segment.kind === 'engine') {
      const lowered = unwrap(lowerSegment(ctx, segment));
      for (const w of networkWeights(lowered.network)) out.set(`engine/${segment.index}/${w.layer}/${w.role}`, { dtype: 'float32', shape: w.weights.shape, data: w.weights.data as Float32Array });
    } else {
      for (const c of segment.constants) out.set(`fallback/${segment.index}/${c}`, traced.analyzed.constants.get(c)!.tensor);
    }
  }
  return out;
};
