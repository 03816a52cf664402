/**
 * The trace stage's errors: one tagged union, and the exported class that Promise-returning functions
 * reject with. Every message names the file, node, tensor or line and what was expected against found.
 */

export type TraceErrorDetail =
  | { readonly _tag: 'MalformedModel'; readonly reason: string }
  | { readonly _tag: 'UnsupportedOpset'; readonly domain: string; readonly version: number }
  | { readonly _tag: 'UnsupportedOperator'; readonly node: string; readonly opType: string; readonly reason: string }
  | { readonly _tag: 'UnsupportedDataType'; readonly tensor: string; readonly dataType: string }
  | { readonly _tag: 'UnknownTensor'; readonly node: string; readonly tensor: string }
  | { readonly _tag: 'DuplicateTensor'; readonly tensor: string }
  | { readonly _tag: 'NotTopological'; readonly node: string; readonly tensor: string }
  | { readonly _tag: 'UnresolvedShape'; readonly tensor: string; readonly reason: string }
  | { readonly _tag: 'InvalidNode'; readonly node: string; readonly opType: string; readonly reason: string }
  | { readonly _tag: 'ExternalData'; readonly tensor: string; readonly file: string; readonly reason: string }
  | { readonly _tag: 'ParseError'; readonly line: number; readonly reason: string };

export type TraceErrorTag = TraceErrorDetail['_tag'];

export const describeTraceError = (e: TraceErrorDetail): string => {
  switch (e._tag) {
    case 'MalformedModel': return `malformed ONNX model: ${e.reason}`;
    case 'UnsupportedOpset': return `unsupported opset: domain '${e.domain || 'ai.onnx'}' version ${e.version} (supported: ai.onnx 13 to 21)`;
    case 'UnsupportedOperator': return `node '${e.node}': unsupported operator ${e.opType}: ${e.reason}`;
    case 'UnsupportedDataType': return `tensor '${e.tensor}': unsupported data type ${e.dataType}`;
    case 'UnknownTensor': return `node '${e.node}' reads tensor '${e.tensor}', which no input, initializer or node produces`;
    case 'DuplicateTensor': return `tensor '${e.tensor}' is defined more than once`;
    case 'NotTopological': return `node '${e.node}' reads '${e.tensor}' before it is produced (graph has a cycle or is not sorted)`;
    case 'UnresolvedShape': return `tensor '${e.tensor}': shape cannot be resolved: ${e.reason}`;
    case 'InvalidNode': return `node '${e.node}' (${e.opType}): ${e.reason}`;
    case 'ExternalData': return `tensor '${e.tensor}': external data file '${e.file}': ${e.reason}`;
    case 'ParseError': return `graph text, line ${e.line}: ${e.reason}`;
  }
};

export class TraceError extends Error {
  override readonly name = 'TraceError';
  readonly _tag: TraceErrorTag;
  constructor(readonly detail: TraceErrorDetail) {
    super(describeTraceError(detail));
    this._tag = detail._tag;
  }
}

export const invalid = (node: { name: string; opType: string }, reason: string): TraceErrorDetail => ({
  _tag: 'InvalidNode', node: node.name, opType: node.opType, reason,
});
