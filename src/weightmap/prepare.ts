/**
 * Graph rewrites that make an exported graph refittable, applied before tracing (pure: graph and build
 * checkpoint in, graph out; outputs are unchanged at the build weights):
 *  - zero biases the exporter dropped come back where the structure proves whose they are
 *    (restoreDroppedBiases: the dynamo exporter removes GPT-2's zero Conv1D biases, zero convolution biases,
 *    folded BatchNorm shifts of a fresh model, leaving a fine-tuned value nowhere to go);
 *  - every use of a shared float initializer gets its own initializer (untie.ts).
 */
import { tensorOf, type Graph, type Node } from '../trace/ir.js';
import type { Expr } from './expr.js';
import { CheckpointIndex, isAmbiguity, normalizeName, WRAPPER_PREFIXES } from './match.js';
import { readF32, type TensorStore } from './store.js';
import { isUntiedCopy, untiedBase, untieSharedInitializers } from './untie.js';

/** The rewrites, in the order the compile step applies them. `scopeOf` (module scopes of nodes, from
 *  scopes.ts) helps tell which BatchNorm a convolution folded. */
export const prepareForRefit = (graph: Graph, checkpoint: TensorStore, scopeOf: (node: string) => string | undefined = () => undefined): Graph =>
  untieSharedInitializers(restoreDroppedBiases(graph, checkpoint, scopeOf).graph);

/**
 * Biases the exporter dropped because they were zero, restored where the structure proves whose they
 * are: a Conv, Gemm or MatMul without a bias (a MatMul whose only reader is not an Add of a constant)
 * whose weight is checkpoint tensor `<m>.weight` (by name, or uniquely by value, or transposed) gets
 * `<m>.bias` (all zero at build, of the output width) as a refittable bias; a Conv whose weight
 * is `<m>.weight` with a BatchNorm `<b>` folded in gets a zero bias that the map then finds to be `<b>`'s
 * folded shift. A MatMul's bias is an Add after it. Outputs are unchanged at the build weights. Returns the
 * graph unchanged when there is nothing to restore.
 */
export const restoreDroppedBiases = (
  graph: Graph,
  checkpoint: TensorStore,
  scopeOf: (node: string) => string | undefined,
  prefixes: readonly string[] = WRAPPER_PREFIXES,
): { graph: Graph; restored: readonly { node: string; bias: string; source: string }[] } => {
  const initializers = new Map(graph.initializers.map((i) => [i.name, i.tensor]));
  const index = new CheckpointIndex(checkpoint, prefixes);
  const taken = new Set([...initializers.keys(), ...graph.nodes.flatMap((n) => n.outputs), ...graph.inputs.map((i) => i.name)]);
  const consumers = new Map<string, Node[]>();
  for (const n of graph.nodes) for (const i of n.inputs) if (i !== '') consumers.set(i, [...(consumers.get(i) ?? []), n]);
  const isConstant = (name: string) => initializers.has(name) || graph.nodes.some((n) => n.opType === 'Constant' && n.outputs[0] === name);
  /** A MatMul whose product already gets a constant added (a Linear's bias, kept by the exporter). */
  const hasBiasAdd = (node: Node): boolean => {
    const readers = consumers.get(node.outputs[0]) ?? [];
    return readers.length !== 1 || (readers[0].opType === 'Add' && readers[0].inputs.some((i) => i !== node.outputs[0] && isConstant(i)));
  };
  const zeroBias = (name: string, width: number): boolean => {
    const b = readF32(checkpoint, name);
    return b !== undefined && b.data.length === width && b.data.every((v) => v === 0);
  };
  const restored: { node: string; bias: string; source: string }[] = [];
  const added: { name: string; width: number }[] = [];
  const extra: Node[] = [];
  const renamed = new Map<string, string>();
  const nodes = graph.nodes.map((node): Node => {
    const isConv = node.opType === 'Conv' && (node.inputs[2] ?? '') === '';
    const isGemm = node.opType === 'Gemm' && (node.inputs[2] ?? '') === '';
    const isMatMul = node.opType === 'MatMul';
    if ((!isConv && !isGemm && !isMatMul) || (isMatMul && hasBiasAdd(node))) return node;
    const weightName = node.inputs[1];
    const weight = weightName === undefined ? undefined : initializers.get(weightName);
    if (weight === undefined || (weight.dtype !== 'float32' && weight.dtype !== 'float64')) return node;
    if (!isConv && weight.shape.length !== 2) return node;
    const transB = node.attributes['transB'];
    const width = isConv ? weight.shape[0] : isGemm && transB?.kind === 'int' && transB.value === 1 ? weight.shape[0] : weight.shape[1];
    const data = weight.dtype === 'float32' ? (weight.data as Float32Array) : Float32Array.from(weight.data as Float64Array);
    const scope = scopeOf(node.name);
    // A weight several nodes read (a tied parameter) proves no owner of the bias unless a node's scope says so.
    const sharers = (consumers.get(weightName) ?? []).filter((n) => n.inputs[1] === weightName);
    const shared = sharers.length > 1;
    const found = index.match({
      name: untiedBase(weightName), value: { shape: weight.shape, data }, byName: !isUntiedCopy(weightName),
      evidence: { names: isUntiedCopy(weightName) ? [] : [weightName], aliases: [], scopes: scope !== undefined ? [scope] : [] }, suffix: 'weight',
    });
    if (found === undefined || isAmbiguity(found) || (found.settled ?? []).some((x) => x.by === 'tied')) return node;
    let bias: string | undefined;
    let source: string | undefined;
    const plain = plainSource(found.expr);
    if (plain !== undefined && plain.endsWith('.weight') && found.method !== 'name-only') {
      const candidate = `${plain.slice(0, -'weight'.length)}bias`;
      const module = normalizeName(plain.slice(0, -'.weight'.length), prefixes);
      const owns = (n: Node) => { const sc = scopeOf(n.name); return sc !== undefined && normalizeName(sc, prefixes) === module; };
      if (shared && !(owns(node) && sharers.filter(owns).length === 1)) return node;
      if (zeroBias(candidate, width)) {
        bias = normalizeName(candidate, prefixes);
        source = candidate;
      }
    } else if (isConv && !shared && found.expr.op === 'bnFoldWeight' && found.expr.gamma.op === 'source') {
      const bn = found.expr.gamma.name.slice(0, -'weight'.length);
      if (zeroBias(`${bn}bias`, width) && zeroBias(`${bn}running_mean`, width)) {
        bias = `${untiedBase(weightName)}::folded_bias`;
        source = `${bn}*`;
      }
    }
    if (bias === undefined || source === undefined || taken.has(bias)) return node;
    taken.add(bias);
    added.push({ name: bias, width });
    restored.push({ node: node.name, bias, source });
    if (!isMatMul) return { ...node, inputs: [node.inputs[0], node.inputs[1], bias] };
    let product = `${node.outputs[0]}::without_bias`;
    while (taken.has(product)) product += '_';
    taken.add(product);
    renamed.set(node.outputs[0], product);
    extra.push({ name: `${node.name}::bias`, opType: 'Add', domain: node.domain, inputs: [product, bias], outputs: [node.outputs[0]], attributes: {} });
    return { ...node, outputs: [product] };
  });
  if (added.length === 0) return { graph, restored };
  // Each restored Add goes right after its MatMul, so the node order stays topological.
  const ordered: Node[] = [];
  for (const n of nodes) {
    ordered.push(n);
    const add = extra.find((x) => x.inputs[0] === n.outputs[0] && renamed.get(x.outputs[0]) === n.outputs[0]);
    if (add) ordered.push(add);
  }
  return {
    graph: { ...graph, nodes: ordered, initializers: [...graph.initializers, ...added.map((a) => ({ name: a.name, tensor: tensorOf('float32', [a.width], new Float32Array(a.width)) }))] },
    restored,
  };
};

/** The one checkpoint tensor an expression copies (through reshapes and transposes), if it is that. */
const plainSource = (e: Expr): string | undefined =>
  e.op === 'source' ? e.name : e.op === 'reshape' || e.op === 'transpose' ? plainSource(e.x) : undefined;
