/**
 * Issue 19, hostile adapters and weights: every PEFT setting that changes what an adapter does is honoured
 * or refused by name (exit 2), a merge that overflows is refused, a NaN weight never compiles, and a refused
 * refit leaves the model byte for byte as it was. Success paths are checked against another way to the same
 * weights (the same factors without the setting) and against PyTorch's outputs where the fixtures have them.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cpSync, mkdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ModelProtoType } from '../src/trace/onnx-schema.js';
import { compileFile } from '../src/effect/files.js';
import { writeSafetensors, type TensorToWrite } from '../src/safetensors/index.js';
import { layerIndexOf } from '../src/checkpoint/adapter.js';
import { openLora } from '../src/lora/open.js';
import { readSafetensors } from './support/h5-safetensors.js';
import { expectClose } from './support/h5-close.js';
import { runCli, type CliResult } from './support/cli.js';
import { fixture, temporaryDirectory } from './e2e-support.js';

const bert = (file: string) => fixture('bert_tiny', file);
const BASE_CONFIG = JSON.parse(readFileSync(bert('lora/adapter_config.json'), 'utf8')) as Record<string, unknown>;
const BASE_TENSORS = readSafetensors(bert('lora/adapter_model.safetensors'));

let dir: { path: string } & Disposable;
let model: string;
let adapters = 0;

beforeAll(async () => {
  dir = temporaryDirectory();
  model = join(dir.path, 'bert.trtr');
  await compileFile(bert('model_dynamo.onnx'), bert('weights_v1.safetensors'), model);
});
afterAll(() => dir[Symbol.dispose]());

const bytesOf = (data: ArrayBufferView): Uint8Array => new Uint8Array(data.buffer, data.byteOffset, data.byteLength);

/** A PEFT adapter folder: the bert_tiny fixture adapter with its config changed and its tensors filtered or
 *  replaced. */
const adapter = async (
  config: Record<string, unknown>,
  tensors: (name: string) => TensorToWrite | 'keep' | 'drop' = () => 'keep',
): Promise<string> => {
  const path = join(dir.path, `adapter-${adapters++}`);
  cpSync(bert('lora'), path, { recursive: true });
  writeFileSync(join(path, 'adapter_config.json'), JSON.stringify({ ...BASE_CONFIG, ...config }));
  const out: TensorToWrite[] = [];
  for (const [name, t] of Object.entries(BASE_TENSORS)) {
    const r = tensors(name);
    if (r === 'drop') continue;
    out.push(r === 'keep' ? { name, dtype: 'F32', shape: t.shape, data: bytesOf(t.data) } : r);
  }
  await writeSafetensors(join(path, 'adapter_model.safetensors'), out);
  return path;
};

/** Refit a copy of the compiled model with weights_v1 and the adapter; the copy's path and the result. */
const refitWith = async (lora: string, ...extra: string[]): Promise<{ out: string; r: CliResult }> => {
  const out = join(dir.path, `refit-${adapters++}.trtr`);
  const r = await runCli(['refit', model, '--weights', bert('weights_v1.safetensors'), '--lora', lora, '-o', out, ...extra]);
  return { out, r };
};

const outputsOf = async (path: string): Promise<Float32Array> => {
  const file = join(dir.path, `outputs-${adapters++}.safetensors`);
  const r = await runCli(['run', path, '--inputs', bert('inputs.safetensors'), '-o', file]);
  expect(r.code, r.stderr).toBe(0);
  return readSafetensors(file).output.data as Float32Array;
};

/** Refused: exit 2, one line naming `message`, the model unchanged and no output written. */
const expectRefused = async (lora: string, message: RegExp): Promise<void> => {
  const before = readFileSync(model);
  const { out, r } = await refitWith(lora);
  expect(r.code, r.stderr).toBe(2);
  expect(r.stderr).toMatch(message);
  expect(r.stdout).toBe('');
  expect(readFileSync(model).equals(before)).toBe(true);
  expect(() => readFileSync(out)).toThrow();
};

describe('adapter settings beyond W + scaling * B @ A are refused by name', () => {
  it.each([
    ['use_dora', { use_dora: true }, /use_dora/],
    ['modules_to_save', { modules_to_save: ['pooler'] }, /modules_to_save.*'?pooler/],
    ['bias', { bias: 'all' }, /bias.*"all"/],
    ['target_modules that name nothing', { target_modules: ['query', 'no_such_module'] }, /target_modules.*'no_such_module'/],
    ['a target_modules expression that names nothing', { target_modules: '.*nothing_here' }, /target_modules.*nothing_here/],
    ['peft_type', { peft_type: 'IA3' }, /peft_type 'IA3'/],
    ['layers_to_transform that is not a layer list', { layers_to_transform: ['one'] }, /layers_to_transform .*not a layer index/],
  ])('%s', async (_what, config, message) => {
    await expectRefused(await adapter(config), message);
  });

  it('LoRA factors stored as integers are refused naming the tensor (not an internal error)', async () => {
    const path = await adapter({}, (name) => {
      if (!name.endsWith('layer.0.attention.self.query.lora_A.weight')) return 'keep';
      const t = BASE_TENSORS[name];
      return { name, dtype: 'I32', shape: t.shape, data: bytesOf(Int32Array.from(t.data as Float32Array, (v) => Math.round(v * 100))) };
    });
    await expectRefused(path, /layer\.0\.attention\.self\.query\.lora_A\.weight.*floating point.*I32/);
  });

  it('a scale beyond float32, or factors whose merge overflows, are refused naming the module; the model is unchanged', async () => {
    await expectRefused(`${bert('lora')}:1e39`, /scale: 1e\+39 times module '.*query'.*beyond float32's range/);
    // Finite factors whose product is not: B = 1e30 and A = 1e10 everywhere in one module.
    const huge = await adapter({}, (name) => {
      const m = /layer\.1\.attention\.self\.value\.lora_([AB])\.weight$/.exec(name);
      if (m === null) return 'keep';
      const t = BASE_TENSORS[name];
      return { name, dtype: 'F32', shape: t.shape, data: bytesOf(new Float32Array(t.data.length).fill(m[1] === 'B' ? 1e30 : 1e10)) };
    });
    await expectRefused(huge, /LoRA module '.*layer\.1\.attention\.self\.value': merging it into 'encoder\.layer\.1\.attention\.self\.value\.weight' at scale 2 gives \d+ non-finite value/);
    await expectRefused(`${huge}:0.5`, /at scale 1 gives/);
  });
});

describe('layers_to_transform is honoured', () => {
  const layer1 = (name: string) => (name.includes('layer.1.') ? 'keep' as const : 'drop' as const);

  it('reads layer indices as PEFT does', () => {
    expect(layerIndexOf('base_model.model.encoder.layer.3.attention.self.query', ['layer'])).toBe(3);
    expect(layerIndexOf('base_model.model.encoder.layer.3.attention.self.query', [])).toBe(3);
    expect(layerIndexOf('base_model.model.model.layers.12.mlp.up_proj', ['layers'])).toBe(12);
    expect(layerIndexOf('base_model.model.transformer.h.0.attn.c_attn', ['layers'])).toBeUndefined();
    expect(layerIndexOf('base_model.model.transformer.h.0.attn.c_attn', ['layers', 'h'])).toBe(0);
    expect(layerIndexOf('base_model.model.layers.7.proj', [])).toBe(7);
    expect(layerIndexOf('base_model.model.lm_head', [])).toBeUndefined();
  });

  it('an adapter on layer 1 only: the same outputs as the same factors without the setting, different from base and from both layers', async () => {
    const restricted = await adapter({ layers_to_transform: [1], layers_pattern: 'layer' }, layer1);
    const plain = await adapter({}, layer1);
    const a = await refitWith(restricted);
    const b = await refitWith(plain);
    expect(a.r.code, a.r.stderr).toBe(0);
    expect(b.r.code, b.r.stderr).toBe(0);
    const [ya, yb] = [await outputsOf(a.out), await outputsOf(b.out)];
    expect(Buffer.from(bytesOf(ya)).equals(Buffer.from(bytesOf(yb)))).toBe(true);
    const v1 = readSafetensors(bert('expected_v1.safetensors')).output;
    const both = readSafetensors(bert('expected_lora.safetensors')).output;
    const maxDiff = (x: Float32Array, y: ArrayBufferView) => Math.max(...Array.from(x, (v, i) => Math.abs(v - (y as Float32Array)[i])));
    expect(maxDiff(ya, v1.data)).toBeGreaterThan(1e-3);
    expect(maxDiff(ya, both.data)).toBeGreaterThan(1e-3);
    // With both layers' factors and every layer listed, the adapter is PyTorch's expected_lora.
    const all = await refitWith(await adapter({ layers_to_transform: [0, 1], layers_pattern: ['layer'] }));
    expect(all.r.code, all.r.stderr).toBe(0);
    expectClose({ dtype: 'float32', shape: both.shape, data: await outputsOf(all.out) }, both);
  });

  it('factors of a layer the setting excludes are refused by name (PEFT would not apply them)', async () => {
    await expectRefused(await adapter({ layers_to_transform: 1, layers_pattern: 'layer' }), /layer\.0\.attention\.self\.(query|value)' lies in layer 0, outside layers_to_transform \[1\]/);
  });
});

describe('NaN weights never compile', () => {
  /** y = x @ w + b, with w [3, 2] and b [2] as given. */
  const gemmModel = (w: Float32Array, b: Float32Array) =>
    ModelProtoType.encode(
      ModelProtoType.fromObject({
        irVersion: 8,
        opsetImport: [{ domain: '', version: 17 }],
        graph: {
          name: 'g',
          node: [{ name: 'mm', opType: 'MatMul', input: ['x', 'fc.weight'], output: ['h'] }, { name: 'add', opType: 'Add', input: ['h', 'fc.bias'], output: ['y'] }],
          initializer: [
            { name: 'fc.weight', dims: [3, 2], dataType: 1, rawData: bytesOf(w) },
            { name: 'fc.bias', dims: [2], dataType: 1, rawData: bytesOf(b) },
          ],
          input: [{ name: 'x', type: { tensorType: { elemType: 1, shape: { dim: [{ dimValue: 1 }, { dimValue: 3 }] } } } }],
          output: [{ name: 'y', type: { tensorType: { elemType: 1, shape: { dim: [{ dimValue: 1 }, { dimValue: 2 }] } } } }],
        },
      }),
    ).finish();
  const W = Float32Array.of(1, 2, 3, 4, 5, 6);
  const B = Float32Array.of(0.5, -0.5);
  const checkpoint = async (path: string, w: Float32Array, b: Float32Array) =>
    writeSafetensors(path, [{ name: 'fc.weight', dtype: 'F32', shape: [3, 2], data: bytesOf(w) }, { name: 'fc.bias', dtype: 'F32', shape: [2], data: bytesOf(b) }]);

  it('a NaN in an ONNX weight that no checkpoint replaces: exit 2 naming the weight; nothing written', async () => {
    const onnx = join(dir.path, 'nan-graph.onnx');
    writeFileSync(onnx, gemmModel(Float32Array.of(1, NaN, 3, 4, 5, NaN), B));
    const ck = join(dir.path, 'nan-graph-bias-only.safetensors');
    await writeSafetensors(ck, [{ name: 'fc.bias', dtype: 'F32', shape: [2], data: bytesOf(B) }]);
    const out = join(dir.path, 'nan-graph.trtr');
    const r = await runCli(['compile', onnx, '--weights', ck, '--allow-unmapped', '-o', out]);
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr).toMatch(/hold NaN values.*a constant of the ONNX graph\): 2 of 6/);
    expect(() => readFileSync(out)).toThrow();
  });

  it('a NaN in the build checkpoint: exit 2 naming the checkpoint tensor; the same graph builds from a clean checkpoint', async () => {
    const onnx = join(dir.path, 'clean-graph.onnx');
    writeFileSync(onnx, gemmModel(W, B));
    const bad = join(dir.path, 'nan-checkpoint.safetensors');
    await checkpoint(bad, W, Float32Array.of(NaN, 1));
    const r = await runCli(['compile', onnx, '--weights', bad, '-o', join(dir.path, 'nan-ck.trtr')]);
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr).toMatch(/from checkpoint 'fc\.bias'\): 1 of 2/);
    const good = join(dir.path, 'clean-checkpoint.safetensors');
    await checkpoint(good, W, B);
    const ok = await runCli(['compile', onnx, '--weights', good, '-o', join(dir.path, 'clean.trtr')]);
    expect(ok.code, ok.stderr).toBe(0);
  });

  it('a two-element bias that differs from the graph\'s is built from the checkpoint (its name decides), not kept as a constant', async () => {
    // Two distinct values make a tensor "degenerate" for matching by value; its own name still binds it.
    const onnx = join(dir.path, 'small-bias.onnx');
    writeFileSync(onnx, gemmModel(W, B));
    const ck = join(dir.path, 'small-bias.safetensors');
    const bias = Float32Array.of(0.75, 1.25);
    await checkpoint(ck, W, bias);
    const out = join(dir.path, 'small-bias.trtr');
    const r = await runCli(['compile', onnx, '--weights', ck, '-o', out]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/2 weights mapped, 0 graph constants/);
    const inputs = join(dir.path, 'small-bias-in.safetensors');
    const x = Float32Array.of(1, -1, 2);
    await writeSafetensors(inputs, [{ name: 'x', dtype: 'F32', shape: [1, 3], data: bytesOf(x) }]);
    const outputs = join(dir.path, 'small-bias-out.safetensors');
    expect((await runCli(['run', out, '--inputs', inputs, '-o', outputs])).code).toBe(0);
    // y = x @ W + bias, W [3, 2] row-major.
    const want = [0, 1].map((j) => x[0] * W[j] + x[1] * W[2 + j] + x[2] * W[4 + j] + bias[j]);
    expect(Array.from(readSafetensors(outputs).y.data as Float32Array)).toEqual(want.map(Math.fround));
  });
});

describe('adapters in a Hugging Face hub cache', () => {
  /** `models--org--name/{blobs,snapshots/rev}` with the snapshot's files linked into blobs/, as the hub does. */
  const hubCache = (name: string, linkConfigTo?: string): string => {
    const repo = join(dir.path, name, 'hub', 'models--org--adapter');
    const snapshot = join(repo, 'snapshots', '0123abc');
    mkdirSync(join(repo, 'blobs'), { recursive: true });
    mkdirSync(snapshot, { recursive: true });
    cpSync(bert('lora/adapter_config.json'), join(repo, 'blobs', 'c0ffee'));
    cpSync(bert('lora/adapter_model.safetensors'), join(repo, 'blobs', 'deadbeef'));
    symlinkSync(linkConfigTo ?? '../../blobs/c0ffee', join(snapshot, 'adapter_config.json'));
    symlinkSync('../../blobs/deadbeef', join(snapshot, 'adapter_model.safetensors'));
    return snapshot;
  };

  it('opens a snapshot whose files link into the repository\'s blobs/, and refits to PyTorch\'s expected_lora', async () => {
    const snapshot = hubCache('hf-ok');
    using a = await openLora(snapshot);
    expect(a.modules.length).toBe(4);
    const { out, r } = await refitWith(snapshot);
    expect(r.code, r.stderr).toBe(0);
    const want = readSafetensors(bert('expected_lora.safetensors')).output;
    expectClose({ dtype: 'float32', shape: want.shape, data: await outputsOf(out) }, want);
  });

  it('still refuses a snapshot file linked anywhere else', async () => {
    const secret = join(dir.path, 'secret.json');
    writeFileSync(secret, readFileSync(bert('lora/adapter_config.json')));
    const snapshot = hubCache('hf-evil', secret);
    await expect(openLora(snapshot)).rejects.toThrow(/adapter_config\.json.*refused/);
  });
});
