"""The nine S7 CNNs as Flax Linen modules, built from a few shared blocks.

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
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import flax.linen as nn

from jax_mnist.dropout import Dropout as FusedDropout

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

# --------------------------------------------------------------------------- blocks


def torch_uniform_init(fan_in: int) -> Callable:
    """PyTorch's default conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and bias."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class BatchNorm(nn.Module):
    """BatchNorm with PyTorch semantics.

    Normalises with the biased batch variance in training, but, as PyTorch does,
    updates the running variance with the unbiased one (n / (n - 1)); Flax's own
    ``nn.BatchNorm`` uses the biased one, which would drift from PyTorch
    checkpoints. ``momentum`` is in PyTorch's convention (weight of the new value).
    """

    momentum: float = 0.1
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, train: bool):
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,))
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,))
        if not train:
            return batch_normalize(x, running_mean.value, running_var.value, scale, bias, self.epsilon)
        mean, var = batch_moments(x)  # the same reductions as in batch_norm_train: XLA computes them once
        if not self.is_initializing():
            n = x.size // channels
            m = self.momentum
            mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
            running_mean.value = (1 - m) * running_mean.value + m * mean
            running_var.value = (1 - m) * running_var.value + m * var * (n / max(n - 1, 1))
        return batch_norm_train(x, scale, bias, self.epsilon)


def batch_normalize(x, mean, var, scale, bias, epsilon: float) -> jax.Array:
    """(x - mean) / sqrt(var + epsilon) * scale + bias, per channel (the last axis)."""
    return (x - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias


def batch_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and biased variance over all but the last axis (two passes, for accuracy)."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    return mean, jnp.mean(jnp.square(x - mean), axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """Batch-statistics normalisation with the textbook gradient written out.

    Autodiff of the forward pass gave XLA five reductions over the activation per
    layer; the closed form needs two (``sum(dy)``, ``sum(dy * xhat)``) and one
    elementwise pass.
    """
    mean, var = batch_moments(x)
    return batch_normalize(x, mean, var, scale, bias, epsilon)


def _batch_norm_fwd(x, scale, bias, epsilon):
    mean, var = batch_moments(x)
    return batch_normalize(x, mean, var, scale, bias, epsilon), (x, mean, jax.lax.rsqrt(var + epsilon), scale)


def _batch_norm_bwd(epsilon, residuals, dy):
    x, mean, inv_std, scale = residuals
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    xhat = (x - mean) * inv_std
    dbias = jnp.sum(dy, axes)
    dscale = jnp.sum(dy * xhat, axes)
    dx = (scale * inv_std / n) * (n * dy - dbias - xhat * dscale)
    return dx, dscale, dbias


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def conv_im2col(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """VALID stride-1 conv as k*k shifted slices concatenated and one matmul.

    On XLA:CPU, model 8's training step runs about 1.5x as fast this way as with
    ``lax.conv_general_dilated`` for these small channel counts (see docs/benchmarks.md).
    """
    kh, kw, cin, cout = kernel.shape
    n, h, w, _ = x.shape
    ho, wo = h - kh + 1, w - kw + 1
    if kh == h and kw == w:  # the kernel covers the whole input: a plain matmul
        return (x.reshape(n, h * w * cin) @ kernel.reshape(-1, cout)).reshape(n, 1, 1, cout)
    patches = jnp.concatenate([x[:, i : i + ho, j : j + wo, :] for i in range(kh) for j in range(kw)], axis=-1)
    return (patches.reshape(-1, kh * kw * cin) @ kernel.reshape(-1, cout)).reshape(n, ho, wo, cout)


def conv_xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


CONV_IMPLS = {"im2col": conv_im2col, "xla": conv_xla}


class Conv(nn.Module):
    """Stride-1 conv with PyTorch's default init; ``impl`` picks how it is lowered (same function)."""

    features: int
    kernel: int
    padding: int = 0
    use_bias: bool = False
    impl: str = "im2col"

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1] * self.kernel * self.kernel
        init = torch_uniform_init(fan_in)
        kernel = self.param("kernel", init, (self.kernel, self.kernel, x.shape[-1], self.features))
        if self.padding:
            p = self.padding
            x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        y = CONV_IMPLS[self.impl](x, kernel)
        if self.use_bias:
            y = y + self.param("bias", init, (self.features,))
        return y


# How dropout masks are drawn: "fused" (jax_mnist.dropout, default) or "flax" (nn.Dropout,
# jax.random.bernoulli); both drop with the given rate, with different random streams.
DROPOUT_IMPLS = {"fused": FusedDropout, "flax": nn.Dropout}


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


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2, odd edges dropped, as ``torch.nn.MaxPool2d(2, 2)``.

    Written as the four window taps of a reshape rather than ``reduce_window``: on
    XLA:CPU the latter's gradient (select-and-scatter over iota index arrays) was a
    large share of model 8's training step. The gradient goes to the first maximum of
    each window in row-major order, as in PyTorch; ``jnp.max``'s would be split
    evenly between ties.
    """
    n, h, w, c = x.shape
    windows = x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)
    taps = [windows[:, :, i, :, j, :] for i in (0, 1) for j in (0, 1)]
    peak = jax.lax.stop_gradient(functools.reduce(jnp.maximum, taps))
    out, taken = jnp.zeros_like(peak), jnp.zeros(peak.shape, bool)
    for tap in taps:  # exactly one tap per window is selected, so ``out`` equals ``peak``
        first = (tap == peak) & ~taken
        out, taken = out + jnp.where(first, tap, 0.0), taken | first
    return jnp.where(taken, out, peak)  # a NaN window selects no tap: it stays NaN


class MaxPool(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        return max_pool_2x2(x)


class GlobalAvgPool(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        return jnp.mean(x, axis=(1, 2), keepdims=True)


class Dropout(nn.Module):
    rate: float
    impl: str = "fused"

    @nn.compact
    def __call__(self, x, train: bool):
        return DROPOUT_IMPLS[self.impl](self.rate, deterministic=not train)(x)


class S7Net(nn.Module):
    """Runs a tuple of layer specs, then reshape to (-1, 10) and log_softmax."""

    layers: tuple[LayerSpec, ...]
    # One rate for every dropout layer (e.g. 0.0 to switch dropout off); None keeps the spec's.
    dropout_rate: float | None = None
    # How convolutions are lowered: "im2col" (faster on CPU) or "xla" (lax.conv_general_dilated).
    conv_impl: str = "im2col"
    # How dropout masks are drawn: "fused" (faster) or "flax" (nn.Dropout); see DROPOUT_IMPLS.
    dropout_impl: str = "fused"

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {sorted(CONV_IMPLS)}, found {self.conv_impl!r}")
        if self.dropout_impl not in DROPOUT_IMPLS:
            raise ValueError(f"dropout_impl must be one of {sorted(DROPOUT_IMPLS)}, found {self.dropout_impl!r}")
        for layer in self.layers:
            x = build_layer(layer, self.dropout_rate, self.conv_impl, self.dropout_impl)(x, train)
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
        conv(1, 32, 1), conv(2, 64, 1), PoolSpec("pool1"),
        conv(3, 128, 1), conv(4, 256, 1), PoolSpec("pool2"),
        conv(5, 512, 0), conv(6, 1024, 0), conv(7, 10, 0, relu=False),
    )  # fmt: skip


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

MODEL_NAMES: tuple[str, ...] = tuple(_MODELS)
INPUT_SHAPE = (28, 28, 1)


def _check_name(name: str) -> None:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")


def model_layers(name: str) -> tuple[LayerSpec, ...]:
    _check_name(name)
    return _MODELS[name][0]


def get_model(name: str, **overrides: Any) -> S7Net:
    """The Flax module for ``name``; ``overrides`` set S7Net fields (e.g. ``dropout_rate=0.0``)."""
    _check_name(name)
    allowed = {f.name for f in dataclasses.fields(S7Net)} - {"layers", "parent", "name"}
    unknown = set(overrides) - allowed
    if unknown:
        raise ValueError(f"unknown override(s) {sorted(unknown)} for get_model; valid: {sorted(allowed)}")
    return S7Net(layers=_MODELS[name][0], **overrides)


def init_variables(model: S7Net, key: jax.Array, batch: int = 1) -> dict:
    """``{'params', 'batch_stats'}`` for ``model`` from ``key`` (batch_stats empty for models 1-3)."""
    variables = model.init(key, jnp.zeros((batch, *INPUT_SHAPE), jnp.float32), train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def count_params(params: Mapping) -> int:
    """Number of trainable parameters (the ``params`` collection only)."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


# --------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    receptive_field: int


@dataclass(frozen=True)
class Summary:
    model: str
    rows: tuple[LayerRow, ...]
    total_params: int
    running_stats: int  # BatchNorm running means/vars: state, not parameters
    receptive_field: int

    def format(self) -> str:
        header = f"{'layer':<12} {'kind':<30} {'output (N,H,W,C)':<20} {'params':>10} {'RF':>4}"
        lines = [f"{self.model}", header, "-" * len(header)]
        for r in self.rows:
            shape = "(" + ", ".join(["N", *map(str, r.output_shape[1:])]) + ")"
            lines.append(f"{r.name:<12} {r.kind:<30} {shape:<20} {r.params:>10,} {r.receptive_field:>4}")
        lines.append("-" * len(header))
        lines.append(f"trainable params: {self.total_params:,}")
        lines.append(f"BatchNorm running statistics (not trained): {self.running_stats:,}")
        lines.append(f"receptive field at the output: {self.receptive_field}")
        return "\n".join(lines)


def _rf_kernel_stride(layer: LayerSpec, input_hw: int) -> tuple[int, int]:
    if isinstance(layer, ConvSpec):
        return layer.kernel, 1
    if isinstance(layer, PoolSpec):
        return 2, 2
    if isinstance(layer, GapSpec):
        return input_hw, 1  # averages the whole map: a kernel as large as its input
    return 1, 1


def summarize(name: str) -> Summary:
    """Per-layer name, kind, output shape, parameter count and receptive field (computed)."""
    model = get_model(name)
    x = jax.ShapeDtypeStruct((1, *INPUT_SHAPE), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    _, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, capture_intermediates=True, mutable=["intermediates"]),
        variables,
        x,
    )
    intermediates = state["intermediates"]
    params = variables["params"]
    rows, rf, jump, hw = [], 1, 1, INPUT_SHAPE[0]
    for layer in model.layers:
        kernel, stride = _rf_kernel_stride(layer, hw)
        rf += (kernel - 1) * jump
        jump *= stride
        out_shape = tuple(intermediates[layer.name]["__call__"][0].shape)
        hw = out_shape[1]
        rows.append(LayerRow(layer.name, layer.kind, out_shape, count_params(params.get(layer.name, {})), rf))
    running = count_params(variables.get("batch_stats", {}))
    return Summary(name, tuple(rows), count_params(params), running, rf)


# --------------------------------------------------------------------------- PyTorch checkpoints


def _torch_key_map(name: str) -> dict[str, tuple[tuple[str, ...], Callable]]:
    """PyTorch state_dict key -> (Flax variable path, array transform)."""
    layers, layout = _MODELS[name]
    oihw_to_hwio = lambda w: w.transpose(2, 3, 1, 0)
    same = lambda a: a
    mapping = {}
    for layer in layers:
        if not isinstance(layer, ConvSpec):
            continue
        conv = layer.name if layout == "plain" else f"{layer.name}.0"
        mapping[f"{conv}.weight"] = (("params", layer.name, "conv", "kernel"), oihw_to_hwio)
        if layer.bias:
            mapping[f"{conv}.bias"] = (("params", layer.name, "conv", "bias"), same)
        if layer.batchnorm:
            # Position of the BN inside the PyTorch nn.Sequential: after conv (1) or after ReLU (2).
            bn = f"{layer.name}.{1 if layer.order == 'bn_relu' else 2}"
            mapping[f"{bn}.weight"] = (("params", layer.name, "bn", "scale"), same)
            mapping[f"{bn}.bias"] = (("params", layer.name, "bn", "bias"), same)
            mapping[f"{bn}.running_mean"] = (("batch_stats", layer.name, "bn", "mean"), same)
            mapping[f"{bn}.running_var"] = (("batch_stats", layer.name, "bn", "var"), same)
    return mapping


def _to_numpy(value):
    import numpy as np

    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def read_torch_checkpoint(path) -> dict:
    """Read a ``.pt`` state_dict with ``torch.load(weights_only=True)`` (no arbitrary unpickling)."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs PyTorch: pip install torch") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state_dict (a mapping of key -> tensor), found {type(state).__name__}")
    return dict(state)


def load_torch_state_dict(name: str, state_dict) -> dict:
    """Variables ``{'params', 'batch_stats'}`` for model ``name`` from a PyTorch state_dict.

    ``state_dict`` maps original keys to arrays (numpy or torch tensors), or is
    the path of a ``.pt`` file. Raises ``ValueError`` naming any missing,
    unexpected or mis-shaped key.
    """
    _check_name(name)
    if not isinstance(state_dict, Mapping):
        state_dict = read_torch_checkpoint(state_dict)
    mapping = _torch_key_map(name)
    # num_batches_tracked is PyTorch bookkeeping with no Flax counterpart: accepted, ignored.
    ignorable = {k for k in state_dict if k.endswith(".num_batches_tracked")
                 and k.replace("num_batches_tracked", "running_mean") in mapping}  # fmt: skip
    unexpected = sorted(set(state_dict) - set(mapping) - ignorable)
    missing = [k for k in mapping if k not in state_dict]
    if missing or unexpected:
        raise ValueError(
            f"state_dict does not fit {name}: missing keys {missing}, unexpected keys {unexpected}"
        )
    expected = jax.eval_shape(lambda: init_variables(get_model(name), jax.random.key(0)))
    variables: dict = {"params": {}, "batch_stats": {}}
    for key, (path, transform) in mapping.items():
        array = transform(_to_numpy(state_dict[key]))
        want = expected
        for p in path:
            want = want[p]
        if tuple(array.shape) != tuple(want.shape):
            torch_shape = tuple(_to_numpy(state_dict[key]).shape)
            want_torch = tuple(want.shape[i] for i in (3, 2, 0, 1)) if len(want.shape) == 4 else tuple(want.shape)
            raise ValueError(f"{name}: key {key!r} has shape {torch_shape}, expected {want_torch}")
        node = variables
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = jnp.asarray(array, jnp.float32)
    return variables
