/**
 * Derived weights found by value: a graph constant that an exporter computed from one checkpoint tensor
 * by gathering whole rows with constant indices, then permuting and reshaping (T5's relative attention
 * bias, which the dynamo exporter folds into a `[1, heads, q, k]` initializer from the `[buckets, heads]`
 * parameter). No operation survives in the graph, so folding provenance cannot see it; the value can.
 *
 * For a 2-D checkpoint tensor W whose rows (along either axis) have the length of some axis d of the
 * value V, every vector of V along d must be, bit for bit, one row of W, and that row must be the only
 * one with those bits (equal rows would make the indices a guess: after a refit they may differ). The result is
 * `transpose(gather(W, axis, indices), perm)`, exact by construction. Pure: reads the store only.
 */
import type { Expr } from './expr.js';
import { simplify } from './expr.js';
import type { F32Tensor } from './evaluate.js';
import { isFloatDtype, type TensorStore } from './store.js';

export interface DerivedGather {
  /** The checkpoint tensor the value is gathered from. */
  readonly source: string;
  readonly expr: Expr;
}

export interface DeriveOptions {
  /** Largest checkpoint tensor read as a candidate table (elements; default 2^22). */
  readonly maxSourceElements?: number;
  /** Most indices an expression may embed (default 2^16). */
  readonly maxIndices?: number;
}

const count = (shape: readonly number[]): number => shape.reduce((a, b) => a * b, 1);

/** Bits of `length` float32 values from `data`, `stride` apart, as a string key. */
const keyOf = (bits: Uint32Array, start: number, stride: number, length: number): string => {
  let s = '';
  for (let i = 0; i < length; i++) {
    const v = bits[start + i * stride];
    s += String.fromCharCode(v & 0xffff, v >>> 16);
  }
  return s;
};

const bitsOf = (a: Float32Array): Uint32Array => new Uint32Array(a.buffer, a.byteOffset, a.length);

/** V's vectors along axis d, in row-major order of the other axes: their keys, and the first value's bits of each. */
interface Vectors {
  readonly keys: readonly string[];
  readonly distinct: ReadonlySet<string>;
  readonly firsts: ReadonlySet<number>;
}

const vectorsAlong = (v: F32Tensor, d: number): Vectors => {
  const length = v.shape[d];
  const inner = count(v.shape.slice(d + 1));
  const outer = count(v.shape.slice(0, d));
  const bits = bitsOf(v.data);
  const keys: string[] = [];
  const firsts = new Set<number>();
  for (let o = 0; o < outer; o++) {
    for (let i = 0; i < inner; i++) {
      const start = o * length * inner + i;
      keys.push(keyOf(bits, start, inner, length));
      firsts.add(bits[start]);
    }
  }
  return { keys, distinct: new Set(keys), firsts };
};

/**
 * The row of W (along `axis`) holding each of V's vectors, or undefined when a vector is no row of W, or
 * is several rows (equal rows: which one to read after a refit would be a guess). Only rows whose first
 * value starts some vector are keyed, so a large table that does not match costs one pass of lookups.
 */
const rowsOf = (w: F32Tensor, axis: 0 | 1, vectors: Vectors): number[] | undefined => {
  const [r, c] = w.shape;
  const bits = bitsOf(w.data);
  const [n, length, stride, step] = axis === 0 ? [r, c, 1, c] : [c, r, c, 1];
  if (n < vectors.distinct.size) return undefined;
  const row = new Map<string, number>();
  for (let k = 0; k < n; k++) {
    if (!vectors.firsts.has(bits[k * step])) continue;
    const key = keyOf(bits, k * step, stride, length);
    if (vectors.distinct.has(key)) row.set(key, row.has(key) ? -1 : k);
  }
  const out: number[] = [];
  for (const key of vectors.keys) {
    const k = row.get(key);
    if (k === undefined || k < 0) return undefined;
    out.push(k);
  }
  return out;
};

/**
 * Every way `value` is rows of one checkpoint tensor gathered with constant indices (one entry per source
 * and layout; the caller settles several). Values with fewer than two elements, or whose vectors have
 * length 1, are not derived (any scalar of the checkpoint would do).
 */
export const deriveGatherByValue = (value: F32Tensor, store: TensorStore, options: DeriveOptions = {}): DerivedGather[] => {
  const maxSource = options.maxSourceElements ?? 1 << 22;
  const maxIndices = options.maxIndices ?? 1 << 16;
  const shape = value.shape;
  if (value.data.length < 2 || value.data.length !== count(shape)) return [];
  const along = new Map<number, Vectors>();
  const vectors = (d: number): Vectors => {
    const cached = along.get(d);
    if (cached !== undefined) return cached;
    const made = vectorsAlong(value, d);
    along.set(d, made);
    return made;
  };
  const found: DerivedGather[] = [];
  for (const [name, info] of store.tensors) {
    if (!isFloatDtype(info.dtype) || info.shape.length !== 2 || count(info.shape) > maxSource || count(info.shape) === 0) continue;
    const layouts = ([0, 1] as const).filter((axis) => {
      const length = info.shape[1 - axis];
      return length > 1 && shape.some((s) => s === length) && value.data.length / length <= maxIndices;
    });
    if (layouts.length === 0) continue;
    const w: F32Tensor = { shape: info.shape, data: store.toFloat32(name) };
    for (const axis of layouts) {
      const length = info.shape[1 - axis];
      shape.forEach((s, d) => {
        if (s !== length) return;
        const indices = rowsOf(w, axis, vectors(d));
        if (indices === undefined) return;
        const others = shape.filter((_, i) => i !== d);
        const otherAxes = shape.map((_, i) => i).filter((i) => i !== d);
        // gather along `axis` puts the indices' dimensions where the row axis was: axis 0 gives
        // [others..., row], axis 1 [row, others...]; perm puts the row dimension back at d.
        const labels = axis === 0 ? [...otherAxes, d] : [d, ...otherAxes];
        const perm = shape.map((_, i) => labels.indexOf(i));
        found.push({ source: name, expr: simplify({ op: 'transpose', perm, x: { op: 'gather', axis, indicesShape: others, indices, x: { op: 'source', name } } }) });
      });
    }
  }
  return found;
};

/**
 * The one derivation to use: the only one found, or the only one whose source lies under a module scope
 * of the value's readers (`<scope>.`); undefined when none or several remain (no guessing).
 */
export const settleDerived = (found: readonly DerivedGather[], scopes: readonly string[]): DerivedGather | undefined => {
  if (found.length === 1) return found[0];
  const scoped = found.filter((f) => scopes.some((s) => s !== '' && f.source.startsWith(`${s}.`)));
  return scoped.length === 1 ? scoped[0] : undefined;
};
