/**
 * A stable text form of the graph IR, one line per item: a keyword, then JSON values separated by tabs
 * (JSON escapes tabs inside strings, so splitting on tabs is safe). Tensor values are base64 of their
 * little-endian bytes, so the round trip is exact, NaN payloads included.
 *
 *   graph  "name"  18
 *   input  "x"  "float32"  [2,"batch"]
 *   init   "w"  "float32"  [3,4]  "base64..."
 *   node   "n0"  "MatMul"  ""  ["x","w"]  ["y"]  {"transB":{"int":1}}
 *   output "y"
 */
import * as t from 'io-ts';
import * as E from 'fp-ts/lib/Either.js';
import { allocate, bytesPerElement, dtypes, elementCount, fromBytes, toBytes, type Attribute, type DType, type Graph, type Initializer, type Node, type Tensor, type ValueInfo } from './ir.js';
import type { TraceErrorDetail } from './errors.js';

// JSON has no NaN, Infinity or -0; those travel as strings.
const encodeFloat = (v: number): number | string => (Number.isFinite(v) && !Object.is(v, -0) ? v : Object.is(v, -0) ? '-0' : String(v));
const decodeFloat = (v: number | string): number => (typeof v === 'number' ? v : Number(v));

const tensorJson = (x: Tensor) => ({ dtype: x.dtype, shape: x.shape, data: Buffer.from(toBytes(x.data)).toString('base64') });

const attributeJson = (a: Attribute): Record<string, unknown> => {
  switch (a.kind) {
    case 'float': return { float: encodeFloat(a.value) };
    case 'floats': return { floats: a.value.map(encodeFloat) };
    case 'tensor': return { tensor: tensorJson(a.value) };
    default: return { [a.kind]: a.value };
  }
};

const line = (keyword: string, ...fields: unknown[]): string => [keyword, ...fields.map((f) => JSON.stringify(f))].join('\t');

export const printGraph = (graph: Graph): string => {
  const out: string[] = [line('graph', graph.name, graph.opset)];
  for (const i of graph.inputs) out.push(line('input', i.name, i.dtype, i.shape));
  for (const i of graph.initializers) {
    const j = tensorJson(i.tensor);
    out.push(line('init', i.name, j.dtype, j.shape, j.data));
  }
  for (const n of graph.nodes) {
    const attrs = Object.fromEntries(Object.keys(n.attributes).sort().map((k) => [k, attributeJson(n.attributes[k])]));
    out.push(line('node', n.name, n.opType, n.domain, n.inputs, n.outputs, attrs));
  }
  for (const o of graph.outputs) out.push(line('output', o));
  return out.join('\n') + '\n';
};

// ---- parsing: io-ts codecs for every field -------------------------------------------------------------

const DTypeCodec = t.keyof(Object.fromEntries(dtypes.map((d) => [d, null])) as unknown as Record<DType, null>);
const FloatCodec = t.union([t.number, t.string]);
const ShapeCodec = t.array(t.number);
const TensorCodec = t.type({ dtype: DTypeCodec, shape: ShapeCodec, data: t.string });
const AttributeCodec = t.union([
  t.type({ float: FloatCodec }),
  t.type({ int: t.number }),
  t.type({ string: t.string }),
  t.type({ tensor: TensorCodec }),
  t.type({ floats: t.array(FloatCodec) }),
  t.type({ ints: t.array(t.number) }),
  t.type({ strings: t.array(t.string) }),
]);
const NodeHead = t.tuple([t.string, t.string, t.string, t.array(t.string), t.array(t.string)]);
const NodeAttributes = t.record(t.string, AttributeCodec);
// io-ts tuples stop at five members; a node line has six fields.
const NodeLine = new t.Type<unknown[], unknown[], unknown>(
  'NodeLine',
  (u): u is unknown[] => Array.isArray(u),
  (u, c) => (Array.isArray(u) && u.length === 6 && E.isRight(NodeHead.decode(u.slice(0, 5))) && E.isRight(NodeAttributes.decode(u[5])) ? t.success(u) : t.failure(u, c)),
  t.identity,
);
const lineCodecs = {
  graph: t.tuple([t.string, t.number]),
  input: t.tuple([t.string, DTypeCodec, t.array(t.union([t.number, t.string]))]),
  init: t.tuple([t.string, DTypeCodec, ShapeCodec, t.string]),
  node: NodeLine,
  output: t.tuple([t.string]),
} as const;

class ParseFailure {
  constructor(readonly line: number, readonly reason: string) {}
}

const tensorFrom = (lineNo: number, dtype: DType, shape: readonly number[], base64: string): Tensor => {
  if (shape.some((d) => !Number.isInteger(d) || d < 0)) throw new ParseFailure(lineNo, `invalid shape [${shape}]`);
  const bytes = Buffer.from(base64, 'base64');
  const expected = elementCount(shape) * bytesPerElement(dtype);
  if (bytes.byteLength !== expected) throw new ParseFailure(lineNo, `tensor data has ${bytes.byteLength} bytes; ${dtype}[${shape}] needs ${expected}`);
  return { dtype, shape, data: expected === 0 ? allocate(dtype, 0) : fromBytes(dtype, new Uint8Array(bytes)) };
};

const attributeFrom = (lineNo: number, raw: t.TypeOf<typeof AttributeCodec>): Attribute => {
  if ('float' in raw) return { kind: 'float', value: decodeFloat(raw.float) };
  if ('floats' in raw) return { kind: 'floats', value: raw.floats.map(decodeFloat) };
  if ('int' in raw) return { kind: 'int', value: raw.int };
  if ('ints' in raw) return { kind: 'ints', value: raw.ints };
  if ('string' in raw) return { kind: 'string', value: raw.string };
  if ('strings' in raw) return { kind: 'strings', value: raw.strings };
  return { kind: 'tensor', value: tensorFrom(lineNo, raw.tensor.dtype, raw.tensor.shape, raw.tensor.data) };
};

export const parseGraph = (text: string): E.Either<TraceErrorDetail, Graph> => {
  let header: { name: string; opset: number } | undefined;
  const inputs: ValueInfo[] = [];
  const initializers: Initializer[] = [];
  const nodes: Node[] = [];
  const outputs: string[] = [];
  try {
    text.split('\n').forEach((raw, index) => {
      const lineNo = index + 1;
      if (raw.trim() === '') return;
      const [keyword, ...fields] = raw.split('\t');
      if (!(keyword in lineCodecs)) throw new ParseFailure(lineNo, `unknown line kind '${keyword}'`);
      let values: unknown[];
      try {
        values = fields.map((f) => JSON.parse(f) as unknown);
      } catch (e) {
        throw new ParseFailure(lineNo, `a field is not JSON: ${(e as Error).message}`);
      }
      const codec = lineCodecs[keyword as keyof typeof lineCodecs] as unknown as t.Type<unknown[], unknown, unknown>;
      const decoded = codec.decode(values);
      if (E.isLeft(decoded)) throw new ParseFailure(lineNo, `fields do not fit a '${keyword}' line: ${JSON.stringify(values).slice(0, 200)}`);
      const v = decoded.right as never[];
      if (keyword !== 'graph' && header === undefined) throw new ParseFailure(lineNo, "the first line must be a 'graph' line");
      switch (keyword) {
        case 'graph':
          if (header !== undefined) throw new ParseFailure(lineNo, "a second 'graph' line");
          header = { name: v[0], opset: v[1] };
          break;
        case 'input': inputs.push({ name: v[0], dtype: v[1], shape: v[2] }); break;
        case 'init': initializers.push({ name: v[0], tensor: tensorFrom(lineNo, v[1], v[2], v[3]) }); break;
        case 'node': {
          const attrs = v[5] as t.TypeOf<typeof NodeAttributes>;
          const attributes = Object.fromEntries(Object.entries(attrs).map(([k, a]) => [k, attributeFrom(lineNo, a)]));
          nodes.push({ name: v[0], opType: v[1], domain: v[2], inputs: v[3], outputs: v[4], attributes });
          break;
        }
        case 'output': outputs.push(v[0]); break;
      }
    });
  } catch (e) {
    if (e instanceof ParseFailure) return E.left({ _tag: 'ParseError', line: e.line, reason: e.reason });
    throw e;
  }
  if (header === undefined) return E.left({ _tag: 'ParseError', line: 1, reason: "no 'graph' line" });
  return E.right({ name: header.name, opset: header.opset, inputs, outputs, initializers, nodes });
};
