/**
 * Matching one graph value (an ONNX initializer, or a folded weight) to an expression over checkpoint
 * tensors: by name (exact, then normalized), then by value. Value matches are found through exact-value
 * fingerprints (fingerprint.ts) of the value and of its candidate transforms: identity or reshape,
 * transpose, slices and concatenations along the leading axis (a row index of the checkpoint), and
 * BatchNorm folds over the checkpoint's conv/bn pairs of matching shapes. Every candidate is confirmed
 * element by element (folds: within float32 rounding, see FOLD_TOLERANCE). Ties between equal-valued
 * checkpoint tensors are broken by similarity of names to hints (module scopes of the consuming nodes,
 * the initializer's name) and reported.
 */
import { transposeF32, bnScale, type F32Tensor } from './evaluate.js';
import { type Expr, source } from './expr.js';
import { fingerprint, hashRange, sameValues } from './fingerprint.js';
import { isFloatDtype, type TensorStore } from './store.js';

export type MatchMethod = 'name' | 'normalized-name' | 'value' | 'transpose' | 'rows' | 'bn-fold' | 'name-only';

export interface Match {
  readonly expr: Expr;
  readonly method: MatchMethod;
  /** Equal candidates that lost the tie-break (empty when the match was unique). */
  readonly alternatives: readonly string[];
}

/** Prefixes that wrappers add to parameter names (DataParallel, torch.compile, HF base models, PEFT). */
export const WRAPPER_PREFIXES: readonly string[] = ['module.', '_orig_mod.', 'base_model.model.', 'model.'];

export const normalizeName = (name: string, prefixes: readonly string[] = WRAPPER_PREFIXES): string => {
  let n = name;
  for (let changed = true; changed; ) {
    changed = false;
    for (const p of prefixes) {
      if (n.startsWith(p) && n.length > p.length) {
        n = n.slice(p.length);
        changed = true;
      }
    }
  }
  return n;
};

/**
 * Folds are confirmed within this many units in the last place of float32 (relative to each element's
 * magnitude, with the channel scale's magnitude as a floor): the exporter folds with its own operation
 * order, so results may differ from ours by a rounding or two.
 */
export const FOLD_TOLERANCE_ULPS = 8;
const ULP = 2 ** -23;
export const BN_EPSILONS: readonly number[] = [1e-5, 1e-3, 1e-4, 1e-6, 1e-12];

interface RowEntry {
  readonly name: string;
  readonly row: number;
}

interface BnGroup {
  readonly prefix: string;
  readonly gamma: string;
  readonly beta: string;
  readonly mean: string;
  readonly variance: string;
  readonly channels: number;
}

const count = (shape: readonly number[]): number => shape.reduce((a, b) => a * b, 1);
const push = (m: Map<string, string[]>, key: string, value: string): void => {
  const list = m.get(key);
  if (list) list.push(value);
  else m.set(key, [value]);
};
const sameShape = (a: readonly number[], b: readonly number[]): boolean => a.length === b.length && a.every((d, i) => d === b[i]);
const compare = (a: string, b: string): number => (a < b ? -1 : a > b ? 1 : 0);

/** Row view of a tensor: rank >= 2 splits the leading axis; rank 1 is one row. */
const rowsOf = (shape: readonly number[]): { rows: number; width: number } =>
  shape.length >= 2 ? { rows: shape[0], width: count(shape.slice(1)) } : { rows: 1, width: count(shape) };

/** Scores a candidate name against one group of hints: shared leading dotted components, then the role's suffix. */
export const nameScore = (candidate: string, hints: readonly string[], suffix?: string): number => {
  const c = normalizeName(candidate).split('.');
  let best = 0;
  for (const h of hints) {
    const parts = normalizeName(h).split('.');
    let k = 0;
    while (k < c.length && k < parts.length && c[k] === parts[k]) k++;
    const whole = k === parts.length ? 1 : 0;
    best = Math.max(best, k * 4 + whole * 2);
  }
  return best + (suffix !== undefined && c[c.length - 1] === suffix ? 1 : 0);
};

/** Scores against hint groups in priority order (a later group only breaks ties of the earlier ones). */
const groupScores = (candidate: string, groups: readonly (readonly string[])[], suffix?: string): number[] =>
  groups.map((g) => nameScore(candidate, g, suffix));

const compareScores = (a: readonly number[], b: readonly number[]): number => {
  for (let i = 0; i < Math.max(a.length, b.length); i++) if ((a[i] ?? 0) !== (b[i] ?? 0)) return (b[i] ?? 0) - (a[i] ?? 0);
  return 0;
};

/** Picks the best of equal candidates: highest name scores (group by group), then the first by name. */
export const pickByHints = (names: readonly string[], groups: readonly (readonly string[])[], suffix?: string): { chosen: string; alternatives: string[] } => {
  const scored = [...new Set(names)].map((n) => ({ n, s: groupScores(n, groups, suffix) })).sort((a, b) => compareScores(a.s, b.s) || compare(a.n, b.n));
  return { chosen: scored[0].n, alternatives: scored.slice(1).map((x) => x.n) };
};

export interface MatchRequest {
  /** The value's name in the graph (an initializer name), used for name matching when `byName`. */
  readonly name: string;
  readonly value: F32Tensor;
  /** Try the name first (false for values whose graph name is known to be shared or synthetic). */
  readonly byName: boolean;
  /** Names that resemble the right checkpoint tensor (module scopes, the graph name), in groups by priority. */
  readonly hints: readonly (readonly string[])[];
  /** The last name component the checkpoint tensor likely has (`weight`, `bias`). */
  readonly suffix?: string;
}

/** An index of a checkpoint's float tensors for matching; built once per weight map. */
export class CheckpointIndex {
  private readonly values = new Map<string, F32Tensor>();
  private readonly byHash = new Map<string, string[]>();
  private readonly rowIndexes = new Map<number, Map<string, RowEntry[]>>();
  private readonly byNormalized = new Map<string, string[]>();
  readonly widths: readonly number[];
  readonly bnGroups: readonly BnGroup[];

  constructor(readonly store: TensorStore, readonly prefixes: readonly string[] = WRAPPER_PREFIXES) {
    const names = [...store.tensors.keys()].sort(compare);
    const widths = new Set<number>();
    for (const name of names) {
      const info = store.tensors.get(name)!;
      if (!isFloatDtype(info.dtype)) continue;
      const t = { shape: info.shape, data: store.toFloat32(name) };
      this.values.set(name, t);
      const h = fingerprint(t.data);
      push(this.byHash, h, name);
      push(this.byNormalized, normalizeName(name, prefixes), name);
      const { width } = rowsOf(info.shape);
      if (width >= 2) widths.add(width);
    }
    this.widths = [...widths].sort((a, b) => b - a);
    const groups: BnGroup[] = [];
    for (const name of names) {
      if (!name.endsWith('running_mean')) continue;
      const prefix = name.slice(0, -'running_mean'.length);
      const [gamma, beta, variance] = ['weight', 'bias', 'running_var'].map((s) => prefix + s);
      const parts = [gamma, beta, variance].map((n) => this.values.get(n));
      const mean = this.values.get(name)!;
      if (parts.some((p) => p === undefined || p.data.length !== mean.data.length)) continue;
      groups.push({ prefix, gamma, beta, mean: name, variance, channels: mean.data.length });
    }
    this.bnGroups = groups;
  }

  names(): string[] {
    return [...this.values.keys()];
  }

  get(name: string): F32Tensor | undefined {
    return this.values.get(name);
  }

  private rowIndex(width: number): Map<string, RowEntry[]> {
    let index = this.rowIndexes.get(width);
    if (index !== undefined) return index;
    index = new Map();
    for (const [name, t] of this.values) {
      const r = rowsOf(t.shape);
      if (r.width !== width) continue;
      for (let row = 0; row < r.rows; row++) {
        const h = hashRange(t.data, row * width, (row + 1) * width);
        const list = index.get(h);
        if (list) list.push({ name, row });
        else index.set(h, [{ name, row }]);
      }
    }
    this.rowIndexes.set(width, index);
    return index;
  }

  private reshapeTo(e: Expr, from: readonly number[], to: readonly number[]): Expr {
    return sameShape(from, to) ? e : { op: 'reshape', shape: [...to], x: e };
  }

  /** Checkpoint tensors equal in value to `v` (any shape of the same size). */
  private equal(v: F32Tensor): string[] {
    return (this.byHash.get(fingerprint(v.data)) ?? []).filter((n) => {
      const t = this.values.get(n)!;
      return t.data.length === v.data.length && sameValues(t.data, 0, v.data, 0, v.data.length);
    });
  }

  private byName(req: MatchRequest): Match | undefined {
    const exact = this.values.get(req.name);
    const consider = (name: string, method: MatchMethod): Match | undefined => {
      const t = this.values.get(name)!;
      if (t.data.length !== req.value.data.length) return undefined;
      const equal = sameValues(t.data, 0, req.value.data, 0, t.data.length);
      return { expr: this.reshapeTo(source(name), t.shape, req.value.shape), method: equal ? method : 'name-only', alternatives: [] };
    };
    if (exact !== undefined) {
      const m = consider(req.name, 'name');
      if (m) return m;
    }
    const norm = normalizeName(req.name, this.prefixes);
    const candidates = [...(this.byNormalized.get(norm) ?? [])];
    // A wrapper prefix on either side that is not in the known list: match by dotted suffix.
    if (candidates.length === 0) {
      for (const n of this.values.keys()) {
        const nn = normalizeName(n, this.prefixes);
        if (nn.endsWith(`.${norm}`) || norm.endsWith(`.${nn}`)) candidates.push(n);
      }
    }
    if (candidates.length === 1) return consider(candidates[0], 'normalized-name');
    return undefined;
  }

  private rowsCover(v: F32Tensor, req: MatchRequest): Expr | undefined {
    const n = v.data.length;
    for (const width of this.widths) {
      if (n % width !== 0) continue;
      const index = this.rowIndex(width);
      const rows = n / width;
      const pieces: Expr[] = [];
      let i = 0;
      while (i < rows) {
        const cands = index.get(hashRange(v.data, i * width, (i + 1) * width)) ?? [];
        let best: { entry: RowEntry; len: number; score: number[] } | undefined;
        for (const entry of cands) {
          const t = this.values.get(entry.name)!;
          const available = rowsOf(t.shape).rows - entry.row;
          let len = 0;
          while (len < available && i + len < rows && sameValues(t.data, (entry.row + len) * width, v.data, (i + len) * width, width)) len++;
          if (len === 0) continue;
          const score = groupScores(entry.name, req.hints, req.suffix);
          const order = best === undefined ? -1 : len !== best.len ? best.len - len : compareScores(score, best.score) || compare(entry.name, best.entry.name);
          if (order < 0) best = { entry, len, score };
        }
        if (!best) {
          pieces.length = 0;
          break;
        }
        const t = this.values.get(best.entry.name)!;
        const total = rowsOf(t.shape).rows;
        const flat = this.reshapeTo(source(best.entry.name), t.shape, [total, width]);
        pieces.push(best.entry.row === 0 && best.len === total ? flat : { op: 'slice', axis: 0, start: best.entry.row, end: best.entry.row + best.len, x: flat });
        i += best.len;
      }
      if (pieces.length === 0) continue;
      const joined: Expr = pieces.length === 1 ? pieces[0] : { op: 'concat', axis: 0, xs: pieces };
      return this.reshapeTo(joined, [rows, width], v.shape);
    }
    return undefined;
  }

  private foldWeight(v: F32Tensor, req: MatchRequest): { expr: Expr; conv: string; bn: BnGroup; epsilon: number } | undefined {
    if (v.shape.length < 2) return undefined;
    const channels = v.shape[0];
    const inner = v.data.length / channels;
    const convs = [...this.values].filter(([, t]) => sameShape(t.shape, v.shape)).map(([n]) => n);
    const found: { expr: Expr; conv: string; bn: BnGroup; epsilon: number; score: number[] }[] = [];
    for (const bn of this.bnGroups) {
      if (bn.channels !== channels) continue;
      for (const epsilon of BN_EPSILONS) {
        const s = bnScale(this.values.get(bn.gamma)!.data, this.values.get(bn.variance)!.data, epsilon);
        for (const conv of convs) {
          const w = this.values.get(conv)!.data;
          if (!foldClose(w, s, inner, v.data)) continue;
          const expr: Expr = { op: 'bnFoldWeight', weight: source(conv), gamma: source(bn.gamma), variance: source(bn.variance), epsilon };
          found.push({ expr, conv, bn, epsilon, score: groupScores(conv, req.hints, 'weight') });
        }
        if (found.length > 0) break;
      }
    }
    found.sort((a, b) => compareScores(a.score, b.score) || compare(a.conv, b.conv));
    return found[0];
  }

  /** A folded bias, given the fold found for the same convolution's weight. */
  foldBias(v: F32Tensor, fold: { conv: string; bn: BnGroup; epsilon: number }): Expr | undefined {
    const { bn, epsilon } = fold;
    if (v.shape.length !== 1 || v.data.length !== bn.channels) return undefined;
    const s = bnScale(this.values.get(bn.gamma)!.data, this.values.get(bn.variance)!.data, epsilon);
    const beta = this.values.get(bn.beta)!.data;
    const mean = this.values.get(bn.mean)!.data;
    const biasName = fold.conv.endsWith('weight') ? `${fold.conv.slice(0, -'weight'.length)}bias` : undefined;
    const biasT = biasName !== undefined ? this.values.get(biasName) : undefined;
    for (const bias of [biasT?.data.length === bn.channels ? biasT : undefined, undefined]) {
      const b = bias?.data ?? new Float32Array(bn.channels);
      let ok = true;
      for (let c = 0; c < bn.channels && ok; c++) {
        const expected = Math.fround(Math.fround(Math.fround(b[c] - mean[c]) * s[c]) + beta[c]);
        ok = close(v.data[c], expected, Math.abs(s[c] * mean[c]) + Math.abs(beta[c]));
      }
      if (ok) {
        return {
          op: 'bnFoldBias', ...(bias ? { bias: source(biasName!) } : {}),
          gamma: source(bn.gamma), beta: source(bn.beta), mean: source(bn.mean), variance: source(bn.variance), epsilon,
        };
      }
    }
    return undefined;
  }

  /** The fold a weight expression describes, for pairing its bias. */
  foldOf(e: Expr): { conv: string; bn: BnGroup; epsilon: number } | undefined {
    if (e.op !== 'bnFoldWeight' || e.weight.op !== 'source' || e.gamma.op !== 'source') return undefined;
    const gamma = e.gamma.name;
    const bn = this.bnGroups.find((g) => g.gamma === gamma);
    return bn && { conv: e.weight.name, bn, epsilon: e.epsilon };
  }

  match(req: MatchRequest): Match | undefined {
    const v = req.value;
    let nameOnly: Match | undefined;
    if (req.byName) {
      const m = this.byName(req);
      if (m && m.method !== 'name-only') return m;
      nameOnly = m;
    }
    const equal = this.equal(v);
    if (equal.length > 0) {
      const { chosen, alternatives } = pickByHints(equal, req.hints, req.suffix);
      return { expr: this.reshapeTo(source(chosen), this.values.get(chosen)!.shape, v.shape), method: 'value', alternatives };
    }
    if (v.shape.length === 2) {
      const vt = transposeF32(v, [1, 0]);
      const equalT = this.equal(vt);
      if (equalT.length > 0) {
        const { chosen, alternatives } = pickByHints(equalT, req.hints, req.suffix);
        const t = this.values.get(chosen)!;
        return { expr: { op: 'transpose', perm: [1, 0], x: this.reshapeTo(source(chosen), t.shape, vt.shape) }, method: 'transpose', alternatives };
      }
    }
    const rows = this.rowsCover(v, req);
    if (rows) return { expr: rows, method: 'rows', alternatives: [] };
    if (v.shape.length === 2) {
      const vt = transposeF32(v, [1, 0]);
      const rowsT = this.rowsCover(vt, req);
      if (rowsT) return { expr: { op: 'transpose', perm: [1, 0], x: rowsT }, method: 'rows', alternatives: [] };
    }
    const fold = this.foldWeight(v, req);
    if (fold) return { expr: fold.expr, method: 'bn-fold', alternatives: [] };
    return nameOnly;
  }
}

const close = (got: number, expected: number, magnitude: number): boolean =>
  got === expected || Math.abs(got - expected) <= FOLD_TOLERANCE_ULPS * ULP * Math.max(Math.abs(expected), magnitude, 1e-30);

/** True when target == w * s per output channel, within float32 rounding; cheap rejection first. */
const foldClose = (w: Float32Array, s: Float32Array, inner: number, target: Float32Array): boolean => {
  for (let c = 0; c < s.length; c++) {
    const i = c * inner;
    if (!close(target[i], Math.fround(w[i] * s[c]), Math.abs(w[i] * s[c]))) return false;
  }
  for (let c = 0; c < s.length; c++) {
    for (let j = 0; j < inner; j++) {
      const i = c * inner + j;
      if (!close(target[i], Math.fround(w[i] * s[c]), Math.abs(w[i] * s[c]))) return false;
    }
  }
  return true;
};

