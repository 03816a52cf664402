/**
 * Engine files: round trips run bit-identically, stripped engines refuse to run until a full refit and
 * then equal the full engine, and any damage to a file (byte flips, truncation) is a NativeError of kind
 * Corrupt or Version, never a crash. Everything runs in the test process, so a crash fails the suite.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { fc, test } from '@fast-check/vitest';
import { buildEngine, Engine, NativeError } from '../ffi/index.js';
import { allUpdates, anyNetwork, families, firstDifference, handCases, rerollWeight, rng, withWeights } from './support/networks.js';

const runs = (n: number) => (process.env.TRT_REFIT_FUZZ === '1' ? n * 20 : n);
const dir = mkdtempSync(join(tmpdir(), 'trt-refit-engine-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const kindOf = (fn: () => unknown): string => {
  try {
    fn();
  } catch (e) {
    if (e instanceof NativeError) return e.kind;
    throw e;
  }
  return 'no error';
};

describe('round trips', () => {
  test.prop([anyNetwork(), fc.constantFrom('float32', 'float16', 'bfloat16' as const)], { numRuns: runs(25) })('serialize -> deserialize runs bit-identically', (c, precision) => {
    using engine = buildEngine(c.net, { weightPrecision: precision });
    const bytes = engine.serialize();
    using loaded = Engine.deserialize(bytes);
    expect(loaded.io()).toEqual(engine.io());
    expect(loaded.weights()).toEqual(engine.weights());
    expect(loaded.info()).toEqual(engine.info());
    expect(firstDifference(loaded.run(c.inputs), engine.run(c.inputs))).toBeUndefined();
    // serializing what was loaded gives the same bytes
    expect(Buffer.from(loaded.serialize()).equals(Buffer.from(bytes))).toBe(true);
  });
  test.prop([anyNetwork()], { numRuns: runs(20) })('stripped engine: refuses to run, then full refit == full engine', (c) => {
    using full = buildEngine(c.net);
    const stripped = full.serialize({ includeWeights: false });
    expect(stripped.byteLength).toBeLessThanOrEqual(full.serialize().byteLength);
    using loaded = Engine.deserialize(stripped);
    expect(loaded.info().hasWeights).toBe(false);
    expect(kindOf(() => loaded.run(c.inputs))).toBe('State');
    loaded.refit(allUpdates(c.net).map(({ layer, role, weights }) => ({ layer, role, weights })));
    expect(loaded.info().hasWeights).toBe(true);
    expect(firstDifference(loaded.run(c.inputs), full.run(c.inputs))).toBeUndefined();
  });
  test.prop([fc.oneof(families.conv(), families.qkv(), families.fanout()), fc.integer({ min: 0, max: 0x7fffffff })], { numRuns: runs(20) })(
    'a stripped engine, once filled, takes partial refits like a full one',
    (c, seedB) => {
      using full = buildEngine(c.net);
      using loaded = Engine.deserialize(full.serialize({ includeWeights: false }));
      loaded.refit(allUpdates(c.net).map(({ layer, role, weights }) => ({ layer, role, weights })));
      // change every other weight; fill whatever the engine reports missing from the current values
      const rand = rng(seedB);
      const chosen = new Set(allUpdates(c.net).filter((_, i) => i % 2 === 0).map((u) => `${u.layer}/${u.role}`));
      const merged = withWeights(c.net, (layer, role, w) => (chosen.has(`${layer}/${role}`) ? rerollWeight(rand, w) : w));
      for (const e of [loaded, full]) {
        using refitter = e.createRefitter();
        for (const u of allUpdates(merged)) if (chosen.has(`${u.layer}/${u.role}`)) refitter.setWeights(u.layer, u.role, u.weights);
        for (const m of refitter.missing()) refitter.setWeights(m.layer, m.role, allUpdates(merged).find((u) => u.layer === m.layer && u.role === m.role)!.weights);
        refitter.apply();
      }
      using rebuilt = buildEngine(merged);
      expect(firstDifference(loaded.run(c.inputs), rebuilt.run(c.inputs))).toBeUndefined();
      expect(firstDifference(full.run(c.inputs), rebuilt.run(c.inputs))).toBeUndefined();
    },
  );
  test.prop([families.mlp()], { numRuns: runs(5) })('built stripped: refuses to run until refitted', (c) => {
    using engine = buildEngine(c.net, { stripWeights: true });
    expect(kindOf(() => engine.run(c.inputs))).toBe('State');
    engine.refit(allUpdates(c.net).map(({ layer, role, weights }) => ({ layer, role, weights })));
    using full = buildEngine(c.net);
    expect(firstDifference(engine.run(c.inputs), full.run(c.inputs))).toBeUndefined();
  });
  it('save and load through a file', () => {
    const c = handCases[0];
    using engine = buildEngine(c.net);
    const path = join(dir, 'fc.engine');
    engine.save(path);
    using loaded = Engine.load(path);
    expect(firstDifference(loaded.run(c.inputs), engine.run(c.inputs))).toBeUndefined();
    expect(Buffer.from(readFileSync(path)).equals(Buffer.from(engine.serialize()))).toBe(true);
    // a missing file is NotFound (libtrtshim maps ENOENT so), other OS refusals Io; the message names the path
    const missing = join(dir, 'no-such-file.engine');
    expect(kindOf(() => Engine.load(missing))).toBe('NotFound');
    expect(() => Engine.load(missing)).toThrow(missing);
    expect(kindOf(() => Engine.load(dir))).toBe('Io');
  });
});

describe('damaged engine files are refused, never a crash', () => {
  const base = fc.sample(anyNetwork(), { numRuns: 6, seed: 42 });
  const files = base.map((c) => {
    using engine = buildEngine(c.net);
    return { full: engine.serialize(), stripped: engine.serialize({ includeWeights: false }) };
  });
  const pick = fc.record({ file: fc.nat({ max: files.length - 1 }), stripped: fc.boolean() });

  test.prop([pick, fc.array(fc.record({ at: fc.double({ min: 0, max: 1, noNaN: true, maxExcluded: true }), xor: fc.integer({ min: 1, max: 255 }) }), { minLength: 1, maxLength: 4 })], {
    numRuns: runs(300),
  })('random byte flips', ({ file, stripped }, flips) => {
    const bytes = Uint8Array.from(stripped ? files[file].stripped : files[file].full);
    // Merge flips that land on one byte, so they never cancel out into an undamaged file.
    const merged = new Map<number, number>();
    for (const f of flips) {
      const at = Math.floor(f.at * bytes.length);
      merged.set(at, (merged.get(at) ?? 0) ^ f.xor);
    }
    if ([...merged.values()].every((x) => x === 0)) merged.set(Math.floor(flips[0].at * bytes.length), flips[0].xor);
    for (const [at, xor] of merged) bytes[at] ^= xor;
    expect(['Corrupt', 'Version']).toContain(kindOf(() => Engine.deserialize(bytes)[Symbol.dispose]()));
  });
  test.prop([pick, fc.double({ min: 0, max: 1, noNaN: true, maxExcluded: true })], { numRuns: runs(200) })('truncation at a random offset', ({ file, stripped }, at) => {
    const whole = stripped ? files[file].stripped : files[file].full;
    const bytes = whole.slice(0, Math.floor(at * whole.length));
    expect(['Corrupt', 'Version']).toContain(kindOf(() => Engine.deserialize(bytes)[Symbol.dispose]()));
  });
  it('every truncation of one small engine file', () => {
    const whole = files[0].full;
    for (let n = 0; n < whole.length; n++) {
      const kind = kindOf(() => Engine.deserialize(whole.slice(0, n))[Symbol.dispose]());
      if (kind !== 'Corrupt' && kind !== 'Version') expect.fail(`truncated to ${n} of ${whole.length} bytes: ${kind}`);
    }
  });
  it('a damaged file on disk is refused by load', () => {
    const path = join(dir, 'damaged.engine');
    const bytes = Uint8Array.from(files[0].full);
    bytes[bytes.length >> 1] ^= 0x40;
    writeFileSync(path, bytes);
    expect(['Corrupt', 'Version']).toContain(kindOf(() => Engine.load(path)[Symbol.dispose]()));
  });
  it('an empty buffer and random bytes are refused', () => {
    expect(['Corrupt', 'Version']).toContain(kindOf(() => Engine.deserialize(new Uint8Array(0))));
    const junk = new Uint8Array(4096);
    for (let i = 0; i < junk.length; i++) junk[i] = (i * 7919) & 0xff;
    expect(['Corrupt', 'Version']).toContain(kindOf(() => Engine.deserialize(junk)));
  });
});
