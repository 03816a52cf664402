/**
 * Module scopes of ONNX nodes: where in the PyTorch module tree each node came from. They break ties when
 * several checkpoint tensors hold the same values (zero biases, unit LayerNorm scales) and the exporter
 * shared one initializer among them. The dynamo exporter writes the scope as node metadata
 * (`pkg.torch.onnx.name_scopes`, a Python list of cumulative module paths); the legacy exporter names
 * nodes by module path (`/encoder/layer.0/attention/self/query/MatMul`).
 * Pure: ONNX bytes in, node name -> module path out (only node names and metadata are decoded).
 */
import protobuf from 'protobufjs';

const descriptor = {
  nested: {
    scopes: {
      nested: {
        Entry: { fields: { key: { type: 'string', id: 1 }, value: { type: 'string', id: 2 } } },
        Node: { fields: { name: { type: 'string', id: 3 }, metadataProps: { rule: 'repeated', type: 'Entry', id: 9 } } },
        Graph: { fields: { node: { rule: 'repeated', type: 'Node', id: 1 } } },
        Model: { fields: { graph: { type: 'Graph', id: 7 } } },
      },
    },
  },
};
const ModelType = protobuf.Root.fromJSON(descriptor).lookupType('scopes.Model');

interface DecodedModel {
  graph?: { node?: { name?: string; metadataProps?: { key?: string; value?: string }[] }[] };
}

/** The deepest module path in a name_scopes list such as `['', 'embeddings', 'embeddings.LayerNorm', 'layer_norm']`. */
export const parseNameScopes = (value: string): string | undefined => {
  const items = [...value.matchAll(/'((?:[^'\\]|\\.)*)'/g)].map((m) => m[1]);
  // The last item is the operation's own name; the ones before are cumulative module paths.
  const modules = items.slice(0, -1).filter((s) => s !== '');
  return modules.length > 0 ? modules[modules.length - 1] : undefined;
};

/** `/encoder/layer.0/attention/self/query/MatMul` -> `encoder.layer.0.attention.self.query`. A component
 *  that repeats its parent's name with an index (`/stem/stem.0/Conv`, a Sequential's child) replaces it:
 *  `stem.0`, as the parameter is named `stem.0.weight`. */
export const legacyScope = (nodeName: string): string | undefined => {
  if (!nodeName.startsWith('/')) return undefined;
  const parts = nodeName.split('/').filter((p) => p !== '');
  if (parts.length <= 1) return undefined;
  const path: string[] = [];
  for (const part of parts.slice(0, -1)) {
    if (path.length > 0 && part.startsWith(`${path[path.length - 1]}.`)) path[path.length - 1] = part;
    else path.push(part);
  }
  return path.join('.');
};

export type NodeScopes = ReadonlyMap<string, string>;

export const nodeScopes = (onnxBytes: Uint8Array): NodeScopes => {
  const model = ModelType.toObject(ModelType.decode(onnxBytes)) as DecodedModel;
  const out = new Map<string, string>();
  for (const node of model.graph?.node ?? []) {
    const name = node.name ?? '';
    const meta = node.metadataProps?.find((p) => p.key === 'pkg.torch.onnx.name_scopes');
    const scope = (meta?.value !== undefined ? parseNameScopes(meta.value) : undefined) ?? legacyScope(name);
    if (scope !== undefined) out.set(name, scope);
  }
  return out;
};
