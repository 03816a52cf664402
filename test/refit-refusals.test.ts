/**
 * Refusals (issue 12), through the CLI (`trt-refit compile | plan | refit`, run in this process by
 * test/support/cli.ts) and through the library:
 *
 * - Pinned tensors. A floating checkpoint tensor that is the source of no weight (the exported graph baked
 *   its value in: a dropped zero tensor, a literal computed at export) is pinned at compile, with its
 *   digest and a reason. A checkpoint that changes a pinned tensor is refused, never ignored: `plan` exits
 *   1, `refit` exits 2, the message names the tensor and says it is pinned; the library rejects with the
 *   PlanHasErrors error whose problems include `{ _tag: 'PinnedChanged', source, reason }`. The model file
 *   is byte-identical afterwards.
 * - Ambiguous weights. Equal-valued candidates that structure cannot separate fail the compile
 *   (`AmbiguousWeights`, CLI exit 2) naming the engine weight and every candidate; a map file
 *   (`--map FILE`, library option `map`: engine weight id or initializer name -> checkpoint tensor) settles
 *   it, and the binding it names is the one refits follow.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { compile, CompileError, type CompileOptions } from '../src/compile/index.js';
import { refitModel } from '../src/effect/index.js';
import { openCheckpoint } from '../src/checkpoint/index.js';
import { planRefit } from '../src/plan/plan.js';
import { exprSources } from '../src/weightmap/expr.js';
import { encodeSegmentModel } from '../src/fallback/model.js';
import { GraphBuilder } from '../src/trace/builder.js';
import { tensorOf, toBytes, type Tensor } from '../src/trace/ir.js';
import { writeSafetensors, type Dtype } from '../src/safetensors/index.js';
import type { RefitModel } from '../src/model/index.js';
import { readSafetensors } from './support/h5-safetensors.js';
import { runCli, type CliResult } from './support/cli.js';
import { fixture, outputBytes, random, temporaryDirectory } from './e2e-support.js';

const safetensorsDtype: Readonly<Record<string, Dtype>> = { float32: 'F32', int64: 'I64', int32: 'I32', float64: 'F64', bool: 'BOOL', uint8: 'U8' };

const writeTensors = (path: string, tensors: Readonly<Record<string, Tensor>>): Promise<unknown> =>
  writeSafetensors(path, Object.entries(tensors).map(([name, t]) => ({ name, dtype: safetensorsDtype[t.dtype], shape: [...t.shape], data: toBytes(t.data) })));

const f32 = (shape: readonly number[], data: ArrayLike<number>): Tensor => tensorOf('float32', shape, Array.from(data));
const fill = (next: () => number, n: number, scale: number): number[] => Array.from({ length: n }, () => Math.fround((next() * 2 - 1) * scale));
const escape = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

/** The message names the tensor and says it is pinned. */
const pinnedMessage = (tensor: string): RegExp => new RegExp(`(${escape(tensor)}.*pinned|pinned.*${escape(tensor)})`, 'i');

/** One line on stderr starting `trt-refit: `, matching `message`; nothing on stdout; exit code 2. */
const expectRefusedLine = (r: CliResult, message: RegExp): void => {
  expect(r.code, r.stderr).toBe(2);
  expect(r.stdout).toBe('');
  const lines = r.stderr.trim().split('\n');
  expect(lines).toHaveLength(1);
  expect(lines[0]).toMatch(/^trt-refit: /);
  expect(lines[0]).toMatch(message);
};

/** The problems of a refused refit: the PlanHasErrors error (PlanError), or a wrapper whose tag is its tag. */
const problemsOf = (error: unknown): readonly { readonly _tag: string; readonly source?: string; readonly reason?: unknown }[] => {
  expect((error as { _tag?: string })._tag).toBe('PlanHasErrors');
  let detail = (error as { detail?: unknown }).detail as { problems?: unknown; detail?: unknown } | undefined;
  while (detail !== undefined && detail.problems === undefined) detail = detail.detail as typeof detail;
  expect(Array.isArray(detail?.problems)).toBe(true);
  return detail!.problems as readonly { _tag: string; source?: string; reason?: unknown }[];
};

const rejection = async (p: Promise<unknown>): Promise<unknown> => {
  try {
    await p;
  } catch (error) {
    return error;
  }
  return expect.fail('expected the call to be refused');
};

/** Sources every mapped weight of a compiled model reads. */
const sourcesOf = (model: RefitModel): Set<string> =>
  new Set(model.weightMap.targets.filter((t) => t.status === 'mapped').flatMap((t) => exprSources(t.expr)));

let dir: { path: string } & Disposable;
beforeAll(() => {
  dir = temporaryDirectory();
});
afterAll(() => dir[Symbol.dispose]());

/** Refuses `checkpoint` through plan (exit 1), refit in place and refit -o (exit 2), and the library; the
 *  model file stays byte-identical, and the in-memory model keeps its outputs. */
const expectPinnedRefusal = async (model: string, onnx: string, build: string, checkpoint: string, tensor: string, inputs: Record<string, Tensor>): Promise<void> => {
  const before = readFileSync(model);

  const plan = await runCli(['plan', model, '--weights', checkpoint]);
  expect(plan.code, plan.stderr).toBe(1);
  expect(plan.stdout).toMatch(pinnedMessage(tensor));
  const planJson = await runCli(['--json', 'plan', model, '--weights', checkpoint]);
  expect(planJson.code).toBe(1);
  const problems = (JSON.parse(planJson.stdout) as { problems: { _tag: string; source: string; severity: string; reason: unknown }[] }).problems;
  expect(problems.filter((p) => p._tag === 'PinnedChanged')).toEqual([expect.objectContaining({ source: tensor, severity: 'error', reason: expect.any(String) })]);

  expectRefusedLine(await runCli(['refit', model, '--weights', checkpoint]), pinnedMessage(tensor));
  const elsewhere = join(dir.path, 'elsewhere.trtr');
  expectRefusedLine(await runCli(['refit', model, '--weights', checkpoint, '-o', elsewhere]), pinnedMessage(tensor));
  expect(readFileSync(model).equals(before)).toBe(true);

  // The library: a compiled model in memory refuses and stays as it was.
  using compiled = await compile(onnx, build);
  const output = async () => outputBytes(await compiled.run(inputs));
  const was = await output();
  const wasCurrent = compiled.current;
  using store = await openCheckpoint(checkpoint);
  const planned = planRefit(compiled.weightMap, store, { current: compiled.current });
  expect(planned.totals.errors).toBeGreaterThan(0);
  expect(planned.problems.filter((p) => (p as { _tag: string })._tag === 'PinnedChanged').map((p) => ({ ...p }))).toEqual([expect.objectContaining({ source: tensor, severity: 'error', reason: expect.any(String) })]);
  const refused = problemsOf(await rejection(refitModel(compiled, { checkpoint })));
  expect(refused).toContainEqual(expect.objectContaining({ _tag: 'PinnedChanged', source: tensor, reason: expect.any(String) }));
  expect((refused.find((p) => p._tag === 'PinnedChanged')!.reason as string).length).toBeGreaterThan(0);
  expect(await output()).toEqual(was);
  expect(compiled.current).toEqual(wasCurrent);
};

describe('pinned tensors: a checkpoint that changes one is refused', () => {
  it('fresh_cnn_bn (dynamo): every tensor the exporter dropped is read by a weight or pinned; a changed dropped tensor is refitted or refused (pinned), never ignored', async () => {
    const onnx = fixture('fresh_cnn_bn', 'model_dynamo.onnx');
    const v1Path = fixture('fresh_cnn_bn', 'weights_v1.safetensors');
    const v1 = readSafetensors(v1Path);
    const inputs = readSafetensors(fixture('fresh_cnn_bn', 'inputs.safetensors'));
    const model = join(dir.path, 'fresh.trtr');
    const compiled = await runCli(['compile', onnx, '--weights', v1Path, '-o', model, '--no-cache']);
    expect(compiled.code, compiled.stderr).toBe(0);

    // Which checkpoint tensors the exported graph lacks.
    const graphInitializers = new Set<string>();
    {
      const { decodeOnnx } = await import('../src/trace/decode.js');
      const { directoryResolver } = await import('../src/trace/load.js');
      const decoded = decodeOnnx(new Uint8Array(readFileSync(onnx)), directoryResolver(join(onnx, '..')));
      if (decoded._tag === 'Left') throw new Error(JSON.stringify(decoded.left));
      for (const i of decoded.right.initializers) graphInitializers.add(i.name);
    }
    const floats = Object.keys(v1).filter((n) => v1[n].dtype === 'float32').sort();
    const dropped = floats.filter((n) => !graphInitializers.has(n));
    // The dynamo exporter dropped the zero bias of the head and every fresh BatchNorm parameter.
    expect(dropped).toContain('head.bias');
    expect(dropped.filter((n) => /^(stem|block1|block2|down)\.1\.(weight|bias|running_mean|running_var)$/.test(n)).length).toBe(16);

    // Coverage both ways: each float tensor is read by some weight or pinned (with its digest and why).
    using built = await compile(onnx, v1Path);
    const read = sourcesOf(built);
    const pinned = new Map((built.weightMap.pinned ?? []).map((p) => [p.name, p]));
    for (const n of floats) expect(read.has(n) !== pinned.has(n), `${n}: read by a weight xor pinned`).toBe(true);
    for (const p of pinned.values()) expect(p.reason.length * p.digest.length, p.name).toBeGreaterThan(0);

    // Each dropped tensor, changed alone: refused when pinned; otherwise refitted: exactly the weights that
    // read it move, and the outputs move with them (the change was not ignored).
    const v1Outputs = outputBytes(await built.run(inputs));
    for (const tensor of dropped) {
      const t = v1[tensor];
      const changed = join(dir.path, `fresh-${tensor}.safetensors`);
      const data = Array.from(t.data as Float32Array, (v, i) => Math.fround(/running_var$/.test(tensor) ? v * (1.5 + 0.01 * i) : v + 0.25 + 0.01 * i));
      await writeTensors(changed, { ...v1, [tensor]: f32(t.shape, data) });
      if (pinned.has(tensor)) {
        await expectPinnedRefusal(model, onnx, v1Path, changed, tensor, inputs);
        continue;
      }
      using refitted = await compile(onnx, v1Path);
      const r = await refitModel(refitted, { checkpoint: changed });
      expect(r.plan.totals.errors, tensor).toBe(0);
      expect(r.report.changed, tensor).toBeGreaterThan(0);
      const moved = r.plan.entries.filter((e) => e.changed);
      expect(moved.map((e) => e.target).sort(), tensor).toEqual(r.plan.entries.filter((e) => exprSources(e.expr).includes(tensor)).map((e) => e.target).sort());
      expect(outputBytes(await refitted.run(inputs)).equals(v1Outputs), `${tensor}: the outputs moved`).toBe(false);
    }
  });

  it('fresh_cnn_bn (dynamo): head.bias, dropped at export but restored as the Gemm bias, is refittable, not pinned', async () => {
    const onnx = fixture('fresh_cnn_bn', 'model_dynamo.onnx');
    const v1Path = fixture('fresh_cnn_bn', 'weights_v1.safetensors');
    const v1 = readSafetensors(v1Path);
    const inputs = readSafetensors(fixture('fresh_cnn_bn', 'inputs.safetensors'));
    const changed = join(dir.path, 'fresh-head-bias.safetensors');
    const bias = v1['head.bias'];
    const newBias = Array.from(bias.data as Float32Array, (_v, i) => Math.fround(0.1 * (i + 1)));
    await writeTensors(changed, { ...v1, 'head.bias': f32(bias.shape, newBias) });
    using compiled = await compile(onnx, v1Path);
    const before = (await compiled.run(inputs))[compiled.outputs[0]].data as Float32Array;
    const r = await refitModel(compiled, { checkpoint: changed });
    expect(r.plan.totals.errors).toBe(0);
    expect(r.report.changed).toBe(1);
    // The logits move by exactly the new bias (the head is the last layer).
    const after = (await compiled.run(inputs))[compiled.outputs[0]];
    const classes = bias.shape[0];
    for (let i = 0; i < after.data.length; i++) expect(Math.abs((after.data as Float32Array)[i] - before[i] - newBias[i % classes])).toBeLessThanOrEqual(1e-5);
  });

  /** A Linear stack (PyTorch names, legacy-style Gemm nodes) whose output is multiplied by exp(logit_scale),
   *  as CLIP does: the exporter folded exp(logit_scale) into a Constant node, so the checkpoint's
   *  `logit_scale` is the source of no weight. */
  const scaledStack = (weights: Readonly<Record<string, Tensor>>): Uint8Array => {
    const b = new GraphBuilder('scaled', 17);
    const x = b.input('x', 'float32', [2, 6]);
    const init = (name: string) => b.initializer(name, weights[name]);
    let h = b.op('Gemm', [x, init('layers.0.weight'), init('layers.0.bias')], { transB: 1 }, '/layers.0/Gemm');
    h = b.op('Relu', [h], {}, '/act/Relu');
    h = b.op('Gemm', [h, init('layers.1.weight'), init('layers.1.bias')], { transB: 1 }, '/layers.1/Gemm');
    const literal = b.op('Constant', [], { value: f32([1], [Math.fround(Math.exp((weights.logit_scale.data as Float32Array)[0]))]) }, '/Constant');
    const y = b.op('Mul', [h, literal], {}, '/Mul');
    b.output(y);
    const g = b.build();
    return encodeSegmentModel({
      name: 'scaled', opset: 17, nodes: g.nodes,
      inputs: [{ name: 'x', type: { dtype: 'float32', shape: [2, 6] } }],
      outputs: [{ name: y, type: { dtype: 'float32', shape: [2, 4] } }],
      initializers: new Map(g.initializers.map((i) => [i.name, i.tensor])),
    });
  };

  it('a Linear stack whose graph bakes exp(logit_scale) in as a literal: logit_scale is pinned; changing it is refused; changing the Linear weights is not', async () => {
    const next = random(1201);
    const v1: Record<string, Tensor> = {
      'layers.0.weight': f32([5, 6], fill(next, 30, 0.4)),
      'layers.0.bias': f32([5], fill(next, 5, 0.1)),
      'layers.1.weight': f32([4, 5], fill(next, 20, 0.4)),
      'layers.1.bias': f32([4], fill(next, 4, 0.1)),
      logit_scale: f32([1], [Math.fround(Math.log(1 / 0.07))]),
    };
    const onnx = join(dir.path, 'scaled.onnx');
    writeFileSync(onnx, scaledStack(v1));
    const v1Path = join(dir.path, 'scaled-v1.safetensors');
    await writeTensors(v1Path, v1);
    const model = join(dir.path, 'scaled.trtr');
    const compiled = await runCli(['compile', onnx, '--weights', v1Path, '-o', model, '--no-cache']);
    expect(compiled.code, compiled.stderr).toBe(0);
    const inputs = { x: f32([2, 6], fill(next, 12, 1)) };

    // The Linear weights are read by weights; logit_scale by none.
    {
      using built = await compile(onnx, v1Path);
      const read = sourcesOf(built);
      for (const n of ['layers.0.weight', 'layers.0.bias', 'layers.1.weight', 'layers.1.bias']) expect(read.has(n), n).toBe(true);
      expect(read.has('logit_scale')).toBe(false);
    }

    const hotter = join(dir.path, 'scaled-logit-scale.safetensors');
    await writeTensors(hotter, { ...v1, logit_scale: f32([1], [Math.fround(Math.log(1 / 0.01))]) });
    await expectPinnedRefusal(model, onnx, v1Path, hotter, 'logit_scale', inputs);

    // A fine-tuned Linear with logit_scale unchanged refits (the refusal is about the pinned tensor).
    const tuned = join(dir.path, 'scaled-tuned.safetensors');
    await writeTensors(tuned, { ...v1, 'layers.1.weight': f32([4, 5], fill(next, 20, 0.4)) });
    const plan = await runCli(['plan', model, '--weights', tuned]);
    expect(plan.code, plan.stdout).toBe(0);
    const refit = await runCli(['--json', 'refit', model, '--weights', tuned]);
    expect(refit.code, refit.stderr).toBe(0);
    expect((JSON.parse(refit.stdout) as { report: { changed: number } }).report.changed).toBe(1);
  });
});

describe('ambiguous weights: equal-valued candidates structure cannot separate', () => {
  // Two Linear layers of the same width with fresh zero biases that the exporter stored as ONE shared
  // initializer; nodes without names (no module scopes); checkpoint names that say nothing.
  const width = 4;
  const next = random(1202);
  const k0 = f32([width, 3], fill(next, width * 3, 0.5));
  const k1 = f32([width, width], fill(next, width * width, 0.5));
  const zeros = f32([width], new Array<number>(width).fill(0));
  const names = { k0: 'tensor_a7', b0: 'tensor_q2', k1: 'tensor_m4', b1: 'tensor_f9' } as const;

  const ambiguousOnnx = (): Uint8Array => {
    const b = new GraphBuilder('ambiguous', 17);
    const x = b.input('x', 'float32', [2, 3]);
    const shared = b.initializer('val_0', zeros);
    let h = b.op('Gemm', [x, b.initializer('val_1', k0), shared], { transB: 1 });
    h = b.op('Relu', [h]);
    h = b.op('Gemm', [h, b.initializer('val_2', k1), shared], { transB: 1 });
    b.output(h);
    const g = b.build();
    return encodeSegmentModel({
      name: 'ambiguous', opset: 17, nodes: g.nodes.map((n) => ({ ...n, name: '' })),
      inputs: [{ name: 'x', type: { dtype: 'float32', shape: [2, 3] } }],
      outputs: [{ name: h, type: { dtype: 'float32', shape: [2, width] } }],
      initializers: new Map(g.initializers.map((i) => [i.name, i.tensor])),
    });
  };

  const checkpoint = (b0: ArrayLike<number>, b1: ArrayLike<number>): Record<string, Tensor> => ({
    [names.k0]: k0, [names.b0]: f32([width], b0), [names.k1]: k1, [names.b1]: f32([width], b1),
  });

  /** y = relu(x k0^T + b0) k1^T + b1, in float32 steps. */
  const reference = (x: Float32Array, b0: ArrayLike<number>, b1: ArrayLike<number>): Float32Array => {
    const out = new Float32Array(2 * width);
    const kd0 = k0.data as Float32Array;
    const kd1 = k1.data as Float32Array;
    for (let r = 0; r < 2; r++) {
      const h = new Float32Array(width);
      for (let o = 0; o < width; o++) {
        let s = 0;
        for (let i = 0; i < 3; i++) s += x[r * 3 + i] * kd0[o * 3 + i];
        h[o] = Math.max(0, s + b0[o]);
      }
      for (let o = 0; o < width; o++) {
        let s = 0;
        for (let i = 0; i < width; i++) s += h[i] * kd1[o * width + i];
        out[r * width + o] = s + b1[o];
      }
    }
    return out;
  };

  /** Engine weight ids a message names. */
  const weightIds = (message: string): string[] => [...new Set(message.match(/engine\/\d+\/[^\s'",;()]+?\/(?:bias|kernel|scale|shift|constant)\b/g) ?? [])];

  it('compile fails naming the weight and every candidate (CLI exit 2, library AmbiguousWeights); --map / map settles it and refits follow the map', async () => {
    const onnx = join(dir.path, 'ambiguous.onnx');
    writeFileSync(onnx, ambiguousOnnx());
    const v1Path = join(dir.path, 'ambiguous-v1.safetensors');
    await writeTensors(v1Path, checkpoint(zeros.data as Float32Array, zeros.data as Float32Array));
    const model = join(dir.path, 'ambiguous.trtr');

    // A refused compile leaves what was at the output path as it was.
    writeFileSync(model, 'previous contents');
    const refused = await runCli(['compile', onnx, '--weights', v1Path, '-o', model, '--no-cache']);
    expectRefusedLine(refused, new RegExp(`(?=.*${names.b0})(?=.*${names.b1})`));
    expect(readFileSync(model, 'utf8')).toBe('previous contents');
    expect(weightIds(refused.stderr).length, refused.stderr).toBeGreaterThan(0);
    // Neither kernel is ambiguous: their values tell them apart.
    expect(refused.stderr).not.toMatch(new RegExp(`${names.k0}|${names.k1}`));

    const error = await rejection(compile(onnx, v1Path));
    expect(error).toBeInstanceOf(CompileError);
    expect((error as { _tag: string })._tag).toBe('AmbiguousWeights');
    expect((error as Error).message).toMatch(new RegExp(`(?=.*${names.b0})(?=.*${names.b1})`));

    // Settle it: map each engine weight the errors name, one at a time, until the compile succeeds. The
    // first named weight takes b0's tensor, the next b1's.
    const settled: Record<string, string> = {};
    const mapFile = join(dir.path, 'ambiguous-map.json');
    let compiled: RefitModel | undefined;
    for (let round = 0; round < 4 && compiled === undefined; round++) {
      const options: CompileOptions & { readonly map?: Readonly<Record<string, string>> } = { map: settled };
      try {
        compiled = await compile(onnx, v1Path, options);
      } catch (e) {
        expect((e as { _tag?: string })._tag, (e as Error).message).toBe('AmbiguousWeights');
        const named = weightIds((e as Error).message).filter((id) => settled[id] === undefined);
        expect(named.length, `a further round names no new weight: ${(e as Error).message}`).toBeGreaterThan(0);
        for (const id of named) settled[id] = Object.keys(settled).length === 0 ? names.b0 : names.b1;
      }
    }
    expect(compiled, 'the map settles every ambiguity').toBeDefined();
    using m = compiled!;
    const settledIds = Object.keys(settled);
    expect(settledIds.length).toBe(2);
    // The binding is the map's.
    for (const id of settledIds) expect(exprSources(m.weightMap.targets.find((t) => t.id === id)!.expr)).toEqual([settled[id]]);
    // Which layer took b0: the one whose kernel reads k0.
    const layerOf = (id: string) => m.weightMap.targets.find((t) => t.id === id)!.layer;
    const firstLayer = m.weightMap.targets.find((t) => t.status === 'mapped' && exprSources(t.expr).includes(names.k0))!.layer;
    const b0Layer = settledIds.find((id) => settled[id] === names.b0)!;
    const b0First = layerOf(b0Layer) === firstLayer;

    // Refit to biases that differ: the outputs are those of the mapped binding, not of the other one.
    const b0 = [0.1, -0.2, 0.3, -0.4];
    const b1 = [-0.5, 0.25, 0.05, 0.6];
    const v2Path = join(dir.path, 'ambiguous-v2.safetensors');
    await writeTensors(v2Path, checkpoint(b0, b1));
    const x = Float32Array.from(fill(next, 6, 1));
    const r = await refitModel(m, { checkpoint: v2Path });
    expect(r.report.changed).toBe(2);
    const got = (await m.run({ x: f32([2, 3], x) }))[m.outputs[0]].data as Float32Array;
    const want = b0First ? reference(x, b0, b1) : reference(x, b1, b0);
    const other = b0First ? reference(x, b1, b0) : reference(x, b0, b1);
    for (let i = 0; i < want.length; i++) expect(Math.abs(got[i] - want[i])).toBeLessThanOrEqual(1e-5 + 1e-4 * Math.abs(want[i]));
    expect(Array.from(got).some((v, i) => Math.abs(v - other[i]) > 1e-3)).toBe(true);

    // The CLI takes the same map as a file.
    writeFileSync(mapFile, JSON.stringify(settled));
    const viaCli = await runCli(['--json', 'compile', onnx, '--weights', v1Path, '-o', model, '--no-cache', '--map', mapFile]);
    expect(viaCli.code, viaCli.stderr).toBe(0);
    expect((JSON.parse(viaCli.stdout) as { weights: { unmapped: number } }).weights.unmapped).toBe(0);
    const before = readFileSync(model);
    expect((await runCli(['refit', model, '--weights', v2Path])).code).toBe(0);
    expect(readFileSync(model).equals(before)).toBe(false);
    const outputs = join(dir.path, 'ambiguous-out.safetensors');
    const inputsPath = join(dir.path, 'ambiguous-in.safetensors');
    await writeTensors(inputsPath, { x: f32([2, 3], x) });
    expect((await runCli(['run', model, '--inputs', inputsPath, '-o', outputs])).code).toBe(0);
    const ran = Object.values(readSafetensors(outputs))[0].data as Float32Array;
    for (let i = 0; i < want.length; i++) expect(Math.abs(ran[i] - want[i])).toBeLessThanOrEqual(1e-5 + 1e-4 * Math.abs(want[i]));
  });
});
