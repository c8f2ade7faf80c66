"""oneDNN's direct convolutions on XLA:CPU, called through ``jax.ffi`` (optional).

PyTorch's CPU convolutions are oneDNN's; XLA:CPU's own (and our im2col lowering) were the whole
gap between the two on these 1-20 channel layers (docs/benchmarks.md). ``conv_onednn`` computes
what ``layers.conv_im2col`` computes (a VALID, stride-1 convolution of an NHWC input with an HWIO
kernel) with three oneDNN primitives: forward, input gradient, weight gradient.

The kernels are a small C++ library (``jax_mnist/conv_onednn.cc``) that ``pip install`` builds
when a C++ compiler is there (setup.py), linked at load time against the ``libdnnl.so.3`` of the
``onednn-cpu-gomp`` package. Where either is missing, ``available()`` is False, ``why_unavailable()``
says why, and the package runs its XLA lowerings instead (``layers.resolve_conv_impl``).

The seed axis: ``vmap`` runs the kernel once per seed (``vmap_method="sequential"``), so each
seed computes exactly its single-seed result; on CPU the seeds run under ``lax.map`` anyway.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import importlib.metadata
import os
from pathlib import Path

import jax
import jax.numpy as jnp

LIBRARY_STEM = "_conv_onednn"  # setup.py's extension name: jax_mnist/_conv_onednn.<python tag>.so
TARGETS = {
    "forward": "JaxMnistConvForward",
    "input_grad": "JaxMnistConvInputGrad",
    "weight_grad": "JaxMnistConvWeightGrad",
}
PASSES = tuple(TARGETS)  # in the kernels' pass numbering: 0, 1, 2


def kernel_library() -> Path | None:
    """The built kernel library beside this module, or None when setup.py did not build it."""
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"{LIBRARY_STEM}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def onednn_library() -> Path | None:
    """``libdnnl.so.3`` as the ``onednn-cpu-gomp`` package installed it (a data file of the wheel)."""
    try:
        files = importlib.metadata.distribution("onednn-cpu-gomp").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == "libdnnl.so.3":
            return Path(file.locate()).resolve()
    return None


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """Loads oneDNN, then the kernels, and registers them with XLA:CPU, once per process."""
    if os.environ.get("JAX_MNIST_ONEDNN", "1") == "0":
        return None, "turned off by JAX_MNIST_ONEDNN=0"
    kernels = kernel_library()
    if kernels is None:
        return None, (
            f"the kernel library ({LIBRARY_STEM}*.so beside {Path(__file__).name}) was not built: "
            "reinstall with a C++ compiler present (pip install -e .)"
        )
    dnnl = onednn_library()
    if dnnl is None:
        return None, "the onednn-cpu-gomp package (libdnnl.so.3) is not installed"
    try:
        # Global, so that the kernels' undefined oneDNN symbols resolve against it.
        ctypes.CDLL(str(dnnl), mode=ctypes.RTLD_GLOBAL)
        library = ctypes.CDLL(str(kernels))
    except OSError as e:
        return None, f"could not load {e}"
    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(
            f"jax_mnist_conv_{name}", jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
        )
    library.jax_mnist_conv_impl.restype = ctypes.c_char_p
    library.jax_mnist_conv_impl.argtypes = [ctypes.c_int] + [ctypes.c_int64] * 7
    return library, ""


def available() -> bool:
    """Whether the oneDNN convolutions can run in this process (CPU only)."""
    return _load()[0] is not None


def why_unavailable() -> str:
    """Why ``available()`` is False ("" when it is True)."""
    return _load()[1]


def _library() -> ctypes.CDLL:
    """The loaded kernels (registered with XLA:CPU), or a RuntimeError saying why there are none."""
    library, reason = _load()
    if library is None:
        raise RuntimeError(f"oneDNN convolutions unavailable: {reason}")
    return library


def kernel_names(x_shape: tuple, kernel_shape: tuple) -> dict[str, str]:
    """Which oneDNN kernel each pass runs for these shapes (e.g. ``brgconv:avx2``): what was measured."""
    library = _library()
    n, h, w, cin = x_shape
    kh, kw, _, cout = kernel_shape
    return {
        p: library.jax_mnist_conv_impl(i, n, h, w, cin, kh, kw, cout).decode() for i, p in enumerate(PASSES)
    }


def _call(name: str, shape: tuple, *operands: jax.Array) -> jax.Array:
    _library()  # registers the kernels on first use
    out = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.ffi.ffi_call(f"jax_mnist_conv_{name}", out, vmap_method="sequential")(*operands)


@jax.custom_vjp
def conv_onednn(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """VALID stride-1 convolution (NHWC input, HWIO kernel, float32) by oneDNN; needs ``available()``."""
    n, h, w, _ = x.shape
    kh, kw, _, cout = kernel.shape
    return _call("forward", (n, h - kh + 1, w - kw + 1, cout), x, kernel)


def _conv_fwd(x, kernel):
    return conv_onednn(x, kernel), (x, kernel)


def _conv_bwd(residuals, dy):
    x, kernel = residuals
    return _call("input_grad", x.shape, dy, kernel), _call("weight_grad", kernel.shape, x, dy)


conv_onednn.defvjp(_conv_fwd, _conv_bwd)
