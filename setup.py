"""Builds the optional oneDNN convolution kernels (jax_mnist/conv_onednn.cc, see jax_mnist/onednn.py);
everything else about the package is in pyproject.toml.

The headers come from the build environment (pyproject's build-system requires): XLA's FFI API from
jaxlib, oneDNN's from onednn-devel-cpu-gomp. The library is not linked against libdnnl: its oneDNN
symbols resolve when jax_mnist.onednn loads the runtime's libdnnl.so.3 first. A build that fails
(no compiler, another platform) leaves the package without the kernels, not uninstallable.
"""

import importlib.metadata
import importlib.util
from pathlib import Path

from setuptools import Extension, setup


def include_dirs() -> list[str]:
    dirs = []
    jaxlib = importlib.util.find_spec("jaxlib")
    if jaxlib is not None:
        dirs += [str(Path(p) / "include") for p in jaxlib.submodule_search_locations]
    try:
        files = importlib.metadata.distribution("onednn-devel-cpu-gomp").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    dirs += [str(Path(f.locate()).parent) for f in files if f.name == "dnnl.hpp" and f.parent.name != "dnnl"]
    return dirs


setup(
    ext_modules=[
        Extension(
            "jax_mnist._conv_onednn",
            sources=["jax_mnist/conv_onednn.cc"],
            include_dirs=include_dirs(),
            language="c++",
            extra_compile_args=["-std=c++17", "-O2", "-Wno-return-type"],
            optional=True,
        )
    ]
)
