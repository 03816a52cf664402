/**
 * A quantized checkpoint through the weight map (src/quant/mapped.ts), staged by hand the way the refit
 * effect is to stage it: weights_v2 quantized with src/quant's quantizer and written under
 * compressed-tensors names refits an int8 / int4 compiled fixture to exactly the engines a refit from float
 * weights_v2 gives (copy path: no re-quantizing); into a float compiled model it comes dequantized and
 * matches expected_v2 within the format's bound; a format or group size mismatch names the tensor.
 */
import { describe, expect, it } from 'vitest';
import { join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import type { Engine } from '../ffi/engine.js';
import { compile, type CompileOptions } from '../src/compile/index.js';
import { refitModel } from '../src/effect/index.js';
import type { RefitModel } from '../src/model/index.js';
import { openCheckpoint, type Checkpoint } from '../src/checkpoint/checkpoint.js';
import { openSafetensors, writeSafetensors, type SafetensorsFile } from '../src/safetensors/index.js';
import { evaluateExpr, type F32Tensor } from '../src/weightmap/evaluate.js';
import { readF32 } from '../src/weightmap/store.js';
import { findQuantized, type QuantizedEntry } from '../src/quant/checkpoint.js';
import { dequantizedSource, mappedPathOf, stagedQuantized, type MappedPath } from '../src/quant/mapped.js';
import { packInt4, quantize, type QuantFormat } from '../src/quant/reference.js';
import type { QuantIssue } from '../src/quant/errors.js';
import { readSafetensors } from './support/h5-safetensors.js';
import { fixture, outputBytes, temporaryDirectory } from './e2e-support.js';

const bytesOf = (a: ArrayBufferView) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

/** `checkpoint` with every tensor in `kernels` quantized ([out, in], per output channel), the rest F32. */
const writeQuantized = async (path: string, checkpoint: Checkpoint, kernels: ReadonlySet<string>, format: QuantFormat): Promise<void> => {
  const out = [];
  for (const [name, info] of checkpoint.tensors) {
    const data = checkpoint.toFloat32(name);
    if (!kernels.has(name)) {
      out.push({ name, dtype: 'F32' as const, shape: [...info.shape], data: bytesOf(data) });
      continue;
    }
    const g = { channels: info.shape[0], depth: info.shape.slice(1).reduce((a, b) => a * b, 1), transposed: true };
    const q = quantize(format, data, g);
    if (format.kind === 'int4') out.push({ name, dtype: 'U8' as const, shape: [g.channels, Math.ceil(g.depth / 2)], data: packInt4(q.values as Int8Array, g) });
    else out.push({ name, dtype: format.kind === 'int8' ? ('I8' as const) : ('F8_E4M3' as const), shape: [...info.shape], data: bytesOf(q.values) });
    const groups = q.scales.length / g.channels;
    out.push({ name: `${name}_scale`, dtype: 'F32' as const, shape: format.kind === 'int4' ? [g.channels, groups] : [g.channels], data: bytesOf(q.scales) });
  }
  await writeSafetensors(path, out);
};

/** Sources the model's kernel targets read directly (what a compressed-tensors export quantizes). */
const kernelSources = (model: RefitModel): Set<string> =>
  new Set(model.weightMap.targets.flatMap((t) => (t.status === 'mapped' && t.role === 'kernel' && t.expr.op === 'source' ? [t.expr.name] : [])));

interface Staged {
  readonly paths: Map<string, MappedPath['path']>;
}

/** Stages every mapped engine target of `model` from a quantized checkpoint file and applies, per engine:
 *  copy targets with setQuantizedWeights, the rest evaluated over dequantized / float sources. */
const refitFromQuantized = (model: RefitModel, file: SafetensorsFile, store: Checkpoint): E.Either<QuantIssue, Staged> => {
  const found = findQuantized(file);
  if (E.isLeft(found)) return found;
  const quantized = new Map<string, QuantizedEntry>(found.right.map((e) => [e.weight, e]));
  const recorded = new Map(model.weightMap.sources.map((s) => [s.name, s.shape]));
  const lookup = (name: string): F32Tensor | undefined => {
    const entry = quantized.get(name);
    if (entry === undefined) return readF32(store, name);
    const d = dequantizedSource(file, entry, recorded.get(name)!);
    if (E.isLeft(d)) throw new Error(JSON.stringify(d.left));
    return d.right;
  };
  const paths = new Map<string, MappedPath['path']>();
  // Decide every path first (a mismatch changes nothing), then stage and apply.
  const decided: { stage: (typeof model.engineStages extends () => (infer S)[] ? S : never); target: (typeof model.weightMap.targets)[number]; path: MappedPath }[] = [];
  for (const stage of model.engineStages()) {
    const engine = stage.engine as Engine;
    const formats = new Map(engine.kernelFormats().map((k) => [`${k.layer}\u0000${k.role}`, k]));
    for (const target of model.weightMap.targets) {
      if (target.kind !== 'engine' || target.segment !== stage.record.index || target.status !== 'mapped') continue;
      const path = mappedPathOf(target, quantized, (n) => recorded.get(n), formats.get(`${target.layer}\u0000${target.role}`), false);
      if (E.isLeft(path)) return path;
      paths.set(target.id, path.right.path);
      decided.push({ stage, target, path: path.right });
    }
  }
  for (const stage of model.engineStages()) {
    using refitter = (stage.engine as Engine).createRefitter();
    for (const { target, path } of decided.filter((d) => d.stage === stage)) {
      if (path.path === 'copy') refitter.setQuantizedWeights(target.layer!, target.role!, stagedQuantized(file, path, target.layer!));
      else {
        const v = evaluateExpr(target.expr, lookup);
        if (E.isLeft(v)) throw new Error(JSON.stringify(v.left));
        refitter.setWeights(target.layer!, target.role!, { dtype: 'float32', shape: [...target.shape], data: v.right.data });
      }
    }
    refitter.apply();
  }
  return E.right({ paths });
};

const engineFiles = (model: RefitModel) => model.engineStages().map((s) => Buffer.from((s.engine as Engine).serialize({ includeWeights: true })));

const relativeError = (got: Float32Array, want: Float32Array): number => {
  let err = 0;
  let mag = 0;
  for (let i = 0; i < want.length; i++) {
    err = Math.max(err, Math.abs(got[i] - want[i]));
    mag = Math.max(mag, Math.abs(want[i]));
  }
  return Number.isFinite(err) ? err / mag : Infinity;
};

const CASES: readonly [string, string, QuantFormat, CompileOptions][] = [
  ['mlp', 'model_dynamo.onnx', { kind: 'int8' }, { weightFormat: { kind: 'int8' } }],
  ['mlp', 'model_legacy.onnx', { kind: 'int4', groupSize: 32 }, { weightFormat: { kind: 'int4', groupSize: 32 } }],
  ['bert_tiny', 'model_dynamo.onnx', { kind: 'int8' }, { weightFormat: { kind: 'int8' } }],
  ['bert_tiny', 'model_dynamo.onnx', { kind: 'int4', groupSize: 32 }, { weightFormat: { kind: 'int4', groupSize: 32 } }],
  ['bert_tiny', 'model_dynamo.onnx', { kind: 'fp8_e4m3' }, { weightFormat: { kind: 'fp8' } }],
];
const BOUND: Record<string, number> = { int8: 2e-2, fp8_e4m3: 1e-1, int4: 2.5e-1 };

describe('a quantized checkpoint through the weight map', () => {
  it.each(CASES)('%s/%s %o: copy path equals a refit from float v2, bit for bit; a float model takes it dequantized', async (model, file, format, options) => {
    const onnx = fixture(model, file);
    const v1 = fixture(model, 'weights_v1.safetensors');
    const inputs = readSafetensors(fixture(model, 'inputs.safetensors'));
    using dir = temporaryDirectory();
    const qpath = join(dir.path, 'quantized.safetensors');
    using quantizedModel = await compile(onnx, v1, options);
    expect(kernelSources(quantizedModel).size).toBeGreaterThan(0);
    {
      using v2 = await openCheckpoint(fixture(model, 'weights_v2.safetensors'));
      await writeQuantized(qpath, v2, kernelSources(quantizedModel), format);
    }
    using qfile = await openSafetensors(qpath);
    using qstore = await openCheckpoint(qpath);

    using viaFloat = await compile(onnx, v1, options);
    await refitModel(viaFloat, { checkpoint: fixture(model, 'weights_v2.safetensors') });
    const before = engineFiles(quantizedModel);
    const staged = refitFromQuantized(quantizedModel, qfile, qstore);
    if (E.isLeft(staged)) throw new Error(JSON.stringify(staged.left));
    const paths = [...staged.right.paths.values()];
    expect(paths.filter((p) => p === 'copy').length).toBe(kernelSources(quantizedModel).size);
    expect(paths.includes('dequantize')).toBe(false);
    const after = engineFiles(quantizedModel);
    expect(after.some((b, i) => !b.equals(before[i]))).toBe(true);
    after.forEach((b, i) => expect(b.equals(engineFiles(viaFloat)[i])).toBe(true));
    expect(outputBytes(await quantizedModel.run(inputs))).toEqual(outputBytes(await viaFloat.run(inputs)));

    // Into a float model: dequantized on the way in, within the format's bound of PyTorch's v2 output.
    using floatModel = await compile(onnx, v1);
    const intoFloat = refitFromQuantized(floatModel, qfile, qstore);
    if (E.isLeft(intoFloat)) throw new Error(JSON.stringify(intoFloat.left));
    expect([...intoFloat.right.paths.values()].filter((p) => p === 'dequantize').length).toBe(kernelSources(floatModel).size);
    const output = floatModel.outputs[0];
    const got = (await floatModel.run(inputs))[output].data as Float32Array;
    expect(relativeError(got, readSafetensors(fixture(model, 'expected_v2.safetensors')).output.data as Float32Array)).toBeLessThan(BOUND[format.kind]);
  });

  it('a group size or format mismatch names the tensor and changes nothing', async () => {
    const onnx = fixture('mlp', 'model_dynamo.onnx');
    const v1 = fixture('mlp', 'weights_v1.safetensors');
    const inputs = readSafetensors(fixture('mlp', 'inputs.safetensors'));
    using dir = temporaryDirectory();
    using int4 = await compile(onnx, v1, { weightFormat: { kind: 'int4', groupSize: 32 } });
    using fp8 = await compile(onnx, v1, { weightFormat: { kind: 'fp8' } });
    for (const [name, format, model, tag, tensor] of [
      ['g64.safetensors', { kind: 'int4', groupSize: 64 }, int4, 'GroupSizeMismatch', /\.weight_scale$/],
      ['i8.safetensors', { kind: 'int8' }, fp8, 'FormatMismatch', /\.weight$/],
    ] as const) {
      const path = join(dir.path, name);
      {
        using v2 = await openCheckpoint(fixture('mlp', 'weights_v2.safetensors'));
        await writeQuantized(path, v2, kernelSources(model), format);
      }
      using file = await openSafetensors(path);
      using store = await openCheckpoint(path);
      const before = outputBytes(await model.run(inputs));
      const r = refitFromQuantized(model, file, store);
      expect(E.isLeft(r) && r.left._tag).toBe(tag);
      expect(E.isLeft(r) && 'tensor' in r.left && r.left.tensor).toMatch(tensor);
      expect(outputBytes(await model.run(inputs))).toEqual(before);
    }
  });
});
