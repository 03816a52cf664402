/**
 * Provenance of a constant: which initializers it was computed from, and through which operations. A
 * weight that passes through constant folding (a transposed, cast or reshaped initializer) keeps this
 * record, so the weight map can trace an engine weight back to checkpoint tensors and refit it.
 */

export type Provenance =
  /** The value of a graph initializer, unchanged. */
  | { readonly kind: 'initializer'; readonly name: string }
  /** A value written in the graph itself (a Constant node or a tensor attribute): no checkpoint source. */
  | { readonly kind: 'literal'; readonly node: string }
  /** Derived from static tensor shapes only (Shape and what is computed from it). */
  | { readonly kind: 'shape'; readonly tensor: string }
  /** The output `output` of an operation applied to the inputs' values. */
  | {
      readonly kind: 'op';
      readonly opType: string;
      readonly node: string;
      readonly output: number;
      /** What the operation did, in resolved form (perm, to, shape, axis, ...). */
      readonly params: Readonly<Record<string, number | string | readonly number[]>>;
      readonly inputs: readonly Provenance[];
    };

/** The initializer names a constant was computed from, in first-seen order. */
export const provenanceSources = (p: Provenance): string[] => {
  const out: string[] = [];
  const walk = (q: Provenance): void => {
    if (q.kind === 'initializer') {
      if (!out.includes(q.name)) out.push(q.name);
    } else if (q.kind === 'op') q.inputs.forEach(walk);
  };
  walk(p);
  return out;
};

/** True when the value depends on some initializer, i.e. a refit could change it. */
export const isRefittable = (p: Provenance): boolean => provenanceSources(p).length > 0;

/** A compact, stable text form, e.g. `Transpose[perm=1,0](init:val_17)`. */
export const printProvenance = (p: Provenance): string => {
  switch (p.kind) {
    case 'initializer': return `init:${p.name}`;
    case 'literal': return `literal:${p.node}`;
    case 'shape': return `shape:${p.tensor}`;
    case 'op': {
      const params = Object.entries(p.params).map(([k, v]) => `${k}=${Array.isArray(v) ? v.join(',') : String(v)}`).join(';');
      return `${p.opType}[${params}](${p.inputs.map(printProvenance).join(', ')})`;
    }
  }
};
