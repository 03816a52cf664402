export * from './errors.js';
export * from './checkpoint.js';
export * from './adapter.js';
