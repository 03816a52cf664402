/**
 * Two of the shipped fixture models written with the network builder by hand (the programmatic way in),
 * with their PyTorch state-dict names mapped to engine weights explicitly. The demo builds engines from
 * these and refits them from the fixtures' checkpoints.
 */
import type { Layer, NetworkDefinition, Weights, WeightRole } from '../network/types.js';

export interface HostTensor {
  readonly shape: readonly number[];
  readonly data: Float32Array;
}

/** Engine weight (layer, role) <- checkpoint tensor name: the weight map of a hand-written network. */
export interface WeightBinding {
  readonly layer: string;
  readonly role: WeightRole;
  readonly source: string;
}

export interface HandModel {
  readonly name: string;
  readonly network: NetworkDefinition;
  readonly bindings: readonly WeightBinding[];
}

export class MissingTensorError extends Error {
  override readonly name = 'MissingTensorError';
  readonly _tag = 'MissingTensor' as const;
  constructor(
    readonly tensor: string,
    readonly model: string,
  ) {
    super(`checkpoint for ${model} has no tensor '${tensor}'`);
  }
}

const weightsOf = (tensors: ReadonlyMap<string, HostTensor>, model: string, source: string): Weights => {
  const t = tensors.get(source);
  if (t === undefined) throw new MissingTensorError(source, model);
  return { dtype: 'float32', shape: t.shape, data: t.data };
};

/** mlp: Linear(32, 64), GELU, LayerNorm(64), Linear(64, 64), ReLU, Linear(64, 10). Input x [batch, 32]. */
export const mlpModel = (tensors: ReadonlyMap<string, HostTensor>, batch: number): HandModel => {
  const w = (source: string) => weightsOf(tensors, 'mlp', source);
  const layers: Layer[] = [
    { kind: 'fullyConnected', name: 'fc0', input: 'x', output: 'h0', outFeatures: 64, kernel: w('0.weight'), bias: w('0.bias') },
    { kind: 'unary', name: 'gelu1', input: 'h0', output: 'h1', op: 'gelu_erf' },
    { kind: 'layerNorm', name: 'ln2', input: 'h1', output: 'h2', axis: -1, epsilon: 1e-5, scale: w('2.weight'), shift: w('2.bias') },
    { kind: 'fullyConnected', name: 'fc3', input: 'h2', output: 'h3', outFeatures: 64, kernel: w('3.weight'), bias: w('3.bias') },
    { kind: 'unary', name: 'relu4', input: 'h3', output: 'h4', op: 'relu' },
    { kind: 'fullyConnected', name: 'fc5', input: 'h4', output: 'h5', outFeatures: 10, kernel: w('5.weight'), bias: w('5.bias') },
  ];
  return {
    name: 'mlp',
    network: { inputs: [{ name: 'x', dtype: 'float32', shape: [batch, 32] }], layers, outputs: [{ tensor: 'h5', name: 'output' }] },
    bindings: [
      { layer: 'fc0', role: 'kernel', source: '0.weight' },
      { layer: 'fc0', role: 'bias', source: '0.bias' },
      { layer: 'ln2', role: 'scale', source: '2.weight' },
      { layer: 'ln2', role: 'shift', source: '2.bias' },
      { layer: 'fc3', role: 'kernel', source: '3.weight' },
      { layer: 'fc3', role: 'bias', source: '3.bias' },
      { layer: 'fc5', role: 'kernel', source: '5.weight' },
      { layer: 'fc5', role: 'bias', source: '5.bias' },
    ],
  };
};

/** cnn_bn: Conv(3, 8, 3x3, pad 1), BatchNorm, ReLU, Conv(8, 16, 3x3, pad 1, stride 2), BatchNorm, ReLU, global average
 *  pool, flatten, Linear(16, 10). Input x [batch, 3, 16, 16]. */
export const cnnModel = (tensors: ReadonlyMap<string, HostTensor>, batch: number): HandModel => {
  const w = (source: string) => weightsOf(tensors, 'cnn_bn', source);
  const conv = (name: string, input: string, output: string, outChannels: number, stride: number, prefix: string): Layer => ({
    kind: 'convolution',
    name,
    input,
    output,
    params: { outChannels, kernel: [3, 3], stride: [stride, stride], padding: [1, 1, 1, 1], dilation: [1, 1], groups: 1 },
    kernel: w(`${prefix}.weight`),
    bias: w(`${prefix}.bias`),
  });
  const bn = (name: string, input: string, output: string, prefix: string): Layer => ({
    kind: 'batchNorm',
    name,
    input,
    output,
    epsilon: 1e-5,
    scale: w(`${prefix}.weight`),
    shift: w(`${prefix}.bias`),
    mean: w(`${prefix}.running_mean`),
    variance: w(`${prefix}.running_var`),
  });
  const layers: Layer[] = [
    conv('conv0', 'x', 'c0', 8, 1, '0'),
    bn('bn1', 'c0', 'b1', '1'),
    { kind: 'unary', name: 'relu2', input: 'b1', output: 'r2', op: 'relu' },
    conv('conv3', 'r2', 'c3', 16, 2, '3'),
    bn('bn4', 'c3', 'b4', '4'),
    { kind: 'unary', name: 'relu5', input: 'b4', output: 'r5', op: 'relu' },
    { kind: 'pooling', name: 'pool6', input: 'r5', output: 'p6', op: 'global_average' },
    { kind: 'reshape', name: 'flatten7', input: 'p6', output: 'f7', shape: [batch, 16] },
    { kind: 'fullyConnected', name: 'fc8', input: 'f7', output: 'y', outFeatures: 10, kernel: w('8.weight'), bias: w('8.bias') },
  ];
  const bindings: WeightBinding[] = [];
  for (const [layer, prefix] of [['conv0', '0'], ['conv3', '3'], ['fc8', '8']] as const) {
    bindings.push({ layer, role: 'kernel', source: `${prefix}.weight` }, { layer, role: 'bias', source: `${prefix}.bias` });
  }
  for (const [layer, prefix] of [['bn1', '1'], ['bn4', '4']] as const) {
    bindings.push(
      { layer, role: 'scale', source: `${prefix}.weight` },
      { layer, role: 'shift', source: `${prefix}.bias` },
      { layer, role: 'mean', source: `${prefix}.running_mean` },
      { layer, role: 'variance', source: `${prefix}.running_var` },
    );
  }
  return {
    name: 'cnn_bn',
    network: { inputs: [{ name: 'x', dtype: 'float32', shape: [batch, 3, 16, 16] }], layers, outputs: [{ tensor: 'y', name: 'output' }] },
    bindings,
  };
};
