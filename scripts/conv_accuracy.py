#!/usr/bin/env python
"""How far each lowering's convolution passes are from float64: forward, input gradient and weight
gradient of model 8's block 2 (10 -> 20 channels, 26x26 input, 3x3 kernel) at batch 256, random
inputs, for JAX's im2col and oneDNN's kernels (jax_mnist.onednn) and PyTorch's float32 conv;
the truth is PyTorch's conv in float64. Prints the largest error relative to the largest entry.

Usage: python scripts/conv_accuracy.py   (docs/benchmarks.md, "oneDNN's kernels through jax.ffi")
"""

import jax
import numpy as np
import torch

from jax_mnist import onednn
from jax_mnist.layers import conv_im2col

PASSES = ("forward", "input gradient", "weight gradient")


def jax_passes(conv, x, kernel, dy):
    y, vjp = jax.vjp(jax.jit(conv), x, kernel)
    return [np.asarray(a) for a in (y, *vjp(dy))]


def torch_passes(x, kernel, dy, dtype):
    tx = torch.tensor(x.transpose(0, 3, 1, 2), dtype=dtype, requires_grad=True)
    tk = torch.tensor(kernel.transpose(3, 2, 0, 1), dtype=dtype, requires_grad=True)
    y = torch.nn.functional.conv2d(tx, tk)
    y.backward(torch.tensor(dy.transpose(0, 3, 1, 2), dtype=dtype))
    return [
        y.detach().numpy().transpose(0, 2, 3, 1),
        tx.grad.numpy().transpose(0, 2, 3, 1),
        tk.grad.numpy().transpose(2, 3, 1, 0),
    ]


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 26, 26, 10)).astype(np.float32)
    kernel = (rng.standard_normal((3, 3, 10, 20)) * 0.3).astype(np.float32)
    dy = rng.standard_normal((256, 24, 24, 20)).astype(np.float32)
    truth = torch_passes(x, kernel, dy, torch.float64)
    results = {
        "im2col": jax_passes(conv_im2col, x, kernel, dy),
        "PyTorch float32": torch_passes(x, kernel, dy, torch.float32),
    }
    if onednn.available():
        results["oneDNN kernels"] = jax_passes(onednn.conv_onednn, x, kernel, dy)
    else:
        print(f"oneDNN kernels: unavailable ({onednn.why_unavailable()})")
    print("| lowering | " + " | ".join(PASSES) + " |\n|---|---:|---:|---:|")
    for name, passes in results.items():
        errors = [np.abs(a - t).max() / np.abs(t).max() for a, t in zip(passes, truth)]
        print(f"| {name} | " + " | ".join(f"{e:.2e}" for e in errors) + " |")


if __name__ == "__main__":
    main()
