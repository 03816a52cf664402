export * from './apportion.js';
export * from './budget.js';
export * from './streaming.js';
