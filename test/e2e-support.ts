/** Helpers for the e2e, effect, model-file and CLI tests: fixture paths, temporary directories, random
 *  PyTorch-named networks written as ONNX + safetensors, and byte comparison of outputs. */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { encodeSegmentModel } from '../src/fallback/model.js';
import { GraphBuilder } from '../src/trace/builder.js';
import { tensorOf, type Tensor } from '../src/trace/ir.js';
import { writeSafetensors } from '../src/safetensors/index.js';
import { fixturesDir } from './support/safetensors.js';

export { fixturesDir };

export const fixture = (model: string, file: string): string => join(fixturesDir, model, file);

export const temporaryDirectory = (): { path: string } & Disposable => {
  const path = mkdtempSync(join(tmpdir(), 'trt-refit-e2e-'));
  return { path, [Symbol.dispose]: () => rmSync(path, { recursive: true, force: true }) };
};

/** Outputs as bytes, for bit-for-bit comparisons. */
export const outputBytes = (outputs: Record<string, Tensor>): Buffer =>
  Buffer.concat(Object.keys(outputs).sort().map((k) => Buffer.from(outputs[k].data.buffer, outputs[k].data.byteOffset, outputs[k].data.byteLength)));

/** A small deterministic generator (mulberry32). */
export const random = (seed: number): (() => number) => {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
};

export interface NetSpec {
  /** Widths: input, then each Linear layer's output. */
  readonly widths: readonly number[];
  readonly activation: 'Relu' | 'Tanh';
  readonly layerNorm: boolean;
  readonly batch: number;
}

/** Checkpoint tensors of a NetSpec in PyTorch naming (`layers.<i>.weight` [out, in], `.bias`, `norm.*`). */
export const randomWeights = (spec: NetSpec, seed: number): Map<string, { shape: number[]; data: Float32Array }> => {
  const next = random(seed);
  const fill = (n: number, scale: number) => Float32Array.from({ length: n }, () => Math.fround((next() * 2 - 1) * scale));
  const out = new Map<string, { shape: number[]; data: Float32Array }>();
  for (let i = 0; i + 1 < spec.widths.length; i++) {
    const [fanIn, fanOut] = [spec.widths[i], spec.widths[i + 1]];
    out.set(`layers.${i}.weight`, { shape: [fanOut, fanIn], data: fill(fanOut * fanIn, 1 / Math.sqrt(fanIn)) });
    out.set(`layers.${i}.bias`, { shape: [fanOut], data: fill(fanOut, 0.1) });
  }
  if (spec.layerNorm) {
    const w = spec.widths[spec.widths.length - 1];
    out.set('norm.weight', { shape: [w], data: Float32Array.from(fill(w, 0.2), (v) => Math.fround(1 + v)) });
    out.set('norm.bias', { shape: [w], data: fill(w, 0.1) });
  }
  return out;
};

/** The network as a legacy-style ONNX graph (Gemm with transB, node names by module path) holding `weights`. */
export const netOnnx = (spec: NetSpec, weights: ReadonlyMap<string, { shape: number[]; data: Float32Array }>): Uint8Array => {
  const b = new GraphBuilder('net', 17);
  let x = b.input('x', 'float32', [spec.batch, spec.widths[0]]);
  const init = (name: string) => b.initializer(name, tensorOf('float32', weights.get(name)!.shape, weights.get(name)!.data));
  for (let i = 0; i + 1 < spec.widths.length; i++) {
    x = b.op('Gemm', [x, init(`layers.${i}.weight`), init(`layers.${i}.bias`)], { transB: 1 }, `/layers.${i}/Gemm`);
    if (i + 2 < spec.widths.length) x = b.op(spec.activation, [x], {}, `/act${i}/${spec.activation}`);
  }
  if (spec.layerNorm) x = b.op('LayerNormalization', [x, init('norm.weight'), init('norm.bias')], { axis: -1, epsilon: 1e-5 }, '/norm/LayerNormalization');
  b.output(x);
  const graph = b.build();
  const shapes = new Map<string, readonly number[]>([['x', [spec.batch, spec.widths[0]]]]);
  return encodeSegmentModel({
    name: 'net', opset: 17, nodes: graph.nodes,
    inputs: [{ name: 'x', type: { dtype: 'float32', shape: shapes.get('x')! } }],
    outputs: [{ name: x, type: { dtype: 'float32', shape: [spec.batch, spec.widths[spec.widths.length - 1]] } }],
    initializers: new Map(graph.initializers.map((i) => [i.name, i.tensor])),
  });
};

export const writeCheckpoint = (path: string, weights: ReadonlyMap<string, { shape: number[]; data: Float32Array }>) =>
  writeSafetensors(path, [...weights].map(([name, t]) => ({ name, dtype: 'F32' as const, shape: t.shape, data: new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength) })));

/** Writes `net.onnx` and `weights.safetensors` of a spec and seed into a directory. */
export const writeNet = async (directory: string, spec: NetSpec, seed: number, tag = 'a'): Promise<{ onnx: string; checkpoint: string; weights: Map<string, { shape: number[]; data: Float32Array }> }> => {
  const weights = randomWeights(spec, seed);
  const onnx = join(directory, `net-${tag}.onnx`);
  writeFileSync(onnx, netOnnx(spec, weights));
  const checkpoint = join(directory, `weights-${tag}.safetensors`);
  await writeCheckpoint(checkpoint, weights);
  return { onnx, checkpoint, weights };
};

export const netInput = (spec: NetSpec, seed: number): Record<string, Tensor> => {
  const next = random(seed ^ 0x5bd1e995);
  return { x: { dtype: 'float32', shape: [spec.batch, spec.widths[0]], data: Float32Array.from({ length: spec.batch * spec.widths[0] }, () => next() * 2 - 1) } };
};
