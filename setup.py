"""megatron-ext: long-context training for Megatron-Core."""
from setuptools import find_packages, setup

setup(
    name="megatron-ext",
    version="0.1.0",
    description="Context parallelism, the LongSkywork long-context recipe, and data/launch tools for Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_ext*", "data_tools*", "launch*"]),
    install_requires=[
        # 2.9: torchrun --signals-to-handle (launch/slurm/train.sbatch); megatron-core 0.16 needs >= 2.6
        "torch>=2.9",
        "megatron-core>=0.16,<0.20",
        "sentencepiece>=0.2",
        "wandb>=0.17",
        "numpy",
        "tqdm",
        "matplotlib",
        "pyyaml",
        "einops",  # megatron-core needs it for hierarchical CP groups (a2a+p2p)
        "orjson",  # 3x faster JSON parsing in data_tools.preprocess
        "psutil",  # megatron-core dist_checkpointing imports it when saving
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]"],
        # Hugging Face import/export (megatron_ext.convert) and hf: tokenizers
        "hf": ["transformers>=4.45", "safetensors>=0.4", "tokenizers>=0.20"],
        # data_tools.preprocess input beyond JSON lines: .parquet (pyarrow), .jsonl.zst (zstandard),
        # Hugging Face datasets folders (datasets.load_from_disk); each imported only when such input is given
        "data": ["pyarrow>=15", "zstandard>=0.22", "datasets>=2.19"],
        "dev": ["pytest>=8", "pytest-timeout", "transformers>=4.45", "safetensors>=0.4", "tokenizers>=0.20",
                "pyarrow>=15", "zstandard>=0.22", "datasets>=2.19",  # the data extra, for its tests
                "jsonschema>=4.18"],  # tests: launch's TrainJob against the Kubeflow Trainer CRD schema
    },
)
