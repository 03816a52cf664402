/** The quantization stage's tagged errors: each names the checkpoint tensor and what was expected. */
export type QuantIssue =
  | { readonly _tag: 'MissingQuantizedWeight'; readonly tensor: string; readonly detail: string }
  | { readonly _tag: 'BadQuantizedTensor'; readonly tensor: string; readonly expected: string; readonly found: string }
  | { readonly _tag: 'FormatMismatch'; readonly tensor: string; readonly layer: string; readonly engine: string; readonly checkpoint: string }
  | { readonly _tag: 'ShapeMismatch'; readonly tensor: string; readonly expected: string; readonly found: string }
  | { readonly _tag: 'GroupSizeMismatch'; readonly tensor: string; readonly expected: string; readonly found: string }
  | { readonly _tag: 'AsymmetricUnsupported'; readonly tensor: string; readonly layer: string }
  | { readonly _tag: 'BadWeightFormat'; readonly text: string; readonly detail: string }
  | { readonly _tag: 'RefitFailed'; readonly tensor: string; readonly detail: string };
export type QuantTag = QuantIssue['_tag'];

export const describeQuantIssue = (i: QuantIssue): string => {
  switch (i._tag) {
    case 'MissingQuantizedWeight':
      return `${i.tensor}: ${i.detail}`;
    case 'BadQuantizedTensor':
    case 'ShapeMismatch':
    case 'GroupSizeMismatch':
      return `${i.tensor}: expected ${i.expected}, found ${i.found}`;
    case 'FormatMismatch':
      return `${i.tensor}: the engine holds layer '${i.layer}' as ${i.engine}, the checkpoint gives ${i.checkpoint}`;
    case 'AsymmetricUnsupported':
      return `${i.tensor}: non-zero weight_zero_point (asymmetric quantization) cannot be loaded into the quantized kernel of layer '${i.layer}'; build that layer in a float format to take it dequantized`;
    case 'BadWeightFormat':
      return `--weight-format '${i.text}': ${i.detail}`;
    case 'RefitFailed':
      return `${i.tensor}: ${i.detail}`;
  }
};

export class QuantError extends Error {
  override readonly name = 'QuantError';
  readonly _tag: QuantTag;
  constructor(readonly issue: QuantIssue) {
    super(describeQuantIssue(issue));
    this._tag = issue._tag;
  }
}
