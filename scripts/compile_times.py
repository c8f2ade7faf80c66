#!/usr/bin/env python
"""Cold and warm compile time of the training step of every model's recipe (batch 256), or with
--init the compile time of each model's weight initialisation (``zoo.init_variables``).

Each step figure is a new process lowering and compiling the step: cold against an empty
persistent cache, warm against the cache the cold one filled. An init figure is one compile in
this process, no persistent cache.
Usage: python scripts/compile_times.py [RECIPE ...]   (default: model_1_setup ... model_8, final)
       python scripts/compile_times.py --init [MODEL ...]   (default: every model)
"""

import sys
import time

from jax_mnist.bench import compile_seconds
from jax_mnist.recipes import get_recipe
from jax_mnist.zoo import MODEL_NAMES, get_model, init_variables


def init_compile_seconds(name: str) -> float:
    import jax

    model = get_model(name)
    lowered = jax.jit(lambda key: init_variables(model, key)).lower(jax.random.key(0))
    started = time.perf_counter()
    lowered.compile()
    return time.perf_counter() - started


args = sys.argv[1:]
if args[:1] == ["--init"]:
    print(f"{'model':<28} {'init compile':>13}")
    for name in args[1:] or MODEL_NAMES:
        print(f"{name:<28} {init_compile_seconds(name):>11.2f} s", flush=True)
else:
    print(f"{'recipe':<28} {'cold compile':>13} {'warm compile':>13}")
    for name in args or [*MODEL_NAMES, "final"]:
        cold, warm = compile_seconds(get_recipe(name))
        print(f"{name:<28} {cold:>11.2f} s {warm:>11.2f} s", flush=True)
