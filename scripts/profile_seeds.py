#!/usr/bin/env python
"""Time per seed and step of several seeds in one program: vmap vs lax.map vs one seed alone.

Model 8's `final` recipe, batch 256, the engine's compiled chunk of steps; the variants are
timed in alternating rounds in one process, so they share whatever else the machine does.
Usage: python scripts/profile_seeds.py [SEEDS] [ROUNDS]      (default 5 seeds, 5 rounds of 6 steps)
"""

import statistics
import sys
import time

from jax_mnist import host_memory

host_memory.apply_from_env()  # first, before JAX's backend starts: keeps freed host memory
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jax_mnist.engine import ProgramConfig, programs_for  # noqa: E402
from jax_mnist.recipes import get_recipe, with_overrides  # noqa: E402

SEEDS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 5
STEPS = 6
n = 256 * STEPS
rng = np.random.default_rng(0)
data = (rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, (n,), dtype=np.int32))

cases = {}
for name, seeds, seed_axis in [
    ("one seed", 1, "map"),
    (f"{SEEDS} seeds, vmap", SEEDS, "vmap"),
    (f"{SEEDS} seeds, lax.map", SEEDS, "map"),
]:
    programs = programs_for(
        ProgramConfig(with_overrides(get_recipe("final"), {"seed_axis": seed_axis}), n, seeds)
    )
    train_set = programs.place_data(data)
    states, keys = programs.init_seeds(list(range(1, seeds + 1)))
    orders = jnp.tile(jnp.arange(n, dtype=jnp.int32)[None], (seeds, 1))
    first = jnp.asarray(0, jnp.int32)
    start = time.perf_counter()
    states, _ = programs.train_chunk(states, *train_set, orders, keys.step, first, first + 1)
    jax.block_until_ready(states)
    cases[name] = {
        "programs": programs,
        "args": (train_set, orders, keys),
        "states": states,
        "seeds": seeds,
        "compile_s": time.perf_counter() - start,
        "times": [],
    }

for _ in range(ROUNDS):
    for case in cases.values():
        train_set, orders, keys = case["args"]
        first = jnp.asarray(0, jnp.int32)
        start = time.perf_counter()
        case["states"], _ = case["programs"].train_chunk(
            case["states"], *train_set, orders, keys.step, first, first + STEPS
        )
        jax.block_until_ready(case["states"])
        case["times"].append((time.perf_counter() - start) / STEPS / case["seeds"])

single = statistics.median(cases["one seed"]["times"])
for name, case in cases.items():
    per_seed_step = statistics.median(case["times"])
    print(
        f"{name:<22} compile + 1 step {case['compile_s']:5.1f} s   per seed and step: median "
        f"{per_seed_step * 1e3:6.1f} ms "
        f"(rounds: {', '.join(f'{t * 1e3:.1f}' for t in case['times'])})   {single / per_seed_step:.2f}x "
        "one seed's throughput"
    )
