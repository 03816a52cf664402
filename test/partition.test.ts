import { describe, expect, it } from 'vitest';
import { test, fc } from '@fast-check/vitest';
import * as E from 'fp-ts/lib/Either.js';
import { analyzeGraph, type AnalyzedGraph } from '../src/trace/analyze.js';
import { partitionGraph, type Partition } from '../src/partition/index.js';
import { compileModel } from '../src/partition/compiled.js';
import { randomModel } from './support/h5-graphs.js';
import type { Graph } from '../src/trace/ir.js';

const analyze = (g: Graph): AnalyzedGraph => {
  const r = analyzeGraph(g);
  if (E.isLeft(r)) throw new Error(JSON.stringify(r.left));
  return r.right;
};

/** Checks the invariants every partition must hold, independently of how it was computed. */
const checkPartition = (a: AnalyzedGraph, p: Partition, minSize: number, forced: readonly string[]) => {
  // Every node is in exactly one segment, or folded.
  const seen = new Map<string, number>();
  for (const s of p.segments) for (const n of s.nodes) seen.set(n.name, (seen.get(n.name) ?? 0) + 1);
  for (const name of p.folded) seen.set(name, (seen.get(name) ?? 0) + 1);
  expect(seen.size).toBe(a.graph.nodes.length);
  for (const n of a.graph.nodes) expect(seen.get(n.name)).toBe(1);
  // Dependencies: a node reads graph inputs, constants, its own segment's earlier nodes, or earlier segments.
  const available = new Set<string>([...a.graph.inputs.map((i) => i.name), ...a.constants.keys()]);
  for (const s of p.segments) {
    for (const i of s.inputs) expect(available.has(i)).toBe(true);
    const local = new Set<string>();
    for (const n of s.nodes) {
      for (const i of n.inputs) if (i !== '') expect(available.has(i) || local.has(i)).toBe(true);
      for (const o of n.outputs) local.add(o);
    }
    for (const o of local) available.add(o);
    if (s.kind === 'engine') {
      expect(s.nodes.length).toBeGreaterThanOrEqual(minSize);
      // Engines hand only float32 tensors to other segments.
      for (const o of s.outputs) expect(a.types.get(o)?.dtype).toBe('float32');
      for (const n of s.nodes) expect(forced.includes(n.opType)).toBe(false);
    }
  }
  // Adjacent segments differ in kind (runs are maximal).
  for (let i = 1; i < p.segments.length; i++) expect(p.segments[i].kind).not.toBe(p.segments[i - 1].kind);
  for (const o of a.graph.outputs) expect(available.has(o)).toBe(true);
};

describe('partition', () => {
  test.prop([randomModel, fc.integer({ min: 1, max: 4 }), fc.subarray(['Add', 'Mul', 'Relu', 'MatMul', 'Softmax', 'Tanh'])], { numRuns: 150 })(
    'covers every node exactly once and respects dependencies',
    ({ graph }, minSegmentSize, forcedFallback) => {
      const a = analyze(graph);
      const p = partitionGraph(a, { minSegmentSize, forcedFallback });
      expect(E.isRight(p)).toBe(true);
      if (E.isRight(p)) checkPartition(a, p.right, minSegmentSize, forcedFallback);
    },
  );

  it('refuses a minimum segment size below 1', () => {
    const { graph } = fc.sample(randomModel, { numRuns: 1, seed: 1 })[0];
    const r = partitionGraph(analyze(graph), { minSegmentSize: 0 });
    expect(E.isLeft(r) && r.left._tag).toBe('InvalidOption');
  });

  test.prop([randomModel], { numRuns: 15 })('outputs agree with every operator forced to fallback and with none forced', async ({ graph, inputs }) => {
    const a = analyze(graph);
    using engine = await compileModel(a);
    using fallback = await compileModel(a, { forcedFallback: ['*'] });
    expect(fallback.segments().every((s) => s.kind === 'fallback')).toBe(true);
    const x = await engine.run(inputs);
    const y = await fallback.run(inputs);
    for (const name of graph.outputs) {
      const p = x[name].data as Float32Array;
      const q = y[name].data as Float32Array;
      expect(p.length).toBe(q.length);
      for (let i = 0; i < p.length; i++) {
        if (Number.isNaN(q[i])) expect(Number.isNaN(p[i])).toBe(true);
        else expect(Math.abs(p[i] - q[i])).toBeLessThanOrEqual(1e-5 + 1e-4 * Math.abs(q[i]));
      }
    }
  });
});
