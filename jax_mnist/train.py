"""Pure-functional training: state as data, one jitted step, a compiled epoch, padded evaluation.

- ``TrainState`` holds params, batch_stats, optimizer state and the step count.
- ``train_step(state, images, labels, key)`` is one SGD step: uint8 images are
  scaled, augmented and normalised inside the compiled code.
- ``train_epoch`` shuffles the on-device training set and runs every example
  once (``lax.scan`` over full batches, then the short last batch), keyed per
  step by ``fold_in(run_key, step)`` so a resumed run replays exactly.
- ``evaluate`` scores every test image for any batch size (pad and mask).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jax_mnist import augment as augment_lib
from jax_mnist import schedules
from jax_mnist.data import MEAN, STD
from jax_mnist.models import S7Net, get_model, init_variables
from jax_mnist.recipes import Recipe


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


# --------------------------------------------------------------------------- optimizer


def torch_sgd(learning_rate, momentum, weight_decay=0.0, nesterov=False) -> optax.GradientTransformation:
    """PyTorch's SGD: weight decay added to the gradient, then the momentum buffer."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )


def make_schedules(recipe: Recipe, steps_per_epoch: int) -> tuple[schedules.Schedule, schedules.Schedule]:
    """(learning rate, momentum) per optimizer step for ``recipe``."""
    momentum = schedules.constant(recipe.momentum)
    if recipe.schedule == "constant":
        return schedules.constant(recipe.lr), momentum
    if recipe.schedule == "step":
        return schedules.step_lr(recipe.lr, recipe.step_size, recipe.gamma, steps_per_epoch), momentum
    lr, cycled = schedules.one_cycle(
        recipe.lr,
        recipe.epochs * steps_per_epoch,
        pct_start=recipe.pct_start,
        anneal=recipe.anneal,
        div_factor=recipe.div_factor,
        final_div_factor=recipe.final_div_factor,
        three_phase=recipe.three_phase,
        base_momentum=recipe.base_momentum,
        max_momentum=recipe.max_momentum,
    )
    return lr, (cycled if recipe.cycle_momentum else momentum)


def make_optimizer(recipe: Recipe, steps_per_epoch: int) -> optax.GradientTransformation:
    lr, momentum = make_schedules(recipe, steps_per_epoch)
    return optax.inject_hyperparams(torch_sgd)(
        learning_rate=lr, momentum=momentum, weight_decay=recipe.weight_decay, nesterov=recipe.nesterov
    )


def make_augment(recipe: Recipe) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """(key, images in [0, 1]) -> images; black is 0 at this point."""
    if recipe.augment == "rotate":
        return functools.partial(augment_lib.random_rotation, degrees=recipe.degrees, fill=0.0)
    if recipe.augment == "affine":
        return functools.partial(
            augment_lib.random_affine,
            degrees=recipe.degrees,
            translate=recipe.translate,
            scale=(recipe.scale_min, recipe.scale_max),
            fill=0.0,
        )
    return lambda key, images: images


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return -(-num_examples // batch_size)


# --------------------------------------------------------------------------- engine


def preprocess(images_uint8: jax.Array) -> jax.Array:
    return images_uint8.astype(jnp.float32) / 255.0


def normalize(images01: jax.Array) -> jax.Array:
    return (images01 - MEAN) / STD


def nll(logp: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example negative log-likelihood of ``labels`` under log-probabilities ``logp``."""
    return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]


# With its older elemental fusion emitters XLA:CPU compiles model 8's training step in about
# two thirds of the time, and the step runs no slower (docs/benchmarks.md, profile_step.py).
_CPU_COMPILER_OPTIONS = (("xla_cpu_use_fusion_emitters", False),)


@functools.lru_cache(maxsize=None)
def _compiler_options_for(device) -> tuple[tuple[str, Any], ...]:
    if device.platform != "cpu":
        return ()
    try:  # an XLA that no longer knows the option refuses it: then compile with the defaults
        probe = jax.jit(lambda x: x + 1, compiler_options=dict(_CPU_COMPILER_OPTIONS))
        probe.lower(jax.device_put(jnp.zeros(()), device)).compile()
    except Exception:  # noqa: BLE001  (XLA raises its own runtime error type)
        return ()
    return _CPU_COMPILER_OPTIONS


def compiler_options(device) -> dict[str, Any]:
    """XLA options for the engine's compiled functions on ``device`` (empty off CPU)."""
    return dict(_compiler_options_for(device))


@dataclass(frozen=True)
class Engine:
    """The compiled functions of one training configuration."""

    model: S7Net
    tx: optax.GradientTransformation
    augment: Callable[[jax.Array, jax.Array], jax.Array]
    batch_size: int
    eval_batch_size: int
    # Data parallelism: batches are split over this 1-D mesh (axis "data"); None on one device.
    mesh: Mesh | None = None
    # Passed to every jax.jit of the engine (see compiler_options).
    xla_options: dict = field(default_factory=dict, compare=False, hash=False)
    _epoch_cache: dict = field(default_factory=dict, init=False, compare=False, hash=False, repr=False)

    @classmethod
    def from_recipe(cls, recipe: Recipe, num_train_examples: int, devices=None) -> "Engine":
        """``devices``: the devices to split batches over (default: all local devices)."""
        devices = jax.local_devices() if devices is None else list(devices)
        overrides = {} if recipe.dropout_rate is None else {"dropout_rate": recipe.dropout_rate}
        return cls(
            model=get_model(recipe.model, **overrides),
            tx=make_optimizer(recipe, steps_per_epoch(num_train_examples, recipe.batch_size)),
            augment=make_augment(recipe),
            batch_size=recipe.batch_size,
            eval_batch_size=recipe.eval_batch_size,
            mesh=Mesh(np.array(devices), ("data",)) if len(devices) > 1 else None,
            xla_options=compiler_options(devices[0]),
        )

    def shard_batch(self, *arrays):
        """Split arrays along their first (batch) axis over the mesh; a no-op on one device.

        The computation keeps its global meaning (BatchNorm statistics stay over the
        whole batch): XLA inserts the cross-device reductions.
        """
        if self.mesh is None or arrays[0].shape[0] % self.mesh.size:
            return arrays
        sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        return tuple(jax.lax.with_sharding_constraint(a, sharding) for a in arrays)

    def init(self, key: jax.Array) -> TrainState:
        variables = init_variables(self.model, key)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            opt_state=self.tx.init(variables["params"]),
        )

    # ------------------------------------------------------------------ step

    def loss_fn(self, params, batch_stats, images, labels, dropout_key):
        logp, updates = self.model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=True,
            rngs={"dropout": dropout_key},
            mutable=["batch_stats"],
        )
        return nll(logp, labels).mean(), (logp, updates.get("batch_stats", batch_stats))

    def _train_step(self, state: TrainState, images_uint8, labels, key):
        images_uint8, labels = self.shard_batch(images_uint8, labels)
        augment_key, dropout_key = jax.random.split(key)
        images = normalize(self.augment(augment_key, preprocess(images_uint8)))
        grad_fn = jax.value_and_grad(self.loss_fn, has_aux=True)
        (loss, (logp, batch_stats)), grads = grad_fn(state.params, state.batch_stats, images, labels, dropout_key)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        n = labels.shape[0]
        metrics = {
            "loss_sum": loss * n,
            "correct": jnp.sum(jnp.argmax(logp, -1) == labels),
            "count": jnp.asarray(n, jnp.int32),
        }
        new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        return new_state, metrics

    @functools.cached_property
    def train_step(self):
        """jit(state, uint8 images (B, 28, 28, 1), int labels (B,), key) -> (state, metrics)."""
        return jax.jit(self._train_step, compiler_options=self.xla_options)

    # ------------------------------------------------------------------ epoch

    def _train_epoch(self, state, train_images, train_labels, run_key, epoch, progress=None):
        n = train_labels.shape[0]
        order = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(run_key, 1), epoch), n)
        full = n // self.batch_size

        def step(state, batch_index):
            next_state, metrics = self._train_step(
                state, train_images[batch_index], train_labels[batch_index], jax.random.fold_in(run_key, state.step)
            )
            if progress is not None:
                jax.debug.callback(progress, next_state.step)
            return next_state, metrics

        totals = {"loss_sum": jnp.zeros(()), "correct": jnp.zeros((), jnp.int32), "count": jnp.zeros((), jnp.int32)}
        if full:
            state, per_step = jax.lax.scan(step, state, order[: full * self.batch_size].reshape(full, self.batch_size))
            totals = jax.tree_util.tree_map(lambda x: x.sum(0), per_step)
        if n % self.batch_size:  # the short last batch: every example is used once per epoch
            state, last = step(state, order[full * self.batch_size :])
            totals = jax.tree_util.tree_map(jnp.add, totals, last)
        return state, totals

    def train_epoch(self, state, train_images, train_labels, run_key, epoch, progress=None):
        """One pass over the (device-resident) training set; returns (state, summed metrics).

        ``state`` is donated (its buffers are reused). ``progress``, if given, is
        called from the device with the step count after every step.
        """
        if progress not in self._epoch_cache:
            self._epoch_cache[progress] = jax.jit(
                functools.partial(self._train_epoch, progress=progress),
                donate_argnums=(0,),
                compiler_options=self.xla_options,
            )
        return self._epoch_cache[progress](state, train_images, train_labels, run_key, jnp.asarray(epoch, jnp.int32))

    # ------------------------------------------------------------------ eval

    def _evaluate(self, params, batch_stats, images_uint8, labels):
        n = labels.shape[0]
        batches = -(-n // self.eval_batch_size)
        pad = batches * self.eval_batch_size - n
        images = jnp.pad(images_uint8, ((0, pad), (0, 0), (0, 0), (0, 0)))
        padded_labels = jnp.pad(labels, (0, pad))
        mask = jnp.arange(batches * self.eval_batch_size) < n
        shape = (batches, self.eval_batch_size)

        def body(carry, batch):
            x, y, m = self.shard_batch(*batch)
            logp = self.model.apply({"params": params, "batch_stats": batch_stats}, normalize(preprocess(x)), train=False)
            loss_sum, correct, count = carry
            return (
                loss_sum + jnp.sum(jnp.where(m, nll(logp, y), 0.0)),
                correct + jnp.sum((jnp.argmax(logp, -1) == y) & m),
                count + jnp.sum(m),
            ), None

        init = (jnp.zeros(()), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
        batched = (images.reshape(*shape, *images.shape[1:]), padded_labels.reshape(shape), mask.reshape(shape))
        (loss_sum, correct, count), _ = jax.lax.scan(body, init, batched)
        return {"loss": loss_sum / count, "accuracy": 100.0 * correct / count, "count": count}

    @functools.cached_property
    def _evaluate_jit(self):
        return jax.jit(self._evaluate, compiler_options=self.xla_options)

    def evaluate(self, state: TrainState, images_uint8, labels) -> dict[str, float]:
        """Mean NLL, accuracy (%) and count over every example, for any eval batch size."""
        out = self._evaluate_jit(state.params, state.batch_stats, images_uint8, labels)
        return {"loss": float(out["loss"]), "accuracy": float(out["accuracy"]), "count": int(out["count"])}
