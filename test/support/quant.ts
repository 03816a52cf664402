/** Quantized checkpoints for tests: a network's weights written as compressed-tensors / vLLM name them. */
import type { TensorToWrite } from '../../src/safetensors/writer.js';
import type { Dtype } from '../../src/safetensors/dtypes.js';
import type { NetworkDefinition } from '../../src/network/types.js';
import { packInt4, quantize, type QuantFormat } from '../../src/quant/reference.js';
import { floatValues } from './networks.js';

const bytesOf = (a: ArrayBufferView) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

export interface CheckpointOptions {
  /** Quantized format of fully connected kernels (convolution kernels too unless `quantizeConv` is false). */
  readonly format: QuantFormat;
  readonly quantizeConv?: boolean;
  /** Scale shape: per channel [N] (default), [N, 1], or int4 [N, groups]. */
  readonly scaleShape?: 'n' | 'n1';
  /** Add a weight_zero_point tensor (int8 values) of this value. */
  readonly zeroPoint?: number;
}

/** `<layer>.weight` (+ `_scale`), `<layer>.bias` for fully connected and convolution layers; float32 elsewhere. */
export const quantizedCheckpoint = (net: NetworkDefinition, o: CheckpointOptions): TensorToWrite[] => {
  const out: TensorToWrite[] = [];
  const put = (name: string, dtype: Dtype, shape: readonly number[], data: ArrayBufferView) => out.push({ name, dtype, shape, data: bytesOf(data) });
  for (const l of net.layers) {
    if (l.kind === 'batchNorm') {
      for (const [param, w] of [['weight', l.scale], ['bias', l.shift], ['running_mean', l.mean], ['running_var', l.variance]] as const)
        put(`${l.name}.${param}`, 'F32', w.shape, floatValues(w));
      continue;
    }
    if (l.kind !== 'fullyConnected' && l.kind !== 'convolution') continue;
    const shape = l.kernel.shape;
    const w = floatValues(l.kernel);
    if (l.kind === 'convolution' && o.quantizeConv === false) put(`${l.name}.weight`, 'F32', shape, w);
    else {
      const g = { channels: shape[0], depth: shape.slice(1).reduce((a, b) => a * b, 1), transposed: true };
      const q = quantize(o.format, w, g);
      if (o.format.kind === 'int4') put(`${l.name}.weight`, 'U8', [g.channels, Math.ceil(g.depth / 2)], packInt4(q.values as Int8Array, g));
      else put(`${l.name}.weight`, o.format.kind === 'int8' ? 'I8' : 'F8_E4M3', shape, q.values);
      const groups = q.scales.length / g.channels;
      const scaleShape = o.format.kind === 'int4' ? [g.channels, groups] : o.scaleShape === 'n1' ? [g.channels, 1] : [g.channels];
      put(`${l.name}.weight_scale`, 'F32', scaleShape, q.scales);
      if (o.zeroPoint !== undefined) put(`${l.name}.weight_zero_point`, 'I8', scaleShape, new Int8Array(q.scales.length).fill(o.zeroPoint));
    }
    if (l.bias !== undefined) put(`${l.name}.bias`, 'F32', l.bias.shape, floatValues(l.bias));
  }
  return out;
};
