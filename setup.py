from setuptools import find_packages, setup

setup(
    name="llama-parallel",
    version="0.1.0",
    description="LLaMA training with Megatron-style tensor, sequence, pipeline and data parallelism "
                "on plain torch.distributed, tested on CPU",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["parallel", "parallel.*", "llama", "llama.*", "launcher", "launcher.*"]),
    # A range, not a pin: users bring the torch build that matches their CUDA.
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "sentencepiece>=0.1.99",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=7.4", "pytest-timeout>=2.2", "transformers>=4.40", "ruff>=0.5", "tensorboard>=2.14",
                 "lm-eval>=0.4.2", "accelerate>=0.26"],
        # llama-eval --harness: EleutherAI's lm-evaluation-harness, whose hf model needs accelerate
        "eval": ["lm-eval>=0.4.2", "accelerate>=0.26", "transformers>=4.40"],
        "mpi": ["mpi4py>=3.1"],
        "xformers": ["xformers>=0.0.23"],
        "plot": ["matplotlib>=3.6"],
        "tensorboard": ["tensorboard>=2.14"],
        "wandb": ["wandb>=0.16"],
    },
    entry_points={"console_scripts": ["llama-train=llama.train:main", "llama-convert=llama.convert_cli:main",
                                      "llama-generate=llama.generate:main", "llama-eval=llama.evaluate:main",
                                      "llama-plan=llama.plan:main"]},
)
