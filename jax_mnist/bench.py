"""Step-time benchmark of the training engine, optionally beside PyTorch in the same process.

Figures (all measured here, none typed in):
- cold compile: lowering and compiling the train step of a new engine, empty persistent cache;
- warm compile: the same for another new engine, served by the persistent cache;
- train step: median and spread over ``steps`` steps after ``warmup``, blocking on the result
  before reading the clock;
- eval throughput over the 10,000-image test set size;
- one full epoch (60,000 images) through ``Engine.train_epoch``;
- with ``compare_torch``: the same architecture's training step in PyTorch eager (same batch,
  same thread count), and the ratio ``speedup`` = JAX images/s / PyTorch images/s;
- minor page faults per timed step of each, and whether ``jax_mnist.host_memory`` kept freed
  host memory in this process (it applies to PyTorch's allocations here as well);
- with ``seeds=K``: one epoch of K seeds trained together (one vmapped program) vs the K seeds
  one after another, and XLA's memory account of each epoch program (on GPU/TPU also the
  device's peak bytes).

Data are random uint8 images of MNIST's shape: the timings do not depend on pixel values.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_mnist import host_memory
from jax_mnist.engine import Engine
from jax_mnist.files import write_atomically
from jax_mnist.recipes import get_recipe, with_overrides

# jax.monitoring events: one per function traced (also when the persistent cache then serves
# the executable), one per executable XLA actually compiles.
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def counting_compiles():
    """Yields ``{"traces": n, "compiles": m}``, counting while the block runs."""
    counts = {"traces": 0, "compiles": 0}

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == TRACE_EVENT:
            counts["traces"] += 1
        elif event == COMPILE_EVENT:
            counts["compiles"] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def _spread(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "median_s": statistics.median(ordered),
        "p10_s": ordered[len(ordered) // 10],
        "p90_s": ordered[(len(ordered) * 9) // 10],
        "n": len(ordered),
    }


def _page_faults() -> int:
    try:
        import resource
    except ImportError:  # not on Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed_steps(step: Callable[[], None], steps: int) -> dict:
    """Spread of ``steps`` calls of ``step`` (which must block), plus page faults per call."""
    seconds, faults = [], _page_faults()
    for _ in range(steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return {**_spread(seconds), "page_faults_per_step": (_page_faults() - faults) / steps}


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_COMPILE_SNIPPET = """
import json, sys, time
import jax, jax.numpy as jnp
from jax_mnist.recipes import Recipe
from jax_mnist.engine import Engine
recipe = Recipe(**json.loads(sys.argv[1]))
engine = Engine.from_recipe(recipe, 60_000)
state = engine.init(jax.random.key(0))
images = jnp.zeros((recipe.batch_size, 28, 28, 1), jnp.uint8)
labels = jnp.zeros((recipe.batch_size,), jnp.int32)
start = time.perf_counter()
engine.train_step.lower(state, images, labels, jax.random.key(0)).compile()
print(json.dumps(time.perf_counter() - start))
"""


def _compile_in_subprocess(recipe, cache_dir: str) -> float:
    """Seconds to lower and compile the train step in a fresh process using ``cache_dir``."""
    import dataclasses
    import subprocess
    import sys

    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    out = subprocess.run([sys.executable, "-c", _COMPILE_SNIPPET, json.dumps(dataclasses.asdict(recipe))],
                         env=env, capture_output=True, text=True, check=True)  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def compile_seconds(recipe) -> tuple[float, float]:
    """(cold, warm) seconds to lower and compile ``recipe``'s train step in new processes.

    Cold: against an empty persistent cache; warm: against the cache the first filled.
    """
    with tempfile.TemporaryDirectory() as cache_dir:
        return _compile_in_subprocess(recipe, cache_dir), _compile_in_subprocess(recipe, cache_dir)


def bench_jax(recipe_name: str, batch_size: int, steps: int, warmup: int, epoch: bool, overrides=None) -> dict:
    recipe = with_overrides(get_recipe(recipe_name), {"batch_size": batch_size, **(overrides or {})})
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (batch_size, 28, 28, 1), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, (batch_size,), dtype=np.int32))
    key = jax.random.key(0)
    result: dict = {"recipe": recipe.name, "model": recipe.model, "batch_size": batch_size}

    result["cold_compile_s"], result["warm_compile_s"] = compile_seconds(recipe)
    engine = Engine.from_recipe(recipe, 60_000)
    state = engine.init(key)

    for i in range(warmup):
        state, _ = engine.train_step(state, images, labels, jax.random.fold_in(key, i))
    jax.block_until_ready(state)
    step_index = iter(range(steps))

    def step():
        nonlocal state
        state, _ = engine.train_step(state, images, labels, jax.random.fold_in(key, next(step_index)))
        jax.block_until_ready(state)

    result["train_step"] = _timed_steps(step, steps)
    result["jax_images_per_s"] = batch_size / result["train_step"]["median_s"]

    test_images = jnp.asarray(rng.integers(0, 256, (10_000, 28, 28, 1), dtype=np.uint8))
    test_labels = jnp.asarray(rng.integers(0, 10, (10_000,), dtype=np.int32))
    engine.evaluate(state, test_images, test_labels)  # compile
    eval_seconds = statistics.median(_timed(lambda: engine._evaluate_jit(state.params, state.batch_stats,
                                                                        test_images, test_labels)) for _ in range(3))  # fmt: skip
    result["eval_images_per_s"] = 10_000 / eval_seconds

    if epoch:
        train_set = engine.put_shared(_random_set(rng, 60_000))
        # train_epoch donates its states: each call gets fresh ones.
        first, second = _fresh(engine, [0], train_set), _fresh(engine, [0], train_set)
        result["epoch_compile_s"] = _timed(lambda: engine.train_epoch(*first, 0)[1])
        result["epoch_s"] = _timed(lambda: engine.train_epoch(*second, 1)[1])
    return result


def _random_set(rng, n: int):
    return (rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, (n,), dtype=np.int32))


def _fresh(engine, seeds, train_set):
    """Arguments of ``engine.train_epoch`` before the epoch index: new states of ``seeds``, the data, keys."""
    states, keys = engine.init_seeds(seeds)
    return (states, *train_set, keys)


def _program_bytes(engine, seeds, train_set) -> dict[str, int]:
    """XLA's own account of the epoch-chunk program's memory for ``seeds`` stacked seeds."""
    states, keys = engine.init_seeds(seeds)
    orders = jnp.zeros((len(seeds), train_set[1].shape[0]), jnp.int32)
    index = jnp.asarray(0, jnp.int32)
    compiled = engine._programs["steps"].lower(states, *train_set, orders, keys.step, index, index).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    sizes = {name: int(getattr(analysis, f"{name}_size_in_bytes", 0)) for name in ("argument", "output", "temp")}
    return {**sizes, "total": sum(sizes.values())}


def _device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()  # None on CPU; peak_bytes_in_use on GPU/TPU
    return None if not stats else stats.get("peak_bytes_in_use")


def bench_seeds(recipe_name: str, seeds: int, batch_size: int, num_examples: int = 60_000, overrides=None) -> dict:
    """One epoch of ``seeds`` seeds trained together (one vmapped program) against the same seeds
    trained one after another, each way warmed up first (compiled), plus each program's memory."""
    recipe = with_overrides(get_recipe(recipe_name), {"batch_size": batch_size, **(overrides or {})})
    engine = Engine.from_recipe(recipe, num_examples)
    train_set = engine.put_shared(_random_set(np.random.default_rng(0), num_examples))
    together, alone = list(range(1, seeds + 1)), [[s] for s in range(1, seeds + 1)]

    def warm_up(seed_list):
        states, keys = engine.init_seeds(seed_list)
        orders = engine._programs["shuffle"](keys.shuffle, jnp.asarray(0, jnp.int32), num_examples)
        index = jnp.asarray(0, jnp.int32)
        states, _ = engine._programs["steps"](states, *train_set, orders, keys.step, index, index + 1)
        if num_examples % batch_size:
            states, _ = engine._programs["last"](states, *train_set, orders, keys.step)
        jax.block_until_ready(states)

    warm_up(together)
    warm_up(alone[0])
    def epoch_seconds(seed_list) -> float:
        args = _fresh(engine, seed_list, train_set)
        return _timed(lambda: engine.train_epoch(*args, 1)[1])

    together_s = epoch_seconds(together)
    sequential_s = [epoch_seconds(seed_list) for seed_list in alone]
    return {
        "seeds": seeds,
        "seed_axis": engine.seed_axis,
        "examples_per_epoch": num_examples,
        "together_epoch_s": together_s,
        "sequential_epoch_s": sum(sequential_s),
        "sequential_per_seed_s": sequential_s,
        "together_speedup": sum(sequential_s) / together_s,
        "together_images_per_s": seeds * num_examples / together_s,
        "sequential_images_per_s": seeds * num_examples / sum(sequential_s),
        "program_bytes_together": _program_bytes(engine, together, train_set),
        "program_bytes_one_seed": _program_bytes(engine, alone[0], train_set),
        "device_peak_bytes": _device_peak_bytes(),
    }


def bench_torch(model_name: str, batch_size: int, steps: int, warmup: int, lr: float = 0.1) -> dict:
    import torch

    from jax_mnist.reference.torch_models import torch_model

    torch.set_num_threads(_threads())
    torch.manual_seed(0)
    model = torch_model(model_name).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    images = torch.randn(batch_size, 1, 28, 28)
    labels = torch.randint(0, 10, (batch_size,))

    def step():
        optimizer.zero_grad()
        loss = torch.nn.functional.nll_loss(model(images), labels)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    spread = _timed_steps(step, steps)
    return {"train_step": spread, "torch_images_per_s": batch_size / spread["median_s"],
            "torch_version": torch.__version__, "torch_threads": torch.get_num_threads()}  # fmt: skip


def run_benchmark(recipe: str = "final", batch_size: int = 256, steps: int = 30, warmup: int = 5,
                  compare_torch: bool = False, epoch: bool = True, overrides=None, seeds: int = 0,
                  seeds_examples: int = 60_000) -> dict:  # fmt: skip
    import flax
    import optax

    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "threads_used": _threads()},  # fmt: skip
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},  # fmt: skip
        "device": {"platform": jax.devices()[0].platform, "kind": jax.devices()[0].device_kind,
                   "count": jax.device_count()},  # fmt: skip
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "host_memory_kept": host_memory.applied(),
    }
    result["jax"] = bench_jax(recipe, batch_size, steps, warmup, epoch, overrides)
    result["jax_images_per_s"] = result["jax"]["jax_images_per_s"]
    if compare_torch:
        result["torch"] = bench_torch(result["jax"]["model"], batch_size, steps, warmup)
        result["torch_images_per_s"] = result["torch"]["torch_images_per_s"]
        result["speedup"] = result["jax_images_per_s"] / result["torch_images_per_s"]
    if seeds:
        result["multi_seed"] = bench_seeds(recipe, seeds, batch_size, seeds_examples, overrides)
    return result


def format_result(result: dict) -> str:
    j = result["jax"]
    kept = "kept" if result["host_memory_kept"] else "not kept (allocator default)"
    lines = [
        f"{j['recipe']} ({j['model']}), batch {j['batch_size']}, device {result['device']['kind']} "
        f"x{result['device']['count']}, {result['machine']['threads_used']} threads, freed host memory {kept}",
        f"  compile: cold {j['cold_compile_s']:.2f} s, warm (persistent cache) {j['warm_compile_s']:.2f} s",
        f"  JAX train step: median {j['train_step']['median_s'] * 1e3:.1f} ms "
        f"(p10 {j['train_step']['p10_s'] * 1e3:.1f}, p90 {j['train_step']['p90_s'] * 1e3:.1f}) "
        f"= {result['jax_images_per_s']:.0f} images/s, {j['train_step']['page_faults_per_step']:.0f} page faults/step",
        f"  eval: {j['eval_images_per_s']:.0f} images/s",
    ]
    if "epoch_s" in j:
        lines.append(f"  one epoch (60,000 images, compiled scan): {j['epoch_s']:.1f} s "
                     f"(first call incl. compile {j['epoch_compile_s']:.1f} s)")  # fmt: skip
    if "torch" in result:
        t = result["torch"]["train_step"]
        lines.append(f"  PyTorch {result['torch']['torch_version']} eager train step: median {t['median_s'] * 1e3:.1f} ms "
                     f"(p10 {t['p10_s'] * 1e3:.1f}, p90 {t['p90_s'] * 1e3:.1f}) = {result['torch_images_per_s']:.0f} images/s, "
                     f"{t['page_faults_per_step']:.0f} page faults/step")  # fmt: skip
        lines.append(f"  speedup JAX / PyTorch: {result['speedup']:.2f}x")
    if "multi_seed" in result:
        m = result["multi_seed"]
        mib = lambda b: f"{b.get('total', 0) / 2**20:.0f} MiB" if b else "n/a"
        lines.append(f"  {m['seeds']} seeds, one epoch of {m['examples_per_epoch']:,} images each: together ({m['seed_axis']}) "
                     f"{m['together_epoch_s']:.1f} s, one after another {m['sequential_epoch_s']:.1f} s "
                     f"= {m['together_speedup']:.2f}x; epoch-program memory {mib(m['program_bytes_together'])} "
                     f"vs {mib(m['program_bytes_one_seed'])} for one seed")  # fmt: skip
    return "\n".join(lines)


def write_json(result: dict, path) -> None:
    write_atomically(path, json.dumps(result, indent=2) + "\n")
