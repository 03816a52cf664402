/**
 * Graph rewrites that make an exported graph refittable, applied before tracing (pure: graph and build
 * checkpoint in, graph out; outputs are unchanged at the build weights):
 *  - zero biases the exporter dropped come back: a Gemm without C whose weight is a checkpoint tensor
 *    `<m>.weight`, where the checkpoint's `<m>.bias` is all zeros of the output width, gets that bias as C
 *    (the dynamo exporter removes GPT-2's zero Conv1D biases, leaving a fine-tuned bias nowhere to go);
 *  - every use of a shared float initializer gets its own initializer (untie.ts).
 */
import { tensorOf, type Graph, type Node } from '../trace/ir.js';
import { normalizeName, WRAPPER_PREFIXES } from './match.js';
import { readF32, type TensorStore } from './store.js';
import { untieSharedInitializers } from './untie.js';

export const restoreZeroBiases = (graph: Graph, checkpoint: TensorStore, prefixes: readonly string[] = WRAPPER_PREFIXES): Graph => {
  const initializers = new Map(graph.initializers.map((i) => [i.name, i.tensor]));
  const byNormalized = new Map<string, string>();
  for (const name of checkpoint.tensors.keys()) byNormalized.set(normalizeName(name, prefixes), name);
  const taken = new Set([...initializers.keys(), ...graph.nodes.flatMap((n) => n.outputs), ...graph.inputs.map((i) => i.name)]);
  const added: { name: string; values: number }[] = [];
  const nodes = graph.nodes.map((node): Node => {
    if (node.opType !== 'Gemm' || (node.inputs[2] ?? '') !== '') return node;
    const weight = initializers.get(node.inputs[1]);
    if (weight === undefined || weight.shape.length !== 2) return node;
    const checkpointName = byNormalized.get(normalizeName(node.inputs[1], prefixes));
    if (checkpointName === undefined || !checkpointName.endsWith('.weight')) return node;
    const transB = node.attributes['transB'];
    const width = transB?.kind === 'int' && transB.value === 1 ? weight.shape[0] : weight.shape[1];
    const biasName = `${checkpointName.slice(0, -'weight'.length)}bias`;
    const bias = readF32(checkpoint, biasName);
    if (bias === undefined || bias.data.length !== width || bias.data.some((v) => v !== 0)) return node;
    let name = normalizeName(biasName, prefixes);
    while (taken.has(name)) name = `${name}_`;
    taken.add(name);
    added.push({ name, values: width });
    return { ...node, inputs: [node.inputs[0], node.inputs[1], name] };
  });
  if (added.length === 0) return graph;
  return { ...graph, nodes, initializers: [...graph.initializers, ...added.map((a) => ({ name: a.name, tensor: tensorOf('float32', [a.values], new Float32Array(a.values)) }))] };
};

/** Both rewrites, in the order the compile step applies them. */
export const prepareForRefit = (graph: Graph, checkpoint: TensorStore): Graph => untieSharedInitializers(restoreZeroBiases(graph, checkpoint));
