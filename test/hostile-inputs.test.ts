/**
 * Issue 19, hostile inputs: files opened on behalf of an input (ONNX external data, checkpoint shards,
 * adapter files) stay inside the folder of the file that names them and are regular files; a .trtr header
 * whose fields do not agree is refused naming the field; typed arrays of the wrong element type are
 * refused; a graph with no outputs is refused. Every refusal is tagged (exit 2 in the CLI).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, ftruncateSync, mkdirSync, openSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import { loadOnnx } from '../src/trace/load.js';
import { decodeOnnx } from '../src/trace/decode.js';
import { ModelProtoType } from '../src/trace/onnx-schema.js';
import { INDEX_FILE, openCheckpoint, openCheckpointTE } from '../src/checkpoint/index.js';
import { openAdapter, ADAPTER_CONFIG, ADAPTER_WEIGHTS } from '../src/checkpoint/index.js';
import { openLora } from '../src/lora/open.js';
import { compile } from '../src/compile/index.js';
import { encodePreamble, ModelFileError, readModelFile, readModelHeader, writeModelFile, PREAMBLE_BYTES } from '../src/model/index.js';
import { writeSafetensors } from '../src/safetensors/index.js';
import { runCli } from './support/cli.js';
import { temporaryDirectory, writeNet, type NetSpec } from './e2e-support.js';

let dir: { path: string } & Disposable;
let outside: string;
beforeAll(() => {
  dir = temporaryDirectory();
  outside = join(dir.path, 'outside');
  mkdirSync(outside);
});
afterAll(() => dir[Symbol.dispose]());

/** A fresh folder inside the test's temporary directory. */
let folders = 0;
const folder = (name: string): string => {
  const path = join(dir.path, `${name}-${folders++}`);
  mkdirSync(path);
  return path;
};

const WEIGHTS = Float32Array.from([1.5, -2, 3.25, 4, 5, 6]);

/** x[1, 3] @ w[3, 2], w held as external data at `location` (offset, length as given). */
const externalModel = (location: string, offset = 0, length = 24) =>
  ModelProtoType.encode(
    ModelProtoType.fromObject({
      irVersion: 8,
      opsetImport: [{ domain: '', version: 17 }],
      graph: {
        name: 'ext',
        node: [{ name: 'mm', opType: 'MatMul', input: ['x', 'w'], output: ['y'] }],
        initializer: [{ name: 'w', dims: [3, 2], dataType: 1, dataLocation: 1, externalData: [{ key: 'location', value: location }, { key: 'offset', value: String(offset) }, { key: 'length', value: String(length) }] }],
        input: [{ name: 'x', type: { tensorType: { elemType: 1, shape: { dim: [{ dimValue: 1 }, { dimValue: 3 }] } } } }],
        output: [{ name: 'y', type: { tensorType: { elemType: 1, shape: { dim: [{ dimValue: 1 }, { dimValue: 2 }] } } } }],
      },
    }),
  ).finish();

const writeModel = (directory: string, location: string, offset = 0, length = 24): string => {
  const path = join(directory, 'model.onnx');
  writeFileSync(path, externalModel(location, offset, length));
  return path;
};

const rejection = (p: Promise<unknown>): Promise<(Error & { _tag?: string }) | undefined> => p.then(() => undefined, (e: unknown) => e as Error & { _tag?: string });

const hasMkfifo = (() => {
  try {
    execFileSync('mkfifo', ['--version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
})();

/**
 * A FIFO at `path`, and a writer that, after `delayMs`, opens it and writes `bytes`: a reader that blocks on
 * the FIFO (the old behaviour) then gets data and returns instead of hanging, so the test fails rather than
 * hangs. A reader that refuses the FIFO never opens it; the writer is killed at the end.
 */
const fifoWithLateWriter = (path: string, bytes: Uint8Array, delayMs = 3000): ChildProcess => {
  execFileSync('mkfifo', [path]);
  const hex = Buffer.from(bytes).toString('hex').replace(/(..)/g, '\\x$1');
  return spawn('sh', ['-c', `sleep ${delayMs / 1000}; printf '${hex}' > '${path}'`], { stdio: 'ignore' });
};

describe('ONNX external data stays inside the model folder', () => {
  it('reads a regular file, and a link to a regular file inside the folder', async () => {
    const d = folder('ext-ok');
    writeFileSync(join(d, 'weights.bin'), Buffer.from(WEIGHTS.buffer));
    symlinkSync('weights.bin', join(d, 'alias.bin'));
    for (const location of ['weights.bin', 'alias.bin']) {
      const g = await loadOnnx(writeModel(d, location));
      expect(Array.from(g.initializers[0].tensor.data as Float32Array)).toEqual(Array.from(WEIGHTS));
    }
  });

  it('refuses a file linked to a file outside the folder (a secret, /etc/passwd), naming the file and the reason', async () => {
    const d = folder('ext-link');
    const secret = join(outside, 'secret.bin');
    writeFileSync(secret, Buffer.from(WEIGHTS.buffer));
    symlinkSync(secret, join(d, 'weights.bin'));
    const e = await rejection(loadOnnx(writeModel(d, 'weights.bin')));
    expect(e?._tag).toBe('ExternalData');
    expect(e?.message).toMatch(/weights\.bin/);
    expect(e?.message).toMatch(/outside the folder/);
    if (existsSync('/etc/passwd')) {
      const p = folder('ext-passwd');
      symlinkSync('/etc/passwd', join(p, 'passwd.bin'));
      const e2 = await rejection(loadOnnx(writeModel(p, 'passwd.bin', 0, 24)));
      expect(e2?._tag).toBe('ExternalData');
      expect(e2?.message).toMatch(/passwd\.bin.*outside the folder/);
    }
  });

  it('refuses data reached through a folder linked to / or to a folder outside', async () => {
    const d = folder('ext-root');
    symlinkSync('/', join(d, 'root'));
    writeFileSync(join(outside, 'data.bin'), Buffer.from(WEIGHTS.buffer));
    symlinkSync(outside, join(d, 'elsewhere'));
    if (existsSync('/etc/passwd')) {
      const e = await rejection(loadOnnx(writeModel(d, 'root/etc/passwd')));
      expect(e?._tag).toBe('ExternalData');
      expect(e?.message).toMatch(/root\/etc\/passwd.*outside the folder/);
    }
    const e = await rejection(loadOnnx(writeModel(d, 'elsewhere/data.bin')));
    expect(e?._tag).toBe('ExternalData');
    expect(e?.message).toMatch(/elsewhere\/data\.bin.*outside the folder/);
  });

  it('still refuses lexical escapes, absolute paths and URLs', async () => {
    const d = folder('ext-lexical');
    for (const location of ['../x.bin', '/etc/passwd', 'file:///etc/passwd', 'a/../../x.bin']) {
      const e = await rejection(loadOnnx(writeModel(d, location)));
      expect(e?._tag, location).toBe('ExternalData');
      expect(e?.message, location).toMatch(/leaves the model directory/);
    }
  });

  it('refuses a link to /dev/zero at once as not a regular file (nothing is read)', async () => {
    const d = folder('ext-zero');
    symlinkSync('/dev/zero', join(d, 'zero.bin'));
    const started = performance.now();
    const e = await rejection(loadOnnx(writeModel(d, 'zero.bin')));
    expect(e?._tag).toBe('ExternalData');
    expect(e?.message).toMatch(/zero\.bin.*character device, not a regular file/);
    expect(performance.now() - started).toBeLessThan(2000);
  });

  it('reads only the declared range of a large file (memory bounded: a 3 GiB sparse file, 24 bytes read)', async () => {
    const d = folder('ext-sparse');
    const big = join(d, 'big.bin');
    const fd = openSync(big, 'w');
    ftruncateSync(fd, 3 * 2 ** 30);
    closeSync(fd);
    const before = process.memoryUsage().rss;
    const g = await loadOnnx(writeModel(d, 'big.bin', 2 ** 31 + 64, 24));
    expect(Array.from(g.initializers[0].tensor.data as Float32Array)).toEqual([0, 0, 0, 0, 0, 0]);
    expect(process.memoryUsage().rss - before).toBeLessThan(256 * 2 ** 20);
    // A range past the end, and a declared length that is not the tensor's, are refused before reading.
    expect((await rejection(loadOnnx(writeModel(d, 'big.bin', 3 * 2 ** 30 - 8, 24))))?.message).toMatch(/big\.bin.*lies outside the file of 3221225472 bytes/);
    expect((await rejection(loadOnnx(writeModel(d, 'big.bin', 0, 2 ** 31))))?.message).toMatch(/needs 24 bytes of external data; found 2147483648/);
  });

  it.skipIf(!hasMkfifo)('refuses a FIFO at once instead of blocking on it', async () => {
    const d = folder('ext-fifo');
    const writer = fifoWithLateWriter(join(d, 'pipe.bin'), new Uint8Array(WEIGHTS.buffer));
    try {
      const started = performance.now();
      const e = await rejection(loadOnnx(writeModel(d, 'pipe.bin')));
      expect(performance.now() - started).toBeLessThan(2000);
      expect(e?._tag).toBe('ExternalData');
      expect(e?.message).toMatch(/pipe\.bin.*FIFO/);
    } finally {
      writer.kill();
    }
  });

  it('the CLI exits 2 naming the file when compile meets external data linked outside', async () => {
    const d = folder('ext-cli');
    writeFileSync(join(outside, 'cli-secret.bin'), Buffer.from(WEIGHTS.buffer));
    symlinkSync(join(outside, 'cli-secret.bin'), join(d, 'weights.bin'));
    const onnx = writeModel(d, 'weights.bin');
    const checkpoint = join(d, 'w.safetensors');
    await writeSafetensors(checkpoint, [{ name: 'w', dtype: 'F32', shape: [3, 2], data: new Uint8Array(WEIGHTS.buffer.slice(0)) }]);
    const r = await runCli(['compile', onnx, '--weights', checkpoint, '-o', join(d, 'm.trtr')]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/weights\.bin/);
    expect(r.stderr).toMatch(/outside the folder/);
    expect(existsSync(join(d, 'm.trtr'))).toBe(false);
  });
});

describe('sharded checkpoints stay inside the index folder', () => {
  const writeShards = async (d: string): Promise<Record<string, string>> => {
    await writeSafetensors(join(d, 'a.safetensors'), [{ name: 'a', dtype: 'F32', shape: [2], data: new Uint8Array(Float32Array.from([1, 2]).buffer) }]);
    await writeSafetensors(join(d, 'b.safetensors'), [{ name: 'b', dtype: 'F32', shape: [2], data: new Uint8Array(Float32Array.from([3, 4]).buffer) }]);
    return { a: 'a.safetensors', b: 'b.safetensors' };
  };

  it('opens shards linked inside the folder; refuses a shard linked outside, naming the shard', async () => {
    const d = folder('shards');
    const map = await writeShards(d);
    symlinkSync('b.safetensors', join(d, 'b-link.safetensors'));
    writeFileSync(join(d, INDEX_FILE), JSON.stringify({ weight_map: { ...map, b: 'b-link.safetensors' } }));
    using ok = await openCheckpoint(join(d, INDEX_FILE));
    expect(Array.from(ok.toFloat32('b'))).toEqual([3, 4]);

    const evil = folder('shards-evil');
    await writeShards(outside);
    await writeShards(evil);
    symlinkSync(join(outside, 'b.safetensors'), join(evil, 'stolen.safetensors'));
    writeFileSync(join(evil, INDEX_FILE), JSON.stringify({ weight_map: { a: 'a.safetensors', b: 'stolen.safetensors' } }));
    const r = await openCheckpointTE(join(evil, INDEX_FILE))();
    expect(E.isLeft(r) && r.left._tag).toBe('FileRefused');
    expect(E.isLeft(r) && r.left.detail).toMatch(/stolen\.safetensors.*outside the folder/);

    // A folder linked outside is refused as well.
    const viaDir = folder('shards-dir');
    await writeShards(viaDir);
    symlinkSync(outside, join(viaDir, 'sub'));
    writeFileSync(join(viaDir, INDEX_FILE), JSON.stringify({ weight_map: { a: 'a.safetensors', b: 'sub/b.safetensors' } }));
    await expect(openCheckpoint(join(viaDir, INDEX_FILE))).rejects.toMatchObject({ _tag: 'FileRefused' });
  });

  it('follows an index that is itself a link (a Hugging Face cache snapshot): shards beside the real index', async () => {
    const blobs = folder('hf-blobs');
    await writeShards(blobs);
    writeFileSync(join(blobs, 'index-blob'), JSON.stringify({ weight_map: { a: 'a.safetensors', b: 'b.safetensors' } }));
    const snapshot = folder('hf-snapshot');
    symlinkSync(join(blobs, 'index-blob'), join(snapshot, INDEX_FILE));
    symlinkSync(join(blobs, 'a.safetensors'), join(snapshot, 'a.safetensors'));
    symlinkSync(join(blobs, 'b.safetensors'), join(snapshot, 'b.safetensors'));
    using c = await openCheckpoint(snapshot);
    expect(Array.from(c.toFloat32('a'))).toEqual([1, 2]);
  });

  it.skipIf(!hasMkfifo)('refuses a FIFO shard at once', async () => {
    const d = folder('shards-fifo');
    await writeShards(d);
    const writer = fifoWithLateWriter(join(d, 'pipe.safetensors'), new Uint8Array(16));
    try {
      writeFileSync(join(d, INDEX_FILE), JSON.stringify({ weight_map: { a: 'a.safetensors', b: 'pipe.safetensors' } }));
      const started = performance.now();
      const r = await openCheckpointTE(join(d, INDEX_FILE))();
      expect(performance.now() - started).toBeLessThan(2000);
      expect(E.isLeft(r) && r.left._tag).toBe('FileRefused');
      expect(E.isLeft(r) && r.left.detail).toMatch(/pipe\.safetensors.*FIFO/);
    } finally {
      writer.kill();
    }
  });

  it('the CLI exits 2 when plan meets a shard linked outside', async () => {
    const spec: NetSpec = { widths: [4, 3], activation: 'Relu', layerNorm: false, batch: 1 };
    const d = folder('shards-cli');
    const net = await writeNet(d, spec, 7);
    const model = join(d, 'net.trtr');
    expect((await runCli(['compile', net.onnx, '--weights', net.checkpoint, '-o', model])).code).toBe(0);
    const shards = folder('shards-cli-ckpt');
    symlinkSync(net.checkpoint, join(shards, 'all.safetensors'));
    writeFileSync(join(shards, INDEX_FILE), JSON.stringify({ weight_map: { 'layers.0.weight': 'all.safetensors', 'layers.0.bias': 'all.safetensors' } }));
    const r = await runCli(['plan', model, '--weights', shards]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/all\.safetensors.*outside the folder/);
  });
});

describe('adapter files stay inside the adapter folder', () => {
  const writeAdapter = async (d: string) => {
    writeFileSync(join(d, ADAPTER_CONFIG), JSON.stringify({ peft_type: 'LORA', r: 1, lora_alpha: 1, target_modules: ['layers.0'] }));
    await writeSafetensors(join(d, ADAPTER_WEIGHTS), [
      { name: 'base_model.model.layers.0.lora_A.weight', dtype: 'F32', shape: [1, 4], data: new Uint8Array(new Float32Array(4).fill(0.5).buffer) },
      { name: 'base_model.model.layers.0.lora_B.weight', dtype: 'F32', shape: [3, 1], data: new Uint8Array(new Float32Array(3).fill(0.5).buffer) },
    ]);
  };

  it('refuses adapter weights or config linked outside the folder, in both openers', async () => {
    const real = folder('adapter-real');
    await writeAdapter(real);
    const weightsLinked = folder('adapter-weights-link');
    await writeAdapter(weightsLinked);
    const stolen = join(outside, 'stolen.safetensors');
    writeFileSync(stolen, readFileSync(join(real, ADAPTER_WEIGHTS)));
    const { rmSync } = await import('node:fs');
    rmSync(join(weightsLinked, ADAPTER_WEIGHTS));
    symlinkSync(stolen, join(weightsLinked, ADAPTER_WEIGHTS));
    const a = await rejection(openLora(weightsLinked));
    expect(a?._tag).toBe('InvalidAdapter');
    expect(a?.message).toMatch(/adapter_model\.safetensors.*outside the folder/);
    await expect(openAdapter(weightsLinked)).rejects.toMatchObject({ _tag: 'FileRefused' });

    const configLinked = folder('adapter-config-link');
    await writeAdapter(configLinked);
    rmSync(join(configLinked, ADAPTER_CONFIG));
    if (existsSync('/etc/passwd')) symlinkSync('/etc/passwd', join(configLinked, ADAPTER_CONFIG));
    else symlinkSync(stolen, join(configLinked, ADAPTER_CONFIG));
    const c = await rejection(openLora(configLinked));
    expect(c?.message).toMatch(/adapter_config\.json.*outside the folder/);
    expect(c?.message).not.toMatch(/root:/);
    await expect(openAdapter(configLinked)).rejects.toMatchObject({ _tag: 'FileRefused' });

    using ok = await openLora(real);
    expect(ok.modules.length).toBe(1);
  });
});

describe('a .trtr header whose fields do not agree is refused naming the field (exit 2, not 3)', () => {
  const spec: NetSpec = { widths: [4, 3, 2], activation: 'Relu', layerNorm: false, batch: 1 };
  let model: string;
  let header: Record<string, unknown>;
  let blobsEnd: number;
  let bytes: Uint8Array;

  beforeAll(async () => {
    const d = folder('trtr');
    const net = await writeNet(d, spec, 3);
    model = join(d, 'net.trtr');
    using m = await compile(net.onnx, net.checkpoint);
    await writeModelFile(m, model);
    bytes = new Uint8Array(readFileSync(model));
    const view = new DataView(bytes.buffer, bytes.byteOffset);
    blobsEnd = Number(view.getBigUint64(16, true));
    header = JSON.parse(JSON.stringify(await readModelHeader(model))) as Record<string, unknown>;
  });

  /** The model file with its header replaced by `edit(header)` (blobs kept, preamble and digest redone). */
  const withHeader = (name: string, edit: (h: any) => void): string => {
    const h = JSON.parse(JSON.stringify(header));
    edit(h);
    const encoded = new TextEncoder().encode(JSON.stringify(h));
    const out = new Uint8Array(blobsEnd + encoded.byteLength);
    out.set(bytes.subarray(0, blobsEnd));
    out.set(encoded, blobsEnd);
    out.set(encodePreamble(blobsEnd, encoded), 0);
    expect(PREAMBLE_BYTES).toBe(64);
    const path = join(dir.path, name);
    writeFileSync(path, out);
    return path;
  };

  it('reads the unedited header back (the edit helper itself is sound)', async () => {
    using m = await readModelFile(withHeader('same.trtr', () => undefined));
    expect(m.stages.length).toBeGreaterThan(0);
  });

  const cases: [string, (h: any) => void, RegExp][] = [
    ['segment input not in the tensor table', (h) => { h.segments[0].inputs = ['ghost']; }, /segments\[0\]\.inputs\[0\].*'ghost' is not in the header's tensor table/],
    ['segment output not in the tensor table', (h) => { h.segments[h.segments.length - 1].outputs = ['nowhere']; }, /segments\[\d+\]\.outputs\[0\].*'nowhere'/],
    ['model output not in the tensor table', (h) => { h.outputs = ['missing_out']; }, /outputs\[0\]: output 'missing_out'/],
    ['duplicate segment index', (h) => { h.segments.push({ ...h.segments[0] }); }, /segments\[\d+\]\.index: segment \d+ is listed twice|overlaps/],
    ['weight map target of a missing segment', (h) => { h.weightMap.targets[0].segment = 99; }, /weightMap\.targets\[0\].*segment 99/],
    ['segment input produced by no earlier segment', (h) => { h.tensors.push({ name: 'late', dtype: 'float32', shape: [1] }); h.segments[0].inputs = ['late']; }, /segments\[0\]\.inputs\[0\].*'late' is neither a model input nor an output of an earlier segment/],
    ['negative shape', (h) => { h.tensors[0].shape = [-1]; }, /tensors\[0\].*shape \[-1\]/],
  ];
  it.each(cases)('%s', async (name, edit, message) => {
    const path = withHeader(`${name.replace(/ /g, '-')}.trtr`, edit);
    const e = await rejection(readModelFile(path));
    expect(e).toBeInstanceOf(ModelFileError);
    expect(e?._tag).toBe('ModelFileInvalid');
    expect(e?.message).toContain(path);
    expect(e?.message).toMatch(message);
  });

  it('the CLI exits 2 with the field named, for run and inspect', async () => {
    const path = withHeader('cli-ghost.trtr', (h) => { h.segments[0].inputs = ['ghost']; });
    const d = folder('trtr-cli');
    const inputs = join(d, 'inputs.safetensors');
    await writeSafetensors(inputs, [{ name: 'x', dtype: 'F32', shape: [1, 4], data: new Uint8Array(16) }]);
    const run = await runCli(['run', path, '--inputs', inputs, '-o', join(d, 'out.safetensors')]);
    expect(run.code).toBe(2);
    expect(run.stderr).toMatch(/ghost/);
    expect(run.stderr).not.toMatch(/Cannot read properties/);
    const inspect = await runCli(['inspect', path]);
    expect(inspect.code).toBe(2);
    expect(inspect.stderr).toMatch(/segments\[0\]\.inputs\[0\]/);
  });
});

describe('typed arrays of the wrong element type are refused, not reinterpreted', () => {
  it('refuses an Int32Array for a float32 input, naming the input, expected and found', async () => {
    const spec: NetSpec = { widths: [4, 3], activation: 'Relu', layerNorm: false, batch: 1 };
    const d = folder('typed');
    const net = await writeNet(d, spec, 5);
    using m = await compile(net.onnx, net.checkpoint);
    const ok = await m.run({ x: new Float32Array(4).fill(1) });
    expect(Object.keys(ok)).toHaveLength(1);
    const bad = await rejection(m.run({ x: new Int32Array(4).fill(1) as never }));
    expect(bad?._tag).toBe('InputMismatch');
    expect(bad?.message).toMatch(/'x'.*float32 \(Float32Array\).*Int32Array/);
    // A tensor object whose data is not its dtype's array is refused likewise.
    const tensor = await rejection(m.run({ x: { dtype: 'float32', shape: [1, 4], data: new Uint32Array(4) as never } }));
    expect(tensor?._tag).toBe('InputMismatch');
    expect(tensor?.message).toMatch(/Uint32Array/);
    // Read back from a file, the model refuses it too.
    const path = join(d, 'typed.trtr');
    await writeModelFile(m, path);
    using again = await readModelFile(path);
    expect((await rejection(again.run({ x: new Int32Array(4) as never })))?.message).toMatch(/'x'.*Int32Array/);
  });
});

describe('graphs that would compile silently into nothing', () => {
  it('refuses a graph with no outputs (tagged; exit 2 in the CLI)', async () => {
    const model = ModelProtoType.encode(
      ModelProtoType.fromObject({
        irVersion: 8,
        opsetImport: [{ domain: '', version: 17 }],
        graph: {
          name: 'silent',
          node: [{ name: 'r', opType: 'Relu', input: ['x'], output: ['y'] }],
          input: [{ name: 'x', type: { tensorType: { elemType: 1, shape: { dim: [{ dimValue: 1 }, { dimValue: 3 }] } } } }],
          output: [],
        },
      }),
    ).finish();
    const decoded = decodeOnnx(model);
    expect(E.isLeft(decoded) && decoded.left._tag).toBe('MalformedModel');
    expect(E.isLeft(decoded) && JSON.stringify(decoded.left)).toMatch(/'silent' has no outputs/);
    const d = folder('no-outputs');
    writeFileSync(join(d, 'm.onnx'), model);
    await writeSafetensors(join(d, 'w.safetensors'), [{ name: 'unused', dtype: 'F32', shape: [1], data: new Uint8Array(4) }]);
    const r = await runCli(['compile', join(d, 'm.onnx'), '--weights', join(d, 'w.safetensors'), '-o', join(d, 'm.trtr')]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/no outputs/);
  });
});
