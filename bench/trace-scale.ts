/**
 * trace-scale: import (ONNX bytes -> Graph), shape inference + folding, and partition time for synthetic
 * graphs of 1k, 10k and 100k nodes (growth should be linear: the per-node ratios compare each size with
 * 1k), and the run latency of each fixture through our compiled model (engine segments on the native
 * libtrtshim engine, the rest on ONNX Runtime) against the same model entirely on ONNX Runtime, in the
 * same run.
 */
import * as E from 'fp-ts/lib/Either.js';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { bestOf, writeResult, type Figure } from './lib.js';
import { GraphBuilder } from '../src/trace/builder.js';
import { tensorOf, type Graph } from '../src/trace/ir.js';
import { decodeOnnx } from '../src/trace/decode.js';
import { analyzeGraph } from '../src/trace/analyze.js';
import { partitionGraph } from '../src/partition/index.js';
import { encodeSegmentModel } from '../src/fallback/model.js';
import { traceOnnx } from '../src/trace/load.js';
import { compileModel } from '../src/partition/compiled.js';
import { nativeEngine } from '../src/partition/native.js';
import { readSafetensors } from '../test/support/h5-safetensors.js';

/** A transformer-like chain: MatMul, Add bias, an activation, and every fifth node a fallback-only op. */
const synthetic = (nodes: number): Graph => {
  const b = new GraphBuilder('synthetic', 18);
  let t = b.input('x', 'float32', [1, 8]);
  const w = b.initializer('w', tensorOf('float32', [8, 8], new Array(64).fill(0.01)));
  const bias = b.initializer('bias', tensorOf('float32', [8], new Array(8).fill(0.1)));
  const zero = b.constant('zero', 'float32', [], [0]);
  // Counted here: calling b.build() per step would copy the node list each time (quadratic, and its
  // garbage slowed the timed phases of the 100k graph).
  let count = 1; // the Constant node
  for (let i = 0; count < nodes; i++) {
    if (i % 5 === 4) {
      t = b.op('Where', [b.op('IsNaN', [t]), zero, t]);
      count += 2;
    } else {
      t = b.op(['MatMul', 'Add', 'Relu', 'Tanh'][i % 4], i % 4 === 0 ? [t, w] : i % 4 === 1 ? [t, bias] : [t]);
      count += 1;
    }
  }
  b.output(t);
  return b.build();
};

export const run = async (): Promise<void> => {
  const figures: Record<string, Figure> = {};
  const ratios: Record<string, number> = {};
  const perNode: Record<number, number> = {};
  const phases: Record<number, { import: number; infer: number; partition: number }> = {};
  for (const size of [1_000, 10_000, 100_000]) {
    const graph = synthetic(size);
    const opset = graph.opset;
    const bytes = encodeSegmentModel({
      name: 'synthetic', opset, nodes: graph.nodes,
      inputs: graph.inputs.map((i) => ({ name: i.name, type: { dtype: i.dtype, shape: i.shape as number[] } })),
      outputs: [{ name: graph.outputs[0], type: { dtype: 'float32', shape: [1, 8] } }],
      initializers: new Map(graph.initializers.map((i) => [i.name, i.tensor])),
    });
    const repeats = size >= 100_000 ? 2 : 5;
    const importS = await bestOf(repeats, () => decodeOnnx(bytes));
    const decoded = decodeOnnx(bytes);
    if (E.isLeft(decoded)) throw new Error(JSON.stringify(decoded.left));
    const inferS = await bestOf(repeats, () => analyzeGraph(decoded.right));
    const analyzed = analyzeGraph(decoded.right);
    if (E.isLeft(analyzed)) throw new Error(JSON.stringify(analyzed.left));
    const partS = await bestOf(repeats, () => partitionGraph(analyzed.right, { minSegmentSize: 2 }));
    const total = importS + inferS + partS;
    figures[`import_${size}`] = { value: importS * 1e3, unit: 'ms' };
    figures[`infer_${size}`] = { value: inferS * 1e3, unit: 'ms' };
    figures[`partition_${size}`] = { value: partS * 1e3, unit: 'ms' };
    perNode[size] = total / size;
    phases[size] = { import: importS / size, infer: inferS / size, partition: partS / size };
  }
  ratios['per_node_time_10k_vs_1k'] = perNode[10_000] / perNode[1_000];
  ratios['per_node_time_100k_vs_1k'] = perNode[100_000] / perNode[1_000];
  for (const phase of ['import', 'infer', 'partition'] as const) ratios[`per_node_${phase}_100k_vs_1k`] = phases[100_000][phase] / phases[1_000][phase];

  const fixtures = '/work/shared/fixtures';
  for (const model of ['mlp', 'cnn_bn', 'bert_tiny', 'gpt2_tiny']) {
    const path = join(fixtures, model, 'model_dynamo.onnx');
    if (!existsSync(path)) continue;
    const analyzed = await traceOnnx(path);
    const inputs = readSafetensors(join(fixtures, model, 'inputs.safetensors'));
    using ours = await compileModel(analyzed, { engine: nativeEngine() });
    using ort = await compileModel(analyzed, { forcedFallback: ['*'] });
    const oursS = await bestOf(10, () => ours.run(inputs), 2);
    const ortS = await bestOf(10, () => ort.run(inputs), 2);
    figures[`run_${model}_ours`] = { value: oursS * 1e3, unit: 'ms' };
    figures[`run_${model}_onnxruntime`] = { value: ortS * 1e3, unit: 'ms' };
    ratios[`run_${model}_ours_vs_onnxruntime`] = oursS / ortS;
    const segments = ours.segments();
    figures[`segments_${model}_engine`] = { value: segments.filter((s) => s.kind === 'engine').length, unit: 'segments' };
    figures[`segments_${model}_fallback`] = { value: segments.filter((s) => s.kind === 'fallback').length, unit: 'segments' };
  }
  writeResult('trace-scale', figures, ratios);
};
