import { describe, expect, it } from 'vitest';
import { test, fc } from '@fast-check/vitest';
import * as E from 'fp-ts/lib/Either.js';
import { mkdtempSync, readFileSync, writeFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { decodeOnnx } from '../src/trace/decode.js';
import { analyzeGraph } from '../src/trace/analyze.js';
import { loadOnnx, traceOnnx } from '../src/trace/load.js';
import { TraceError } from '../src/trace/errors.js';
import { GraphBuilder } from '../src/trace/builder.js';
import { tensorOf, toNumbers, type Graph } from '../src/trace/ir.js';
import { provenanceSources } from '../src/trace/provenance.js';
import { ModelProtoType } from '../src/trace/onnx-schema.js';
import { encodeSegmentModel } from '../src/fallback/model.js';
import { readSafetensors } from './support/h5-safetensors.js';

const fixtures = '/work/shared/fixtures';
const models = ['mlp', 'cnn_bn', 'bert_tiny', 'gpt2_tiny'].flatMap((m) =>
  ['model_dynamo.onnx', 'model_legacy.onnx'].map((f) => join(fixtures, m, f)).filter(existsSync));

const analyzeOk = (g: Graph, options = {}) => {
  const r = analyzeGraph(g, options);
  if (E.isLeft(r)) throw new Error(JSON.stringify(r.left));
  return r.right;
};
const analyzeTag = (g: Graph, options = {}) => {
  const r = analyzeGraph(g, options);
  return E.isLeft(r) ? r.left._tag : 'ok';
};

describe('ONNX import of the fixtures', () => {
  it.each(models)('%s imports and its output shape matches the expected output', async (path) => {
    const analyzed = await traceOnnx(path);
    const expected = readSafetensors(join(path, '..', 'expected_v1.safetensors')).output;
    const out = analyzed.types.get(analyzed.graph.outputs[0])!;
    expect(out.dtype).toBe('float32');
    expect(out.shape).toEqual(expected.shape);
    // Every node output got a type.
    for (const n of analyzed.graph.nodes) for (const o of n.outputs) if (o !== '') expect(analyzed.types.has(o)).toBe(true);
  });

  it('folds the transposed tied lm_head of gpt2 with its provenance', async () => {
    const analyzed = await traceOnnx(join(fixtures, 'gpt2_tiny/model_dynamo.onnx'));
    const folded = [...analyzed.constants.values()].filter((c) => c.provenance.kind === 'op');
    expect(folded.length).toBeGreaterThan(0);
    const lm = folded.find((c) => provenanceSources(c.provenance).includes('lm_head.weight'))!;
    expect(lm.provenance.kind === 'op' && lm.provenance.opType).toBe('Transpose');
    const source = analyzed.constants.get('lm_head.weight')!.tensor;
    const [rows, cols] = source.shape;
    expect(lm.tensor.shape).toEqual([cols, rows]);
    const s = source.data as Float32Array;
    const t = lm.tensor.data as Float32Array;
    for (let i = 0; i < rows; i += 7) for (let j = 0; j < cols; j += 5) expect(t[j * rows + i]).toBe(s[i * cols + j]);
  });
});

describe('malformed input', () => {
  const bytes = new Uint8Array(readFileSync(join(fixtures, 'mlp/model_dynamo.onnx')));

  it('refuses truncated files, empty files and non-protobuf bytes with typed errors', () => {
    const truncated = decodeOnnx(bytes.subarray(0, bytes.length - 100));
    expect(E.isLeft(truncated) && truncated.left._tag).toBe('MalformedModel');
    const empty = decodeOnnx(new Uint8Array());
    expect(E.isLeft(empty) && empty.left._tag).toBe('MalformedModel');
    const text = decodeOnnx(new TextEncoder().encode('this is not an onnx model at all'));
    expect(E.isLeft(text)).toBe(true);
  });

  it('loadOnnx rejects with a TraceError naming the file', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'h5-trace-'));
    const path = join(dir, 'bad.onnx');
    writeFileSync(path, bytes.subarray(0, 1000));
    await expect(loadOnnx(path)).rejects.toBeInstanceOf(TraceError);
    await expect(loadOnnx(join(dir, 'missing.onnx'))).rejects.toThrow(/missing\.onnx/);
  });

  // Fuzzed fixture bytes: the importer answers Right or a tagged Left, and never throws.
  test.prop([fc.constantFrom(...models), fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 20 }), fc.option(fc.nat())], { numRuns: Number(process.env.TRT_REFIT_FUZZ ?? 0) > 0 ? 2000 : 60 })(
    'fuzzed bytes give a clear error, never a crash',
    (path, edits, cut) => {
      const original = readFileSync(path);
      const mutated = new Uint8Array(original);
      for (const [at, value] of edits) mutated[at % mutated.length] = value;
      const input = cut === null ? mutated : mutated.subarray(0, cut % mutated.length);
      const decoded = decodeOnnx(input);
      if (E.isLeft(decoded)) {
        expect(typeof decoded.left._tag).toBe('string');
        return;
      }
      const analyzed = analyzeGraph(decoded.right);
      if (E.isLeft(analyzed)) expect(typeof analyzed.left._tag).toBe('string');
    },
  );

  it('refuses opsets outside 13 to 21 and unknown operators', () => {
    const spec = (opset: number, opType: string) => encodeSegmentModel({
      name: 'g', opset, nodes: [{ name: 'n', opType, domain: '', inputs: ['x'], outputs: ['y'], attributes: {} }],
      inputs: [{ name: 'x', type: { dtype: 'float32', shape: [2] } }], outputs: [{ name: 'y', type: { dtype: 'float32', shape: [2] } }], initializers: new Map(),
    });
    const old = decodeOnnx(spec(12, 'Relu'));
    expect(E.isLeft(old) && old.left).toMatchObject({ _tag: 'UnsupportedOpset', version: 12 });
    const future = decodeOnnx(spec(22, 'Relu'));
    expect(E.isLeft(future) && future.left._tag).toBe('UnsupportedOpset');
    const unknown = decodeOnnx(spec(18, 'FancyOp'));
    expect(E.isRight(unknown)).toBe(true);
    if (E.isRight(unknown)) expect(analyzeTag(unknown.right)).toBe('UnsupportedOperator');
  });

  it('asks for input shapes where dimensions are symbolic, and checks given ones', () => {
    const b = new GraphBuilder('g', 18);
    const x = b.input('x', 'float32', ['batch', 4]);
    b.output(b.op('Relu', [x]));
    const g = b.build();
    expect(analyzeTag(g)).toBe('UnresolvedShape');
    expect(analyzeOk(g, { inputShapes: { x: [3, 4] } }).types.get(g.outputs[0])!.shape).toEqual([3, 4]);
    expect(analyzeTag(g, { inputShapes: { x: [3, 5] } })).toBe('UnresolvedShape');
  });

  it('names a reshape whose target is computed at run time', () => {
    const b = new GraphBuilder('g', 18);
    const x = b.input('x', 'float32', [2, 3]);
    const s = b.input('s', 'int64', [2]);
    b.output(b.op('Reshape', [x, s]));
    const r = analyzeGraph(b.build());
    expect(E.isLeft(r) && r.left).toMatchObject({ _tag: 'UnresolvedShape' });
    expect(E.isLeft(r) && JSON.stringify(r.left)).toMatch(/target shape/);
  });

  it('reports bad wiring: unknown tensors, cycles, duplicates', () => {
    const base: Graph = { name: 'g', opset: 18, inputs: [{ name: 'x', dtype: 'float32', shape: [2] }], outputs: ['b'], initializers: [], nodes: [] };
    const relu = (name: string, input: string, output: string) => ({ name, opType: 'Relu', domain: '', inputs: [input], outputs: [output], attributes: {} });
    expect(analyzeTag({ ...base, nodes: [relu('n', 'nope', 'b')] })).toBe('UnknownTensor');
    expect(analyzeTag({ ...base, nodes: [relu('n1', 'a', 'b'), relu('n2', 'x', 'a')] })).toBe('NotTopological');
    expect(analyzeTag({ ...base, nodes: [relu('n1', 'x', 'b'), relu('n2', 'x', 'b')] })).toBe('DuplicateTensor');
    expect(analyzeTag({ ...base, outputs: ['zzz'] })).toBe('UnknownTensor');
  });
});

describe('external data', () => {
  it('reads initializers from a file beside the model, and refuses paths that leave its directory', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'h5-ext-'));
    const weights = Float32Array.from([1.5, -2, 3.25, 4, 5, 6]);
    writeFileSync(join(dir, 'weights.bin'), Buffer.concat([Buffer.alloc(8), Buffer.from(weights.buffer)]));
    const model = (location: string) => ({
      irVersion: 8,
      opsetImport: [{ domain: '', version: 17 }],
      graph: {
        name: 'ext',
        node: [{ name: 'mm', opType: 'MatMul', input: ['x', 'w'], output: ['y'] }],
        initializer: [{ name: 'w', dims: [3, 2], dataType: 1, dataLocation: 1, externalData: [{ key: 'location', value: location }, { key: 'offset', value: '8' }, { key: 'length', value: '24' }] }],
        input: [{ name: 'x', type: { tensorType: { elemType: 1, shape: { dim: [{ dimValue: 1 }, { dimValue: 3 }] } } } }],
        output: [{ name: 'y', type: { tensorType: { elemType: 1, shape: { dim: [{ dimValue: 1 }, { dimValue: 2 }] } } } }],
      },
    });
    writeFileSync(join(dir, 'model.onnx'), ModelProtoType.encode(ModelProtoType.fromObject(model('weights.bin'))).finish());
    const g = await loadOnnx(join(dir, 'model.onnx'));
    expect(Array.from(g.initializers[0].tensor.data as Float32Array)).toEqual(Array.from(weights));
    expect(g.initializers[0].tensor.shape).toEqual([3, 2]);

    writeFileSync(join(dir, 'escape.onnx'), ModelProtoType.encode(ModelProtoType.fromObject(model('../weights.bin'))).finish());
    await expect(loadOnnx(join(dir, 'escape.onnx'))).rejects.toMatchObject({ _tag: 'ExternalData' });
    writeFileSync(join(dir, 'absent.onnx'), ModelProtoType.encode(ModelProtoType.fromObject(model('nothere.bin'))).finish());
    await expect(loadOnnx(join(dir, 'absent.onnx'))).rejects.toThrow(/nothere\.bin/);
  });
});

describe('shape inference across opsets', () => {
  const reduceGraph = (opset: number) => {
    const b = new GraphBuilder('g', opset);
    const x = b.input('x', 'float32', [2, 3, 4]);
    if (opset >= 18) b.output(b.op('ReduceMean', [x, b.constant('axes', 'int64', [1], [1])], { keepdims: 0 }));
    else b.output(b.op('ReduceMean', [x], { axes: [1], keepdims: 0 }));
    return b.build();
  };
  it('ReduceMean takes axes as an attribute before 18 and as an input from 18', () => {
    for (const opset of [13, 17, 18, 21]) {
      const g = reduceGraph(opset);
      expect(analyzeOk(g).types.get(g.outputs[0])!.shape).toEqual([2, 4]);
    }
  });

  it('Squeeze and Unsqueeze take axes inputs; Split takes sizes or num_outputs', () => {
    const b = new GraphBuilder('g', 18);
    const x = b.input('x', 'float32', [1, 6, 1]);
    const squeezed = b.op('Squeeze', [x, b.constant('a', 'int64', [1], [-1])]);
    const un = b.op('Unsqueeze', [squeezed, b.constant('u', 'int64', [2], [0, 3])]);
    const [p, q] = b.node('Split', [x, b.constant('sizes', 'int64', [2], [2, 4])], { axis: 1 }, 2);
    const [r, s, t] = b.node('Split', [x], { axis: 1, num_outputs: 3 }, 3);
    const g = b.build();
    const a = analyzeOk(g);
    expect(a.types.get(squeezed)!.shape).toEqual([1, 6]);
    expect(a.types.get(un)!.shape).toEqual([1, 1, 6, 1]);
    expect([p, q].map((n) => a.types.get(n)!.shape)).toEqual([[1, 2, 1], [1, 4, 1]]);
    expect([r, s, t].map((n) => a.types.get(n)!.shape)).toEqual([[1, 2, 1], [1, 2, 1], [1, 2, 1]]);
  });

  it('Conv, MatMul broadcasting, Gather and GatherND', () => {
    const b = new GraphBuilder('g', 18);
    const x = b.input('x', 'float32', [2, 3, 9, 9]);
    const w = b.initializer('w', tensorOf('float32', [8, 3, 3, 3], new Array(216).fill(0.1)));
    const conv = b.op('Conv', [x, w], { strides: [2, 2], pads: [1, 1, 1, 1] });
    const m = b.op('MatMul', [b.input('a', 'float32', [5, 1, 2, 3]), b.input('c', 'float32', [4, 3, 7])]);
    const g1 = b.op('Gather', [b.input('e', 'float32', [10, 6]), b.input('ids', 'int64', [2, 5])], { axis: 0 });
    const g2 = b.op('GatherND', [b.input('d', 'float32', [2, 3, 4]), b.input('i', 'int64', [5, 2])]);
    const a = analyzeOk(b.build());
    expect(a.types.get(conv)!.shape).toEqual([2, 8, 5, 5]);
    expect(a.types.get(m)!.shape).toEqual([5, 4, 2, 7]);
    expect(a.types.get(g1)!.shape).toEqual([2, 5, 6]);
    expect(a.types.get(g2)!.shape).toEqual([5, 4]);
  });
});

describe('constant folding with provenance', () => {
  it('folds shape arithmetic and a cast, transposed, reshaped weight, recording every step', () => {
    const b = new GraphBuilder('g', 18);
    const x = b.input('x', 'float32', [2, 6]);
    const w = b.initializer('w', tensorOf('float64', [3, 2], [1, 2, 3, 4, 5, 6]));
    const cast = b.op('Cast', [w], { to: 1 });
    const t = b.op('Transpose', [cast], { perm: [1, 0] });
    const r = b.op('Reshape', [t, b.constant('shape', 'int64', [2], [6, 1])]);
    const y = b.op('MatMul', [x, r]);
    const shape = b.op('Shape', [y]);
    const n = b.op('Gather', [shape, b.constant('zero', 'int64', [], [0])], { axis: 0 });
    b.output(y);
    b.output(n);
    const a = analyzeOk(b.build());
    const folded = a.constants.get(r)!;
    // Transposing [[1,2],[3,4],[5,6]] gives [[1,3,5],[2,4,6]]; reshaped to a column.
    expect(Array.from(folded.tensor.data as Float32Array)).toEqual([1, 3, 5, 2, 4, 6]);
    expect(folded.tensor.dtype).toBe('float32');
    expect(provenanceSources(folded.provenance)).toEqual(['w']);
    const chain: string[] = [];
    for (let p = folded.provenance; p.kind === 'op'; p = p.inputs[0]) chain.push(`${p.opType}:${JSON.stringify(p.params)}`);
    expect(chain).toEqual(['Reshape:{"shape":[6,1],"input1":[6,1]}', 'Transpose:{"perm":[1,0]}', 'Cast:{"to":"float32"}']);
    expect(toNumbers(a.constants.get(n)!.tensor)).toEqual([2]);
    expect(provenanceSources(a.constants.get(n)!.provenance)).toEqual([]);
    expect(a.folded.has(b.build().nodes[3].name)).toBe(false); // the MatMul reads the run-time x
  });

  it('with folding off, only initializers are constants', () => {
    const b = new GraphBuilder('g', 18);
    const w = b.initializer('w', tensorOf('float32', [2, 2], [1, 2, 3, 4]));
    const x = b.input('x', 'float32', [2, 2]);
    b.output(b.op('Add', [x, b.op('Transpose', [w])]));
    const a = analyzeOk(b.build(), { fold: false });
    expect([...a.constants.keys()]).toEqual(['w']);
    expect(a.folded.size).toBe(0);
  });
});
