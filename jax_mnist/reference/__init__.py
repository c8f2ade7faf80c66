"""Reference implementations outside the runtime surface: the PyTorch originals (needs torch,
the ``test`` extra), used by the parity tests, the exporter checks and the benchmark."""
