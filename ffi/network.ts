/**
 * Lowers a NetworkDefinition (src/network/types.ts) to a native trtshim_network, layer by layer. The
 * native network copies every weight it is given, so nothing here must outlive the add_* calls.
 */
import type { Layer, NetworkDefinition, Weights } from '../src/network/types.js';
import { call, DType, MAX_RANK, native, dtypeName, type DTypeName } from './library.js';

const unaryOps = ['identity', 'relu', 'gelu_erf', 'gelu_tanh', 'silu', 'sigmoid', 'tanh', 'hardswish', 'hardsigmoid', 'exp', 'sqrt', 'reciprocal', 'neg', 'erf', 'abs', 'log'] as const;
const elementwiseOps = ['add', 'sub', 'mul', 'div', 'pow', 'min', 'max'] as const;
const reduceOps = ['mean', 'sum', 'max'] as const;
const poolOps = ['average', 'max', 'global_average'] as const;

/** A network definition that cannot be lowered (a name that refers to nothing, a duplicate tensor). */
export class NetworkLoweringError extends Error {
  override readonly name = 'NetworkLoweringError';
  readonly _tag = 'NetworkLoweringError' as const;
  constructor(
    readonly layer: string,
    readonly reason: string,
  ) {
    super(`${layer}: ${reason}`);
  }
}

/** The koffi value of a trtshim_weights struct. The typed array is passed by pointer, not copied. */
export const nativeWeights = (w: Weights) => ({ dtype: DType[w.dtype], values: w.data, count: w.data.length });

const dims64 = (shape: readonly number[]) => BigInt64Array.from(shape.map((d) => BigInt(d)));

/** A native network with its tensor ids by name. Destroy it (dispose) once the engine is built. */
export class NativeNetwork implements Disposable {
  #handle: unknown;
  readonly tensors: ReadonlyMap<string, number>;

  constructor(handle: unknown, tensors: ReadonlyMap<string, number>) {
    this.#handle = handle;
    this.tensors = tensors;
  }

  get handle(): unknown {
    if (this.#handle === null) throw new Error('NativeNetwork used after dispose');
    return this.#handle;
  }

  /** dtype and shape of a tensor as the native network inferred them. */
  shapeOf(tensor: string): { dtype: DTypeName; shape: number[] } {
    const id = this.tensors.get(tensor);
    if (id === undefined) throw new NetworkLoweringError(tensor, 'no such tensor');
    return tensorShape(this.handle, id);
  }

  [Symbol.dispose](): void {
    if (this.#handle !== null) {
      native('trtshim_network_destroy')(this.#handle);
      this.#handle = null;
    }
  }
}

const tensorShape = (handle: unknown, id: number): { dtype: DTypeName; shape: number[] } => {
  const dtype = [0];
  const rank = [0];
  const dims = new BigInt64Array(MAX_RANK);
  call('trtshim_network_tensor_shape', handle, id, dtype, rank, dims);
  return { dtype: dtypeName(dtype[0]), shape: Array.from(dims.subarray(0, rank[0]), Number) };
};

/** Builds the native network for `net`. Throws NativeError (from C) or NetworkLoweringError. */
export const lowerNetwork = (net: NetworkDefinition): NativeNetwork => {
  const out: unknown[] = [null];
  call('trtshim_network_create', out);
  const network = new NativeNetwork(out[0], new Map());
  const tensors = network.tensors as Map<string, number>;
  try {
    for (const input of net.inputs) {
      const id = [0];
      call('trtshim_network_add_input', out[0], input.name, DType[input.dtype], input.shape.length, dims64(input.shape), id);
      tensors.set(input.name, id[0]);
    }
    for (const layer of net.layers) {
      if (tensors.has(layer.output)) throw new NetworkLoweringError(layer.name, `tensor ${layer.output} is defined twice`);
      tensors.set(layer.output, addLayer(out[0], layer, (name) => tensorId(tensors, layer.name, name)));
    }
    for (const output of net.outputs) {
      call('trtshim_network_mark_output', out[0], tensorId(tensors, output.name, output.tensor), output.name);
    }
  } catch (e) {
    network[Symbol.dispose]();
    throw e;
  }
  return network;
};

const tensorId = (tensors: Map<string, number>, layer: string, name: string): number => {
  const id = tensors.get(name);
  if (id === undefined) throw new NetworkLoweringError(layer, `tensor ${name} is not defined before it`);
  return id;
};

const indexOf = <T extends string>(list: readonly T[], value: T): number => list.indexOf(value);

const addLayer = (h: unknown, layer: Layer, id: (tensor: string) => number): number => {
  const out = [0];
  const n = layer.name;
  switch (layer.kind) {
    case 'fullyConnected':
      call('trtshim_network_add_fully_connected', h, n, id(layer.input), layer.outFeatures, nativeWeights(layer.kernel), layer.bias ? nativeWeights(layer.bias) : null, out);
      break;
    case 'matrixMultiply':
      call('trtshim_network_add_matrix_multiply', h, n, id(layer.a), layer.transposeA ? 1 : 0, id(layer.b), layer.transposeB ? 1 : 0, out);
      break;
    case 'convolution': {
      const p = layer.params;
      const params = {
        out_channels: p.outChannels,
        kernel_h: p.kernel[0],
        kernel_w: p.kernel[1],
        stride_h: p.stride[0],
        stride_w: p.stride[1],
        pad_top: p.padding[0],
        pad_left: p.padding[1],
        pad_bottom: p.padding[2],
        pad_right: p.padding[3],
        dilation_h: p.dilation[0],
        dilation_w: p.dilation[1],
        groups: p.groups,
      };
      call('trtshim_network_add_convolution', h, n, id(layer.input), params, nativeWeights(layer.kernel), layer.bias ? nativeWeights(layer.bias) : null, out);
      break;
    }
    case 'elementwise':
      call('trtshim_network_add_elementwise', h, n, id(layer.a), id(layer.b), indexOf(elementwiseOps, layer.op), out);
      break;
    case 'unary':
      call('trtshim_network_add_unary', h, n, id(layer.input), indexOf(unaryOps, layer.op), out);
      break;
    case 'softmax':
      call('trtshim_network_add_softmax', h, n, id(layer.input), layer.axis, out);
      break;
    case 'layerNorm':
      call('trtshim_network_add_layer_norm', h, n, id(layer.input), layer.axis, layer.epsilon, layer.scale ? nativeWeights(layer.scale) : null, layer.shift ? nativeWeights(layer.shift) : null, out);
      break;
    case 'rmsNorm':
      call('trtshim_network_add_rms_norm', h, n, id(layer.input), layer.epsilon, layer.scale ? nativeWeights(layer.scale) : null, out);
      break;
    case 'batchNorm':
      call('trtshim_network_add_batch_norm', h, n, id(layer.input), layer.epsilon, nativeWeights(layer.scale), nativeWeights(layer.shift), nativeWeights(layer.mean), nativeWeights(layer.variance), out);
      break;
    case 'reduce': {
      const input = id(layer.input);
      const rank = tensorShape(h, input).shape.length;
      let mask = 0;
      for (const axis of layer.axes) {
        const a = axis < 0 ? axis + rank : axis;
        if (a < 0 || a >= rank) throw new NetworkLoweringError(n, `reduce axis ${axis} out of range for rank ${rank}`);
        mask |= 1 << a;
      }
      call('trtshim_network_add_reduce', h, n, input, indexOf(reduceOps, layer.op), mask >>> 0, layer.keepDims ? 1 : 0, out);
      break;
    }
    case 'pooling': {
      const p = layer.params;
      const params =
        p === undefined
          ? null
          : {
              kernel_h: p.kernel[0],
              kernel_w: p.kernel[1],
              stride_h: p.stride[0],
              stride_w: p.stride[1],
              pad_top: p.padding[0],
              pad_left: p.padding[1],
              pad_bottom: p.padding[2],
              pad_right: p.padding[3],
              count_include_pad: p.countIncludePad ? 1 : 0,
            };
      call('trtshim_network_add_pooling', h, n, id(layer.input), indexOf(poolOps, layer.op), params, out);
      break;
    }
    case 'reshape':
      call('trtshim_network_add_reshape', h, n, id(layer.input), layer.shape.length, dims64(layer.shape), out);
      break;
    case 'transpose':
      call('trtshim_network_add_transpose', h, n, id(layer.input), Int32Array.from(layer.perm), out);
      break;
    case 'concatenation':
      call('trtshim_network_add_concatenation', h, n, layer.inputs.length, Int32Array.from(layer.inputs.map(id)), layer.axis, out);
      break;
    case 'slice':
      call('trtshim_network_add_slice', h, n, id(layer.input), dims64(layer.start), dims64(layer.size), dims64(layer.stride), out);
      break;
    case 'gather':
      call('trtshim_network_add_gather', h, n, id(layer.data), id(layer.indices), layer.axis, out);
      break;
    case 'constant':
      call('trtshim_network_add_constant', h, n, layer.weights.shape.length, dims64(layer.weights.shape), nativeWeights(layer.weights), out);
      break;
  }
  return out[0];
};
