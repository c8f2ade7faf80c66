"""jax_mnist: the S7 MNIST study (nine CNNs, 6.4M down to 7,914 parameters) in JAX/Flax/optax.

Importing the package changes no process-wide setting. The ``jax-mnist`` command and the
scripts call ``jax_mnist.host_memory.apply_from_env()`` first (it keeps XLA:CPU's freed
buffers mapped); a library user may call it too, before JAX starts its CPU backend.
"""

__version__ = "0.3.0"
