/**
 * Every safetensors file of the real-exporter fixtures (written by the Python safetensors library) reads
 * with its shapes and values. Values are checked against sources independent of this reader: the ONNX
 * files' embedded initializers, ONNX Runtime's outputs for the stored inputs, and meta.json.
 */
import { readFileSync } from 'node:fs';
import { basename, dirname, join, relative, sep } from 'node:path';
import { describe, expect, it } from 'vitest';
import * as ort from 'onnxruntime-node';
import { openSafetensors, type SafetensorsFile } from '../src/safetensors/reader.js';
import { writeSafetensors } from '../src/safetensors/writer.js';
import { fixtureFiles, fixturesDir, temporaryDirectory } from './support/safetensors.js';
import { onnxInitializers } from './support/safetensors-onnx.js';

const models = ['mlp', 'cnn_bn', 'bert_tiny', 'gpt2_tiny'];
const meta = (model: string) => JSON.parse(readFileSync(join(fixturesDir, model, 'meta.json'), 'utf8')) as {
  inputs: string[];
  params: number;
  lora?: { r: number; alpha: number; targets: string[] };
};

describe('fixture files', () => {
  const files = fixtureFiles();
  it('are all there: every model folder has its checkpoints, inputs and expected outputs', () => {
    const folderOf = (f: string) => relative(fixturesDir, f).split(sep)[0];
    const folders = [...new Set(files.map(folderOf))];
    expect(folders.length).toBeGreaterThanOrEqual(4);
    for (const folder of folders) {
      for (const name of ['weights_v1', 'weights_v2', 'inputs', 'expected_v1', 'expected_v2']) {
        expect(files.some((f) => folderOf(f) === folder && basename(f) === `${name}.safetensors`), `${folder}/${name}.safetensors`).toBe(true);
      }
    }
  });

  for (const path of files) {
    it(`${basename(dirname(path))}/${basename(path)}: opens strictly and rewrites to the same bytes`, async () => {
      using dir = temporaryDirectory();
      using file = await openSafetensors(path);
      expect(file.tensors.size).toBeGreaterThan(0);
      for (const info of file.tensors.values()) {
        const count = info.shape.reduce((a, b) => a * b, 1);
        expect(file.toFloat32(info.name).length).toBe(count);
      }
      const copy = join(dir.path, 'copy.safetensors');
      await writeSafetensors(copy, file.names().map((n) => ({ ...file.info(n), data: file.bytes(n) })), file.metadata);
      expect(readFileSync(copy).equals(readFileSync(path))).toBe(true);
    });
  }
});

describe('checkpoint values against the ONNX initializers the exporter embedded', () => {
  for (const model of models) {
    it(`${model}: element counts match meta.json, and same-named initializers hold the same bytes`, async () => {
      using weights = await openSafetensors(join(fixturesDir, model, 'weights_v1.safetensors'));
      const total = [...weights.tensors.values()].reduce((n, t) => n + t.shape.reduce((a, b) => a * b, 1), 0);
      expect(total).toBe(meta(model).params);
      expect(weights.metadata).toEqual({ format: 'pt' });
      const initializers = onnxInitializers(readFileSync(join(fixturesDir, model, 'model_dynamo.onnx')));
      const shared = initializers.filter((i) => weights.tensors.has(i.name));
      expect(shared.length).toBeGreaterThan(0);
      let identical = 0;
      for (const init of shared) {
        const info = weights.info(init.name);
        expect(info.shape).toEqual(init.dims);
        if (init.dataType === 1) expect(info.dtype).toBe('F32');
        if (Buffer.from(weights.bytes(init.name)).equals(Buffer.from(init.bytes))) identical++;
        else expectBatchNormFolded(weights, init.name, new Float32Array(init.bytes.slice().buffer));
      }
      expect(identical).toBeGreaterThan(0);
      using v2 = await openSafetensors(join(fixturesDir, model, 'weights_v2.safetensors'));
      expect([...v2.tensors.values()].map((t) => [t.name, t.dtype, t.shape])).toEqual([...weights.tensors.values()].map((t) => [t.name, t.dtype, t.shape]));
    });
  }
});

/**
 * The dynamo exporter folds an eval-mode BatchNorm into the convolution before it (cnn_bn: conv `0` and
 * BatchNorm `1`, conv `3` and BatchNorm `4`) and keeps the convolution's names; check the folded values:
 * W' = W * g / sqrt(v + eps) per output channel, b' = (b - mean) * g / sqrt(v + eps) + beta.
 */
const expectBatchNormFolded = (weights: SafetensorsFile, name: string, folded: Float32Array): void => {
  const match = /^(\d+)\.(weight|bias)$/.exec(name);
  expect(match).not.toBeNull();
  const [, layer, role] = match as unknown as [string, string, string];
  const bn = String(Number(layer) + 1);
  const gamma = weights.toFloat32(`${bn}.weight`);
  const beta = weights.toFloat32(`${bn}.bias`);
  const mean = weights.toFloat32(`${bn}.running_mean`);
  const variance = weights.toFloat32(`${bn}.running_var`);
  const original = weights.toFloat32(name);
  const channels = gamma.length;
  const perChannel = original.length / channels;
  for (let i = 0; i < original.length; i++) {
    const c = Math.floor(i / perChannel);
    const scale = (gamma[c] as number) / Math.sqrt((variance[c] as number) + 1e-5);
    const want = role === 'weight' ? (original[i] as number) * scale : ((original[i] as number) - (mean[c] as number)) * scale + (beta[c] as number);
    expect(Math.abs((folded[i] as number) - want)).toBeLessThanOrEqual(1e-5 + 1e-5 * Math.abs(want));
  }
};

const ortTensor = (file: SafetensorsFile, name: string): ort.Tensor => {
  const info = file.info(name);
  const bytes = file.bytes(name).slice();
  if (info.dtype === 'I64') return new ort.Tensor('int64', new BigInt64Array(bytes.buffer), [...info.shape]);
  if (info.dtype === 'F32') return new ort.Tensor('float32', new Float32Array(bytes.buffer), [...info.shape]);
  throw new Error(`unexpected input dtype ${info.dtype}`);
};

describe('inputs and expected outputs against ONNX Runtime', () => {
  for (const model of models) {
    it(`${model}: the model run on inputs.safetensors gives expected_v1.safetensors`, async () => {
      using inputs = await openSafetensors(join(fixturesDir, model, 'inputs.safetensors'));
      using expected = await openSafetensors(join(fixturesDir, model, 'expected_v1.safetensors'));
      expect(inputs.names().sort()).toEqual([...meta(model).inputs].sort());
      const session = await ort.InferenceSession.create(join(fixturesDir, model, 'model_dynamo.onnx'));
      const feeds = Object.fromEntries(session.inputNames.map((n) => [n, ortTensor(inputs, n)]));
      const outputs = await session.run(feeds);
      const got = outputs[session.outputNames[0] as string] as ort.Tensor;
      const want = expected.toFloat32('output');
      expect(got.dims).toEqual(expected.info('output').shape);
      const values = got.data as Float32Array;
      for (let i = 0; i < want.length; i++) {
        expect(Math.abs((values[i] as number) - (want[i] as number))).toBeLessThanOrEqual(1e-4 + 1e-4 * Math.abs(want[i] as number));
      }
      await session.release();
    });
  }
});
