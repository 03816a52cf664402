/** Whole models on the native engine (libtrtshim) with ONNX Runtime fallbacks: the compiled model's default. */
import { describe, expect, it } from 'vitest';
import * as E from 'fp-ts/lib/Either.js';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { traceOnnx } from '../src/trace/load.js';
import { analyzeGraph, type AnalyzedGraph } from '../src/trace/analyze.js';
import { compileModel, referenceEngine, type EngineFactory } from '../src/partition/compiled.js';
import { nativeEngine, NativeEngineRunner } from '../src/partition/native.js';
import { GraphBuilder } from '../src/trace/builder.js';
import { tensorOf, type Graph } from '../src/trace/ir.js';
import { readSafetensors } from './support/h5-safetensors.js';
import { expectClose } from './support/h5-close.js';

const fixtures = '/work/shared/fixtures';
const models = ['mlp', 'cnn_bn', 'bert_tiny', 'gpt2_tiny'].flatMap((m) =>
  ['model_dynamo.onnx', 'model_legacy.onnx'].map((f) => join(fixtures, m, f)).filter(existsSync));

const analyze = (g: Graph): AnalyzedGraph => {
  const r = analyzeGraph(g);
  if (E.isLeft(r)) throw new Error(JSON.stringify(r.left));
  return r.right;
};

/** A native factory that remembers the runners it built, to check they are disposed. */
const recordingNative = (): { factory: EngineFactory; runners: NativeEngineRunner[] } => {
  const runners: NativeEngineRunner[] = [];
  const inner = nativeEngine();
  return {
    runners,
    factory: (network, segment) => {
      const runner = inner(network, segment) as NativeEngineRunner;
      runners.push(runner);
      return runner;
    },
  };
};

describe('compiled models on the native engine', () => {
  it.each(models)('%s matches PyTorch; all-fallback agrees; segments are reported', async (path) => {
    const analyzed = await traceOnnx(path);
    const inputs = readSafetensors(join(path, '..', 'inputs.safetensors'));
    const expected = readSafetensors(join(path, '..', 'expected_v1.safetensors')).output;
    const output = analyzed.graph.outputs[0];

    const { factory, runners } = recordingNative();
    const native = await compileModel(analyzed, { engine: factory });
    const segments = native.segments();
    const engines = segments.filter((s) => s.kind === 'engine');
    expect(engines.length).toBeGreaterThan(0);
    expect(runners.length).toBe(engines.length);
    // The report accounts for every run-time node once, and each engine segment's layers were built.
    const runtimeNodes = analyzed.graph.nodes.length - analyzed.folded.size;
    expect(segments.reduce((n, s) => n + s.nodes, 0)).toBe(runtimeNodes);
    for (const s of engines) expect(s.layers).toBeGreaterThan(0);
    const viaNative = (await native.run(inputs))[output];
    expectClose(viaNative, expected);

    using fallback = await compileModel(analyzed, { forcedFallback: ['*'] });
    expect(fallback.segments().every((s) => s.kind === 'fallback')).toBe(true);
    expectClose(viaNative, (await fallback.run(inputs))[output]);

    // Running twice on the same contexts gives the same result.
    expect(Array.from((await native.run(inputs))[output].data as Float32Array)).toEqual(Array.from(viaNative.data as Float32Array));
    native[Symbol.dispose]();
    for (const r of runners) expect(r.engine.disposed).toBe(true);
  });

  it('the native engine is the default and agrees with the reference evaluator', async () => {
    const path = join(fixtures, 'bert_tiny/model_dynamo.onnx');
    const analyzed = await traceOnnx(path);
    const inputs = readSafetensors(join(fixtures, 'bert_tiny/inputs.safetensors'));
    using byDefault = await compileModel(analyzed);
    using reference = await compileModel(analyzed, { engine: referenceEngine });
    const output = analyzed.graph.outputs[0];
    const a = (await byDefault.run(inputs))[output];
    expectClose(a, (await reference.run(inputs))[output]);
  });

  it('GPT-2 and BERT fall back only on the NaN guard and the attention-mask computation', async () => {
    using gpt2 = await compileModel(await traceOnnx(join(fixtures, 'gpt2_tiny/model_dynamo.onnx')));
    const gptFallback = gpt2.segments().filter((s) => s.kind === 'fallback').flatMap((s) => s.opTypes);
    expect(new Set(gptFallback)).toEqual(new Set(['IsNaN', 'Where']));

    const bertGraph = await traceOnnx(join(fixtures, 'bert_tiny/model_dynamo.onnx'));
    // GatherElements of two constants folds at build time.
    expect(bertGraph.graph.nodes.filter((n) => n.opType === 'GatherElements').every((n) => bertGraph.folded.has(n.name))).toBe(true);
    using bert = await compileModel(bertGraph);
    const bertFallback = bert.segments().filter((s) => s.kind === 'fallback').flatMap((s) => s.opTypes);
    expect(new Set(bertFallback)).toEqual(new Set(['Cast', 'GatherND', 'And', 'Where', 'IsNaN']));
  });
});

describe('integer index tensors reshaped before a Gather', () => {
  /** ids int64 [2, 3] -> Reshape [6] -> Gather rows of a table -> [6, 4] -> Relu. */
  const graph = (): Graph => {
    const b = new GraphBuilder('ids', 18);
    const ids = b.input('ids', 'int64', [2, 3]);
    const table = b.initializer('table', tensorOf('float32', [5, 4], Array.from({ length: 20 }, (_, i) => Math.sin(i) * 3)));
    const flat = b.op('Reshape', [ids, b.constant('shape', 'int64', [1], [6])]);
    const rows = b.op('Gather', [table, flat], { axis: 0 });
    b.output(b.op('Relu', [rows]));
    return b.build();
  };
  const ids = { ids: BigInt64Array.from([0n, 4n, 2n, -1n, 3n, 1n]) };

  it('run inside one engine segment, and agree with ONNX Runtime', async () => {
    const analyzed = analyze(graph());
    using engine = await compileModel(analyzed);
    using fallback = await compileModel(analyzed, { forcedFallback: ['*'] });
    expect(engine.segments().map((s) => s.kind)).toEqual(['engine']);
    const out = analyzed.graph.outputs[0];
    expectClose((await engine.run(ids))[out], (await fallback.run(ids))[out]);
  });

  it('never leave an engine segment: with the Gather forced to fallback, the Reshape falls back too', async () => {
    const analyzed = analyze(graph());
    using model = await compileModel(analyzed, { forcedFallback: ['Gather'] });
    const segments = model.segments();
    const reshape = segments.find((s) => s.opTypes.includes('Reshape'))!;
    expect(reshape.kind).toBe('fallback');
    using fallback = await compileModel(analyzed, { forcedFallback: ['*'] });
    const out = analyzed.graph.outputs[0];
    expectClose((await model.run(ids))[out], (await fallback.run(ids))[out]);
  });
});
