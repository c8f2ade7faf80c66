"""The programs that training runs: the step math as pure functions, and their compiled bundle.

Pure functions (no state, no placement; model, optimizer and augmentation are arguments):

- ``train_step(model, tx, augment, state, images_uint8, labels, step_stream)`` is one SGD step of
  one seed: uint8 images are scaled, augmented and normalised inside the compiled code, with the
  keys of ``streams.step_keys(step_stream, state.step)``;
- ``eval_sums(model, params, batch_stats, images_uint8, labels, batch_size)`` scores every image
  for any batch size (pad and mask);
- ``train_chunk`` / ``train_last`` / ``shuffle_orders``: an epoch's full-batch steps
  ``first .. last - 1`` (a ``fori_loop``, so every chunk size is one program), its short last
  batch, and each seed's order of the examples; ``over_seeds`` maps a one-seed function over a
  leading seed axis.

``Programs`` is the bundle a run executes, compiled for one hashable ``ProgramConfig`` (recipe,
training-set size, number of seeds, devices) and, for a recipe that distils, its loaded teacher:
``shuffle``, ``train_chunk``, ``train_last``, ``evaluate`` and ``learning_rate``, each a
``jax.jit`` that states its shardings (``in_shardings``/``out_shardings``), plus
``place_states`` / ``place_data`` that put arrays where those programs take them.
``programs_for(config, teacher)`` returns the same bundle for the same config and teacher, so
nothing recompiles. ``state_like(recipe, n)`` is the tree a recipe's train state has (what a
checkpoint is restored into). Nothing here reads or writes a file: the loop over an epoch's
chunks, with progress, is in ``jax_mnist.run``, a run's files in ``jax_mnist.rundir``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec, make_single_device_sharding

from jax_mnist import augment as augment_lib
from jax_mnist import hosts, schedules
from jax_mnist.data import MEAN, STD
from jax_mnist.distill import Teacher, distillation_loss
from jax_mnist.layers import resolve_conv_impl
from jax_mnist.recipes import Recipe
from jax_mnist.streams import RunKeys, run_keys, shuffle_key, stacked_run_keys, step_keys
from jax_mnist.zoo import S7Net, get_model, init_variables


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    # {"params", "batch_stats"} averaged over the steps (a recipe with ``ema`` > 0); None, an empty
    # subtree, otherwise: a state without an average has exactly the leaves it had before.
    ema: Any = None


def inference_weights(state: TrainState) -> tuple[Any, Any]:
    """(params, batch_stats) that ``state`` is scored and used with: the average when it keeps one."""
    if state.ema is None:
        return state.params, state.batch_stats
    return state.ema["params"], state.ema["batch_stats"]


Augment = Callable[[jax.Array, jax.Array], jax.Array]


# --------------------------------------------------------------------------- a recipe's pieces


def torch_sgd(learning_rate, momentum, weight_decay=0.0, nesterov=False) -> optax.GradientTransformation:
    """PyTorch's SGD: weight decay added to the gradient, then the momentum buffer."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )


def make_optimizer(recipe: Recipe, steps_per_epoch: int) -> optax.GradientTransformation:
    lr, momentum = schedules.for_recipe(recipe, steps_per_epoch)
    return optax.inject_hyperparams(torch_sgd)(
        learning_rate=lr, momentum=momentum, weight_decay=recipe.weight_decay, nesterov=recipe.nesterov
    )


def make_augment(recipe: Recipe) -> Augment:
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


def make_model(recipe: Recipe, platform: str, devices: int = 1) -> S7Net:
    """The recipe's network, its convolution lowered for ``devices`` devices of ``platform``
    ("cpu", "gpu", "tpu")."""
    overrides = {} if recipe.dropout_rate is None else {"dropout_rate": recipe.dropout_rate}
    conv_impl = resolve_conv_impl(recipe.conv_impl, platform, devices)
    return get_model(recipe.model, conv_impl=conv_impl, dropout_impl=recipe.dropout_impl, **overrides)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return -(-num_examples // batch_size)


# --------------------------------------------------------------------------- step math


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
    return {
        "loss_sum": jnp.zeros(shape),
        "correct": jnp.zeros(shape, jnp.int32),
        "count": jnp.zeros(shape, jnp.int32),
    }


def means(sums: dict) -> dict[str, float]:
    """Mean loss, accuracy (%) and count of summed metrics (host values)."""
    count = int(sums["count"])
    return {
        "loss": float(sums["loss_sum"]) / count,
        "accuracy": 100.0 * int(sums["correct"]) / count,
        "count": count,
    }


def _no_constraint(*arrays):
    return arrays


def init_state(
    model: S7Net, tx: optax.GradientTransformation, key: jax.Array, ema: bool = False
) -> TrainState:
    """A new state; with ``ema`` its average starts at the initial weights."""
    variables = init_variables(model, key)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        ema=dict(variables) if ema else None,
    )


def state_like(recipe: Recipe, num_train_examples: int) -> TrainState:
    """The shapes and dtypes of ``recipe``'s train state (what a checkpoint is restored into)."""
    tx = make_optimizer(recipe, steps_per_epoch(num_train_examples, recipe.batch_size))
    model = get_model(recipe.model)
    return jax.eval_shape(lambda key: init_state(model, tx, key, ema=recipe.ema > 0), jax.random.key(0))


def update_average(average: dict, weights: dict, decay: float) -> dict:
    """One step of the moving average: ``decay * average + (1 - decay) * weights``, leaf by leaf."""
    return optax.incremental_update(weights, average, step_size=1.0 - decay)


def train_step(
    model: S7Net,
    tx: optax.GradientTransformation,
    augment: Augment,
    state: TrainState,
    images_uint8: jax.Array,
    labels: jax.Array,
    step_stream: jax.Array,
    *,
    label_smoothing: float = 0.0,
    split_batch: Callable = _no_constraint,
    teacher: Teacher | None = None,
    distill_weight: float = 0.5,
    distill_temperature: float = 4.0,
    ema_decay: float = 0.0,
    augment_steps: int | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step of one seed -> (new state, the batch's summed metrics).

    ``split_batch(images, labels)`` may constrain the batch's placement (over devices) without
    changing its meaning: BatchNorm statistics stay over the whole batch. With a ``teacher``
    (``jax_mnist.distill``), the loss mixes in its softened predictions on the same batch; the
    metrics stay those of the labels. A state that keeps an average (``state.ema``) moves it
    towards the new weights by ``ema_decay``. ``augment_steps``: augment only steps before it
    (None: every step).
    """
    images_uint8, labels = split_batch(images_uint8, labels)
    augment_key, dropout_key = step_keys(step_stream, state.step)
    images = preprocess(images_uint8)
    if augment_steps is None:
        images = augment(augment_key, images)
    else:
        images = jax.lax.cond(
            state.step < augment_steps, lambda x: augment(augment_key, x), lambda x: x, images
        )
    images = normalize(images)
    teacher_logp = None if teacher is None else teacher.log_probabilities(images)

    def loss_fn(params):
        logp, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            rngs={"dropout": dropout_key},
            mutable=["batch_stats"],
        )
        loss = training_loss(logp, labels, label_smoothing)
        if teacher_logp is not None:
            soft = distillation_loss(logp, teacher_logp, distill_temperature)
            loss = (1.0 - distill_weight) * loss + distill_weight * soft
        return loss, (logp, updates.get("batch_stats", state.batch_stats))

    (_, (logp, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema is not None:
        ema = update_average(ema, {"params": params, "batch_stats": batch_stats}, ema_decay)
    new_state = TrainState(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, ema=ema
    )
    return new_state, batch_metrics(logp, labels)


def recipe_train_step(
    recipe: Recipe,
    model: S7Net,
    tx: optax.GradientTransformation,
    augment: Augment,
    teacher: Teacher | None,
    split_batch: Callable = _no_constraint,
    *,
    steps_per_epoch: int,
) -> Callable:
    """``train_step`` with the recipe's loss settings bound: (state, images, labels, stream) -> ..."""
    augmented_epochs = recipe.epochs - recipe.augment_off_epochs
    return functools.partial(
        train_step,
        model,
        tx,
        augment,
        label_smoothing=recipe.label_smoothing,
        split_batch=split_batch,
        teacher=teacher,
        distill_weight=recipe.distill_weight,
        distill_temperature=recipe.distill_temperature,
        ema_decay=recipe.ema,
        augment_steps=augmented_epochs * steps_per_epoch if recipe.augment_off_epochs else None,
    )


def eval_sums(
    model: S7Net,
    params,
    batch_stats,
    images_uint8: jax.Array,
    labels: jax.Array,
    batch_size: int,
    *,
    split_batch: Callable = _no_constraint,
) -> dict[str, jax.Array]:
    """Summed loss, correct and count over every image, in batches of ``batch_size`` (the last padded)."""
    n = labels.shape[0]
    batches = -(-n // batch_size)
    pad = batches * batch_size - n
    images = jnp.pad(images_uint8, ((0, pad), (0, 0), (0, 0), (0, 0)))
    padded_labels = jnp.pad(labels, (0, pad))
    mask = jnp.arange(batches * batch_size) < n
    shape = (batches, batch_size)

    def body(totals, batch):
        x, y, m = split_batch(*batch)
        variables = {"params": params, "batch_stats": batch_stats}
        logp = model.apply(variables, normalize(preprocess(x)), train=False)
        return jax.tree_util.tree_map(jnp.add, totals, batch_metrics(logp, y, m)), None

    batched = (images.reshape(*shape, *images.shape[1:]), padded_labels.reshape(shape), mask.reshape(shape))
    totals, _ = jax.lax.scan(body, zero_metrics(), batched)
    return totals


# --------------------------------------------------------------------------- seeds and epochs


def over_seeds(fn: Callable, in_axes: Sequence[int | None], strategy: str = "vmap") -> Callable:
    """``fn`` applied to each seed of arguments stacked on a leading seed axis (``in_axes`` 0;
    None for shared arguments).

    One seed runs ``fn`` itself on the unstacked arguments, so a single-seed run is exactly the
    computation without a seed axis. Several seeds run ``jax.vmap(fn)`` (``strategy="vmap"``:
    one batched program, what fills an accelerator) or ``lax.map`` of ``fn`` (``"map"``: the
    seeds one after another inside one compiled program; on XLA:CPU this is about 20 % faster
    than vmap, docs/benchmarks.md). Both compute the same function.
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


SeedsStep = Callable[..., tuple[TrainState, dict]]


def seeds_step(step: Callable, strategy: str) -> SeedsStep:
    """``(states, train_images, train_labels, batch_indices, step_streams) -> (states, metrics)``:
    one ``step`` of every seed, seed k on batch ``batch_indices[k]`` of the shared training set."""

    def one_seed(state, indices, step_stream, train_images, train_labels):
        return step(state, train_images[indices], train_labels[indices], step_stream)

    def apply(states, train_images, train_labels, batch_indices, step_streams):
        per_seed = over_seeds(one_seed, (0, 0, 0, None, None), strategy)
        return per_seed(states, batch_indices, step_streams, train_images, train_labels)

    return apply


def train_chunk(
    step: SeedsStep, batch_size: int, states, train_images, train_labels, orders, step_streams, first, last
):
    """Full-batch steps ``first`` .. ``last - 1`` of an epoch, metrics summed per seed.

    ``first``/``last`` are traced: every chunk of every epoch runs this one program.
    """

    def body(j, carry):
        states, sums = carry
        indices = jax.lax.dynamic_slice_in_dim(orders, j * batch_size, batch_size, axis=1)
        states, metrics = step(states, train_images, train_labels, indices, step_streams)
        return states, jax.tree_util.tree_map(jnp.add, sums, metrics)

    return jax.lax.fori_loop(first, last, body, (states, zero_metrics((orders.shape[0],))))


def train_last(step: SeedsStep, batch_size: int, states, train_images, train_labels, orders, step_streams):
    """The short last batch of an epoch (every example is used once per epoch)."""
    full = orders.shape[1] // batch_size
    return step(states, train_images, train_labels, orders[:, full * batch_size :], step_streams)


def shuffle_orders(num_examples: int, shuffle_streams, epoch) -> jax.Array:
    """Each seed's permutation of the training examples for ``epoch`` (seeds on the leading axis)."""
    return jax.vmap(lambda k: jax.random.permutation(shuffle_key(k, epoch), num_examples))(shuffle_streams)


def epoch_chunks(num_examples: int, batch_size: int, chunks: int = 10) -> list[tuple[int, int]]:
    """The ranges of full-batch steps that an epoch runs as separate calls of ``train_chunk``."""
    full = num_examples // batch_size
    size = max(1, -(-full // chunks))
    return [(first, min(first + size, full)) for first in range(0, full, size)]


# --------------------------------------------------------------------------- compiled programs

# With its older elemental fusion emitters XLA:CPU compiles model 8's training step in about
# two thirds of the time, and the step runs no slower (docs/benchmarks.md, profile_step.py).
CPU_COMPILER_OPTIONS = (("xla_cpu_use_fusion_emitters", False),)


@functools.cache
def _accepted_options(device, wanted: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, Any], ...]:
    if device.platform != "cpu" or not wanted:
        return ()
    try:  # an XLA that no longer knows an option refuses it (jax 0.12 dropped this one)
        probe = jax.jit(lambda x: x + 1, compiler_options=dict(wanted))
        probe.lower(jax.device_put(jnp.zeros(()), device)).compile()
    except Exception:  # noqa: BLE001  (XLA raises its own runtime error type)
        return ()
    return wanted


def compiler_options(device, wanted: tuple[tuple[str, Any], ...] = CPU_COMPILER_OPTIONS) -> dict[str, Any]:
    """XLA options for the compiled programs on ``device``: ``wanted`` on CPU when this XLA takes
    them, else none (the defaults); none off CPU."""
    return dict(_accepted_options(device, wanted))


@dataclasses.dataclass(frozen=True)
class ProgramConfig:
    """What a run's compiled programs depend on (hashable: ``programs_for`` caches by it)."""

    recipe: Recipe
    num_train_examples: int
    seeds: int = 1  # how many seeds are stacked on the leading axis
    devices: tuple | None = None  # None: every device (of every process: ``jax_mnist.hosts``)

    def with_devices(self) -> ProgramConfig:
        devices = tuple(jax.devices()) if self.devices is None else tuple(self.devices)
        return dataclasses.replace(self, devices=devices)


class Programs:
    """The compiled programs a run executes for one ``ProgramConfig``; build with ``programs_for``.

    With several devices they form a 1-D mesh (axis "devices"): the seed axis is split over it
    when the number of seeds is a multiple of the device count (no traffic between devices),
    else every batch is (XLA inserts the cross-device reductions). Each program's shardings are
    given to its ``jax.jit``; ``place_states``/``place_data`` put host arrays there.
    """

    def __init__(self, config: ProgramConfig, teacher: Teacher | None = None):
        config = config.with_devices()
        recipe, devices = config.recipe, config.devices
        if bool(recipe.teacher) != (teacher is not None):
            raise ValueError(
                f"recipe {recipe.name} names teacher {recipe.teacher!r} but the programs were given "
                f"{'none' if teacher is None else 'one'}: load it with jax_mnist.rundir.load_teacher"
            )
        self.config = config
        platform = devices[0].platform
        self.batch_size, self.eval_batch_size = recipe.batch_size, recipe.eval_batch_size
        self.steps_per_epoch = steps_per_epoch(config.num_train_examples, recipe.batch_size)
        self.model = make_model(recipe, platform, len(devices))
        self.tx = make_optimizer(recipe, self.steps_per_epoch)
        self.augment = make_augment(recipe)
        self.teacher = teacher  # None unless the recipe distils
        self.lr_schedule = schedules.for_recipe(recipe, self.steps_per_epoch)[0]
        self.mesh = Mesh(np.array(devices), ("devices",)) if len(devices) > 1 else None
        self.splits_seeds = self.mesh is not None and config.seeds % self.mesh.size == 0
        # vmap when the seeds are split over devices (a loop over a split axis would serialise them)
        self.seed_strategy = "vmap" if self.splits_seeds else resolve_seed_axis(recipe.seed_axis, platform)
        if self.mesh is None:
            self.seed_sharding = self.data_sharding = make_single_device_sharding(devices[0])
        else:
            self.data_sharding = NamedSharding(self.mesh, PartitionSpec())
            self.seed_sharding = NamedSharding(
                self.mesh, PartitionSpec("devices") if self.splits_seeds else PartitionSpec()
            )
        split = _no_constraint if self.splits_seeds else self._split_batch
        step = recipe_train_step(
            recipe,
            self.model,
            self.tx,
            self.augment,
            self.teacher,
            split,
            steps_per_epoch=self.steps_per_epoch,
        )
        self._step = seeds_step(step, self.seed_strategy)
        seed, data = self.seed_sharding, self.data_sharding
        jit = functools.partial(jax.jit, compiler_options=compiler_options(_local(devices)))
        # (shuffle streams, epoch) -> each seed's order of the training examples
        self.shuffle = jit(
            functools.partial(shuffle_orders, config.num_train_examples),
            in_shardings=(seed, data),
            out_shardings=seed,
        )
        # (states, train images, train labels, orders, step streams, first, last) -> (states, sums)
        self.train_chunk = jit(
            functools.partial(train_chunk, self._step, self.batch_size),
            in_shardings=(seed, data, data, seed, seed, data, data),
            out_shardings=(seed, seed),
            donate_argnums=(0,),
        )
        # (states, train images, train labels, orders, step streams) -> (states, sums)
        self.train_last = jit(
            functools.partial(train_last, self._step, self.batch_size),
            in_shardings=(seed, data, data, seed, seed),
            out_shardings=(seed, seed),
            donate_argnums=(0,),
        )
        # (params, batch_stats, images, labels) -> summed metrics per seed
        evaluate_one = functools.partial(
            eval_sums, self.model, batch_size=self.eval_batch_size, split_batch=split
        )
        self.evaluate = jit(
            over_seeds(evaluate_one, (0, 0, None, None), self.seed_strategy),
            in_shardings=(seed, seed, data, data),
            out_shardings=seed,
        )
        # optimizer step -> its float32 learning rate (one compiled program for every step)
        self.learning_rate = jit(self.lr_schedule)

    def _split_batch(self, *arrays):
        if self.mesh is None or arrays[0].shape[0] % self.mesh.size:
            return arrays
        sharding = NamedSharding(self.mesh, PartitionSpec("devices"))
        return tuple(jax.lax.with_sharding_constraint(a, sharding) for a in arrays)

    def init_state(self, key: jax.Array) -> TrainState:
        """A new state of one seed (no seed axis), from its init key."""
        return init_state(self.model, self.tx, key, ema=self.config.recipe.ema > 0)

    def init_seeds(self, seeds: Sequence[int]) -> tuple[TrainState, RunKeys]:
        """Initial states and run keys of ``seeds``, stacked on a leading seed axis and placed.

        Each seed is initialised on its own, exactly as a single-seed run of it.
        """
        self._check_seeds(len(seeds))
        states = stack_seeds([self.init_state(run_keys(s).init) for s in seeds])
        return self.place_states(states), self.place_states(stacked_run_keys(seeds))

    def place_states(self, tree):
        """Arrays stacked on the leading seed axis, where the programs take them."""
        self._check_seeds(jax.tree_util.tree_leaves(tree)[0].shape[0])
        return hosts.put(tree, self.seed_sharding)

    def place_data(self, tree):
        """Arrays every seed reads (the data sets), where the programs take them."""
        return hosts.put(tree, self.data_sharding)

    def _check_seeds(self, seeds: int) -> None:
        if seeds != self.config.seeds:
            raise ValueError(f"these programs are compiled for {self.config.seeds} seed(s), found {seeds}")

    def chunks(self, num_examples: int, chunks: int = 10) -> list[tuple[int, int]]:
        return epoch_chunks(num_examples, self.batch_size, chunks)


def _local(devices: Sequence):
    """A device of this process among ``devices`` (what this process can compile a probe for)."""
    return next((d for d in devices if d.process_index == hosts.index()), devices[0])


def programs_for(config: ProgramConfig, teacher: Teacher | None = None) -> Programs:
    """The compiled programs of ``config`` (and of the loaded ``teacher`` of a recipe that distils):
    the same object for the same config, devices and teacher."""
    return _programs_for(config.with_devices(), teacher)


@functools.lru_cache(maxsize=32)
def _programs_for(config: ProgramConfig, teacher: Teacher | None) -> Programs:
    return Programs(config, teacher)
