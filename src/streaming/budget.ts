/**
 * Weight streaming budgets as users write them: BYTES (a whole number, optionally with a KiB/MiB/GiB or
 * KB/MB/GB suffix), PERCENT% of the streamable weights (decimals allowed), or 'auto' (the engines' own
 * estimate of the memory available). Parsing is pure; the io-ts codec decodes budgets at the edges (CLI
 * arguments, JSON), encoding back to the canonical text.
 */
import * as E from 'fp-ts/lib/Either.js';
import * as t from 'io-ts';

export type Budget =
  | { readonly kind: 'bytes'; readonly bytes: number }
  | { readonly kind: 'percent'; readonly percent: number }
  | { readonly kind: 'auto' };

/** What the public functions accept: a Budget, a byte count, or its text form. */
export type BudgetInput = Budget | number | string;

export interface InvalidBudget {
  readonly _tag: 'InvalidBudget';
  readonly text: string;
  readonly reason: string;
}

const units: Record<string, number> = { '': 1, b: 1, kib: 1024, mib: 1024 ** 2, gib: 1024 ** 3, tib: 1024 ** 4, kb: 1e3, mb: 1e6, gb: 1e9, tb: 1e12 };

const invalid = (text: string, reason: string): E.Either<InvalidBudget, Budget> => E.left({ _tag: 'InvalidBudget', text, reason });

export const parseBudget = (input: string): E.Either<InvalidBudget, Budget> => {
  const text = input.trim();
  if (text.toLowerCase() === 'auto') return E.right({ kind: 'auto' });
  const percent = /^(\d+(?:\.\d+)?)\s*%$/.exec(text);
  if (percent !== null) {
    const p = Number(percent[1]);
    return p <= 100 ? E.right({ kind: 'percent', percent: p }) : invalid(input, `a percentage must be 0 to 100, got ${percent[1]}%`);
  }
  const bytes = /^(\d+)\s*([a-zA-Z]*)$/.exec(text);
  if (bytes !== null) {
    const unit = units[bytes[2].toLowerCase()];
    if (unit === undefined) return invalid(input, `unknown unit '${bytes[2]}' (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)`);
    const value = BigInt(bytes[1]) * BigInt(unit);
    if (value > BigInt(Number.MAX_SAFE_INTEGER)) return invalid(input, 'more bytes than this tool can count exactly');
    return E.right({ kind: 'bytes', bytes: Number(value) });
  }
  return invalid(input, "expected BYTES (e.g. 1073741824 or 512MiB), PERCENT% (e.g. 25%) or 'auto'");
};

export const budgetFromInput = (input: BudgetInput): E.Either<InvalidBudget, Budget> => {
  if (typeof input === 'string') return parseBudget(input);
  if (typeof input === 'number') {
    return Number.isSafeInteger(input) && input >= 0 ? E.right({ kind: 'bytes', bytes: input }) : invalid(String(input), 'a byte count must be a whole number >= 0');
  }
  if (input.kind === 'bytes' && !(Number.isSafeInteger(input.bytes) && input.bytes >= 0)) return invalid(formatBudget(input), 'a byte count must be a whole number >= 0');
  if (input.kind === 'percent' && !(input.percent >= 0 && input.percent <= 100)) return invalid(formatBudget(input), 'a percentage must be 0 to 100');
  return E.right(input);
};

export const formatBudget = (b: Budget): string => (b.kind === 'auto' ? 'auto' : b.kind === 'percent' ? `${b.percent}%` : String(b.bytes));

/** io-ts codec: text (or a byte count) <-> Budget. */
export const BudgetCodec = new t.Type<Budget, string, unknown>(
  'Budget',
  (u): u is Budget =>
    typeof u === 'object' && u !== null && ['bytes', 'percent', 'auto'].includes((u as { kind?: string }).kind ?? '') && E.isRight(budgetFromInput(u as Budget)),
  (u, c) => {
    if (typeof u !== 'string' && typeof u !== 'number') return t.failure(u, c, "a budget is BYTES, PERCENT% or 'auto'");
    const r = budgetFromInput(u);
    return E.isRight(r) ? t.success(r.right) : t.failure(u, c, r.left.reason);
  },
  formatBudget,
);

/** floor(total * percent / 100), exactly for percentages written in decimal (12.5 -> 125 / 1000). */
export const percentOf = (total: number, percent: number): number => {
  const text = String(percent);
  const m = /^(\d+)(?:\.(\d+))?$/.exec(text);
  if (m === null) return Math.floor((total * percent) / 100); // exponent notation: tiny or huge, rounding is moot
  const digits = m[2] ?? '';
  const numerator = BigInt(m[1] + digits);
  const denominator = 100n * 10n ** BigInt(digits.length);
  return Number((BigInt(total) * numerator) / denominator);
};
