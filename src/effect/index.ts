export * from './capabilities.js';
export * from './effect.js';
export * from './files.js';
