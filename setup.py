"""qwen3_jax: Qwen3-style sparse MoE language models in JAX / Flax nnx."""

from setuptools import find_packages, setup

# The `tpu` extra pins jax[tpu] (which pulls the matching libtpu) to this same version.
JAX_VERSION = "0.10.2"

setup(
    name="qwen3_jax",
    version="0.1.0",
    description="Qwen3-style sparse Mixture-of-Experts language models in JAX / Flax nnx",
    packages=find_packages(include=["qwen3_jax", "qwen3_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        f"jax>={JAX_VERSION}",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "numpy>=2.0",
        "ml_collections>=1.0",
        "absl-py>=2.1",
        "grain>=0.2.18",
        "tokenizers>=0.21",
        "tensorboardX>=2.6",
        "safetensors>=0.4",
        "jsonschema>=4.0",
    ],
    extras_require={
        # qwix: the reference the LoRA / int8 tests check our by-hand layers against.
        "test": ["pytest>=8", "ruff>=0.6", "matplotlib>=3.8", "qwix>=0.1.8"],
        # torch==2.13.0 is the CPU wheel these machines carry; a looser pin pulls a CUDA build.
        "hf": ["transformers>=5.0", "torch==2.13.0"],
        # scripts/serve.py (HTTP + the openai client its tests use), MCP tools (the SDK's 2.x
        # low-level server API), scripts/export.py (jax.export serialisation needs flatbuffers).
        "serve": [
            "fastapi>=0.115",
            "uvicorn>=0.30",
            "httpx>=0.27",
            "openai>=1.50",
            "mcp>=2.3",
            "flatbuffers>=24.3",
        ],
        # libtpu's compiler for ahead-of-time compiles for TPU topologies on any host
        # (scripts/aot.py); on hosts without TPUs nothing else loads it.
        "tpu": [f"jax[tpu]=={JAX_VERSION}"],
    },
)
