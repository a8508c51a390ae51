"""Installs the megalite and kernels packages (`pip install -e .[dev,viz,data]`)."""

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
    # Optional: megalite runs without them and says which to install when one is needed.
    # launch.sh's environment (tools/env.sh) has them all, so every README command runs.
    extras_require={"dev": ["pytest", "transformers"], "viz": ["matplotlib", "tensorboard"],
                    "data": ["pyarrow", "zstandard", "tqdm"]},
    entry_points={"console_scripts": ["megalite-train=megalite.train:main"]},
)
