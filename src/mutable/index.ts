export * from './state.js';
export * from './module.js';
