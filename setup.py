"""Hecate: the four top-level folders are the subpackages of one namespace, ``hecate``.

``trainer/`` -> ``hecate.trainer``, ``parallel/`` -> ``hecate.parallel``, ``collectives/`` ->
``hecate.collectives``, ``launch/`` -> ``hecate.launch``. ``hecate`` itself is an implicit namespace
package, so ``pip install .`` and ``pip install -e .`` both work without a fifth folder.
"""

from setuptools import setup

ROOMS = ("collectives", "parallel", "trainer", "launch")


def _packages() -> dict[str, str]:
    """Map every package below the four rooms to its folder (``parallel/moe`` -> ``hecate.parallel.moe``)."""
    from pathlib import Path

    mapping = {}
    for room in ROOMS:
        for init in sorted(Path(room).rglob("__init__.py")):
            folder = init.parent.as_posix()
            mapping["hecate." + folder.replace("/", ".")] = folder
    return mapping


PACKAGES = _packages()

setup(
    name="hecate",
    version="0.1.0",
    description="Mixture-of-Experts training with fully sharded sparse data parallelism (FSSDP)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    include_package_data=True,
    install_requires=[
        # CPU machines: install torch==2.13.0 first (the Makefile does); an open range here keeps GPU builds usable.
        "torch>=2.6",
        "numpy",
        "omegaconf>=2.3",
        "pyyaml",
        "tokenizers>=0.19",
        "safetensors",
        "tqdm",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        "mpi": ["mpi4py>=4.0"],
        "ray": ["ray[default]>=2.40"],
        "gpu": ["cupy-cuda12x"],
        "deepspeed": ["deepspeed"],
        # benchmarks/peers.py and the charts; install with DS_BUILD_OPS=0 on CPU (`make bench` does)
        "peers": ["deepspeed", "matplotlib"],
        "dev": ["pytest>=8", "pytest-timeout", "hypothesis", "ruff==0.17.6"],
        # prepare-data from Parquet, `datasets` folders and Hugging Face tokenizer folders
        "hf": ["transformers", "datasets", "pyarrow"],
    },
    entry_points={"console_scripts": ["hecate = hecate.launch.cli:main"]},
)
