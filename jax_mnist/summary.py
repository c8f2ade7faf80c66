"""Per-layer summary of a model: kind, output shape, parameters and receptive field (computed)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jax_mnist.zoo import INPUT_SHAPE, ConvSpec, GapSpec, LayerSpec, PoolSpec, count_params, get_model


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
    multiply_adds: int  # of the convolutions, per image: what an epoch's time roughly scales with

    def format(self) -> str:
        width = max(12, *(len(r.name) for r in self.rows))  # the longest layer name sets the column
        header = f"{'layer':<{width}} {'kind':<30} {'output (N,H,W,C)':<20} {'params':>10} {'RF':>4}"
        lines = [f"{self.model}", header, "-" * len(header)]
        for r in self.rows:
            shape = "(" + ", ".join(["N", *map(str, r.output_shape[1:])]) + ")"
            lines.append(f"{r.name:<{width}} {r.kind:<30} {shape:<20} {r.params:>10,} {r.receptive_field:>4}")
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


@functools.cache  # a network's summary never changes; the report asks for each model several times
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
    rows, rf, jump, hw, channels, macs = [], 1, 1, INPUT_SHAPE[0], INPUT_SHAPE[2], 0
    for layer in model.layers:
        kernel, stride = _rf_kernel_stride(layer, hw)
        rf += (kernel - 1) * jump
        jump *= stride
        out_shape = tuple(intermediates[layer.name]["__call__"][0].shape)
        hw = out_shape[1]
        if isinstance(layer, ConvSpec):
            macs += layer.kernel**2 * channels * out_shape[1] * out_shape[2] * out_shape[3]
        channels = out_shape[-1]
        rows.append(LayerRow(layer.name, layer.kind, out_shape, count_params(params.get(layer.name, {})), rf))
    running = count_params(variables.get("batch_stats", {}))
    return Summary(name, tuple(rows), count_params(params), running, rf, macs)
