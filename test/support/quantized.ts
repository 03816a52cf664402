/** Quantized checkpoints for the refit tests: weights_v2 quantized with src/quant's quantizer, written
 *  under compressed-tensors names. */
import type { RefitModel } from '../../src/model/index.js';
import { openCheckpoint, type Checkpoint } from '../../src/checkpoint/checkpoint.js';
import { writeSafetensors } from '../../src/safetensors/index.js';
import { packInt4, quantize, type QuantFormat } from '../../src/quant/reference.js';
import { fixture } from '../e2e-support.js';

const bytesOf = (a: ArrayBufferView) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

/** `checkpoint` with every tensor in `kernels` quantized ([out, in], per output channel), the rest F32. */
export const writeQuantized = async (path: string, checkpoint: Checkpoint, kernels: ReadonlySet<string>, format: QuantFormat): Promise<void> => {
  const out = [];
  for (const [name, info] of checkpoint.tensors) {
    const data = checkpoint.toFloat32(name);
    if (!kernels.has(name)) {
      out.push({ name, dtype: 'F32' as const, shape: [...info.shape], data: bytesOf(data) });
      continue;
    }
    const g = { channels: info.shape[0], depth: info.shape.slice(1).reduce((a, b) => a * b, 1), transposed: true };
    const q = quantize(format, data, g);
    if (format.kind === 'int4') out.push({ name, dtype: 'U8' as const, shape: [g.channels, Math.ceil(g.depth / 2)], data: packInt4(q.values as Int8Array, g) });
    else out.push({ name, dtype: format.kind === 'int8' ? ('I8' as const) : ('F8_E4M3' as const), shape: [...info.shape], data: bytesOf(q.values) });
    const groups = q.scales.length / g.channels;
    out.push({ name: `${name}_scale`, dtype: 'F32' as const, shape: format.kind === 'int4' ? [g.channels, groups] : [g.channels], data: bytesOf(q.scales) });
  }
  await writeSafetensors(path, out);
};

/** Sources the model's kernel targets read directly (what a compressed-tensors export quantizes). */
export const kernelSources = (model: RefitModel): Set<string> =>
  new Set(model.weightMap.targets.flatMap((t) => (t.status === 'mapped' && t.role === 'kernel' && t.expr.op === 'source' ? [t.expr.name] : [])));

export const quantizedV2 = async (model: string, path: string, kernels: ReadonlySet<string>, format: QuantFormat): Promise<void> => {
  using v2 = await openCheckpoint(fixture(model, 'weights_v2.safetensors'));
  await writeQuantized(path, v2, kernels, format);
};

