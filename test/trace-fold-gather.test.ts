/** Constant folding of GatherElements and GatherND agrees with ONNX Runtime running the same node. */
import { describe, expect } from 'vitest';
import { test, fc } from '@fast-check/vitest';
import * as E from 'fp-ts/lib/Either.js';
import { GraphBuilder } from '../src/trace/builder.js';
import { analyzeGraph } from '../src/trace/analyze.js';
import { elementCount, tensorOf, type Node, type Tensor } from '../src/trace/ir.js';
import { FallbackSession } from '../src/fallback/session.js';

interface Case {
  readonly opType: 'GatherElements' | 'GatherND';
  readonly data: Tensor;
  readonly indices: Tensor;
  readonly attributes: Record<string, number>;
}

const values = (n: number) => fc.array(fc.float({ min: -100, max: 100, noNaN: true, noDefaultInfinity: true }), { minLength: n, maxLength: n });

const gatherElementsCase: fc.Arbitrary<Case> = fc
  .array(fc.integer({ min: 1, max: 4 }), { minLength: 1, maxLength: 3 })
  .chain((dataShape) =>
    fc.record({
      dataShape: fc.constant(dataShape),
      axis: fc.integer({ min: 0, max: dataShape.length - 1 }),
      // Indices may be smaller than data on every axis, and of any size on the gather axis.
      indexShape: fc.tuple(...dataShape.map((d) => fc.integer({ min: 1, max: d + 2 }))),
    }))
  .map(({ dataShape, axis, indexShape }) => ({ dataShape, axis, indexShape: indexShape.map((d, i) => (i === axis ? d : Math.min(d, dataShape[i]))) }))
  .chain(({ dataShape, axis, indexShape }) =>
    fc.record({
      data: values(elementCount(dataShape)).map((v) => tensorOf('float32', dataShape, v)),
      indices: fc.array(fc.integer({ min: -dataShape[axis], max: dataShape[axis] - 1 }), { minLength: elementCount(indexShape), maxLength: elementCount(indexShape) })
        .map((v) => tensorOf('int64', indexShape, v)),
      axis: fc.constant(axis),
    }))
  .map(({ data, indices, axis }) => ({ opType: 'GatherElements' as const, data, indices, attributes: { axis } }));

const gatherNDCase: fc.Arbitrary<Case> = fc
  .array(fc.integer({ min: 1, max: 4 }), { minLength: 1, maxLength: 3 })
  .chain((dataShape) =>
    fc.record({
      dataShape: fc.constant(dataShape),
      batchDims: fc.integer({ min: 0, max: dataShape.length - 1 }),
      extra: fc.array(fc.integer({ min: 1, max: 3 }), { maxLength: 2 }),
    }))
  .chain(({ dataShape, batchDims, extra }) =>
    fc.integer({ min: 1, max: dataShape.length - batchDims }).map((depth) => ({ dataShape, batchDims, extra, depth })))
  .chain(({ dataShape, batchDims, extra, depth }) => {
    const indexShape = [...dataShape.slice(0, batchDims), ...extra, depth];
    const tuples = elementCount(indexShape) / depth;
    return fc.record({
      data: values(elementCount(dataShape)).map((v) => tensorOf('float32', dataShape, v)),
      indices: fc.array(fc.tuple(...dataShape.slice(batchDims, batchDims + depth).map((d) => fc.integer({ min: -d, max: d - 1 }))), { minLength: tuples, maxLength: tuples })
        .map((t) => tensorOf('int64', indexShape, t.flat())),
      batchDims: fc.constant(batchDims),
    });
  })
  .map(({ data, indices, batchDims }) => ({ opType: 'GatherND' as const, data, indices, attributes: { batch_dims: batchDims } }));

/** The folded value, from a graph where both inputs are initializers. */
const folded = (c: Case): Tensor => {
  const b = new GraphBuilder('fold', 18);
  const out = b.op(c.opType, [b.initializer('data', c.data), b.initializer('indices', c.indices)], c.attributes);
  b.output(out);
  const analyzed = analyzeGraph(b.build());
  if (E.isLeft(analyzed)) throw new Error(JSON.stringify(analyzed.left));
  expect(analyzed.right.folded.size).toBe(1);
  return analyzed.right.constants.get(out)!.tensor;
};

/** The same node on ONNX Runtime, with both tensors as run-time inputs. */
const onOrt = async (c: Case, shape: readonly number[]): Promise<Tensor> => {
  const node: Node = { name: 'n', opType: c.opType, domain: '', inputs: ['data', 'indices'], outputs: ['y'], attributes: Object.fromEntries(Object.entries(c.attributes).map(([k, v]) => [k, { kind: 'int', value: v }])) };
  using session = await FallbackSession.create({
    name: 'gather', opset: 18, nodes: [node],
    inputs: [{ name: 'data', type: { dtype: 'float32', shape: c.data.shape } }, { name: 'indices', type: { dtype: 'int64', shape: c.indices.shape } }],
    outputs: [{ name: 'y', type: { dtype: 'float32', shape } }],
    initializers: new Map(),
  });
  return (await session.run(new Map([['data', c.data], ['indices', c.indices]]))).get('y')!;
};

describe('folding gathers of constants', () => {
  test.prop([fc.oneof(gatherElementsCase, gatherNDCase)], { numRuns: 60 })('equals ONNX Runtime', async (c) => {
    const ours = folded(c);
    const theirs = await onOrt(c, ours.shape);
    expect(ours.shape).toEqual(theirs.shape);
    expect(Array.from(ours.data as Float32Array)).toEqual(Array.from(theirs.data as Float32Array));
  });

  test.prop([gatherElementsCase], { numRuns: 20 })('an index out of range is not folded (left to run time)', (c) => {
    const dim = c.data.shape[c.attributes.axis];
    const bad = { ...c, indices: tensorOf('int64', c.indices.shape, Array.from({ length: elementCount(c.indices.shape) }, () => dim)) };
    const b = new GraphBuilder('fold', 18);
    const out = b.op(bad.opType, [b.initializer('data', bad.data), b.initializer('indices', bad.indices)], bad.attributes);
    b.output(out);
    const analyzed = analyzeGraph(b.build());
    expect(E.isRight(analyzed) && analyzed.right.constants.has(out)).toBe(false);
  });
});
