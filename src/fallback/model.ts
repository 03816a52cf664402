/**
 * A fallback segment as a small ONNX model: its nodes as they were, its run-time inputs and outputs,
 * and every constant it reads as an initializer supplied from our side (so new weights can be put in
 * by re-encoding). Pure: graph data in, ModelProto bytes out.
 */
import { ModelProtoType, OnnxAttributeType } from '../trace/onnx-schema.js';
import { dtypeToOnnx } from '../trace/decode.js';
import { toBytes, type Attribute, type Node, type Tensor, type TensorType } from '../trace/ir.js';

export interface SegmentModelSpec {
  readonly name: string;
  readonly opset: number;
  readonly nodes: readonly Node[];
  readonly inputs: readonly { readonly name: string; readonly type: TensorType }[];
  readonly outputs: readonly { readonly name: string; readonly type: TensorType }[];
  readonly initializers: ReadonlyMap<string, Tensor>;
}

const utf8 = new TextEncoder();

const tensorProto = (name: string, t: Tensor) => ({
  name,
  dims: [...t.shape],
  dataType: dtypeToOnnx(t.dtype),
  rawData: toBytes(t.data),
});

const attributeProto = (name: string, a: Attribute) => {
  switch (a.kind) {
    case 'float': return { name, type: OnnxAttributeType.FLOAT, f: a.value };
    case 'int': return { name, type: OnnxAttributeType.INT, i: a.value };
    case 'string': return { name, type: OnnxAttributeType.STRING, s: utf8.encode(a.value) };
    case 'tensor': return { name, type: OnnxAttributeType.TENSOR, t: tensorProto('', a.value) };
    case 'floats': return { name, type: OnnxAttributeType.FLOATS, floats: [...a.value] };
    case 'ints': return { name, type: OnnxAttributeType.INTS, ints: [...a.value] };
    case 'strings': return { name, type: OnnxAttributeType.STRINGS, strings: a.value.map((s) => utf8.encode(s)) };
  }
};

const valueInfo = (name: string, t: TensorType) => ({
  name,
  type: { tensorType: { elemType: dtypeToOnnx(t.dtype), shape: { dim: t.shape.map((d) => ({ dimValue: d })) } } },
});

export const encodeSegmentModel = (spec: SegmentModelSpec): Uint8Array => {
  const model = {
    irVersion: 8,
    producerName: 'trt-refit',
    opsetImport: [{ domain: '', version: spec.opset }],
    graph: {
      name: spec.name,
      node: spec.nodes.map((n) => ({
        name: n.name,
        opType: n.opType,
        domain: n.domain,
        input: [...n.inputs],
        output: [...n.outputs],
        attribute: Object.entries(n.attributes).map(([k, a]) => attributeProto(k, a)),
      })),
      initializer: [...spec.initializers].map(([name, t]) => tensorProto(name, t)),
      input: spec.inputs.map((i) => valueInfo(i.name, i.type)),
      output: spec.outputs.map((o) => valueInfo(o.name, o.type)),
    },
  };
  return ModelProtoType.encode(ModelProtoType.fromObject(model)).finish();
};
