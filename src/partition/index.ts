/**
 * Partition: the analyzed graph's run-time nodes (folded nodes do not run) split into engine segments
 * (nodes the network API can express) and fallback segments (the rest, run by ONNX Runtime).
 *
 * Segments are runs of one topological order, chosen to keep segments long: among the nodes whose
 * inputs are ready, the partitioner keeps taking nodes of the current segment's kind and switches kind
 * only when none is ready (the first run's kind is tried both ways; the fewer segments win). Every
 * run-time node lands in exactly one segment, and a segment reads only graph inputs, constants and
 * outputs of earlier segments. Engine segments hand only float32 tensors to other segments: a node whose
 * non-float output would leave its engine segment is moved to fallback.
 * Linear in the graph: dependencies are computed once into flat arrays, node sets are index arrays.
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

/** Node dependencies, computed once per partition: successors in compressed rows, and in-degrees. */
interface Dependencies {
  readonly successorStart: Int32Array;
  readonly successors: Int32Array;
  readonly inDegree: Int32Array;
}

const dependencies = (nodes: readonly Node[], producerIndex: ReadonlyMap<string, number>): Dependencies => {
  const n = nodes.length;
  const edgesFrom: number[] = [];
  const edgesTo: number[] = [];
  const inDegree = new Int32Array(n);
  const lastSeen = new Int32Array(n).fill(-1); // dedupes a producer read twice by one node, without a Set per node
  nodes.forEach((node, i) => {
    for (const input of node.inputs) {
      const p = producerIndex.get(input);
      if (p === undefined || p === i || lastSeen[p] === i) continue;
      lastSeen[p] = i;
      edgesFrom.push(p);
      edgesTo.push(i);
      inDegree[i]++;
    }
  });
  const successorStart = new Int32Array(n + 1);
  for (const f of edgesFrom) successorStart[f + 1]++;
  for (let i = 0; i < n; i++) successorStart[i + 1] += successorStart[i];
  const fill = successorStart.slice(0, n);
  const successors = new Int32Array(edgesFrom.length);
  for (let e = 0; e < edgesFrom.length; e++) successors[fill[edgesFrom[e]]++] = edgesTo[e];
  return { successorStart, successors, inDegree };
};

interface Run {
  readonly kind: SegmentKind;
  readonly nodes: number[];
}

/** Groups nodes into kind-homogeneous runs of a topological order (see the module comment). */
const cluster = (deps: Dependencies, kinds: Uint8Array, start: SegmentKind): Run[] => {
  const n = kinds.length;
  const waiting = deps.inDegree.slice();
  // Ready queues per kind (0 engine, 1 fallback), in the order nodes became ready: array + head index.
  const ready: [number[], number[]] = [[], []];
  const heads = [0, 0];
  for (let i = 0; i < n; i++) if (waiting[i] === 0) ready[kinds[i]].push(i);
  const runs: Run[] = [];
  let current = start === 'engine' ? 0 : 1;
  if (ready[current].length === 0) current = 1 - current;
  while (heads[current] < ready[current].length) {
    const queue = ready[current];
    const run: number[] = [];
    while (heads[current] < queue.length) {
      const i = queue[heads[current]++];
      run.push(i);
      for (let e = deps.successorStart[i]; e < deps.successorStart[i + 1]; e++) {
        const s = deps.successors[e];
        if (--waiting[s] === 0) ready[kinds[s]].push(s);
      }
    }
    runs.push({ kind: current === 0 ? 'engine' : 'fallback', nodes: run });
    current = 1 - current;
  }
  return runs;
};

const describe = (analyzed: AnalyzedGraph, nodes: readonly Node[], producerIndex: ReadonlyMap<string, number>, runs: readonly Run[]): Segment[] => {
  const segmentOf = new Int32Array(nodes.length);
  runs.forEach((r, s) => r.nodes.forEach((i) => (segmentOf[i] = s)));
  // Tensors read by a segment other than their producer's.
  const crossing = new Set<string>(analyzed.graph.outputs);
  runs.forEach((r, s) => {
    for (const i of r.nodes) {
      for (const input of nodes[i].inputs) {
        const p = producerIndex.get(input);
        if (p !== undefined && segmentOf[p] !== s) crossing.add(input);
      }
    }
  });
  return runs.map((r, s) => {
    const inputs: string[] = [];
    const constants: string[] = [];
    const outputs: string[] = [];
    const seen = new Set<string>();
    for (const i of r.nodes) {
      for (const input of nodes[i].inputs) {
        if (input === '' || seen.has(input)) continue;
        seen.add(input);
        if (analyzed.constants.has(input)) constants.push(input);
        else {
          const p = producerIndex.get(input);
          if (p === undefined || segmentOf[p] !== s) inputs.push(input);
        }
      }
    }
    for (const i of r.nodes) for (const o of nodes[i].outputs) if (o !== '' && crossing.has(o) && !analyzed.constants.has(o)) outputs.push(o);
    return { index: s, kind: r.kind, nodes: r.nodes.map((i) => nodes[i]), inputs, constants, outputs };
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
  const deps = dependencies(runtimeNodes, producerIndex);
  const kinds = new Uint8Array(runtimeNodes.length);
  // Demoting a short engine run can merge its neighbours, so repeat until every engine run is long enough
  // and no engine segment hands a non-float tensor to another segment (engine outputs are float32; an
  // index tensor reshaped inside an engine exists only there). Each round demotes at least one node.
  for (;;) {
    runtimeNodes.forEach((n, i) => (kinds[i] = reasons.has(n.name) ? 1 : 0));
    // The first run's kind is the only free choice (later switches are forced): try both, keep the fewer runs.
    const engineFirst = cluster(deps, kinds, 'engine');
    const fallbackFirst = cluster(deps, kinds, 'fallback');
    const runs = fallbackFirst.length < engineFirst.length ? fallbackFirst : engineFirst;
    const short = runs.filter((r) => r.kind === 'engine' && r.nodes.length < minSize);
    if (short.length > 0) {
      for (const r of short) for (const i of r.nodes) reasons.set(runtimeNodes[i].name, `engine segment of ${r.nodes.length} nodes is below the minimum size ${minSize}`);
      continue;
    }
    const segments = describe(analyzed, runtimeNodes, producerIndex, runs);
    let demoted = false;
    for (const s of segments) {
      if (s.kind !== 'engine') continue;
      for (const o of s.outputs) {
        const dtype = analyzed.types.get(o)?.dtype;
        if (dtype === 'float32') continue;
        const producer = runtimeNodes[producerIndex.get(o)!];
        reasons.set(producer.name, `output '${o}' (${dtype}) is read outside its engine segment; engine outputs are float32`);
        demoted = true;
      }
    }
    if (!demoted) {
      return E.right({ analyzed, segments, folded: analyzed.graph.nodes.filter((n) => analyzed.folded.has(n.name)).map((n) => n.name), fallbackReasons: reasons });
    }
  }
};

export const partition = (analyzed: AnalyzedGraph, options: PartitionOptions = {}): Partition => {
  const r = partitionGraph(analyzed, options);
  if (E.isLeft(r)) throw new PartitionError(r.left);
  return r.right;
};
