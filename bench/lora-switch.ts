/**
 * Claim: switching a compiled model from one LoRA adapter to another is a refit of only the weights the
 * adapters touch, far cheaper than compiling again.
 *
 * gpt2_tiny and bert_tiny (their PEFT adapter, and a second adapter made from it with lora_B negated and
 * halved), and the ~1 GiB synthetic transformer of refit-e2e (two random rank-16 PEFT adapters on every
 * q and v). Per model: a switch X -> Y (merge + plan + refit, best of 5 alternating switches), its plan and
 * effect parts, the bytes it moves against the model's, and the switch against a full compile in the same run.
 */
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import { openCheckpoint } from '../src/checkpoint/index.js';
import { compile, compileNetwork } from '../src/compile/index.js';
import { executePlan, openWeightsTE, planForRefit, type WeightsSpec } from '../src/effect/index.js';
import type { RefitModel } from '../src/model/index.js';
import { openSafetensors, writeSafetensors } from '../src/safetensors/index.js';
import { writeResult, type Figure } from './lib.js';
import { filler, transformer, writeCheckpointOf } from './refit-e2e.js';
import { fixturesDir } from '../test/support/safetensors.js';

const seconds = (start: bigint): number => Number(process.hrtime.bigint() - start) / 1e9;

/** One switch to `spec`: merge + plan, then the effect. */
const switchTo = async (model: RefitModel, spec: WeightsSpec) => {
  let start = process.hrtime.bigint();
  const opened = await openWeightsTE(spec)();
  if (E.isLeft(opened)) throw new Error(JSON.stringify(opened.left));
  using weights = opened.right;
  const plan = planForRefit(model, weights.store);
  const planSeconds = seconds(start);
  start = process.hrtime.bigint();
  const report = await executePlan(model, plan, weights.store);
  return { planSeconds, effectSeconds: seconds(start), bytesMoved: report.bytesMoved, bytesTotal: plan.totals.bytesTotal };
};

/** Best of `n` alternating switches X -> Y -> X ... (after one warm-up switch). */
const bestSwitch = async (model: RefitModel, x: WeightsSpec, y: WeightsSpec, n = 5) => {
  await switchTo(model, x);
  let best = { total: Infinity, planSeconds: 0, effectSeconds: 0, bytesMoved: 0, bytesTotal: 0 };
  for (let i = 0; i < n; i++) {
    const r = await switchTo(model, i % 2 === 0 ? y : x);
    if (r.planSeconds + r.effectSeconds < best.total) best = { total: r.planSeconds + r.effectSeconds, ...r };
  }
  return best;
};

/** A second adapter from a PEFT adapter directory: lora_B negated and halved. */
const derivedAdapter = async (from: string, to: string): Promise<void> => {
  mkdirSync(to, { recursive: true });
  writeFileSync(join(to, 'adapter_config.json'), readFileSync(join(from, 'adapter_config.json')));
  using file = await openSafetensors(join(from, 'adapter_model.safetensors'));
  await writeSafetensors(join(to, 'adapter_model.safetensors'), file.names().map((name) => {
    const values = Float32Array.from(file.toFloat32(name), (v) => (name.includes('lora_B') ? -0.5 * v : v));
    return { name, dtype: 'F32' as const, shape: file.tensors.get(name)!.shape.map(Number), data: new Uint8Array(values.buffer) };
  }));
};

/** A random PEFT adapter (rank r) on the given modules ([out, in] each). */
const randomAdapter = async (dir: string, modules: readonly { name: string; out: number; in: number }[], r: number, seed: number): Promise<void> => {
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'adapter_config.json'), JSON.stringify({ peft_type: 'LORA', r, lora_alpha: 2 * r, target_modules: ['q', 'v'], fan_in_fan_out: false }));
  const fill = filler(seed);
  await writeSafetensors(join(dir, 'adapter_model.safetensors'), modules.flatMap((m) => [
    { name: `base_model.model.${m.name}.lora_A.weight`, dtype: 'F32' as const, shape: [r, m.in], data: () => new Uint8Array(fill(r * m.in, -0.01, 0.01).buffer) },
    { name: `base_model.model.${m.name}.lora_B.weight`, dtype: 'F32' as const, shape: [m.out, r], data: () => new Uint8Array(fill(m.out * r, -0.01, 0.01).buffer) },
  ]));
};

const record = (label: string, s: Awaited<ReturnType<typeof bestSwitch>>, compileSeconds: number, figures: Record<string, Figure>, ratios: Record<string, number>) => {
  figures[`${label}_switch_seconds`] = { value: s.total, unit: 's' };
  figures[`${label}_switch_plan_seconds`] = { value: s.planSeconds, unit: 's' };
  figures[`${label}_switch_effect_seconds`] = { value: s.effectSeconds, unit: 's' };
  figures[`${label}_switch_bytes_moved`] = { value: s.bytesMoved, unit: 'B' };
  figures[`${label}_compile_seconds`] = { value: compileSeconds, unit: 's' };
  ratios[`${label}_switch_vs_compile_time`] = s.total / compileSeconds;
  ratios[`${label}_bytes_moved_vs_model`] = s.bytesMoved / s.bytesTotal;
};

export const run = async (): Promise<void> => {
  const figures: Record<string, Figure> = {};
  const ratios: Record<string, number> = {};
  const dir = mkdtempSync(join(tmpdir(), 'trt-refit-lora-'));
  try {
    for (const name of ['gpt2_tiny', 'bert_tiny']) {
      const fixture = join(fixturesDir, name);
      const second = join(dir, `${name}-lora2`);
      await derivedAdapter(join(fixture, 'lora'), second);
      const start = process.hrtime.bigint();
      using model = await compile(join(fixture, 'model_dynamo.onnx'), join(fixture, 'weights_v1.safetensors'));
      const compileSeconds = seconds(start);
      const base = join(fixture, 'weights_v1.safetensors');
      record(name, await bestSwitch(model, { checkpoint: base, lora: [{ path: join(fixture, 'lora'), weight: 1 }] }, { checkpoint: base, lora: [{ path: second, weight: 1 }] }), compileSeconds, figures, ratios);
    }
    {
      let synthetic: ReturnType<typeof transformer> | undefined = transformer(2 ** 30, 1);
      const base = join(dir, 'base.safetensors');
      await writeCheckpointOf(base, synthetic);
      const modules = synthetic.network.layers.filter((l) => l.kind === 'fullyConnected' && /\.(q|v)$/.test(l.name)).map((l) => ({ name: l.name, out: synthetic!.hidden, in: synthetic!.hidden }));
      await randomAdapter(join(dir, 'x'), modules, 16, 3);
      await randomAdapter(join(dir, 'y'), modules, 16, 4);
      using ckpt = await openCheckpoint(base);
      const start = process.hrtime.bigint();
      const compiled = compileNetwork(synthetic.network, ckpt);
      const compileSeconds = seconds(start);
      if (E.isLeft(compiled)) throw new Error(JSON.stringify(compiled.left));
      synthetic = undefined;
      using model = compiled.right;
      record('synthetic_1GiB', await bestSwitch(model, { checkpoint: base, lora: [{ path: join(dir, 'x'), weight: 1 }] }, { checkpoint: base, lora: [{ path: join(dir, 'y'), weight: 1 }] }, 3), compileSeconds, figures, ratios);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  writeResult('lora-switch', figures, ratios);
};
