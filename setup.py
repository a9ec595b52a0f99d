"""Packaging: the top-level ``kernels/`` folder installs as ``orthograd_fast.kernels``.

No GPU detection here (STYLE.md): the Triton kernels compile on first use, and the optional
CUDA C++ sources in ``csrc/`` are JIT-built lazily, so installing never needs a GPU.
"""
from setuptools import setup

setup(
    packages=[
        "orthograd_fast", "orthograd_fast.gram", "orthograd_fast.gram.rules", "orthograd_fast.kernels",
        "orthograd_fast.unlearning", "orthograd_fast.unlearning.datasets", "orthograd_fast.unlearning.models",
    ],
    package_dir={"orthograd_fast": "orthograd_fast", "orthograd_fast.kernels": "kernels"},
)
