/**
 * The network stage's output: a network definition as plain, immutable data. It mirrors libtrtshim's
 * network API layer for layer (see libtrtshim/include/trtshim.h for the exact semantics of each layer),
 * so the same value can be lowered to a native network (ffi/) or evaluated by the TypeScript reference
 * evaluator (src/reference/).
 *
 * Tensors are referred to by name; every layer names its single output tensor. Weights are addressed by
 * the owning layer's name plus a role, as TensorRT addresses them.
 */

export type WeightDType = 'float32' | 'float16' | 'bfloat16';
export type TensorDType = 'float32' | 'int32' | 'int64';
export type WeightRole = 'kernel' | 'bias' | 'scale' | 'shift' | 'constant' | 'mean' | 'variance';

/** Weight values. float16 and bfloat16 values are raw 16-bit patterns in a Uint16Array. */
export interface Weights {
  readonly dtype: WeightDType | 'int32' | 'int64';
  readonly shape: readonly number[];
  readonly data: Float32Array | Uint16Array | Int32Array | BigInt64Array;
}

export type ElementwiseOp = 'add' | 'sub' | 'mul' | 'div' | 'pow' | 'min' | 'max';
export type UnaryOp =
  | 'identity'
  | 'relu'
  | 'gelu_erf'
  | 'gelu_tanh'
  | 'silu'
  | 'sigmoid'
  | 'tanh'
  | 'hardswish'
  | 'hardsigmoid'
  | 'exp'
  | 'sqrt'
  | 'reciprocal'
  | 'neg'
  | 'erf'
  | 'abs'
  | 'log';
export type ReduceOp = 'mean' | 'sum' | 'max';
export type PoolOp = 'average' | 'max' | 'global_average';

export interface ConvParams {
  readonly outChannels: number;
  readonly kernel: readonly [number, number];
  readonly stride: readonly [number, number];
  /** top, left, bottom, right */
  readonly padding: readonly [number, number, number, number];
  readonly dilation: readonly [number, number];
  readonly groups: number;
}

export interface PoolParams {
  readonly kernel: readonly [number, number];
  readonly stride: readonly [number, number];
  /** top, left, bottom, right */
  readonly padding: readonly [number, number, number, number];
  readonly countIncludePad: boolean;
}

interface LayerBase {
  /** Unique within the network; weights are addressed by it. */
  readonly name: string;
  /** Name of the output tensor. */
  readonly output: string;
}

export type Layer =
  | (LayerBase & { readonly kind: 'fullyConnected'; readonly input: string; readonly outFeatures: number; readonly kernel: Weights; readonly bias?: Weights })
  | (LayerBase & { readonly kind: 'matrixMultiply'; readonly a: string; readonly transposeA: boolean; readonly b: string; readonly transposeB: boolean })
  | (LayerBase & { readonly kind: 'convolution'; readonly input: string; readonly params: ConvParams; readonly kernel: Weights; readonly bias?: Weights })
  | (LayerBase & { readonly kind: 'elementwise'; readonly a: string; readonly b: string; readonly op: ElementwiseOp })
  | (LayerBase & { readonly kind: 'unary'; readonly input: string; readonly op: UnaryOp })
  | (LayerBase & { readonly kind: 'softmax'; readonly input: string; readonly axis: number })
  | (LayerBase & { readonly kind: 'layerNorm'; readonly input: string; readonly axis: number; readonly epsilon: number; readonly scale?: Weights; readonly shift?: Weights })
  | (LayerBase & { readonly kind: 'rmsNorm'; readonly input: string; readonly epsilon: number; readonly scale?: Weights })
  | (LayerBase & { readonly kind: 'batchNorm'; readonly input: string; readonly epsilon: number; readonly scale: Weights; readonly shift: Weights; readonly mean: Weights; readonly variance: Weights })
  | (LayerBase & { readonly kind: 'reduce'; readonly input: string; readonly op: ReduceOp; readonly axes: readonly number[]; readonly keepDims: boolean })
  | (LayerBase & { readonly kind: 'pooling'; readonly input: string; readonly op: PoolOp; readonly params?: PoolParams })
  | (LayerBase & { readonly kind: 'reshape'; readonly input: string; readonly shape: readonly number[] })
  | (LayerBase & { readonly kind: 'transpose'; readonly input: string; readonly perm: readonly number[] })
  | (LayerBase & { readonly kind: 'concatenation'; readonly inputs: readonly string[]; readonly axis: number })
  | (LayerBase & { readonly kind: 'slice'; readonly input: string; readonly start: readonly number[]; readonly size: readonly number[]; readonly stride: readonly number[] })
  | (LayerBase & { readonly kind: 'gather'; readonly data: string; readonly indices: string; readonly axis: number })
  | (LayerBase & { readonly kind: 'constant'; readonly weights: Weights });

export type LayerKind = Layer['kind'];

export interface NetworkInput {
  readonly name: string;
  readonly dtype: TensorDType;
  readonly shape: readonly number[];
}

export interface NetworkOutput {
  /** The tensor to expose. */
  readonly tensor: string;
  /** The name the output has in the engine (may equal the tensor's). */
  readonly name: string;
}

export interface NetworkDefinition {
  readonly inputs: readonly NetworkInput[];
  /** In topological order. */
  readonly layers: readonly Layer[];
  readonly outputs: readonly NetworkOutput[];
}

/** A weight's address: owning layer plus role. */
export interface WeightKey {
  readonly layer: string;
  readonly role: WeightRole;
}

/** Every weight a network holds, in layer order, with its address. */
export const networkWeights = (net: NetworkDefinition): ReadonlyArray<WeightKey & { readonly weights: Weights }> => {
  const out: Array<WeightKey & { weights: Weights }> = [];
  const push = (layer: string, role: WeightRole, weights: Weights | undefined) => {
    if (weights !== undefined) out.push({ layer, role, weights });
  };
  for (const layer of net.layers) {
    switch (layer.kind) {
      case 'fullyConnected':
      case 'convolution':
        push(layer.name, 'kernel', layer.kernel);
        push(layer.name, 'bias', layer.bias);
        break;
      case 'layerNorm':
        push(layer.name, 'scale', layer.scale);
        push(layer.name, 'shift', layer.shift);
        break;
      case 'rmsNorm':
        push(layer.name, 'scale', layer.scale);
        break;
      case 'batchNorm':
        push(layer.name, 'scale', layer.scale);
        push(layer.name, 'shift', layer.shift);
        push(layer.name, 'mean', layer.mean);
        push(layer.name, 'variance', layer.variance);
        break;
      case 'constant':
        push(layer.name, 'constant', layer.weights);
        break;
      default:
        break;
    }
  }
  return out;
};
