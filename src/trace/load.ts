/**
 * The trace stage's edge: reading ONNX files (and their external data files) from disk. Everything
 * after the bytes are read is pure (decode.ts, analyze.ts).
 */
import * as E from 'fp-ts/lib/Either.js';
import * as TE from 'fp-ts/lib/TaskEither.js';
import { pipe } from 'fp-ts/lib/function.js';
import { dirname, join } from 'node:path';
import { allowedRoots, readConfinedFile, readConfinedRange, relativeInside } from '../checkpoint/confine.js';
import { decodeOnnx, type ExternalDataResolver } from './decode.js';
import { analyzeGraph, type AnalyzedGraph, type AnalyzeOptions } from './analyze.js';
import { TraceError, type TraceErrorDetail } from './errors.js';
import type { Graph } from './ir.js';

/**
 * Resolves external data files relative to the model's directory. A location that is empty, absolute, a
 * URL or leaves the folder lexically is refused; the file is then opened (non-blocking) and refused unless
 * it is a regular file whose real path lies inside the folder's real path (or, when the model file given
 * as `namingFile` is itself a link, inside the model file's real folder): a link to /etc/passwd, a folder
 * linked to /, a FIFO or /dev/zero are refused before anything is read. Only the requested range is read,
 * after it is checked against the file's size.
 */
export const directoryResolver = (directory: string, namingFile?: string): ExternalDataResolver => {
  let roots: string[] | undefined;
  return (location, range) => {
    const relative = relativeInside(location);
    if (E.isLeft(relative)) return E.left(`the location leaves the model directory: ${relative.left}`);
    roots ??= allowedRoots(directory, namingFile);
    return readConfinedRange(join(directory, relative.right), roots, range.offset, range.length);
  };
};

/** The model file's bytes: a regular file (a FIFO or device given as the model is refused at once). */
const readModelBytes = (path: string): E.Either<TraceErrorDetail, Uint8Array> => {
  const opened = readConfinedFile(path, undefined);
  return E.isLeft(opened) ? E.left({ _tag: 'MalformedModel', reason: `cannot read '${path}': ${opened.left}` }) : opened;
};

export const loadOnnxTE = (path: string): TE.TaskEither<TraceErrorDetail, Graph> =>
  pipe(
    TE.fromEither(readModelBytes(path)),
    TE.chainEitherK((bytes) => decodeOnnx(bytes, directoryResolver(dirname(path), path))),
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
