/**
 * Integer apportionment by largest remainder (Hamilton's method): `total` split over parts in proportion to
 * their weights, summing exactly to `total`. Exact arithmetic in BigInt, so byte counts past 2^53 / weight
 * products never round. Ties in remainder go to the earlier part, so the split is deterministic.
 */

/** Shares of `total` in proportion to `weights` (non-negative integers). Each share is the floor of its
 *  exact quota, plus one for the parts with the largest remainders until the sum is exact; so every share
 *  is within 1 of its quota, and at most its weight when total <= sum(weights). All zeros when every
 *  weight is 0 and total is 0. Throws RangeError on bad input (a caller bug, not a user error). */
export const apportion = (total: number | bigint, weights: readonly (number | bigint)[]): bigint[] => {
  const t = BigInt(total);
  const w = weights.map((x) => BigInt(x));
  if (t < 0n) throw new RangeError(`apportion: total ${t} is negative`);
  if (w.some((x) => x < 0n)) throw new RangeError('apportion: a weight is negative');
  const sum = w.reduce((a, b) => a + b, 0n);
  if (sum === 0n) {
    if (t !== 0n) throw new RangeError(`apportion: cannot split ${t} over parts that all weigh 0`);
    return w.map(() => 0n);
  }
  const shares = w.map((x) => (t * x) / sum);
  const remainders = w.map((x) => (t * x) % sum);
  let left = t - shares.reduce((a, b) => a + b, 0n); // < number of parts
  const order = w.map((_, i) => i).sort((a, b) => (remainders[b] > remainders[a] ? 1 : remainders[b] < remainders[a] ? -1 : a - b));
  for (const i of order) {
    if (left === 0n) break;
    shares[i] += 1n;
    left -= 1n;
  }
  return shares;
};

/** apportion for byte counts that fit a double exactly. */
export const apportionBytes = (total: number, weights: readonly number[]): number[] => apportion(total, weights).map(Number);
