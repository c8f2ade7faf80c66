"""Pure-functional training: state as data, one jitted step, compiled chunks of an epoch, padded eval.

- ``TrainState`` holds params, batch_stats, optimizer state and the step count.
- ``Engine.train_step(state, images, labels, step_stream)`` is one SGD step of one seed: uint8
  images are scaled, augmented and normalised inside the compiled code, with the keys of
  ``streams.step_keys(step_stream, state.step)``.
- ``Engine.train_epoch`` runs one epoch of K seeds at once: states stacked on a leading seed
  axis, each seed with its own shuffle order, augmentation and dropout (``jax.vmap``). The
  epoch is a few calls of one compiled program (a loop over a range of steps, so every chunk
  size is the same program) plus the short last batch; progress is reported from Python
  between the calls, never by a host callback inside compiled code.
- ``Engine.evaluate`` / ``evaluate_seeds`` score every test image for any batch size (pad and mask).
- ``Engine.from_recipe`` builds one engine per configuration and returns it again for the same
  configuration, so its compiled programs are reused (nothing recompiles).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jax_mnist import augment as augment_lib
from jax_mnist import hosts, schedules
from jax_mnist.data import MEAN, STD
from jax_mnist.layers import resolve_conv_impl
from jax_mnist.recipes import Recipe
from jax_mnist.streams import RunKeys, run_keys, shuffle_key, stacked_run_keys, step_keys
from jax_mnist.zoo import S7Net, get_model, init_variables


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


def training_loss(logp: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean cross-entropy against (1 - e) * one-hot + e / classes (PyTorch's ``label_smoothing``)."""
    loss = nll(logp, labels)
    if label_smoothing:  # a Python float: no smoothing compiles the plain NLL, as before
        loss = (1.0 - label_smoothing) * loss - label_smoothing * logp.mean(axis=-1)
    return loss.mean()


def batch_metrics(logp: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """Summed loss, correct count and example count of one batch (``mask`` leaves padding out).

    Training and evaluation both sum these; means are taken once, over a whole epoch or test set.
    """
    if mask is None:
        mask = jnp.ones(labels.shape, bool)
    return {
        "loss_sum": jnp.sum(jnp.where(mask, nll(logp, labels), 0.0)),
        "correct": jnp.sum((jnp.argmax(logp, -1) == labels) & mask, dtype=jnp.int32),
        "count": jnp.sum(mask, dtype=jnp.int32),
    }


def zero_metrics(shape=()) -> dict[str, jax.Array]:
    return {"loss_sum": jnp.zeros(shape), "correct": jnp.zeros(shape, jnp.int32), "count": jnp.zeros(shape, jnp.int32)}


def over_seeds(fn: Callable, in_axes: Sequence[int | None], strategy: str = "vmap") -> Callable:
    """``fn`` applied to each seed of arguments stacked on a leading seed axis (``in_axes`` 0;
    None for shared arguments).

    One seed runs ``fn`` itself on the unstacked arguments, so a single-seed run is exactly the
    computation of an engine without a seed axis. Several seeds run ``jax.vmap(fn)``
    (``strategy="vmap"``: one batched program, what fills an accelerator) or ``lax.map`` of
    ``fn`` (``"map"``: the seeds one after another inside one compiled program; on XLA:CPU
    this is about 20 % faster than vmap, docs/benchmarks.md). Both compute the same function.
    """

    def apply(*args):
        # Over all stacked leaves: an argument may have none (batch_stats of a model without BN).
        stacked_leaves = jax.tree_util.tree_leaves([a for a, axis in zip(args, in_axes) if axis == 0])
        (count,) = {leaf.shape[0] for leaf in stacked_leaves}
        if count > 1 and strategy == "vmap":
            return jax.vmap(fn, in_axes=tuple(in_axes))(*args)
        if count > 1:
            stacked = [a for a, axis in zip(args, in_axes) if axis == 0]

            def one_seed(per_seed):
                seed_args = iter(per_seed)
                return fn(*(next(seed_args) if axis == 0 else a for a, axis in zip(args, in_axes)))

            return jax.lax.map(one_seed, stacked)
        out = fn(*(seed_slice(a, 0) if axis == 0 else a for a, axis in zip(args, in_axes)))
        return jax.tree_util.tree_map(lambda x: x[None], out)

    return apply


def resolve_seed_axis(seed_axis: str, platform: str) -> str:
    """``"auto"``: ``lax.map`` over seeds on CPU (faster there), ``vmap`` on GPU/TPU."""
    if seed_axis == "auto":
        return "map" if platform == "cpu" else "vmap"
    return seed_axis


def stack_seeds(trees: Sequence[Any]) -> Any:
    """Trees of the same structure stacked on a new leading (seed) axis."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def seed_slice(tree: Any, index: int) -> Any:
    """Seed ``index`` of a tree stacked on a leading seed axis."""
    return jax.tree_util.tree_map(lambda x: x[index], tree)


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
    """The compiled functions of one training configuration.

    Build it with ``Engine.from_recipe``, which returns the same engine (and so the same
    compiled programs) for the same recipe, training-set size and devices.
    """

    model: S7Net
    tx: optax.GradientTransformation
    augment: Callable[[jax.Array, jax.Array], jax.Array]
    batch_size: int
    eval_batch_size: int
    # Several devices: a 1-D mesh (axis "devices"). Seeds are split over it when their number
    # is a multiple of the device count (no traffic between devices), else every batch is.
    mesh: Mesh | None = None
    # Passed to every jax.jit of the engine (see compiler_options).
    xla_options: dict = field(default_factory=dict, compare=False, hash=False)
    # How stacked seeds are computed: "vmap" or "map" (see over_seeds).
    seed_axis: str = "vmap"
    # The learning rate per optimizer step (for the metrics; the optimizer holds its own copy).
    lr_schedule: Callable | None = field(default=None, compare=False, hash=False)
    label_smoothing: float = 0.0  # of the training loss (Recipe.label_smoothing)

    @classmethod
    def from_recipe(cls, recipe: Recipe, num_train_examples: int, devices=None) -> "Engine":
        """``devices``: the devices to run on (default: all devices, of every process of a
        multi-process run: see ``jax_mnist.hosts``)."""
        devices = tuple(jax.devices() if devices is None else devices)
        return _engine_for(recipe, num_train_examples, devices)

    @classmethod
    def build(cls, recipe: Recipe, num_train_examples: int, devices: Sequence) -> "Engine":
        """A new engine (new compiled programs); ``from_recipe`` reuses one per configuration."""
        overrides = {} if recipe.dropout_rate is None else {"dropout_rate": recipe.dropout_rate}
        conv_impl = resolve_conv_impl(recipe.conv_impl, devices[0].platform)
        per_epoch = steps_per_epoch(num_train_examples, recipe.batch_size)
        return cls(
            model=get_model(recipe.model, conv_impl=conv_impl, dropout_impl=recipe.dropout_impl, **overrides),
            tx=make_optimizer(recipe, per_epoch),
            augment=make_augment(recipe),
            batch_size=recipe.batch_size,
            eval_batch_size=recipe.eval_batch_size,
            mesh=Mesh(np.array(devices), ("devices",)) if len(devices) > 1 else None,
            xla_options=compiler_options(_local(devices)),
            seed_axis=resolve_seed_axis(recipe.seed_axis, devices[0].platform),
            lr_schedule=make_schedules(recipe, per_epoch)[0],
            label_smoothing=recipe.label_smoothing,
        )

    @functools.cached_property
    def _learning_rate(self):
        return jax.jit(self.lr_schedule)

    def learning_rate(self, step: int) -> float:
        """The float32 learning rate of optimizer step ``step`` (compiled once: eager ``jnp.power``
        would compile anew for every new exponent)."""
        return float(self._learning_rate(jnp.asarray(step, jnp.int32)))

    # ------------------------------------------------------------------ placement

    def splits_seeds(self, seeds: int) -> bool:
        """Whether ``seeds`` stacked seeds are split over the devices (else batches are)."""
        return self.mesh is not None and seeds % self.mesh.size == 0

    def seed_strategy(self, seeds: int) -> str:
        """vmap when the seeds are split over devices (a loop over a split axis would serialise them)."""
        return "vmap" if self.splits_seeds(seeds) else self.seed_axis

    def shard_batch(self, *arrays):
        """Split arrays along their first (batch) axis over the mesh; a no-op on one device.

        The computation keeps its global meaning (BatchNorm statistics stay over the
        whole batch): XLA inserts the cross-device reductions.
        """
        if self.mesh is None or arrays[0].shape[0] % self.mesh.size:
            return arrays
        sharding = NamedSharding(self.mesh, PartitionSpec("devices"))
        return tuple(jax.lax.with_sharding_constraint(a, sharding) for a in arrays)

    def put_shared(self, tree):
        """Arrays every seed reads (the data sets): on the device, or on every device of the mesh."""
        if self.mesh is None:
            return jax.device_put(tree)
        return hosts.put(tree, NamedSharding(self.mesh, PartitionSpec()))

    def put_seeds(self, tree):
        """Arrays stacked on a leading seed axis: split over the devices when they split seeds."""
        if self.mesh is None:
            return jax.device_put(tree)
        seeds = jax.tree_util.tree_leaves(tree)[0].shape[0]
        spec = PartitionSpec("devices") if self.splits_seeds(seeds) else PartitionSpec()
        return hosts.put(tree, NamedSharding(self.mesh, spec))

    # ------------------------------------------------------------------ state

    def init(self, key: jax.Array) -> TrainState:
        variables = init_variables(self.model, key)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            opt_state=self.tx.init(variables["params"]),
        )

    def init_seeds(self, seeds: Sequence[int]) -> tuple[TrainState, RunKeys]:
        """Initial states and run keys of ``seeds``, stacked on a leading seed axis and placed.

        Each seed is initialised on its own, exactly as a single-seed run of it.
        """
        keys = stacked_run_keys(seeds)
        states = stack_seeds([self.init(run_keys(s).init) for s in seeds])
        return self.put_seeds(states), self.put_seeds(keys)

    # ------------------------------------------------------------------ step

    def loss_fn(self, params, batch_stats, images, labels, dropout_key):
        logp, updates = self.model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=True,
            rngs={"dropout": dropout_key},
            mutable=["batch_stats"],
        )
        return training_loss(logp, labels, self.label_smoothing), (logp, updates.get("batch_stats", batch_stats))

    def _train_step(self, state: TrainState, images_uint8, labels, step_stream, split_batch: bool = True):
        if split_batch:
            images_uint8, labels = self.shard_batch(images_uint8, labels)
        augment_key, dropout_key = step_keys(step_stream, state.step)
        images = normalize(self.augment(augment_key, preprocess(images_uint8)))
        grad_fn = jax.value_and_grad(self.loss_fn, has_aux=True)
        (_, (logp, batch_stats)), grads = grad_fn(state.params, state.batch_stats, images, labels, dropout_key)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        return new_state, batch_metrics(logp, labels)

    @functools.cached_property
    def train_step(self):
        """jit(state, uint8 images (B, 28, 28, 1), int labels (B,), step stream key) -> (state, metrics).

        One seed, no seed axis; the augmentation and dropout keys are those of ``state.step``.
        """
        return jax.jit(self._train_step, compiler_options=self.xla_options)

    def _seeds_step(self, states, train_images, train_labels, batch_indices, step_streams):
        """One step of every seed: batch ``batch_indices[k]`` (into the shared train set) for seed k."""
        split_batch = not self.splits_seeds(batch_indices.shape[0])

        def one_seed(state, indices, step_stream):
            return self._train_step(state, train_images[indices], train_labels[indices], step_stream, split_batch)

        return over_seeds(one_seed, (0, 0, 0), self.seed_strategy(batch_indices.shape[0]))(states, batch_indices, step_streams)

    # ------------------------------------------------------------------ epoch

    def _train_steps(self, states, train_images, train_labels, orders, step_streams, first, last):
        """Steps ``first`` .. ``last - 1`` of an epoch over full batches; metrics summed per seed.

        ``first``/``last`` are traced: every chunk of every epoch runs this one program.
        """
        seeds = orders.shape[0]

        def body(j, carry):
            states, sums = carry
            indices = jax.lax.dynamic_slice_in_dim(orders, j * self.batch_size, self.batch_size, axis=1)
            states, metrics = self._seeds_step(states, train_images, train_labels, indices, step_streams)
            return states, jax.tree_util.tree_map(jnp.add, sums, metrics)

        return jax.lax.fori_loop(first, last, body, (states, zero_metrics((seeds,))))

    def _train_last(self, states, train_images, train_labels, orders, step_streams):
        """The short last batch of an epoch (every example is used once per epoch)."""
        full = orders.shape[1] // self.batch_size
        return self._seeds_step(states, train_images, train_labels, orders[:, full * self.batch_size :], step_streams)

    def _shuffle(self, shuffle_streams, epoch, num_examples: int):
        return jax.vmap(lambda k: jax.random.permutation(shuffle_key(k, epoch), num_examples))(shuffle_streams)

    @functools.cached_property
    def _programs(self) -> dict[str, Callable]:
        jit = functools.partial(jax.jit, compiler_options=self.xla_options)
        return {
            "shuffle": jit(self._shuffle, static_argnums=(2,)),
            "steps": jit(self._train_steps, donate_argnums=(0,)),
            "last": jit(self._train_last, donate_argnums=(0,)),
            "evaluate": jit(self._evaluate_seeds),
        }

    def epoch_chunks(self, num_examples: int, chunks: int = 10) -> list[tuple[int, int]]:
        """The ranges of full-batch steps that ``train_epoch`` runs as separate calls."""
        full = num_examples // self.batch_size
        size = max(1, -(-full // chunks))
        return [(first, min(first + size, full)) for first in range(0, full, size)]

    def train_epoch(self, states, train_images, train_labels, keys: RunKeys, epoch: int,
                    progress: Callable[[int, dict], None] | None = None, chunks: int = 10):  # fmt: skip
        """One pass of every seed over the (device-resident) training set.

        ``states``/``keys`` are stacked on a leading seed axis (``init_seeds``); ``states`` is
        donated. Returns (states, per-seed summed metrics as numpy arrays). ``progress``, if
        given, is called from Python after each chunk with the steps done and the metrics so far.
        """
        programs = self._programs
        n = train_labels.shape[0]
        orders = programs["shuffle"](keys.shuffle, jnp.asarray(epoch, jnp.int32), n)
        totals = None
        pending = None  # the previous chunk's metrics: read after the next chunk is queued
        for first, last in self.epoch_chunks(n, chunks):
            states, sums = programs["steps"](states, train_images, train_labels, orders, keys.step,
                                             jnp.asarray(first, jnp.int32), jnp.asarray(last, jnp.int32))  # fmt: skip
            if pending is not None:
                totals = _add_host(totals, *pending, progress)
            pending = (sums, last)
        if n % self.batch_size:
            states, sums = programs["last"](states, train_images, train_labels, orders, keys.step)
            if pending is not None:
                totals = _add_host(totals, *pending, progress)
            pending = (sums, steps_per_epoch(n, self.batch_size))
        totals = _add_host(totals, *pending, progress)
        return states, totals

    # ------------------------------------------------------------------ eval

    def _evaluate(self, params, batch_stats, images_uint8, labels):
        n = labels.shape[0]
        batches = -(-n // self.eval_batch_size)
        pad = batches * self.eval_batch_size - n
        images = jnp.pad(images_uint8, ((0, pad), (0, 0), (0, 0), (0, 0)))
        padded_labels = jnp.pad(labels, (0, pad))
        mask = jnp.arange(batches * self.eval_batch_size) < n
        shape = (batches, self.eval_batch_size)

        def body(totals, batch):
            x, y, m = self.shard_batch(*batch)
            logp = self.model.apply({"params": params, "batch_stats": batch_stats}, normalize(preprocess(x)), train=False)
            return jax.tree_util.tree_map(jnp.add, totals, batch_metrics(logp, y, m)), None

        batched = (images.reshape(*shape, *images.shape[1:]), padded_labels.reshape(shape), mask.reshape(shape))
        totals, _ = jax.lax.scan(body, zero_metrics(), batched)
        return totals

    def _evaluate_seeds(self, params, batch_stats, images_uint8, labels):
        strategy = self.seed_strategy(jax.tree_util.tree_leaves(params)[0].shape[0])
        return over_seeds(self._evaluate, (0, 0, None, None), strategy)(params, batch_stats, images_uint8, labels)

    @functools.cached_property
    def _evaluate_jit(self):
        return jax.jit(self._evaluate, compiler_options=self.xla_options)

    def evaluate(self, state: TrainState, images_uint8, labels) -> dict[str, float]:
        """Mean NLL, accuracy (%) and count over every example, for any eval batch size (one seed)."""
        return _means(jax.device_get(self._evaluate_jit(state.params, state.batch_stats, images_uint8, labels)))

    def evaluate_seeds(self, states: TrainState, images_uint8, labels) -> list[dict[str, float]]:
        """``evaluate`` of each seed of stacked ``states``; images and labels shared."""
        sums = hosts.to_host(self._programs["evaluate"](states.params, states.batch_stats, images_uint8, labels))
        return [_means(seed_slice(sums, k)) for k in range(len(sums["count"]))]


def _means(sums: dict) -> dict[str, float]:
    count = int(sums["count"])
    return {"loss": float(sums["loss_sum"]) / count, "accuracy": 100.0 * int(sums["correct"]) / count, "count": count}


def _add_host(totals, sums, steps_done: int, progress):
    """Running per-seed totals on the host (this waits for ``sums``); reports progress."""
    sums = hosts.to_host(sums)
    totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
    if progress is not None:
        progress(steps_done, totals)
    return totals


def _local(devices: Sequence):
    """A device of this process among ``devices`` (what this process can compile a probe for)."""
    return next((d for d in devices if d.process_index == jax.process_index()), devices[0])


@functools.lru_cache(maxsize=16)
def _engine_for(recipe: Recipe, num_train_examples: int, devices: tuple) -> Engine:
    return Engine.build(recipe, num_train_examples, devices)
