"""Installs the megalite and kernels packages (`pip install -e .[dev]`)."""

from setuptools import find_packages, setup

setup(
    name="megalite",
    version="0.1.0",
    description="Compact 4-D parallel LLM pretraining on plain torch.distributed",
    packages=find_packages(include=["megalite", "megalite.*", "kernels", "kernels.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "sentencepiece",
        "safetensors",
        "triton>=3.0; platform_system == 'Linux'",
        "einops",
        "PyYAML",
    ],
    extras_require={"dev": ["pytest", "transformers"], "viz": ["matplotlib"]},
    entry_points={"console_scripts": ["megalite-train=megalite.train:main"]},
)
