"""qwen3_jax: Qwen3-style sparse Mixture-of-Experts language models in JAX / Flax nnx."""

from qwen3_jax.config import AttentionConfig, MeshConfig, ModelConfig, MoEConfig

__all__ = ["AttentionConfig", "MeshConfig", "ModelConfig", "MoEConfig"]
