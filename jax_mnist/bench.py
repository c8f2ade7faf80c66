"""Step-time benchmark of the programs training runs, optionally beside PyTorch in the same process.

Every JAX figure is of ``engine.Programs``, the programs ``jax_mnist.run`` executes (all
measured here, none typed in):
- cold compile: lowering and compiling the epoch-chunk program in a new process, empty
  persistent cache; warm compile: the same served by the persistent cache;
- time per step of the epoch-chunk program, one seed: called for one step at a time
  (``train_step``) and for a tenth of an epoch a call, as training calls it (``train_chunk``,
  which gives ``jax_images_per_s``); spread over calls, blocking on the result before reading
  the clock;
- eval throughput of the evaluation program over 10,000 images;
- one full epoch (60,000 images) through ``run.train_epoch``;
- with ``compare_torch``: the same architecture's training step in PyTorch eager (same batch,
  same thread count), and the ratio ``speedup`` = JAX images/s / PyTorch images/s;
- minor page faults per timed step of each, and whether ``jax_mnist.host_memory`` kept freed
  host memory in this process (it applies to PyTorch's allocations here as well);
- with ``seeds=K``: one epoch of K seeds trained together (one program) vs the K seeds
  one after another, and XLA's memory account of each epoch program (on GPU/TPU also the
  device's peak bytes);
- ``bench_all``: every registered recipe's step, JAX (epoch-chunk program) and PyTorch.

Data are random uint8 images of MNIST's shape: the timings do not depend on pixel values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_mnist import host_memory
from jax_mnist.engine import ProgramConfig, programs_for
from jax_mnist.files import write_atomically
from jax_mnist.recipes import RECIPES, get_recipe, with_overrides
from jax_mnist.run import evaluate_seeds, train_epoch
from jax_mnist.rundir import device, load_teacher
from jax_mnist.zoo import ORIGINAL_MODEL_NAMES

try:
    import resource  # page faults: Unix only
except ImportError:
    resource = None

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
    if resource is None:
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
from jax_mnist.recipes import Recipe
from jax_mnist.bench import compile_chunk
start = time.perf_counter()
compile_chunk(Recipe(**json.loads(sys.argv[1])))
print(json.dumps(time.perf_counter() - start))
"""


def _programs(recipe, num_examples: int = 60_000, seeds: int = 1):
    teacher = load_teacher(recipe, jax.devices()[0].platform)  # None unless the recipe distils
    return programs_for(ProgramConfig(recipe, num_examples, seeds), teacher)


def _chunk_args(programs, seeds: list[int], train_set):
    """Arguments of ``programs.train_chunk`` before ``first``/``last``: fresh states, data, orders, keys."""
    states, keys = programs.init_seeds(seeds)
    orders = programs.shuffle(keys.shuffle, jnp.asarray(0, jnp.int32))
    return states, *train_set, orders, keys.step


def compile_chunk(recipe, num_examples: int = 60_000):
    """Lower and compile ``recipe``'s epoch-chunk program (what training runs) for one seed."""
    programs = _programs(recipe, num_examples)
    train_set = programs.place_data(_random_set(np.random.default_rng(0), num_examples))
    index = jnp.asarray(0, jnp.int32)
    return programs.train_chunk.lower(*_chunk_args(programs, [0], train_set), index, index).compile()


def _compile_in_subprocess(recipe, cache_dir: str) -> float:
    """Seconds to lower and compile the epoch-chunk program in a fresh process using ``cache_dir``."""
    env = dict(
        os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"
    )
    out = subprocess.run(
        [sys.executable, "-c", _COMPILE_SNIPPET, json.dumps(dataclasses.asdict(recipe))],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def compile_seconds(recipe) -> tuple[float, float]:
    """(cold, warm) seconds to lower and compile ``recipe``'s epoch-chunk program in new processes.

    Cold: against an empty persistent cache; warm: against the cache the first filled.
    """
    with tempfile.TemporaryDirectory() as cache_dir:
        return _compile_in_subprocess(recipe, cache_dir), _compile_in_subprocess(recipe, cache_dir)


def time_chunk_steps(programs, train_set, steps_per_call: int, calls: int, warmup: int = 1) -> dict:
    """Seconds per optimizer step of the epoch-chunk program run as training runs it (one seed),
    ``steps_per_call`` steps a call: the spread over ``calls`` calls, each divided by its steps."""
    args = list(_chunk_args(programs, [0], train_set))
    full = train_set[1].shape[0] // programs.batch_size
    first = iter(range(0, 10**9, steps_per_call))

    def call():
        start = next(first) % max(full - steps_per_call + 1, 1)
        bounds = jnp.asarray(start, jnp.int32), jnp.asarray(start + steps_per_call, jnp.int32)
        args[0], sums = programs.train_chunk(*args, *bounds)
        jax.block_until_ready((args[0], sums))

    for _ in range(warmup):
        call()
    spread = _timed_steps(call, calls)
    per_step = {k: v / steps_per_call for k, v in spread.items() if k.endswith("_s")}
    return {
        **spread,
        **per_step,
        "steps_per_call": steps_per_call,
        "page_faults_per_step": spread["page_faults_per_step"] / steps_per_call,
    }


def bench_jax(
    recipe_name: str, batch_size: int, steps: int, warmup: int, epoch: bool, overrides=None
) -> dict:
    """The programs training runs, for one seed: compile of the epoch-chunk program, its time per
    step (one step a call, and a tenth of an epoch a call, as training calls it), the evaluation
    program's throughput and, with ``epoch``, a whole epoch through ``run.train_epoch``."""
    recipe = with_overrides(get_recipe(recipe_name), {"batch_size": batch_size, **(overrides or {})})
    rng = np.random.default_rng(0)
    result: dict = {
        "recipe": recipe.name,
        "model": recipe.model,
        "batch_size": batch_size,
        "program": "engine.Programs.train_chunk (the epoch-chunk program training runs)",
    }
    result["cold_compile_s"], result["warm_compile_s"] = compile_seconds(recipe)
    programs = _programs(recipe)
    train_set = programs.place_data(_random_set(rng, 60_000))
    result["train_step"] = time_chunk_steps(programs, train_set, 1, steps, warmup)
    chunk = programs.chunks(60_000)[0][1]
    result["train_chunk"] = time_chunk_steps(programs, train_set, chunk, max(3, steps // chunk), 1)
    result["jax_images_per_s"] = batch_size / result["train_chunk"]["median_s"]

    test_set = programs.place_data(_random_set(rng, 10_000))
    states, _ = programs.init_seeds([0])
    evaluate_seeds(programs, states, test_set)  # compile
    eval_seconds = statistics.median(
        _timed(lambda: programs.evaluate(states.params, states.batch_stats, *test_set)) for _ in range(3)
    )
    result["eval_images_per_s"] = 10_000 / eval_seconds

    if epoch:
        # train_epoch donates its states: each call gets fresh ones.
        first, second = programs.init_seeds([0]), programs.init_seeds([0])
        result["epoch_compile_s"] = _timed(lambda: train_epoch(programs, first[0], train_set, first[1], 0)[1])
        result["epoch_s"] = _timed(lambda: train_epoch(programs, second[0], train_set, second[1], 1)[1])
    return result


def _random_set(rng, n: int):
    return (rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, (n,), dtype=np.int32))


def _program_bytes(programs, seeds, train_set) -> dict[str, int]:
    """XLA's own account of the epoch-chunk program's memory for ``seeds`` stacked seeds."""
    index = jnp.asarray(0, jnp.int32)
    compiled = programs.train_chunk.lower(*_chunk_args(programs, seeds, train_set), index, index).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    sizes = {
        name: int(getattr(analysis, f"{name}_size_in_bytes", 0)) for name in ("argument", "output", "temp")
    }
    return {**sizes, "total": sum(sizes.values())}


def _device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()  # None on CPU; peak_bytes_in_use on GPU/TPU
    return None if not stats else stats.get("peak_bytes_in_use")


def bench_seeds(
    recipe_name: str, seeds: int, batch_size: int, num_examples: int = 60_000, overrides=None
) -> dict:
    """One epoch of ``seeds`` seeds trained together (one program) against the same seeds
    trained one after another, each way warmed up first (compiled), plus each program's memory."""
    recipe = with_overrides(get_recipe(recipe_name), {"batch_size": batch_size, **(overrides or {})})
    together, alone = list(range(1, seeds + 1)), [[s] for s in range(1, seeds + 1)]
    programs_together, programs_alone = (
        _programs(recipe, num_examples, seeds),
        _programs(recipe, num_examples, 1),
    )
    train_set = programs_alone.place_data(_random_set(np.random.default_rng(0), num_examples))

    def epoch_seconds(programs, seed_list) -> float:
        states, keys = programs.init_seeds(seed_list)
        return _timed(lambda: train_epoch(programs, states, train_set, keys, 1)[1])

    epoch_seconds(programs_together, together)  # compile
    epoch_seconds(programs_alone, alone[0])
    together_s = epoch_seconds(programs_together, together)
    sequential_s = [epoch_seconds(programs_alone, seed_list) for seed_list in alone]
    return {
        "seeds": seeds,
        "seed_axis": programs_together.seed_strategy,
        "examples_per_epoch": num_examples,
        "together_epoch_s": together_s,
        "sequential_epoch_s": sum(sequential_s),
        "sequential_per_seed_s": sequential_s,
        "together_speedup": sum(sequential_s) / together_s,
        "together_images_per_s": seeds * num_examples / together_s,
        "sequential_images_per_s": seeds * num_examples / sum(sequential_s),
        "program_bytes_together": _program_bytes(programs_together, together, train_set),
        "program_bytes_one_seed": _program_bytes(programs_alone, alone[0], train_set),
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
    return {
        "train_step": spread,
        "torch_images_per_s": batch_size / spread["median_s"],
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def run_benchmark(
    recipe: str = "final",
    batch_size: int = 256,
    steps: int = 30,
    warmup: int = 5,
    compare_torch: bool = False,
    epoch: bool = True,
    overrides=None,
    seeds: int = 0,
    seeds_examples: int = 60_000,
) -> dict:
    result = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "threads_used": _threads(),
        },
        "versions": {
            "jax": jax.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "device": device(with_overrides(get_recipe(recipe), overrides or {}).conv_impl),
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
        f"x{result['device']['count']}, convolutions {result['device']['conv_impl']}, "
        f"{result['machine']['threads_used']} threads, freed host memory "
        f"{kept}",
        f"  compile: cold {j['cold_compile_s']:.2f} s, warm (persistent cache) {j['warm_compile_s']:.2f} s",
        f"  JAX epoch-chunk program, {j['train_chunk']['steps_per_call']} steps a call (as training runs "
        "it): "
        f"median {j['train_chunk']['median_s'] * 1e3:.1f} ms/step "
        f"(p10 {j['train_chunk']['p10_s'] * 1e3:.1f}, p90 {j['train_chunk']['p90_s'] * 1e3:.1f}) "
        f"= {result['jax_images_per_s']:.0f} images/s, {j['train_chunk']['page_faults_per_step']:.0f} "
        "page faults/step",
        f"  the same program, 1 step a call: median {j['train_step']['median_s'] * 1e3:.1f} ms "
        f"(p10 {j['train_step']['p10_s'] * 1e3:.1f}, p90 {j['train_step']['p90_s'] * 1e3:.1f})",
        f"  eval: {j['eval_images_per_s']:.0f} images/s",
    ]
    if "epoch_s" in j:
        lines.append(
            f"  one epoch (60,000 images, run.train_epoch): {j['epoch_s']:.1f} s "
            f"(first call incl. compile {j['epoch_compile_s']:.1f} s)"
        )
    if "torch" in result:
        t = result["torch"]["train_step"]
        lines.append(
            f"  PyTorch {result['torch']['torch_version']} eager train step: median "
            f"{t['median_s'] * 1e3:.1f} ms "
            f"(p10 {t['p10_s'] * 1e3:.1f}, p90 {t['p90_s'] * 1e3:.1f}) = "
            f"{result['torch_images_per_s']:.0f} images/s, "
            f"{t['page_faults_per_step']:.0f} page faults/step"
        )
        lines.append(f"  speedup JAX / PyTorch: {result['speedup']:.2f}x")
    if "multi_seed" in result:
        m = result["multi_seed"]
        mib = lambda b: f"{b.get('total', 0) / 2**20:.0f} MiB" if b else "n/a"
        lines.append(
            f"  {m['seeds']} seeds, one epoch of {m['examples_per_epoch']:,} images each: together "
            f"({m['seed_axis']}) "
            f"{m['together_epoch_s']:.1f} s, one after another {m['sequential_epoch_s']:.1f} s "
            f"= {m['together_speedup']:.2f}x; epoch-program memory {mib(m['program_bytes_together'])} "
            f"vs {mib(m['program_bytes_one_seed'])} for one seed"
        )
    return "\n".join(lines)


def bench_all(steps: int = 10, compare_torch: bool = True, log=print) -> list[dict]:
    """Every registered recipe at its own batch size: time per step of the epoch-chunk program
    (a tenth of an epoch a call) and, with ``compare_torch``, PyTorch eager's step beside it."""
    rows = []
    for name, recipe in RECIPES.items():
        programs = _programs(recipe)
        train_set = programs.place_data(_random_set(np.random.default_rng(0), 60_000))
        chunk = programs.chunks(60_000)[0][1]
        jax_step = time_chunk_steps(programs, train_set, chunk, max(3, steps // chunk + 1), 1)
        row = {
            "recipe": name,
            "model": recipe.model,
            "batch_size": recipe.batch_size,
            "conv_impl": device(recipe.conv_impl)["conv_impl"],
            "jax_step_s": jax_step["median_s"],
            "jax_step_p10_s": jax_step["p10_s"],
            "jax_step_p90_s": jax_step["p90_s"],
        }
        has_torch_class = recipe.model in ORIGINAL_MODEL_NAMES  # this project's own nets have none
        if compare_torch and has_torch_class:
            torch_step = bench_torch(recipe.model, recipe.batch_size, steps, 2)["train_step"]
            row.update(
                torch_step_s=torch_step["median_s"], speedup=torch_step["median_s"] / jax_step["median_s"]
            )
        rows.append(row)
        log(format_all_row(row, compare_torch))
    return rows


def format_all_row(row: dict, compare_torch: bool = False) -> str:
    text = f"| `{row['recipe']}` | {row['model']} | {row['batch_size']} | {row['jax_step_s'] * 1e3:.1f} |"
    if "torch_step_s" in row:
        text += f" {row['torch_step_s'] * 1e3:.1f} | {row['speedup']:.2f}x |"
    elif compare_torch:
        text += " — | — |"
    return text


def all_header(compare_torch: bool) -> str:
    if compare_torch:
        return (
            "| recipe | model | batch | JAX ms/step | PyTorch ms/step | JAX speedup |\n"
            "|---|---|---:|---:|---:|---:|"
        )
    return "| recipe | model | batch | JAX ms/step |\n|---|---|---:|---:|"


def write_json(result: dict, path) -> None:
    write_atomically(path, json.dumps(result, indent=2) + "\n")
