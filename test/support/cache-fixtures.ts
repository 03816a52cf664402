/** Fixture loading for the cache tests: a fixture's dynamo ONNX graph analyzed, and its inputs. */
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import * as E from 'fp-ts/lib/Either.js';
import { decodeOnnx } from '../../src/trace/decode.js';
import { directoryResolver } from '../../src/trace/load.js';
import { analyzeGraph } from '../../src/trace/analyze.js';
import { openSafetensors } from '../../src/safetensors/index.js';
import { fixturesDir } from './safetensors.js';

export const fixtureAnalyzed = (model: string) => {
  const path = join(fixturesDir, model, 'model_dynamo.onnx');
  const g = decodeOnnx(new Uint8Array(readFileSync(path)), directoryResolver(dirname(path)));
  if (E.isLeft(g)) throw new Error(`decode ${model}`);
  const a = analyzeGraph(g.right);
  if (E.isLeft(a)) throw new Error(`analyze ${model}`);
  return a.right;
};

export const fixtureInputs = async (model: string): Promise<Record<string, Float32Array | BigInt64Array | Int32Array>> => {
  using file = await openSafetensors(join(fixturesDir, model, 'inputs.safetensors'));
  const out: Record<string, Float32Array | BigInt64Array | Int32Array> = {};
  for (const [name, info] of file.tensors) {
    const bytes = file.bytes(name);
    const copy = new Uint8Array(bytes);
    out[name] = info.dtype === 'I64' ? new BigInt64Array(copy.buffer) : info.dtype === 'I32' ? new Int32Array(copy.buffer) : Float32Array.from(file.toFloat32(name));
  }
  return out;
};

