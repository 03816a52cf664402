/**
 * A strict JSON parser for safetensors headers. JSON.parse cannot serve: it keeps the last of duplicate
 * keys without saying so, rounds integers above 2^53, and does not tell `1` from `1.0`. This one reports
 * every duplicate key with its path, gives integers beyond 2^53 as bigint and non-integers as JsonFloat
 * (the reference refuses both as a dimension), and limits nesting as serde_json does (128).
 */

export class JsonFloat {
  constructor(readonly value: number) {}
}

export type Json = null | boolean | number | bigint | JsonFloat | string | Json[] | JsonObject;
/** A null-prototype object, so keys such as `__proto__` are plain keys. */
export interface JsonObject {
  readonly [key: string]: Json;
}

export interface DuplicateKey {
  /** Keys from the root to the object holding the duplicate. */
  readonly path: readonly string[];
  readonly key: string;
}

export type JsonResult =
  | { readonly ok: true; readonly value: Json; readonly duplicates: readonly DuplicateKey[] }
  | { readonly ok: false; readonly detail: string };

const MAX_DEPTH = 128;

class JsonSyntaxError extends Error {}

export const isJsonObject = (value: Json): value is JsonObject =>
  typeof value === 'object' && value !== null && !Array.isArray(value) && !(value instanceof JsonFloat);

export const parseJson = (text: string): JsonResult => {
  let pos = 0;
  const duplicates: DuplicateKey[] = [];
  const path: string[] = [];

  const fail = (what: string): never => {
    const found = pos < text.length ? JSON.stringify(text[pos]) : 'end of input';
    throw new JsonSyntaxError(`${what} at character ${pos}, found ${found}`);
  };
  const skipWhitespace = (): void => {
    for (;;) {
      const c = text.charCodeAt(pos);
      if (c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d) pos++;
      else return;
    }
  };
  const expectWord = (word: string, value: Json): Json => {
    if (text.startsWith(word, pos)) {
      pos += word.length;
      return value;
    }
    return fail(`expected ${word}`);
  };

  const parseString = (): string => {
    pos++; // opening quote
    let out = '';
    let runStart = pos;
    for (;;) {
      if (pos >= text.length) fail('unterminated string');
      const c = text.charCodeAt(pos);
      if (c === 0x22) {
        out += text.slice(runStart, pos);
        pos++;
        return out;
      }
      if (c < 0x20) fail('control character in string');
      if (c !== 0x5c) {
        pos++;
        continue;
      }
      out += text.slice(runStart, pos);
      const e = text[pos + 1];
      pos += 2;
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          const unit = readHex4();
          if (unit >= 0xd800 && unit <= 0xdbff) {
            if (text[pos] !== '\\' || text[pos + 1] !== 'u') fail('lone leading surrogate in escape');
            pos += 2;
            const low = readHex4();
            if (low < 0xdc00 || low > 0xdfff) fail('invalid trailing surrogate in escape');
            out += String.fromCharCode(unit, low);
          } else if (unit >= 0xdc00 && unit <= 0xdfff) {
            fail('lone trailing surrogate in escape');
          } else {
            out += String.fromCharCode(unit);
          }
          break;
        }
        default:
          pos -= 1;
          fail('invalid escape');
      }
      runStart = pos;
    }
  };
  const readHex4 = (): number => {
    const hex = text.slice(pos, pos + 4);
    if (!/^[0-9a-fA-F]{4}$/.test(hex)) fail('expected four hex digits');
    pos += 4;
    return parseInt(hex, 16);
  };

  const digitsFrom = (start: number): number => {
    let end = start;
    while (end < text.length && text.charCodeAt(end) >= 0x30 && text.charCodeAt(end) <= 0x39) end++;
    return end;
  };
  const parseNumber = (): Json => {
    // -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?, scanned by hand (a regex per number is slow).
    const start = pos;
    if (text[pos] === '-') pos++;
    if (text[pos] === '0') pos++;
    else if (text[pos] !== undefined && text[pos]! >= '1' && text[pos]! <= '9') pos = digitsFrom(pos);
    else fail('invalid number');
    let integer = true;
    if (text[pos] === '.') {
      const end = digitsFrom(pos + 1);
      if (end === pos + 1) fail('expected a digit after the decimal point');
      pos = end;
      integer = false;
    }
    if (text[pos] === 'e' || text[pos] === 'E') {
      pos++;
      if (text[pos] === '+' || text[pos] === '-') pos++;
      const end = digitsFrom(pos);
      if (end === pos) fail('expected a digit in the exponent');
      pos = end;
      integer = false;
    }
    const lexeme = text.slice(start, pos);
    if (!integer) return new JsonFloat(Number(lexeme));
    const value = Number(lexeme);
    return Number.isSafeInteger(value) ? value : BigInt(lexeme);
  };

  const parseValue = (depth: number): Json => {
    skipWhitespace();
    const c = text[pos];
    if (c === '{') return parseObject(depth + 1);
    if (c === '[') return parseArray(depth + 1);
    if (c === '"') return parseString();
    if (c === 't') return expectWord('true', true);
    if (c === 'f') return expectWord('false', false);
    if (c === 'n') return expectWord('null', null);
    if (c === '-' || (c !== undefined && c >= '0' && c <= '9')) return parseNumber();
    return fail('expected a value');
  };

  const parseArray = (depth: number): Json[] => {
    if (depth > MAX_DEPTH) fail('nesting deeper than 128');
    pos++;
    const items: Json[] = [];
    skipWhitespace();
    if (text[pos] === ']') {
      pos++;
      return items;
    }
    for (;;) {
      items.push(parseValue(depth));
      skipWhitespace();
      if (text[pos] === ',') pos++;
      else if (text[pos] === ']') {
        pos++;
        return items;
      } else fail("expected ',' or ']'");
    }
  };

  const parseObject = (depth: number): JsonObject => {
    if (depth > MAX_DEPTH) fail('nesting deeper than 128');
    pos++;
    const object: Record<string, Json> = Object.create(null) as Record<string, Json>;
    skipWhitespace();
    if (text[pos] === '}') {
      pos++;
      return object;
    }
    for (;;) {
      skipWhitespace();
      if (text[pos] !== '"') fail('expected a key');
      const key = parseString();
      skipWhitespace();
      if (text[pos] !== ':') fail("expected ':'");
      pos++;
      path.push(key);
      const value = parseValue(depth);
      path.pop();
      if (Object.prototype.hasOwnProperty.call(object, key)) duplicates.push({ path: [...path], key });
      Object.defineProperty(object, key, { value, enumerable: true, writable: true, configurable: true });
      skipWhitespace();
      if (text[pos] === ',') pos++;
      else if (text[pos] === '}') {
        pos++;
        return object;
      } else fail("expected ',' or '}'");
    }
  };

  try {
    const value = parseValue(0);
    skipWhitespace();
    if (pos !== text.length) fail('trailing characters');
    return { ok: true, value, duplicates };
  } catch (e) {
    if (e instanceof JsonSyntaxError) return { ok: false, detail: e.message };
    throw e;
  }
};
