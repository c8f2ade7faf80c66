"""A trained run's network out of jax-mnist: a PyTorch state_dict, or a serialized StableHLO function.

``export_pytorch`` writes what the original PyTorch class (``jax_mnist.reference``, the S7
notebooks' code) loads with ``load_state_dict(strict=True)``. ``export_stablehlo`` writes a
``jax.export`` artifact of ``uint8 images (B, 28, 28, 1) -> log-probabilities (B, 10)`` for any
batch size B, with the weights inside, lowered for CPU, CUDA and TPU; ``load_stablehlo`` reads it
back into a callable (no jax-mnist needed for that: ``jax.export.deserialize(...).call``).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jax_mnist.errors import CheckpointError
from jax_mnist.files import write_atomically
from jax_mnist.inference import inference_model, log_probabilities_fn
from jax_mnist.rundir import Run
from jax_mnist.torch_io import to_torch_state_dict, write_torch_checkpoint
from jax_mnist.zoo import INPUT_SHAPE

EXPORT_PLATFORMS = ("cpu", "cuda", "tpu")


def export_pytorch(run: Run, path: str | os.PathLike) -> dict[str, np.ndarray]:
    state_dict = to_torch_state_dict(run.recipe.model, run.variables, batches_tracked=int(run.state.step))
    write_torch_checkpoint(path, state_dict)
    return state_dict


def stablehlo_function(run: Run) -> jax.export.Exported:
    """The run's inference function, batch-polymorphic, weights as constants.

    The convolutions are XLA's own (not the CPU im2col form the engine may train with): one
    portable program, the same function."""
    model = inference_model(run.recipe, conv_impl="xla")
    variables = jax.tree_util.tree_map(np.asarray, run.variables)
    apply = log_probabilities_fn(model)
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, *INPUT_SHAPE), jnp.uint8)
    return jax.export.export(jax.jit(lambda images: apply(variables, images)), platforms=EXPORT_PLATFORMS)(
        spec
    )


def export_stablehlo(run: Run, path: str | os.PathLike) -> jax.export.Exported:
    exported = stablehlo_function(run)
    write_atomically(path, bytes(exported.serialize()))
    return exported


def load_stablehlo(path: str | os.PathLike) -> jax.export.Exported:
    """An artifact of ``export_stablehlo``; call it with ``.call(images_uint8)``."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return jax.export.deserialize(bytearray(data))
    except Exception as e:  # flatbuffers raises assorted errors on foreign bytes
        raise CheckpointError(f"{path}: not a serialized jax.export function ({type(e).__name__})") from None
