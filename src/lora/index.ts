export * from './lora.js';
export * from './open.js';
