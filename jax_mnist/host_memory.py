"""Keep freed host memory in the process, so XLA:CPU's per-step buffers are not page-faulted anew.

XLA:CPU allocates each executable's temporaries as one block per call (192 MB for
model 8's training step at batch 256) and frees it afterwards. glibc serves
blocks that large with ``mmap`` and returns them with ``munmap``, so every step
touched ~47,000 fresh pages, each faulted in and zeroed by the kernel: about a
third of the step on this 2-core machine (docs/benchmarks.md). Three ``mallopt``
settings make glibc reuse the memory instead:

- ``M_ARENA_MAX = 1``: every thread allocates from the main heap (a thread's own
  arena would ``mmap`` a block larger than its 64 MB heap regardless of the rest);
- ``M_MMAP_MAX = 0``: large blocks come from the heap, not from ``mmap``;
- ``M_TRIM_THRESHOLD = 2**31 - 1``: freed memory at the top of the heap is kept.

The process keeps its peak heap size instead of shrinking after a step. This only
takes effect for threads that have not allocated yet, so it must run before JAX
starts its CPU backend. The ``jax-mnist`` command and the scripts call
``apply_from_env()`` first thing; importing ``jax_mnist`` does not (a library must not
change its host process's allocator behind its back). Set ``JAX_MNIST_KEEP_HOST_MEMORY=0``
to leave the allocator alone in the command and scripts too. On other C
libraries (macOS, musl) and on failure it does nothing. Accelerators keep their
own device allocators; this changes host memory only.
"""

from __future__ import annotations

import ctypes
import os
import platform

ENV_VAR = "JAX_MNIST_KEEP_HOST_MEMORY"

# From glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))

_applied = False


def keep_freed_memory() -> bool:
    """Apply the ``mallopt`` settings above; True if glibc accepted all of them."""
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _applied = all(mallopt(option, value) == 1 for option, value in _SETTINGS)
    return _applied


def enabled_by_env() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def apply_from_env() -> bool:
    """``keep_freed_memory()`` unless ``JAX_MNIST_KEEP_HOST_MEMORY`` turns it off; True if applied."""
    return keep_freed_memory() if enabled_by_env() else False


def applied() -> bool:
    """Whether ``keep_freed_memory`` has taken effect in this process."""
    return _applied
