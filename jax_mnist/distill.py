"""Knowledge distillation: a trained run of this project as the teacher of a smaller net.

A recipe names its teacher by run directory (``teacher``, "" for none). Each training step the
teacher, in eval mode and frozen, scores the same augmented batch as the student, and the loss is

    (1 - distill_weight) * cross-entropy(labels) + distill_weight * T^2 * KL(teacher_T || student_T)

with both distributions softened by ``T = distill_temperature`` (Hinton et al., 2015; the T^2
keeps the gradient's scale as T changes). The teacher's cost counts in a run's time: its forward
pass is inside the student's step, and its own training is a run of its own.

A screening run (``validation`` N > 0) takes only a teacher that held out the same N examples,
so nothing it scores on reached the student through the teacher.

Here is the math only; reading a teacher's run directory is ``jax_mnist.rundir.load_teacher``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_mnist.errors import JaxMnistError


class TeacherError(JaxMnistError, ValueError):
    """A teacher run that cannot teach this recipe (missing, unfinished, or it saw the validation split)."""


@dataclass(frozen=True, eq=False)
class Teacher:
    """A loaded teacher (``jax_mnist.rundir.load_teacher`` reads one from its run directory)."""

    model: Any  # the teacher's S7Net
    variables: dict  # its {'params', 'batch_stats'} (host arrays)
    record: dict  # what a student's config.json states about it

    def _key(self) -> tuple:
        return (self.model, tuple(sorted(self.record.items())))

    # Equal teachers (same network, same run, epoch and weights digest) share compiled programs.
    def __eq__(self, other) -> bool:
        return isinstance(other, Teacher) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

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
