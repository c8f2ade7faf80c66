"""jax_mnist: the S7 MNIST study (nine CNNs, 6.4M down to 7,914 parameters) in JAX/Flax/optax."""

from jax_mnist import host_memory

# Before anything starts JAX's CPU backend: glibc then reuses XLA's per-step buffers
# instead of page-faulting them in on every step (see host_memory).
if host_memory.enabled_by_env():
    host_memory.keep_freed_memory()

__version__ = "0.1.0"
