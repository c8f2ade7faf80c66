#!/usr/bin/env python
"""Cold and warm compile time of the training step of every model's recipe (batch 256).

Each figure is a new process lowering and compiling the step: cold against an empty
persistent cache, warm against the cache the cold one filled.
Usage: python scripts/compile_times.py [RECIPE ...]   (default: model_1_setup ... model_8, final)
"""

import sys

from jax_mnist.bench import compile_seconds
from jax_mnist.recipes import get_recipe
from jax_mnist.zoo import MODEL_NAMES

names = sys.argv[1:] or [*MODEL_NAMES, "final"]
print(f"{'recipe':<28} {'cold compile':>13} {'warm compile':>13}")
for name in names:
    cold, warm = compile_seconds(get_recipe(name))
    print(f"{name:<28} {cold:>11.2f} s {warm:>11.2f} s", flush=True)
