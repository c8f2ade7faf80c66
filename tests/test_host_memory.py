"""host_memory keeps XLA:CPU's per-step buffers mapped (no page faults per training step) when the
command or a script applies it; importing jax_mnist alone changes nothing."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # every test here spawns processes

# Model 8's training step at batch 256 with im2col convolutions frees a 192 MB temporary block
# after every call (its patch matrices; oneDNN's kernels make none), which the settings keep mapped.
PROBE = """
import resource
from jax_mnist import host_memory
host_memory.apply_from_env()  # what the jax-mnist command and the scripts do first
import jax, jax.numpy as jnp
from jax_mnist.recipes import get_recipe, with_overrides
from jax_mnist.engine import ProgramConfig, programs_for
recipe = with_overrides(get_recipe("final"), {"batch_size": 256, "dropout_rate": 0.0, "conv_impl": "im2col"})
programs = programs_for(ProgramConfig(recipe, 256))
states, keys = programs.init_seeds([0])
data = programs.place_data((jnp.zeros((256, 28, 28, 1), jnp.uint8), jnp.zeros((256,), jnp.int32)))
orders = programs.shuffle(keys.shuffle, 0)
first, last = jnp.asarray(0, jnp.int32), jnp.asarray(1, jnp.int32)
def step():  # one step of the epoch-chunk program training runs
    global states
    states, sums = programs.train_chunk(states, *data, orders, keys.step, first, last)
    jax.block_until_ready((states, sums))
step()
faults = []
for _ in range(5):  # the heap may still grow once while it settles: the median counts
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(host_memory.applied(), sorted(faults)[2])
"""

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)


def probe(keep: str) -> tuple[bool, float]:
    env = {**os.environ, "JAX_MNIST_KEEP_HOST_MEMORY": keep, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", float(faults)


@glibc_only
def test_train_step_reuses_host_memory():
    applied, faults = probe("1")
    off_applied, off_faults = probe("0")
    assert applied and not off_applied
    # 192 MB of fresh 4 KB pages is ~47,000 faults per step without the settings.
    assert off_faults > 20_000, off_faults
    assert faults < 2_000, faults


def test_import_changes_no_process_setting():
    code = (
        "import jax_mnist, jax_mnist.engine, jax_mnist.run, jax_mnist.cli; from jax_mnist import "
        "host_memory; "
        "print(host_memory.applied())"
    )
    env = {**os.environ, "JAX_MNIST_KEEP_HOST_MEMORY": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
