import { describe, expect, it } from 'vitest';
import * as E from 'fp-ts/lib/Either.js';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { traceOnnx } from '../src/trace/load.js';
import { analyzeGraph } from '../src/trace/analyze.js';
import { compileModel, referenceEngine } from '../src/partition/compiled.js';
import { GraphBuilder } from '../src/trace/builder.js';
import { tensorOf } from '../src/trace/ir.js';
import { printProvenance, provenanceSources } from '../src/trace/provenance.js';
import { networkWeights } from '../src/network/types.js';
import { readSafetensors } from './support/h5-safetensors.js';
import { expectClose } from './support/h5-close.js';

const fixtures = '/work/shared/fixtures';
const models = ['mlp', 'cnn_bn', 'bert_tiny', 'gpt2_tiny'].flatMap((m) =>
  ['model_dynamo.onnx', 'model_legacy.onnx'].map((f) => join(fixtures, m, f)).filter(existsSync));


describe('lowered engine segments (reference evaluator as the engine)', () => {
  it.each(models)('%s matches PyTorch', async (path) => {
    const analyzed = await traceOnnx(path);
    using model = await compileModel(analyzed, { engine: referenceEngine });
    const segments = model.segments();
    expect(segments.some((s) => s.kind === 'engine')).toBe(true);
    const inputs = readSafetensors(join(path, '..', 'inputs.safetensors'));
    const out = await model.run(inputs);
    expectClose(out[analyzed.graph.outputs[0]], readSafetensors(join(path, '..', 'expected_v1.safetensors')).output);
  });

  it('mlp and cnn_bn lower entirely to engine segments', async () => {
    for (const path of models.filter((p) => /mlp|cnn_bn/.test(p))) {
      using model = await compileModel(await traceOnnx(path));
      expect(model.segments().map((s) => s.kind)).toEqual(['engine']);
    }
  });

  it('every network weight records the initializers it came from', async () => {
    using legacy = await compileModel(await traceOnnx(join(fixtures, 'mlp/model_legacy.onnx')));
    const [net] = legacy.lowered();
    const byKey = new Map(net.weights.map((w) => [`${w.layer}:${w.role}`, w.provenance]));
    // Every weight the network holds has a recorded origin.
    for (const w of networkWeights(net.network)) expect(byKey.has(`${w.layer}:${w.role}`)).toBe(true);
    expect(printProvenance(byKey.get('/0/Gemm:kernel')!)).toBe('init:0.weight'); // Gemm transB=1: the Linear weight as is
    expect(printProvenance(byKey.get('/0/Gemm:bias')!)).toBe('init:0.bias');

    using gpt2 = await compileModel(await traceOnnx(join(fixtures, 'gpt2_tiny/model_dynamo.onnx')));
    const weights = gpt2.lowered().flatMap((l) => l.weights);
    // lm_head: the exporter transposed it (folded); the FC kernel transposes back: the initializer itself.
    const lm = weights.find((w) => w.layer === 'node_linear' && w.role === 'kernel')!;
    expect(printProvenance(lm.provenance)).toBe('init:lm_head.weight');
    // The token embedding table is a constant layer fed to a gather.
    expect(weights.some((w) => w.role === 'constant' && provenanceSources(w.provenance).includes('lm_head.weight'))).toBe(true);

    using bert = await compileModel(await traceOnnx(join(fixtures, 'bert_tiny/model_dynamo.onnx')));
    const q = bert.lowered().flatMap((l) => l.weights).find((w) => w.layer === 'node_MatMul_54')!;
    expect(printProvenance(q.provenance)).toBe('Transpose[perm=1,0](init:val_55)');
  });

  it('Conv + BatchNormalization + pooling lower and agree with ONNX Runtime', async () => {
    const b = new GraphBuilder('convbn', 18);
    const values = (n: number, seed: number) => Array.from({ length: n }, (_, i) => Math.sin(seed + i * 0.37));
    const x = b.input('x', 'float32', [1, 2, 7, 7]);
    const w = b.initializer('w', tensorOf('float32', [4, 2, 3, 3], values(72, 1)));
    const conv = b.op('Conv', [x, w, b.initializer('cb', tensorOf('float32', [4], values(4, 2)))], { pads: [1, 1, 1, 1] });
    const bn = b.op('BatchNormalization', [conv, ...['s', 'sh', 'm'].map((n, i) => b.initializer(n, tensorOf('float32', [4], values(4, 3 + i)))), b.initializer('v', tensorOf('float32', [4], [0.5, 1, 1.5, 2]))], { epsilon: 1e-5 });
    const pooled = b.op('MaxPool', [b.op('Relu', [bn])], { kernel_shape: [2, 2], strides: [2, 2] });
    const avg = b.op('AveragePool', [pooled], { kernel_shape: [2, 2] });
    b.output(b.op('Flatten', [b.op('GlobalAveragePool', [avg])]));
    const analyzed = analyzeGraph(b.build());
    if (E.isLeft(analyzed)) throw new Error(JSON.stringify(analyzed.left));
    using engine = await compileModel(analyzed.right);
    using fallback = await compileModel(analyzed.right, { forcedFallback: ['*'] });
    expect(engine.segments().map((s) => s.kind)).toEqual(['engine']);
    const input = { x: Float32Array.from(values(98, 9)) };
    const out = analyzed.right.graph.outputs[0];
    expectClose((await engine.run(input))[out], (await fallback.run(input))[out]);
    const roles = engine.lowered()[0].weights.map((w) => `${w.role}:${provenanceSources(w.provenance).join()}`);
    expect(roles).toEqual(['kernel:w', 'bias:cb', 'scale:s', 'shift:sh', 'mean:m', 'variance:v']);
  });
});
