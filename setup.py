"""megatron_code: a Megatron-style GPT pretraining framework for studying code data."""
from setuptools import setup

PACKAGES = [
    "megatron_code",
    "megatron_code.data",
    "megatron_code.model",
    "megatron_code.parallel",
    "megatron_code.training",
    "megatron_code.evaluation",
    "megatron_code.kernels",
    "megatron_code.recipes",
]

setup(
    name="megatron_code",
    version="0.1.0",
    description="Megatron-style pretraining of GPT models on text+code mixtures",
    python_requires=">=3.10",
    packages=PACKAGES,
    # kernels/ is megatron_code.kernels through the link megatron_code/kernels -> ../kernels, and
    # holds no __init__.py: see kernels/ops.py for why it must never be a regular package.
    # examples/recipes installs as megatron_code.recipes (package data) for the studies, which
    # must run from an installed package with no checkout around it.
    package_dir={"megatron_code.recipes": "examples/recipes"},
    package_data={"megatron_code.recipes": ["*.yaml", "cohere_2.8b/*.yaml", "extensions/*.yaml", "sft/*.yaml",
                                            "sft/extensions/*.yaml"]},
    install_requires=[
        "torch>=2.4,<2.14",
        "megatron-core>=0.16,<0.17",
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "sentencepiece>=0.2",
        "numpy>=1.24",
        "PyYAML>=6.0",
        "tqdm>=4.60",
        "xxhash>=3.0",  # checkpoint checksums (training/integrity.py)
    ],
    extras_require={
        # lm-eval (with its [hf] extra) installs in about a minute, so CI runs the lm-eval tests too
        "dev": ["pytest>=7", "pytest-timeout", "transformers>=4.45", "tokenizers>=0.19", "safetensors", "matplotlib",
                "lm-eval[hf]>=0.4.9,<0.5"],
        "hf": ["transformers>=4.45", "tokenizers>=0.19", "datasets"],
        "eval": ["lm-eval[hf]>=0.4.9,<0.5", "transformers>=4.45", "tokenizers>=0.19", "safetensors"],
        "tensorboard": ["tensorboard"],
        "plot": ["matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "megatron-code=megatron_code.train:main",
            "megatron-code-quickstart=megatron_code.quickstart:main",
        ]
    },
)
