#!/usr/bin/env bash
# The wheels an accelerator machine without internet is likely to lack, for CPython 3.12 on
# manylinux x86_64: tensorflow-datasets, array_record and their small dependencies. Run it on a
# machine that reaches PyPI; carry DIR (under 60 MiB) with the four MNIST .gz files, then:
#   python scripts/accelerator_check.py --out OUT --wheels DIR --mnist-files MNIST
# jax, jaxlib, flax, optax, orbax-checkpoint, torch and numpy are not fetched: GPU machines come
# with their own builds.
set -euo pipefail
dir="${1:?usage: scripts/accelerator_wheels.sh DIR}"
mkdir -p "$dir"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
binary=(tensorflow-datasets array_record dm-tree immutabledict simple_parsing docstring_parser
        tensorflow-metadata googleapis-common-protos termcolor toml importlib_resources)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dir" "${binary[@]}"
# promise (imported by tfds) is published as source only: build its pure-Python wheel here.
python3 -m pip wheel --quiet --no-deps -w "$dir" promise
ls -l "$dir"/*.whl | awk '{ total += $5; print $5, $9 } END { printf "%d wheels, %.1f MiB\n", NR, total / 1048576 }'
