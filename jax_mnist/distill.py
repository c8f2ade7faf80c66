"""Knowledge distillation: a trained run of this project as the teacher of a smaller net.

A recipe names its teacher by run directory (``teacher``, "" for none). Each training step the
teacher, in eval mode and frozen, scores the same augmented batch as the student, and the loss is

    (1 - distill_weight) * cross-entropy(labels) + distill_weight * T^2 * KL(teacher_T || student_T)

with both distributions softened by ``T = distill_temperature`` (Hinton et al., 2015; the T^2
keeps the gradient's scale as T changes). The teacher's cost counts in a run's time: its forward
pass is inside the student's step, and its own training is a run of its own.

A screening run (``validation`` N > 0) takes only a teacher that held out the same N examples,
so nothing it scores on reached the student through the teacher.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_mnist.errors import JaxMnistError
from jax_mnist.recipes import Recipe


class TeacherError(JaxMnistError, ValueError):
    """A teacher run that cannot teach this recipe (missing, unfinished, or it saw the validation split)."""


@dataclass(frozen=True)
class Teacher:
    model: Any  # the teacher's S7Net
    variables: dict  # its {'params', 'batch_stats'} (host arrays)
    record: dict  # what a student's config.json states about it

    def log_probabilities(self, images: jax.Array) -> jax.Array:
        """The teacher's log-probabilities of normalised images (eval mode, no gradient)."""
        logp = self.model.apply(self.variables, images, train=False)
        return jax.lax.stop_gradient(logp)


def distillation_loss(student_logp: jax.Array, teacher_logp: jax.Array, temperature: float) -> jax.Array:
    """Mean over the batch of ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``.

    Log-probabilities serve as logits: a constant shift per example leaves a softmax unchanged."""
    teacher = jax.nn.log_softmax(teacher_logp / temperature, axis=-1)
    student = jax.nn.log_softmax(student_logp / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
    return temperature**2 * kl.mean()


def weights_digest(variables: dict) -> str:
    """sha256 over the teacher's arrays in tree order (what the student's config.json records)."""
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(variables):
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()


def load_teacher(recipe: Recipe, platform: str) -> Teacher | None:
    """The teacher ``recipe`` names (None when it names none), checked and verified (read only)."""
    if not recipe.teacher:
        return None
    from jax_mnist.engine import make_model
    from jax_mnist.rundir import load_run

    try:
        run = load_run(recipe.teacher, "last")
    except JaxMnistError as e:  # not a run, a malformed file, no checkpoint that verifies
        raise TeacherError(f"teacher {recipe.teacher}: {e}") from None
    if not run.finished:
        raise TeacherError(
            f"teacher {recipe.teacher}: unfinished ({len(run.history)} of {run.epochs} epochs); "
            "finish it first (jax-mnist train ... --resume)"
        )
    if recipe.validation and run.validation != recipe.validation:
        held = f"held out {run.validation:,}" if run.validation else "held out none"
        raise TeacherError(
            f"teacher {recipe.teacher}: {held} of the training examples, but this run is scored on "
            f"{recipe.validation:,} held-out ones: a teacher that trained on them would leak them; "
            f"train the teacher with --validation {recipe.validation}"
        )
    variables = jax.tree_util.tree_map(np.asarray, run.variables)
    record = {
        "run": str(recipe.teacher),
        "recipe": run.recipe_name,
        "model": run.recipe.model,
        "seed": run.seed,
        "epoch": run.epoch,
        "validation": run.validation,
        "weights_sha256": weights_digest(variables),
    }
    return Teacher(make_model(run.recipe, platform), variables, record)
