"""Learning-rate (and momentum) schedules per optimizer step, matching PyTorch's schedulers.

A schedule is a function of the optimizer step count (0 for the first update), as optax
expects. ``constant`` and ``step_lr`` are optax's own schedules (``step_lr`` steps once per
epoch like ``torch.optim.lr_scheduler.StepLR`` called after each epoch); ``one_cycle`` is
written here because it reproduces ``torch.optim.lr_scheduler.OneCycleLR`` step for step
(optax's ``cosine_onecycle_schedule`` peaks one step later and its linear variant is
three-phase only). ``for_recipe`` gives a recipe's pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax.numpy as jnp
import optax

Schedule = Callable[[jnp.ndarray], jnp.ndarray]


def constant(value: float) -> Schedule:
    return optax.constant_schedule(value)


def step_lr(lr: float, step_size_epochs: int, gamma: float, steps_per_epoch: int, epochs: int) -> Schedule:
    """lr * gamma ** (epoch // step_size), with epoch = count // steps_per_epoch, for ``epochs``.

    optax's piecewise-constant schedule compares integer step counts. Not its
    ``exponential_decay(staircase=True)``: that floors ``count / transition_steps`` in float32,
    and under jit XLA:CPU divides by multiplying with the reciprocal, so the first step of each
    new step-size period (count 1410 = 6 * 235 gives 0.99999994) keeps the old rate.
    """
    period = step_size_epochs * steps_per_epoch
    boundaries = {k * period: gamma for k in range(1, -(-epochs // step_size_epochs))}
    return optax.piecewise_constant_schedule(lr, boundaries)


@dataclass(frozen=True)
class _Phase:
    end_step: float
    start_lr: float
    end_lr: float
    start_momentum: float
    end_momentum: float


def _anneal(kind: str, start, end, pct, remaining=None):
    """PyTorch's annealing from ``start`` to ``end``; ``remaining`` = 1 - pct, computed exactly."""
    remaining = 1.0 - pct if remaining is None else remaining
    if kind == "cos":
        # PyTorch: end + (start - end) / 2 * (cos(pi * pct) + 1), in float64. The same value as
        # end + (start - end) * sin(pi / 2 * (1 - pct))**2 stays accurate in float32 near the end.
        return end + (start - end) * jnp.square(jnp.sin(math.pi / 2 * remaining))
    if kind == "linear":
        # PyTorch: (end - start) * pct + start; as a blend of two non-negative terms, no cancellation.
        return start * remaining + end * pct
    raise ValueError(f"anneal strategy must be 'cos' or 'linear', found {kind!r}")


def one_cycle(
    max_lr: float,
    total_steps: int,
    *,
    pct_start: float = 0.3,
    anneal: str = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
) -> tuple[Schedule, Schedule]:
    """(learning-rate schedule, momentum schedule) with PyTorch ``OneCycleLR`` semantics.

    Use the momentum schedule only with ``cycle_momentum``; PyTorch then starts
    at ``max_momentum``, goes down to ``base_momentum`` at the peak LR and back.
    Steps past ``total_steps - 1`` hold the final value (PyTorch raises there).
    """
    if total_steps < 2:
        raise ValueError(f"one_cycle needs total_steps >= 2, found {total_steps}")
    if not 0.0 < pct_start < 1.0:
        raise ValueError(f"pct_start must be in (0, 1), found {pct_start}")
    _anneal(anneal, 0.0, 0.0, 0.0)  # validate the name early
    initial_lr = max_lr / div_factor
    min_lr = initial_lr / final_div_factor
    up_end = float(pct_start * total_steps) - 1
    if three_phase:
        phases = [
            _Phase(up_end, initial_lr, max_lr, max_momentum, base_momentum),
            _Phase(float(2 * pct_start * total_steps) - 2, max_lr, initial_lr, base_momentum, max_momentum),
            _Phase(total_steps - 1, initial_lr, min_lr, max_momentum, max_momentum),
        ]
    else:
        phases = [
            _Phase(up_end, initial_lr, max_lr, max_momentum, base_momentum),
            _Phase(total_steps - 1, max_lr, min_lr, base_momentum, max_momentum),
        ]

    def value(count, start_attr: str, end_attr: str):
        # float64 on the host in PyTorch; float32 here: steps are exact integers below 2**24.
        step = jnp.minimum(jnp.asarray(count, jnp.float32), total_steps - 1)
        start_step = 0.0
        picks = []
        for phase in phases:
            span = phase.end_step - start_step
            pct, remaining = (step - start_step) / span, (phase.end_step - step) / span
            start, end = getattr(phase, start_attr), getattr(phase, end_attr)
            picks.append((step <= phase.end_step, _anneal(anneal, start, end, pct, remaining)))
            start_step = phase.end_step
        # The first phase whose end is not passed; the last phase otherwise (as PyTorch's loop).
        result = picks[-1][1]
        for condition, phase_value in reversed(picks[:-1]):
            result = jnp.where(condition, phase_value, result)
        return result.astype(jnp.float32)

    lr = lambda count: value(count, "start_lr", "end_lr")
    momentum = lambda count: value(count, "start_momentum", "end_momentum")
    return lr, momentum


def for_recipe(recipe, steps_per_epoch: int) -> tuple[Schedule, Schedule]:
    """(learning rate, momentum) per optimizer step of a ``recipes.Recipe``."""
    momentum = constant(recipe.momentum)
    if recipe.schedule == "constant":
        return constant(recipe.lr), momentum
    if recipe.schedule == "step":
        return step_lr(recipe.lr, recipe.step_size, recipe.gamma, steps_per_epoch, recipe.epochs), momentum
    lr, cycled = one_cycle(
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
