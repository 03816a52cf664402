/** A stack of fully connected layers with constant weights (cheap to make at any size), for reload
 *  measurements and benchmarks. No test-framework imports, so benchmarks and child processes can use it. */
import type { Layer, NetworkDefinition } from '../../src/network/types.js';

export const fcStack = (layers: number, width: number, fill: number): NetworkDefinition => ({
  inputs: [{ name: 'x', dtype: 'float32', shape: [4, width] }],
  layers: Array.from({ length: layers }, (_, i): Layer => ({
    kind: 'fullyConnected',
    name: `fc${i}`,
    input: i === 0 ? 'x' : `fc${i - 1}`,
    output: `fc${i}`,
    outFeatures: width,
    kernel: { dtype: 'float32', shape: [width, width], data: new Float32Array(width * width).fill(fill) },
    bias: { dtype: 'float32', shape: [width], data: new Float32Array(width).fill(fill) },
  })),
  outputs: [{ tensor: `fc${layers - 1}`, name: 'y' }],
});

