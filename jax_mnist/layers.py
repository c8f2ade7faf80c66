"""Building blocks of the S7 networks: PyTorch-exact BatchNorm, convolution lowerings, max pool.

Everything here computes what the PyTorch layer of the same name computes (tested against
PyTorch in ``tests/test_torch_parity.py``); the lowerings are chosen for speed on XLA:CPU.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_mnist import onednn
from jax_mnist.dropout import Dropout as FusedDropout
from jax_mnist.errors import ConfigError


def torch_uniform_init(fan_in: int) -> Callable:
    """PyTorch's default conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and bias."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        # Drawn flat, then reshaped: the same numbers (Threefry counts elements in row-major
        # order; tested), but XLA:CPU compiles a 4-D draw such as (3, 3, 8, 10) for seconds
        # (12 s for that one, 0.2 s flat), which made ours_5k's init compile for 16 s
        # (scripts/compile_times.py --init).
        return jax.random.uniform(key, (math.prod(shape),), dtype, -bound, bound).reshape(shape)

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
    patches = jnp.concatenate(
        [x[:, i : i + ho, j : j + wo, :] for i in range(kh) for j in range(kw)], axis=-1
    )
    return (patches.reshape(-1, kh * kw * cin) @ kernel.reshape(-1, cout)).reshape(n, ho, wo, cout)


def conv_xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


# Inputs wider than this run im2col under conv_impl "onednn": measured per layer and pass
# (scripts/profile_layers.py, docs/benchmarks.md), oneDNN's kernels on JAX's NHWC layout win every
# layer of up to 128 input channels (model 1's 32 -> 64 to 128 -> 256 included) and lose model 1's
# 256 -> 512 and 512 -> 1024 layers, where im2col's one large matmul is faster.
ONEDNN_MAX_IN_CHANNELS = 128


def conv_onednn(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """oneDNN's kernels (``jax_mnist.onednn``) where they measured faster than im2col, im2col
    where not: a kernel as large as its input (one plain matmul) or an input of more than
    ``ONEDNN_MAX_IN_CHANNELS`` channels."""
    kh, kw, cin, _ = kernel.shape
    if (kh, kw) == x.shape[1:3] or cin > ONEDNN_MAX_IN_CHANNELS:
        return conv_im2col(x, kernel)
    return onednn.conv_onednn(x, kernel)


# "onednn": oneDNN's kernels through jax.ffi, CPU only, where they were built (resolve_conv_impl).
CONV_IMPLS = {"im2col": conv_im2col, "onednn": conv_onednn, "xla": conv_xla}


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


def resolve_conv_impl(impl: str, platform: str, devices: int = 1) -> str:
    """``"auto"``: on one CPU device, oneDNN's kernels where they are available, else im2col (both
    faster there than XLA's convolution, docs/benchmarks.md); im2col on several CPU devices (XLA's
    partitioner cannot split a batch through a custom call); XLA's convolution on GPU/TPU, where
    cuDNN and the TPU compiler do better than a patch matrix. The lowerings compute the same
    function (rounding aside: tests/test_torch_parity.py)."""
    if impl == "auto":
        if platform != "cpu":
            return "xla"
        return "onednn" if devices == 1 and onednn.available() else "im2col"
    if impl not in CONV_IMPLS:
        raise ConfigError(f"conv_impl must be auto or one of {', '.join(sorted(CONV_IMPLS))}, found {impl!r}")
    if impl == "onednn":
        if platform != "cpu":
            raise ConfigError(f"conv_impl 'onednn' runs on the CPU only, not on {platform}: use auto or xla")
        if devices != 1:
            raise ConfigError(f"conv_impl 'onednn' runs on one device, not {devices}: use auto or im2col")
        if not onednn.available():
            raise ConfigError(f"conv_impl 'onednn' is unavailable here: {onednn.why_unavailable()}")
    return impl


DROPOUT_IMPLS = {"fused": FusedDropout, "flax": nn.Dropout}


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
