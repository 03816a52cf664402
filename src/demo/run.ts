/**
 * The main job on the shipped fixtures, on the embedded default engine (libtrtshim's `ref` CPU backend).
 * Every model folder under the fixtures folder (an ONNX export, weights_v1/v2, inputs and PyTorch's expected
 * outputs: the layout ../shared/fixtures/README.md describes) takes part, so `--fixtures DIR` runs it on a
 * user's own exports. For every fixture model: compile its ONNX export once with weights_v1 and check the outputs against
 * PyTorch's, refit to weights_v2, apply the LoRA adapter where there is one, go back to v1, and check the
 * outputs after each step. Timings show what a refit costs against the compile it replaces.
 */
import { existsSync, readdirSync, statSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as E from 'fp-ts/lib/Either.js';
import { compile } from '../compile/index.js';
import { readTensorsTE, refitModel, type WeightsSpec } from '../effect/index.js';
import type { RefitModel } from '../model/index.js';
import type { Tensor } from '../trace/ir.js';

export interface OutputCheck {
  readonly pass: boolean;
  readonly maxError: number;
}

export interface DemoStep {
  readonly step: string;
  readonly seconds: number;
  /** Bytes of engine weights the step changed (refits only). */
  readonly bytesMoved?: number;
  readonly check?: OutputCheck;
}

export interface DemoModel {
  readonly name: string;
  readonly onnx: string;
  readonly segments: { readonly engine: number; readonly fallback: number };
  readonly steps: readonly DemoStep[];
  /** Why the model could not be compiled or refitted (the demo then fails). */
  readonly error?: string;
}

export interface DemoReport {
  readonly engine: string;
  readonly models: readonly DemoModel[];
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

/** The fixtures' tolerance for float32 engines: 1e-4 relative plus 1e-5 absolute. */
export const compareOutputs = (actual: ArrayLike<number>, expected: ArrayLike<number>, rtol = 1e-4, atol = 1e-5): OutputCheck => {
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

const readTensors = async (path: string): Promise<Record<string, Tensor>> => {
  const result = await readTensorsTE(path)();
  if (E.isLeft(result)) throw new FixturesNotFoundError(`cannot read ${path}: ${result.left.detail}`);
  return result.right;
};

const seconds = (start: bigint): number => Number(process.hrtime.bigint() - start) / 1e9;

const checkOutput = async (model: RefitModel, inputs: Record<string, Tensor>, expectedPath: string): Promise<OutputCheck> => {
  const expected = (await readTensors(expectedPath))['output'];
  const outputs = await model.run(inputs);
  const actual = outputs['output'] ?? Object.values(outputs)[0];
  if (expected === undefined || actual === undefined) return { pass: false, maxError: Infinity };
  return compareOutputs(actual.data as ArrayLike<number>, expected.data as ArrayLike<number>);
};

const runFixture = async (fixtures: string, name: string): Promise<DemoModel> => {
  const dir = join(fixtures, name);
  const onnx = join(dir, 'model_dynamo.onnx');
  const inputs = await readTensors(join(dir, 'inputs.safetensors'));
  const steps: DemoStep[] = [];

  let start = process.hrtime.bigint();
  using model = await compile(onnx, join(dir, 'weights_v1.safetensors'), { tacticSearch: true });
  steps.push({ step: 'compile (v1)', seconds: seconds(start), check: await checkOutput(model, inputs, join(dir, 'expected_v1.safetensors')) });

  const refitStep = async (label: string, weights: WeightsSpec, expected: string): Promise<void> => {
    const begin = process.hrtime.bigint();
    const { report } = await refitModel(model, weights);
    const took = seconds(begin);
    steps.push({ step: label, seconds: took, bytesMoved: report.bytesMoved, check: await checkOutput(model, inputs, join(dir, expected)) });
  };
  await refitStep('refit to v2', { checkpoint: join(dir, 'weights_v2.safetensors') }, 'expected_v2.safetensors');
  if (existsSync(join(dir, 'lora', 'adapter_config.json'))) {
    await refitStep('refit v1 + LoRA', { checkpoint: join(dir, 'weights_v1.safetensors'), lora: [{ path: join(dir, 'lora'), weight: 1 }] }, 'expected_lora.safetensors');
  }
  await refitStep('refit back to v1', { checkpoint: join(dir, 'weights_v1.safetensors') }, 'expected_v1.safetensors');
  await refitStep('refit v1 again (no change)', { checkpoint: join(dir, 'weights_v1.safetensors') }, 'expected_v1.safetensors');

  const engines = model.engineStages().length;
  return { name, onnx, segments: { engine: engines, fallback: model.fallbackStages().length }, steps };
};

/** The files a fixture folder needs besides its ONNX export. */
const FIXTURE_FILES = ['weights_v1.safetensors', 'weights_v2.safetensors', 'inputs.safetensors', 'expected_v1.safetensors', 'expected_v2.safetensors'];

/** Model folders under `fixtures` with the fixture layout (model_dynamo.onnx and the files above), by name. */
export const discoverFixtures = (fixtures: string): string[] => {
  if (!existsSync(fixtures) || !statSync(fixtures).isDirectory()) throw new FixturesNotFoundError(`${fixtures}: not a folder`);
  const found = readdirSync(fixtures).sort().filter((name) => {
    const dir = join(fixtures, name);
    return statSync(dir).isDirectory() && existsSync(join(dir, 'model_dynamo.onnx')) && FIXTURE_FILES.every((f) => existsSync(join(dir, f)));
  });
  if (found.length === 0) throw new FixturesNotFoundError(`${fixtures}: no model folder with model_dynamo.onnx, ${FIXTURE_FILES.join(', ')}`);
  return found;
};

export const runDemo = async (options: { fixturesDir?: string } = {}): Promise<DemoReport> => {
  const fixtures = options.fixturesDir ?? defaultFixturesDir();
  const models: DemoModel[] = [];
  for (const name of discoverFixtures(fixtures)) {
    try {
      models.push(await runFixture(fixtures, name));
    } catch (e) {
      models.push({ name, onnx: join(fixtures, name, 'model_dynamo.onnx'), segments: { engine: 0, fallback: 0 }, steps: [], error: e instanceof Error ? e.message : String(e) });
    }
  }
  const pass = models.every((m) => m.error === undefined && m.steps.every((s) => s.check === undefined || s.check.pass));
  return { engine: 'libtrtshim ref (CPU)', models, pass };
};
