/**
 * The engines' fused groups, a planning input (PlanOptions.fusedGroups): weights an engine can only refit
 * together, because it redoes a fusion from all of them and keeps no copy of their network-level values
 * (libtrtshim: the members of a batch norm folded into a convolution in an engine without retained copies;
 * every weight of a stripped engine). The plan turns them into `restage` lists; the executor stages those and
 * nothing else.
 *
 * Read from the engine itself, through the refitter's own rule: a stripped engine (info().hasWeights false)
 * needs every weight, one group; otherwise each weight is staged alone in a throwaway refitter (zero values
 * that are never applied, from one shared zero buffer) and the refitter's `missing()` names the rest of its
 * group. Groups found from several members are listed once. Cached per engine object (a rollback replaces
 * the engine, so its successor is read again) and re-read when the engine's hasWeights changes (a stripped
 * engine filled by a refit).
 */
import type { Engine, EngineWeight } from '../../ffi/engine.js';
import type { RefitModel } from '../model/model.js';
import type { Weights, WeightRole } from '../network/types.js';
import type { FusedGroup } from '../plan/plan.js';
import type { RefitterLike } from './capabilities.js';

const cache = new WeakMap<object, { readonly hasWeights: boolean; readonly groups: readonly FusedGroup[] }>();

const zeroWeights = (w: EngineWeight, buffer: ArrayBuffer): Weights => {
  const n = w.shape.reduce((a, b) => a * b, 1);
  switch (w.dtype) {
    case 'float16':
    case 'bfloat16':
      return { dtype: w.dtype, shape: w.shape, data: new Uint16Array(buffer, 0, n) };
    case 'int32':
      return { dtype: 'int32', shape: w.shape, data: new Int32Array(buffer, 0, n) };
    case 'int64':
      return { dtype: 'int64', shape: w.shape, data: new BigInt64Array(buffer, 0, n) };
    default:
      return { dtype: 'float32', shape: w.shape, data: new Float32Array(buffer, 0, n) };
  }
};

/** The fused groups of one engine (members in the engine's weight order). `probe`: the refitters to probe
 *  with (default the engine's own; results are cached only for those). */
export const engineFusedGroups = (segment: number, engine: Engine, probe?: (engine: Engine) => RefitterLike): readonly FusedGroup[] => {
  const hasWeights = engine.info().hasWeights;
  const known = probe === undefined ? cache.get(engine) : undefined;
  if (known !== undefined && known.hasWeights === hasWeights) return known.groups;
  const refitter = probe ?? ((e: Engine) => e.createRefitter());
  const weights = engine.weights();
  let groups: FusedGroup[];
  if (!hasWeights) groups = weights.length > 1 ? [{ segment, members: weights.map((w) => ({ layer: w.layer, role: w.role })) }] : [];
  else {
    // Allocated zeroed and never written: pages the refitter does not read are never touched.
    const buffer = new ArrayBuffer(Math.max(8, ...weights.map((w) => w.bytes)));
    const keyOf = (layer: string, role: string) => `${layer}\u0000${role}`;
    const order = new Map(weights.map((w, i) => [keyOf(w.layer, w.role), i]));
    const seen = new Set<string>();
    groups = [];
    for (const w of weights) {
      let missing: Array<{ layer: string; role: WeightRole }>;
      try {
        using r = refitter(engine);
        r.setWeights(w.layer, w.role as WeightRole, zeroWeights(w, buffer));
        missing = r.missing();
      } catch {
        continue; // a weight no refit can stage (a dtype the effect never stages) is in no group it could need
      }
      if (missing.length === 0) continue;
      const members = [{ layer: w.layer, role: w.role }, ...missing].sort((a, b) => order.get(keyOf(a.layer, a.role))! - order.get(keyOf(b.layer, b.role))!);
      const key = members.map((m) => keyOf(m.layer, m.role)).join('\u0001');
      if (seen.has(key)) continue;
      seen.add(key);
      groups.push({ segment, members });
    }
  }
  if (probe === undefined) cache.set(engine, { hasWeights, groups });
  return groups;
};

/** The fused groups of every engine segment of a model (PlanOptions.fusedGroups). */
export const fusedGroupsOf = (model: RefitModel, probe?: (segment: number, engine: Engine) => RefitterLike): readonly FusedGroup[] =>
  model.engineStages().flatMap((s) => engineFusedGroups(s.record.index, s.engine, probe === undefined ? undefined : (e) => probe(s.record.index, e)));
