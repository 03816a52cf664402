/**
 * The reference evaluator: runs a NetworkDefinition on host tensors with plain loops, layer by layer, no
 * fusions. It is the oracle the engine is tested against, so it favours obviousness over speed.
 *
 * Semantics pinned down here where trtshim.h leaves room:
 *   - every layer computes in float64 and rounds its output to float32 (the engine's activation dtype);
 *   - float16/bfloat16 weights are widened to float32 exactly before use;
 *   - epsilon of the norms is rounded to float32 first (the C API takes a float);
 *   - max pooling ignores padding; average pooling without countIncludePad divides by the number of
 *     window elements inside the input;
 *   - an out-of-range gather index throws ReferenceEvaluationError (the engine fails at run time);
 *   - outputs are float32; an index tensor marked as output is converted to float32 values.
 */
import type { Layer, NetworkDefinition } from '../network/types.js';
import * as L from './layers.js';
import { elementCount, fail, numberAt, type Tensor } from './tensor.js';

export type HostTensor = Float32Array | Int32Array | BigInt64Array;
export { ReferenceEvaluationError, type Tensor } from './tensor.js';
export * from './half.js';
export { erf } from './scalar.js';

const inputTensor = (name: string, dtype: string, shape: readonly number[], data: HostTensor): Tensor => {
  const count = elementCount(shape);
  if (data.length !== count) fail(name, `input has ${data.length} elements, shape [${shape}] needs ${count}`);
  if (dtype === 'float32' && data instanceof Float32Array) return { dtype, shape, data };
  if (dtype === 'int32' && data instanceof Int32Array) return { dtype, shape, data };
  if (dtype === 'int64' && data instanceof BigInt64Array) return { dtype, shape, data };
  return fail(name, `input of dtype ${dtype} given a ${data.constructor.name}`);
};

/** The output tensor of one layer given the tensors computed so far. */
export const evaluateLayer = (layer: Layer, get: (tensor: string) => Tensor): Tensor => {
  switch (layer.kind) {
    case 'fullyConnected':
      return L.fullyConnected(layer, get(layer.input));
    case 'matrixMultiply':
      return L.matrixMultiply(layer, get(layer.a), get(layer.b));
    case 'convolution':
      return L.convolution(layer, get(layer.input));
    case 'elementwise':
      return L.elementwise(layer, get(layer.a), get(layer.b));
    case 'unary':
      return L.unary(layer, get(layer.input));
    case 'softmax':
      return L.softmax(layer, get(layer.input));
    case 'layerNorm':
      return L.layerNorm(layer, get(layer.input));
    case 'rmsNorm':
      return L.rmsNorm(layer, get(layer.input));
    case 'batchNorm':
      return L.batchNorm(layer, get(layer.input));
    case 'reduce':
      return L.reduce(layer, get(layer.input));
    case 'pooling':
      return L.pooling(layer, get(layer.input));
    case 'reshape':
      return L.reshape(layer, get(layer.input));
    case 'transpose':
      return L.transpose(layer, get(layer.input));
    case 'concatenation':
      return L.concatenation(layer, layer.inputs.map(get));
    case 'slice':
      return L.slice(layer, get(layer.input));
    case 'gather':
      return L.gather(layer, get(layer.data), get(layer.indices));
    case 'constant':
      return L.constant(layer);
  }
};

/** Every tensor of the network, by name, computed from the inputs. */
export const evaluateAll = (net: NetworkDefinition, inputs: Record<string, HostTensor>): Map<string, Tensor> => {
  const tensors = new Map<string, Tensor>();
  for (const input of net.inputs) {
    const data = inputs[input.name] ?? fail(input.name, 'input not given');
    tensors.set(input.name, inputTensor(input.name, input.dtype, input.shape, data));
  }
  for (const layer of net.layers) {
    const get = (name: string): Tensor => tensors.get(name) ?? fail(layer.name, `tensor ${name} is not defined before it`);
    tensors.set(layer.output, evaluateLayer(layer, get));
  }
  return tensors;
};

const toFloat32 = (t: Tensor): Float32Array => {
  if (t.dtype === 'float32') return t.data;
  const out = new Float32Array(t.data.length);
  for (let i = 0; i < out.length; i++) out[i] = numberAt(t, i);
  return out;
};

/** The network's outputs, keyed by NetworkOutput.name. */
export const evaluate = (net: NetworkDefinition, inputs: Record<string, HostTensor>): Record<string, Float32Array> => {
  const tensors = evaluateAll(net, inputs);
  const out: Record<string, Float32Array> = {};
  for (const o of net.outputs) {
    out[o.name] = toFloat32(tensors.get(o.tensor) ?? fail(o.name, `output tensor ${o.tensor} is not defined`));
  }
  return out;
};

/** Shapes of every tensor (for building inputs and checking engine io). */
export const outputShapes = (net: NetworkDefinition, inputs: Record<string, HostTensor>): Record<string, readonly number[]> => {
  const tensors = evaluateAll(net, inputs);
  return Object.fromEntries(net.outputs.map((o) => [o.name, tensors.get(o.tensor)?.shape ?? []]));
};
