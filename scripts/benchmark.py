#!/usr/bin/env python
"""Benchmark model 8's training step against PyTorch and write docs/benchmark.json.

Same as `jax-mnist bench --compare-torch --json docs/benchmark.json`; extra arguments pass through.
"""

import sys

from jax_mnist.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--compare-torch", "--json", "docs/benchmark.json", *sys.argv[1:]]))
