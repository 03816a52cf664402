/**
 * Output error of each quantized format against the float32 engine, on the fixtures (mlp, cnn_bn, built by
 * hand from weights_v1 as the demo does) and on random networks, below the bounds documented in the README
 * ("Quantized weights: error bounds"). The error is max |y - y_fp32| / max |y_fp32| over all outputs; on
 * random networks (inputs in [-1, 1]) max |y - y_fp32| / max(max |y_fp32|, 1).
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { buildEngine, type BuildOptions } from '../ffi/engine.js';
import type { NetworkDefinition } from '../src/network/types.js';
import { cnnModel, mlpModel, type HostTensor } from '../src/demo/models.js';
import { openSafetensors } from '../src/safetensors/index.js';
import { families } from './support/networks.js';

const runs = (n: number) => (process.env.TRT_REFIT_FUZZ === '1' ? n * 20 : n);
const fixtures = join(import.meta.dirname, '..', '..', 'shared', 'fixtures');

/** The documented bounds (relative to the largest float32 output). */
export const ERROR_BOUNDS = {
  fixtures: { fp16: 2e-3, bf16: 1e-2, int8: 2e-2, fp8: 1e-1, 'int4:32': 2.5e-1 },
  random: { int8: 2e-2, fp8: 1.5e-1, 'int4:32': 3e-1 },
} as const;
const options: Record<string, BuildOptions> = {
  fp16: { weightPrecision: 'float16' },
  bf16: { weightPrecision: 'bfloat16' },
  int8: { weightFormat: 'int8' },
  fp8: { weightFormat: 'fp8_e4m3' },
  'int4:32': { weightFormat: 'int4', int4GroupSize: 32 },
};

/** max |y - y_fp32| / max(max |y_fp32|, floor): relative to the output's scale, absolute below `floor`
 *  (a ReLU can cut an output to near 0, where a relative error says nothing). */
const relativeError = (net: NetworkDefinition, inputs: Record<string, Float32Array | Int32Array | BigInt64Array>, o: BuildOptions, floor = 0): number => {
  using reference = buildEngine(net);
  using quantized = buildEngine(net, o);
  const want = reference.run(inputs);
  const got = quantized.run(inputs);
  let err = 0;
  let mag = 0;
  for (const [name, y] of Object.entries(want))
    for (let i = 0; i < y.length; i++) {
      err = Math.max(err, Math.abs(got[name][i] - y[i]));
      mag = Math.max(mag, Math.abs(y[i]));
    }
  return err / Math.max(mag, floor, Number.MIN_VALUE);
};

const readFloat = async (path: string): Promise<Map<string, HostTensor>> => {
  using file = await openSafetensors(path);
  const out = new Map<string, HostTensor>();
  for (const [name, info] of file.tensors) if (info.dtype === 'F32') out.set(name, { shape: [...info.shape], data: Float32Array.from(file.toFloat32(name)) });
  return out;
};

describe.runIf(existsSync(join(fixtures, 'mlp')))('fixtures: error of each format against float32', () => {
  for (const [model, make] of [['mlp', mlpModel], ['cnn_bn', cnnModel]] as const) {
    it(model, async () => {
      const weights = await readFloat(join(fixtures, model, 'weights_v1.safetensors'));
      const x = (await readFloat(join(fixtures, model, 'inputs.safetensors'))).get('x')!;
      const net = make(weights, x.shape[0]).network;
      const errors = Object.fromEntries(Object.keys(ERROR_BOUNDS.fixtures).map((f) => [f, relativeError(net, { x: x.data }, options[f])]));
      if (process.env.TRT_REFIT_QUANT_REPORT === '1') console.log(model, JSON.stringify(errors));
      for (const [f, bound] of Object.entries(ERROR_BOUNDS.fixtures)) expect(errors[f], `${model} ${f}: ${JSON.stringify(errors)}`).toBeLessThan(bound);
      // Finer formats are closer: the bounds are not vacuous.
      expect(errors.int8).toBeLessThan(errors['int4:32']);
      expect(errors.int8).toBeGreaterThan(0);
    });
  }
});

describe('random networks: error of each format against float32', () => {
  // Networks whose outputs are not dominated by cancellation: FC / conv stacks and the wide family.
  const nets = fc.oneof(families.mlp(), families.wide(), families.conv());
  for (const f of Object.keys(ERROR_BOUNDS.random) as Array<keyof typeof ERROR_BOUNDS.random>) {
    let worst = 0;
    test.prop([nets], { numRuns: runs(40) })(f, (c) => {
      const error = relativeError(c.net, c.inputs as Record<string, Float32Array>, options[f], 1);
      worst = Math.max(worst, error);
      if (process.env.TRT_REFIT_QUANT_REPORT === '1') console.log(f, 'worst so far', worst);
      expect(error).toBeLessThan(ERROR_BOUNDS.random[f]);
    });
  }
});
