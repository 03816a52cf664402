import { describe, expect, it } from 'vitest';
import { abiVersion, EXPECTED_ABI_VERSION, libraryVersion, native } from '../ffi/library.js';

describe('libtrtshim loading', () => {
  it('has the ABI version this side was written against', () => {
    expect(abiVersion()).toBe(EXPECTED_ABI_VERSION);
    expect(libraryVersion()).toMatch(/^\d+\.\d+\.\d+$/);
  });
  it('reports dtype sizes', () => {
    expect(native('trtshim_dtype_size')(0)).toBe(4);
    expect(native('trtshim_dtype_size')(1)).toBe(2);
    expect(native('trtshim_dtype_size')(99)).toBe(0);
  });
});
