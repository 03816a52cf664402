/**
 * Shape and dtype inference plus constant folding with provenance, in one pass over the nodes in
 * topological order (they must go together: a Reshape's output shape needs its folded shape input).
 */
import * as E from 'fp-ts/lib/Either.js';
import { elementCount, tensorOf, toNumbers, type Graph, type Node, type Tensor, type TensorType } from './ir.js';
import type { TraceErrorDetail } from './errors.js';
import { shapeRules } from './shapes.js';
import { evaluators, MAX_FOLDED_ELEMENTS, provenanceDetails } from './fold.js';
import type { Provenance } from './provenance.js';

export interface Constant {
  readonly tensor: Tensor;
  readonly provenance: Provenance;
}

export interface AnalyzedGraph {
  readonly graph: Graph;
  /** The static type of every tensor: inputs, initializers and node outputs. */
  readonly types: ReadonlyMap<string, TensorType>;
  /** Every tensor known at build time: initializers and folded node outputs. */
  readonly constants: ReadonlyMap<string, Constant>;
  /** Nodes whose outputs were all computed at build time; they do not run. */
  readonly folded: ReadonlySet<string>;
  /** The node that produces each node output. */
  readonly producers: ReadonlyMap<string, Node>;
}

export interface AnalyzeOptions {
  /** Shapes for graph inputs, needed where the model declares symbolic dimensions. */
  readonly inputShapes?: Readonly<Record<string, readonly number[]>>;
  /** Fold constants (default true). Shape inference still reads initializers and Constant nodes. */
  readonly fold?: boolean;
}

const constantNodeValue = (node: Node): Tensor | undefined => {
  const a = node.attributes;
  const v = a['value'] ?? a['value_float'] ?? a['value_floats'] ?? a['value_int'] ?? a['value_ints'];
  if (v === undefined) return undefined;
  switch (v.kind) {
    case 'tensor': return v.value;
    case 'float': return tensorOf('float32', [], [v.value]);
    case 'floats': return tensorOf('float32', [v.value.length], v.value);
    case 'int': return tensorOf('int64', [], [v.value]);
    case 'ints': return tensorOf('int64', [v.value.length], v.value);
    default: return undefined;
  }
};

/** Operators whose inputs from this index on are parameters (shapes, axes, bounds), not data. */
const parameterInputsFrom: Readonly<Record<string, number>> = {
  Reshape: 1, Squeeze: 1, Unsqueeze: 1, Expand: 1, Slice: 1, Gather: 1, Split: 1, ReduceMean: 1, ReduceSum: 1, ReduceMax: 1, ReduceMin: 1, ConstantOfShape: 0, Tile: 1,
};

/** The resolved parameters an operation applied, for provenance records. */
const provenanceParams = (node: Node, outputs: readonly TensorType[]): Record<string, number | string | readonly number[]> => {
  const params: Record<string, number | string | readonly number[]> = {};
  for (const [k, a] of Object.entries(node.attributes)) {
    if (a.kind === 'int' || a.kind === 'float' || a.kind === 'string' || a.kind === 'ints' || a.kind === 'floats') params[k] = a.value;
  }
  if (['Reshape', 'Flatten', 'Squeeze', 'Unsqueeze', 'Expand'].includes(node.opType)) params['shape'] = outputs[0].shape;
  if (node.opType === 'Cast') params['to'] = outputs[0].dtype;
  return params;
};

export const analyzeGraph = (graph: Graph, options: AnalyzeOptions = {}): E.Either<TraceErrorDetail, AnalyzedGraph> => {
  const fold = options.fold ?? true;
  const types = new Map<string, TensorType>();
  const constants = new Map<string, Constant>();
  const folded = new Set<string>();
  const producers = new Map<string, Node>();
  const define = (name: string, type: TensorType): TraceErrorDetail | undefined => {
    if (types.has(name)) return { _tag: 'DuplicateTensor', tensor: name };
    types.set(name, type);
    return undefined;
  };

  for (const input of graph.inputs) {
    const given = options.inputShapes?.[input.name];
    let shape: number[];
    if (given !== undefined) {
      if (given.length !== input.shape.length || given.some((d, i) => !Number.isInteger(d) || d < 0 || (typeof input.shape[i] === 'number' && input.shape[i] !== d))) {
        return E.left({ _tag: 'UnresolvedShape', tensor: input.name, reason: `given shape [${given}] does not match the declared shape [${input.shape}]` });
      }
      shape = [...given];
    } else {
      const symbolic = input.shape.find((d) => typeof d === 'string');
      if (symbolic !== undefined) return E.left({ _tag: 'UnresolvedShape', tensor: input.name, reason: `dimension '${symbolic}' is symbolic; pass the input's shape` });
      shape = input.shape as number[];
    }
    const error = define(input.name, { dtype: input.dtype, shape });
    if (error) return E.left(error);
  }
  for (const init of graph.initializers) {
    const error = define(init.name, { dtype: init.tensor.dtype, shape: init.tensor.shape });
    if (error) return E.left(error);
    constants.set(init.name, { tensor: init.tensor, provenance: { kind: 'initializer', name: init.name } });
  }
  const producedLater = new Set(graph.nodes.flatMap((n) => n.outputs));

  for (const node of graph.nodes) {
    if (node.domain !== '') return E.left({ _tag: 'UnsupportedOperator', node: node.name, opType: `${node.domain}.${node.opType}`, reason: `operators of domain '${node.domain}' are not supported` });
    const inputTypes: (TensorType | undefined)[] = [];
    for (const name of node.inputs) {
      if (name === '') {
        inputTypes.push(undefined);
        continue;
      }
      const t = types.get(name);
      if (t === undefined) return E.left(producedLater.has(name) ? { _tag: 'NotTopological', node: node.name, tensor: name } : { _tag: 'UnknownTensor', node: node.name, tensor: name });
      inputTypes.push(t);
    }
    const values = node.inputs.map((name) => (name === '' ? undefined : constants.get(name)?.tensor));
    let outTypes: TensorType[];
    let outValues: (Tensor | undefined)[] | undefined;
    let outProvenance: ((i: number) => Provenance) | undefined;

    if (node.opType === 'Constant') {
      const value = constantNodeValue(node);
      if (value === undefined) return E.left({ _tag: 'InvalidNode', node: node.name, opType: node.opType, reason: 'no value attribute of a supported kind' });
      outTypes = [{ dtype: value.dtype, shape: value.shape }];
      outValues = [value];
      outProvenance = () => ({ kind: 'literal', node: node.name });
    } else {
      const rule = shapeRules[node.opType];
      if (rule === undefined) return E.left({ _tag: 'UnsupportedOperator', node: node.name, opType: node.opType, reason: 'no shape inference rule for this operator' });
      const result = rule({ node, opset: graph.opset, types: inputTypes, values });
      if (E.isLeft(result)) return result;
      outTypes = result.right;
      if (node.outputs.filter((o) => o !== '').length > 0 && node.outputs.length > outTypes.length) {
        return E.left({ _tag: 'InvalidNode', node: node.name, opType: node.opType, reason: `has ${node.outputs.length} outputs; the operator gives at most ${outTypes.length}` });
      }
      if (node.opType === 'Shape' && fold) {
        outValues = [tensorOf('int64', outTypes[0].shape, inputTypes[0]!.shape.slice(...shapeRange(node, inputTypes[0]!.shape.length)))];
        outProvenance = () => ({ kind: 'shape', tensor: node.inputs[0] });
      } else if (fold && node.inputs.every((n, i) => n === '' || values[i] !== undefined) && evaluators[node.opType] !== undefined
        && outTypes.every((t) => elementCount(t.shape) <= MAX_FOLDED_ELEMENTS)) {
        try {
          outValues = evaluators[node.opType](node, values, outTypes, graph.opset);
        } catch {
          outValues = undefined; // a case the evaluator does not cover: the node runs at run time
        }
        // Shape-like parameter inputs (a Reshape target, Slice bounds) are recorded by value in params:
        // they are not data the result was computed from, even when stored as initializers.
        const dataInputs = parameterInputsFrom[node.opType] ?? node.inputs.length;
        const inputProvenance = node.inputs.slice(0, dataInputs).map((n) => (n === '' ? ({ kind: 'literal', node: node.name } as Provenance) : constants.get(n)!.provenance));
        const params = { ...provenanceParams(node, outTypes), ...provenanceDetails[node.opType]?.(node, inputTypes, values, outTypes) };
        node.inputs.slice(dataInputs).forEach((n, k) => {
          if (n !== '') params[`input${dataInputs + k}`] = toNumbers(values[dataInputs + k]!);
        });
        outProvenance = (i) => ({ kind: 'op', opType: node.opType, node: node.name, output: i, params, inputs: inputProvenance });
      }
    }
    let allConstant = true;
    for (let i = 0; i < node.outputs.length; i++) {
      const name = node.outputs[i];
      if (name === '') continue;
      const error = define(name, outTypes[i]);
      if (error) return E.left(error);
      producers.set(name, node);
      const value = outValues?.[i];
      if (value !== undefined && outProvenance !== undefined) constants.set(name, { tensor: value, provenance: outProvenance(i) });
      else allConstant = false;
    }
    if (allConstant && outValues !== undefined) folded.add(node.name);
  }
  for (const output of graph.outputs) {
    if (!types.has(output)) return E.left({ _tag: 'UnknownTensor', node: '(graph output)', tensor: output });
  }
  return E.right({ graph, types, constants, folded, producers });
};

const shapeRange = (node: Node, rank: number): [number, number] => {
  const get = (name: string, fallback: number) => {
    const a = node.attributes[name];
    const v = a?.kind === 'int' ? a.value : fallback;
    return Math.min(Math.max(v < 0 ? v + rank : v, 0), rank);
  };
  return [get('start', 0), get('end', rank)];
};
