"""A trained run's network out of jax-mnist: a PyTorch state_dict, a serialized StableHLO function,
or an ONNX model.

``export_pytorch`` writes what the original PyTorch class (``jax_mnist.reference``, the S7
notebooks' code) loads with ``load_state_dict(strict=True)``. ``export_stablehlo`` writes a
``jax.export`` artifact of ``uint8 images (B, 28, 28, 1) -> log-probabilities (B, 10)`` for any
batch size B, with the weights inside, lowered for CPU, CUDA and TPU; ``load_stablehlo`` reads it
back into a callable (no jax-mnist needed for that: ``jax.export.deserialize(...).call``).
``export_onnx`` writes the same function as an ONNX model (jax2onnx, the ``onnx`` extra), for
onnxruntime and the tools that read ONNX, with no JAX installed.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jax_mnist import library_output
from jax_mnist.errors import CheckpointError, JaxMnistError
from jax_mnist.files import write_atomically
from jax_mnist.inference import inference_model, log_probabilities_fn
from jax_mnist.rundir import Run
from jax_mnist.torch_io import to_torch_state_dict, write_torch_checkpoint
from jax_mnist.zoo import INPUT_SHAPE

EXPORT_PLATFORMS = ("cpu", "cuda", "tpu")
# The ONNX opset of `export --to onnx`: jax2onnx's default, which onnxruntime 1.24 and later run.
ONNX_OPSET = 23


class MissingExtra(JaxMnistError):
    """An optional feature whose extra is not installed; the message says what to install."""


def export_pytorch(run: Run, path: str | os.PathLike) -> dict[str, np.ndarray]:
    state_dict = to_torch_state_dict(run.recipe.model, run.variables, batches_tracked=int(run.state.step))
    write_torch_checkpoint(path, state_dict)
    return state_dict


def inference_function(run: Run):
    """``uint8 images (batch, 28, 28, 1) -> log-probabilities (batch, 10)`` of the run's weights
    (BatchNorm's running statistics, no dropout), the weights as constants.

    The convolutions are XLA's own (not the CPU im2col form the engine may train with): one
    portable program, the same function."""
    model = inference_model(run.recipe, conv_impl="xla")
    variables = jax.tree_util.tree_map(np.asarray, run.variables)
    apply = log_probabilities_fn(model)
    return lambda images: apply(variables, images)


def stablehlo_function(run: Run) -> jax.export.Exported:
    """The run's inference function, batch-polymorphic, lowered for every platform."""
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, *INPUT_SHAPE), jnp.uint8)
    return jax.export.export(jax.jit(inference_function(run)), platforms=EXPORT_PLATFORMS)(spec)


def onnx_model(run: Run, opset: int = ONNX_OPSET):
    """The run's inference function (the StableHLO export's) as an ONNX ModelProto: input
    ``images`` uint8 (batch, 28, 28, 1), output ``log_probabilities`` float32 (batch, 10), the
    batch axis dynamic; converted by jax2onnx (the ``onnx`` extra)."""
    try:
        with library_output.quiet():  # jax2onnx logs a traceback per plugin it cannot load
            from jax2onnx import to_onnx
    except ImportError:
        raise MissingExtra(
            "ONNX export needs the onnx extra: pip install 'jax-mnist[onnx]' "
            '(from a checkout: pip install -e ".[onnx]"), which installs jax2onnx and onnxruntime'
        ) from None
    spec = jax.ShapeDtypeStruct(("batch", *INPUT_SHAPE), jnp.uint8)
    with library_output.quiet():
        return to_onnx(
            inference_function(run),
            [spec],
            model_name=f"jax_mnist_{run.recipe.model}",
            opset=opset,
            input_names=["images"],
            output_names=["log_probabilities"],
        )


def export_onnx(run: Run, path: str | os.PathLike, opset: int = ONNX_OPSET):
    model = onnx_model(run, opset)
    write_atomically(path, model.SerializeToString())
    return model


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
