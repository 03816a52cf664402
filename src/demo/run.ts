/**
 * The main job on the shipped fixtures, on the embedded default engine (libtrtshim's `ref` CPU backend):
 * for each model, build a refittable engine from weights_v1 and check it against PyTorch's output, refit it
 * to weights_v2 and check again, then time a full build with v2 against the refit.
 */
import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { buildEngine, type Engine } from '../../ffi/index.js';
import { openSafetensors } from '../safetensors/index.js';
import { cnnModel, mlpModel, type HandModel, type HostTensor } from './models.js';

export interface OutputCheck {
  readonly pass: boolean;
  readonly maxError: number;
}

export interface DemoStep {
  readonly step: string;
  readonly seconds: number;
  readonly check?: OutputCheck;
}

export interface DemoReport {
  readonly engine: string;
  readonly models: ReadonlyArray<{ readonly name: string; readonly steps: readonly DemoStep[] }>;
  readonly pass: boolean;
}

export class FixturesNotFoundError extends Error {
  override readonly name = 'FixturesNotFoundError';
  readonly _tag = 'FixturesNotFound' as const;
}

/** ../shared/fixtures beside the package root (the layout CI and the developers' machines have). */
export const defaultFixturesDir = (): string => {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 5; i++) {
    const candidate = join(dir, '..', 'shared', 'fixtures');
    if (existsSync(candidate)) return resolve(candidate);
    dir = dirname(dir);
  }
  throw new FixturesNotFoundError('cannot find the fixtures folder ../shared/fixtures; pass --fixtures DIR');
};

const readFloatTensors = async (path: string): Promise<Map<string, HostTensor>> => {
  using file = await openSafetensors(path);
  const out = new Map<string, HostTensor>();
  for (const [name, info] of file.tensors) {
    if (info.dtype !== 'F32') continue;
    out.set(name, { shape: [...info.shape], data: Float32Array.from(file.toFloat32(name)) });
  }
  return out;
};

/** PyTorch's tolerance for float32 engines, as the fixtures' README gives it: 1e-4 relative plus 1e-5 absolute. */
export const compareOutputs = (actual: Float32Array, expected: Float32Array, rtol = 1e-4, atol = 1e-5): OutputCheck => {
  if (actual.length !== expected.length) return { pass: false, maxError: Infinity };
  let pass = true;
  let maxError = 0;
  for (let i = 0; i < actual.length; i++) {
    const error = Math.abs(actual[i] - expected[i]);
    if (!(error <= atol + rtol * Math.abs(expected[i]))) pass = false;
    if (!(error <= maxError)) maxError = error;
  }
  return { pass, maxError };
};

const timed = <T>(fn: () => T): [T, number] => {
  const start = process.hrtime.bigint();
  const value = fn();
  return [value, Number(process.hrtime.bigint() - start) / 1e9];
};

const runModel = async (
  fixtures: string,
  name: string,
  make: (tensors: ReadonlyMap<string, HostTensor>, batch: number) => HandModel,
): Promise<{ name: string; steps: DemoStep[] }> => {
  const dir = join(fixtures, name);
  const [v1, v2, inputs, expected1, expected2] = await Promise.all(
    ['weights_v1', 'weights_v2', 'inputs', 'expected_v1', 'expected_v2'].map((f) => readFloatTensors(join(dir, `${f}.safetensors`))),
  );
  const x = inputs.get('x');
  const want1 = expected1.get('output');
  const want2 = expected2.get('output');
  if (x === undefined || want1 === undefined || want2 === undefined) {
    throw new FixturesNotFoundError(`fixture ${name} lacks input 'x' or output 'output'`);
  }
  const model1 = make(v1, x.shape[0]);
  const model2 = make(v2, x.shape[0]);
  const steps: DemoStep[] = [];

  const [engine, buildSeconds] = timed(() => buildEngine(model1.network, { refittable: true, tacticSearch: true }));
  using _engine: Engine = engine;
  const [out1, run1] = timed(() => engine.run({ x: x.data }).output);
  steps.push({ step: 'build (v1, tactic search)', seconds: buildSeconds });
  steps.push({ step: 'run v1', seconds: run1, check: compareOutputs(out1, want1.data) });

  const updates = model2.bindings.map((b) => {
    const t = v2.get(b.source);
    if (t === undefined) throw new FixturesNotFoundError(`weights_v2 of ${name} lacks '${b.source}'`);
    return { layer: b.layer, role: b.role, weights: { dtype: 'float32' as const, shape: t.shape, data: t.data } };
  });
  const [, refitSeconds] = timed(() => engine.refit(updates));
  const [out2, run2] = timed(() => engine.run({ x: x.data }).output);
  steps.push({ step: 'refit to v2', seconds: refitSeconds });
  steps.push({ step: 'run v2', seconds: run2, check: compareOutputs(out2, want2.data) });

  const [rebuilt, rebuildSeconds] = timed(() => buildEngine(model2.network, { refittable: true, tacticSearch: true }));
  using _rebuilt: Engine = rebuilt;
  const same = Buffer.from(rebuilt.run({ x: x.data }).output.buffer).equals(Buffer.from(out2.buffer));
  steps.push({ step: 'full build (v2), for scale', seconds: rebuildSeconds, check: { pass: same, maxError: same ? 0 : Infinity } });
  return { name, steps };
};

export const runDemo = async (options: { fixturesDir?: string } = {}): Promise<DemoReport> => {
  const fixtures = options.fixturesDir ?? defaultFixturesDir();
  const models = [await runModel(fixtures, 'mlp', mlpModel), await runModel(fixtures, 'cnn_bn', cnnModel)];
  const pass = models.every((m) => m.steps.every((s) => s.check === undefined || s.check.pass));
  return { engine: 'libtrtshim ref (CPU)', models, pass };
};
