/** Helpers for the cache tests: structure-preserving rewrites of networks (rename intermediate tensors
 *  and layers, reorder independent layers), structure mutations, and temporary cache directories. */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Layer, NetworkDefinition, Weights } from '../../src/network/types.js';
import { rng } from './networks.js';

export const temporaryCache = (): { path: string } & Disposable => {
  const path = mkdtempSync(join(tmpdir(), 'trt-refit-cache-'));
  return { path, [Symbol.dispose]: () => rmSync(path, { recursive: true, force: true }) };
};

const operandKeys = ['input', 'a', 'b', 'data', 'indices'] as const;

/** Operand tensor names of a layer. */
export const operands = (l: Layer): string[] => {
  const out: string[] = [];
  for (const k of operandKeys) if (k in l) out.push((l as unknown as Record<string, string>)[k]);
  if (l.kind === 'concatenation') out.push(...l.inputs);
  return out;
};

const renameOperands = (l: Layer, f: (t: string) => string): Layer => {
  const copy: Record<string, unknown> = { ...l };
  for (const k of operandKeys) if (k in l) copy[k] = f((l as unknown as Record<string, string>)[k]);
  if (l.kind === 'concatenation') copy.inputs = l.inputs.map(f);
  return copy as unknown as Layer;
};

/** Every layer and every layer output renamed (inputs and output names kept). */
export const renameInternals = (net: NetworkDefinition, seed: number): NetworkDefinition => {
  const rand = rng(seed);
  const fresh = new Map<string, string>();
  const tag = Math.floor(rand() * 1e9).toString(36);
  net.layers.forEach((l, i) => fresh.set(l.output, `t_${tag}_${(i * 7919 + 13) % 100003}`));
  const f = (t: string) => fresh.get(t) ?? t;
  return {
    inputs: net.inputs,
    layers: net.layers.map((l, i) => ({ ...renameOperands(l, f), name: `layer_${tag}_${net.layers.length - i}`, output: f(l.output) }) as Layer),
    outputs: net.outputs.map((o) => ({ ...o, tensor: f(o.tensor) })),
  };
};

/** The same layers in another topological order, chosen at random among the ready ones. */
export const reorderLayers = (net: NetworkDefinition, seed: number): NetworkDefinition => {
  const rand = rng(seed);
  const producer = new Map(net.layers.map((l, i) => [l.output, i]));
  const deps = net.layers.map((l) => new Set(operands(l).map((t) => producer.get(t)).filter((p): p is number => p !== undefined)));
  const done = new Set<number>();
  const order: number[] = [];
  while (order.length < net.layers.length) {
    const ready = net.layers.map((_, i) => i).filter((i) => !done.has(i) && [...deps[i]].every((d) => done.has(d)));
    const pick = ready[Math.floor(rand() * ready.length)];
    done.add(pick);
    order.push(pick);
  }
  return { ...net, layers: order.map((i) => net.layers[i]) };
};

const isWeights = (v: unknown): v is Weights => typeof v === 'object' && v !== null && 'data' in v && ArrayBuffer.isView((v as Weights).data);

const otherOps: Record<string, readonly string[]> = {
  unary: ['relu', 'gelu_erf', 'gelu_tanh', 'silu', 'sigmoid', 'tanh', 'identity', 'neg', 'abs'],
  elementwise: ['add', 'sub', 'mul', 'div', 'max', 'min'],
  reduce: ['mean', 'sum', 'max'],
  pooling: ['average', 'max'],
};

export type Mutation = { readonly what: string; readonly net: NetworkDefinition };

/** Every single-field change of structure the network allows: an operator, an attribute, a weight
 *  shape or dtype, an input shape or dtype. Each yields a network that differs in structure. */
export const structureMutations = (net: NetworkDefinition): Mutation[] => {
  const out: Mutation[] = [];
  const withLayer = (i: number, layer: Layer): NetworkDefinition => ({ ...net, layers: net.layers.map((l, j) => (j === i ? layer : l)) });
  net.layers.forEach((layer, i) => {
    for (const [k, v] of Object.entries(layer)) {
      if (k === 'name' || k === 'output' || k === 'kind' || (operandKeys as readonly string[]).includes(k) || (k === 'inputs' && layer.kind === 'concatenation')) continue;
      const set = (value: unknown, what: string) => out.push({ what: `${layer.kind}.${k}: ${what}`, net: withLayer(i, { ...layer, [k]: value } as Layer) });
      if (isWeights(v)) {
        set({ ...v, shape: [...v.shape, 1] }, 'weight shape');
        if (v.dtype === 'float32') set({ ...v, dtype: 'float16', data: new Uint16Array(v.data.length) }, 'weight dtype');
      } else if (typeof v === 'number') set(Number.isInteger(v) ? v + 1 : v * 2 + 1e-3, 'attribute');
      else if (typeof v === 'boolean') set(!v, 'attribute');
      else if (typeof v === 'string') {
        const alternative = (otherOps[layer.kind] ?? []).find((o) => o !== v) ?? `${v}_other`;
        set(alternative, 'operator');
      } else if (Array.isArray(v) && v.length > 0 && typeof v[0] === 'number') set([...v.slice(0, -1), (v[v.length - 1] as number) + 1], 'attribute');
      else if (typeof v === 'object' && v !== null && !Array.isArray(v)) {
        const [pk, pv] = Object.entries(v)[0] ?? [];
        if (pk !== undefined && typeof pv === 'number') set({ ...v, [pk]: pv + 1 }, 'attribute');
        else if (pk !== undefined && Array.isArray(pv)) set({ ...v, [pk]: [...pv.slice(0, -1), (pv[pv.length - 1] as number) + 1] }, 'attribute');
      }
    }
  });
  net.inputs.forEach((input, i) => {
    const inputs = (value: NetworkDefinition['inputs'][number]) => net.inputs.map((x, j) => (j === i ? value : x));
    out.push({ what: 'input shape', net: { ...net, inputs: inputs({ ...input, shape: [...input.shape.slice(0, -1), input.shape[input.shape.length - 1] + 1] }) } });
    out.push({ what: 'input dtype', net: { ...net, inputs: inputs({ ...input, dtype: input.dtype === 'float32' ? 'int32' : 'float32' }) } });
  });
  return out;
};
