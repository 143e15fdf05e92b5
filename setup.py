"""askd-kernels: fused Triton kernels for the ASKD distillation loss.

Only the ``askd_kernels`` package is installed. ``reference/`` (the test oracle), ``tests/`` and
``bench/`` stay in the source tree on purpose: the shipped package must never depend on the oracle
that checks it, and a top-level package called ``reference`` does not belong in site-packages.
"""
from setuptools import find_packages, setup

setup(
    name="askd-kernels",
    version="0.1.0",
    description="Fused Triton kernels for ASKD (RL-style KD with quality-adaptive skewness) and KD divergences",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["askd_kernels", "askd_kernels.*"]),
    python_requires=">=3.10",
    # torch is deliberately unpinned: CI installs the CPU wheel first so pip never pulls a CUDA build.
    install_requires=["torch>=2.4", "triton>=3.2"],
    extras_require={
        # trl: tests/test_trl_integration.py runs TRL's GKDTrainer; it pulls datasets/pandas/pyarrow but no torch
        # (accelerate's torch>=2.0 is met by the CPU wheel installed first). TRL 1.16 needs Python >= 3.11.
        "test": ["pytest>=8", "hypothesis>=6.100", "pytest-benchmark>=4", "numpy", "matplotlib", "transformers>=4.46",
                 "accelerate", "trl>=1.16; python_version >= '3.11'"],
        "bench": ["pytest-benchmark>=4", "tqdm", "matplotlib"],
        "examples": ["transformers>=4.46", "matplotlib", "tqdm"],
    },
)
