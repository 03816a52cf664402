/**
 * Canonical form of a dataflow graph, free of names and of the order of independent nodes.
 *
 * A graph here is ordered sources (its inputs), nodes (each with a name-free `label` that holds every
 * attribute, weight dtype and weight shape, and its operands by tensor name) and ordered sinks (its
 * outputs). The canonical form is the byte string
 *
 *     sources' labels in order; then, for every node in the canonical order, its label and each operand
 *     written as a position (`n<index>.<slot>` for output `slot` of the index-th node in canonical order,
 *     `i<k>` for source k, `-` for an omitted operand); then the sinks as positions.
 *
 * Why equal forms mean the same computation (soundness, so a cache hit is never a wrong engine): the form
 * lists every node with everything that is not a name, and says by position where each operand comes
 * from; reading it back rebuilds the graph up to the names of its tensors, whatever order was chosen.
 * So soundness does not depend on how the order is chosen; only invariance does.
 *
 * Why renaming and reordering do not change the form (invariance): the order is Kahn's topological sort
 * that, among the nodes whose operands are ready, always takes the one with the smallest structural
 * rank. The rank is computed from structure alone (never names or input order): a hash of the node's
 * label and of its operands' ranks (what it computes from the inputs, top down), refined with a hash of
 * how its outputs are consumed (by which kind of node, in which operand slot, or as which sink, bottom
 * up), then once more in both directions, as in Weisfeiler-Lehman refinement. When ranks are distinct,
 * each step's choice depends only on the graph, so every topological order of the same graph under any
 * naming yields the same sequence. Nodes of equal rank are in practice symmetric (swapping them is an
 * automorphism, which leaves the form unchanged); if two are not, the tie is broken by their given
 * position, which can only make two equivalent graphs hash apart (a miss), never two different graphs
 * hash alike.
 *
 * Ranks are cheap 53-bit string hashes, not sha256: they only order nodes. The form itself is streamed
 * into sha256 by the caller.
 */

export interface DagSource {
  readonly name: string;
  /** Everything about the source but its name (dtype, shape). */
  readonly label: string;
}

export interface DagNode {
  /** Kept for the canonical name list (weights are addressed by it); not hashed. */
  readonly name: string;
  readonly label: string;
  /** Operand tensor names; '' for an omitted optional operand. */
  readonly inputs: readonly string[];
  readonly outputs: readonly string[];
}

export interface Dag {
  readonly sources: readonly DagSource[];
  /** In a topological order. */
  readonly nodes: readonly DagNode[];
  readonly sinks: readonly string[];
}

export type CanonicalError =
  | { readonly _tag: 'UndefinedTensor'; readonly node: string; readonly tensor: string }
  | { readonly _tag: 'DuplicateTensor'; readonly node: string; readonly tensor: string };

export interface CanonicalDag {
  /** Node indices (into dag.nodes) in canonical order. */
  readonly order: readonly number[];
  /** The canonical form, as text pieces (the caller hashes them). */
  readonly pieces: readonly string[];
}

/** cyrb53: a fast, well-mixed 53-bit hash of a string. */
export const hash53 = (text: string, seed = 0): number => {
  let h1 = 0xdeadbeef ^ seed;
  let h2 = 0x41c6ce57 ^ seed;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    h1 = Math.imul(h1 ^ c, 2654435761);
    h2 = Math.imul(h2 ^ c, 1597334677);
  }
  h1 = Math.imul(h1 ^ (h1 >>> 16), 2246822507) ^ Math.imul(h2 ^ (h2 >>> 13), 3266489909);
  h2 = Math.imul(h2 ^ (h2 >>> 16), 2246822507) ^ Math.imul(h1 ^ (h1 >>> 13), 3266489909);
  return 4294967296 * (2097151 & h2) + (h1 >>> 0);
};

type Ref = { readonly kind: 'source'; readonly index: number } | { readonly kind: 'node'; readonly index: number; readonly slot: number } | { readonly kind: 'none' };

/** A binary min-heap of node indices under a comparison. */
class Heap {
  readonly #items: number[] = [];
  constructor(private readonly less: (a: number, b: number) => boolean) {}
  get size(): number {
    return this.#items.length;
  }
  push(x: number): void {
    const a = this.#items;
    a.push(x);
    let i = a.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!this.less(a[i], a[p])) break;
      [a[i], a[p]] = [a[p], a[i]];
      i = p;
    }
  }
  pop(): number {
    const a = this.#items;
    const top = a[0];
    const last = a.pop()!;
    if (a.length > 0) {
      a[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < a.length && this.less(a[l], a[m])) m = l;
        if (r < a.length && this.less(a[r], a[m])) m = r;
        if (m === i) break;
        [a[i], a[m]] = [a[m], a[i]];
        i = m;
      }
    }
    return top;
  }
}

export const canonicalizeDag = (dag: Dag): { ok: true; value: CanonicalDag } | { ok: false; error: CanonicalError } => {
  const n = dag.nodes.length;
  // Resolve every operand to its producer.
  const producer = new Map<string, Ref>();
  dag.sources.forEach((s, index) => producer.set(s.name, { kind: 'source', index }));
  const operands: Ref[][] = [];
  for (let i = 0; i < n; i++) {
    const node = dag.nodes[i];
    const refs: Ref[] = [];
    for (const t of node.inputs) {
      if (t === '') {
        refs.push({ kind: 'none' });
        continue;
      }
      const r = producer.get(t);
      if (r === undefined) return { ok: false, error: { _tag: 'UndefinedTensor', node: node.name, tensor: t } };
      refs.push(r);
    }
    operands.push(refs);
    for (let slot = 0; slot < node.outputs.length; slot++) {
      const t = node.outputs[slot];
      if (t === '') continue;
      if (producer.has(t)) return { ok: false, error: { _tag: 'DuplicateTensor', node: node.name, tensor: t } };
      producer.set(t, { kind: 'node', index: i, slot });
    }
  }
  const sinks: Ref[] = [];
  for (const t of dag.sinks) {
    const r = producer.get(t);
    if (r === undefined) return { ok: false, error: { _tag: 'UndefinedTensor', node: '(output)', tensor: t } };
    sinks.push(r);
  }
  // Uses of each node's outputs: [consumer, operand slot, output slot]; sinks as consumer -1 - position.
  const uses: Array<Array<readonly [number, number, number]>> = Array.from({ length: n }, () => []);
  operands.forEach((refs, consumer) => refs.forEach((r, operandSlot) => {
    if (r.kind === 'node') uses[r.index].push([consumer, operandSlot, r.slot]);
  }));
  sinks.forEach((r, position) => {
    if (r.kind === 'node') uses[r.index].push([-1 - position, 0, r.slot]);
  });
  const labelHash = dag.nodes.map((node) => hash53(node.label));
  const sourceHash = dag.sources.map((s, k) => hash53(`${k}:${s.label}`, 1));

  // Top down: what a node computes from the sources (nodes are in a topological order).
  const topDown = (seed: readonly number[]): number[] => {
    const out = new Array<number>(n);
    for (let i = 0; i < n; i++) {
      let text = String(seed[i]);
      for (const r of operands[i]) text += r.kind === 'node' ? `|${out[r.index]}.${r.slot}` : r.kind === 'source' ? `|s${sourceHash[r.index]}` : '|-';
      out[i] = hash53(text, 2);
    }
    return out;
  };
  // Bottom up: how a node's outputs are consumed (reverse topological order).
  const bottomUp = (seed: readonly number[]): number[] => {
    const out = new Array<number>(n);
    for (let i = n - 1; i >= 0; i--) {
      const parts = uses[i].map(([c, operandSlot, slot]) => (c < 0 ? `o${-1 - c}.${slot}` : `${out[c]}.${operandSlot}.${slot}`)).sort();
      out[i] = hash53(`${seed[i]}|${parts.join(',')}`, 3);
    }
    return out;
  };
  const combine = (a: readonly number[], b: readonly number[]) => a.map((x, i) => hash53(`${x}:${b[i]}`, 4));
  const round1 = combine(topDown(labelHash), bottomUp(labelHash));
  const rank = combine(topDown(round1), bottomUp(round1));

  // Kahn's sort, smallest rank first (given position breaks exact ties).
  const waiting = new Int32Array(n);
  const dependents: number[][] = Array.from({ length: n }, () => []);
  operands.forEach((refs, i) => {
    const deps = new Set<number>();
    for (const r of refs) if (r.kind === 'node') deps.add(r.index);
    waiting[i] = deps.size;
    for (const d of deps) dependents[d].push(i);
  });
  const heap = new Heap((a, b) => rank[a] < rank[b] || (rank[a] === rank[b] && a < b));
  for (let i = 0; i < n; i++) if (waiting[i] === 0) heap.push(i);
  const order: number[] = [];
  const position = new Int32Array(n);
  while (heap.size > 0) {
    const i = heap.pop();
    position[i] = order.length;
    order.push(i);
    for (const d of dependents[i]) if (--waiting[d] === 0) heap.push(d);
  }
  const refText = (r: Ref): string => (r.kind === 'node' ? `n${position[r.index]}.${r.slot}` : r.kind === 'source' ? `i${r.index}` : '-');
  const pieces: string[] = [`sources ${dag.sources.length}\n`];
  for (const s of dag.sources) pieces.push(`${s.label.length}:${s.label}\n`);
  pieces.push(`nodes ${n}\n`);
  for (const i of order) pieces.push(`${dag.nodes[i].label.length}:${dag.nodes[i].label} <- ${operands[i].map(refText).join(' ')} -> ${dag.nodes[i].outputs.length}\n`);
  pieces.push(`sinks ${sinks.map(refText).join(' ')}\n`);
  return { ok: true, value: { order, pieces } };
};
