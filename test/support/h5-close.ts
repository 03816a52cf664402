import { expect } from 'vitest';
import type { Tensor } from '../../src/trace/ir.js';

/** Same shape, and every element within 1e-4 relative plus 1e-5 absolute of the expected one. */
export const expectClose = (got: Tensor, expected: Tensor, label?: string) => {
  expect(got.shape, label).toEqual(expected.shape);
  const g = got.data as Float32Array;
  const e = expected.data as Float32Array;
  expect(g.length, label).toBe(e.length);
  let worst = -Infinity;
  for (let i = 0; i < e.length; i++) worst = Math.max(worst, Math.abs(g[i] - e[i]) - (1e-5 + 1e-4 * Math.abs(e[i])));
  expect(worst, label === undefined ? undefined : `${label}: worst excess over 1e-4 rel + 1e-5 abs`).toBeLessThanOrEqual(0);
};
