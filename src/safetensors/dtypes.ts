/**
 * The safetensors dtypes, in the order of the reference implementation's Dtype enum. That order is also
 * the writer's layout order (descending, then by name), so it is data, not decoration.
 */
export const dtypes = [
  'BOOL',
  'F4',
  'F6_E2M3',
  'F6_E3M2',
  'U8',
  'I8',
  'F8_E5M2',
  'F8_E4M3',
  'F8_E8M0',
  'F8_E4M3FNUZ',
  'F8_E5M2FNUZ',
  'I16',
  'U16',
  'F16',
  'BF16',
  'I32',
  'U32',
  'F32',
  'C64',
  'F64',
  'I64',
  'U64',
] as const;

export type Dtype = (typeof dtypes)[number];

const dtypeRank = new Map<string, number>(dtypes.map((d, i) => [d, i]));

export const isDtype = (name: string): name is Dtype => dtypeRank.has(name);

/** Position in the reference enum (the writer sorts by it, descending). */
export const dtypeOrder = (dtype: Dtype): number => dtypeRank.get(dtype) as number;

/** Bits of one element. F4 and F6 pack several elements per byte. */
export const dtypeBits = (dtype: Dtype): number => {
  switch (dtype) {
    case 'F4':
      return 4;
    case 'F6_E2M3':
    case 'F6_E3M2':
      return 6;
    case 'BOOL':
    case 'U8':
    case 'I8':
    case 'F8_E5M2':
    case 'F8_E4M3':
    case 'F8_E8M0':
    case 'F8_E4M3FNUZ':
    case 'F8_E5M2FNUZ':
      return 8;
    case 'I16':
    case 'U16':
    case 'F16':
    case 'BF16':
      return 16;
    case 'I32':
    case 'U32':
    case 'F32':
      return 32;
    case 'C64':
    case 'F64':
    case 'I64':
    case 'U64':
      return 64;
  }
};

/** The libtrtshim dtype code (trtshim_dtype) for dtypes the native library knows. */
export const trtshimDtypeCode = (dtype: Dtype): number | undefined => nativeCodes[dtype];

const nativeCodes: Partial<Record<Dtype, number>> = {
  F32: 0,
  F16: 1,
  BF16: 2,
  I32: 3,
  I64: 4,
  I8: 5,
  U8: 6,
  BOOL: 7,
  F8_E4M3: 8,
  F8_E5M2: 9,
  F64: 10,
};

const TWO_64 = 1n << 64n;

/** Element count of a shape; undefined when it does not fit an unsigned 64-bit integer (as the
 *  reference computes it with checked multiplication). */
export const elementCount = (shape: readonly number[]): bigint | undefined => {
  let count = 1n;
  for (const dim of shape) {
    count *= BigInt(dim);
    if (count >= TWO_64) return undefined;
  }
  return count;
};

/** Bytes of `shape` elements of `dtype`: a bigint, or a string naming the rule it breaks. */
export const byteSize = (dtype: Dtype, shape: readonly number[]): bigint | 'overflow' | 'misaligned' => {
  const count = elementCount(shape);
  if (count === undefined) return 'overflow';
  const bits = count * BigInt(dtypeBits(dtype));
  if (bits >= TWO_64) return 'overflow';
  if (bits % 8n !== 0n) return 'misaligned';
  return bits / 8n;
};
