/** Quantized weights: formats, the reference quantizer, quantized checkpoints and layerwise reload. */
export * from './errors.js';
export * from './format.js';
export * from './reference.js';
export { findQuantized, QuantizedEntry, type TensorSource } from './checkpoint.js';
export { foldedLayers, planReload, reloadCheckpoint, reloadCheckpointTE, type ReloadOptions, type ReloadPlan, type ReloadSummary, type ReloadTarget } from './reload.js';
export { dequantizedSource, mappedPathOf, stagedQuantized, type MappedPath } from './mapped.js';
export { companionsOf, quantizedIn, tensorSourceOf } from './store.js';
