/**
 * The programmatic way in, like TensorRT's network API: build a graph op by op in TypeScript. It yields
 * the same immutable Graph as the ONNX importer, so everything downstream treats both alike.
 *
 *   const b = new GraphBuilder('mlp');
 *   const x = b.input('x', 'float32', [4, 32]);
 *   const w = b.initializer('w', tensorOf('float32', [32, 8], values));
 *   b.output(b.op('Relu', [b.op('MatMul', [x, w])]));
 *   const graph = b.build();
 */
import { tensorOf, type Attribute, type DType, type Dim, type Graph, type Initializer, type Node, type Tensor, type ValueInfo } from './ir.js';

/** Attribute values: a number is an int when it is an integer; wrap with `float()` to force a float. */
export type AttributeInput = Attribute | number | readonly number[] | string | readonly string[] | Tensor;

export const float = (value: number): Attribute => ({ kind: 'float', value });
export const floats = (value: readonly number[]): Attribute => ({ kind: 'floats', value });

const isAttribute = (v: AttributeInput): v is Attribute => typeof v === 'object' && v !== null && 'kind' in v && 'value' in v;
const isTensor = (v: AttributeInput): v is Tensor => typeof v === 'object' && v !== null && 'dtype' in v && 'data' in v;

const toAttribute = (v: AttributeInput): Attribute => {
  if (isAttribute(v)) return v;
  if (isTensor(v)) return { kind: 'tensor', value: v };
  if (typeof v === 'string') return { kind: 'string', value: v };
  if (typeof v === 'number') return Number.isInteger(v) ? { kind: 'int', value: v } : { kind: 'float', value: v };
  const list = v as readonly (number | string)[];
  if (list.every((x) => typeof x === 'string')) return { kind: 'strings', value: list as readonly string[] };
  const numbers = list as readonly number[];
  return numbers.every(Number.isInteger) ? { kind: 'ints', value: numbers } : { kind: 'floats', value: numbers };
};

export class GraphBuilder {
  private readonly inputs: ValueInfo[] = [];
  private readonly initializers: Initializer[] = [];
  private readonly nodes: Node[] = [];
  private readonly outputs: string[] = [];
  private readonly names = new Set<string>();
  private counter = 0;

  constructor(readonly name = 'graph', readonly opset = 18) {}

  private fresh(base: string): string {
    let name = base;
    while (this.names.has(name)) name = `${base}_${++this.counter}`;
    this.names.add(name);
    return name;
  }

  input(name: string, dtype: DType, shape: readonly Dim[]): string {
    const n = this.fresh(name);
    this.inputs.push({ name: n, dtype, shape: [...shape] });
    return n;
  }

  initializer(name: string, tensor: Tensor): string {
    const n = this.fresh(name);
    this.initializers.push({ name: n, tensor });
    return n;
  }

  /** A small constant initializer, e.g. a Reshape target: `b.constant('shape', 'int64', [2], [4, -1])`. */
  constant(name: string, dtype: DType, shape: readonly number[], values: readonly number[]): string {
    return this.initializer(name, tensorOf(dtype, shape, values));
  }

  /** Adds a node and returns its output tensor names (`outputs` of them). */
  node(opType: string, inputs: readonly string[], attributes: Readonly<Record<string, AttributeInput>> = {}, outputs = 1, name?: string): string[] {
    const nodeName = this.fresh(name ?? `${opType}_${this.nodes.length}`);
    const outs = Array.from({ length: outputs }, (_, i) => this.fresh(outputs === 1 ? `${nodeName}_out` : `${nodeName}_out${i}`));
    const attrs = Object.fromEntries(Object.entries(attributes).map(([k, v]) => [k, toAttribute(v)]));
    this.nodes.push({ name: nodeName, opType, domain: '', inputs: [...inputs], outputs: outs, attributes: attrs });
    return outs;
  }

  /** A single-output node. */
  op(opType: string, inputs: readonly string[], attributes: Readonly<Record<string, AttributeInput>> = {}, name?: string): string {
    return this.node(opType, inputs, attributes, 1, name)[0];
  }

  output(tensor: string): void {
    this.outputs.push(tensor);
  }

  build(): Graph {
    return {
      name: this.name,
      opset: this.opset,
      inputs: [...this.inputs],
      outputs: [...this.outputs],
      initializers: [...this.initializers],
      nodes: [...this.nodes],
    };
  }
}
