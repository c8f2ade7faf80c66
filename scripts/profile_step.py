#!/usr/bin/env python
"""Where a training step's time goes: model 8, batch 256, variants timed in one process.

Prints the median time of: the forward pass (train mode), forward+backward, the full step
(augmentation, optimizer), and the step without dropout / without augmentation / with the XLA
convolution instead of im2col / with Flax's nn.Dropout (jax.random) instead of the fused dropout,
with threefry and with rbg keys; each with its compile time.
Usage: python scripts/profile_step.py [STEPS]
       python scripts/profile_step.py --ops [STEPS]   per-layer time of the full step's XLA ops
(Host memory: compare `jax-mnist bench` with and without JAX_MNIST_KEEP_HOST_MEMORY=0.)
"""

import functools
import statistics
import sys
import time

from jax_mnist import host_memory

host_memory.apply_from_env()  # first, before JAX's backend starts: keeps freed host memory
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jax_mnist import engine as core  # noqa: E402
from jax_mnist.recipes import get_recipe, with_overrides  # noqa: E402

OPS = "--ops" in sys.argv
ARGS = [a for a in sys.argv[1:] if a != "--ops"]
STEPS = int(ARGS[0]) if ARGS else 20
BATCH = 256
rng = np.random.default_rng(0)
images = jnp.asarray(rng.integers(0, 256, (BATCH, 28, 28, 1), dtype=np.uint8))
labels = jnp.asarray(rng.integers(0, 10, (BATCH,), dtype=np.int32))


def timed(fn, *args):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(STEPS):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return compile_s, statistics.median(times)


class Step:
    """One seed's training step of model 8's ``final`` recipe with ``overrides``, jitted with the
    XLA options the run's programs use (``options=False``: XLA's defaults)."""

    def __init__(self, options=True, **overrides):
        recipe = with_overrides(get_recipe("final"), {"batch_size": BATCH, **overrides})
        self.model = core.make_model(recipe, jax.devices()[0].platform)
        self.tx = core.make_optimizer(recipe, core.steps_per_epoch(60_000, BATCH))
        self.xla_options = core.compiler_options(jax.devices()[0]) if options else {}
        step = functools.partial(core.train_step, self.model, self.tx, core.make_augment(recipe))
        self.train_step = jax.jit(step, compiler_options=self.xla_options)

    def init(self, key):
        return core.init_state(self.model, self.tx, key)

    def loss(self, state, images01, key):
        logp, _ = self.model.apply(
            {"params": state.params, "batch_stats": state.batch_stats},
            images01,
            train=True,
            rngs={"dropout": key},
            mutable=["batch_stats"],
        )
        return core.training_loss(logp, labels)


def report(name, compile_s, step_s):
    print(
        f"{name:<44} compile {compile_s:6.2f} s   median {step_s * 1e3:7.1f} ms   {BATCH / step_s:7.0f} "
        "images/s"
    )


def op_breakdown(engine: Step, state, steps):
    """Per-step milliseconds of the step's XLA ops from a jax.profiler trace, summed by layer and pass.

    Ops run on two threads at once, so the sum exceeds the wall time of a step.
    """
    import collections
    import glob
    import re
    import tempfile

    from jax.profiler import ProfileData

    args = (state, images, labels, jax.random.key(1))
    step = engine.train_step
    op_names = {}  # XLA instruction -> JAX op name, read from the compiled HLO's metadata
    for line in step.lower(*args).compile().as_text().splitlines():
        match = re.match(r'\s+%(\S+) = .*?op_name="([^"]*)"', line)
        if match:
            op_names[match.group(1)] = match.group(2)
    jax.block_until_ready(step(*args))
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(steps):
            jax.block_until_ready(step(*args))
        jax.profiler.stop_trace()
        profile = ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
    totals = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name not in op_names:
                    continue
                op = op_names[event.name]
                layer = re.search(r"(convblock\d+/(conv|bn|Dropout_0)|pool\d|gap)", op)
                where = ("backward " if "transpose(" in op else "forward ") + (
                    layer.group(0) if layer else "other"
                )
                totals[where] += event.duration_ns / 1e6 / steps
    for where, ms in totals.most_common():
        print(f"{where:<36} {ms:7.2f} ms")
    print(f"{'sum of ops':<36} {sum(totals.values()):7.2f} ms")


base = Step()
state = base.init(jax.random.key(0))
x = core.normalize(core.preprocess(images))
key = jax.random.key(1)
if OPS:
    op_breakdown(base, state, STEPS)
    sys.exit(0)
forward = jax.jit(base.loss, compiler_options=base.xla_options)
report("forward (train mode, dropout)", *timed(forward, state, x, key))
grad = jax.jit(
    lambda s, x, k: jax.grad(lambda p: base.loss(s.replace(params=p), x, k))(s.params),
    compiler_options=base.xla_options,
)
report("forward + backward", *timed(grad, state, x, key))
report("full step (augment, fwd, bwd, SGD)", *timed(base.train_step, state, images, labels, key))
report("  default XLA:CPU options", *timed(Step(options=False).train_step, state, images, labels, key))
for name, kwargs, step_key in [
    ("  without dropout", {"dropout_rate": 0.0}, key),
    ("  without augmentation", {"augment": "none"}, key),
    ("  XLA conv instead of im2col", {"conv_impl": "xla"}, key),
    ("  flax nn.Dropout instead of fused", {"dropout_impl": "flax"}, key),
    ("  flax nn.Dropout, rbg PRNG", {"dropout_impl": "flax"}, jax.random.key(1, impl="rbg")),
]:
    engine = Step(**kwargs)
    report(name, *timed(engine.train_step, engine.init(jax.random.key(0)), images, labels, step_key))
