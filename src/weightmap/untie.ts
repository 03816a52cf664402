/**
 * Exporters share one initializer among every use of equal values (the dynamo exporter gives all zero
 * biases of a model one tensor, and all unit LayerNorm scales another). A refit must be able to give each
 * use its own value, so before tracing we give every use of a shared float initializer its own initializer
 * (same data, no copy), named `<name>@use<k>`. The weight map then maps each use separately; uses that
 * really are one checkpoint tensor map to the same source (a tied weight).
 */
import { isFloat, type Graph, type Initializer, type Node } from '../trace/ir.js';

export const USE_SEPARATOR = '@use';

/** The initializer name before untying. */
export const untiedBase = (name: string): string => {
  const i = name.lastIndexOf(USE_SEPARATOR);
  return i >= 0 && /^\d+$/.test(name.slice(i + USE_SEPARATOR.length)) ? name.slice(0, i) : name;
};

export const isUntiedCopy = (name: string): boolean => untiedBase(name) !== name;

export const untieSharedInitializers = (graph: Graph): Graph => {
  const uses = new Map<string, number>();
  for (const n of graph.nodes) for (const i of n.inputs) if (i !== '') uses.set(i, (uses.get(i) ?? 0) + 1);
  for (const o of graph.outputs) uses.set(o, (uses.get(o) ?? 0) + 1);
  const shared = new Set(graph.initializers.filter((i) => isFloat(i.tensor.dtype) && (uses.get(i.name) ?? 0) > 1 && !graph.outputs.includes(i.name)).map((i) => i.name));
  if (shared.size === 0) return graph;
  const taken = new Set<string>([...graph.initializers.map((i) => i.name), ...graph.nodes.flatMap((n) => n.outputs), ...graph.inputs.map((i) => i.name)]);
  const counters = new Map<string, number>();
  const copies: Initializer[] = [];
  const byName = new Map(graph.initializers.map((i) => [i.name, i]));
  const fresh = (name: string): string => {
    let k = counters.get(name) ?? 0;
    let candidate = `${name}${USE_SEPARATOR}${k}`;
    while (taken.has(candidate)) candidate = `${name}${USE_SEPARATOR}${++k}`;
    counters.set(name, k + 1);
    taken.add(candidate);
    copies.push({ name: candidate, tensor: byName.get(name)!.tensor });
    return candidate;
  };
  const nodes: Node[] = graph.nodes.map((n) => (n.inputs.some((i) => shared.has(i)) ? { ...n, inputs: n.inputs.map((i) => (shared.has(i) ? fresh(i) : i)) } : n));
  return { ...graph, initializers: [...graph.initializers.filter((i) => !shared.has(i.name)), ...copies], nodes };
};
