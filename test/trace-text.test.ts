import { describe, expect, it } from 'vitest';
import { test } from '@fast-check/vitest';
import * as E from 'fp-ts/lib/Either.js';
import { readFileSync } from 'node:fs';
import { printGraph, parseGraph } from '../src/trace/text.js';
import { decodeOnnx } from '../src/trace/decode.js';
import { randomGraphData } from './support/h5-graphs.js';

describe('graph IR text form', () => {
  test.prop([randomGraphData], { numRuns: 100 })('random builder graphs survive print then parse', (graph) => {
    const text = printGraph(graph);
    const parsed = parseGraph(text);
    expect(E.isRight(parsed)).toBe(true);
    if (E.isRight(parsed)) {
      expect(parsed.right).toEqual(graph);
      expect(printGraph(parsed.right)).toBe(text);
    }
  });

  it('round-trips a real fixture exactly', () => {
    const g = decodeOnnx(new Uint8Array(readFileSync('/work/shared/fixtures/bert_tiny/model_dynamo.onnx')));
    if (E.isLeft(g)) throw new Error(JSON.stringify(g.left));
    const parsed = parseGraph(printGraph(g.right));
    expect(E.isRight(parsed) && parsed.right).toEqual(g.right);
  });

  it('names the line of a malformed text', () => {
    const good = 'graph\t"g"\t18\ninput\t"x"\t"float32"\t[2]\n';
    expect(E.isRight(parseGraph(good))).toBe(true);
    const cases: Array<[string, number]> = [
      [`${good}node\t"n"\t"Relu"\t""\t["x"]\n`, 3],
      [`${good}init\t"w"\t"float32"\t[2]\t"AAAA"\n`, 3],
      [`${good}input\t"y"\t"complex"\t[2]\n`, 3],
      [`${good}bogus\t1\n`, 3],
      [`input\t"x"\t"float32"\t[2]\n`, 1],
      [`${good}output\t{not json\n`, 3],
    ];
    for (const [text, line] of cases) {
      const r = parseGraph(text);
      expect(E.isLeft(r) && r.left).toMatchObject({ _tag: 'ParseError', line });
    }
  });
});
