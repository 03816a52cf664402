/**
 * Quantized weight formats through the compile path (issue 8): every fixture compiles with
 * `weightFormat` int8 / fp8 / int4:32, its quantized kernels are really quantized, its outputs stay within
 * the README's error bounds of PyTorch's expected_v1, the .trtr records the format, and a refit to v2
 * equals a fresh build in the same format from v2's weights, bit for bit (engine files and outputs).
 */
import { describe, expect, it } from 'vitest';
import { join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import { buildEngine, type Engine } from '../ffi/engine.js';
import { compile, engineBuildOptions, planCompile, weightSettingsOf, CompileError, type CompileOptions, type EngineBuilder } from '../src/compile/index.js';
import { planKey } from '../src/compile/cached.js';
import { refitModel } from '../src/effect/index.js';
import { readModelFile, writeModelFile, type RefitModel } from '../src/model/index.js';
import { BuildInfoCodec, weightFormatOf } from '../src/model/format.js';
import { openCheckpoint } from '../src/checkpoint/checkpoint.js';
import { evaluateExpr } from '../src/weightmap/evaluate.js';
import { readF32 } from '../src/weightmap/store.js';
import type { Layer, NetworkDefinition, WeightRole, Weights } from '../src/network/types.js';
import type { Tensor } from '../src/trace/ir.js';
import type { WeightFormat } from '../src/quant/format.js';
import { readFileSync } from 'node:fs';
import { readSafetensors } from './support/h5-safetensors.js';
import { fixtureModels, originalFixtures, traceForRefit } from './support/weightmap.js';
import { compileModel, type EngineFactory } from '../src/partition/compiled.js';
import { nativeEngine, type NativeEngineRunner } from '../src/partition/native.js';
import { outputBytes, temporaryDirectory } from './e2e-support.js';

/** README "Error bounds", fixtures column (relative to the largest expected output). */
const BOUNDS = { int8: 2e-2, fp8: 1e-1, 'int4:32': 2.5e-1 } as const;
const FORMATS: readonly [keyof typeof BOUNDS, WeightFormat, string][] = [
  ['int8', { kind: 'int8' }, 'int8'],
  ['fp8', { kind: 'fp8' }, 'fp8_e4m3'],
  ['int4:32', { kind: 'int4', groupSize: 32 }, 'int4'],
];

const relativeError = (got: Tensor, want: Tensor): number => {
  expect(got.shape).toEqual(want.shape);
  const g = got.data as Float32Array;
  const w = want.data as Float32Array;
  let err = 0;
  let mag = 0;
  for (let i = 0; i < w.length; i++) {
    err = Math.max(err, Math.abs(g[i] - w[i]));
    mag = Math.max(mag, Math.abs(w[i]));
  }
  return Number.isFinite(err) ? err / mag : Infinity;
};

const field: Readonly<Record<WeightRole, string>> = { kernel: 'kernel', bias: 'bias', scale: 'scale', shift: 'shift', mean: 'mean', variance: 'variance', constant: 'weights' };

/** The network with some weights replaced, addressed by layer and role. */
const withWeights = (network: NetworkDefinition, values: ReadonlyMap<string, Float32Array>, segment: number): NetworkDefinition => ({
  ...network,
  layers: network.layers.map((layer): Layer => {
    let out = layer as unknown as Record<string, unknown>;
    for (const role of Object.keys(field) as WeightRole[]) {
      const value = values.get(`engine/${segment}/${layer.name}/${role}`);
      const old = (layer as unknown as Record<string, Weights | undefined>)[field[role]];
      if (value !== undefined && old !== undefined) out = { ...out, [field[role]]: { dtype: 'float32', shape: old.shape, data: value } satisfies Weights };
    }
    return out as unknown as Layer;
  }),
});

/** A fresh compile of `onnx` whose engines are built from `checkpoint`'s values (through the weight map the
 *  build checkpoint gives) instead of the ONNX file's: what compiling a v2 export would give. */
const freshCompile = async (onnx: string, build: string, checkpoint: string, options: CompileOptions): Promise<RefitModel> => {
  using v1 = await openCheckpoint(build);
  using v2 = await openCheckpoint(checkpoint);
  const plan = planCompile(onnx, new Uint8Array(readFileSync(onnx)), v1, options);
  if (E.isLeft(plan)) throw new CompileError(plan.left);
  const values = new Map<string, Float32Array>();
  for (const t of plan.right.weightMap.targets) {
    if (t.status !== 'mapped' || t.kind !== 'engine') continue;
    const v = evaluateExpr(t.expr, (name) => readF32(v2, name));
    if (E.isLeft(v)) throw new Error(`${t.id}: ${JSON.stringify(v.left)}`);
    values.set(t.id, v.right.data);
  }
  const builder: EngineBuilder = (network, segment, buildOptions) => buildEngine(withWeights(network, values, segment), buildOptions);
  // The builder deliberately builds other values than the network holds: read-back would (rightly) refuse it.
  return compile(onnx, build, options, { buildEngine: builder, readback: false });
};

const engineFiles = (model: RefitModel): Uint8Array[] => model.engineStages().map((s) => (s.engine as Engine).serialize({ includeWeights: true }));

describe('compile --weight-format: options', () => {
  it('a float weight format is a precision: a different weightPrecision beside it is refused', async () => {
    expect(E.isLeft(weightSettingsOf({ weightFormat: { kind: 'fp16' }, weightPrecision: 'bfloat16' }))).toBe(true);
    expect(weightSettingsOf({ weightFormat: { kind: 'bf16' }, weightPrecision: 'bfloat16' })).toEqual(E.right({ weightPrecision: 'bfloat16', weightFormat: { kind: 'bf16' }, convWeightFormat: 'same' }));
    expect(weightSettingsOf({ weightPrecision: 'float16' })).toEqual(E.right({ weightPrecision: 'float16', weightFormat: { kind: 'fp16' }, convWeightFormat: 'same' }));
    const [f] = fixtureModels(originalFixtures);
    const dir = join(f.path, '..');
    await expect(compile(f.path, join(dir, 'weights_v1.safetensors'), { weightFormat: { kind: 'fp32' }, weightPrecision: 'float16' })).rejects.toMatchObject({ _tag: 'ConflictingOptions' });
  });

  it('the weight format is part of the cache key; equal settings spelled two ways give one key', async () => {
    const [f] = fixtureModels(originalFixtures);
    using v1 = await openCheckpoint(join(f.path, '..', 'weights_v1.safetensors'));
    const plan = planCompile(f.path, new Uint8Array(readFileSync(f.path)), v1);
    if (E.isLeft(plan)) throw new CompileError(plan.left);
    const key = (o: CompileOptions) => planKey(plan.right, engineBuildOptions(o)).digest;
    const keys = [{}, { weightFormat: { kind: 'int8' } }, { weightFormat: { kind: 'fp8' } }, { weightFormat: { kind: 'int4', groupSize: 32 } }, { weightFormat: { kind: 'int4', groupSize: 64 } }, { weightFormat: { kind: 'fp16' } }, { weightFormat: { kind: 'int8' }, convWeightFormat: 'float' }]
      .map((o) => key(o as CompileOptions));
    expect(new Set(keys).size).toBe(keys.length);
    expect(key({ weightFormat: { kind: 'fp16' } })).toBe(key({ weightPrecision: 'float16' }));
    expect(key({ weightFormat: { kind: 'fp32' } })).toBe(key({}));
  });

  it('build info: older files (no weightFormat) read as their float precision; a bad format is refused', () => {
    const old = BuildInfoCodec.decode({ weightPrecision: 'float16', tacticSearch: false, allowUnmapped: false, source: 'x.onnx' });
    expect(E.isRight(old) && weightFormatOf(old.right)).toBe('fp16');
    const quantized = BuildInfoCodec.decode({ weightPrecision: 'float32', tacticSearch: false, allowUnmapped: false, source: 'x.onnx', weightFormat: 'INT4:64' });
    expect(E.isRight(quantized) && weightFormatOf(quantized.right)).toBe('int4:64');
    expect(E.isLeft(BuildInfoCodec.decode({ weightPrecision: 'float32', tacticSearch: false, allowUnmapped: false, source: 'x.onnx', weightFormat: 'int4:48' }))).toBe(true);
  });
});

describe('every fixture compiles in int8, fp8 and int4; a refit to v2 equals a fresh compile with v2', () => {
  const cases = fixtureModels(originalFixtures).flatMap((f) => FORMATS.map(([name, format, kernel]) => [`${f.model}/${f.file} ${name}`, f.path, name, format, kernel] as const));
  it.each(cases)('%s', async (_title, path, name, format, kernel) => {
    const dir = join(path, '..');
    const inputs = readSafetensors(join(dir, 'inputs.safetensors'));
    const expected = (which: string) => readSafetensors(join(dir, `${which}.safetensors`)).output;
    const options: CompileOptions = { weightFormat: format };
    using compiled = await compile(path, join(dir, 'weights_v1.safetensors'), options);
    // The GEMM kernels really are quantized (and only kernels are).
    const formats = compiled.engineStages().flatMap((s) => (s.engine as Engine).kernelFormats());
    const quantized = formats.filter((w) => w.format !== 'asPrecision');
    expect(quantized.length).toBeGreaterThan(0);
    expect(quantized.every((w) => w.format === kernel && w.role === 'kernel')).toBe(true);
    if (format.kind === 'int4') expect(quantized.every((w) => w.groupSize === 32)).toBe(true);
    expect(weightFormatOf(compiled.description.build)).toBe(name);

    const output = compiled.outputs[0];
    const errorV1 = relativeError((await compiled.run(inputs))[output], expected('expected_v1'));
    expect(errorV1).toBeLessThan(BOUNDS[name]);
    if (process.env.TRT_REFIT_QUANT_REPORT === '1') console.log(`${_title}: error against expected_v1 ${errorV1.toExponential(2)}`);

    // Refit to v2 (the engine re-quantizes) equals a build in the same format from v2's weights.
    using fresh = await freshCompile(path, join(dir, 'weights_v1.safetensors'), join(dir, 'weights_v2.safetensors'), options);
    const built = engineFiles(fresh);
    const before = engineFiles(compiled);
    expect(before.some((bytes, i) => !Buffer.from(bytes).equals(Buffer.from(built[i])))).toBe(true);
    await refitModel(compiled, { checkpoint: join(dir, 'weights_v2.safetensors') });
    const refitted = engineFiles(compiled);
    expect(refitted.length).toBe(built.length);
    refitted.forEach((bytes, i) => expect(Buffer.from(bytes).equals(Buffer.from(built[i]))).toBe(true));
    const outV2 = await compiled.run(inputs);
    expect(outputBytes(outV2)).toEqual(outputBytes(await fresh.run(inputs)));
    expect(relativeError(outV2[output], expected('expected_v2'))).toBeLessThan(BOUNDS[name]);

    // The .trtr records the format and reads back the same engines.
    using files = temporaryDirectory();
    const file = join(files.path, 'model.trtr');
    await writeModelFile(compiled, file);
    using reread = await readModelFile(file);
    expect(reread.description.build.weightFormat).toBe(name);
    expect(outputBytes(await reread.run(inputs))).toEqual(outputBytes(outV2));
  });
});

describe('nativeEngine (CompiledModel) takes the weight format too', () => {
  it('builds int4:32 kernels; outputs within the bound; a contradicting precision is refused', async () => {
    const path = fixtureModels(originalFixtures).find((f) => f.model === 'mlp')!.path;
    const dir = join(path, '..');
    const runners: NativeEngineRunner[] = [];
    const inner = nativeEngine({ weightFormat: { kind: 'int4', groupSize: 32 } });
    const factory: EngineFactory = (network, segment) => {
      const r = inner(network, segment) as NativeEngineRunner;
      runners.push(r);
      return r;
    };
    using model = await compileModel(traceForRefit(path).analyzed, { engine: factory });
    const kernels = runners.flatMap((r) => r.engine.kernelFormats()).filter((w) => w.format !== 'asPrecision');
    expect(kernels.length).toBeGreaterThan(0);
    expect(kernels.every((w) => w.format === 'int4' && w.groupSize === 32)).toBe(true);
    const output = (await model.run(readSafetensors(join(dir, 'inputs.safetensors'))))[traceForRefit(path).analyzed.graph.outputs[0]];
    expect(relativeError(output, readSafetensors(join(dir, 'expected_v1.safetensors')).output)).toBeLessThan(BOUNDS['int4:32']);
    expect(() => nativeEngine({ weightFormat: { kind: 'fp16' }, weightPrecision: 'bfloat16' })).toThrow(/bfloat16/);
  });
});
