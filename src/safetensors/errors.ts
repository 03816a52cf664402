/**
 * The safetensors stage's one error union. Every refusal names the file, the tensor where there is one,
 * and the rule (the tag); `detail` says what was expected against what was found.
 */

/** Refusals of a file's header and layout: the reference implementation's checks plus the strict ones. */
export type HeaderRule =
  | 'HeaderTooSmall' // file under 8 bytes
  | 'HeaderTooLarge' // header length over 100,000,000
  | 'HeaderPastEnd' // header length runs past the end of the file
  | 'HeaderNotUtf8'
  | 'HeaderStart' // strict: header does not start with '{'
  | 'InvalidJson'
  | 'InvalidHeaderSchema' // JSON of the wrong shape: not an object, missing field, bad shape or offsets
  | 'UnknownDtype'
  | 'InvalidMetadata' // __metadata__ not an object of strings
  | 'UnknownField' // strict: a tensor entry has a field other than dtype, shape, data_offsets
  | 'DuplicateName' // strict: a tensor or metadata key appears twice
  | 'UnsupportedDimension' // a dimension or offset above 2^53 (valid for the reference, not representable here)
  | 'InvalidOffsets' // end before start
  | 'DataGap' // data not starting at 0, or bytes between two tensors
  | 'DataOverlap'
  | 'ShapeOverflow'
  | 'MisalignedSlice' // element bits times count not a whole number of bytes
  | 'SpanMismatch' // end - start differs from the shape's byte size
  | 'Truncated' // file shorter than 8 + header + data
  | 'TrailingBytes'; // file longer than 8 + header + data

export type SafetensorsIssue =
  | { readonly _tag: HeaderRule; readonly file: string; readonly tensor?: string; readonly detail: string }
  | { readonly _tag: 'FileError'; readonly file: string; readonly detail: string }
  | { readonly _tag: 'Closed'; readonly file: string; readonly detail: string }
  | { readonly _tag: 'NoSuchTensor'; readonly file: string; readonly tensor: string; readonly detail: string }
  | { readonly _tag: 'NoConversion'; readonly file: string; readonly tensor?: string; readonly detail: string }
  | { readonly _tag: 'TensorTooLarge'; readonly file: string; readonly tensor: string; readonly detail: string }
  | { readonly _tag: 'InvalidTensor'; readonly file: string; readonly tensor: string; readonly detail: string }
  | { readonly _tag: 'WriteFailed'; readonly file: string; readonly tensor?: string; readonly detail: string };

export type SafetensorsTag = SafetensorsIssue['_tag'];

export const describeIssue = (issue: SafetensorsIssue): string =>
  `${issue.file}${'tensor' in issue && issue.tensor !== undefined ? `: tensor '${issue.tensor}'` : ''}: ${issue._tag}: ${issue.detail}`;

/** The rejection of every public safetensors function. */
export class SafetensorsError extends Error {
  override readonly name = 'SafetensorsError';
  readonly _tag: SafetensorsTag;
  readonly file: string;
  readonly tensor: string | undefined;
  readonly detail: string;
  constructor(readonly issue: SafetensorsIssue) {
    super(describeIssue(issue));
    this._tag = issue._tag;
    this.file = issue.file;
    this.tensor = 'tensor' in issue ? issue.tensor : undefined;
    this.detail = issue.detail;
  }
}

export const issue = <T extends SafetensorsTag>(
  _tag: T,
  file: string,
  detail: string,
  tensor?: string,
): SafetensorsIssue => ({ _tag, file, detail, ...(tensor === undefined ? {} : { tensor }) }) as SafetensorsIssue;
