/**
 * Compiling a network written with the network API (src/network/types.ts) instead of traced from ONNX:
 * one engine segment, whose weights map one to one onto checkpoint tensors named by `sourceOf`. The
 * result is the same RefitModel an ONNX compile gives (it saves as .trtr, plans and refits alike).
 */
import * as E from 'fp-ts/lib/Either.js';
import { buildEngine } from '../../ffi/engine.js';
import { networkWeights, type NetworkDefinition, type WeightRole } from '../network/types.js';
import type { DType } from '../trace/ir.js';
import { digestCache, valueDigest } from '../weightmap/digest.js';
import type { MapTarget, WeightMap } from '../weightmap/map.js';
import { readF32, type TensorStore } from '../weightmap/store.js';
import { fromFloat32 } from '../safetensors/convert.js';
import { RefitModel } from '../model/model.js';
import { buildInfoOf, engineBuildOptions, weightSettingsOf, type CompileErrorDetail, type CompileOptions } from './compile.js';

/** PyTorch-style names: `<layer>.weight` for kernels and scales, `<layer>.bias` for biases and shifts. */
export const torchNaming = (layer: string, role: WeightRole): string | undefined =>
  role === 'kernel' || role === 'scale' ? `${layer}.weight` : role === 'bias' || role === 'shift' ? `${layer}.bias` : role === 'mean' ? `${layer}.running_mean` : role === 'variance' ? `${layer}.running_var` : undefined;

export const compileNetwork = (
  network: NetworkDefinition,
  checkpoint: TensorStore,
  options: CompileOptions & { readonly sourceOf?: (layer: string, role: WeightRole) => string | undefined } = {},
): E.Either<CompileErrorDetail, RefitModel> => {
  const settings = weightSettingsOf(options);
  if (E.isLeft(settings)) return settings;
  const sourceOf = options.sourceOf ?? torchNaming;
  const digestOf = digestCache(checkpoint);
  const targets: MapTarget[] = [];
  const unmapped: { id: string; reason: string }[] = [];
  for (const w of networkWeights(network)) {
    const id = `engine/0/${w.layer}/${w.role}`;
    const name = sourceOf(w.layer, w.role);
    const info = name === undefined ? undefined : checkpoint.tensors.get(name);
    const base = { id, kind: 'engine' as const, segment: 0, layer: w.layer, role: w.role, dtype: w.weights.dtype, shape: [...w.weights.shape] };
    if (name === undefined || info === undefined || info.shape.join() !== w.weights.shape.join()) {
      const reason = name === undefined ? 'no source name' : info === undefined ? `checkpoint has no '${name}'` : `'${name}' is [${info.shape}], the weight [${w.weights.shape}]`;
      unmapped.push({ id, reason });
      targets.push({ ...base, status: 'unmapped', expr: { op: 'constant', reason }, methods: [], built: { sourceDigest: '', valueDigest: valueDigest(w.weights.data) } });
      continue;
    }
    targets.push({ ...base, status: 'mapped', expr: { op: 'source', name }, methods: ['name'], built: { sourceDigest: digestOf(name), valueDigest: valueDigest(w.weights.data) } });
  }
  if (unmapped.length > 0 && !options.allowUnmapped) return E.left({ _tag: 'UnmappedWeights', weights: unmapped });
  const used = new Set(targets.flatMap((t) => (t.expr.op === 'source' ? [t.expr.name] : [])));
  const weightMap: WeightMap = {
    version: 1,
    sources: [...used].sort().map((name) => ({ name, dtype: checkpoint.tensors.get(name)!.dtype, shape: [...checkpoint.tensors.get(name)!.shape] })),
    targets,
    unused: [...checkpoint.tensors.keys()].filter((n) => !used.has(n)).sort(),
    ties: [],
    tied: [],
  };
  const buildOptions = engineBuildOptions(options);
  let engine;
  try {
    engine = buildEngine(network, buildOptions);
  } catch (e) {
    return E.left({ _tag: 'BuildFailed', segment: 0, detail: (e as Error).message });
  }
  const context = engine.createContext();
  const io = engine.io();
  const desc = (d: { name: string; dtype: string; shape: number[] }) => ({ name: d.name, dtype: d.dtype as DType, shape: d.shape });
  const inputs = io.filter((d) => d.isInput).map(desc);
  const outputs = io.filter((d) => !d.isInput).map(desc);
  // The engine holds the network's values: a weight records its checkpoint tensor as held only when the
  // two agree bit for bit in the weight's dtype; otherwise it holds nothing known, and the next refit sets it.
  const values = new Map(networkWeights(network).map((w) => [`engine/0/${w.layer}/${w.role}`, w.weights]));
  const holdsCheckpoint = (t: MapTarget): boolean => {
    const w = values.get(t.id);
    const f32 = t.expr.op === 'source' ? readF32(checkpoint, t.expr.name) : undefined;
    if (w === undefined || f32 === undefined) return false;
    const inDtype = w.dtype === 'float32' ? f32.data : w.dtype === 'float16' || w.dtype === 'bfloat16' ? fromFloat32(f32.data, w.dtype === 'float16' ? 'F16' : 'BF16') : undefined;
    return inDtype !== undefined && Buffer.from(inDtype.buffer, inDtype.byteOffset, inDtype.byteLength).equals(Buffer.from(w.data.buffer, w.data.byteOffset, w.data.byteLength));
  };
  const current = Object.fromEntries(targets.filter((t) => t.status === 'mapped').map((t) => [t.id, holdsCheckpoint(t) ? t.built.sourceDigest : '']));
  return E.right(new RefitModel(
    {
      inputs, outputs: outputs.map((o) => o.name), tensors: [...inputs, ...outputs],
      partition: { segments: [{ index: 0, kind: 'engine', nodes: network.layers.length, opTypes: [...new Set(network.layers.map((l) => l.kind))] }], folded: 0, fallbackReasons: [] },
      build: buildInfoOf(options, 'network'),
      weightMap,
    },
    current,
    [{ kind: 'engine', record: { kind: 'engine', index: 0, inputs: inputs.map((i) => i.name), outputs: outputs.map((o) => o.name), layers: network.layers.length, weights: targets.length }, engine, context, origin: undefined }],
  ));
};
