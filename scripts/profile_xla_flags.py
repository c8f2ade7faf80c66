#!/usr/bin/env python
"""XLA:CPU options and convolution lowerings against the step training runs, one process each.

For each variant (an ``XLA_FLAGS`` setting, or a recipe override such as ``conv_impl=xla``), a
fresh process compiles the recipe's epoch-chunk program (what ``jax_mnist.run`` executes, with
the engine's own compiler options) and times it as ``jax-mnist bench --all`` does: milliseconds
per optimizer step, the median over a few calls of 10 steps each. PyTorch eager's step of the
same network is timed once per recipe in this process. Variants are run in turns, round by
round, so a slow spell of the machine falls on all of them.

Usage: python scripts/profile_xla_flags.py [--recipes final,model_3_lighter_model] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

# name -> (XLA_FLAGS added, recipe overrides); "taps" runs scripts/profile_layers.py's lowering in
# the place of im2col (the package does not offer it: this is where it lost). The default is
# conv_impl auto: oneDNN's kernels where built (since 0.3.0; docs/xla_flags.json is of 0.2.0,
# when it was im2col), so the flags below act on the rest of the step.
VARIANTS = {
    "default (conv_impl auto)": ("", {}),
    "conv_impl=im2col": ("", {"conv_impl": "im2col"}),
    "conv_impl=xla": ("", {"conv_impl": "xla"}),
    "taps lowering": ("", {"conv_impl": "im2col", "taps": True}),
    "xla_cpu_use_xnnpack": ("--xla_cpu_use_xnnpack=true", {}),
    "XNNPACK dot fusion": ("--xla_cpu_experimental_xnn_fusion_type=dot", {}),
    "XNNPACK graph fusion (greedy)": (
        "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
        {},
    ),
    "oneDNN dot fusion": ("--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot", {}),
    "YNNPACK convolutions, XLA conv": (
        "--xla_cpu_experimental_ynn_fusion_type=+INDIVIDUAL_CONVOLUTION",
        {"conv_impl": "xla"},
    ),
    "YNNPACK dots (im2col)": ("--xla_cpu_experimental_ynn_fusion_type=+INDIVIDUAL_DOT", {}),
    "no multi-threaded Eigen": ("--xla_cpu_multi_thread_eigen=false", {}),
    "prefer 512-bit vectors": ("--xla_cpu_prefer_vector_width=512", {}),
}

CHILD = """
import json, sys
from jax_mnist import host_memory
host_memory.apply_from_env()
import numpy as np
from jax_mnist import layers
from jax_mnist.bench import _programs, _random_set, time_chunk_steps
from jax_mnist.recipes import get_recipe, with_overrides
overrides = json.loads(sys.argv[2])
if overrides.pop("taps", False):
    sys.path.insert(0, sys.argv[3])
    from profile_layers import conv_taps
    layers.CONV_IMPLS["im2col"] = conv_taps
recipe = with_overrides(get_recipe(sys.argv[1]), overrides)
programs = _programs(recipe)
train_set = programs.place_data(_random_set(np.random.default_rng(0), 60_000))
print(json.dumps(time_chunk_steps(programs, train_set, 10, 4, 1)["median_s"]))
"""


def jax_ms(recipe: str, flags: str, overrides: dict) -> float | str:
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            recipe,
            json.dumps(overrides),
            os.path.dirname(os.path.abspath(__file__)),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return f"failed: {last[:120]}"
    return 1e3 * json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="final,model_3_lighter_model")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", help="comma-separated names of VARIANTS (default: all)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    from jax_mnist.bench import bench_torch
    from jax_mnist.recipes import get_recipe

    names = args.variants.split(",") if args.variants else list(VARIANTS)
    found = {}
    for recipe in args.recipes.split(","):
        r = get_recipe(recipe)
        torch_ms = 1e3 * bench_torch(r.model, r.batch_size, 20, 3)["train_step"]["median_s"]
        times: dict[str, list] = {name: [] for name in names}
        for _ in range(args.rounds):
            for name in names:
                times[name].append(jax_ms(recipe, *VARIANTS[name]))
        print(f"\n{recipe} ({r.model}, batch {r.batch_size}): PyTorch eager {torch_ms:.1f} ms/step\n")
        print(
            "| variant | XLA_FLAGS / override | JAX ms/step | vs default | PyTorch / JAX |\n"
            "|---|---|---:|---:|---:|"
        )
        base = None
        rows = {}
        for name in names:
            numbers = [t for t in times[name] if isinstance(t, float)]
            if not numbers:
                print(f"| {name} | `{VARIANTS[name][0]}` {VARIANTS[name][1] or ''} | {times[name][0]} | | |")
                rows[name] = times[name][0]
                continue
            ms = statistics.median(numbers)
            base = base or ms
            rows[name] = ms
            what = " ".join(
                x
                for x in (f"`{VARIANTS[name][0]}`" if VARIANTS[name][0] else "", str(VARIANTS[name][1] or ""))
                if x
            )
            print(f"| {name} | {what} | {ms:.1f} | {ms / base:.2f}x | {torch_ms / ms:.2f}x |", flush=True)
        found[recipe] = {"torch_ms": torch_ms, "jax_ms": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(found, f, indent=1)


if __name__ == "__main__":
    main()
