/** Random graphs from the builder DSL, for property tests of the trace and partition stages. */
import fc from 'fast-check';
import { GraphBuilder, float, type AttributeInput } from '../../src/trace/builder.js';
import { tensorOf, type Attribute, type Graph } from '../../src/trace/ir.js';

const values = (n: number) => fc.array(fc.float({ min: -1, max: 1, noNaN: true, noDefaultInfinity: true }), { minLength: n, maxLength: n });

type Step =
  | { kind: 'unary'; op: string; a: number }
  | { kind: 'binary'; op: string; a: number; b: number }
  | { kind: 'bias'; a: number }
  | { kind: 'matmul'; a: number; transposed: boolean }
  | { kind: 'softmax'; a: number }
  | { kind: 'nanToZero'; a: number };

const step: fc.Arbitrary<Step> = fc.oneof(
  fc.record({ kind: fc.constant('unary' as const), op: fc.constantFrom('Relu', 'Sigmoid', 'Tanh', 'Neg', 'Erf', 'Abs'), a: fc.nat() }),
  fc.record({ kind: fc.constant('binary' as const), op: fc.constantFrom('Add', 'Mul', 'Sub'), a: fc.nat(), b: fc.nat() }),
  fc.record({ kind: fc.constant('bias' as const), a: fc.nat() }),
  fc.record({ kind: fc.constant('matmul' as const), a: fc.nat(), transposed: fc.boolean() }),
  fc.record({ kind: fc.constant('softmax' as const), a: fc.nat() }),
  fc.record({ kind: fc.constant('nanToZero' as const), a: fc.nat() }),
);

export interface RandomModel {
  readonly graph: Graph;
  readonly inputs: Record<string, Float32Array>;
}

/**
 * A runnable float32 graph over [2,4] tensors: unary and binary elementwise ops, MatMul with a constant
 * weight (sometimes through a Transpose that folding removes), Softmax, and IsNaN+Where (which only the
 * fallback runs), wired to random earlier tensors, so segments interleave.
 */
export const randomModel: fc.Arbitrary<RandomModel> = fc
  .record({ steps: fc.array(step, { minLength: 1, maxLength: 14 }), w: values(16), bias: values(4), x: values(8), y: values(8), twoOutputs: fc.boolean() })
  .map(({ steps, w, bias, x, y, twoOutputs }) => {
    const b = new GraphBuilder('random', 18);
    const tensors = [b.input('x', 'float32', [2, 4]), b.input('y', 'float32', [2, 4])];
    const weight = b.initializer('W', tensorOf('float32', [4, 4], w));
    const biasName = b.initializer('bias', tensorOf('float32', [4], bias));
    const zero = b.constant('zero', 'float32', [], [0]);
    const pick = (i: number) => tensors[i % tensors.length];
    for (const s of steps) {
      switch (s.kind) {
        case 'unary': tensors.push(b.op(s.op, [pick(s.a)])); break;
        case 'binary': tensors.push(b.op(s.op, [pick(s.a), pick(s.b)])); break;
        case 'bias': tensors.push(b.op('Add', [pick(s.a), biasName])); break;
        case 'matmul': {
          const rhs = s.transposed ? b.op('Transpose', [weight], { perm: [1, 0] }) : weight;
          tensors.push(b.op('MatMul', [pick(s.a), rhs]));
          break;
        }
        case 'softmax': tensors.push(b.op('Softmax', [pick(s.a)], { axis: -1 })); break;
        case 'nanToZero': {
          const t = pick(s.a);
          tensors.push(b.op('Where', [b.op('IsNaN', [t]), zero, t]));
          break;
        }
      }
    }
    b.output(tensors[tensors.length - 1]);
    if (twoOutputs && tensors.length > 3 && tensors[tensors.length - 2] !== 'x' && tensors[tensors.length - 2] !== 'y') b.output(tensors[tensors.length - 2]);
    return { graph: b.build(), inputs: { x: Float32Array.from(x), y: Float32Array.from(y) } };
  });

const attribute: fc.Arbitrary<Attribute> = fc.oneof(
  fc.double().map((value) => ({ kind: 'float' as const, value: Math.fround(value) })),
  fc.integer().map((value) => ({ kind: 'int' as const, value })),
  fc.string().map((value) => ({ kind: 'string' as const, value })),
  fc.array(fc.double()).map((value) => ({ kind: 'floats' as const, value })),
  fc.array(fc.integer()).map((value) => ({ kind: 'ints' as const, value })),
  fc.array(fc.string()).map((value) => ({ kind: 'strings' as const, value })),
  fc.array(fc.integer({ min: -1000, max: 1000 }), { maxLength: 6 }).map((v) => ({ kind: 'tensor' as const, value: tensorOf('int64', [v.length], v) })),
  fc.array(fc.float(), { maxLength: 6 }).map((v) => ({ kind: 'tensor' as const, value: tensorOf('float32', [v.length], v) })),
);

/** Graph data as the IR allows it, attributes and names of any content: for printer/parser round trips. */
export const randomGraphData: fc.Arbitrary<Graph> = fc
  .record({ model: randomModel, attrs: fc.array(fc.dictionary(fc.string(), attribute, { maxKeys: 3 }), { maxLength: 20 }), name: fc.string(), extra: fc.float() })
  .map(({ model, attrs, name, extra }) => {
    const nodes = model.graph.nodes.map((n, i) => ({ ...n, name: i === 0 ? `${name}\t"${n.name}` : n.name, attributes: { ...n.attributes, ...(attrs[i] ?? {}) } }));
    const b = new GraphBuilder(name, 18);
    b.input('s', 'float32', ['batch', 4]);
    const extraInit = { name: 'extra \u00e9\n', tensor: tensorOf('float32', [1], [extra]) };
    return { ...model.graph, name, nodes, inputs: [...model.graph.inputs, ...b.build().inputs], initializers: [...model.graph.initializers, extraInit] };
  });

export const attrs = (a: Record<string, AttributeInput>) => a;
export { float };
