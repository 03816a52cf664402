/**
 * Partition: the analyzed graph's run-time nodes (folded nodes do not run) split into engine segments
 * (nodes the network API can express) and fallback segments (the rest, run by ONNX Runtime).
 *
 * Segments are runs of one topological order, chosen to keep segments long: among the nodes whose
 * inputs are ready, the partitioner keeps taking nodes of the current segment's kind and switches kind
 * only when none is ready. Every run-time node lands in exactly one segment, and a segment reads only
 * graph inputs, constants and outputs of earlier segments.
 * Options follow Torch-TensorRT: a minimum engine segment size (smaller ones fall back) and operator
 * types forced to fallback.
 */
import * as E from 'fp-ts/lib/Either.js';
import type { AnalyzedGraph } from '../trace/analyze.js';
import type { Node } from '../trace/ir.js';
import { engineSupports, lowerContext, type LowerContext } from '../network/lower.js';

export type SegmentKind = 'engine' | 'fallback';

export interface Segment {
  readonly index: number;
  readonly kind: SegmentKind;
  /** In a topological order. */
  readonly nodes: readonly Node[];
  /** Run-time tensors read from graph inputs or earlier segments. */
  readonly inputs: readonly string[];
  /** Constant tensors (initializers, folded values) the segment reads. */
  readonly constants: readonly string[];
  /** Tensors produced here that later segments or the graph outputs read. */
  readonly outputs: readonly string[];
}

export interface PartitionOptions {
  /** Engine segments with fewer nodes run as fallback instead (default 1). */
  readonly minSegmentSize?: number;
  /** Operator types always run as fallback ('*' forces every operator). */
  readonly forcedFallback?: readonly string[];
}

export interface Partition {
  readonly analyzed: AnalyzedGraph;
  readonly segments: readonly Segment[];
  /** Names of nodes folded at build time (in no segment). */
  readonly folded: readonly string[];
  /** Why each fallback node is not in an engine segment. */
  readonly fallbackReasons: ReadonlyMap<string, string>;
}

export type PartitionErrorDetail = { readonly _tag: 'InvalidOption'; readonly option: string; readonly reason: string };

export class PartitionError extends Error {
  override readonly name = 'PartitionError';
  readonly _tag: PartitionErrorDetail['_tag'];
  constructor(readonly detail: PartitionErrorDetail) {
    super(`partition option ${detail.option}: ${detail.reason}`);
    this._tag = detail._tag;
  }
}

/** Groups nodes into kind-homogeneous runs of a topological order (see the module comment). */
const cluster = (nodes: readonly Node[], kindOf: (n: Node) => SegmentKind, producerIndex: ReadonlyMap<string, number>): { kind: SegmentKind; nodes: Node[] }[] => {
  const successors: number[][] = nodes.map(() => []);
  const waiting = new Int32Array(nodes.length);
  nodes.forEach((node, i) => {
    const deps = new Set<number>();
    for (const input of node.inputs) {
      const p = producerIndex.get(input);
      if (p !== undefined && p !== i) deps.add(p);
    }
    waiting[i] = deps.size;
    for (const d of deps) successors[d].push(i);
  });
  // Ready queues per kind, each in the order nodes became ready (array + head index: O(1) pops).
  const ready: Record<SegmentKind, { items: number[]; head: number }> = { engine: { items: [], head: 0 }, fallback: { items: [], head: 0 } };
  nodes.forEach((n, i) => {
    if (waiting[i] === 0) ready[kindOf(n)].items.push(i);
  });
  const runs: { kind: SegmentKind; nodes: Node[] }[] = [];
  const firstReady = (): SegmentKind | undefined => {
    const e = ready.engine.head < ready.engine.items.length ? ready.engine.items[ready.engine.head] : Infinity;
    const f = ready.fallback.head < ready.fallback.items.length ? ready.fallback.items[ready.fallback.head] : Infinity;
    if (e === Infinity && f === Infinity) return undefined;
    return e <= f ? 'engine' : 'fallback';
  };
  let current = firstReady();
  while (current !== undefined) {
    const queue = ready[current];
    const run: Node[] = [];
    while (queue.head < queue.items.length) {
      const i = queue.items[queue.head++];
      run.push(nodes[i]);
      for (const s of successors[i]) if (--waiting[s] === 0) ready[kindOf(nodes[s])].items.push(s);
    }
    runs.push({ kind: current, nodes: run });
    const other: SegmentKind = current === 'engine' ? 'fallback' : 'engine';
    current = ready[other].head < ready[other].items.length ? other : undefined;
  }
  return runs;
};

const describe = (analyzed: AnalyzedGraph, runs: { kind: SegmentKind; nodes: Node[] }[]): Segment[] => {
  const segmentOf = new Map<string, number>();
  runs.forEach((r, s) => r.nodes.forEach((n) => n.outputs.forEach((o) => o !== '' && segmentOf.set(o, s))));
  const readers = new Map<string, Set<number>>();
  runs.forEach((r, s) => r.nodes.forEach((n) => n.inputs.forEach((i) => {
    if (i === '') return;
    let set = readers.get(i);
    if (!set) readers.set(i, (set = new Set()));
    set.add(s);
  })));
  const graphOutputs = new Set(analyzed.graph.outputs);
  return runs.map((r, s) => {
    const inputs: string[] = [];
    const constants: string[] = [];
    const seen = new Set<string>();
    for (const n of r.nodes) {
      for (const i of n.inputs) {
        if (i === '' || seen.has(i)) continue;
        seen.add(i);
        if (analyzed.constants.has(i)) constants.push(i);
        else if (segmentOf.get(i) !== s) inputs.push(i);
      }
    }
    const outputs = r.nodes.flatMap((n) => n.outputs).filter((o) => o !== '' && !analyzed.constants.has(o)
      && (graphOutputs.has(o) || [...(readers.get(o) ?? [])].some((reader) => reader !== s)));
    return { index: s, kind: r.kind, nodes: r.nodes, inputs, constants, outputs };
  });
};

export const partitionGraph = (analyzed: AnalyzedGraph, options: PartitionOptions = {}, context?: LowerContext): E.Either<PartitionErrorDetail, Partition> => {
  const minSize = options.minSegmentSize ?? 1;
  if (!Number.isInteger(minSize) || minSize < 1) return E.left({ _tag: 'InvalidOption', option: 'minSegmentSize', reason: `expected an integer of at least 1; found ${minSize}` });
  const forced = new Set(options.forcedFallback ?? []);
  const ctx = context ?? lowerContext(analyzed);
  const runtimeNodes = analyzed.graph.nodes.filter((n) => !analyzed.folded.has(n.name));
  const reasons = new Map<string, string>();
  for (const n of runtimeNodes) {
    if (forced.has('*') || forced.has(n.opType)) {
      reasons.set(n.name, 'operator forced to fallback');
      continue;
    }
    const supported = engineSupports(ctx, n);
    if (E.isLeft(supported)) reasons.set(n.name, supported.left);
  }
  const producerIndex = new Map<string, number>();
  runtimeNodes.forEach((n, i) => n.outputs.forEach((o) => o !== '' && producerIndex.set(o, i)));
  // Demoting a short engine run can merge its neighbours, so repeat until every engine run is long enough.
  for (;;) {
    const runs = cluster(runtimeNodes, (n) => (reasons.has(n.name) ? 'fallback' : 'engine'), producerIndex);
    const short = runs.filter((r) => r.kind === 'engine' && r.nodes.length < minSize);
    if (short.length === 0) {
      return E.right({ analyzed, segments: describe(analyzed, runs), folded: analyzed.graph.nodes.filter((n) => analyzed.folded.has(n.name)).map((n) => n.name), fallbackReasons: reasons });
    }
    for (const r of short) for (const n of r.nodes) reasons.set(n.name, `engine segment of ${r.nodes.length} nodes is below the minimum size ${minSize}`);
  }
};

export const partition = (analyzed: AnalyzedGraph, options: PartitionOptions = {}): Partition => {
  const r = partitionGraph(analyzed, options);
  if (E.isLeft(r)) throw new PartitionError(r.left);
  return r.right;
};
