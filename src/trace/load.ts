/**
 * The trace stage's edge: reading ONNX files (and their external data files) from disk. Everything
 * after the bytes are read is pure (decode.ts, analyze.ts).
 */
import * as E from 'fp-ts/lib/Either.js';
import * as TE from 'fp-ts/lib/TaskEither.js';
import { pipe } from 'fp-ts/lib/function.js';
import { readFile } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import { dirname, isAbsolute, join, normalize, sep } from 'node:path';
import { decodeOnnx, type ExternalDataResolver } from './decode.js';
import { analyzeGraph, type AnalyzedGraph, type AnalyzeOptions } from './analyze.js';
import { TraceError, type TraceErrorDetail } from './errors.js';
import type { Graph } from './ir.js';

/** Resolves external data files relative to the model's directory, refusing paths that leave it. */
export const directoryResolver = (directory: string): ExternalDataResolver => {
  const cache = new Map<string, Uint8Array>();
  return (location) => {
    const relative = normalize(location);
    if (isAbsolute(relative) || relative === '..' || relative.startsWith(`..${sep}`)) return E.left('the location leaves the model directory');
    const cached = cache.get(relative);
    if (cached) return E.right(cached);
    try {
      const bytes = new Uint8Array(readFileSync(join(directory, relative)));
      cache.set(relative, bytes);
      return E.right(bytes);
    } catch (e) {
      return E.left((e as Error).message);
    }
  };
};

export const loadOnnxTE = (path: string): TE.TaskEither<TraceErrorDetail, Graph> =>
  pipe(
    TE.tryCatch(
      () => readFile(path),
      (e): TraceErrorDetail => ({ _tag: 'MalformedModel', reason: `cannot read '${path}': ${(e as Error).message}` }),
    ),
    TE.chainEitherK((bytes) => decodeOnnx(new Uint8Array(bytes), directoryResolver(dirname(path)))),
  );

export const traceOnnxTE = (path: string, options: AnalyzeOptions = {}): TE.TaskEither<TraceErrorDetail, AnalyzedGraph> =>
  pipe(loadOnnxTE(path), TE.chainEitherK((graph) => analyzeGraph(graph, options)));

const rejecting = async <A>(task: TE.TaskEither<TraceErrorDetail, A>): Promise<A> => {
  const result = await task();
  if (E.isLeft(result)) throw new TraceError(result.left);
  return result.right;
};

/** Reads an ONNX file into a Graph; rejects with TraceError. */
export const loadOnnx = (path: string): Promise<Graph> => rejecting(loadOnnxTE(path));
/** Reads an ONNX file, infers shapes and folds constants; rejects with TraceError. */
export const traceOnnx = (path: string, options: AnalyzeOptions = {}): Promise<AnalyzedGraph> => rejecting(traceOnnxTE(path, options));
