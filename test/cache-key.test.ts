/** The cache key: invariant under renaming intermediate tensors and layers, reordering independent
 *  layers and changing weight values; changed by any change of operator, attribute, shape, dtype, weight
 *  shape, build option, backend version or device. */
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import * as E from 'fp-ts/lib/Either.js';
import { cacheKey, fallbackDag, networksKey, type FallbackStructure, type KeyInput } from '../src/cache/key.js';
import { canonicalizeDag } from '../src/cache/canonical.js';
import { parseCpuInfo } from '../src/cache/device.js';
import { modelStructure } from '../src/cache/model.js';
import { decodeOnnx } from '../src/trace/decode.js';
import { directoryResolver } from '../src/trace/load.js';
import { analyzeGraph } from '../src/trace/analyze.js';
import type { Node } from '../src/trace/ir.js';
import { anyNetwork, reweight, rng } from './support/networks.js';
import { renameInternals, reorderLayers, structureMutations } from './support/cache.js';
import { fixturesDir } from './support/safetensors.js';

const runs = (n: number) => (process.env.TRT_REFIT_FUZZ === '1' ? n * 20 : n);
const seed = fc.integer({ min: 0, max: 0x7fffffff });

const context: Omit<KeyInput, 'segments'> = {
  build: { weight_precision: 0, refittable: 1, strip_weights: 0, weight_streaming: 0, tactic_search: 0, num_threads: 0 },
  backend: { name: 'libtrtshim-ref', version: '0.1.0', abi: 1 },
  device: { kind: 'cpu', model: 'Test CPU', features: ['avx2', 'fma', 'f16c'] },
};

const digest = (nets: Parameters<typeof networksKey>[0], rest = context): string => {
  const r = networksKey(nets, rest);
  if (E.isLeft(r)) throw new Error(JSON.stringify(r.left));
  return r.right.digest;
};

describe('key invariance', () => {
  test.prop([anyNetwork(), seed, seed, seed], { numRuns: runs(150) })('renamed, reordered and reweighted networks hash alike', (c, s1, s2, s3) => {
    const base = digest([c.net]);
    expect(digest([renameInternals(c.net, s1)])).toBe(base);
    expect(digest([reorderLayers(c.net, s2)])).toBe(base);
    expect(digest([reweight(c.net, s3)])).toBe(base);
    expect(digest([reorderLayers(renameInternals(reweight(c.net, s3), s1), s2)])).toBe(base);
  });

  test.prop([anyNetwork(), seed], { numRuns: runs(60) })('the canonical layer order follows the rewrite: the k-th layers correspond', (c, s) => {
    const a = networksKey([c.net], context);
    const renamed = renameInternals(c.net, s);
    const b = networksKey([reorderLayers(renamed, s + 1)], context);
    if (E.isLeft(a) || E.isLeft(b)) throw new Error('key failed');
    // renameInternals names layer i `layer_<tag>_<n - i>`: map back and compare positions.
    const n = c.net.layers.length;
    const original = b.right.names[0].layers.map((name) => c.net.layers[n - Number(name.split('_').pop())].name);
    const kinds = (names: readonly string[]) => names.map((name) => c.net.layers.find((l) => l.name === name)!.kind);
    expect(kinds(original)).toEqual(kinds(a.right.names[0].layers));
  });
});

describe('key sensitivity', () => {
  test.prop([anyNetwork()], { numRuns: runs(80) })('every change of operator, attribute, shape, dtype or weight shape changes the key', (c) => {
    const base = digest([c.net]);
    const mutations = structureMutations(c.net);
    expect(mutations.length).toBeGreaterThan(0);
    for (const m of mutations) expect(digest([m.net]), m.what).not.toBe(base);
  });

  test.prop([anyNetwork(), fc.constantFrom(...Object.keys(context.build)), fc.integer({ min: 1, max: 3 })], { numRuns: runs(40) })('a build option changes the key', (c, option, delta) => {
    const changed = { ...context, build: { ...context.build, [option]: (context.build[option] as number) + delta } };
    expect(digest([c.net], changed)).not.toBe(digest([c.net]));
  });

  it('backend name, version and ABI, device model and features change the key', () => {
    const net = fc.sample(anyNetwork(), { numRuns: 1, seed: 7 })[0].net;
    const base = digest([net]);
    const variants: Array<Omit<KeyInput, 'segments'>> = [
      { ...context, backend: { ...context.backend, version: '0.1.1' } },
      { ...context, backend: { ...context.backend, abi: 2 } },
      { ...context, backend: { ...context.backend, name: 'libtrtshim-cuda' } },
      { ...context, device: { ...context.device, model: 'Other CPU' } },
      { ...context, device: { ...context.device, features: [...context.device.features, 'avx512f'] } },
      { ...context, device: { ...context.device, features: ['avx2', 'fma'] } },
    ];
    const digests = variants.map((v) => digest([net], v));
    expect(new Set([base, ...digests]).size).toBe(variants.length + 1);
    // Feature order is not significant.
    expect(digest([net], { ...context, device: { ...context.device, features: ['fma', 'f16c', 'avx2'] } })).toBe(base);
  });

  test.prop([fc.array(anyNetwork(), { minLength: 2, maxLength: 3 })], { numRuns: runs(20) })('segment order and count matter', (cases) => {
    const nets = cases.map((c) => c.net);
    const forward = digest(nets);
    expect(digest(nets.slice(0, -1))).not.toBe(forward);
    const reversed = [...nets].reverse();
    if (digest([nets[0]]) !== digest([nets[nets.length - 1]])) expect(digest(reversed)).not.toBe(forward);
  });
});

describe('canonical form', () => {
  it('reports undefined and duplicate tensors instead of throwing', () => {
    const undefinedRef = canonicalizeDag({ sources: [], nodes: [{ name: 'n', label: 'x', inputs: ['nowhere'], outputs: ['y'] }], sinks: ['y'] });
    expect(undefinedRef.ok ? undefined : undefinedRef.error).toEqual({ _tag: 'UndefinedTensor', node: 'n', tensor: 'nowhere' });
    const dup = canonicalizeDag({ sources: [{ name: 'x', label: 'f' }], nodes: [{ name: 'n', label: 'x', inputs: ['x'], outputs: ['x'] }], sinks: [] });
    expect(dup.ok ? undefined : dup.error).toEqual({ _tag: 'DuplicateTensor', node: 'n', tensor: 'x' });
  });

  it('symmetric branches (q and k with the same shapes) are told apart by how they are used', () => {
    const dag = (swap: boolean) => ({
      sources: [{ name: 'x', label: 'f[2,4]' }],
      nodes: [
        { name: swap ? 'k' : 'q', label: 'fc', inputs: ['x'], outputs: [swap ? 'K' : 'Q'] },
        { name: swap ? 'q' : 'k', label: 'fc', inputs: ['x'], outputs: [swap ? 'Q' : 'K'] },
        { name: 's', label: 'mm(a, b^T)', inputs: ['Q', 'K'], outputs: ['S'] },
      ],
      sinks: ['S'],
    });
    const a = canonicalizeDag(dag(false));
    const b = canonicalizeDag(dag(true));
    if (!a.ok || !b.ok) throw new Error('canonicalize failed');
    expect(a.value.pieces.join('')).toBe(b.value.pieces.join(''));
    // The k-th layers correspond: q pairs with q.
    const names = (d: ReturnType<typeof dag>, order: readonly number[]) => order.map((i) => d.nodes[i].name);
    expect(names(dag(false), a.value.order)).toEqual(names(dag(true), b.value.order));
  });
});

describe('fallback segments and whole models', () => {
  const load = (model: string) => {
    const path = join(fixturesDir, model, 'model_dynamo.onnx');
    const g = decodeOnnx(new Uint8Array(readFileSync(path)), directoryResolver(dirname(path)));
    if (E.isLeft(g)) throw new Error('decode');
    const a = analyzeGraph(g.right);
    if (E.isLeft(a)) throw new Error('analyze');
    return a.right;
  };

  /** A fallback segment with its nodes in another topological order and intermediate tensors renamed. */
  const rewriteFallback = (f: FallbackStructure, s: number): FallbackStructure => {
    const rand = rng(s);
    const internal = new Set(f.nodes.flatMap((n) => n.outputs).filter((o) => o !== '' && !f.outputs.includes(o)));
    const rename = (t: string) => (internal.has(t) ? `r${s}_${t.length}_${[...internal].indexOf(t)}` : t);
    const producer = new Map(f.nodes.flatMap((n, i) => n.outputs.map((o) => [o, i] as const)));
    const done = new Set<number>();
    const order: Node[] = [];
    while (order.length < f.nodes.length) {
      const ready = f.nodes.map((_, i) => i).filter((i) => !done.has(i) && f.nodes[i].inputs.every((t) => producer.get(t) === undefined || done.has(producer.get(t)!)));
      const pick = ready[Math.floor(rand() * ready.length)];
      done.add(pick);
      const n = f.nodes[pick];
      order.push({ ...n, name: `node${s}_${pick}`, inputs: n.inputs.map(rename), outputs: n.outputs.map(rename) });
    }
    return { ...f, nodes: order, constants: [...f.constants].reverse() };
  };

  it.each(['bert_tiny', 'gpt2_tiny'])('%s: fallback segments hash alike after reordering and renaming, and the model key is stable', (model) => {
    const analyzed = load(model);
    const { structures } = modelStructure(analyzed);
    const fallbacks = structures.filter((s): s is Extract<typeof s, { kind: 'fallback' }> => s.kind === 'fallback');
    expect(fallbacks.length).toBeGreaterThan(0);
    for (const f of fallbacks) {
      for (const s of [1, 2, 3]) {
        const a = canonicalizeDag(fallbackDag(f));
        const b = canonicalizeDag(fallbackDag(rewriteFallback(f, s)));
        if (!a.ok || !b.ok) throw new Error('canonicalize failed');
        expect(b.value.pieces.join('')).toBe(a.value.pieces.join(''));
      }
    }
    const key = (segments: typeof structures) => {
      const r = cacheKey({ ...context, segments });
      if (E.isLeft(r)) throw new Error('key failed');
      return r.right.digest;
    };
    const base = key(structures);
    expect(key(modelStructure(load(model)).structures)).toBe(base);
    // A changed attribute in a fallback node changes the model key.
    const f0 = structures.findIndex((s) => s.kind === 'fallback' && s.nodes.length > 0);
    const f = structures[f0] as FallbackStructure & { kind: 'fallback' };
    const changed = { ...f, nodes: [{ ...f.nodes[0], attributes: { ...f.nodes[0].attributes, extra: { kind: 'int' as const, value: 1 } } }, ...f.nodes.slice(1)] };
    expect(key(structures.map((s, i) => (i === f0 ? changed : s)))).not.toBe(base);
  });
});

describe('device', () => {
  it('reads the model and the kernel-relevant flags from /proc/cpuinfo text', () => {
    const text = 'processor\t: 0\nmodel name\t: Some CPU @ 2GHz\nflags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f avx512_bf16 amx_tile ht\n\nprocessor\t: 1\nmodel name\t: Some CPU @ 2GHz\nflags\t\t: fpu\n';
    expect(parseCpuInfo(text)).toEqual({ kind: 'cpu', model: 'Some CPU @ 2GHz', features: ['amx_tile', 'avx', 'avx2', 'avx512_bf16', 'avx512f', 'f16c', 'fma', 'sse4_2'] });
  });
});
