"""Flax nnx modules of the Qwen3 / Qwen3-MoE decoder."""

from qwen3_jax.model.transformer import ModelOutput, Qwen3

__all__ = ["ModelOutput", "Qwen3"]
