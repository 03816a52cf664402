/**
 * Matching one graph value (an ONNX initializer, or a folded weight) to an expression over checkpoint
 * tensors: by name (exact, then normalized), then by value. Value matches are found through exact-value
 * fingerprints (fingerprint.ts) of the value and of its candidate transforms: identity or reshape,
 * transpose, slices and concatenations along the leading axis (a row index of the checkpoint), and
 * BatchNorm folds over the checkpoint's conv/bn pairs of matching shapes. Every candidate is confirmed
 * element by element (folds: within float32 rounding, see FOLD_TOLERANCE).
 *
 * Equal-valued candidates are never settled by guessing (name similarity, alphabetical order): evidence
 * decides, in order: the names that belong to this use of the value (the initializer's own name when no
 * other use shares it, the names of Identity nodes that alias it), then the module paths of the nodes
 * that read it (`<module>.<suffix>` must name the candidate exactly), then structure (a BatchNorm that
 * follows its convolution in the same module). Candidates with more than two distinct values that stay
 * equal are one tensor stored twice (tied weights): either serves, and the others are recorded so a
 * checkpoint where they differ is refused. Anything else is Ambiguous, for the user to settle (a map file).
 */
import { transposeF32, bnScale, type F32Tensor } from './evaluate.js';
import { exprSources, type Expr, source } from './expr.js';
import { fingerprint, hashRange, sameValues } from './fingerprint.js';
import { isFloatDtype, type TensorStore } from './store.js';

export type MatchMethod = 'name' | 'normalized-name' | 'value' | 'transpose' | 'rows' | 'bn-fold' | 'name-only' | 'map-file' | 'gather';

/** What settled a choice among equal-valued candidates. */
export type EvidenceKind = 'name' | 'alias' | 'scope' | 'module-order' | 'tied' | 'map-file';

export interface Settlement {
  readonly chosen: string;
  readonly by: EvidenceKind;
  /** Every equal-valued candidate, the chosen one included. */
  readonly candidates: readonly string[];
}

export interface Match {
  readonly expr: Expr;
  readonly method: MatchMethod;
  /** Equal candidates that were not chosen (empty when the match was unique). */
  readonly alternatives: readonly string[];
  /** How equal-valued candidates were told apart (absent when there was one candidate). */
  readonly settled?: readonly Settlement[];
}

/** Equal-valued candidates that the evidence cannot separate. */
export interface Ambiguity {
  readonly ambiguous: true;
  readonly candidates: readonly string[];
}

export const isAmbiguity = <T extends object>(m: T | Ambiguity | undefined): m is Ambiguity => m !== undefined && 'ambiguous' in m;

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

/** Scores a candidate name against hints: shared leading dotted components, then the role's suffix.
 *  Used only to order reports, never to choose. */
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

/** A value is degenerate when it holds at most two distinct values (a fill, a mask, a fresh init):
 *  equal degenerate tensors are different parameters that happen to agree, never proof of a tie. */
export const isDegenerate = (data: Float32Array): boolean => {
  if (data.length <= 1) return true;
  const first = data[0];
  let second: number | undefined;
  for (let i = 1; i < data.length; i++) {
    const x = data[i];
    if (x === first || Object.is(x, first) || x === second) continue;
    if (second === undefined) second = x;
    else return false;
  }
  return true;
};

/** What identifies one use of a value: its own names, and the module paths of its readers. */
export interface Evidence {
  /** Names that belong to this use alone: the initializer's name when it is not shared. */
  readonly names: readonly string[];
  /** Names of Identity nodes that alias this use (legacy exports recreate shared parameters this way). */
  readonly aliases: readonly string[];
  /** Module paths of the nodes that read this use. */
  readonly scopes: readonly string[];
}

export const noEvidence: Evidence = { names: [], aliases: [], scopes: [] };

const parentOf = (name: string): string => {
  const i = name.lastIndexOf('.');
  return i < 0 ? '' : name.slice(0, i);
};

/**
 * Chooses among equal-valued candidates by evidence only. `degenerate`: the shared value is a fill, so
 * equal candidates are not a tie. Returns the settlement, or the candidates when nothing decides.
 */
export const settle = (
  candidates: readonly string[],
  evidence: Evidence,
  suffix: string | undefined,
  degenerate: boolean,
  prefixes: readonly string[] = WRAPPER_PREFIXES,
): Settlement | Ambiguity => {
  const unique = [...new Set(candidates)].sort(compare);
  const norm = (n: string) => normalizeName(n, prefixes);
  const pick = (set: ReadonlySet<string>): string[] => unique.filter((c) => set.has(norm(c)));
  const byNames = pick(new Set(evidence.names.map(norm)));
  if (byNames.length === 1) return { chosen: byNames[0], by: 'name', candidates: unique };
  const byAlias = pick(new Set(evidence.aliases.map(norm)));
  if (byAlias.length === 1) return { chosen: byAlias[0], by: 'alias', candidates: unique };
  if (byNames.length === 0 && byAlias.length === 0 && evidence.scopes.length > 0) {
    const scopes = new Set(evidence.scopes.map(norm));
    // `<module>.<suffix>` names the parameter; without a role suffix, the parameter's module must be the scope.
    const byScope = suffix !== undefined
      ? unique.filter((c) => scopes.has(parentOf(norm(c))) && norm(c).endsWith(`.${suffix}`))
      : unique.filter((c) => scopes.has(parentOf(norm(c))));
    if (byScope.length === 1) return { chosen: byScope[0], by: 'scope', candidates: unique };
  }
  if (!degenerate) return { chosen: unique[0], by: 'tied', candidates: unique };
  return { ambiguous: true, candidates: unique };
};

/**
 * A lone equal-valued candidate for a degenerate value (zeros, ones) is only as good as the evidence
 * around it: a fill the exporter wrote (a mask, a scale) can equal one checkpoint tensor by chance. It is
 * taken when the evidence names it, or when there is no module scope to say otherwise; a reader whose
 * scope is another module contradicts it.
 */
export const corroborated = (candidate: string, evidence: Evidence, suffix: string | undefined, prefixes: readonly string[] = WRAPPER_PREFIXES): boolean => {
  const norm = (n: string) => normalizeName(n, prefixes);
  const c = norm(candidate);
  if ([...evidence.names, ...evidence.aliases].some((n) => norm(n) === c)) return true;
  if (evidence.scopes.length === 0) return true;
  const module = parentOf(c);
  return evidence.scopes.some((scope) => {
    const sc = norm(scope);
    return sc === module || module.startsWith(`${sc}.`) || sc.startsWith(`${module}.`);
  }) && (suffix === undefined || c.endsWith(`.${suffix}`) || !/\.(weight|bias)$/.test(c));
};

/** The numeric position of a module in its parent (`stem.0` -> 0, `bn2` -> 2), if any. */
const trailingNumber = (name: string): number | undefined => {
  const m = /(\d+)$/.exec(name.slice(name.lastIndexOf('.') + 1));
  return m ? Number(m[1]) : undefined;
};

/**
 * Which BatchNorm was folded into a convolution, among groups with equal statistics: the one whose module
 * is a reader's scope (the dynamo exporter names the fused node after the BatchNorm), else the one that
 * follows the convolution in the same parent module (`P.k` -> `P.(k+1)` in a Sequential, `P.convN` ->
 * `P.bnN`), when exactly one does.
 */
export const settleBatchNorm = (conv: string, groups: readonly string[], evidence: Evidence, prefixes: readonly string[] = WRAPPER_PREFIXES): Settlement | Ambiguity => {
  const unique = [...new Set(groups)].sort(compare);
  if (unique.length === 1) return { chosen: unique[0], by: 'name', candidates: unique };
  const norm = (n: string) => normalizeName(n, prefixes);
  const module = (prefix: string) => norm(prefix.endsWith('.') ? prefix.slice(0, -1) : prefix);
  const scopes = new Set(evidence.scopes.map(norm));
  const byScope = unique.filter((g) => scopes.has(module(g)));
  if (byScope.length === 1) return { chosen: byScope[0], by: 'scope', candidates: unique };
  const convModule = parentOf(norm(conv));
  const parent = parentOf(convModule);
  const index = trailingNumber(convModule);
  const siblings = unique.filter((g) => parentOf(module(g)) === parent);
  const isNumbered = /^\d+$/.test(convModule.slice(convModule.lastIndexOf('.') + 1));
  const next = siblings.filter((g) => {
    const own = module(g);
    const last = own.slice(own.lastIndexOf('.') + 1);
    return isNumbered ? last === String((index ?? -2) + 1) : index !== undefined && trailingNumber(own) === index && !/^\d+$/.test(last);
  });
  if (next.length === 1) return { chosen: next[0], by: 'module-order', candidates: unique };
  if (siblings.length === 1 && index === undefined) return { chosen: siblings[0], by: 'module-order', candidates: unique };
  return { ambiguous: true, candidates: unique };
};

export interface MatchRequest {
  /** The value's name in the graph (an initializer name), used for name matching when `byName`. */
  readonly name: string;
  readonly value: F32Tensor;
  /** Try the name first (false for values whose graph name is known to be shared or synthetic). */
  readonly byName: boolean;
  /** What identifies this use among equal-valued candidates. */
  readonly evidence: Evidence;
  /** The last name component the checkpoint tensor has for the weight's role (`weight`, `bias`). */
  readonly suffix?: string;
  /** Checkpoint tensors that other uses' own names or aliases name: a fill equal to one of them is not
   *  evidence that this use is that parameter too. */
  readonly claimed?: ReadonlySet<string>;
}

/** Shapes agree when they are equal once size-1 axes are dropped (a bias [C] read as [1, C, 1, 1]). */
const compatibleShapes = (a: readonly number[], b: readonly number[]): boolean => sameShape(a.filter((d) => d !== 1), b.filter((d) => d !== 1));

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

  /** Checkpoint tensors holding exactly these values in a compatible shape (tied copies of a tensor). */
  equalTensors(v: F32Tensor): string[] {
    return this.equal(v).filter((n) => compatibleShapes(this.values.get(n)!.shape, v.shape));
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

  private rowsCover(v: F32Tensor, req: MatchRequest): { expr: Expr; settled: Settlement[] } | Ambiguity | undefined {
    const n = v.data.length;
    for (const width of this.widths) {
      if (n % width !== 0) continue;
      const index = this.rowIndex(width);
      const rows = n / width;
      const pieces: Expr[] = [];
      const settled: Settlement[] = [];
      let i = 0;
      const degenerate = isDegenerate(v.data);
      const own = new Set([...req.evidence.names, ...req.evidence.aliases].map((n) => normalizeName(n, this.prefixes)));
      const usable = (name: string) => !degenerate || req.claimed === undefined || !req.claimed.has(normalizeName(name, this.prefixes)) || own.has(normalizeName(name, this.prefixes));
      while (i < rows) {
        const cands = (index.get(hashRange(v.data, i * width, (i + 1) * width)) ?? []).filter((e) => usable(e.name));
        let bestLen = 0;
        const runs: { entry: RowEntry; len: number }[] = [];
        for (const entry of cands) {
          const t = this.values.get(entry.name)!;
          const available = rowsOf(t.shape).rows - entry.row;
          let len = 0;
          while (len < available && i + len < rows && sameValues(t.data, (entry.row + len) * width, v.data, (i + len) * width, width)) len++;
          if (len === 0) continue;
          runs.push({ entry, len });
          bestLen = Math.max(bestLen, len);
        }
        const longest = runs.filter((r) => r.len === bestLen);
        if (longest.length === 0) {
          pieces.length = 0;
          break;
        }
        const names = [...new Set(longest.map((r) => r.entry.name))];
        let chosen = names[0];
        if (names.length > 1) {
          const piece = v.data.subarray(i * width, (i + bestLen) * width);
          const s = settle(names, req.evidence, req.suffix, isDegenerate(piece), this.prefixes);
          if (isAmbiguity(s)) return s;
          settled.push(s);
          chosen = s.chosen;
        }
        const best = longest.filter((r) => r.entry.name === chosen).sort((a, b) => a.entry.row - b.entry.row)[0];
        const t = this.values.get(best.entry.name)!;
        const total = rowsOf(t.shape).rows;
        const flat = this.reshapeTo(source(best.entry.name), t.shape, [total, width]);
        pieces.push(best.entry.row === 0 && best.len === total ? flat : { op: 'slice', axis: 0, start: best.entry.row, end: best.entry.row + best.len, x: flat });
        i += best.len;
      }
      if (pieces.length === 0) continue;
      const joined: Expr = pieces.length === 1 ? pieces[0] : { op: 'concat', axis: 0, xs: pieces };
      return { expr: this.reshapeTo(joined, [rows, width], v.shape), settled };
    }
    return undefined;
  }

  /** Tensors (not claimed by other uses' evidence) holding rows of `v` at some row width that divides it. */
  private fillRowSources(v: F32Tensor, req: MatchRequest): string[] {
    const own = new Set([...req.evidence.names, ...req.evidence.aliases].map((n) => normalizeName(n, this.prefixes)));
    const usable = (name: string) => req.claimed === undefined || !req.claimed.has(normalizeName(name, this.prefixes)) || own.has(normalizeName(name, this.prefixes));
    const found = new Set<string>();
    for (const width of this.widths) {
      if (v.data.length % width !== 0 || v.data.length === width) continue;
      const index = this.rowIndex(width);
      for (let i = 0; i < v.data.length / width; i++) {
        for (const entry of index.get(hashRange(v.data, i * width, (i + 1) * width)) ?? []) {
          const t = this.values.get(entry.name)!;
          if (usable(entry.name) && sameValues(t.data, entry.row * width, v.data, i * width, width)) found.add(entry.name);
        }
      }
    }
    return [...found].sort(compare);
  }

  private foldWeight(v: F32Tensor, req: MatchRequest): { expr: Expr; conv: string; bn: BnGroup; epsilon: number; settled: Settlement[] } | Ambiguity | undefined {
    if (v.shape.length < 2) return undefined;
    const channels = v.shape[0];
    const inner = v.data.length / channels;
    const convs = [...this.values].filter(([, t]) => sameShape(t.shape, v.shape)).map(([n]) => n);
    const found: { conv: string; bn: BnGroup; epsilon: number }[] = [];
    for (const epsilon of BN_EPSILONS) {
      for (const bn of this.bnGroups) {
        if (bn.channels !== channels) continue;
        const s = bnScale(this.values.get(bn.gamma)!.data, this.values.get(bn.variance)!.data, epsilon);
        for (const conv of convs) if (foldClose(this.values.get(conv)!.data, s, inner, v.data)) found.push({ conv, bn, epsilon });
      }
      if (found.length > 0) break;
    }
    if (found.length === 0) return undefined;
    const settled: Settlement[] = [];
    const convNames = [...new Set(found.map((f) => f.conv))];
    let conv = convNames[0];
    if (convNames.length > 1) {
      const s = settle(convNames, req.evidence, 'weight', isDegenerate(v.data), this.prefixes);
      if (isAmbiguity(s)) return s;
      settled.push(s);
      conv = s.chosen;
    }
    const forConv = found.filter((f) => f.conv === conv);
    const groups = [...new Set(forConv.map((f) => f.bn.prefix))];
    let prefix = groups[0];
    if (groups.length > 1) {
      const s = settleBatchNorm(conv, groups, req.evidence, this.prefixes);
      if (isAmbiguity(s)) return { ambiguous: true, candidates: s.candidates.map((g) => `${g}{weight,bias,running_mean,running_var}`) };
      settled.push({ ...s, chosen: `${s.chosen}*`, candidates: s.candidates.map((g) => `${g}*`) });
      prefix = s.chosen;
    }
    const f = forConv.find((x) => x.bn.prefix === prefix)!;
    const expr: Expr = { op: 'bnFoldWeight', weight: source(conv), gamma: source(f.bn.gamma), variance: source(f.bn.variance), epsilon: f.epsilon };
    return { expr, conv, bn: f.bn, epsilon: f.epsilon, settled };
  }

  /**
   * A checkpoint tensor whose name is the initializer's but whose values are not (a 'name-only' match) is
   * the same parameter only if no transform the exporter keeps names through could explain the change: a
   * BatchNorm folded into a convolution keeps the convolution's names (weight and bias), and a square
   * matrix stored transposed keeps its shape. The reason it may not be, or undefined when it may.
   */
  nameOnlyDoubt(m: Match, v: F32Tensor): string | undefined {
    const name = exprSources(m.expr)[0];
    const t = name === undefined ? undefined : this.values.get(name);
    if (t === undefined) return 'it names no checkpoint tensor';
    if (!sameShape(t.shape, v.shape)) return `checkpoint tensor '${name}' has shape [${t.shape}], the initializer [${v.shape}]`;
    if (v.shape.length === 2 && v.shape[0] === v.shape[1]) return `'${name}' is square: a transposed copy would keep its name and shape`;
    const channels = v.shape[0];
    const bn = this.bnGroups.find((g) => g.channels === channels);
    if (bn !== undefined) return `a BatchNorm of ${channels} channels ('${bn.prefix}*') could have been folded into it under the same name`;
    return undefined;
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

  /** Equal-valued candidates for `v` (or its transpose), settled by the request's evidence. */
  private byValue(v: F32Tensor, req: MatchRequest, transposed: boolean): Match | Ambiguity | undefined {
    const target = transposed ? transposeF32(v, [1, 0]) : v;
    const degenerate = isDegenerate(v.data);
    const own = new Set([...req.evidence.names, ...req.evidence.aliases].map((n) => normalizeName(n, this.prefixes)));
    const equal = this.equal(target).filter((n) => compatibleShapes(this.values.get(n)!.shape, target.shape))
      .filter((n) => !degenerate || req.claimed === undefined || !req.claimed.has(normalizeName(n, this.prefixes)) || own.has(normalizeName(n, this.prefixes)));
    if (equal.length === 0) return undefined;
    let chosen = equal[0];
    let settled: Settlement | undefined;
    if (new Set(equal).size === 1 && isDegenerate(v.data) && !corroborated(chosen, req.evidence, req.suffix, this.prefixes)) return undefined;
    if (new Set(equal).size > 1) {
      const s = settle(equal, req.evidence, req.suffix, isDegenerate(v.data), this.prefixes);
      if (isAmbiguity(s)) return s;
      settled = s;
      chosen = s.chosen;
    }
    const t = this.values.get(chosen)!;
    const base = this.reshapeTo(source(chosen), t.shape, target.shape);
    return {
      expr: transposed ? { op: 'transpose', perm: [1, 0], x: base } : base,
      method: transposed ? 'transpose' : 'value',
      alternatives: equal.filter((n) => n !== chosen),
      ...(settled ? { settled: [settled] } : {}),
    };
  }

  match(req: MatchRequest): Match | Ambiguity | undefined {
    const v = req.value;
    let nameOnly: Match | undefined;
    if (req.byName) {
      const m = this.byName(req);
      if (m && m.method !== 'name-only') return m;
      nameOnly = m;
    }
    const direct = this.byValue(v, req, false);
    if (direct) return direct;
    if (v.shape.length === 2) {
      const t = this.byValue(v, req, true);
      if (t) return t;
    }
    // A fill that rows of other tensors could assemble proves nothing about which rows: only evidence could.
    // Every tensor holding such rows (at any row width) is a candidate; two or more are an ambiguity.
    if (isDegenerate(v.data)) {
      const pieces = this.fillRowSources(v, req).filter((n) => corroborated(n, req.evidence, undefined, this.prefixes));
      // The parameter's own name still decides (a two-element bias is "degenerate" whatever it holds).
      return pieces.length > 1 ? { ambiguous: true, candidates: pieces } : nameOnly;
    }
    const rows = this.rowsCover(v, req);
    if (isAmbiguity(rows)) return rows;
    if (rows) return { expr: rows.expr, method: 'rows', alternatives: [], ...(rows.settled.length > 0 ? { settled: rows.settled } : {}) };
    if (v.shape.length === 2) {
      const rowsT = this.rowsCover(transposeF32(v, [1, 0]), req);
      if (isAmbiguity(rowsT)) return rowsT;
      if (rowsT) return { expr: { op: 'transpose', perm: [1, 0], x: rowsT.expr }, method: 'rows', alternatives: [], ...(rowsT.settled.length > 0 ? { settled: rowsT.settled } : {}) };
    }
    const fold = this.foldWeight(v, req);
    if (isAmbiguity(fold)) return fold;
    if (fold) return { expr: fold.expr, method: 'bn-fold', alternatives: [], ...(fold.settled.length > 0 ? { settled: fold.settled } : {}) };
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

