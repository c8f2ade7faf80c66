"""oneDNN's convolutions through jax.ffi (jax_mnist.onednn): built by `pip install -e .` here, the
same function as PyTorch's convolution and our im2col (forward and both gradients; the whole
networks' gradients: tests/test_torch_parity.py), each seed of a seed axis bitwise its single-seed
result, and a plain fallback where the kernels are missing."""

import os
import platform
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from jax_mnist import onednn
from jax_mnist.layers import CONV_IMPLS, conv_im2col

# Where pip builds the kernels (setup.py); JAX_MNIST_ONEDNN=0 turns them off on purpose.
BUILT_HERE = platform.system() == "Linux" and platform.machine() == "x86_64"
TURNED_OFF = os.environ.get("JAX_MNIST_ONEDNN") == "0"

# (input NHWC, kernel HWIO): one input channel, block 2's 10 -> 20 channels, a 1x1 transition, and a
# kernel as large as its input (model 1's last layers), at a small batch.
SHAPES = [
    ((16, 28, 28, 1), (3, 3, 1, 10)),
    ((16, 26, 26, 10), (3, 3, 10, 20)),
    ((16, 11, 11, 20), (1, 1, 20, 10)),
    ((16, 7, 7, 16), (7, 7, 16, 10)),
]


@pytest.fixture(scope="module")
def kernels():
    if TURNED_OFF:
        pytest.skip("JAX_MNIST_ONEDNN=0 turns the oneDNN kernels off")
    if not BUILT_HERE:
        pytest.skip(
            f"the oneDNN kernels are built on Linux x86_64 only, not {platform.system()} {platform.machine()}"
        )
    assert onednn.available(), f"the oneDNN kernels should be built here: {onednn.why_unavailable()}"


def test_pip_built_the_kernels_on_this_machine():
    """CI's `pip install -e .[test]` builds them: a build that failed silently fails here."""
    if TURNED_OFF or not BUILT_HERE:
        pytest.skip("not expected here")
    assert onednn.available(), onednn.why_unavailable()
    names = onednn.kernel_names(*SHAPES[1])
    assert set(names) == {"forward", "input_grad", "weight_grad"} and all(names.values()), names
    print(names)


def _random(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _ours(conv, x, kernel, dy):
    """Forward and both gradients (the vjp of ``dy``) of ``conv``, jitted."""

    @jax.jit
    def run(x, kernel, dy):
        y, vjp = jax.vjp(conv, x, kernel)
        return (y, *vjp(dy))

    return [np.asarray(a) for a in run(x, kernel, dy)]


def _torch(x, kernel, dy):
    tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    tk = torch.tensor(kernel.transpose(3, 2, 0, 1), requires_grad=True)
    y = torch.nn.functional.conv2d(tx, tk)
    y.backward(torch.tensor(dy.transpose(0, 3, 1, 2)))
    return [
        y.detach().numpy().transpose(0, 2, 3, 1),
        tx.grad.numpy().transpose(0, 2, 3, 1),
        tk.grad.numpy().transpose(2, 3, 1, 0),
    ]


def _close(ours, theirs, what):
    for name, a, b in zip(("forward", "input gradient", "weight gradient"), ours, theirs):
        scale = float(np.abs(b).max())
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(scale, 1.0), err_msg=f"{what}: {name}")


@pytest.mark.parametrize("x_shape,kernel_shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_gradients_equal_pytorch_and_im2col(kernels, x_shape, kernel_shape):
    x, kernel = _random(x_shape, 0), _random(kernel_shape, 1) * 0.3
    n, h, w, _ = x_shape
    kh, kw, _, cout = kernel_shape
    dy = _random((n, h - kh + 1, w - kw + 1, cout), 2)
    ours = _ours(onednn.conv_onednn, x, kernel, dy)
    _close(ours, _torch(x, kernel, dy), "oneDNN vs PyTorch")
    _close(ours, _ours(conv_im2col, x, kernel, dy), "oneDNN vs im2col")


def test_each_seed_of_a_seed_axis_is_its_single_seed_result_bitwise(kernels):
    """vmap (GPU-style) and lax.map (CPU's seed axis) over three seeds' weights and data."""
    seeds = 3
    x = _random((seeds, 8, 26, 26, 10), 3)
    kernel = _random((seeds, 3, 3, 10, 20), 4) * 0.3
    dy = _random((seeds, 8, 24, 24, 20), 5)

    def one(args):
        x, kernel, dy = args
        y, vjp = jax.vjp(onednn.conv_onednn, x, kernel)
        return (y, *vjp(dy))

    alone = [jax.jit(one)((x[i], kernel[i], dy[i])) for i in range(seeds)]
    for together in (
        jax.jit(jax.vmap(one))((x, kernel, dy)),
        jax.jit(lambda a: jax.lax.map(one, a))((x, kernel, dy)),
    ):
        for i in range(seeds):
            for a, b in zip(together, alone[i]):
                np.testing.assert_array_equal(np.asarray(a[i]), np.asarray(b))


@pytest.mark.slow  # a fresh process, to load the package without the kernels
def test_without_the_kernels_auto_is_im2col_and_onednn_says_why():
    code = (
        "import jax, jax.numpy as jnp\n"
        "from jax_mnist import onednn\n"
        "from jax_mnist.errors import ConfigError\n"
        "from jax_mnist.layers import resolve_conv_impl\n"
        "from jax_mnist.models import get_model\n"
        "print(onednn.available(), resolve_conv_impl('auto', 'cpu'))\n"
        "try:\n"
        "    resolve_conv_impl('onednn', 'cpu')\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
        "model = get_model('model_8_dropout_maxpool')\n"
        "variables = model.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)))\n"
        "print(model.apply(variables, jnp.zeros((2, 28, 28, 1)), train=False).shape)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "JAX_MNIST_ONEDNN": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "False im2col",
        "conv_impl 'onednn' is unavailable here: turned off by JAX_MNIST_ONEDNN=0",
        "(2, 10)",
    ]


@pytest.mark.parametrize(
    "x_shape,kernel_shape,kernels_run",
    [
        ((2, 16, 16, 128), (3, 3, 128, 256), True),  # model 1's conv4: oneDNN measured faster
        ((2, 9, 9, 256), (3, 3, 256, 512), False),  # model 1's conv5: im2col measured faster
        ((2, 3, 3, 16), (3, 3, 16, 10), False),  # a kernel as large as its input: one matmul
    ],
)
def test_conv_impl_onednn_runs_the_kernels_where_they_measured_faster(
    kernels, x_shape, kernel_shape, kernels_run
):
    text = jax.jit(CONV_IMPLS["onednn"]).lower(
        np.zeros(x_shape, np.float32), np.zeros(kernel_shape, np.float32)
    )
    assert ("jax_mnist_conv_forward" in text.as_text()) == kernels_run
