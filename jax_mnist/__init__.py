"""jax_mnist: the S7 MNIST study (nine CNNs, 6.4M down to 7,914 parameters) in JAX/Flax/optax."""

__version__ = "0.1.0"
