"""The model zoo: the nine S7 CNNs as tuples of layer specs, run by one Flax module, by name.

Each model is a tuple of layer specs (``ConvSpec``, ``PoolSpec``, ``GapSpec``,
``DropoutSpec``) read straight off ``shared/spec/s7_study.md``; one generic
module, ``S7Net``, runs any such tuple. Inputs are NHWC ``(N, 28, 28, 1)``,
outputs log-probabilities ``(N, 10)``.

Layer names follow the PyTorch originals (``conv1`` for model 1,
``convblockN`` for models 2-8) so that checkpoints map key for key.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_mnist.errors import ConfigError
from jax_mnist.layers import (
    DROPOUT_IMPLS,
    BatchNorm,
    Conv,
    Dropout,
    GlobalAvgPool,
    MaxPool,
    resolve_conv_impl,
)

# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ConvSpec:
    """A stride-1 convolution, optionally followed by ReLU, BatchNorm and Dropout."""

    name: str
    features: int
    kernel: int
    padding: int = 0
    bias: bool = False
    relu: bool = True
    batchnorm: bool = False
    # "bn_relu": conv -> BN -> ReLU (models 4-7); "relu_bn": conv -> ReLU -> BN (model 8).
    order: str = "bn_relu"
    dropout: float = 0.0

    @property
    def kind(self) -> str:
        parts = [f"conv{self.kernel}x{self.kernel}"]
        post = ["bn", "relu"] if self.order == "bn_relu" else ["relu", "bn"]
        parts += [p for p in post if (p == "bn" and self.batchnorm) or (p == "relu" and self.relu)]
        if self.dropout:
            parts.append(f"dropout({self.dropout:g})")
        return "-".join(parts)


@dataclass(frozen=True)
class PoolSpec:
    """Max pooling, kernel 2, stride 2."""

    name: str
    kind: str = "maxpool2"


@dataclass(frozen=True)
class GapSpec:
    """Average pooling over the whole remaining feature map."""

    name: str = "gap"
    kind: str = "gap"


@dataclass(frozen=True)
class DropoutSpec:
    """Element-wise dropout with rate ``rate``."""

    name: str
    rate: float

    @property
    def kind(self) -> str:
        return f"dropout({self.rate:g})"


LayerSpec = ConvSpec | PoolSpec | GapSpec | DropoutSpec

# --------------------------------------------------------------------------- the generic network


class ConvBlock(nn.Module):
    """conv -> {BN, ReLU in the spec's order} -> dropout."""

    spec: ConvSpec
    dropout_rate: float | None = None  # overrides spec.dropout when set
    conv_impl: str = "im2col"
    dropout_impl: str = "fused"

    @nn.compact
    def __call__(self, x, train: bool):
        s = self.spec
        x = Conv(s.features, s.kernel, s.padding, s.bias, self.conv_impl, name="conv")(x)
        post = ("bn", "relu") if s.order == "bn_relu" else ("relu", "bn")
        for op in post:
            if op == "bn" and s.batchnorm:
                x = BatchNorm(name="bn")(x, train)
            elif op == "relu" and s.relu:
                x = nn.relu(x)
        rate = s.dropout if self.dropout_rate is None else self.dropout_rate
        if s.dropout and rate:
            x = DROPOUT_IMPLS[self.dropout_impl](rate, deterministic=not train)(x)
        return x


class S7Net(nn.Module):
    """Runs a tuple of layer specs, then reshape to (-1, 10) and log_softmax."""

    layers: tuple[LayerSpec, ...]
    # One rate for every dropout layer (e.g. 0.0 to switch dropout off); None keeps the spec's.
    dropout_rate: float | None = None
    # How convolutions are lowered: "im2col" (shifted slices and one matmul), "onednn" (oneDNN's
    # kernels, CPU), "xla" (lax.conv_general_dilated), or "auto" (layers.resolve_conv_impl: onednn
    # or im2col on CPU, xla elsewhere, for the backend JAX runs on by default).
    conv_impl: str = "auto"
    # How dropout masks are drawn: "fused" (faster) or "flax" (nn.Dropout); see DROPOUT_IMPLS.
    dropout_impl: str = "fused"

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv_impl = resolve_conv_impl(self.conv_impl, jax.default_backend())
        if self.dropout_impl not in DROPOUT_IMPLS:
            raise ConfigError(
                f"dropout_impl must be one of {', '.join(sorted(DROPOUT_IMPLS))}, found {self.dropout_impl!r}"
            )
        for layer in self.layers:
            x = build_layer(layer, self.dropout_rate, conv_impl, self.dropout_impl)(x, train)
        return jax.nn.log_softmax(x.reshape(-1, 10), axis=-1)


def build_layer(layer: LayerSpec, dropout_rate: float | None, conv_impl: str, dropout_impl: str) -> nn.Module:
    if isinstance(layer, ConvSpec):
        return ConvBlock(layer, dropout_rate, conv_impl, dropout_impl, name=layer.name)
    if isinstance(layer, PoolSpec):
        return MaxPool(name=layer.name)
    if isinstance(layer, GapSpec):
        return GlobalAvgPool(name=layer.name)
    if isinstance(layer, DropoutSpec):
        rate = layer.rate if dropout_rate is None else dropout_rate
        return Dropout(rate, dropout_impl, name=layer.name)
    raise TypeError(f"unknown layer spec {layer!r}")


# --------------------------------------------------------------------------- the nine models


def _blocks(widths, *, last_kernel=3, **conv_kw) -> tuple[ConvSpec, ...]:
    """The five 3x3 blocks shared by models 3-8: convblock 1, 2, 4, 5, 7."""
    names = ("convblock1", "convblock2", "convblock4", "convblock5", "convblock7")
    kernels = (3, 3, 3, 3, last_kernel)
    return tuple(ConvSpec(n, w, k, **conv_kw) for n, w, k in zip(names, widths, kernels))


def _with_pools(blocks, after_block2: tuple[LayerSpec, ...] = ()) -> tuple[LayerSpec, ...]:
    """Insert the two max pools (after blocks 2 and 5) and any extra layers after block 2."""
    b1, b2, b4, b5, b7 = blocks
    return (b1, b2, *after_block2, PoolSpec("pool1"), b4, b5, PoolSpec("pool2"), b7)


def _model_1() -> tuple[LayerSpec, ...]:
    conv = lambda i, f, pad, relu=True: ConvSpec(f"conv{i}", f, 3, padding=pad, bias=True, relu=relu)
    return (
        conv(1, 32, 1),
        conv(2, 64, 1),
        PoolSpec("pool1"),
        conv(3, 128, 1),
        conv(4, 256, 1),
        PoolSpec("pool2"),
        conv(5, 512, 0),
        conv(6, 1024, 0),
        conv(7, 10, 0, relu=False),
    )


def _model_2() -> tuple[LayerSpec, ...]:
    return _with_pools(_blocks((32, 64, 32, 64, 10), last_kernel=1)) + (
        ConvSpec("convblock8", 10, 4, relu=False),
    )


_HEAD_2X2 = (ConvSpec("convblock8", 10, 2, relu=False),)
_HEAD_1X1 = (GapSpec(), ConvSpec("convblock8", 10, 1, relu=False))
_DROP_025 = (DropoutSpec("dropout", 0.25),)
_WIDTHS = (10, 20, 10, 20, 10)
_WIDTHS_12 = (10, 20, 10, 20, 12)

# name -> (layers, PyTorch key layout: "plain" for conv1.weight, "sequential" for convblockN.0.weight)
_MODELS: dict[str, tuple[tuple[LayerSpec, ...], str]] = {
    "model_1_setup": (_model_1(), "plain"),
    "model_2_skeleton": (_model_2(), "sequential"),
    "model_3_lighter_model": (_with_pools(_blocks(_WIDTHS)) + _HEAD_2X2, "sequential"),
    "model_4_batchnorm": (_with_pools(_blocks(_WIDTHS, batchnorm=True)) + _HEAD_2X2, "sequential"),
    "model_5_regularization": (
        _with_pools(_blocks(_WIDTHS, batchnorm=True), _DROP_025) + _HEAD_2X2,
        "sequential",
    ),
    "model_6_gap": (_with_pools(_blocks(_WIDTHS, batchnorm=True), _DROP_025) + (GapSpec(),), "sequential"),
    "model_7_max_capacity": (
        _with_pools(_blocks(_WIDTHS_12, batchnorm=True), _DROP_025) + _HEAD_1X1,
        "sequential",
    ),
    "model_8_dropout_maxpool": (
        _with_pools(_blocks(_WIDTHS_12, batchnorm=True, order="relu_bn", dropout=0.01)) + _HEAD_1X1,
        "sequential",
    ),
}

ORIGINAL_MODEL_NAMES: tuple[str, ...] = tuple(_MODELS)  # the eight networks of the original study


def _ours(
    widths: tuple[int, int, int, int, int, int, int], dropout: float, first_padding: int = 0
) -> tuple[LayerSpec, ...]:
    """This project's small nets (issue "accuracy per parameter"): three 3x3 convs at full
    resolution, max pool, a 1x1 squeeze, three 3x3 convs (the last padded, so its map keeps its
    size), GAP and a 1x1 head. conv -> BN -> ReLU, no biases, dropout after every block but the
    last. ``widths``: the seven conv widths before the head. ``first_padding=1`` pads the first
    three convs (28x28 throughout, then 14 -> 12 -> 10 -> 10): the same parameters, about 1.5x the
    multiply-adds, more positions for each filter to see."""
    c1, c2, c3, squeeze, c4, c5, c6 = widths
    block = lambda name, f, k, padding=0, drop=dropout: ConvSpec(
        name, f, k, padding=padding, batchnorm=True, dropout=drop
    )
    return (
        block("convblock1", c1, 3, first_padding),
        block("convblock2", c2, 3, first_padding),
        block("convblock3", c3, 3, first_padding),
        PoolSpec("pool1"),
        block("transition1", squeeze, 1),
        block("convblock4", c4, 3),
        block("convblock5", c5, 3),
        block("convblock6", c6, 3, padding=1, drop=0.0),
        GapSpec(),
        ConvSpec("head", 10, 1, relu=False),
    )


_MODELS["ours_8k"] = (_ours((8, 12, 14, 8, 12, 16, 16), dropout=0.05), "sequential")
_MODELS["ours_5k"] = (_ours((8, 10, 10, 8, 10, 12, 10), dropout=0.05), "sequential")
_MODELS["ours_5k_pad"] = (_ours((8, 10, 10, 8, 10, 12, 10), dropout=0.05, first_padding=1), "sequential")
# The frontier's smaller budgets (issue 21): the same layout, narrower.
_MODELS["ours_4k"] = (_ours((6, 8, 10, 8, 10, 10, 10), dropout=0.05), "sequential")
_MODELS["ours_3k"] = (_ours((6, 8, 8, 8, 8, 8, 8), dropout=0.05), "sequential")
_MODELS["ours_2k"] = (_ours((4, 6, 6, 6, 6, 8, 8), dropout=0.05), "sequential")
# Issue 35's budgets below ours_5k: the public reference's 3,762 parameters, and 3,000.
_MODELS["ours_3762"] = (_ours((6, 8, 10, 8, 9, 9, 10), dropout=0.05), "sequential")
_MODELS["ours_3000"] = (_ours((6, 8, 8, 8, 8, 8, 7), dropout=0.05), "sequential")


def _pyramid(widths: tuple[int, int, int], convs: int, dropout: float) -> tuple[LayerSpec, ...]:
    """Other layouts at the small budgets (issue 35): three stages of ``convs`` padded 3x3 convs
    (28x28, max pool, 14x14, max pool, 7x7), conv -> BN -> ReLU without biases, dropout after the
    first two stages, GAP and a 1x1 head. With ``convs=3`` and widths 4-8-8 this is the shape of
    the public 3,762-parameter reference (adilsammar/woolly-of-cv), less its convolutions' biases,
    which the BatchNorm after each makes redundant."""
    block = lambda stage, i, f: ConvSpec(f"stage{stage}_conv{i}", f, 3, padding=1, batchnorm=True)
    layers: list[LayerSpec] = []
    for stage, width in enumerate(widths, start=1):
        layers += [block(stage, i, width) for i in range(1, convs + 1)]
        if stage < len(widths):
            layers += [DropoutSpec(f"stage{stage}_dropout", dropout), PoolSpec(f"pool{stage}")]
    return (*layers, GapSpec(), ConvSpec("head", 10, 1, relu=False))


_MODELS["pyramid_5k"] = (_pyramid((4, 9, 10), convs=3, dropout=0.01), "sequential")
_MODELS["pyramid_3762"] = (_pyramid((4, 8, 8), convs=3, dropout=0.01), "sequential")  # the reference's
_MODELS["pyramid_3k"] = (_pyramid((4, 6, 8), convs=3, dropout=0.01), "sequential")
_MODELS["pyramid2_5k"] = (_pyramid((6, 11, 12), convs=2, dropout=0.01), "sequential")
MODEL_NAMES: tuple[str, ...] = tuple(_MODELS)
INPUT_SHAPE = (28, 28, 1)


def check_model_name(name: str) -> None:
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")


def model_layers(name: str) -> tuple[LayerSpec, ...]:
    check_model_name(name)
    return _MODELS[name][0]


def torch_layout(name: str) -> str:
    """How the PyTorch original names its keys: "plain" (conv1.weight) or "sequential"
    (convblockN.0.weight)."""
    check_model_name(name)
    return _MODELS[name][1]


def get_model(name: str, **overrides: Any) -> S7Net:
    """The Flax module for ``name``; ``overrides`` set S7Net fields (e.g. ``dropout_rate=0.0``)."""
    check_model_name(name)
    allowed = {f.name for f in dataclasses.fields(S7Net)} - {"layers", "parent", "name"}
    unknown = set(overrides) - allowed
    if unknown:
        raise ConfigError(f"unknown override(s) {sorted(unknown)} for get_model; valid: {sorted(allowed)}")
    return S7Net(layers=_MODELS[name][0], **overrides)


def init_variables(model: S7Net, key: jax.Array, batch: int = 1) -> dict:
    """``{'params', 'batch_stats'}`` for ``model`` from ``key`` (batch_stats empty for models 1-3)."""
    variables = model.init(key, jnp.zeros((batch, *INPUT_SHAPE), jnp.float32), train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


@functools.cache
def parameter_count(name: str) -> int:
    """Trainable parameters of the model ``name`` (traced, nothing computed; cached by name)."""
    params = jax.eval_shape(lambda: init_variables(get_model(name), jax.random.key(0)))["params"]
    return count_params(params)


def count_params(params: Mapping) -> int:
    """Number of trainable parameters (the ``params`` collection only)."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
