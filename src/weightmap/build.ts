/**
 * The weight map's public entry points: Promise and TaskEither forms of buildWeightMap, and the map as
 * JSON (decoded with its io-ts codec at the edge).
 */
import * as E from 'fp-ts/lib/Either.js';
import * as TE from 'fp-ts/lib/TaskEither.js';
import { PathReporter } from 'io-ts/lib/PathReporter.js';
import { buildWeightMap, WeightMapCodec, WeightMapError, type WeightMap, type WeightMapErrorDetail, type WeightMapInput, type WeightMapOptions } from './map.js';

export const buildWeightMapTE = (input: WeightMapInput, options: WeightMapOptions = {}): TE.TaskEither<WeightMapErrorDetail, WeightMap> =>
  TE.fromEither(buildWeightMap(input, options));

/** Builds the map; rejects with WeightMapError (UnmappedWeights lists every weight without a source). */
export const createWeightMap = async (input: WeightMapInput, options: WeightMapOptions = {}): Promise<WeightMap> => {
  const r = buildWeightMap(input, options);
  if (E.isLeft(r)) throw new WeightMapError(r.left);
  return r.right;
};

export type WeightMapDecodeError = { readonly _tag: 'InvalidWeightMap'; readonly detail: string };

export const decodeWeightMap = (json: unknown): E.Either<WeightMapDecodeError, WeightMap> => {
  const r = WeightMapCodec.decode(json);
  return E.isLeft(r) ? E.left({ _tag: 'InvalidWeightMap', detail: PathReporter.report(r).slice(0, 3).join('; ') }) : E.right(r.right);
};
