#!/usr/bin/env python
"""Per layer and per pass, JAX beside PyTorch eager: where a training step's time goes.

For each layer of the named networks at the given batch size, in one process, with the same
thread count for both: every convolution's forward pass, input gradient and weight gradient
(JAX with each lowering of ``jax_mnist.layers.CONV_IMPLS`` and the "taps" one below, each
jitted alone; PyTorch's ``F.conv2d`` and aten's convolution_backward, NCHW), BatchNorm in
training mode (forward, and forward + backward), ReLU, dropout, max pool (forward, and forward +
backward). Medians of ``--repeats`` calls after a warm-up call; each JAX program is compiled
before it is timed.

A layer alone is not the layer inside the step (XLA fuses BatchNorm, ReLU and dropout into
their neighbours there), so the sums are a guide, not the step time: ``jax-mnist bench`` times
the step itself.

Usage: python scripts/profile_layers.py [--models m1,m2] [--batch 256] [--repeats 15] [--json F]
Default: model_8_dropout_maxpool and model_3_lighter_model at batch 256 (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from jax_mnist import host_memory

host_memory.apply_from_env()  # first, before JAX's backend starts: keeps freed host memory
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from jax_mnist import onednn  # noqa: E402
from jax_mnist.dropout import Dropout  # noqa: E402
from jax_mnist.layers import CONV_IMPLS, batch_norm_train, max_pool_2x2  # noqa: E402
from jax_mnist.summary import summarize  # noqa: E402
from jax_mnist.zoo import ConvSpec, DropoutSpec, PoolSpec, model_layers  # noqa: E402


def conv_taps(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A third lowering, measured here only: the sum over the k*k taps of a shifted slice times
    that tap's (cin, cout) matrix (no patch matrix, but k*k small matmuls). It won some layers'
    forward pass alone and lost the step (2x slower, scripts/profile_xla_flags.py's figures in
    docs/benchmarks.md), so the package does not offer it."""
    kh, kw, cin, cout = kernel.shape
    n, h, w, _ = x.shape
    ho, wo = h - kh + 1, w - kw + 1
    total = 0.0
    for i in range(kh):
        for j in range(kw):
            total = total + (x[:, i : i + ho, j : j + wo, :].reshape(-1, cin) @ kernel[i, j]).reshape(
                n, ho, wo, cout
            )
    return total


# "onednn" is oneDNN's kernels on every layer (conv_impl "onednn" runs im2col on the layers where
# these figures have im2col faster: jax_mnist.layers.ONEDNN_MAX_IN_CHANNELS).
LOWERINGS = {**CONV_IMPLS, "onednn": onednn.conv_onednn, "taps": conv_taps}
THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def median_ms(call, repeats: int) -> float:
    call()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def jax_timer(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    return lambda: jax.block_until_ready(compiled(*args))


def conv_rows(spec: ConvSpec, shape, repeats: int, rng) -> list[dict]:
    n, h, w, cin = shape
    p = spec.padding
    x = jnp.asarray(rng.standard_normal((n, h + 2 * p, w + 2 * p, cin)), jnp.float32)
    kernel = jnp.asarray(
        rng.standard_normal((spec.kernel, spec.kernel, cin, spec.features)) * 0.1, jnp.float32
    )
    out_shape = jax.eval_shape(LOWERINGS["xla"], x, kernel).shape
    dy = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)
    passes = {}
    for impl, conv in LOWERINGS.items():
        passes.setdefault("forward", {})[impl] = median_ms(jax_timer(conv, x, kernel), repeats)
        input_grad = lambda x, k, g, conv=conv: jax.vjp(lambda x: conv(x, k), x)[1](g)[0]  # noqa: E731
        weight_grad = lambda x, k, g, conv=conv: jax.vjp(lambda k: conv(x, k), k)[1](g)[0]  # noqa: E731
        passes.setdefault("input gradient", {})[impl] = median_ms(
            jax_timer(input_grad, x, kernel, dy), repeats
        )
        passes.setdefault("weight gradient", {})[impl] = median_ms(
            jax_timer(weight_grad, x, kernel, dy), repeats
        )
    tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    tk = torch.from_numpy(np.asarray(kernel).transpose(3, 2, 0, 1).copy())
    tdy = torch.from_numpy(np.asarray(dy).transpose(0, 3, 1, 2).copy())

    # aten's convolution_backward for one gradient each, no forward pass in the figure
    torch_input_grad = lambda: torch.nn.grad.conv2d_input(tx.shape, tk, tdy)  # noqa: E731
    torch_weight_grad = lambda: torch.nn.grad.conv2d_weight(tx, tk.shape, tdy)  # noqa: E731

    with torch.no_grad():
        passes["forward"]["torch"] = median_ms(lambda: F.conv2d(tx, tk), repeats)
        passes["input gradient"]["torch"] = median_ms(torch_input_grad, repeats)
        passes["weight gradient"]["torch"] = median_ms(torch_weight_grad, repeats)
    where = f"{cin}->{spec.features}, {h + 2 * p}x{w + 2 * p}, k{spec.kernel}"
    return [{"layer": spec.name, "op": f"conv {where}", "pass": k, "ms": v} for k, v in passes.items()]


def elementwise_rows(spec: ConvSpec, shape, repeats: int, rng) -> list[dict]:
    """BatchNorm (training), ReLU and dropout on the convolution's output."""
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    c = shape[-1]
    scale, bias = jnp.ones((c,)), jnp.zeros((c,))
    tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    rows = []
    if spec.batchnorm:

        def bn_both(x, s, b):
            y, pull = jax.vjp(lambda x, s, b: batch_norm_train(x, s, b, 1e-5), x, s, b)
            return y, pull(y)

        def torch_bn(backward):
            xi = tx.detach().requires_grad_(backward)
            ts, tb = torch.ones(c, requires_grad=backward), torch.zeros(c, requires_grad=backward)
            y = F.batch_norm(xi, torch.zeros(c), torch.ones(c), ts, tb, training=True)
            if backward:
                y.backward(y.detach())

        forward = {
            "jax": median_ms(
                jax_timer(lambda x, s, b: batch_norm_train(x, s, b, 1e-5), x, scale, bias), repeats
            )
        }
        with torch.no_grad():
            forward["torch"] = median_ms(lambda: torch_bn(False), repeats)
        both = {
            "jax": median_ms(jax_timer(bn_both, x, scale, bias), repeats),
            "torch": median_ms(lambda: torch_bn(True), repeats),
        }
        rows += [
            {"layer": spec.name, "op": "batchnorm (train)", "pass": "forward", "ms": forward},
            {"layer": spec.name, "op": "batchnorm (train)", "pass": "forward + backward", "ms": both},
        ]
    if spec.relu:
        with torch.no_grad():
            relu = {
                "jax": median_ms(jax_timer(jax.nn.relu, x), repeats),
                "torch": median_ms(lambda: F.relu(tx), repeats),
            }
        rows.append({"layer": spec.name, "op": "relu", "pass": "forward", "ms": relu})
    if spec.dropout:
        rows.append(dropout_row(spec.name, spec.dropout, x, tx, repeats))
    return rows


def dropout_row(name: str, rate: float, x, tx, repeats: int) -> dict:
    module = Dropout(rate, deterministic=False)
    key = jax.random.key(0)
    fn = lambda x, key: module.apply({}, x, rngs={"dropout": key})  # noqa: E731
    with torch.no_grad():
        ms = {
            "jax": median_ms(jax_timer(fn, x, key), repeats),
            "torch": median_ms(lambda: F.dropout(tx, rate), repeats),
        }
    return {"layer": name, "op": f"dropout({rate:g}) mask and multiply", "pass": "forward", "ms": ms}


def pool_rows(name: str, shape, repeats: int, rng) -> list[dict]:
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())

    def both(x):
        y, pull = jax.vjp(max_pool_2x2, x)
        return pull(y)[0]

    def torch_both():
        xi = tx.detach().requires_grad_()
        y = F.max_pool2d(xi, 2, 2)
        y.backward(y.detach())

    with torch.no_grad():
        forward = {
            "jax": median_ms(jax_timer(max_pool_2x2, x), repeats),
            "torch": median_ms(lambda: F.max_pool2d(tx, 2, 2), repeats),
        }
    backward = {"jax": median_ms(jax_timer(both, x), repeats), "torch": median_ms(torch_both, repeats)}
    op = f"maxpool 2x2 of {shape[1]}x{shape[2]}x{shape[3]}"
    return [
        {"layer": name, "op": op, "pass": "forward", "ms": forward},
        {"layer": name, "op": op, "pass": "forward + backward", "ms": backward},
    ]


def profile(model: str, batch: int, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    shape = (batch, 28, 28, 1)
    for spec, summary_row in zip(model_layers(model), summarize(model).rows):
        out = (batch, *summary_row.output_shape[1:])
        if isinstance(spec, ConvSpec):
            rows += conv_rows(spec, shape, repeats, rng)
            rows += elementwise_rows(spec, out, repeats, rng)
        elif isinstance(spec, PoolSpec):
            rows += pool_rows(spec.name, shape, repeats, rng)
        elif isinstance(spec, DropoutSpec):
            x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
            rows.append(dropout_row(spec.name, spec.rate, x, torch.from_numpy(np.asarray(x)), repeats))
        shape = out
    return rows


def markdown(model: str, rows: list[dict]) -> str:
    impls = list(LOWERINGS)
    head = (
        "| layer | op | pass | " + " | ".join(f"JAX {i}" for i in impls) + " | PyTorch | best JAX / PyTorch |"
    )
    lines = [f"### {model}", "", head, "|---|---|---|" + "---:|" * (len(impls) + 2)]
    totals = {k: 0.0 for k in [*impls, "torch", "best"]}
    for r in rows:
        ms = r["ms"]
        jax_ms = {i: ms[i] for i in impls} if "im2col" in ms else {i: ms["jax"] for i in impls}
        best = min(jax_ms.values())
        cells = [
            f"{jax_ms[i]:.2f}" if "im2col" in ms else (f"{ms['jax']:.2f}" if i == impls[0] else "")
            for i in impls
        ]
        lines.append(
            f"| {r['layer']} | {r['op']} | {r['pass']} | "
            + " | ".join(cells)
            + f" | {ms['torch']:.2f} | {ms['torch'] / best:.2f}x |"
        )
        if r["pass"] != "forward" or not (r["op"].startswith("batchnorm") or r["op"].startswith("maxpool")):
            for i in impls:  # forward + backward rows include their forward: count each pass once
                totals[i] += jax_ms[i]
            totals["torch"] += ms["torch"]
            totals["best"] += best
    cells = " | ".join(f"{totals[i]:.1f}" for i in impls)
    lines.append(
        f"| **sum** | | | {cells} | {totals['torch']:.1f} | {totals['torch'] / totals['best']:.2f}x |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="model_8_dropout_maxpool,model_3_lighter_model")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", help="also write every figure to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    print(
        f"batch {args.batch}, medians of {args.repeats} calls, {THREADS} threads; jax {jax.__version__} "
        f"({jax.devices()[0].platform}), torch {torch.__version__}; ms per call\n"
    )
    found = {}
    for model in args.models.split(","):
        found[model] = profile(model, args.batch, args.repeats)
        print(markdown(model, found[model]) + "\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"batch": args.batch, "repeats": args.repeats, "threads": THREADS, "models": found},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
