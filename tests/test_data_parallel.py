"""Data parallelism over a 1-D device mesh gives the single-device result (float tolerance)."""

import os
import subprocess
import sys

SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax_mnist.recipes import get_recipe, with_overrides
from jax_mnist.engine import Engine
assert jax.device_count() == 2, jax.devices()
recipe = with_overrides(get_recipe("final"), {"batch_size": 128, "eval_batch_size": 256})
rng = np.random.default_rng(0)
n = 300  # two full batches of 128 and a short one of 44
images = jnp.asarray(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8))
labels = jnp.asarray(rng.integers(0, 10, (n,), dtype=np.int32))
results = []
for devices in (jax.devices()[:1], jax.devices()):
    engine = Engine.from_recipe(recipe, n, devices=devices)
    assert (engine.mesh is None) == (len(devices) == 1)
    states, keys = engine.init_seeds([1])
    train_set = engine.put_shared((images, labels))
    states, sums = engine.train_epoch(states, *train_set, keys, 0)
    state = jax.tree_util.tree_map(lambda x: x[0], states)
    results.append((state, {k: v[0] for k, v in sums.items()}, engine.evaluate(state, *train_set)))
(s1, m1, e1), (s2, m2, e2) = results
diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves((s1.params, s1.batch_stats)),
                                                            jax.tree_util.tree_leaves((s2.params, s2.batch_stats))))
print("max difference", diff)
assert diff < 1e-4, diff
assert int(m1["count"]) == int(m2["count"]) == n
assert abs(float(m1["loss_sum"]) - float(m2["loss_sum"])) < 1e-3
assert e1["count"] == e2["count"] == n and abs(e1["accuracy"] - e2["accuracy"]) < 1e-6
print("ok")
"""


def test_two_host_devices_match_one():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
