"""Ablations and benchmarks built on qwen3_jax."""
